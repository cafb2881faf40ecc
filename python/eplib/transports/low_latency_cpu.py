"""Low-latency mode on CPU tensors (the cpu transport).

How the rows travel:

- ``SharedMemoryExchange`` (all ranks on one host, the default): each rank holds a shared region
  (memfd) that the others map: flags, then two buffers of R message slots; and a region of its own
  per buffer for its published dispatches. A dispatch is pulled: each rank waits until every peer
  has freed the buffer's previous round, writes its call once into its published buffer (header,
  topk_idx, rows; FP8-cast once per token; ``eplib/low_latency.h``) and raises its ``published``
  flag to the call's round (a release store). Each destination waits for the flags (acquire), copies
  the rows of its experts straight into ``recv_x`` and raises its ``freed`` flag. One copy per
  token on the source, one per (token, destination expert) on the destination, no collective. A
  combine moves one message per (expert rank, source) pair: the expert rank writes it straight into
  its slot in the source's region and raises the source's ``arrived`` flag; the source reduces from
  there (or, zero-copy, from the expert rank's shared buffer) and frees the buffer.
- ``GlooExchange`` (ranks on several hosts): both calls as messages (one per (source, destination)
  pair, as a combine above), sent as gloo point-to-point messages, one per live peer and direction,
  received into slots of the same size.

Waits. Every wait on a peer gives up after ``EPLIB_TIMEOUT_S``. With ``enable_shrink`` the peer is then
masked and the call completes for the live ranks (a stopped or dead rank costs one timeout); without,
the call raises RuntimeError naming the rank and the phase, and the Buffer refuses further LL calls.
"""

import ctypes
import socket
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from .. import _C
from ..collectives import timeout_seconds
from ..event import EventOverlap
from ..low_latency import (ZERO_COPY_HANDLE_BYTES, CombineCall, DispatchCall, DispatchOutputs, LowLatencyHandle, LowLatencyState,
                           flags_bytes, header_fields, message_problem, region_bytes, run_receive,
                           zero_copy_source)
from .ipc import _all_gather_bytes

Tensor = torch.Tensor

_HANDLE_BYTES = 96
_HOST_BYTES = 128


class PeerTimeout(RuntimeError):
    """A low-latency wait for a peer gave up (without enable_shrink)."""


class SharedMemoryExchange:
    """Messages through shared host memory (see the module docstring). Region of rank r:
    freed[b] at 64 * b, published[b] at 64 * b + 8, arrived[b][s] at 128 + 8 * (b * R + s), then the
    handles of its own regions (below), then buffer b's slot s at flags_bytes(R) + (b * R + s) * slot_bytes.
    slot_bytes is fixed when the regions are made (the smallest region's share), so that a sender and a
    receiver whose calls disagree still meet in the same slot, where the header tells the receiver of the
    disagreement.

    Dispatches do not use the slots: each rank publishes its call once in a region of its own per buffer
    (eplib/low_latency.h, "published dispatch") and raises its published[b] flag; the destinations pull
    the rows of their experts from it, then raise their freed[b]. A rank rewrites its published buffer
    only when every live peer has freed the buffer's previous round."""

    kind = "shared memory"
    pulls_dispatch = True
    # Regions of a rank's own, one per buffer, made or grown by it (after wait_freed), their handles after the
    # flags, mapped by the peers when they need them.
    ZERO_COPY, PUBLISHED = 0, 1

    def __init__(self, group: dist.ProcessGroup, num_bytes: int) -> None:
        self.rank, self.num_ranks = group.rank(), group.size()
        self.region = _C.SharedRegion(num_bytes)
        records = _all_gather_bytes(group, self.region.handle().encode().ljust(_HANDLE_BYTES, b"\0"),
                                    torch.device("cpu"), "low-latency shared memory (handle exchange)")
        handles = [record.rstrip(b"\0").decode() for record in records]
        self.bases = [self.region.address if r == self.rank else self.region.open_peer(handle)
                      for r, handle in enumerate(handles)]
        smallest = min(int(handle.split()[2]) for handle in handles)
        self.slot_bytes = (smallest - flags_bytes(self.num_ranks)) // (2 * self.num_ranks) // 16 * 16
        self.num_bytes = num_bytes
        self.own: Dict[Tuple[int, int], "_C.SharedRegion"] = {}  # (kind, buffer) -> region
        self.peer_regions: Dict[str, int] = {}  # handle -> address of a peer's region mapped here

    def fits(self, message_bytes: int) -> bool:
        return message_bytes <= self.slot_bytes

    def _freed(self, rank: int, buffer_index: int) -> int:
        return self.bases[rank] + 64 * buffer_index

    def _published(self, rank: int, buffer_index: int) -> int:
        return self.bases[rank] + 64 * buffer_index + 8

    def _arrived(self, rank: int, buffer_index: int, source: int) -> int:
        return self.bases[rank] + 128 + 8 * (buffer_index * self.num_ranks + source)

    def _slot(self, rank: int, buffer_index: int, source: int) -> int:
        return self.bases[rank] + flags_bytes(self.num_ranks) + (buffer_index * self.num_ranks + source) * self.slot_bytes

    def wait_freed(self, buffer_index: int, round_: int, live: Sequence[bool], timeout_s: float) -> List[int]:
        """Waits until every live peer has received round ``round_`` of buffer ``buffer_index`` (and so no
        longer reads what this rank sent or published in it); the peers that did not in time."""
        flags = [self._freed(r, buffer_index) if live[r] and r != self.rank else 0 for r in range(self.num_ranks)]
        waited = _C.wait_flags(flags, round_, timeout_s)
        return [r for r in range(self.num_ranks) if flags[r] and waited[r] < 0]

    def send(self, buffer_index: int, round_: int, message_bytes: int, live: Sequence[bool],
             timeout_s: float) -> Tuple[List[int], List[int]]:
        """(message addresses per destination, 0 for masked or silent ones; destinations that did not free
        the buffer in time)."""
        failed = self.wait_freed(buffer_index, round_ - 1, live, timeout_s)
        slots = [self._slot(r, buffer_index, self.rank) if live[r] and r not in failed else 0
                 for r in range(self.num_ranks)]
        return slots, failed

    def publish(self, buffer_index: int, round_: int, slots: Sequence[int], message_sizes: Sequence[int]) -> None:
        for r, slot in enumerate(slots):
            if slot:
                _C.publish_flag(self._arrived(r, buffer_index, self.rank), round_)

    def receive(self, buffer_index: int, round_: int, message_bytes: int, live: Sequence[bool],
                timeout_s: float) -> Tuple[List[int], List[int], List[int]]:
        """(message addresses per source, 0 for masked or silent ones; ns waited per source, -1 if not
        arrived; sources that did not arrive in time)."""
        flags = [self._arrived(self.rank, buffer_index, s) if live[s] else 0 for s in range(self.num_ranks)]
        waited = _C.wait_flags(flags, round_, timeout_s)
        failed = [s for s in range(self.num_ranks) if flags[s] and waited[s] < 0]
        slots = [self._slot(self.rank, buffer_index, s) if waited[s] >= 0 else 0
                 for s in range(self.num_ranks)]
        return slots, waited, failed

    def release(self, buffer_index: int, round_: int) -> None:
        _C.publish_flag(self._freed(self.rank, buffer_index), round_)

    # Published dispatch.

    def published_buffer(self, buffer_index: int, round_: int, num_bytes: int, live: Sequence[bool],
                         timeout_s: float) -> Tuple[int, List[int]]:
        """(address of this rank's published buffer of ``buffer_index``, of at least ``num_bytes``, to write
        once every live peer has read its previous round; the peers that did not in time)."""
        failed = self.wait_freed(buffer_index, round_ - 1, live, timeout_s)
        return self._own_region(self.PUBLISHED, buffer_index, num_bytes).address, failed

    def publish_dispatch(self, buffer_index: int, round_: int) -> None:
        _C.publish_flag(self._published(self.rank, buffer_index), round_)

    def receive_published(self, buffer_index: int, round_: int, live: Sequence[bool],
                          timeout_s: float) -> Tuple[List[int], List[int], List[int]]:
        """As ``receive``, for the published buffers of the sources (this rank's own included)."""
        flags = [self._published(s, buffer_index) if live[s] else 0 for s in range(self.num_ranks)]
        waited = _C.wait_flags(flags, round_, timeout_s)
        failed = [s for s in range(self.num_ranks) if flags[s] and waited[s] < 0]
        buffers = [self._region_of(s, self.PUBLISHED, buffer_index) if waited[s] >= 0 else 0
                   for s in range(self.num_ranks)]
        return buffers, waited, failed

    def overtaken(self, buffer_index: int, round_: int, sources: Sequence[int]) -> List[int]:
        """The sources (nonzero entries) whose published buffer moved past round ``round_`` while this rank read
        it. Only a source that masked this rank goes on without waiting for it; its rows may be torn."""
        flags = [self._published(s, buffer_index) if source else 0 for s, source in enumerate(sources)]
        waited = _C.wait_flags(flags, round_ + 1, 0.0)
        return [s for s in range(self.num_ranks) if flags[s] and waited[s] >= 0]

    # Zero-copy combine: the expert outputs of buffer b live in a region of the rank's own; the peers map it
    # when a combine message says that its rows stayed there.

    def zero_copy_tensor(self, buffer_index: int, shape: Tuple[int, int, int]) -> Tensor:
        """bf16 ``shape`` in this rank's shared zero-copy region of buffer ``buffer_index`` (made or grown
        here; call it only when no peer reads the buffer's previous rows: after ``wait_freed``)."""
        num_bytes = shape[0] * shape[1] * shape[2] * 2
        region = self._own_region(self.ZERO_COPY, buffer_index, num_bytes)
        memory = (ctypes.c_uint8 * region.num_bytes).from_address(region.address)
        return torch.frombuffer(memory, dtype=torch.uint8)[:num_bytes].view(torch.bfloat16).view(shape)

    def zero_copy_addresses(self, buffer_index: int, sources: Sequence[int]) -> List[int]:
        """Per rank, its zero-copy region of buffer ``buffer_index`` as mapped here (0: none, or the rank is
        not among the ``sources`` whose messages arrived)."""
        return [self._region_of(r, self.ZERO_COPY, buffer_index) if source else 0 for r, source in enumerate(sources)]

    def _handle_address(self, rank: int, kind: int, buffer_index: int) -> int:
        return self.bases[rank] + 128 + 16 * self.num_ranks + ZERO_COPY_HANDLE_BYTES * (2 * kind + buffer_index)

    def _own_region(self, kind: int, buffer_index: int, num_bytes: int) -> "_C.SharedRegion":
        """This rank's region of ``kind`` for ``buffer_index``, made or grown to ``num_bytes`` (its new handle
        written for the peers). A grown region has a new handle: its size is part of it."""
        region = self.own.get((kind, buffer_index))
        if region is None or region.num_bytes < num_bytes:
            region = self.own[kind, buffer_index] = _C.SharedRegion(max(num_bytes, 16))
            record = region.handle().encode()
            ctypes.memmove(self._handle_address(self.rank, kind, buffer_index),
                           record.ljust(ZERO_COPY_HANDLE_BYTES, b"\0"), ZERO_COPY_HANDLE_BYTES)
        return region

    def _region_of(self, rank: int, kind: int, buffer_index: int) -> int:
        """Address here of rank's region of ``kind`` for ``buffer_index`` (0: it has none). Read after its flag
        says that it wrote what the region holds (the handle comes before the flag)."""
        if rank == self.rank:
            region = self.own.get((kind, buffer_index))
            return region.address if region is not None else 0
        handle = ctypes.string_at(self._handle_address(rank, kind, buffer_index), ZERO_COPY_HANDLE_BYTES)
        handle = handle.rstrip(b"\0").decode()
        if handle and handle not in self.peer_regions:
            self.peer_regions[handle] = self.region.open_peer(handle)
        return self.peer_regions[handle] if handle else 0


class GlooExchange:
    """Messages as gloo point-to-point sends of their used bytes, received into message slots of
    staging tensors (two buffers, as the shared-memory exchange)."""

    kind = "gloo"
    pulls_dispatch = False

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group
        self.rank, self.num_ranks = group.rank(), group.size()
        self.staging = [[torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.uint8)] for _ in range(2)]
        self.pending: List[dict] = [{}, {}]

    def fits(self, message_bytes: int) -> bool:
        return True

    def _tensor(self, direction: int, buffer_index: int, message_bytes: int) -> Tensor:
        needed = self.num_ranks * message_bytes
        if self.staging[buffer_index][direction].numel() < needed:
            self.staging[buffer_index][direction] = torch.empty(needed, dtype=torch.uint8)
        return self.staging[buffer_index][direction]

    def send(self, buffer_index: int, round_: int, message_bytes: int, live: Sequence[bool],
             timeout_s: float) -> Tuple[List[int], List[int]]:
        send, recv = self._tensor(0, buffer_index, message_bytes), self._tensor(1, buffer_index, message_bytes)
        self.pending[buffer_index] = {"message_bytes": message_bytes, "tag": round_ * 2 + buffer_index}
        slots = [send.data_ptr() + r * message_bytes if live[r] else 0 for r in range(self.num_ranks)]
        slots[self.rank] = recv.data_ptr() + self.rank * message_bytes  # to itself: straight into its receive slot
        return slots, []

    def publish(self, buffer_index: int, round_: int, slots: Sequence[int], message_sizes: Sequence[int]) -> None:
        pending = self.pending[buffer_index]
        message_bytes, tag = pending["message_bytes"], pending["tag"]
        send, recv = self._tensor(0, buffer_index, message_bytes), self._tensor(1, buffer_index, message_bytes)
        pending["sends"], pending["recvs"], pending["failed"] = {}, {}, []
        for r, slot in enumerate(slots):
            if r == self.rank or not slot:
                continue
            peer = dist.get_global_rank(self.group, r)
            try:
                pending["recvs"][r] = dist.irecv(recv[r * message_bytes:(r + 1) * message_bytes], src=peer,
                                                 group=self.group, tag=tag)
                pending["sends"][r] = dist.isend(send[r * message_bytes:r * message_bytes + message_sizes[r]],
                                                 dst=peer, group=self.group, tag=tag)
            except RuntimeError:  # the peer's connection is gone
                pending["failed"].append(r)

    def receive(self, buffer_index: int, round_: int, message_bytes: int, live: Sequence[bool],
                timeout_s: float) -> Tuple[List[int], List[int], List[int]]:
        pending = self.pending[buffer_index]
        recv = self._tensor(1, buffer_index, message_bytes)
        start = time.monotonic()
        waited = [-1] * self.num_ranks
        waited[self.rank] = 0
        failed = list(pending["failed"])
        for works, record in ((pending["recvs"], True), (pending["sends"], False)):
            for r, work in works.items():
                if r in failed:
                    continue
                remaining = max(0.0, timeout_s - (time.monotonic() - start))
                try:
                    work.wait(timeout=_timedelta(remaining))
                except RuntimeError:
                    failed.append(r)
                    continue
                if record:
                    waited[r] = int((time.monotonic() - start) * 1e9)
        slots = [recv.data_ptr() + s * message_bytes if waited[s] >= 0 and live[s] and s not in failed else 0
                 for s in range(self.num_ranks)]
        return slots, waited, sorted(set(failed))

    def release(self, buffer_index: int, round_: int) -> None:
        self.pending[buffer_index] = {}

    def zero_copy_addresses(self, buffer_index: int, sources: Sequence[int]) -> List[int]:
        return [0] * len(sources)  # combine rows always travel in the messages


def _timedelta(seconds: float):
    import datetime

    return datetime.timedelta(seconds=seconds)


class CpuLowLatency:
    """The low-latency calls of one Buffer on CPU tensors (see the module docstring)."""

    name = "cpu"

    def __init__(self, group: dist.ProcessGroup, enable_shrink: bool, num_rdma_bytes: int,
                 masked: Sequence[bool], exchange: str = "auto") -> None:
        self.group = group
        self.rank, self.num_ranks = group.rank(), group.size()
        self.enable_shrink = enable_shrink
        self.num_rdma_bytes = num_rdma_bytes
        self.masked = list(masked)
        self.state = LowLatencyState()
        self.exchange_kind = exchange  # "auto", "shared memory" or "gloo" (tests)
        self._exchange = None
        self._message_bytes = 0  # the largest message of a call so far (what a rejecting rank may receive)
        self._zero_copy: List[Optional[Tensor]] = [None, None]
        self._outputs = DispatchOutputs(self.num_ranks)
        self._out_of_step: Optional[str] = None

    # --------------------------------------------------------------------------------------------
    # Plumbing
    # --------------------------------------------------------------------------------------------

    def _start(self) -> None:
        if self._out_of_step is not None:
            raise RuntimeError(f"eplib: this Buffer's low-latency calls are out of step since an earlier wait failed "
                               f"({self._out_of_step}); create a new process group and Buffer")
        _C.set_num_threads(torch.get_num_threads())

    def _exchange_for(self, message_bytes: int):
        """The exchange, made at the first call (see _make_exchange)."""
        if self._exchange is None:
            self._make_exchange(message_bytes, rejected=False)
        self._message_bytes = max(self._message_bytes, message_bytes)
        if not self._exchange.fits(message_bytes):
            raise ValueError(f"num_rdma_bytes: this low-latency call needs "
                             f"{region_bytes(self.num_ranks, message_bytes)} bytes of shared memory per rank, the "
                             f"Buffer has {self._exchange.num_bytes} (sized by its first low-latency call or by "
                             f"num_rdma_bytes); size it with Buffer.get_low_latency_rdma_size_hint")
        return self._exchange

    def _make_exchange(self, message_bytes: int, rejected: bool) -> None:
        """Makes the exchange at the first call, a collective: every rank makes its first LL call together. It
        starts with one all-gather of (host, rejected): when a rank rejected its first call's input, no rank
        makes the exchange, the others raise RuntimeError naming it at once, and the next call starts afresh."""
        record = socket.gethostname().encode()[:_HOST_BYTES - 1].ljust(_HOST_BYTES - 1, b"\0") + bytes([rejected])
        records = _all_gather_bytes(self.group, record, torch.device("cpu"), "low-latency exchange (hosts)")
        rejecting = [r for r, record in enumerate(records) if record[-1]]
        if rejecting:
            if rejected:
                return
            raise_first([message_problem(2, rejecting[0], self.rank)])
        kind = self.exchange_kind
        if kind == "auto":
            kind = "shared memory" if len({record[:-1] for record in records}) == 1 else "gloo"
        if kind == "shared memory":
            num_bytes = max(self.num_rdma_bytes, region_bytes(self.num_ranks, message_bytes))
            self._exchange = SharedMemoryExchange(self.group, num_bytes)
        else:
            self._exchange = GlooExchange(self.group)

    def _live(self) -> List[bool]:
        return [not masked for masked in self.masked]

    def _peers_failed(self, failed: Sequence[int], phase: str) -> None:
        """Masks the peers that did not answer (enable_shrink), or raises."""
        if not failed:
            return
        if self.enable_shrink:
            for r in failed:
                self.masked[r] = True
            return
        self._out_of_step = (f"rank {self.rank}: {phase} timed out waiting for rank(s) {list(failed)} "
                             f"(limit EPLIB_TIMEOUT_S={timeout_seconds():g} s)")
        raise PeerTimeout(f"eplib: {self._out_of_step}; they raised, exited or never reached the same call "
                          f"(enable_shrink=True masks such ranks instead)")

    def _receive(self, received: Tuple[List[int], List[int], List[int]], status, layout_args: tuple,
                 fields: Sequence[int], phase: str, wait_stats: Optional[Tensor]) -> Tuple[List[int], list]:
        """Checks what an exchange's receive gave, (addresses per source, ns waited, sources that failed), and the
        headers there (``status``: _C.ll_message_status or _C.ll_published_status): (addresses of the usable
        ones, 0 for the others; the problems found, as message_problem gives them)."""
        slots, waited, failed = received
        self._peers_failed(failed, phase)
        problems = []
        for s, slot in enumerate(slots):
            problem = message_problem(status(slot, *layout_args, fields), s, self.rank) if slot else None
            if problem is not None:
                problems.append(problem)
                slots[s] = 0
        if wait_stats is not None:
            wait_stats += torch.tensor([max(w, 0) for w in waited], dtype=torch.int64)
        return slots, problems

    # --------------------------------------------------------------------------------------------
    # Calls
    # --------------------------------------------------------------------------------------------

    def dispatch(self, call: DispatchCall, async_finish: bool, return_recv_hook: bool):
        """See Buffer.low_latency_dispatch; returns (recv_x, recv_count, handle, event, hook)."""
        self._start()
        num_tokens, num_topk, num_experts = call.num_tokens, call.num_topk, call.num_experts
        sizes = call.layout()
        exchange = self._exchange_for(sizes["message_bytes"])
        buffer_index, round_ = self.state.next_call("low_latency_dispatch")
        send_slot = torch.empty(num_tokens, num_topk, dtype=torch.int32)
        send_counts = torch.zeros(num_experts, dtype=torch.int32)
        send_offset = torch.zeros(num_experts, dtype=torch.int32)
        rejection = None
        try:
            _C.ll_layout(call.topk_idx.data_ptr(), num_tokens, num_topk, num_experts, self.num_ranks,
                         send_slot.data_ptr(), send_counts.data_ptr(), send_offset.data_ptr())
        except ValueError as error:  # the peers hear of it through the headers, then this rank raises
            rejection = error
            send_counts.zero_()
        send = self._publish_dispatch if exchange.pulls_dispatch else self._send_dispatch_messages
        fields = call.header_fields(rejected=rejection is not None)
        receive_rows = send(exchange, call, buffer_index, round_, sizes, fields, send_slot, send_counts, send_offset)
        outputs = self._outputs.get(buffer_index, call, torch.empty)

        def receive() -> None:
            problems = receive_rows(outputs)
            exchange.release(buffer_index, round_)
            if call.cumulative_stats is not None:
                call.cumulative_stats += outputs[4]
            if rejection is not None:
                raise rejection
            raise_first(problems)

        hook = run_receive(self.state, buffer_index, "low_latency_dispatch", receive,
                           return_recv_hook and rejection is None)
        recv_x, recv_scales, src_info, layout_range, recv_count = outputs
        handle = LowLatencyHandle(src_info, layout_range, call.num_max, call.hidden, num_experts, send_slot=send_slot,
                                  send_counts=send_counts, send_offset=send_offset, owner=self)
        recv = (recv_x, recv_scales) if call.use_fp8 else recv_x
        return recv, recv_count, handle, EventOverlap(), hook

    def _publish_dispatch(self, exchange: SharedMemoryExchange, call: DispatchCall, buffer_index: int, round_: int,
                          sizes: dict, fields: List[int], send_slot: Tensor, send_counts: Tensor, send_offset: Tensor):
        """The sending half of a dispatch that the destinations pull: this rank's call once into its published
        buffer (a header alone when rejected; the send layout only serves messages). Returns the receiving
        half: outputs -> problems."""
        layout_args = (call.num_max, call.hidden, call.num_topk, call.num_local_experts, call.use_fp8)
        published, failed = exchange.published_buffer(buffer_index, round_, sizes["published_bytes"], self._live(),
                                                       timeout_seconds())
        self._peers_failed(failed, "low_latency_dispatch (send: waiting for the peers to read the buffer's "
                                   "previous rows)")
        if fields[_C.LL_FIELDS["rejected"]]:
            _C.ll_write_header(published, 1, 1, 1, 0, False, fields, [])
        else:
            _C.ll_dispatch_publish(call.x.data_ptr(), call.num_tokens, *layout_args, call.round_scale,
                                   call.topk_idx.data_ptr(), fields, published)
        exchange.publish_dispatch(buffer_index, round_)
        expected = call.header_fields()
        phase = "low_latency_dispatch (receive: waiting for a sender's rows)"

        def pull(outputs) -> list:
            recv_x, recv_scales, src_info, layout_range, recv_count = outputs
            received = exchange.receive_published(buffer_index, round_, self._live(), timeout_seconds())
            sources, problems = self._receive(received, _C.ll_published_status, layout_args, expected, phase,
                                              call.wait_stats)
            while True:
                _C.ll_dispatch_pull(sources, *layout_args, self.rank, call.use_ue8m0, recv_x.data_ptr(),
                                    recv_scales.data_ptr() if recv_scales is not None else 0, src_info.data_ptr(),
                                    layout_range.data_ptr(), recv_count.data_ptr(), 0)
                overtaken = exchange.overtaken(buffer_index, round_, sources)
                if not overtaken:
                    return problems
                # Sources that masked this rank rewrote their rows while it read them: mask them too (or raise),
                # and place the rows of the others again.
                self._peers_failed(overtaken, "low_latency_dispatch (receive: a sender went on without waiting "
                                              "for this rank, so it masked this rank)")
                sources = [0 if s in overtaken else source for s, source in enumerate(sources)]

        return pull

    def _send_dispatch_messages(self, exchange, call: DispatchCall, buffer_index: int, round_: int, sizes: dict,
                                fields: List[int], send_slot: Tensor, send_counts: Tensor, send_offset: Tensor):
        """The sending half of a dispatch by messages (one per destination). Returns the receiving half:
        outputs -> problems."""
        layout_args = (call.num_max, call.hidden, call.num_topk, call.num_local_experts, call.use_fp8)
        message_bytes = sizes["message_bytes"]
        slots, failed = exchange.send(buffer_index, round_, message_bytes, self._live(), timeout_seconds())
        self._peers_failed(failed, "low_latency_dispatch (send: waiting for a receiver to free its buffer)")
        if fields[_C.LL_FIELDS["rejected"]]:
            for slot in slots:
                if slot:
                    _C.ll_write_header(slot, *layout_args, fields, [0] * call.num_local_experts)
        else:
            _C.ll_dispatch_pack(call.x.data_ptr(), call.num_tokens, *layout_args, call.round_scale,
                                call.topk_idx.data_ptr(), call.num_experts, self.num_ranks, send_slot.data_ptr(),
                                send_counts.data_ptr(), send_offset.data_ptr(), fields, slots)
        counts = send_counts.view(self.num_ranks, call.num_local_experts).sum(1).tolist()
        exchange.publish(buffer_index, round_, slots,
                         [sizes["header_bytes"] + n * sizes["dispatch_stride"] for n in counts])
        expected = call.header_fields()

        def unpack(outputs) -> list:
            recv_x, recv_scales, src_info, layout_range, recv_count = outputs
            received = exchange.receive(buffer_index, round_, message_bytes, self._live(), timeout_seconds())
            sources, problems = self._receive(received, _C.ll_message_status, layout_args, expected,
                                              "low_latency_dispatch (receive: waiting for a sender's rows)",
                                              call.wait_stats)
            _C.ll_dispatch_unpack(sources, *layout_args, call.use_ue8m0, recv_x.data_ptr(),
                                  recv_scales.data_ptr() if recv_scales is not None else 0, src_info.data_ptr(),
                                  layout_range.data_ptr(), recv_count.data_ptr(), 0)
            return problems

        return unpack

    def combine(self, call: CombineCall, async_finish: bool, return_recv_hook: bool):
        """See Buffer.low_latency_combine; returns (combined_x, event, hook)."""
        self._start()
        handle = call.handle
        if handle.owner is not self:
            raise ValueError("handle: made by another Buffer's (or transport's) low_latency_dispatch")
        sizes = call.layout()
        message_bytes = sizes["message_bytes"]
        exchange = self._exchange_for(message_bytes)
        x = zero_copy_source(self._zero_copy, self.state, call) if call.zero_copy else call.x
        # Rows in this rank's shared zero-copy region stay there: the peers read them from it.
        pulled = call.zero_copy and isinstance(exchange, SharedMemoryExchange)
        buffer_index, round_ = self.state.next_call("low_latency_combine")
        layout_args = (call.num_max, call.hidden, handle.num_topk, call.num_local_experts, False)
        slots, failed = exchange.send(buffer_index, round_, message_bytes, self._live(), timeout_seconds())
        self._peers_failed(failed, "low_latency_combine (send: waiting for a receiver to free its buffer)")
        fields = call.header_fields()
        fields[_C.LL_FIELDS["pulled"]] = int(pulled)
        _C.ll_combine_pack(x.data_ptr(), handle.layout_range.data_ptr(), *layout_args[:4], self.num_ranks, fields, slots)
        counts = (handle.layout_range & 0xFFFFFFFF).sum(0).tolist()
        exchange.publish(buffer_index, round_, slots,
                         [sizes["header_bytes"] + n * sizes["combine_stride"] for n in counts])
        out = call.out if call.out is not None else torch.empty(handle.num_tokens, call.hidden, dtype=torch.bfloat16)

        def receive() -> None:
            received = exchange.receive(buffer_index, round_, message_bytes, self._live(), timeout_seconds())
            sources, problems = self._receive(received, _C.ll_message_status, layout_args, fields,
                                              "low_latency_combine (receive: waiting for an expert rank's rows)",
                                              call.wait_stats)
            _C.ll_combine_reduce(sources, exchange.zero_copy_addresses(buffer_index, sources), *layout_args[:4], call.topk_idx.data_ptr(), call.topk_weights.data_ptr(),
                                 handle.num_tokens, call.num_experts, handle.send_slot.data_ptr(),
                                 handle.send_offset.data_ptr(), out.data_ptr())
            exchange.release(buffer_index, round_)
            raise_first(problems)

        hook = run_receive(self.state, buffer_index, "low_latency_combine", receive, return_recv_hook)
        return out, EventOverlap(), hook

    def next_combine_buffer(self, handle: LowLatencyHandle) -> Tensor:
        """bf16 [E_local, R * num_max, H]: the tensor the next combine reads with zero_copy=True."""
        self._start()
        buffer_index = self.state.num_calls % 2
        shape = (handle[4] // self.num_ranks, self.num_ranks * handle[2], handle[3])
        exchange = self._exchange
        if isinstance(exchange, SharedMemoryExchange):
            # The peers read this buffer's previous zero-copy rows straight from it: wait until they have
            # received the buffer's previous round (the round before the next call's).
            failed = exchange.wait_freed(buffer_index, self.state.num_calls // 2, self._live(), timeout_seconds())
            self._peers_failed(failed, "get_next_low_latency_combine_buffer (waiting for peers to read the rows of "
                                       "the buffer's previous combine)")
            self._zero_copy[buffer_index] = exchange.zero_copy_tensor(buffer_index, shape)
        elif self._zero_copy[buffer_index] is None or tuple(self._zero_copy[buffer_index].shape) != shape:
            self._zero_copy[buffer_index] = torch.zeros(shape, dtype=torch.bfloat16)
        return self._zero_copy[buffer_index]

    def reject(self, what: str, error: Exception) -> None:
        """Raises ``error``, a check that this rank's call failed, after taking part in the call's round with a
        header that says so: the peers then raise at once (RuntimeError naming this rank) instead of waiting out
        the timeout, and every rank stays in step for the next call. At the first call (no exchange yet) the
        exchange's set-up carries the rejection instead."""
        if self._out_of_step is not None or any(self.state.awaiting):
            raise error
        if self._exchange is None:
            self._make_exchange(0, rejected=True)
            raise error
        exchange, live, timeout_s = self._exchange, self._live(), timeout_seconds()
        buffer_index, round_ = self.state.next_call(what)
        fields = header_fields(1, 1, 1, 1, 0, 0, rejected=True)
        if what == "low_latency_dispatch" and exchange.pulls_dispatch:
            published, failed = exchange.published_buffer(buffer_index, round_, _C.LL_HEADER_FIELDS * 4, live,
                                                           timeout_s)
            _C.ll_write_header(published, 1, 1, 1, 0, False, fields, [])
            exchange.publish_dispatch(buffer_index, round_)
            _, _, failed_receive = exchange.receive_published(buffer_index, round_, live, timeout_s)
        else:
            slots, failed = exchange.send(buffer_index, round_, self._message_bytes, live, timeout_s)
            for slot in slots:
                if slot:
                    _C.ll_write_header(slot, 1, 1, 1, 0, False, fields, [])
            exchange.publish(buffer_index, round_, slots, [_C.LL_HEADER_FIELDS * 4 if slot else 0 for slot in slots])
            _, _, failed_receive = exchange.receive(buffer_index, round_, self._message_bytes, live, timeout_s)
        exchange.release(buffer_index, round_)
        if self.enable_shrink:
            for r in set(failed) | set(failed_receive):
                self.masked[r] = True
        raise error

    def clean(self) -> None:
        self._start()
        self.state.check_idle("clean_low_latency_buffer")

    def set_masked(self, rank: int, masked: bool) -> None:
        self.masked[rank] = masked

    def query_mask(self, mask_status: Tensor) -> None:
        mask_status.copy_(torch.tensor(self.masked, dtype=torch.int32))

    def clear_mask(self) -> None:
        self.masked = [False] * self.num_ranks


def raise_first(problems: list) -> None:
    """Raises the first (exception type, message) of a call's problems, if any."""
    if problems:
        kind, message = problems[0]
        raise kind(message)
