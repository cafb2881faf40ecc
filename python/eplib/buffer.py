"""``eplib.Buffer``: DeepEP V1's ``deep_ep.Buffer`` (normal mode), call for call.

Code written for DeepEP runs on eplib by changing the import. The Buffer checks every argument,
then hands the call to a transport (``eplib.transports``) that moves the rows between ranks.
"""

import contextlib
import logging
from typing import Any, Iterator, List, Optional, Tuple, Union

import torch
import torch.distributed as dist

from . import _C
from ._dtypes import CUDA_KERNEL_DTYPES, KERNEL_DTYPE_CODES
from .config import Config, nvl_buffer_size_hint
from .event import EventHandle, EventOverlap
from .handle import DispatchHandle
from .low_latency import CombineCall, DispatchCall, LowLatencyHandle, check_clean_args, rdma_size_hint
from .transports import CpuTransport, CudaTransport, IpcTransport, IpcUnavailable, NcclTransport
from .transports.low_latency_cpu import CpuLowLatency
from .transports.low_latency_ipc import IpcLowLatency
from .transports.low_latency_nccl import NcclLowLatency
from .validation import (check_allocation, check_bias, check_int, check_int32_product, check_num_experts,
                         check_tensor, check_topk, check_x)

Tensor = torch.Tensor
XType = Union[Tensor, Tuple[Tensor, Tensor]]

TRANSPORTS = ("auto", "cpu", "nccl", "ipc")
Transport = Union[CpuTransport, CudaTransport]

_LOG = logging.getLogger("eplib")
_fallback_logged = False  # transport="auto" says once per process that it fell back to nccl

# DeepEP's recommended configs by group size: (nvl send, nvl recv, rdma send, rdma recv) chunk
# tokens. eplib's cpu transport does not use them; they are returned so that code which reads them runs.
_DISPATCH_CHUNKS = {2: (24, 256, 6, 128), 4: (6, 256, 6, 128), 8: (6, 256, 6, 128), 16: (36, 288, 20, 128),
                    24: (8, 288, 32, 128), 32: (32, 288, 32, 128), 64: (20, 288, 28, 128), 128: (20, 560, 32, 128),
                    144: (32, 720, 12, 128), 160: (28, 720, 12, 128)}
_COMBINE_CHUNKS = {2: (10, 256, 6, 128), 4: (9, 256, 6, 128), 8: (4, 256, 6, 128), 16: (4, 288, 12, 128),
                   24: (1, 288, 8, 128), 32: (1, 288, 8, 128), 64: (1, 288, 20, 128), 128: (1, 560, 12, 128),
                   144: (2, 720, 8, 128), 160: (2, 720, 8, 128)}


class Buffer:
    """Expert-parallel dispatch and combine across the ranks of a process group.

    Constructor keywords are DeepEP's. ``num_nvl_bytes`` sizes the ipc buffer of the ipc
    transport (``get_nvl_buffer_size_hint``); these have no effect and are kept only so that DeepEP
    code runs unchanged: ``num_rdma_bytes`` (no RDMA buffer is allocated), ``low_latency_mode``,
    ``num_qps_per_rank``, ``allow_nvlink_for_low_latency_mode``, ``allow_mnnvl``, ``use_fabric``,
    ``enable_shrink``. ``explicitly_destroy`` works as in DeepEP: ``destroy()`` must then be called
    and is allowed only then (ipc: it meets the other ranks at a barrier before freeing the ipc
    buffer; garbage collection frees it without one). ``comm`` (an mpi4py communicator) is not supported: pass a ``group``
    (as in DeepEP, ``comm`` is ignored when a group is given).

    ``transport`` (eplib only) picks how CUDA tensors travel; CPU tensors always take the cpu
    transport (gloo). ``"ipc"``: through peer GPU memory (CUDA IPC) of the ranks of one node, in a
    buffer of ``num_nvl_bytes`` per rank on the current CUDA device, made at construction (a
    collective: every rank constructs together). ``"nccl"``: over the group's NCCL backend (or,
    slowly, staged through a gloo group's host memory: the multi-process-on-one-GPU test path), on
    the device of the first CUDA call. ``"auto"``: ipc when ``num_nvl_bytes > 0``, CUDA is usable and
    the ipc buffers open (all ranks on one host, at most 8 ranks), else nccl, saying so once in the
    log (logger ``"eplib"``). ``"cpu"``: CPU tensors only. ``transport_name()`` tells which is used.

    Streams (CUDA, as in DeepEP): each call runs on the Buffer's communication stream
    (``get_comm_stream()``) after ``previous_event`` (else after the current stream). With
    ``async_finish`` it returns an ``EventOverlap`` to wait on, otherwise the current stream waits
    for it; ``allocate_on_comm_stream`` allocates the outputs on the communication stream and needs
    ``previous_event`` and ``async_finish``. On CPU the calls finish before returning and the event
    is a completed no-op.

    Errors on one rank are every rank's: a rank whose input fails any check of
    ``get_dispatch_layout``, ``dispatch`` (cached or not) or ``combine`` tells the other ranks,
    through the exchange they wait in or reach next, then raises its ValueError/TypeError; they raise
    ``eplib.PeerInputError`` (a RuntimeError) naming it and quoting its message, and every Buffer stays
    usable. So the other ranks' next collective on the group after a failed ``get_dispatch_layout``
    must be an eplib call (as in layout, then dispatch). On the cpu transport they raise in the same
    call. On CUDA transports they raise in the same call when it is a normal-mode dispatch (its one host
    sync reads the rejection). A call without a host sync (num_worst_tokens or cached dispatch, combine)
    returns invalid outputs on the other ranks (ipc: poisoned, NaN rows and -1 ids), which raise
    PeerInputError at their next normal-mode dispatch, where the failing rank raises RuntimeError naming
    them (every rank abandons that dispatch alike); on ipc ``check_failed()`` raises the PeerInputError as
    soon as the exchange kernel has met the failing rank. ipc exception: a cached dispatch or combine
    whose handle is not a DispatchHandle, or a call whose config is not a Config, is not joined (the
    channels are unknown): its peers time out. A rank that is stuck or gone makes the others raise after ``EPLIB_TIMEOUT_S``
    naming it; README "Failure behaviour" says what each fault does and what to do next
    (``eplib.abort``).

    Device-side errors (CUDA): bad values found by kernels (expert ids out of range, non-finite
    weights, inconsistent layout tensors, more rows than ``num_worst_tokens``) are raised as
    ValueError at the next normal-mode dispatch (``num_worst_tokens == 0``, no handle), whose one
    host sync reads them; calls that never synchronize (``get_dispatch_layout``, ``num_worst_tokens``
    and cached dispatches, ``combine``) report them there.

    Attributes: ``rank``, ``group_size``, ``group``, ``num_nvl_bytes``, ``num_rdma_bytes``,
    ``low_latency_mode``, ``explicitly_destroy`` and the class attribute ``num_sms``.
    """

    num_sms: int = 20

    def __init__(self, group: dist.ProcessGroup, num_nvl_bytes: int = 0, num_rdma_bytes: int = 0,
                 low_latency_mode: bool = False, num_qps_per_rank: int = 24,
                 allow_nvlink_for_low_latency_mode: bool = True, allow_mnnvl: bool = False,
                 explicitly_destroy: bool = False, enable_shrink: bool = False, comm=None, *,
                 use_fabric: bool = False, transport: str = "auto") -> None:
        if group is None:
            raise ValueError("group: expected a torch.distributed ProcessGroup, got None"
                             + ("; mpi4py communicators (comm=) are not supported" if comm is not None else ""))
        if not isinstance(group, dist.ProcessGroup):
            raise TypeError(f"group: expected a torch.distributed ProcessGroup, got {type(group).__name__}")
        if transport not in TRANSPORTS:
            raise ValueError(f"transport: expected one of {TRANSPORTS}, got {transport!r}")
        if transport in ("nccl", "ipc"):
            _check_cuda_usable(f"transport={transport!r}")
        check_int("num_nvl_bytes", num_nvl_bytes, 0, 2**62)
        check_int("num_rdma_bytes", num_rdma_bytes, 0, 2**62)
        self.group = group
        self.rank = group.rank()
        self.group_size = group.size()
        self.num_nvl_bytes = num_nvl_bytes
        self.num_rdma_bytes = num_rdma_bytes
        self.low_latency_mode = low_latency_mode
        self.explicitly_destroy = explicitly_destroy
        self.transport = transport
        backend = str(dist.get_backend(group))
        # CPU tensors need a backend with CPU collectives ("gloo", or e.g. "cpu:gloo,cuda:nccl").
        self._cpu = CpuTransport(group) if ("gloo" in backend or "mpi" in backend) else None
        # ipc: made now; nccl: made by the first CUDA call, on its device.
        self._cuda: Optional[CudaTransport] = self._open_ipc() if transport in ("ipc", "auto") else None
        self._backend = backend
        self._destroyed = False
        self._local_buffers = {}  # get_local_buffer_tensor's memory, made at its first call
        self.enable_shrink = enable_shrink
        self._low_latency: dict = {}  # transport -> its low-latency engine (made by the first LL call)
        self._masked = [False] * self.group_size  # low-latency masks set by the user, for engines made later

    def _open_ipc(self) -> Optional[IpcTransport]:
        """The ipc transport on the current device, or None where "auto" falls back to nccl."""
        global _fallback_logged
        if self.transport == "auto":
            if self.num_nvl_bytes == 0 or not _cuda_usable():
                return None  # no ipc buffer asked for, or no GPU: nothing to fall back from
        elif self.num_nvl_bytes == 0:
            raise ValueError("num_nvl_bytes: transport='ipc' needs an ipc buffer; size it with "
                             "Buffer.get_nvl_buffer_size_hint, got 0")
        device = torch.device("cuda", torch.cuda.current_device())
        try:
            return IpcTransport(self.group, device, self.num_nvl_bytes)
        except IpcUnavailable as error:
            if self.transport == "ipc":
                raise RuntimeError(f"transport='ipc': {error}") from error
            if not _fallback_logged:
                _LOG.warning("eplib: transport='auto' is falling back to nccl for CUDA tensors: %s", error)
                _fallback_logged = True
            return None

    # ----------------------------------------------------------------------------------------
    # Lifetime and compatibility helpers
    # ----------------------------------------------------------------------------------------

    def destroy(self) -> None:
        """Release the buffer's resources; allowed only with ``explicitly_destroy=True``."""
        if not self.explicitly_destroy:
            raise RuntimeError("destroy(): the Buffer was created with explicitly_destroy=False; its resources are "
                               "released when it is garbage-collected")
        self._destroyed = True
        self._cpu = None  # frees the staging bytes
        self._local_buffers = {}
        for engine in self._low_latency.values():
            if isinstance(engine, IpcLowLatency):
                engine.destroy()  # its own ipc memory: a barrier with the other ranks, then freed
        self._low_latency = {}
        if isinstance(self._cuda, IpcTransport):
            self._cuda.destroy()  # a barrier with the other ranks, then the ipc memory is freed
        self._cuda = None  # its communication stream and error flag

    def check_failed(self) -> None:
        """Raises RuntimeError if a device-side wait of an earlier call timed out (the ipc transport:
        its kernels then poison their outputs, NaN rows and -1 ids, instead of leaving last call's), and
        eplib.PeerInputError (ipc) if an exchange kernel since the last normal-mode dispatch met a rank
        whose input failed a check (that call's outputs are poisoned; the Buffer stays usable, and the
        next normal-mode dispatch reports it on every rank). Reads host-mapped memory and never
        synchronizes: the check to make after replaying a CUDA graph that holds eplib calls, since a
        replay runs no eplib host code. A no-op on other transports."""
        self._check_alive()
        if isinstance(self._cuda, IpcTransport):
            self._cuda.check_failed()
        for engine in self._low_latency.values():
            if isinstance(engine, IpcLowLatency):
                engine.check_failed()

    def _check_alive(self) -> None:
        if self._destroyed:
            raise RuntimeError("this Buffer was destroyed; create a new one")

    @staticmethod
    def set_num_sms(new_num_sms: int) -> None:
        """Set the SMs that GPU kernels may use (even, as in DeepEP). No effect on CPU."""
        check_int("new_num_sms", new_num_sms, 2)
        if new_num_sms % 2 != 0:
            raise ValueError(f"new_num_sms: expected an even number, got {new_num_sms}")
        Buffer.num_sms = new_num_sms

    @staticmethod
    def capture() -> EventOverlap:
        """An event on the current CUDA stream, or a completed no-op event without CUDA."""
        return EventOverlap(EventHandle())

    @staticmethod
    def is_sm90_compiled() -> bool:
        """True. DeepEP says whether its build has the SM90 features that its FP8 dispatch needs, and its
        callers test FP8 only then; eplib takes the FP8 tuple on every transport, GPU or not."""
        return True

    def get_local_buffer_tensor(self, dtype: torch.dtype, size: Optional[torch.Size] = None, offset: int = 0,
                                use_rdma_buffer: bool = False) -> Tensor:
        """This rank's ``num_nvl_bytes`` (``use_rdma_buffer``: ``num_rdma_bytes``) of buffer as a 1-D
        tensor of ``dtype`` from byte ``offset`` on, or its first ``size.numel()`` elements viewed as
        ``size``, as DeepEP's. The memory is made at the first call and stays the same for the Buffer's
        life: scratch memory for the caller, which eplib's calls never touch (eplib does not hand out
        the ipc buffer its transport moves rows through, where a write would corrupt a call in flight).
        It is on the device of the Buffer's CUDA calls (the current CUDA device before the first one),
        or on the CPU with ``transport='cpu'`` or without a usable GPU."""
        self._check_alive()
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype: expected a torch.dtype, got {type(dtype).__name__}")
        num_bytes = self.num_rdma_bytes if use_rdma_buffer else self.num_nvl_bytes
        check_int("offset", offset, 0, num_bytes)
        key = "rdma" if use_rdma_buffer else "nvl"
        if key not in self._local_buffers:
            self._local_buffers[key] = torch.empty(num_bytes, dtype=torch.uint8, device=self._local_device())
        element_size = dtype.itemsize
        if offset % element_size != 0:
            raise ValueError(f"offset: expected a multiple of the {element_size}-byte size of {dtype}, got {offset}")
        num_elements = (num_bytes - offset) // element_size
        tensor = self._local_buffers[key][offset:offset + num_elements * element_size].view(dtype)
        if size is None:
            return tensor
        size = torch.Size(size)
        if size.numel() > num_elements:
            raise ValueError(f"size: {list(size)} needs {size.numel()} elements of {dtype}, the buffer has "
                             f"{num_elements} from byte {offset} on")
        return tensor[:size.numel()].view(size)

    def _local_device(self) -> torch.device:
        if self._cuda is not None:
            return self._cuda.device
        if self.transport == "cpu" or not _cuda_usable():
            return torch.device("cpu")
        return torch.device("cuda", torch.cuda.current_device())

    def get_comm_stream(self) -> Optional["torch.cuda.Stream"]:
        """The communication stream of CUDA calls (created on the current device if no CUDA call ran
        yet); None without a usable GPU, where all calls run on CPU and finish before returning."""
        if self._cuda is None:
            if self.transport == "cpu" or not _cuda_usable():
                return None
            return self._cuda_transport(torch.device("cuda", torch.cuda.current_device())).comm_stream
        return self._cuda.comm_stream

    def transport_name(self, device_type: str = "cuda") -> str:
        """The transport that calls on tensors of ``device_type`` ("cuda" or "cpu") use: "ipc",
        "nccl" or "cpu" ("nccl" for CUDA before the first CUDA call when ipc was not chosen)."""
        if device_type == "cpu":
            return "cpu"
        if device_type != "cuda":
            raise ValueError(f"device_type: expected 'cuda' or 'cpu', got {device_type!r}")
        if self.transport == "cpu":
            raise ValueError("device_type: this Buffer was made with transport='cpu', which moves no CUDA tensors")
        return self._cuda.name if self._cuda is not None else "nccl"

    @staticmethod
    def get_nvl_buffer_size_hint(num_max_tokens: int, hidden_bytes: int, num_ranks: int,
                                 num_topk: int = 32) -> int:
        """Bytes of ``num_nvl_bytes`` for the ipc transport's rings with the default configs of
        ``num_ranks`` (``get_dispatch_config``, ``get_combine_config``; the Buffer's ``num_sms``), each
        ring no longer than a channel's share of ``num_max_tokens`` tokens per rank (``hidden_bytes``
        bytes each: H times x's element size; up to ``num_topk`` experts per token, FP8 scales
        included). Calls of any size stream through it; senders wait for ring space only when a
        channel's share of a call exceeds its ring. ``hidden_bytes`` is the widest row the Buffer moves (bf16 combine after FP8
        dispatch: bf16). See ``eplib.config.nvl_buffer_size_hint``."""
        return max(nvl_buffer_size_hint(num_max_tokens, hidden_bytes, num_ranks, num_topk, config)
                   for config in (Buffer.get_dispatch_config(num_ranks), Buffer.get_combine_config(num_ranks)))

    @staticmethod
    def get_dispatch_config(num_ranks: int) -> Config:
        """DeepEP's recommended dispatch config for ``num_ranks``; ``Config``'s defaults for group
        sizes DeepEP has no entry for (where DeepEP asserts)."""
        chunks = _DISPATCH_CHUNKS.get(check_int("num_ranks", num_ranks, 1))
        return Config(Buffer.num_sms, *chunks) if chunks else Config(Buffer.num_sms)

    @staticmethod
    def get_combine_config(num_ranks: int) -> Config:
        """DeepEP's recommended combine config for ``num_ranks``; ``Config``'s defaults otherwise."""
        chunks = _COMBINE_CHUNKS.get(check_int("num_ranks", num_ranks, 1))
        return Config(Buffer.num_sms, *chunks) if chunks else Config(Buffer.num_sms)

    @staticmethod
    def get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int,
                                       num_experts: int, num_topk: int = 32) -> int:
        """Bytes of ``num_rdma_bytes`` that eplib's low-latency calls need per rank (the ipc transport's
        peer memory, the cpu transport's shared memory) for up to ``num_max_dispatch_tokens_per_rank`` tokens
        per rank of hidden size ``hidden`` with up to ``num_topk`` (eplib only; default 32, the most)
        experts per token: flags, then two buffers of ``num_ranks`` message slots, each of
        ``num_max * min(num_topk, E / R)`` bf16 rows (``eplib.low_latency``). eplib's own figure, not
        DeepEP's."""
        return rdma_size_hint(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts, num_topk)

    # ----------------------------------------------------------------------------------------
    # Normal-mode API
    # ----------------------------------------------------------------------------------------

    def _transport_for(self, name: str, x: Tensor) -> Transport:
        """The transport for tensors on x's device (``name`` is x's argument name, for errors)."""
        if x.device.type == "cpu":
            if self.transport in ("nccl", "ipc"):
                raise ValueError(f"{name}: this Buffer was made with transport={self.transport!r}, which moves CUDA "
                                 f"tensors; got a CPU tensor")
            if self._cpu is None:
                raise ValueError(f"{name}: CPU tensors need a process group with a CPU backend such as gloo; this "
                                 f"Buffer's group uses {self._backend!r}")
            return self._cpu
        if x.device.type == "cuda":
            if self.transport == "cpu":
                raise ValueError(f"{name}: this Buffer was made with transport='cpu', which moves CPU tensors; got "
                                 f"a tensor on {x.device}")
            if self._cuda is None:  # an existing transport proved CUDA usable
                _check_cuda_usable(f"{name} on {x.device}")
            return self._cuda_transport(x.device)
        raise ValueError(f"{name}: expected a CPU or CUDA tensor, got a tensor on {x.device}")

    def _cuda_transport(self, device: torch.device) -> CudaTransport:
        if self._cuda is None:
            self._cuda = NcclTransport(self.group, device)
        elif self._cuda.device != device:
            where = "its ipc buffer" if isinstance(self._cuda, IpcTransport) else "its first CUDA call ran"
            raise ValueError(f"x: this Buffer runs its CUDA calls on {self._cuda.device} (where {where}), got a "
                             f"tensor on {device}")
        return self._cuda

    @staticmethod
    def _check_stream_args(transport: Transport, previous_event: Optional[EventOverlap],
                           async_finish: bool, allocate_on_comm_stream: bool) -> None:
        if previous_event is not None and not isinstance(previous_event, EventOverlap):
            raise TypeError(f"previous_event: expected an eplib.EventOverlap or None, got "
                            f"{type(previous_event).__name__}")
        if isinstance(transport, CudaTransport) and allocate_on_comm_stream and not (
                previous_event is not None and async_finish):
            raise ValueError("allocate_on_comm_stream: needs previous_event and async_finish=True (as in DeepEP), "
                             f"got previous_event={'set' if previous_event is not None else None}, "
                             f"async_finish={async_finish}")

    @contextlib.contextmanager
    def _failures_shared(self, call: str, tensor: Any, **call_args: Any) -> Iterator[None]:
        """Around the Buffer's checks of a call: a failure is told to the other ranks (through the
        transport the call would take, when it can: ``share_error``) before it propagates. ``tensor``
        is the call's main argument, which says where the other ranks are; ``call_args`` (config,
        handle, num_worst_tokens, as the caller passed them) say how the peers' call runs."""
        try:
            yield
        except Exception as error:
            share = getattr(self._peer_transport(tensor), "share_error", None)
            if share is not None:
                share(call, error, call_args)
            raise

    def _peer_transport(self, tensor: Any) -> Optional[Transport]:
        """The transport this call takes on ranks whose arguments are right: CUDA calls on a Buffer
        made for CUDA, or on CUDA tensors under "auto"; the cpu transport otherwise."""
        if isinstance(tensor, tuple) and tensor:
            tensor = tensor[0]
        on_cuda = self.transport in ("nccl", "ipc") or (
            self.transport == "auto" and isinstance(tensor, Tensor) and tensor.device.type == "cuda")
        if on_cuda and self._cuda is None and isinstance(tensor, Tensor) and tensor.device.type == "cuda" \
                and _cuda_usable():
            try:  # the peers' first CUDA call makes their nccl transport (no collective): so does this one
                return self._cuda_transport(tensor.device)
            except ValueError:  # a group without a CUDA backend: no peer can be in a CUDA call either
                return None
        return self._cuda if on_cuda else self._cpu

    def _run(self, transport: Transport, method: str, *args: Any, previous_event: Optional[EventOverlap],
             async_finish: bool, allocate_on_comm_stream: bool,
             config: Optional[Config] = None) -> Tuple[Any, EventOverlap]:
        """transport.method(*args) -> (its result, event): CUDA transports follow the stream protocol
        and return the event; CPU calls have finished, so theirs is a completed no-op event. CUDA
        transports get the call's Config (DeepEP's recommended one for the group size when None)."""
        if isinstance(transport, CpuTransport):
            return getattr(transport, method)(*args), EventOverlap()
        return getattr(transport, method)(*args, previous_event=previous_event, async_finish=async_finish,
                                          allocate_on_comm_stream=allocate_on_comm_stream,
                                          config=self._call_config(method, config))

    def _call_config(self, method: str, config: Any) -> Any:
        """The Config a CUDA call runs with: ``config``, or DeepEP's recommended one for the group size."""
        if config is not None:
            return config
        return (self.get_combine_config if method == "combine" else self.get_dispatch_config)(self.group_size)

    def get_dispatch_layout(self, topk_idx: Tensor, num_experts: int, previous_event: Optional[EventOverlap] = None,
                            async_finish: bool = False, allocate_on_comm_stream: bool = False
                            ) -> Tuple[Tensor, Optional[Tensor], Tensor, Tensor, EventOverlap]:
        """Count where each token goes.

        Args:
            topk_idx: int64 ``[T, K]``, expert ids in ``[-1, E)``; -1 is a masked slot.
            num_experts: E, a multiple of the group size.

        Returns:
            ``num_tokens_per_rank`` int32 ``[R]`` (a token counts once per rank), ``None`` (DeepEP's
            RDMA counts; eplib has no RDMA rank level), ``num_tokens_per_expert`` int32 ``[E]``
            (counts (token, slot) pairs: an id repeated in one token's row counts twice),
            ``is_token_in_rank`` bool ``[T, R]``, and an ``EventOverlap``. An id out of range raises
            ValueError here on CPU; on CUDA the device flags it and the next normal-mode dispatch raises.
        """
        self._check_alive()
        with self._failures_shared("get_dispatch_layout", topk_idx):
            check_num_experts(num_experts, self.group_size)
            topk_idx = check_tensor("topk_idx", topk_idx, [torch.int64], [None, None])
            check_int32_product("topk_idx", "T * K", *topk_idx.shape)
            check_int32_product("topk_idx", "T * R", topk_idx.shape[0], self.group_size)
            transport = self._transport_for("topk_idx", topk_idx)
            self._check_stream_args(transport, previous_event, async_finish, allocate_on_comm_stream)
            check_allocation("num_experts", "the layout outputs", 4 * (num_experts + self.group_size)
                             + topk_idx.shape[0] * self.group_size, topk_idx.device)
        (num_tokens_per_rank, num_tokens_per_expert, is_token_in_rank), event = self._run(
            transport, "get_dispatch_layout", topk_idx, num_experts, previous_event=previous_event,
            async_finish=async_finish, allocate_on_comm_stream=allocate_on_comm_stream)
        return num_tokens_per_rank, None, num_tokens_per_expert, is_token_in_rank, event

    def dispatch(self, x: XType, handle: Optional[DispatchHandle] = None,
                 num_tokens_per_rank: Optional[Tensor] = None, num_tokens_per_rdma_rank: Optional[Tensor] = None,
                 is_token_in_rank: Optional[Tensor] = None, num_tokens_per_expert: Optional[Tensor] = None,
                 topk_idx: Optional[Tensor] = None, topk_weights: Optional[Tensor] = None,
                 expert_alignment: int = 1, num_worst_tokens: int = 0, config: Optional[Config] = None,
                 previous_event: Optional[EventOverlap] = None, async_finish: bool = False,
                 allocate_on_comm_stream: bool = False
                 ) -> Tuple[XType, Optional[Tensor], Optional[Tensor], Optional[List[int]], Optional[DispatchHandle],
                            EventOverlap]:
        """Send each token to every rank that owns one of its experts, once per rank.

        Args:
            x: ``[T, H]`` contiguous bf16/fp16/fp32, or the FP8 tuple (contiguous float8_e4m3fn ``[T, H]``,
                float32 or int32 (UE8M0) scales ``[T, S]`` of any strides, e.g. column-major, which are read
                through their strides). A non-contiguous x raises ValueError (no silent copy).
            handle: the handle of an earlier dispatch: cached mode, only x travels, along the same layout.
            num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert: from ``get_dispatch_layout``;
                required without a handle, and checked against each other and topk_idx (ValueError
                on a mismatch). ``num_tokens_per_rdma_rank`` is accepted and ignored.
            topk_idx: int64 ``[T, K]`` and topk_weights: float32 ``[T, K]``, both or neither.
            expert_alignment: each per-expert count is rounded up to a multiple of this.
            num_worst_tokens: if > 0, outputs have exactly this many rows (ValueError on the
                rank that receives more: at once on CPU; on CUDA, where this mode never synchronizes,
                at the next normal-mode dispatch); padding rows are zero with ``recv_topk_idx == -1``.
                All ranks must pass the same value. The mode to capture in a CUDA graph: a normal-mode
                dispatch during a capture raises ValueError (its host read of the counts cannot be captured).
            config: DeepEP's (default: ``get_dispatch_config``); the ipc transport streams rows through
                ``num_sms / 2`` channels, rings of ``num_max_nvl_chunked_recv_tokens`` slots per
                (source, channel) and chunks of ``num_max_nvl_chunked_send_tokens`` rows. Every rank
                must pass the same.
            previous_event, async_finish, allocate_on_comm_stream: DeepEP's stream protocol (see the class
                docstring); no effect on CPU.

        Returns:
            ``recv_x`` ``[N, H]`` (a tuple for FP8), rows ordered by source rank then source token;
            ``recv_topk_idx`` int64 ``[N, K]`` with receiver-local expert ids, -1 elsewhere;
            ``recv_topk_weights`` float32 ``[N, K]``, 0 where the id is -1;
            ``num_recv_tokens_per_expert_list`` (``E/R`` ints; ``[]`` with num_worst_tokens);
            ``handle``; an ``EventOverlap``. In cached mode only ``recv_x`` and the event are set.
        """
        self._check_alive()
        with self._failures_shared("dispatch" if handle is None else "cached dispatch", x,
                                   config=self._call_config("dispatch", config), handle=handle,
                                   num_worst_tokens=num_worst_tokens):
            values, scales, topk_idx, topk_weights, transport = self._check_dispatch(
                x, handle, num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert, topk_idx, topk_weights,
                expert_alignment, num_worst_tokens, config, previous_event, async_finish, allocate_on_comm_stream)
        streams = dict(previous_event=previous_event, async_finish=async_finish,
                       allocate_on_comm_stream=allocate_on_comm_stream, config=config)
        if handle is not None:
            (recv_x, recv_scales), event = self._run(transport, "cached_dispatch", values, scales, handle, **streams)
            return (recv_x, recv_scales) if scales is not None else recv_x, None, None, None, None, event

        (recv_x, recv_scales, recv_topk_idx, recv_topk_weights, per_expert, new_handle), event = self._run(
            transport, "dispatch", values, scales, num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert,
            topk_idx, topk_weights, expert_alignment, num_worst_tokens, **streams)
        recv = (recv_x, recv_scales) if scales is not None else recv_x
        return recv, recv_topk_idx, recv_topk_weights, per_expert, new_handle, event

    def combine(self, x: Tensor, handle: DispatchHandle, topk_weights: Optional[Tensor] = None,
                bias: Union[Tensor, Tuple[Tensor, Tensor], None] = None, config: Optional[Config] = None,
                previous_event: Optional[EventOverlap] = None, async_finish: bool = False,
                allocate_on_comm_stream: bool = False) -> Tuple[Tensor, Optional[Tensor], EventOverlap]:
        """Send expert outputs back to their tokens and sum them.

        Args:
            x: ``[N, H]`` bf16/fp16/fp32, one row per row of the dispatch output (padding included).
            handle: the handle that dispatch returned.
            topk_weights: optional float32 ``[N, K]`` sent back and summed per token.
            bias: None, one ``[T, H]`` tensor or a tuple of two, in x's dtype, added to the result.

        Returns:
            ``combined_x`` ``[T, H]``: per token, bias then the rows of its destination ranks in
            ascending rank order, summed in fp32 and cast to x's dtype (weighting by the gate is
            the caller's job, as in DeepEP); ``combined_topk_weights`` float32 ``[T, K]`` or None;
            an ``EventOverlap``.
        """
        self._check_alive()
        with self._failures_shared("combine", x, config=self._call_config("combine", config), handle=handle):
            values, _ = check_x(x, list(KERNEL_DTYPE_CODES), allow_fp8=False)
            transport = self._transport_for("x", values)
            self._check_x_dtype(values, transport)
            self._check_stream_args(transport, previous_event, async_finish, allocate_on_comm_stream)
            if config is not None and not isinstance(config, Config):
                raise TypeError(f"config: expected an eplib.Config or None, got {type(config).__name__}")
            self._check_handle(handle, values, combine=True)
            if values.shape[0] != handle.num_output_rows:
                raise ValueError(f"x: expected {handle.num_output_rows} rows (the dispatch output of this handle), "
                                 f"got {values.shape[0]}")
            if topk_weights is not None:
                check_tensor("topk_weights", topk_weights, [torch.float32], [values.shape[0], None], values.device)
            bias_0, bias_1 = check_bias(bias, handle.num_tokens, values.shape[1], values.dtype, values.device)
        (combined_x, combined_topk_weights), event = self._run(
            transport, "combine", values, handle, topk_weights, bias_0, bias_1, previous_event=previous_event,
            async_finish=async_finish, allocate_on_comm_stream=allocate_on_comm_stream, config=config)
        return combined_x, combined_topk_weights, event

    def _check_dispatch(self, x: XType, handle: Optional[DispatchHandle], num_tokens_per_rank: Optional[Tensor],
                        is_token_in_rank: Optional[Tensor], num_tokens_per_expert: Optional[Tensor],
                        topk_idx: Optional[Tensor], topk_weights: Optional[Tensor], expert_alignment: int,
                        num_worst_tokens: int, config: Optional[Config], previous_event: Optional[EventOverlap],
                        async_finish: bool, allocate_on_comm_stream: bool):
        """The argument checks of ``dispatch``, before anything runs -> (x values, FP8 scales or None,
        topk_idx, topk_weights, the transport)."""
        values, scales = check_x(x, list(KERNEL_DTYPE_CODES), allow_fp8=True)
        transport = self._transport_for("x", values)
        if scales is None:
            self._check_x_dtype(values, transport)
        self._check_stream_args(transport, previous_event, async_finish, allocate_on_comm_stream)
        num_tokens = values.shape[0]
        check_int32_product("x", "T * R", num_tokens, self.group_size)
        check_int("expert_alignment", expert_alignment, 1)
        check_int("num_worst_tokens", num_worst_tokens, 0)
        if config is not None and not isinstance(config, Config):
            raise TypeError(f"config: expected an eplib.Config or None, got {type(config).__name__}")

        if handle is not None:
            given = [name for name, value in (("num_tokens_per_rank", num_tokens_per_rank),
                                              ("is_token_in_rank", is_token_in_rank),
                                              ("num_tokens_per_expert", num_tokens_per_expert),
                                              ("topk_idx", topk_idx), ("topk_weights", topk_weights))
                     if value is not None]
            if given:
                raise ValueError(f"{given[0]}: a cached dispatch (handle given) takes x only, got {', '.join(given)}")
            self._check_handle(handle, values)
            return values, scales, None, None, transport

        for name, value in (("num_tokens_per_rank", num_tokens_per_rank), ("is_token_in_rank", is_token_in_rank),
                            ("num_tokens_per_expert", num_tokens_per_expert)):
            if value is None:
                raise ValueError(f"{name}: required when no handle is given (compute it with get_dispatch_layout)")
        if num_worst_tokens == 0 and values.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise ValueError("num_worst_tokens: a normal-mode dispatch (num_worst_tokens=0) reads the receive counts "
                             "on the host, which a CUDA graph capture cannot do; pass num_worst_tokens > 0")
        device = values.device
        check_tensor("num_tokens_per_rank", num_tokens_per_rank, [torch.int32], [self.group_size], device)
        check_tensor("is_token_in_rank", is_token_in_rank, [torch.bool], [num_tokens, self.group_size], device)
        check_tensor("num_tokens_per_expert", num_tokens_per_expert, [torch.int32], [None], device)
        num_experts = check_num_experts(num_tokens_per_expert.shape[0], self.group_size)
        topk_idx, topk_weights = check_topk(topk_idx, topk_weights, num_tokens, device, require_weights=True)
        if num_worst_tokens > 0:
            num_topk = topk_idx.shape[1] if topk_idx is not None else 0
            # Per output row: x, FP8 scales, the int32 source index, int64 ids and float32 weights.
            out_row_bytes = (values.shape[1] * values.element_size() + (scales.shape[1] * 4 if scales is not None
                                                                         else 0) + 4 + 12 * num_topk)
            check_allocation("num_worst_tokens", f"{num_worst_tokens} output rows of {out_row_bytes} bytes",
                             num_worst_tokens * out_row_bytes, device)
        elif topk_idx is None:
            check_allocation("num_tokens_per_expert", f"the per-expert counts of {self.group_size} ranks",
                             8 * self.group_size * num_experts, device)
        return values, scales, topk_idx, topk_weights, transport

    @staticmethod
    def _check_x_dtype(x: Tensor, transport: Transport) -> None:
        """The CUDA kernels move bf16 and fp32 (and FP8 tuples); the CPU ones fp16 and fp64 too."""
        allowed = CUDA_KERNEL_DTYPES if isinstance(transport, CudaTransport) else tuple(KERNEL_DTYPE_CODES)
        if x.dtype not in allowed:
            raise TypeError(f"x: expected {' or '.join(str(d) for d in allowed)} on {x.device}, got {x.dtype}")

    def _check_handle(self, handle: DispatchHandle, x: Tensor, combine: bool = False) -> None:
        """The handle is eplib's, made for this group, for x's hidden size, and (for a cached
        dispatch) for as many tokens as x has."""
        if not isinstance(handle, DispatchHandle):
            raise TypeError(f"handle: expected the DispatchHandle returned by eplib's Buffer.dispatch, got "
                            f"{type(handle).__name__}")
        if tuple(handle.rank_prefix_matrix.shape) != (self.group_size, self.group_size):
            raise ValueError(f"handle: made for a group of {handle.rank_prefix_matrix.shape[0]} ranks, this Buffer's "
                             f"group has {self.group_size}")
        if tuple(handle.send_pos.shape) != (handle.num_tokens, self.group_size) or handle.send_pos.dtype != torch.int32:
            raise ValueError(f"handle: send_pos must be int32 [T, R] = [{handle.num_tokens}, {self.group_size}], got "
                             f"{handle.send_pos.dtype} {list(handle.send_pos.shape)}")
        if not combine and handle.num_tokens != x.shape[0]:
            raise ValueError(f"handle: made for {handle.num_tokens} tokens, but x has {x.shape[0]}")
        if handle.hidden != x.shape[1]:
            raise ValueError(f"x: the handle was made for hidden size {handle.hidden}, x has {x.shape[1]}")
        if handle.send_pos.device != x.device:
            raise ValueError(f"handle: its tensors are on {handle.send_pos.device}, x is on {x.device}")

    # ----------------------------------------------------------------------------------------
    # Low-latency mode (eplib.low_latency: rows, order, buffers, masks)
    # ----------------------------------------------------------------------------------------

    def _low_latency_engine(self, name: str, tensor: Tensor):
        """The low-latency engine of the transport for tensors on ``tensor``'s device (made at first use)."""
        self._check_alive()
        if not isinstance(tensor, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(tensor).__name__}")
        transport = self._transport_for(name, tensor)
        engine = self._low_latency.get(transport)
        if engine is None:
            if isinstance(transport, CpuTransport):
                engine = CpuLowLatency(self.group, self.enable_shrink, self.num_rdma_bytes, self._masked)
            else:
                engine_type = IpcLowLatency if isinstance(transport, IpcTransport) else NcclLowLatency
                engine = engine_type(transport, self.enable_shrink, self.num_rdma_bytes, self._masked)
            self._low_latency[transport] = engine
        return engine

    def low_latency_dispatch(self, x: Tensor, topk_idx: Tensor, num_max_dispatch_tokens_per_rank: int,
                             num_experts: int, cumulative_local_expert_recv_stats: Optional[Tensor] = None,
                             dispatch_wait_recv_cost_stats: Optional[Tensor] = None, use_fp8: bool = True,
                             round_scale: bool = False, use_ue8m0: bool = False, async_finish: bool = False,
                             return_recv_hook: bool = False):
        """Send each token to each of its top-k experts (once per distinct expert), into fixed-shape outputs.

        Args:
            x: bf16 ``[T, H]``, T <= num_max_dispatch_tokens_per_rank; any H (a multiple of 128 with use_fp8).
            topk_idx: int64 ``[T, K]``, 1 <= K <= 32, ids in ``[-1, E)``.
            num_max_dispatch_tokens_per_rank: M, the same on every rank (sizes the outputs and messages).
            num_experts: E, the same on every rank, a multiple of the group size R.
            cumulative_local_expert_recv_stats: int32 ``[E/R]`` or None; the received rows are added to it.
            dispatch_wait_recv_cost_stats: int64 ``[R]`` or None; the nanoseconds this rank waited for each
                source are added (cpu and ipc transports; the nccl transport leaves it as it is).
            use_fp8: cast to float8_e4m3fn with a float32 scale per 128 channels (DeepEP's default).
            round_scale: power-of-two scales. use_ue8m0: scales as UE8M0 bytes (needs round_scale).
            async_finish: return an event to wait on (CUDA) instead of making the current stream wait.
            return_recv_hook: only send; ``hook()`` receives (at most two calls may await their hooks).

        Returns:
            ``recv_x``: bf16 ``[E/R, R*M, H]``, or with use_fp8 (float8_e4m3fn ``[E/R, R*M, H]``, scales:
            float32 ``[E/R, R*M, H/128]`` or, use_ue8m0, int32 ``[E/R, R*M, ceil(H/512)]``, column-major in the
            last two dims); ``recv_count`` int32 ``[E/R]`` (rows past it are unspecified); the handle
            (``eplib.low_latency.LowLatencyHandle``, DeepEP's five entries); an ``EventOverlap``; the hook or
            None. Rows of expert le: by source rank, then source token; ``handle[1][le, s] = begin << 32 | count``.
        """
        engine = self._low_latency_engine("x", x)
        try:
            call = DispatchCall(x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts, self.group_size,
                                cumulative_local_expert_recv_stats, dispatch_wait_recv_cost_stats, use_fp8,
                                round_scale, use_ue8m0)
        except (ValueError, TypeError) as error:
            engine.reject("low_latency_dispatch", error)
        return engine.dispatch(call, async_finish=async_finish, return_recv_hook=return_recv_hook)

    def low_latency_combine(self, x: Tensor, topk_idx: Tensor, topk_weights: Tensor, handle: LowLatencyHandle,
                            use_logfmt: bool = False, zero_copy: bool = False, async_finish: bool = False,
                            return_recv_hook: bool = False, out: Optional[Tensor] = None,
                            combine_wait_recv_cost_stats: Optional[Tensor] = None):
        """Send the expert outputs back and reduce them per token with the gate weights.

        Args:
            x: bf16 ``[E/R, R*M, H]``, row for row as low_latency_dispatch's recv_x (ignored with zero_copy).
            topk_idx, topk_weights: int64 and float32 ``[T, K]``, this rank's routing of the dispatch.
            handle: the dispatch's. use_logfmt: must be False (LogFMT is not implemented).
            zero_copy: the rows are in the tensor that get_next_low_latency_combine_buffer(handle) returned.
            out: bf16 ``[T, H]`` to write into, or None. combine_wait_recv_cost_stats: int64 ``[R]`` or None.

        Returns:
            ``combined_x`` bf16 ``[T, H]``: per token, sum over slots k ascending (expert not -1, its rank not
            masked) of ``topk_weights[t, k] * row``, in fp32 from 0, cast once; an ``EventOverlap``; the hook
            or None.
        """
        engine = self._low_latency_engine("x", x)
        try:
            call = CombineCall(x, topk_idx, topk_weights, handle, self.group_size, use_logfmt, zero_copy, out,
                               combine_wait_recv_cost_stats)
        except (ValueError, TypeError) as error:
            engine.reject("low_latency_combine", error)
        return engine.combine(call, async_finish=async_finish, return_recv_hook=return_recv_hook)

    def get_next_low_latency_combine_buffer(self, handle: LowLatencyHandle) -> Tensor:
        """bf16 ``[E/R, R*M, H]`` to fill with the expert outputs of the next low_latency_combine, which then
        reads them from there with ``zero_copy=True`` (it belongs to the buffer of the next LL call)."""
        if not isinstance(handle, LowLatencyHandle):
            raise TypeError(f"handle: expected the handle of this Buffer's low_latency_dispatch, got "
                            f"{type(handle).__name__}")
        return self._low_latency_engine("handle", handle.src_info).next_combine_buffer(handle)

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> None:
        """DeepEP's buffer cleaning. eplib's low-latency memory is its own (normal-mode calls never touch it)
        and its flags carry round numbers, so there is nothing to zero: this checks the arguments and that no
        low-latency call awaits its receive hook. Call it between normal and LL calls as with DeepEP."""
        check_clean_args(num_max_dispatch_tokens_per_rank, hidden, num_experts, self.group_size)
        self._check_alive()
        for engine in self._low_latency.values():
            engine.clean()

    def _check_shrink(self, what: str) -> None:
        self._check_alive()
        if not self.enable_shrink:
            raise RuntimeError(f"{what}: needs a Buffer made with enable_shrink=True (as in DeepEP)")

    def low_latency_update_mask_buffer(self, rank_to_mask: int, mask: bool = False) -> None:
        """Mask (mask=True) or unmask a rank for the low-latency calls: nothing is sent to it or received from
        it. Needs enable_shrink=True; a rank cannot mask itself."""
        self._check_shrink("low_latency_update_mask_buffer")
        check_int("rank_to_mask", rank_to_mask, 0, self.group_size - 1)
        if rank_to_mask == self.rank:
            raise ValueError(f"rank_to_mask: a rank cannot mask itself (this is rank {self.rank})")
        self._masked[rank_to_mask] = bool(mask)
        for engine in self._low_latency.values():
            engine.set_masked(rank_to_mask, bool(mask))

    def low_latency_query_mask_buffer(self, mask_status: Tensor) -> None:
        """Writes each rank's mask into mask_status (int32 ``[R]``: 1 masked, 0 not), ranks masked by a timeout
        included."""
        self._check_shrink("low_latency_query_mask_buffer")
        check_tensor("mask_status", mask_status, [torch.int32], [self.group_size])
        self._low_latency_engine("mask_status", mask_status).query_mask(mask_status)

    def low_latency_clean_mask_buffer(self) -> None:
        """Unmasks every rank."""
        self._check_shrink("low_latency_clean_mask_buffer")
        self._masked = [False] * self.group_size
        for engine in self._low_latency.values():
            engine.clear_mask()


def _cuda_usable() -> bool:
    """Whether eplib's CUDA kernels can run here."""
    return _C.built_with_cuda() and torch.cuda.is_available() and _C.cuda_available()


def _check_cuda_usable(what: str) -> None:
    """Raises ValueError unless eplib's CUDA kernels can run here."""
    if not _C.built_with_cuda() or _C.cuda_cpu_execution():
        raise ValueError(f"{what}: this eplib was built without CUDA kernels for a GPU (rebuild with EPLIB_CUDA=1 "
                         f"where nvcc is installed)")
    if not _cuda_usable():
        raise ValueError(f"{what}: no usable CUDA device (torch.cuda.is_available()={torch.cuda.is_available()}; "
                         f"eplib's CUDA runtime: {describe_cuda_status()})")


def describe_cuda_status() -> str:
    """What eplib's own (static) CUDA runtime sees, in words: devices, or the error of the query, and
    the driver and runtime versions (a driver older than the runtime is the usual error)."""
    status = _C.cuda_device_status()
    seen = f"error {status['error']}" if status["error"] else f"{status['device_count']} device(s)"
    return f"{seen}, driver version {status['driver_version']}, runtime version {status['runtime_version']}"
