"""The ipc transport: CUDA tensors of the ranks of one node, moved through peer GPU memory (CUDA IPC),
with no NCCL on the data path.

Each rank cudaMallocs ``num_nvl_bytes`` once: a header of flags and count tables
(``_C.ipc_header_bytes()``), then one receive region. At construction the ranks all-gather their
IPC handles through the Buffer's process group (gloo or NCCL: the handles travel as bytes) and open
each other's buffers. From then on the process group is not used again: kernels write rows straight
into the destinations' regions and hand-shake through flags in peer memory (csrc/cuda/ipc.h).

Per call (all on the Buffer's communication stream):
    dispatch, normal      notify kernel: each rank writes its record [error flag | format | R send
                          counts | counts of the receiver's experts] into every rank's table and
                          waits for every rank's; the host reads the table from mapped memory (the
                          one host sync: the receive counts size the outputs). Then one round
                          (``_C.IpcBuffer.dispatch``): a send kernel writes every row into its
                          destination's region, at rows known from the counts, and a receive kernel
                          unpacks the own region into the outputs.
    dispatch, padded      (num_worst_tokens = W) the same without the host read: source s's rows
                          sit at rows [s*W, (s+1)*W) of each region, so R*W rows must fit; no host
                          sync, capturable in a CUDA graph.
    cached dispatch       one dispatch round along the handle's layout; no host sync.
    combine               one round (``_C.IpcBuffer.combine``): rows back to their sources' regions,
                          where each source's send_pos put them, then the fp32 reduction in
                          ascending rank order; no sync.

Memory: direct writes into one region sized by the real counts (no ring buffer), so the region must
hold a whole call: at most ``R * T`` rows of the larger of the dispatch and combine rows
(``Buffer.get_nvl_buffer_size_hint``). A call that does not fit raises ValueError on every rank,
before any row moves (normal dispatch: after the counts exchange, which tells every rank every
rank's counts).

One rank's bad input: a rank whose arguments fail a check in a dispatch (or in the get_dispatch_layout
before one) runs the notify kernel of its peers' normal-mode dispatch with a record marked REJECTED,
its message left in the process group's store (``share_error``); the peers raise PeerInputError at
their host read, and every rank's rounds stay in step. Calls without a notify (num_worst_tokens and
cached dispatch, combine) are not joined: their peers time out as below.

Waits: every device-side wait gives up after ``EPLIB_TIMEOUT_S`` (read at each call), reports the
phase and the rank it waited for through host-mapped memory, and the kernels of that and every later
round poison their outputs (NaN rows, -1 ids) instead of leaving stale ones; the host raises
RuntimeError naming phase and rank: at once in a normal-mode dispatch, else at the start of the next
call, or at ``Buffer.check_failed()`` (no sync: for CUDA graph replays). After that the Buffer
refuses further calls (the ranks' flags are out of step).
"""

import contextlib
import logging
import socket
import struct
import weakref
from typing import Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist

from .. import _C
from ..collectives import all_gather, timeout_seconds
from ..config import Config
from ..event import EventOverlap
from ..exchange import _StoreClient
from ..handle import DispatchHandle
from .cuda import CombineOutputs, CudaTransport, NormalCounts, UnpackOutputs
from .device_errors import REJECTED
from .kernels import combine_pack_args, dispatch_pack_args
from .records import format_values
from .streams import CallStreams
from .tensors import ptr, row_bytes

Tensor = torch.Tensor

_LOG = logging.getLogger("eplib")

# Seconds the host waits for the notify kernel beyond the device's own limit: the device reports
# a missing peer first, the host limit only catches a device that never ran the kernel.
_HOST_WAIT_MARGIN_S = 10.0
_HOST_NAME_BYTES = 128
_IPC_HANDLE_BYTES = 64


class IpcUnavailable(RuntimeError):
    """The ranks of the group cannot share ipc buffers here (several hosts, too many ranks, an
    allocation or an IPC open failed). Raised on every rank alike."""


def _all_gather_bytes(group: dist.ProcessGroup, payload: bytes, device: torch.device, phase: str) -> List[bytes]:
    """Every rank's ``payload`` (all of the same length), in rank order, through the group's backend."""
    on = torch.device("cpu") if any(b in str(dist.get_backend(group)) for b in ("gloo", "mpi")) else device
    local = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(on)
    gathered = torch.empty(group.size() * len(payload), dtype=torch.uint8, device=on)
    all_gather(gathered, local, group, phase)
    raw = gathered.cpu().numpy().tobytes()
    return [raw[r * len(payload):(r + 1) * len(payload)] for r in range(group.size())]


def open_ipc_buffer(group: dist.ProcessGroup, device: torch.device, device_index: int,
                    num_nvl_bytes: int) -> "_C.IpcBuffer":
    """Collective: allocates this rank's ipc buffer on ``device_index``, exchanges the IPC handles,
    opens the peers'. ``device``: where the handle exchange's tensors go on a non-gloo group.

    Raises ValueError (every rank alike) for a ``num_nvl_bytes`` too small or not the same on all
    ranks, IpcUnavailable when the ranks cannot share peer memory here.
    """
    num_ranks, rank = group.size(), group.rank()
    if num_ranks > _C.IPC_MAX_RANKS:
        raise IpcUnavailable(f"the group has {num_ranks} ranks; ipc buffers serve at most {_C.IPC_MAX_RANKS} "
                             f"(one node)")
    minimum = _C.ipc_header_bytes() + 16
    if num_nvl_bytes < minimum:
        raise ValueError(f"num_nvl_bytes: the ipc transport needs at least {minimum} bytes (size it with "
                         f"Buffer.get_nvl_buffer_size_hint), got {num_nvl_bytes}")
    buffer, problem = None, ""
    try:
        buffer = _C.IpcBuffer(rank, num_ranks, num_nvl_bytes, device_index)
        handle = buffer.ipc_handle()
    except RuntimeError as error:  # out of memory, or IPC unsupported here: the others must hear of it
        buffer, handle, problem = None, bytes(_IPC_HANDLE_BYTES), str(error)
    host = socket.gethostname().encode()[:_HOST_NAME_BYTES].ljust(_HOST_NAME_BYTES, b"\0")
    record = host + struct.pack("<qB", num_nvl_bytes, 0 if problem else 1) + handle
    records = _all_gather_bytes(group, record, device, "ipc buffer (handle exchange)")
    sizes = [struct.unpack_from("<q", r, _HOST_NAME_BYTES)[0] for r in records]
    allocated = [r[_HOST_NAME_BYTES + 8] == 1 for r in records]
    reason = None
    if len(set(sizes)) > 1:
        reason = ValueError(f"num_nvl_bytes: all ranks must pass the same, ranks 0..{num_ranks - 1} passed {sizes}")
    elif len({r[:_HOST_NAME_BYTES] for r in records}) > 1:
        reason = IpcUnavailable("the ranks are on several hosts")
    elif not all(allocated):
        reason = IpcUnavailable(f"rank(s) {[r for r, ok in enumerate(allocated) if not ok]} could not allocate or "
                                f"export an ipc buffer{f' ({problem})' if problem else ''}")
    if reason is None:
        try:
            buffer.open_peers([r[_HOST_NAME_BYTES + 9:] for r in records])
        except RuntimeError as error:
            problem = str(error)
        opened = _all_gather_bytes(group, bytes([0 if problem else 1]), device, "ipc buffer (open)")
        failed = [r for r, flag in enumerate(opened) if flag != bytes([1])]
        if not failed:
            return buffer
        reason = IpcUnavailable(f"rank(s) {failed} could not open the ipc buffers"
                                f"{f' ({problem})' if problem else ''}")
        # Some ranks map the others' buffers: every rank closes its mappings before any rank frees.
        buffer.close_peers()
        _all_gather_bytes(group, bytes([1]), device, "ipc buffer (close)")
    if buffer is not None:
        buffer.destroy(0.0)  # 0: no barrier kernel (not every rank has its peers open)
    raise reason


# ipc transports made on each process group so far: the same count on every rank, since every rank
# makes them together (a collective), so it names one Buffer's keys in the group's store.
_transports_made: "weakref.WeakKeyDictionary[dist.ProcessGroup, int]" = weakref.WeakKeyDictionary()


class _RejectionNotes:
    """Where a rank whose input failed a check leaves its message for its peers: the process group's store
    (the notify record that tells them is a fixed-size table of counts, with no room for text). Every
    store operation is bounded (exchange._StoreClient)."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        number = _transports_made.get(group, 0)
        _transports_made[group] = number + 1
        self._prefix = f"eplib/ipc/{number}/rejected/"
        self._store = _StoreClient(group)

    def leave(self, rank: int, message: str) -> None:
        try:
            self._store.call(lambda store: store.set(self._prefix + str(rank), message), timeout_seconds())
        except Exception:  # noqa: BLE001 - the peers still learn that this rank rejected its input
            pass

    def read(self, rank: int) -> str:
        key = self._prefix + str(rank)
        try:
            return self._store.call(lambda store: store.get(key).decode(errors="replace"), timeout_seconds())
        except Exception as error:  # noqa: BLE001
            return f"its message did not reach this rank ({type(error).__name__}: {error})"


class IpcTransport(CudaTransport):
    """Dispatch and combine for CUDA tensors through the ipc buffers of the group's ranks (one node)."""

    name = "ipc"
    recovery = "create a new Buffer (the process group is not used after construction and is fine)"

    def __init__(self, group: dist.ProcessGroup, device: torch.device, num_nvl_bytes: int, context=None) -> None:
        super().__init__(group, device, context)
        self.ipc_buffer: Optional["_C.IpcBuffer"] = open_ipc_buffer(group, device, self.context.device_index,
                                                                    num_nvl_bytes)
        self._notes = _RejectionNotes(group)

    def destroy(self) -> bool:
        """Synchronizes, meets the other ranks at a barrier in peer memory, closes and frees the ipc
        buffers. Returns False when the barrier timed out (the memory is released anyway)."""
        if self.ipc_buffer is None:
            return True
        buffer, self.ipc_buffer = self.ipc_buffer, None
        clean = buffer.destroy(timeout_seconds())
        if not clean:
            _LOG.warning("eplib: rank %d: the ipc Buffer's teardown barrier timed out or the buffer had failed; "
                         "released its memory anyway", self.rank)
        return clean

    # ------------------------------------------------------------------------------------------
    # Plumbing
    # ------------------------------------------------------------------------------------------

    def check_failed(self) -> None:
        """Raises RuntimeError when a device-side wait of an earlier call timed out (then for good) or
        the buffer was destroyed. Reads host-mapped memory: never synchronizes."""
        super()._check_usable()
        if self.ipc_buffer is None:
            raise RuntimeError("eplib: this Buffer was destroyed; create a new one")
        phase, peer_rank = self.ipc_buffer.timeout_report()
        if phase:
            self._out_of_step = (f"rank {self.rank}: {_C.IPC_PHASES.get(phase, phase)} timed out waiting for rank "
                                 f"{peer_rank}, which raised, exited or never reached the same call")
            super()._check_usable()

    def _check_usable(self) -> None:
        """check_failed, then the device waits' limit for this call."""
        self.check_failed()
        self.ipc_buffer.set_timeout(timeout_seconds())

    @contextlib.contextmanager
    def _launching(self) -> Iterator[None]:
        """Around launches of ipc kernels. Checks that fail on every rank alike come before it; a
        failure inside it (out of memory, a failed launch) happens on this rank alone, whose round
        counters then lag its peers': the transport refuses further calls."""
        try:
            yield
        except BaseException as error:
            if self._out_of_step is None:
                self._out_of_step = f"rank {self.rank}: {type(error).__name__} between ipc kernels ({error})"
            raise

    def share_error(self, call: str, error: Exception) -> None:
        """This rank's input failed a check in ``call`` (records.CALLS): when that is a dispatch or a
        get_dispatch_layout, it joins the notify kernel of its peers' normal-mode dispatch with a record
        that says REJECTED (its message goes to the store), so that they raise PeerInputError at their
        host read, and every rank's rounds stay in step. The caller raises ``error`` afterwards.

        Not for calls without a notify (num_worst_tokens and cached dispatch, combine): joining their
        exchange round would need the rows the peers expect; their peers time out (EPLIB_TIMEOUT_S) and
        the Buffer then refuses further calls (README "Failure behaviour")."""
        if call not in ("dispatch", "get_dispatch_layout") or not self._can_share_error(error) \
                or self.ipc_buffer is None:
            return
        self._notes.leave(self.rank, f"{type(error).__name__}: {error}")
        with self._call(None, False):
            flag = torch.full((1,), REJECTED, dtype=torch.int32, device=self.device)
            counts = torch.zeros(self.num_ranks, dtype=torch.int32, device=self.device)  # also one expert a rank
            count_matrix = torch.empty(self.num_ranks, self.num_ranks, dtype=torch.int32, device=self.device)
            with self._launching():
                self.ipc_buffer.notify(flag.data_ptr(), [0] * (_C.IPC_RECORD_FORMAT_FIELDS - 1), counts.data_ptr(),
                                       counts.data_ptr(), self.num_ranks, count_matrix.data_ptr(), True,
                                       self.context.current_stream())
                self.context.hold((flag, counts, count_matrix))
                self.ipc_buffer.wait_notify(timeout_seconds() + _HOST_WAIT_MARGIN_S)

    def _rejection(self, rank: int) -> str:
        return self._notes.read(rank)

    def _exchange_args(self, config: Config, num_channels: int, stride: int, what: str,
                       channel_counts: Optional[Tensor]) -> "_C.IpcExchangeArgs":
        """The channels and rings of one exchange of rows of `stride` bytes; ValueError (alike on every rank:
        they all pass the same) when the buffer cannot hold one chunk per stream."""
        chunk = config.num_max_nvl_chunked_send_tokens
        needed = _C.ipc_buffer_bytes(self.num_ranks, num_channels, stride, chunk)
        if needed > self.ipc_buffer.num_bytes:
            raise ValueError(f"num_nvl_bytes: this {what} needs at least {needed} bytes of ipc buffer ({self.num_ranks} "
                             f"sources x {num_channels} channels x a chunk of {chunk} slots of "
                             f"{_C.ipc_buffer_bytes(1, 1, stride, 1) - _C.ipc_header_bytes()} bytes, after the "
                             f"{_C.ipc_header_bytes()}-byte header), the Buffer has {self.ipc_buffer.num_bytes}; "
                             f"size it with Buffer.get_nvl_buffer_size_hint")
        return _C.IpcExchangeArgs(num_channels=num_channels, ring_rows=max(config.num_max_nvl_chunked_recv_tokens, chunk),
                                  chunk_rows=chunk, channel_counts=ptr(channel_counts))

    def _before_dispatch(self, x: Tensor, x_scales: Optional[Tensor], topk_idx: Optional[Tensor],
                         num_experts: int, config: Config) -> None:
        num_local = num_experts // self.num_ranks
        if num_local > _C.IPC_MAX_LOCAL_EXPERTS:
            raise ValueError(f"num_tokens_per_expert: the ipc transport takes at most {_C.IPC_MAX_LOCAL_EXPERTS} "
                             f"experts per rank, got {num_experts} experts on {self.num_ranks} ranks")
        num_topk = topk_idx.shape[1] if topk_idx is not None else 0
        # Before any kernel: the same on every rank, so every rank raises alike.
        self._exchange_args(config, config.num_channels, _C.dispatch_row_stride(row_bytes(x), row_bytes(x_scales),
                                                                                 num_topk), "dispatch", None)

    def _notify(self, x: Tensor, x_scales: Optional[Tensor], num_tokens_per_expert: Tensor, num_topk: int,
                send_counts: Tensor, host_wait: bool) -> Tensor:
        """Launches the counts exchange (for the host to read with wait_notify when host_wait); returns
        the device counts int32 [R, R], [source, destination]."""
        num_experts = num_tokens_per_expert.shape[0]
        count_matrix = torch.empty(self.num_ranks, self.num_ranks, dtype=torch.int32, device=self.device)
        self.ipc_buffer.notify(self.error_flag.data_ptr(),
                               list(format_values(x, x_scales, num_experts, num_topk).values()),
                               send_counts.data_ptr(), num_tokens_per_expert.data_ptr(), num_experts,
                               count_matrix.data_ptr(), host_wait, self.context.current_stream())
        self.context.hold((self.error_flag, send_counts, num_tokens_per_expert, count_matrix))
        return count_matrix

    def _exchange_dispatch(self, call: CallStreams, config: Config, x: Tensor, x_scales: Optional[Tensor],
                           topk_idx: Optional[Tensor], topk_weights: Optional[Tensor], num_experts: int,
                           send_pos: Tensor, outputs: UnpackOutputs, recv_counts: Tensor, slot_rows: int,
                           rank_prefix_matrix: Optional[Tensor], channels: int) -> Tensor:
        """One dispatch round through the rings (``_C.IpcBuffer.dispatch``). Returns the rows each (source,
        channel) stream brought, int32 [R, C] (the handle keeps them for its combine)."""
        num_topk = outputs.num_topk
        pack = dispatch_pack_args(x, x_scales, topk_idx, topk_weights, num_experts, send_pos, None, self.error_flag,
                                  rank_prefix_matrix=rank_prefix_matrix, slot_rows=slot_rows)
        unpack = outputs.args(None, recv_counts, slot_rows, x, x_scales,
                              num_experts // self.num_ranks if num_topk else 0, self.error_flag)
        channel_counts = call.empty(self.num_ranks, channels, dtype=torch.int32)
        stride = _C.dispatch_row_stride(row_bytes(x), row_bytes(x_scales), num_topk)
        exchange = self._exchange_args(config, channels, stride, "dispatch", channel_counts)
        self.ipc_buffer.dispatch(pack, unpack, exchange, self.context.current_stream())
        self.context.hold((x, x_scales, topk_idx, topk_weights, send_pos, recv_counts, rank_prefix_matrix,
                           channel_counts) + outputs.tensors())
        return channel_counts

    # ------------------------------------------------------------------------------------------
    # Dispatch
    # ------------------------------------------------------------------------------------------

    def _dispatch_normal(self, call: CallStreams, x: Tensor, x_scales: Optional[Tensor], is_token_in_rank: Tensor,
                         num_tokens_per_expert: Tensor, topk_idx: Optional[Tensor], topk_weights: Optional[Tensor],
                         expert_alignment: int, send_pos: Tensor, send_counts: Tensor, config: Config):
        num_topk = topk_idx.shape[1] if topk_idx is not None else 0
        num_experts = num_tokens_per_expert.shape[0]
        with self._launching():
            count_matrix = self._notify(x, x_scales, num_tokens_per_expert, num_topk, send_counts, host_wait=True)
            table = self.ipc_buffer.wait_notify(timeout_seconds() + _HOST_WAIT_MARGIN_S)
        if not table:  # a peer never wrote its record: the device reported where
            self._check_usable()
        # Every rank reads the same records, so these raise on every rank alike (rounds stay in step).
        records = torch.tensor(table, dtype=torch.int64).view(self.num_ranks, -1)
        self._check_records(records)
        counts = NormalCounts.from_records(records, self.rank, expert_alignment)
        with self._launching():
            rank_prefix_matrix, recv_counts = self._device_counts(call, count_matrix)
            outputs = UnpackOutputs(call, counts.num_recv, x, x_scales, num_topk, with_count=False)
            channel_counts = self._exchange_dispatch(call, config, x, x_scales, topk_idx, topk_weights, num_experts,
                                                     send_pos, outputs, recv_counts, 0, rank_prefix_matrix,
                                                     config.num_channels)
        handle = self._normal_handle(counts, rank_prefix_matrix, recv_counts, outputs.recv_src_idx, is_token_in_rank,
                                     send_pos, send_counts, x.shape[1], channel_counts)
        return self._dispatch_result(outputs, counts.num_recv_tokens_per_expert_list, handle)

    def _dispatch_padded(self, call: CallStreams, x: Tensor, x_scales: Optional[Tensor], is_token_in_rank: Tensor,
                         num_tokens_per_expert: Tensor, topk_idx: Optional[Tensor], topk_weights: Optional[Tensor],
                         num_worst_tokens: int, send_pos: Tensor, send_counts: Tensor, config: Config):
        """The fixed-size exchange: the counts exchange runs too (it gives handle[0]), but the host
        never reads it, so nothing synchronizes."""
        num_topk = topk_idx.shape[1] if topk_idx is not None else 0
        num_experts = num_tokens_per_expert.shape[0]
        with self._launching():
            count_matrix = self._notify(x, x_scales, num_tokens_per_expert, num_topk, send_counts, host_wait=False)
            rank_prefix_matrix, recv_counts = self._device_counts(call, count_matrix)
            outputs = UnpackOutputs(call, num_worst_tokens, x, x_scales, num_topk, with_count=True)
            channel_counts = self._exchange_dispatch(call, config, x, x_scales, topk_idx, topk_weights, num_experts,
                                                     send_pos, outputs, recv_counts, num_worst_tokens, None,
                                                     config.num_channels)
        handle = self._padded_handle(rank_prefix_matrix, recv_counts, outputs, is_token_in_rank, send_pos,
                                     send_counts, x.shape[1], num_worst_tokens, channel_counts)
        return self._dispatch_result(outputs, [], handle)

    # ------------------------------------------------------------------------------------------
    # Cached dispatch and combine
    # ------------------------------------------------------------------------------------------

    def cached_dispatch(self, x: Tensor, x_scales: Optional[Tensor], handle: DispatchHandle, *,
                        previous_event: Optional[EventOverlap], async_finish: bool, allocate_on_comm_stream: bool,
                        config: Optional[Config] = None) -> Tuple[Tuple[Tensor, Optional[Tensor]], EventOverlap]:
        """Dispatch x (and FP8 scales) along the layout of an earlier dispatch, through its channels;
        no host sync."""
        # Before any kernel, so a buffer too small raises alike on every rank and leaves the rounds in step.
        self._exchange_args(config, handle.channel_counts.shape[1],
                            _C.dispatch_row_stride(row_bytes(x), row_bytes(x_scales), 0), "dispatch", None)
        with self._call(previous_event, allocate_on_comm_stream) as call:
            outputs = UnpackOutputs(call, handle.num_output_rows, x, x_scales, 0, with_count=False)
            with self._launching():
                self._exchange_dispatch(call, config, x, x_scales, None, None, 0, handle.send_pos, outputs,
                                        handle.device_recv_counts, handle.slot_rows,
                                        handle.rank_prefix_matrix if handle.slot_rows == 0 else None,
                                        handle.channel_counts.shape[1])
            in_flight = (x, x_scales, outputs.recv_x, outputs.recv_x_scales) + handle.tensors()
            return (outputs.recv_x, outputs.recv_x_scales), call.finish(async_finish, in_flight)

    def combine(self, x: Tensor, handle: DispatchHandle, topk_weights: Optional[Tensor], bias_0: Optional[Tensor],
                bias_1: Optional[Tensor], *, previous_event: Optional[EventOverlap], async_finish: bool,
                allocate_on_comm_stream: bool, config: Optional[Config] = None
                ) -> Tuple[Tuple[Tensor, Optional[Tensor]], EventOverlap]:
        """Send expert outputs back through the channels their tokens came by and reduce them per token
        as they arrive; no host sync."""
        with self._call(previous_event, allocate_on_comm_stream) as call:
            num_topk = topk_weights.shape[1] if topk_weights is not None else 0
            stride = _C.combine_row_stride(row_bytes(x), num_topk)
            exchange = self._exchange_args(config, handle.channel_counts.shape[1], stride, "combine",
                                           handle.channel_counts)
            outputs = CombineOutputs(call, handle, x, num_topk)
            with self._launching():
                pack = combine_pack_args(x, topk_weights, handle.device_recv_counts, handle.slot_rows, None)
                in_flight = (x, topk_weights, bias_0, bias_1, outputs.combined_x,
                             outputs.combined_topk_weights) + handle.tensors()
                self.ipc_buffer.combine(pack, outputs.args(None, handle, bias_0, bias_1), exchange,
                                        self.context.current_stream())
                self.context.hold(in_flight)
            return (outputs.combined_x, outputs.combined_topk_weights), call.finish(async_finish, in_flight)


