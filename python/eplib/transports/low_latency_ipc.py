"""Low-latency mode on the ipc transport (CUDA peer memory between the ranks of one node).

At its first LL call each rank allocates one more ipc buffer (``_C.IpcBuffer``, exported and opened by
every peer as the normal-mode one is), whose region holds the protocol's flags and two buffers of R
message slots. The pack kernel writes each row straight into its destination's slot in the peer's memory
(FP8-cast on the device); the flag steps around the kernels say when a slot may be written and when a
message may be read (``csrc/cuda/low_latency_ipc.h``, the protocol and its invariants). No collective
and no host synchronization after the first call.

Waits give up after ``EPLIB_TIMEOUT_S`` (read at each call). With ``enable_shrink`` a silent peer is
then masked on the device and the call completes for the live ranks (``low_latency_query_mask_buffer``
shows it). Without, the call's outputs are poisoned (recv_count and layout_range -1, combined rows NaN)
and the host raises RuntimeError naming the phase and the peer at the end of the receive (or at the
next call, when the device reports later), and refuses further LL calls.
"""

from typing import Optional

import torch

from .. import _C
from ..collectives import timeout_seconds
from .ipc import open_ipc_buffer
from .low_latency_cuda import CudaLowLatency
from .tensors import ptr

Tensor = torch.Tensor

_STEPS = _C.LL_SYNC_STEPS


class IpcLowLatency(CudaLowLatency):
    name = "ipc"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.ll_buffer: Optional["_C.IpcBuffer"] = None
        self._failure: Optional[str] = None

    def _allocate(self, num_bytes: int) -> None:
        # The region holds the protocol's flags where the cpu engine's region has its flag pages.
        self.slot_bytes = self._slot_bytes(num_bytes)
        region = _C.LL_IPC_SLOTS_OFFSET + 2 * self.num_ranks * self.slot_bytes
        self.ll_buffer = open_ipc_buffer(self.group, self.device, self.context.device_index,
                                         _C.ipc_header_bytes() + region)
        regions = self.ll_buffer.region_addresses()

        def slot(rank: int, buffer_index: int, source: int) -> int:
            return regions[rank] + _C.LL_IPC_SLOTS_OFFSET + (buffer_index * self.num_ranks + source) * self.slot_bytes

        ranks = range(self.num_ranks)
        self.messages = [[self._addresses(slot(r, b, self.rank) for r in ranks) for b in range(2)],
                         [self._addresses(slot(self.rank, b, s) for s in ranks) for b in range(2)]]

    def _sync(self, step: str, buffer_index: int, wait_stats: Optional[Tensor] = None) -> None:
        args = _C.LLSyncArgs(step=_STEPS[step], buffer_index=buffer_index, mask=self.mask.data_ptr(),
                             poisoned=self.mask[self.num_ranks:].data_ptr(), shrink=self.enable_shrink,
                             wait_stats=ptr(wait_stats))
        self.ll_buffer.low_latency_sync(args, self.context.current_stream())
        self.context.hold((self.mask, wait_stats))

    def _before_send(self, buffer_index: int) -> None:
        self.ll_buffer.set_timeout(timeout_seconds())
        self._sync("wait_freed", buffer_index)

    def _send(self, buffer_index: int, phase: str) -> None:
        self._sync("publish_arrived", buffer_index)

    def _before_receive(self, buffer_index: int, wait_stats: Optional[Tensor]) -> None:
        self._sync("wait_arrived", buffer_index, wait_stats)

    def _after_receive(self, buffer_index: int) -> None:
        self._sync("publish_freed", buffer_index)

    def check_failed(self) -> None:
        """Raises RuntimeError naming the phase and the peer once a wait of an earlier call timed out
        (without enable_shrink). Reads host-mapped memory: never synchronizes."""
        super().check_failed()
        if self._failure is None and self.ll_buffer is not None:
            phase, peer = self.ll_buffer.timeout_report()
            if phase:
                self._failure = (f"rank {self.rank}: {_C.IPC_PHASES.get(phase, phase)} timed out waiting for rank "
                                 f"{peer} (limit EPLIB_TIMEOUT_S={timeout_seconds():g} s), which raised, exited or "
                                 f"never reached the same call")
                raise RuntimeError(f"eplib: {self._failure}; the call's outputs are poisoned (enable_shrink=True "
                                   f"masks such ranks instead)")
        if self._failure is not None:
            raise RuntimeError(f"eplib: this Buffer's low-latency calls are out of step since an earlier wait failed "
                               f"({self._failure}); create a new Buffer")

    def destroy(self) -> None:
        """Meets the other ranks at a barrier in peer memory, then frees the low-latency ipc buffer."""
        if self.ll_buffer is not None:
            buffer, self.ll_buffer = self.ll_buffer, None
            buffer.destroy(timeout_seconds())
