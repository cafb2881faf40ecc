"""The ipc transport's host logic and round protocol on CPU tensors, for machines without a GPU.

What is emulated, and how (tests/nccl_emulation.py does the same for the nccl transport):

- ``EmulatedPeerBuffer`` stands in for ``eplib._C.PeerBuffer`` (csrc/cuda/peer_buffer.{h,cu}) with the
  same Python interface. A rank's "device allocation" is a file in /dev/shm (or, where that is not
  writable, the temporary directory: ``_shm_dir``), its "IPC handle" the file's name (64 bytes, zero
  padded), and every rank mmaps every rank's file. The header at offset 0 has the layout of
  ``PeerHeader`` (csrc/cuda/peer.h), the receive region starts at
  ``_C.peer_header_bytes()``. The flags follow the protocol of peer.h / peer.cuh as written: round
  numbers kept in the shared header, monotonic flags, notify tables double-buffered by the parity of
  the notify round, ``ready`` published by a send step before it waits and writes, ``done`` after
  all its rows, receivers waiting for ``done >= round_sent``; every wait spins (with short sleeps) for
  at most the limit of ``set_timeout``, then marks the buffer aborted, records (peer, phase) in the
  host status and gives up; later waits give up at once on an aborted buffer. The notify step hands
  its table to the host only when the host waits for it (a ticket per such notify). The host status
  (``PeerHostStatus``) is process-local, as host-mapped memory is.
- ``EmulatedIpcKernels`` extends nccl_emulation.EmulatedKernels: with ``peers=`` the four row kernels
  do the send step (rows packed by the CPU kernels, then written to the destinations' regions at the
  rows that ``_C.peer_dispatch_row_shifts`` / ``_C.peer_combine_row_shifts`` give: the arithmetic of
  eplib/layout.h that the CUDA kernels run) or the receive step (wait, then read the own region).
  Kernels run synchronously when called, so the concurrency is between the rank processes.
  Send steps drop rows outside the destination's region (and dispatch flags ERR_OVERFLOW), as
  ``row_in_region`` makes the CUDA kernels do; a receive step that would read outside its region
  (which the CUDA receive kernels do not check: they rely on the fit checks) raises
  ``EmulatedMemoryError``: that is how the fit checks are tested. After a receive step has read its rows it
  poisons them (0xFF bytes), which the protocol allows (no one reads a region row again before a
  new send round writes it), so a row that a later round reads without anyone having written it
  shows up as NaN / -1 instead of passing with last round's value.
- ``EmulatedIpcTransport`` is the real ``IpcTransport`` with these kernels and no CUDA streams; its
  peer buffer comes from the real ``open_peer_buffer`` (hostname and handle all-gathers over the
  gloo group, the checks, the open) with ``_C.PeerBuffer`` replaced by ``EmulatedPeerBuffer`` for
  the duration. ``emulated_ipc_buffer`` puts it behind an ``eplib.Buffer``.

Not emulated: memory ordering on the GPU (x86 stores and loads are ordered, so a flag read after
rows were written sees them), several blocks per kernel (one block publishes and waits), CUDA
graphs, and kernels that run asynchronously to the host (here the host never gets ahead of its
"device").
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import tempfile
import time
import uuid
import weakref
from typing import Iterator, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from eplib import _C
from eplib.transports.cuda import ERR_OVERFLOW
from eplib.transports.ipc import IpcTransport, open_peer_buffer
from eplib.transports.tensors import row_bytes
from nccl_emulation import EmulatedKernels, _HostCall, init_host_transport

Tensor = torch.Tensor

# ---------------------------------------------------------------------------------------------
# Layout of csrc/cuda/peer.h
# ---------------------------------------------------------------------------------------------

MAX_PEERS = _C.PEER_MAX_RANKS
FORMAT_FIELDS = _C.PEER_RECORD_FORMAT_FIELDS
RECORD_CAPACITY = FORMAT_FIELDS + MAX_PEERS + _C.PEER_MAX_LOCAL_EXPERTS
HEADER_BYTES = _C.peer_header_bytes()
HANDLE_BYTES = 64  # sizeof(cudaIpcMemHandle_t)
ROW_ALIGNMENT = 16  # kRowAlignment

# struct PeerHeader, field by field.
HEADER_DTYPE = np.dtype([
    ("ready", "<u8", (MAX_PEERS,)),
    ("done", "<u8", (MAX_PEERS,)),
    ("notified", "<u8", (MAX_PEERS,)),
    ("barrier", "<u8", (MAX_PEERS,)),
    ("round_sent", "<u8"),
    ("notify_round", "<u8"),
    ("barrier_round", "<u8"),
    ("blocks_finished", "<u4"),
    ("aborted", "<u4"),
    ("records", "<i8", (2, MAX_PEERS, RECORD_CAPACITY)),
])
assert (HEADER_DTYPE.itemsize + 4095) // 4096 * 4096 == HEADER_BYTES, (
    f"PeerHeader of peer.h is {HEADER_BYTES} bytes once aligned, the emulation's {HEADER_DTYPE.itemsize}")

# enum PeerPhase
PHASE_NONE, PHASE_NOTIFY, PHASE_DISPATCH_SEND, PHASE_DISPATCH_RECEIVE = 0, 1, 2, 3
PHASE_COMBINE_SEND, PHASE_COMBINE_RECEIVE, PHASE_BARRIER = 4, 5, 6
assert set(_C.PEER_PHASES) == {1, 2, 3, 4, 5, 6}, _C.PEER_PHASES

POISON = 0xFF


class EmulatedMemoryError(AssertionError):
    """An emulated kernel would have read or written outside a receive region (memory corruption on a GPU)."""


def _shm_dir() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _int32s(address: int, count: int) -> np.ndarray:
    """A numpy view of ``count`` int32 at ``address`` (a CPU tensor's data_ptr)."""
    if count == 0:
        return np.empty(0, dtype=np.int32)
    return np.ctypeslib.as_array((ctypes.c_int32 * count).from_address(address))


def _launch_blocks(items: int, max_blocks: int) -> int:
    """Blocks of a row kernel (warp_launch_shape of csrc/cuda/common.cuh)."""
    per_block = (256 if max_blocks <= 0 else 512) // 32
    blocks = min(max(1, -(-items // per_block)), 8192)
    return blocks if max_blocks <= 0 else min(blocks, max_blocks)


class _HostStatus:
    """PeerHostStatus: host memory that the kernels write and the host reads."""

    def __init__(self) -> None:
        self.notify_ticket = 0  # the ticket of the last notify the host waits for, once `table` holds its table
        self.timeout_phase = PHASE_NONE
        self.timeout_peer = -1
        self.table: List[int] = []


class EmulatedPeerBuffer:
    """``_C.PeerBuffer`` over /dev/shm files (see the module docstring).

    Test hooks (class attributes, per process; tests set and reset them): ``fail_allocation`` makes
    the constructor raise RuntimeError (as a failed cudaMalloc), ``fail_open`` makes open_peers raise
    RuntimeError (as a failed cudaIpcOpenMemHandle), ``stall_in_send_s`` makes every send step sleep
    that long between its ready hand-shake and its first row (a sender that is slow or died mid-way),
    ``stall_in_notify_s`` makes the notify step sleep between its wait and the read of its table (the
    window that the double-buffered tables protect).
    """

    fail_allocation = False
    fail_open = False
    stall_in_send_s = 0.0
    stall_in_notify_s = 0.0
    # Test speed, not protocol: no wait spins longer than this (a broken protocol fails a test in
    # seconds instead of EPLIB_TIMEOUT_S's default 100 s), and a read outside a region (which raises
    # EmulatedMemoryError on the rank that reads) marks every rank's buffer aborted, so that the
    # others stop waiting for it at once.
    max_wait_s = 20.0

    def __init__(self, rank: int, num_ranks: int, num_bytes: int, device: Optional[int] = None) -> None:
        if num_ranks < 1 or num_ranks > MAX_PEERS or rank < 0 or rank >= num_ranks:
            raise ValueError(f"eplib: a peer buffer serves 1 to {MAX_PEERS} ranks, got rank {rank} of {num_ranks}")
        if num_bytes < HEADER_BYTES + ROW_ALIGNMENT:
            raise ValueError(f"eplib: a peer buffer needs at least {HEADER_BYTES + ROW_ALIGNMENT} bytes, "
                             f"got {num_bytes}")
        if EmulatedPeerBuffer.fail_allocation:
            raise RuntimeError("eplib: cudaMalloc (peer buffer) failed: out of memory (emulated)")
        self.rank, self.num_ranks, self._num_bytes = rank, num_ranks, num_bytes
        name = f"eplib-emu-{os.getpid()}-{uuid.uuid4().hex[:16]}"
        self._path = os.path.join(_shm_dir(), name)
        fd = os.open(self._path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, num_bytes)  # zero-filled (the header must be zero before peers see the handle)
            own = mmap.mmap(fd, num_bytes)
        finally:
            os.close(fd)
        self._unlinker = weakref.finalize(self, _unlink, self._path)
        self._handle = name.encode().ljust(HANDLE_BYTES, b"\0")
        self._maps: List[Optional[mmap.mmap]] = [None] * num_ranks
        self._headers: List[Optional[np.ndarray]] = [None] * num_ranks
        self._regions: List[Optional[Tensor]] = [None] * num_ranks
        self._map(rank, own)
        self._status: Optional[_HostStatus] = _HostStatus()
        self._timeout_s = 100.0
        self._record_length = 0
        self._notify_ticket = 0  # of the last notify launched with host_wait
        self._open = False
        self._destroyed = False

    # -- mapping

    def _map(self, rank: int, mapped: mmap.mmap) -> None:
        self._maps[rank] = mapped
        self._headers[rank] = np.frombuffer(mapped, dtype=HEADER_DTYPE, count=1)
        self._regions[rank] = torch.frombuffer(mapped, dtype=torch.uint8, count=self._num_bytes - HEADER_BYTES,
                                               offset=HEADER_BYTES)

    def close_peers(self) -> None:
        """Closes the mappings of the other ranks' buffers only (the buffer is then not open)."""
        for r in range(self.num_ranks):
            if r != self.rank:
                self._release(r)
        self._open = False

    def _release(self, rank: int) -> None:
        mapped = self._maps[rank]
        self._maps[rank] = self._headers[rank] = self._regions[rank] = None
        if mapped is not None:
            with contextlib.suppress(BufferError):  # a view still alive: the mapping goes with it
                mapped.close()

    def unlink(self) -> None:
        """Removes the file's name (the mappings stay): call once every rank has mapped it."""
        self._unlinker()

    # -- the interface of _C.PeerBuffer

    def ipc_handle(self) -> bytes:
        if self._destroyed:
            raise RuntimeError("eplib: the peer buffer was destroyed")
        return self._handle

    def open_peers(self, handles: Sequence[bytes]) -> None:
        if self._destroyed or self._open:
            raise RuntimeError("eplib: open_peers() on a peer buffer that is open or destroyed")
        if len(handles) != self.num_ranks:
            raise ValueError(f"eplib: open_peers() needs one handle per rank ({self.num_ranks}), got {len(handles)}")
        for r, handle in enumerate(handles):
            if r == self.rank:
                continue  # a process cannot open its own handle
            if len(handle) != HANDLE_BYTES:
                self.close_peers()
                raise ValueError(f"eplib: the IPC handle of rank {r} has {len(handle)} bytes, expected {HANDLE_BYTES}")
            path = os.path.join(_shm_dir(), bytes(handle).rstrip(b"\0").decode())
            try:
                if EmulatedPeerBuffer.fail_open:
                    raise OSError("emulated cudaIpcOpenMemHandle failure")
                fd = os.open(path, os.O_RDWR)
                try:
                    if os.fstat(fd).st_size != self._num_bytes:
                        raise OSError(f"size {os.fstat(fd).st_size}, expected {self._num_bytes}")
                    mapped = mmap.mmap(fd, self._num_bytes)
                finally:
                    os.close(fd)
            except OSError as error:
                self.close_peers()
                raise RuntimeError(f"eplib: cannot open the peer buffer of rank {r} (cudaIpcOpenMemHandle: "
                                   f"{error})") from None
            self._map(r, mapped)
        self._open = True

    def destroy(self, timeout_s: float) -> bool:
        if self._destroyed:
            return True
        self._destroyed = True
        clean = True  # cudaDeviceSynchronize: the kernels here have all finished
        if self._open and timeout_s > 0:
            self.set_timeout(timeout_s)
            own = self._headers[self.rank][0]
            barrier_round = int(own["barrier_round"]) + 1
            self._publish_to_all("barrier", barrier_round)
            if self._wait_for_all("barrier", barrier_round, PHASE_BARRIER):
                own["barrier_round"] = barrier_round
            clean = clean and self._status.timeout_phase == PHASE_NONE
        elif self._open:
            clean = False  # no barrier: nothing says the peers are done
        if self._open:
            self.close_peers()
        self._release(self.rank)
        self._unlinker()
        self._status = None
        return clean

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.destroy(0.0)

    @property
    def is_open(self) -> bool:
        return self._open

    @property
    def num_bytes(self) -> int:
        return self._num_bytes

    @property
    def region_bytes(self) -> int:
        return self._num_bytes - HEADER_BYTES

    @property
    def region(self) -> int:
        own = self._regions[self.rank]
        return own.data_ptr() if own is not None else HEADER_BYTES

    def set_timeout(self, seconds: float) -> None:
        if not seconds > 0:
            raise ValueError("eplib: a peer wait timeout must be positive")
        self._timeout_s = float(seconds)

    def timeout_report(self):
        if self._status is None:
            return (PHASE_NONE, -1)
        phase = self._status.timeout_phase
        return (phase, self._status.timeout_peer if phase != PHASE_NONE else -1)

    def notify(self, error_flag: int, fields: Sequence[int], send_counts: int, num_tokens_per_expert: int,
               num_experts: int, count_matrix: int, host_wait: bool, stream: int) -> None:
        self.check_open()
        if len(fields) != FORMAT_FIELDS - 1:
            raise ValueError(f"eplib: notify takes {FORMAT_FIELDS - 1} format fields, got {len(fields)}")
        R = self.num_ranks
        if num_experts <= 0 or num_experts % R != 0 or num_experts // R > _C.PEER_MAX_LOCAL_EXPERTS:
            raise ValueError(f"eplib: the peer transport needs num_experts a positive multiple of the {R} ranks "
                             f"with at most {_C.PEER_MAX_LOCAL_EXPERTS} per rank, got {num_experts}")
        num_local = num_experts // R
        self._record_length = length = FORMAT_FIELDS + R + num_local
        if host_wait:
            self._notify_ticket += 1
        ticket = self._notify_ticket if host_wait else 0
        # ---- the notify kernel
        own = self._headers[self.rank][0]
        notify_round = int(own["notify_round"]) + 1
        parity = notify_round & 1
        head = [int(_int32s(error_flag, 1)[0])] + [int(f) for f in fields] + _int32s(send_counts, R).tolist()
        per_expert = _int32s(num_tokens_per_expert, num_experts).astype(np.int64)
        for r in range(R):
            record = self._headers[r][0]["records"][parity, self.rank]
            record[:FORMAT_FIELDS + R] = head
            record[FORMAT_FIELDS + R:length] = per_expert[r * num_local:(r + 1) * num_local]
        self._publish_to_all("notified", notify_round)
        if not self._wait_for_all("notified", notify_round, PHASE_NOTIFY):
            return
        if EmulatedPeerBuffer.stall_in_notify_s:
            time.sleep(EmulatedPeerBuffer.stall_in_notify_s)
        table = own["records"][parity, :R, :length].copy()
        _int32s(count_matrix, R * R)[:] = table[:, FORMAT_FIELDS:FORMAT_FIELDS + R].reshape(-1)
        own["notify_round"] = notify_round
        if ticket > 0:  # without a ticket the host status is not touched
            self._status.table = table.reshape(-1).tolist()
            self._status.notify_ticket = ticket

    def wait_notify(self, timeout_s: float) -> List[int]:
        status = self._status
        if status.notify_ticket == self._notify_ticket:
            return list(status.table[:self.num_ranks * self._record_length])
        if status.timeout_phase != PHASE_NONE:
            return []
        # The (synchronous) kernel has ended without publishing: nothing will come.
        raise RuntimeError("eplib: the notify kernel ended without a table (the peer buffer had aborted)")

    # -- device side (peer.cuh)

    def counters(self) -> dict:
        """The own header's local counters (tests compare them across ranks)."""
        own = self._headers[self.rank][0]
        return {name: int(own[name]) for name in ("round_sent", "notify_round", "barrier_round", "blocks_finished",
                                                  "aborted")}

    def check_open(self) -> None:
        """PeerBuffer::view(): kernels and notify need an open buffer."""
        if not self._open:
            raise RuntimeError("eplib: the peer buffer is not open (destroyed, or open_peers() not called)")

    def check_launch(self, num_ranks: int, kernel: str) -> None:
        """view() and check_peer_launch of a row kernel's launch."""
        self.check_open()
        if num_ranks != self.num_ranks:
            raise ValueError(f"eplib: {kernel} got {num_ranks} ranks for a peer view of {self.num_ranks}")

    def _publish_to_all(self, field: str, value: int) -> None:
        for r in range(self.num_ranks):
            self._headers[r][0][field][self.rank] = value

    def _wait_for_all(self, field: str, target: int, phase: int) -> bool:
        own = self._headers[self.rank][0]
        flags = own[field]
        if int(own["aborted"]) != 0:  # checked first: after a timeout every later wait gives up at once
            return False
        start = time.monotonic()
        polls = 0
        for r in range(self.num_ranks):
            while int(flags[r]) < target:
                if int(own["aborted"]) != 0:
                    return False
                if time.monotonic() - start > min(self._timeout_s, EmulatedPeerBuffer.max_wait_s):
                    own["aborted"] = 1
                    self._status.timeout_peer = r
                    self._status.timeout_phase = phase  # after the peer: the host reads the phase first
                    return False
                polls += 1
                time.sleep(0 if polls < 50 else min(2e-3, 1e-5 * 2 ** min(polls - 50, 8)))
        return True

    def begin_send_round(self, phase: int) -> int:
        own = self._headers[self.rank][0]
        n = int(own["round_sent"]) + 1
        self._publish_to_all("ready", n)
        if not self._wait_for_all("ready", n, phase):
            return 0
        if EmulatedPeerBuffer.stall_in_send_s:
            time.sleep(EmulatedPeerBuffer.stall_in_send_s)
        return n

    def end_send_round(self, n: int, blocks: int) -> None:
        own = self._headers[self.rank][0]
        for _ in range(blocks):  # each block counts itself; the last one publishes
            finished = int(own["blocks_finished"])
            own["blocks_finished"] = finished + 1
            if finished == blocks - 1:
                own["blocks_finished"] = 0
                own["round_sent"] = n
                self._publish_to_all("done", n)

    def begin_receive_round(self, phase: int) -> bool:
        return self._wait_for_all("done", int(self._headers[self.rank][0]["round_sent"]), phase)

    def region_rows(self, rank: int, stride: int) -> Tensor:
        """Rank ``rank``'s receive region as whole rows of ``stride`` bytes."""
        region = self._regions[rank]
        rows = region.shape[0] // stride
        return region[:rows * stride].view(rows, stride)

    def own_rows_at(self, address: int, stride: int, what: str) -> Tensor:
        """The receive buffer a receive kernel was given: it must be this rank's region."""
        if address != self.region:
            self._fault(f"{what}: the receive kernel got buffer {address:#x}, not this rank's region "
                        f"{self.region:#x}")
        return self.region_rows(self.rank, stride)

    def write_rows(self, rank: int, rows: Tensor, data: Tensor, stride: int) -> bool:
        """region(rank)[rows] = data, rows of stride bytes, except rows outside the region, which the
        send kernels drop (row_in_region of peer.cuh). Returns whether every row was written."""
        target = self.region_rows(rank, stride)
        inside = (rows >= 0) & (rows < target.shape[0])
        target[rows[inside]] = data[inside]
        return bool(inside.all())

    def _fault(self, message: str) -> None:
        for header in self._headers:
            if header is not None:
                header[0]["aborted"] = 1
        raise EmulatedMemoryError(message)

    def check_reads(self, rows: Tensor, stride: int, what: str) -> None:
        capacity = self.region_bytes // stride
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= capacity):
            self._fault(
                f"{what} on rank {self.rank}: reads rows {int(rows.min())}..{int(rows.max())} of {stride} bytes from "
                f"a region of {self.region_bytes} bytes ({capacity} rows): out of bounds")

    def poison_rows(self, rows: Tensor, stride: int) -> None:
        """region(own)[rows] = POISON: rows a receive step has read (see the module docstring)."""
        if rows.numel():
            self.region_rows(self.rank, stride)[rows] = POISON


@contextlib.contextmanager
def emulated_peer_buffers() -> Iterator[None]:
    """``eplib._C.PeerBuffer`` is EmulatedPeerBuffer inside (open_peer_buffer looks it up per call)."""
    saved = getattr(_C, "PeerBuffer", None)
    _C.PeerBuffer = EmulatedPeerBuffer
    try:
        yield
    finally:
        if saved is None:
            del _C.PeerBuffer
        else:
            _C.PeerBuffer = saved


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


def _compact_starts(recv_counts: Tensor, slot_rows: int):
    """load_compact_starts of csrc/cuda/rows.cuh: ([R + 1] starts of the compacted rows, counts clipped
    to the slot, whether a count was clipped)."""
    counts = [max(0, int(c)) for c in recv_counts.tolist()]
    clipped = [min(c, slot_rows) if slot_rows > 0 else c for c in counts]
    starts = [0]
    for c in clipped:
        starts.append(starts[-1] + c)
    return starts, clipped, clipped != counts


def _dispatch_row_shifts(rank_prefix_matrix: Optional[Tensor], rank: int, num_ranks: int, slot_rows: int) -> list:
    shifts = torch.empty(num_ranks, dtype=torch.int64)
    matrix = rank_prefix_matrix.to(torch.int32).contiguous() if rank_prefix_matrix is not None else None
    _C.peer_dispatch_row_shifts(matrix.data_ptr() if matrix is not None else 0, rank, num_ranks, slot_rows,
                                shifts.data_ptr())
    return shifts.tolist()


def _combine_row_shifts(rank_prefix_matrix: Optional[Tensor], rank: int, num_ranks: int, slot_rows: int,
                        starts: Sequence[int]) -> list:
    shifts = torch.empty(num_ranks, dtype=torch.int64)
    compact_start = torch.tensor(list(starts), dtype=torch.int64)
    matrix = rank_prefix_matrix.to(torch.int32).contiguous() if rank_prefix_matrix is not None else None
    _C.peer_combine_row_shifts(matrix.data_ptr() if matrix is not None else 0, rank, num_ranks, slot_rows,
                               compact_start.data_ptr(), shifts.data_ptr())
    return shifts.tolist()


class EmulatedIpcKernels(EmulatedKernels):
    """EmulatedKernels plus the peer transport's keywords of CudaKernels' row kernels (``peers``,
    ``rank_prefix_matrix``, ``slot_rows``, ``max_blocks``): with ``peers`` the send kernels write rows
    into the destinations' regions inside the round hand-shake, the receive kernels wait for the
    round, then read the own region (see the module docstring)."""

    def dispatch_pack(self, x, x_scales, topk_idx, topk_weights, num_experts, send_pos, send_buffer, *, peers=None,
                      rank_prefix_matrix=None, slot_rows=0, max_blocks=0) -> None:
        if peers is None:
            return super().dispatch_pack(x, x_scales, topk_idx, topk_weights, num_experts, send_pos, send_buffer)
        num_tokens, num_ranks = send_pos.shape
        peers.check_launch(num_ranks, "dispatch_pack")
        if slot_rows == 0 and rank_prefix_matrix is None:
            raise ValueError("eplib: dispatch_pack to peers needs rank_prefix_matrix or slot_rows > 0")
        num_topk = topk_idx.shape[1] if topk_idx is not None else 0
        stride = _C.dispatch_row_stride(row_bytes(x), row_bytes(x_scales), num_topk)
        n = peers.begin_send_round(PHASE_DISPATCH_SEND)
        if n == 0:
            return
        shifts = _dispatch_row_shifts(rank_prefix_matrix, peers.rank, num_ranks, slot_rows)
        sent = send_pos >= 0
        if bool(sent.any()):
            staging = torch.zeros((int(send_pos.max()) + 1) * stride, dtype=torch.uint8)
            super().dispatch_pack(x, x_scales, topk_idx, topk_weights, num_experts, send_pos, staging)
            staged = staging.view(-1, stride)
            for r in range(num_ranks):
                positions = send_pos[:, r][sent[:, r]].to(torch.int64)
                if positions.numel() and not peers.write_rows(r, positions + shifts[r], staged[positions], stride):
                    self.error_flag.bitwise_or_(ERR_OVERFLOW)  # ranks disagree on the layout
        else:  # no rows, but the kernel still checks ids and weights
            super().dispatch_pack(x, x_scales, topk_idx, topk_weights, num_experts, send_pos,
                                  torch.zeros(stride, dtype=torch.uint8))
        peers.end_send_round(n, _launch_blocks(num_tokens, max_blocks))

    def dispatch_unpack(self, recv_buffer, recv_counts, slot_rows, x_bytes, scales_bytes, num_topk, num_local_experts,
                        recv_x, recv_x_scales, recv_src_idx, recv_topk_idx, recv_topk_weights, num_recv_out, *,
                        peers=None, max_blocks=0) -> None:
        args = (x_bytes, scales_bytes, num_topk, num_local_experts, recv_x, recv_x_scales, recv_src_idx,
                recv_topk_idx, recv_topk_weights, num_recv_out)
        if peers is None:
            return super().dispatch_unpack(recv_buffer, recv_counts, slot_rows, *args)
        peers.check_launch(recv_counts.shape[0], "dispatch_unpack")
        if not peers.begin_receive_round(PHASE_DISPATCH_RECEIVE):
            return
        stride = _C.dispatch_row_stride(x_bytes, scales_bytes, num_topk)
        region = peers.own_rows_at(recv_buffer, stride, "dispatch receive")
        starts, counts, clipped = _compact_starts(recv_counts, slot_rows)
        if clipped:
            self.error_flag.bitwise_or_(ERR_OVERFLOW)
        first = [s * slot_rows for s in range(len(counts))] if slot_rows > 0 else starts[:-1]
        rows = torch.cat([torch.arange(f, f + c, dtype=torch.int64) for f, c in zip(first, counts)] +
                         [torch.empty(0, dtype=torch.int64)])[:recv_x.shape[0]]
        peers.check_reads(rows, stride, "dispatch receive")
        # (flags ERR_OVERFLOW itself when more rows arrived than recv_x has)
        super().dispatch_unpack(region, torch.tensor(counts, dtype=torch.int32), slot_rows, *args)
        peers.poison_rows(rows, stride)

    def combine_pack(self, x, topk_weights, recv_counts, slot_rows, send_buffer, *, peers=None,
                     rank_prefix_matrix=None, max_blocks=0) -> None:
        if peers is None:
            return super().combine_pack(x, topk_weights, recv_counts, slot_rows, send_buffer)
        num_ranks = recv_counts.shape[0]
        peers.check_launch(num_ranks, "combine_pack")
        if slot_rows == 0 and rank_prefix_matrix is None:
            raise ValueError("eplib: combine_pack to peers needs rank_prefix_matrix or slot_rows > 0")
        num_topk = topk_weights.shape[1] if topk_weights is not None else 0
        stride = _C.combine_row_stride(row_bytes(x), num_topk)
        n = peers.begin_send_round(PHASE_COMBINE_SEND)
        if n == 0:
            return
        starts, _, _ = _compact_starts(recv_counts, slot_rows)
        shifts = _combine_row_shifts(rank_prefix_matrix, peers.rank, num_ranks, slot_rows, starts)
        total = min(starts[-1], x.shape[0])
        if total:
            # The CPU pack kernel puts all of x's rows in order (one "source" holding every row).
            staging = torch.empty(x.shape[0] * stride, dtype=torch.uint8)
            everything = torch.tensor([x.shape[0]] + [0] * (num_ranks - 1), dtype=torch.int32)
            super().combine_pack(x, topk_weights, everything, 0, staging)
            staged = staging.view(-1, stride)
            for s in range(num_ranks):
                begin, end = starts[s], min(starts[s + 1], total)
                if end > begin:
                    rows = torch.arange(begin, end, dtype=torch.int64)
                    peers.write_rows(s, rows + shifts[s], staged[begin:end], stride)  # outside: dropped
        peers.end_send_round(n, _launch_blocks(x.shape[0], max_blocks))

    def combine_reduce(self, recv_buffer, send_pos, bias_0, bias_1, combined_x, combined_topk_weights, *, peers=None,
                       max_blocks=0) -> None:
        if peers is None:
            return super().combine_reduce(recv_buffer, send_pos, bias_0, bias_1, combined_x, combined_topk_weights)
        peers.check_launch(send_pos.shape[1], "combine_reduce")
        if not peers.begin_receive_round(PHASE_COMBINE_RECEIVE):
            return
        num_topk = combined_topk_weights.shape[1] if combined_topk_weights is not None else 0
        stride = _C.combine_row_stride(row_bytes(combined_x), num_topk)
        region = peers.own_rows_at(recv_buffer, stride, "combine receive")
        rows = send_pos[send_pos >= 0].to(torch.int64)
        peers.check_reads(rows, stride, "combine receive")
        super().combine_reduce(region, send_pos, bias_0, bias_1, combined_x, combined_topk_weights)
        peers.poison_rows(rows, stride)


# ---------------------------------------------------------------------------------------------
# Transport and Buffer
# ---------------------------------------------------------------------------------------------


class _NoCudaStream:
    cuda_stream = 0


@contextlib.contextmanager
def _host_streams() -> Iterator[None]:
    """torch.cuda.current_stream() answers a stream handle 0 inside (IpcTransport._notify asks for one;
    a CPU-only torch raises there)."""
    saved = torch.cuda.current_stream
    torch.cuda.current_stream = lambda device=None: _NoCudaStream()
    try:
        yield
    finally:
        torch.cuda.current_stream = saved


class EmulatedIpcTransport(IpcTransport):
    """IpcTransport on CPU tensors: EmulatedIpcKernels, EmulatedPeerBuffer (through the real
    open_peer_buffer), no CUDA streams. Construction is collective, as IpcTransport's."""

    def __init__(self, group: dist.ProcessGroup, num_nvl_bytes: int) -> None:  # noqa: no super().__init__: CUDA stream
        init_host_transport(self, group, EmulatedIpcKernels)
        self.peer = None
        with emulated_peer_buffers():
            self.peer = open_peer_buffer(group, self.device, num_nvl_bytes)
        # open_peer_buffer's last all-gather follows every rank's open_peers: no one needs the names now.
        self.peer.unlink()

    @contextlib.contextmanager
    def _call(self, previous_event, allocate_on_comm_stream) -> Iterator[_HostCall]:
        self._check_usable()  # IpcTransport's: timeouts reported by the peer buffer, set_timeout
        with _host_streams():
            yield _HostCall()


def emulated_ipc_buffer(group: dist.ProcessGroup, num_nvl_bytes: int, **kwargs):
    """An eplib.Buffer whose CPU calls go through EmulatedIpcTransport (Buffer checks included);
    ``Buffer.destroy()`` (explicitly_destroy=True) reaches IpcTransport.destroy (the barrier)."""
    from eplib.buffer import Buffer

    buffer = Buffer(group, num_nvl_bytes=num_nvl_bytes, transport="cpu", **kwargs)
    transport = EmulatedIpcTransport(group, num_nvl_bytes)
    buffer._cpu = transport
    buffer._cuda = transport
    return buffer
