"""Low-latency mode on the nccl transport (CUDA tensors over torch.distributed).

Each rank keeps, per buffer, a send and a receive tensor of R message slots of the same fixed size (the
largest region any rank asked for at the first LL call). A call's send half packs every destination's
message into its slot of the send tensor (``low_latency_cuda.py``) and runs one ``all_to_all_single`` with
equal splits on the communication stream; its receive half (the call, or its hook) unpacks or reduces
the receive tensor on the device. Nothing synchronizes with the host.

Masks: NCCL's collectives cannot leave out a rank or give up on one, so only the masks set by hand
(``low_latency_update_mask_buffer`` / ``query`` / ``clean``) exist here: a masked destination's message
header is zeroed (its slot travels, but says it holds nothing) and a masked source's message is not read.
A rank that stops answering is caught by the process group's own timeout, not masked: masking on
timeout needs the ipc or cpu transport. ``dispatch_wait_recv_cost_stats`` is left as it is (the wait
happens inside NCCL).
"""

import torch

from .low_latency_cuda import CudaLowLatency


class NcclLowLatency(CudaLowLatency):
    name = "nccl"

    def _allocate(self, num_bytes: int) -> None:
        self.slot_bytes = self._slot_bytes(num_bytes)
        size = self.num_ranks * self.slot_bytes
        with self._call():
            self.send = [torch.zeros(size, dtype=torch.uint8, device=self.device) for _ in range(2)]
            self.recv = [torch.zeros(size, dtype=torch.uint8, device=self.device) for _ in range(2)]
        self.messages = [[self._addresses(t.data_ptr() + r * self.slot_bytes for r in range(self.num_ranks))
                          for t in tensors] for tensors in (self.send, self.recv)]

    def _before_send(self, buffer_index: int) -> None:
        # A masked destination's slot travels too: its header's magic becomes 0 ("nothing for you").
        magic = self.send[buffer_index].view(self.num_ranks, self.slot_bytes)[:, :4].view(torch.int32)
        magic.mul_(1 - self.mask[:self.num_ranks].unsqueeze(1))

    def _send(self, buffer_index: int, phase: str) -> None:
        self.transport._all_to_all(self.recv[buffer_index], self.send[buffer_index], None, None, phase)
