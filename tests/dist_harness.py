"""Multi-rank test harness: a pool of long-lived rank processes joined in a gloo group.

Spawning processes per test costs seconds (importing torch alone takes ~2 s), so `RankPool`
starts `world_size` processes once; each joins a gloo group over tcp://127.0.0.1 and then runs
jobs `fn(rank, world_size, group, *args)` sent to it. `fn` must be a module-level function (it
is pickled by reference); tests/ is on sys.path in the workers because spawn hands the parent's
sys.path to its children.

Arguments and results cross the process boundary as plain pickles (tensors are copied), not via
torch's shared-memory reductions, so no file descriptors leak between jobs.

The second half of this file holds case builders shared by the EP tests: deterministic inputs
per (seed, rank) that every rank can regenerate for every other rank, and closed-form
expectations computed sequentially from all ranks' inputs.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import pickle
import queue
import socket
import time
import traceback
from datetime import timedelta
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import torch
import torch.multiprocessing as mp

# ---------------------------------------------------------------------------------------------
# Pool
# ---------------------------------------------------------------------------------------------

#: Collectives give up after this long (a stuck peer turns into an error instead of a hang).
GLOO_TIMEOUT_S = 30
#: Waiting for all ranks to import torch and join the group.
STARTUP_TIMEOUT_S = 60
#: What a forkserver-started pool's server imports once, so that its ranks start in a fraction of a second.
FORKSERVER_PRELOAD = ["torch", "torch.distributed", "eplib", "dist_harness"]


class RemoteError(Exception):
    """An exception raised by a job on one rank, carried back as data.

    Attributes: rank, exc_type_name, exc_mro_names (names of the exception's classes, so tests can
    check `isinstance`-like relations without unpickling it), message, remote_traceback.
    """

    def __init__(self, rank: int, exc_type_name: str, exc_mro_names: Sequence[str], message: str,
                 remote_traceback: str) -> None:
        super().__init__(f"rank {rank} raised {exc_type_name}: {message}\n"
                         f"--- remote traceback (rank {rank}) ---\n{remote_traceback}")
        self.rank = rank
        self.exc_type_name = exc_type_name
        self.exc_mro_names = tuple(exc_mro_names)
        self.message = message
        self.remote_traceback = remote_traceback

    def is_a(self, *exc_types: type) -> bool:
        """True if the remote exception is an instance of one of exc_types (compared by name)."""
        return any(t.__name__ in self.exc_mro_names for t in exc_types)


class PoolTimeout(Exception):
    """A job did not finish in time; the pool was killed (it restarts on the next run)."""


def _free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_main(rank: int, world_size: int, init_method: str, gloo_timeout_s: float, job_queue: Any,
                 result_queue: Any) -> None:
    """Body of one rank: join the group, then run jobs until a None arrives."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=gloo_timeout_s))
    except BaseException as e:  # report instead of leaving the parent waiting for "ready"
        result_queue.put(("startup-failed", rank, f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
        return
    group = dist.group.WORLD
    result_queue.put(("ready", rank, None))
    while True:
        msg = job_queue.get()
        if msg is None:
            break
        job_id, payload = msg
        try:
            fn, args = pickle.loads(payload)
            result = fn(rank, world_size, group, *args)
            out = ("ok", pickle.dumps(result))
        except BaseException as e:  # noqa: BLE001 - everything goes back to the test process
            out = ("err", ([c.__name__ for c in type(e).__mro__], type(e).__name__, str(e),
                           traceback.format_exc()))
        result_queue.put((job_id, rank, out))
    with contextlib.suppress(Exception):
        dist.destroy_process_group()


def _context(start_method: str) -> Any:
    """A multiprocessing context; "forkserver" preloads FORKSERVER_PRELOAD in its server."""
    ctx = mp.get_context(start_method)
    if start_method == "forkserver":
        ctx.set_forkserver_preload(FORKSERVER_PRELOAD)
    return ctx


class RankPool:
    """`world_size` processes in one gloo group, running jobs on all ranks at once.

    start_method "spawn" (default) or "forkserver" (a fresh pool in a fraction of a second, for tests
    that need a group of their own); gloo_timeout_s: the group's own timeout (init_process_group).
    """

    def __init__(self, world_size: int, start_method: str = "spawn", gloo_timeout_s: float = GLOO_TIMEOUT_S) -> None:
        self.world_size = world_size
        self._ctx = _context(start_method)
        self._gloo_timeout_s = gloo_timeout_s
        self._procs: List[Any] = []
        self._job_queues: List[Any] = []
        self._result_queue: Any = None
        self._mailbox: Dict[Any, Any] = {}  # (job id, rank) -> what the rank sent back, until collected
        self._job_ids = itertools.count()
        # Set when a job ended with some ranks raising and others not: the raising ranks may have
        # skipped a collective the others completed or abandoned, so the group is restarted.
        self._suspect = False
        self._start()

    # -- lifecycle

    def _start(self) -> None:
        self._suspect = False
        self._mailbox = {}
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        self._job_queues = [self._ctx.Queue() for _ in range(self.world_size)]
        self._result_queue = self._ctx.Queue()
        # Children read OMP_NUM_THREADS when they import torch; set it only while spawning so the
        # test process keeps its own setting.
        saved = os.environ.get("OMP_NUM_THREADS")
        os.environ["OMP_NUM_THREADS"] = "1"
        try:
            self._procs = [
                self._ctx.Process(target=_worker_main, daemon=True, name=f"rank{r}of{self.world_size}",
                                  args=(r, self.world_size, init_method, self._gloo_timeout_s, self._job_queues[r],
                                        self._result_queue))
                for r in range(self.world_size)
            ]
            for p in self._procs:
                p.start()
        finally:
            if saved is None:
                del os.environ["OMP_NUM_THREADS"]
            else:
                os.environ["OMP_NUM_THREADS"] = saved
        ready = set()
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while len(ready) < self.world_size:
            kind, rank, info = self._get_result(deadline, "startup")
            if kind == "startup-failed":
                self.kill()
                raise RuntimeError(f"rank {rank} of a {self.world_size}-rank pool failed to start: {info}")
            ready.add(rank)

    def _get_result(self, deadline: float, what: str, gone: Sequence[int] = ()) -> Any:
        """Next message from the ranks; raises PoolTimeout (after killing) or if a rank died (other
        than those in ``gone``)."""
        while True:
            try:
                return self._result_queue.get(timeout=0.2)
            except queue.Empty:
                pass
            dead = [(r, p.exitcode) for r, p in enumerate(self._procs) if not p.is_alive() and r not in gone]
            if dead:
                self.kill()
                raise RuntimeError(f"{self.world_size}-rank pool: rank(s) died during {what}: "
                                   + ", ".join(f"rank {r} exit code {c}" for r, c in dead))
            if time.monotonic() > deadline:
                self.kill()
                raise PoolTimeout(f"{self.world_size}-rank pool: {what} did not finish in time; pool killed")

    @property
    def alive(self) -> bool:
        return bool(self._procs) and all(p.is_alive() for p in self._procs)

    def signal(self, rank: int, signum: int) -> None:
        """Sends ``signum`` to rank ``rank``'s process (SIGCONT to a rank that stopped itself, say)."""
        os.kill(self._procs[rank].pid, signum)

    def is_stopped(self, rank: int) -> bool:
        """Whether rank ``rank``'s process is stopped (SIGSTOP)."""
        with open(f"/proc/{self._procs[rank].pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "T"

    def wait_stopped(self, rank: int, timeout: float = 30) -> None:
        """Waits until rank ``rank`` has stopped itself; raises PoolTimeout otherwise."""
        deadline = time.monotonic() + timeout
        while not self.is_stopped(rank):
            if time.monotonic() > deadline:
                raise PoolTimeout(f"rank {rank} did not stop within {timeout} s")
            time.sleep(0.01)

    def kill(self) -> None:
        """Ends the rank processes now (used after a timeout: the group may be wedged)."""
        for p in self._procs:
            if p.is_alive():
                p.kill()
        for p in self._procs:
            p.join(timeout=5)
        self._procs = []

    def restart(self) -> None:
        """Fresh processes and group, e.g. after a job that left the ranks' collectives out of step."""
        self.kill()
        self._start()

    def close(self) -> None:
        """Asks each rank to leave the group and exit; kills the ones that do not."""
        if not self._procs:
            return
        for q in self._job_queues:
            with contextlib.suppress(Exception):
                q.put(None)
        for p in self._procs:
            p.join(timeout=10)
        self.kill()

    # -- jobs

    def submit(self, fn: Callable[..., Any], *args: Any, per_rank_args: Optional[Sequence[Sequence[Any]]] = None) -> int:
        """Starts fn(rank, world_size, group, *args, *per_rank_args[rank]) on every rank (a dead rank
        never answers); returns the job's id for ``collect``."""
        if not self._procs:
            self._start()
        if per_rank_args is not None and len(per_rank_args) != self.world_size:
            raise ValueError(f"per_rank_args needs {self.world_size} entries, got {len(per_rank_args)}")
        job_id = next(self._job_ids)
        for r in range(self.world_size):
            extra = tuple(per_rank_args[r]) if per_rank_args is not None else ()
            self._job_queues[r].put((job_id, pickle.dumps((fn, tuple(args) + extra))))
        return job_id

    def collect(self, job_id: int, ranks: Optional[Sequence[int]] = None, timeout: float = 60,
                gone: Sequence[int] = ()) -> Dict[int, Any]:
        """{rank: result, or RemoteError if it raised} of job ``job_id`` for ``ranks`` (default: all).
        Ranks in ``gone`` may die meanwhile without failing the wait (their results are not awaited
        unless asked for). Past ``timeout`` seconds the pool is killed and PoolTimeout raised."""
        wanted = list(range(self.world_size)) if ranks is None else list(ranks)
        deadline = time.monotonic() + timeout
        name = f"job {job_id}"
        while any((job_id, r) not in self._mailbox for r in wanted):
            got_id, rank, answer = self._get_result(deadline, name, gone)
            self._mailbox[(got_id, rank)] = answer
        results = {}
        for r in wanted:
            kind, data = self._mailbox.pop((job_id, r))
            if kind == "ok":
                results[r] = pickle.loads(data)
            else:
                mro, exc_name, message, tb = data
                results[r] = RemoteError(r, exc_name, mro, message, tb)
        return results

    def run(self, fn: Callable[..., Any], *args: Any, per_rank_args: Optional[Sequence[Sequence[Any]]] = None,
            timeout: float = 60, return_exceptions: bool = False) -> List[Any]:
        """Runs fn(rank, world_size, group, *args, *per_rank_args[rank]) on every rank.

        Returns the per-rank results in rank order. If a rank raised: with return_exceptions,
        its entry is a RemoteError; otherwise the RemoteError of the lowest such rank is raised
        (its message names the others). A job past `timeout` seconds kills the pool (the next run
        starts a new one) and raises PoolTimeout.
        """
        if not self.alive or self._suspect:
            self.restart()
        results = self.collect(self.submit(fn, *args, per_rank_args=per_rank_args), timeout=timeout)
        ordered = [results[r] for r in range(self.world_size)]
        errors = [e for e in ordered if isinstance(e, RemoteError)]
        if 0 < len(errors) < self.world_size:
            self._suspect = True
        if errors and not return_exceptions:
            first = errors[0]
            if len(errors) > 1:
                others = "; ".join(f"rank {e.rank}: {e.exc_type_name}: {e.message}" for e in errors[1:])
                first.args = (first.args[0] + f"\n(also failed: {others})",)
            raise first
        return ordered


# ---------------------------------------------------------------------------------------------
# EP case builders (used by the test modules, inside the rank processes)
# ---------------------------------------------------------------------------------------------

FP8 = torch.float8_e4m3fn
#: Names usable across the process boundary and in test ids.
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64, "fp8": FP8}
FP8_BLOCK = 128  # hidden columns per FP8 scale


def _gen(seed: int, rank: int, salt: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed * 1_000_003 + rank * 7919 + salt)
    return g


def make_topk_idx(seed: int, rank: int, T: int, K: int, E: int, skew: str) -> torch.Tensor:
    """int64 [T, K] expert ids in [-1, E) for `rank`, deterministic in (seed, rank).

    skew: "uniform" (K distinct experts per token), "zipf" (distinct, expert e drawn with weight
    1/(e+1)^1.5), "hot" (slot 0 is expert E-1 for every token), "masked" (uniform with ~40%
    slots -1), "dup" (slots may repeat an expert), "all_masked" (every slot -1), "one" (every
    slot of every token names expert 0).
    """
    g = _gen(seed, rank, 1)
    if T == 0:
        return torch.empty((0, K), dtype=torch.int64)
    if skew in ("uniform", "masked", "hot"):
        idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
        if skew == "masked":
            idx[torch.rand((T, K), generator=g) < 0.4] = -1
        elif skew == "hot":
            hot = E - 1
            # Put the hot expert into slot 0 and keep the rest distinct from it.
            for t in range(T):
                row = [e for e in idx[t].tolist() if e != hot][: K - 1]
                idx[t] = torch.tensor([hot] + row)
        return idx.to(torch.int64)
    if skew == "zipf":
        w = 1.0 / torch.arange(1, E + 1, dtype=torch.float64) ** 1.5
        return torch.multinomial(w.expand(T, E), K, replacement=False, generator=g).to(torch.int64)
    if skew == "dup":
        return torch.randint(0, E, (T, K), generator=g, dtype=torch.int64)
    if skew == "all_masked":
        return torch.full((T, K), -1, dtype=torch.int64)
    if skew == "one":
        return torch.zeros((T, K), dtype=torch.int64)
    raise ValueError(f"unknown skew {skew!r}")


def all_ranks_idx(T: int, R: int, experts_per_rank: int) -> torch.Tensor:
    """int64 [T, R]: slot k of token t names expert t % El of rank k, so every token goes to every rank."""
    t = torch.arange(T, dtype=torch.int64)[:, None]
    k = torch.arange(R, dtype=torch.int64)[None, :]
    return (k * experts_per_rank + t % experts_per_rank).contiguous()


def make_topk_weights(seed: int, rank: int, T: int, K: int) -> torch.Tensor:
    """float32 [T, K] random weights in (0, 1) (not integers: their sum order must be exact)."""
    return torch.rand((T, K), generator=_gen(seed, rank, 2), dtype=torch.float32) + 0.01


def make_payload(seed: int, rank: int, T: int, H: int, dtype: str):
    """x for `rank` whose rows identify (source rank, token), exact in every dtype.

    Columns: 0 = rank, 1 = t % 32, 2 = t // 32, others small integers in [-8, 8] (so that
    x * 4 plus an integer bias in [-16, 16] stays exact in bf16, whose integers are exact to 256;
    tests keep T <= 160). For "fp8" the values are small
    integers and the identity lives in the float32 scales: scales[t, 0] = rank * 1000 + t,
    scales[t, j] = j + 0.5.
    """
    g = _gen(seed, rank, 3)
    noise = torch.randint(-8, 9, (T, H), generator=g).to(torch.float32)
    if dtype == "fp8":
        values = noise.to(FP8)
        S = max(1, H // FP8_BLOCK)
        scales = torch.arange(S, dtype=torch.float32).expand(T, S) + 0.5
        scales = scales.clone()
        if T:
            scales[:, 0] = rank * 1000 + torch.arange(T, dtype=torch.float32)
        return values.contiguous(), scales.contiguous()
    x = noise
    if H >= 3 and T:
        x[:, 0] = rank
        x[:, 1] = torch.arange(T) % 32
        x[:, 2] = torch.arange(T) // 32
    return x.to(DTYPES[dtype]).contiguous()


def make_random_rows(seed: int, rank: int, N: int, H: int, dtype: str, salt: int = 4) -> torch.Tensor:
    """[N, H] random normal rows: non-integer data so fp32 addition order shows in the result."""
    return torch.randn((N, H), generator=_gen(seed, rank, salt)).to(DTYPES[dtype])


def layout_of(topk_idx: torch.Tensor, E: int, R: int):
    """Closed-form layout: (num_tokens_per_rank int32 [R], num_tokens_per_expert int32 [E],
    is_token_in_rank bool [T, R]), computed with plain loops over tokens and slots."""
    T, K = topk_idx.shape
    per_rank = [0] * R
    per_expert = [0] * E
    in_rank = [[False] * R for _ in range(T)]
    for t in range(T):
        for k in range(K):
            e = int(topk_idx[t, k])
            if e >= 0:
                per_expert[e] += 1
                in_rank[t][e // (E // R)] = True
        for r in range(R):
            per_rank[r] += in_rank[t][r]
    return (torch.tensor(per_rank, dtype=torch.int32), torch.tensor(per_expert, dtype=torch.int32),
            torch.tensor(in_rank, dtype=torch.bool).reshape(T, R))


def rows(x, index):
    """x[index] for a tensor or the FP8 tuple."""
    if isinstance(x, tuple):
        return tuple(p[index] for p in x)
    return x[index]


def cat_rows(parts, like):
    """torch.cat over dim 0 of tensors or FP8 tuples; `like` gives the empty shape."""
    if isinstance(like, tuple):
        return tuple(cat_rows([p[i] for p in parts], like[i]) for i in range(len(like)))
    if not parts:
        return like[:0]
    return torch.cat(parts)


def expected_dispatch(dst: int, R: int, E: int, xs, idxs, ws, alignment: int = 1):
    """Closed-form dispatch result on rank `dst` from all ranks' inputs (lists indexed by rank).

    Returns (recv_x, recv_topk_idx, recv_topk_weights, num_list, rank_prefix_matrix).
    """
    El = E // R
    xs_parts, idx_parts, w_parts = [], [], []
    counts = torch.zeros((R, R), dtype=torch.int64)
    per_local = [0] * El
    for src in range(R):
        idx = idxs[src]
        dest = destinations(idx, E, R)
        for j in range(R):
            counts[src, j] = int((dest == j).any(dim=1).sum())
        sel = (dest == dst).any(dim=1).nonzero().flatten()
        xs_parts.append(rows(xs[src], sel))
        sub = idx[sel]
        local = (sub >= dst * El) & (sub < (dst + 1) * El)
        idx_parts.append(torch.where(local, sub - dst * El, torch.full_like(sub, -1)))
        if ws is not None:
            w_parts.append(torch.where(local, ws[src][sel], torch.zeros_like(ws[src][sel])))
        for e in range(El):
            per_local[e] += int((idx == dst * El + e).sum())
    num_list = [(n + alignment - 1) // alignment * alignment for n in per_local]
    recv_w = torch.cat(w_parts) if ws is not None else None
    return cat_rows(xs_parts, xs[0]), torch.cat(idx_parts), recv_w, num_list, counts.cumsum(0).to(torch.int32)


def destinations(topk_idx: torch.Tensor, E: int, R: int) -> torch.Tensor:
    """int64 [T, K]: the rank that holds each slot's expert (E // R experts per rank), -1 for masked slots."""
    El = E // R
    return torch.where(topk_idx >= 0, topk_idx // El, torch.full_like(topk_idx, -1))


def num_destinations(topk_idx: torch.Tensor, E: int, R: int) -> torch.Tensor:
    """int64 [T]: number of distinct ranks each token goes to."""
    dest = destinations(topk_idx, E, R)
    return torch.stack([(dest == r).any(dim=1) for r in range(R)], dim=1).reshape(-1, R).sum(dim=1)


def pad_rows(x, n: int, fill: float):
    """Rows of x (tensor or FP8 tuple) padded with `fill` to n rows."""
    if isinstance(x, tuple):
        return tuple(pad_rows(p, n, fill) for p in x)
    out = torch.full((n,) + tuple(x.shape[1:]), fill, dtype=torch.float32).to(x.dtype)
    out[: x.shape[0]] = x
    return out


def same(a, b) -> bool:
    """torch.equal for tensors / FP8 tuples / None / lists, type-strict (dtype and shape too).

    FP8 tensors are compared through their bytes (torch.equal has no float8 kernel everywhere).
    """
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, (tuple, list)) or isinstance(b, (tuple, list)):
        if type(a) is not type(b) and not (isinstance(a, tuple) and isinstance(b, tuple)):
            return False
        if len(a) != len(b):
            return False
        return all(same(p, q) for p, q in zip(a, b))
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.dtype != b.dtype or a.shape != b.shape:
            return False
        if a.dtype == FP8:
            return torch.equal(a.view(torch.uint8), b.view(torch.uint8))
        return torch.equal(a, b)
    return a == b


def describe_diff(name: str, a, b) -> str:
    """One line saying how a (eplib / actual) and b (reference / expected) differ."""
    def d(v):
        if isinstance(v, torch.Tensor):
            return f"{v.dtype}{list(v.shape)}"
        if isinstance(v, tuple):
            return "(" + ", ".join(d(p) for p in v) + ")"
        return repr(v)[:200]
    detail = ""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and a.numel():
        aa = a.view(torch.uint8) if a.dtype == FP8 else a
        bb = b.view(torch.uint8) if b.dtype == FP8 else b
        if aa.dtype == bb.dtype:
            ne = (aa != bb)
            if ne.dim() > 1:
                ne = ne.reshape(ne.shape[0], -1).any(dim=1)
            bad = ne.nonzero().flatten()[:5].tolist()
            detail = f" first differing rows {bad}"
            if bad:
                detail += f"; row {bad[0]}: got {aa[bad[0]].flatten()[:6].tolist()} want {bb[bad[0]].flatten()[:6].tolist()}"
    return f"{name}: got {d(a)} want {d(b)}{detail}"


def outcome(fn: Callable[[], Any]) -> str:
    """"ok" if fn() returns, else "ExceptionType: message" (tests compare it per rank)."""
    try:
        fn()
        return "ok"
    except Exception as error:  # noqa: BLE001 - compared by the tests
        return f"{type(error).__name__}: {error}"


def timed_outcome(fn: Callable[[], Any]):
    """(outcome(fn), seconds it took)."""
    t0 = time.monotonic()
    result = outcome(fn)
    return result, time.monotonic() - t0


@contextlib.contextmanager
def eplib_timeout(seconds: float) -> Iterator[None]:
    """EPLIB_TIMEOUT_S=seconds inside (eplib reads it at each call), its old value back on exit. Only
    this variable is touched: mock.patch.dict would clear and rewrite the whole environment, which the
    process group's threads may read meanwhile."""
    previous = os.environ.get("EPLIB_TIMEOUT_S")
    os.environ["EPLIB_TIMEOUT_S"] = str(seconds)
    try:
        yield
    finally:
        if previous is None:
            del os.environ["EPLIB_TIMEOUT_S"]
        else:
            os.environ["EPLIB_TIMEOUT_S"] = previous


class LogRecords(logging.Handler):
    """A logging handler that keeps the messages of the records it handles (``level`` and above)."""

    def __init__(self, level: int = logging.NOTSET) -> None:
        super().__init__(level)
        self.messages: List[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def captured_logs(level: int = logging.NOTSET, logger: str = "eplib") -> Iterator[List[str]]:
    """Inside, the messages that `logger` hands to its handlers (at `level` and above) are appended to
    the list it yields; the handler is removed on exit."""
    handler = LogRecords(level)
    target = logging.getLogger(logger)
    target.addHandler(handler)
    try:
        yield handler.messages
    finally:
        target.removeHandler(handler)


def make_buffer(impl: str, group, **kwargs):
    """impl "ref": eplib.reference.ReferenceBuffer; "eplib": eplib.Buffer(group, **kwargs)."""
    if impl == "ref":
        from eplib.reference import ReferenceBuffer

        return ReferenceBuffer(group)
    import eplib

    return eplib.Buffer(group, **kwargs)


def expected_combine(src: int, R: int, E: int, idxs, ys, biases, H: int) -> torch.Tensor:
    """Closed-form combine sum on rank `src` (before the cast), in fp32, or fp64 for fp64 rows.

    ys[r] are the rows rank r passes to combine (its dispatch output order); the row of src's
    token t on rank r sits after the rows of sources < src (the rank_prefix_matrix offset), at t's
    position among src's tokens bound for r. Sum order: 0, biases, then ranks ascending.
    """
    T = idxs[src].shape[0]
    acc_dtype = torch.float64 if ys[0].dtype == torch.float64 else torch.float32
    acc = torch.zeros((T, H), dtype=acc_dtype)
    for b in biases:
        acc = acc + b.to(acc_dtype)
    for r in range(R):
        offset = 0
        for s in range(src):
            offset += int((destinations(idxs[s], E, R) == r).any(dim=1).sum())
        d = destinations(idxs[src], E, R)
        sel = (d == r).any(dim=1).nonzero().flatten()
        acc[sel] = acc[sel] + ys[r][offset: offset + sel.numel()].to(acc_dtype)
    return acc


def expected_identity_combine(x: torch.Tensor, topk_idx: torch.Tensor, E: int, R: int, biases=()) -> torch.Tensor:
    """Combine of the dispatched rows of x sent straight back (identity experts): each token's row once per
    rank it went to, plus the biases, summed in fp32 in that order, cast to x's dtype."""
    want = x.float() * num_destinations(topk_idx, E, R).to(torch.float32)[:, None]
    for b in biases:
        want = want + b.float()
    return want.to(x.dtype)


def expected_combined_weights(topk_idx: torch.Tensor, topk_weights: torch.Tensor, E: int, R: int) -> torch.Tensor:
    """Combine of the dispatched weights sent straight back: per token, destination r (ascending, fp32,
    from 0) returns the weight where the slot's expert lives on r and 0 elsewhere."""
    acc = torch.zeros(topk_weights.shape, dtype=torch.float32)
    dest = destinations(topk_idx, E, R)
    for r in range(R):
        sel = (dest == r).any(dim=1)
        acc[sel] = acc[sel] + torch.where(dest[sel] == r, topk_weights[sel], torch.zeros_like(topk_weights[sel]))
    return acc


def _bias_arg(biases):
    if len(biases) == 0:
        return None
    if len(biases) == 1:
        return biases[0]
    return tuple(biases)


def job_closed_form(rank: int, R: int, group, impl: str, case: dict) -> List[str]:
    """Runs layout, dispatch, cached dispatch and combine on `impl` and checks every output
    against closed-form expectations built from all ranks' (regenerated) inputs.

    case keys: seed, Ts (per-rank token counts), H, K, E, skew, dtype ("fp32", "bf16", "fp16",
    "fp64", "fp8"), alignment, num_worst, with_topk, bias (0, 1 = one tensor, 2 = a tuple of two),
    buffer_kwargs (optional). Returns a list of mismatch descriptions (empty = pass). All
    collectives run before any comparison, so a mismatch on one rank cannot strand the others.
    """
    return closed_form_errors(make_buffer(impl, group, **case.get("buffer_kwargs", {})), rank, R, impl, case)


def closed_form_errors(buf, rank: int, R: int, impl: str, case: dict) -> List[str]:
    """job_closed_form's calls and checks on an existing Buffer ``buf`` (``impl`` labels the messages)."""
    seed, Ts, H, K, E = case["seed"], case["Ts"], case["H"], case["K"], case["E"]
    skew, dtype, alignment, num_worst = case["skew"], case["dtype"], case["alignment"], case["num_worst"]
    with_topk, nbias = case["with_topk"], case["bias"]
    cdtype = "bf16" if dtype == "fp8" else dtype  # combine has no FP8 form

    xs = [make_payload(seed, s, Ts[s], H, dtype) for s in range(R)]
    x2s = [make_payload(seed + 1, s, Ts[s], H, dtype) for s in range(R)]
    idxs = [make_topk_idx(seed, s, Ts[s], K, E, skew) for s in range(R)]
    ws = [make_topk_weights(seed, s, Ts[s], K) for s in range(R)]
    x, idx, w = xs[rank], idxs[rank], ws[rank]
    T = Ts[rank]

    # ---- all collectives first
    lay = buf.get_dispatch_layout(idx, E)
    kwargs = dict(num_tokens_per_rank=lay[0], is_token_in_rank=lay[3], num_tokens_per_expert=lay[2],
                  expert_alignment=alignment, num_worst_tokens=num_worst)
    if with_topk:
        kwargs.update(topk_idx=idx, topk_weights=w)
    out = buf.dispatch(x, **kwargs)
    recv_x, recv_idx, recv_w, num_list, handle = out[:5]
    cached = buf.dispatch(x2s[rank], handle=handle)

    # Expected dispatch outputs of every rank (needed for the combine expectations too).
    exp = [expected_dispatch(d, R, E, xs, idxs, ws if with_topk else None, alignment) for d in range(R)]
    exp2 = [expected_dispatch(d, R, E, x2s, idxs, None, alignment)[0] for d in range(R)]
    Ns = [e[1].shape[0] for e in exp]
    rows_of = [num_worst if num_worst else n for n in Ns]
    N = Ns[rank]

    # Identity experts: send the received rows straight back, padding rows set to garbage that
    # combine must ignore. Integer biases keep the result exact.
    combined_id = None
    gi = _gen(seed, rank, 10)
    int_biases = [torch.randint(-16, 17, (T, H), generator=gi).to(DTYPES[cdtype]) for _ in range(nbias)]
    if dtype != "fp8":
        y_id = recv_x.clone()
        y_id[N:] = 77
        combined_id = buf.combine(y_id, handle, bias=_bias_arg(int_biases))
    # Random rows and biases: non-integer data, so the fp32 summation order shows.
    ys = []
    for r in range(R):
        y = make_random_rows(seed, r, rows_of[r], H, cdtype, salt=11)
        y[Ns[r]:] = 1e4
        ys.append(y)
    biases = [make_random_rows(seed, rank, T, H, cdtype, salt=20 + i) for i in range(nbias)]
    comb_w = None
    if with_topk:
        comb_w = recv_w.clone()
        comb_w[N:] = 1e4
    combined = buf.combine(ys[rank], handle, topk_weights=comb_w, bias=_bias_arg(biases))

    # ---- comparisons
    errs: List[str] = []

    def check(name, got, want):
        if not same(got, want):
            errs.append(f"rank {rank} [{impl}] " + describe_diff(name, got, want))

    e_rank, e_expert, e_in_rank = layout_of(idx, E, R)
    check("layout num_tokens_per_rank", lay[0], e_rank)
    check("layout [1]", lay[1], None)
    check("layout num_tokens_per_expert", lay[2], e_expert)
    check("layout is_token_in_rank", lay[3], e_in_rank)

    ex_x, ex_idx, ex_w, ex_list, ex_rpm = exp[rank]
    ex_x2 = exp2[rank]
    if num_worst:
        ex_x, ex_x2 = pad_rows(ex_x, num_worst, 0), pad_rows(ex_x2, num_worst, 0)
        ex_idx = pad_rows(ex_idx, num_worst, -1)
        ex_w = pad_rows(ex_w, num_worst, 0) if ex_w is not None else None
        ex_list = []
    if not with_topk:
        ex_idx = ex_w = None
    check("recv_x", recv_x, ex_x)
    check("recv_topk_idx", recv_idx, ex_idx)
    check("recv_topk_weights", recv_w, ex_w)
    check("num_recv_tokens_per_expert_list", num_list, ex_list)
    if not isinstance(num_list, list):
        errs.append(f"rank {rank} [{impl}] num_recv_tokens_per_expert_list is {type(num_list).__name__}, not list")
    check("handle[0] rank_prefix_matrix", handle[0], ex_rpm)
    check("cached recv_x", cached[0], ex_x2)
    check("cached outputs [1:5]", list(cached[1:5]), [None, None, None, None])

    if combined_id is not None:
        check("combine(identity experts)", combined_id[0], expected_identity_combine(x, idx, E, R, int_biases))
        check("combine(identity experts) combined_topk_weights", combined_id[1], None)
    want_c = expected_combine(rank, R, E, idxs, ys, biases, H).to(DTYPES[cdtype])
    check("combine(random rows) combined_x", combined[0], want_c)
    if with_topk:
        check("combine combined_topk_weights", combined[1], expected_combined_weights(idx, w, E, R))
    else:
        check("combine combined_topk_weights", combined[1], None)
    return errs


# The FP8 scale forms DeepEP accepts: float32 [T, H/128] or int32 [T, H/512] (four UE8M0 exponents
# each), row-major or column-major (DeepEP's intranode test passes x[1].T.contiguous().T).
SCALE_FORMS = ("row_major", "column_major", "int32", "int32_column_major")


def make_scales(g: torch.Generator, T: int, H: int, form: str) -> torch.Tensor:
    """Random FP8 scales for T tokens of hidden size H in one of SCALE_FORMS."""
    if form.startswith("int32"):
        scales = torch.randint(0, 256, (T, 4 * max(1, H // (4 * FP8_BLOCK))), dtype=torch.uint8,
                               generator=g).view(torch.int32)
    else:
        scales = torch.rand((T, max(1, H // FP8_BLOCK)), generator=g) + 0.5
    return scales.T.contiguous().T if form.endswith("column_major") else scales


def _compare_sequence(buf, rank: int, R: int, case: dict):
    """The call sequence job_compare runs on one implementation; returns its outputs."""
    seed, Ts, H, K, E = case["seed"], case["Ts"], case["H"], case["K"], case["E"]
    dtype, nbias = case["dtype"], case["bias"]
    cdtype = "bf16" if dtype == "fp8" else dtype
    T = Ts[rank]
    idx = make_topk_idx(seed, rank, T, K, E, case["skew"])
    w = make_topk_weights(seed, rank, T, K)
    if dtype == "fp8":
        g = _gen(seed, rank, 30)
        x = ((torch.randn((T, H), generator=g) * 4).to(FP8), make_scales(g, T, H, case.get("scales", "row_major")))
    else:
        x = make_random_rows(seed, rank, T, H, dtype, salt=30)
    lay = buf.get_dispatch_layout(idx, E)
    kwargs = dict(num_tokens_per_rank=lay[0], is_token_in_rank=lay[3], num_tokens_per_expert=lay[2],
                  expert_alignment=case["alignment"], num_worst_tokens=case["num_worst"])
    if case["with_topk"]:
        kwargs.update(topk_idx=idx, topk_weights=w)
    d = buf.dispatch(x, **kwargs)
    recv_x, recv_idx, recv_w, num_list, handle = d[:5]
    x2 = make_random_rows(seed + 1, rank, T, H, cdtype, salt=31)
    cached = buf.dispatch(x2, handle=handle)
    nrows = recv_x[0].shape[0] if isinstance(recv_x, tuple) else recv_x.shape[0]
    y = make_random_rows(seed, rank, nrows, H, cdtype, salt=32)
    biases = [make_random_rows(seed, rank, T, H, cdtype, salt=33 + i) for i in range(nbias)]
    c = buf.combine(y, handle, topk_weights=recv_w, bias=_bias_arg(biases))
    return {
        "layout num_tokens_per_rank": lay[0], "layout [1]": lay[1],
        "layout num_tokens_per_expert": lay[2], "layout is_token_in_rank": lay[3],
        "recv_x": recv_x, "recv_topk_idx": recv_idx, "recv_topk_weights": recv_w,
        "num_recv_tokens_per_expert_list": num_list, "handle[0]": handle[0],
        "cached recv_x": cached[0], "cached [1:5]": list(cached[1:5]),
        "combined_x": c[0], "combined_topk_weights": c[1],
    }


def job_compare(rank: int, R: int, group, case: dict) -> List[str]:
    """eplib.Buffer and ReferenceBuffer on the same random inputs: every output torch.equal.

    Same case keys as job_closed_form. Returns mismatch descriptions (empty = pass).
    """
    ref = _compare_sequence(make_buffer("ref", group), rank, R, case)
    got = _compare_sequence(make_buffer("eplib", group, **case.get("buffer_kwargs", {})), rank, R, case)
    return [f"rank {rank} eplib vs reference: " + describe_diff(k, got[k], ref[k])
            for k in ref if not same(got[k], ref[k])]


def base_case(**overrides) -> dict:
    """A small default case; tests override what they vary."""
    case = dict(seed=1, Ts=None, H=16, K=2, E=None, skew="uniform", dtype="fp32", alignment=1,
                num_worst=0, with_topk=True, bias=0)
    case.update(overrides)
    return case


def fill_case(case: dict, R: int) -> dict:
    """Completes Ts / E defaults that depend on the world size."""
    case = dict(case)
    if case["Ts"] is None:
        case["Ts"] = [7 + 3 * r for r in range(R)]
    elif len(case["Ts"]) != R:  # a pattern, repeated over the ranks
        case["Ts"] = [case["Ts"][r % len(case["Ts"])] for r in range(R)]
    if case["E"] is None:  # experts per rank (default 2) times the world size
        case["E"] = case.pop("E_per_rank", 2) * R
    return case


def job_hand_example(rank: int, R: int, group, impl: str) -> List[str]:
    """A 2-rank example worked out by hand (R=2, E=4: rank 0 owns experts 0-1, rank 1 owns 2-3).

    rank 0 tokens: t0 -> [0, 1], t1 -> [2, 3], t2 -> [1, 2]; rank 1 tokens: t0 -> [3, -1].
    Rank 0 receives (r0,t0), (r0,t2); rank 1 receives (r0,t1), (r0,t2), (r1,t0).
    """
    assert R == 2
    buf = make_buffer(impl, group)
    if rank == 0:
        idx = torch.tensor([[0, 1], [2, 3], [1, 2]])
        w = torch.tensor([[0.5, 0.25], [0.125, 2.0], [4.0, 8.0]])
    else:
        idx = torch.tensor([[3, -1]])
        w = torch.tensor([[16.0, 32.0]])
    T = idx.shape[0]
    x = (torch.arange(T, dtype=torch.float32)[:, None] + 1000 * rank + torch.arange(4) / 8).contiguous()
    lay = buf.get_dispatch_layout(idx, 4)
    recv_x, recv_idx, recv_w, num_list, handle, _ = buf.dispatch(
        x, num_tokens_per_rank=lay[0], is_token_in_rank=lay[3], num_tokens_per_expert=lay[2],
        topk_idx=idx, topk_weights=w, expert_alignment=1)
    comb = buf.combine(recv_x, handle, topk_weights=recv_w)

    cols = torch.arange(4) / 8
    if rank == 0:
        want = dict(
            per_rank=torch.tensor([2, 2], dtype=torch.int32),
            per_expert=torch.tensor([1, 2, 2, 1], dtype=torch.int32),
            in_rank=torch.tensor([[True, False], [False, True], [True, True]]),
            recv_x=torch.stack([0 + cols, 2 + cols]),
            recv_idx=torch.tensor([[0, 1], [1, -1]]),
            recv_w=torch.tensor([[0.5, 0.25], [4.0, 0.0]]),
            num_list=[1, 2],
            # t0 goes to rank 0 only, t1 to rank 1 only, t2 to both.
            comb_x=x * torch.tensor([[1.0], [1.0], [2.0]]),
            comb_w=torch.tensor([[0.5, 0.25], [0.125, 2.0], [4.0, 8.0]]),
        )
    else:
        want = dict(
            per_rank=torch.tensor([0, 1], dtype=torch.int32),
            per_expert=torch.tensor([0, 0, 0, 1], dtype=torch.int32),
            in_rank=torch.tensor([[False, True]]),
            recv_x=torch.stack([1 + cols, 2 + cols, 1000 + cols]),
            recv_idx=torch.tensor([[0, 1], [-1, 0], [1, -1]]),
            recv_w=torch.tensor([[0.125, 2.0], [0.0, 8.0], [16.0, 0.0]]),
            num_list=[2, 2],
            comb_x=x.clone(),
            comb_w=torch.tensor([[16.0, 0.0]]),
        )
    rpm = torch.tensor([[2, 2], [2, 3]], dtype=torch.int32)
    got = dict(per_rank=lay[0], per_expert=lay[2], in_rank=lay[3], recv_x=recv_x, recv_idx=recv_idx,
               recv_w=recv_w, num_list=num_list, comb_x=comb[0], comb_w=comb[1])
    errs = [f"rank {rank} [{impl}] " + describe_diff(k, got[k], want[k]) for k in want if not same(got[k], want[k])]
    if not same(handle[0], rpm):
        errs.append(f"rank {rank} [{impl}] " + describe_diff("handle[0]", handle[0], rpm))
    return errs
