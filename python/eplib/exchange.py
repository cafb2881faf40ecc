"""The collectives of a process group that eplib's cpu transport runs, kept in step on every rank.

Every collective of a Buffer's cpu transport goes through its group's ``GroupChannel`` (one per
process group object, shared by all Buffers on it). The channel numbers them (the *op index*, the
same on every rank while they are in step) and waits for each one. With L = ``EPLIB_TIMEOUT_S``:

Fast path. A collective issued within L/4 of this rank's previous one completing, and completing
within 0.1 s, costs nothing beyond itself (its wait is gloo's own, with a timeout).

Slow path, through the process group's store (a client of its own; every store operation bounded,
see ``_StoreClient``):

- A collective not complete after 0.1 s (or L/4 when shorter) looks at the op's mark
  (``op/<op>``) every 0.1 s: another rank may have lost a peer ("lost:") or given up ("abandoned:")
  on it, and then this rank raises too, at once.
- A rank that has waited L/4 leaves an arrival mark (``here/<op>/<rank>``).
- A rank that is *late* (more than L/4 since its previous collective completed, or that one's wait
  took more than L/4) adds itself to the op's mark ("arrived:<ranks>", by compare-and-set) before
  issuing it.
- A rank that times out at L marks the op "abandoned" (compare-and-set), unless every rank has
  issued it (an arrival mark or a late claim: then the op completes, and it waits once more L). It
  raises ``CollectiveError`` naming the ranks that never arrived and leaves the op pending.
- A late rank that finds the op abandoned still issues it, so that the abandoned op of the others
  completes (every rank issues the same collectives in the same order), then raises. A late rank,
  and any rank whose wait took more than L/4, reads the mark again after the op completes, and
  raises if it was abandoned meanwhile.
- A rank whose collective fails in the backend marks the op "lost" and names the ranks that left
  no arrival mark within 0.3 s, leaving out those whose process still runs on this host (each rank
  records "host:pid" under ``process/<rank>`` when its channel is made).

Why a rank that is not late never completes an op that others abandoned without being told: it
issued op k within L/2 of issuing op k-1, and no peer issued op k before this rank's op k-1 data
reached it; so its op k data reaches every peer before that peer has waited L, and it has left its
arrival mark by then if it still waits. If op k waits for a third rank that comes only after the
abandonment, this rank's wait exceeds L - L/2 > L/4 and it reads the mark.

After an abandoned op every rank that took part has raised. Its next collective first meets the
others in the store (``resync/<n>/<rank>``, up to L), then waits for its abandoned op to complete,
then goes on: once the late rank is back, every rank's Buffer works as before, on the same process
group. A rank stopped inside a collective after sending its part can let some peers complete it;
they give up on the next op. When that op is an all-gather (the next call's header), the ranks
behind join it with zeros at the resynchronization; otherwise the group is broken.

A collective that fails in the backend (a peer died: gloo reports the closed connection), or a
timeout that cannot be settled through the store, leaves the group broken: every later call raises
at once, and ``abort(group)`` lets the process exit. The recovery: a new group of the survivors, or a
restart (README, "Failure behaviour").
"""

import atexit
import datetime
import os
import socket
import threading
import time
import weakref
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from . import collectives
from .collectives import CollectiveError, timeout_seconds

# The mark of an op in the store: "arrived:<ranks>" (ranks that issued it late), or
# "abandoned:<rank>:<its EPLIB_TIMEOUT_S>" (the rank that gave up on it first).
_ARRIVED = "arrived:"
_ABANDONED = "abandoned:"
_LOST = "lost:"  # "lost:<what the backend said>": a collective failed on a rank
_KEYS = "eplib/"
# How long a rank whose collective failed gives the other survivors to leave their arrival marks
# (at most; a quarter of EPLIB_TIMEOUT_S when that is shorter), before it names the missing ranks.
_FAILURE_SETTLE_S = 0.3
# Store operations wait at most this long (or a quarter of EPLIB_TIMEOUT_S when shorter) for the
# store's host: it answers in well under a millisecond when it runs at all.
_STORE_TIMEOUT_S = 2.0
_POLL_S = 0.01
# A collective not complete after this long (or a quarter of EPLIB_TIMEOUT_S when shorter) looks at
# its mark in the store this often: another rank may have lost a peer or given up on it.
_SLOW_POLL_S = 0.1


class PeerInputError(RuntimeError):
    """Another rank's input failed a check, and that rank told this one before it raised: nothing
    was exchanged, and every rank's Buffer stays usable for the next call."""


class _Abandoned(NamedTuple):
    op: int
    work: Optional[dist.Work]  # this rank's collective of that op, still pending in the backend
    gather_words: Optional[int]  # int64 words per rank when that op is an all-gather (others can join it)


class GroupChannel:
    """Issues and waits for the collectives of eplib's cpu transport on one process group."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self._group = weakref.ref(group)
        self.rank = group.rank()
        self.num_ranks = group.size()
        self._store = _StoreClient(group)
        self._next_op = 0
        self._last_contact: Optional[float] = None  # when this rank's previous collective completed
        self._last_wait = 0.0  # how long that collective took
        self._abandoned: Optional[_Abandoned] = None
        self._resyncs = 0  # resynchronizations so far: the same count on every rank
        self._broken: Optional[str] = None
        self._keys: List[Tuple[int, str]] = []  # (op, key) this rank set in the store, deleted once stale
        # Where each rank's process runs ("host:pid"), so that a rank on the same host can tell a
        # dead peer from a slow one after a failed collective.
        self._processes = {}
        where = f"{socket.gethostname()}:{os.getpid()}"
        try:
            self._store.call(lambda store: store.set(_key("process", self.rank), where), timeout_seconds())
        except Exception:  # noqa: BLE001 - then failures name ranks by their arrival marks alone
            pass

    # ------------------------------------------------------------------------------------------
    # State
    # ------------------------------------------------------------------------------------------

    def ready(self) -> int:
        """Makes the group ready for this rank's next collective (raises when it is unusable; after
        an abandoned call, meets the other ranks first) and returns that collective's op index."""
        self.check_usable()
        if self._abandoned is not None:
            self._resync(timeout_seconds())
        return self._next_op

    def realign(self, next_op: int) -> None:
        """After a header exchange showed different op indices: every rank continues from ``next_op``."""
        self._next_op = next_op

    def check_usable(self) -> None:
        """Raises CollectiveError when the group lost a rank or was aborted."""
        if self._broken is not None:
            raise CollectiveError(f"eplib: this process group cannot be used any more: {self._broken}. Call "
                                  f"eplib.abort(group) and build a new group (README, 'Failure behaviour')")

    def has_pending_collective(self) -> bool:
        """Whether a collective this rank abandoned is still pending in the backend."""
        return self._abandoned is not None and self._abandoned.work is not None \
            and not self._abandoned.work.is_completed()

    def mark_broken(self, reason: str) -> None:
        self._broken = reason

    # ------------------------------------------------------------------------------------------
    # Collectives
    # ------------------------------------------------------------------------------------------

    def all_gather(self, output: torch.Tensor, input: torch.Tensor, phase: str) -> None:
        """All-gathers ``input`` (int64 [n]) of every rank into ``output`` ([R * n], rank-major)."""
        # collectives._all_gather_single is looked up at each call, so that a collective meter sees it.
        self._run(lambda group: collectives._all_gather_single(output, input, group=group, async_op=True), phase,
                  gather_words=input.numel())

    def all_to_all(self, output: torch.Tensor, input: torch.Tensor, output_split_sizes: List[int],
                   input_split_sizes: List[int], phase: str) -> None:
        """``all_to_all_single`` over dim 0 with the given split sizes."""
        self._run(lambda group: dist.all_to_all_single(output, input, output_split_sizes, input_split_sizes,
                                                       group=group, async_op=True), phase, gather_words=None)

    def _run(self, issue: Callable[[dist.ProcessGroup], dist.Work], phase: str, gather_words: Optional[int]) -> None:
        """Issues one collective, ``issue(group)`` (started with ``async_op=True``; returns its Work),
        and waits for it as the module docstring says. ``phase`` names it in errors."""
        op = self.ready()
        limit = timeout_seconds()
        group = self._live_group()
        claim = self._claim(op, limit) if self._is_late(limit) else None
        if claim is not None and claim.startswith(_LOST):
            self._lose(op, None, phase, claim[len(_LOST):], None)
        self._next_op += 1
        start = time.monotonic()
        try:
            work = issue(group)
        except Exception as error:  # noqa: BLE001 - the peers issued this op: the ranks are out of step
            self._broken = f"rank {self.rank} could not start {phase} ({type(error).__name__}: {error})"
            raise CollectiveError(f"eplib: {self._broken}") from error
        self._wait(work, op, phase, limit, claim, gather_words, start)

    def _live_group(self) -> dist.ProcessGroup:
        group = self._group()
        if group is None:
            raise CollectiveError("eplib: the process group of this Buffer no longer exists")
        return group

    def _is_late(self, limit: float) -> bool:
        if self._last_contact is None:
            return True
        return time.monotonic() - self._last_contact > limit / 4 or self._last_wait > limit / 4

    def _wait(self, work: dist.Work, op: int, phase: str, limit: float, claim: Optional[str],
              gather_words: Optional[int], start: float) -> None:
        """Waits for ``work`` (op ``op``, issued at ``start``); ``claim`` is the op's mark after this
        rank claimed it (late ranks), else None."""
        deadline = start + limit
        poll = min(limit / 4, _SLOW_POLL_S)
        next_look = start + poll
        marked_here = extended = False
        store_answers = True  # a store whose host is stopped is not asked again during this wait
        while not self._wait_until(work, min(next_look, deadline), op, phase):
            now = time.monotonic()
            if not marked_here and now >= start + limit / 4 and store_answers:
                self._set(_key("here", op, self.rank), op, limit)
                marked_here = True
            if now < deadline:
                # Another rank may have settled this op already: a rank lost, or the op abandoned.
                mark = self._read_mark(op, limit) if store_answers else ""
                store_answers = mark is not None
                if mark is None:
                    mark = ""
                if mark.startswith(_LOST):
                    self._lose(op, work, phase, mark[len(_LOST):], None)
                if mark.startswith(_ABANDONED):
                    self._raise_timed_out(op, work, gather_words, phase, limit, self._missing(op, mark, limit))
                next_look = now + poll
                continue
            mark, missing = self._try_abandon(op, limit)
            if mark is not None and mark.startswith(_LOST):
                self._lose(op, work, phase, mark[len(_LOST):], None)
            if mark is not None and mark.startswith(_ABANDONED):
                self._raise_timed_out(op, work, gather_words, phase, limit, missing)
            if mark is None or extended:
                reason = ("the store did not answer, so the ranks cannot agree to abandon the call" if mark is None
                          else "every rank issued it, but it did not complete")
                self._abandoned = _Abandoned(op, work, None)  # pending for good: the exit hook ends it
                _exit_hook.register()
                self._broken = f"rank {self.rank} timed out in {phase} after {limit:g} s: {reason}"
                then = ("restart the job: without its store no new group can be built" if mark is None
                        else "build a new group")
                raise CollectiveError(f"eplib: {self._broken}. Call eplib.abort(group), then {then} "
                                      f"(README, 'Failure behaviour')")
            deadline += limit  # every rank has issued it, a late one just now: it completes
            extended = True
        waited = time.monotonic() - start
        self._last_contact, self._last_wait = time.monotonic(), waited
        if claim is None or not claim.startswith(_ABANDONED):
            # A late rank's op may be abandoned after it claimed it; a long wait may have been.
            claim = self._claim(op, limit) if claim is not None or waited > limit / 4 else None
        if claim is not None and claim.startswith(_ABANDONED):
            by, their_limit = claim[len(_ABANDONED):].split(":")
            self._abandon(op, None, None)
            raise CollectiveError(
                f"eplib: rank {self.rank} of {self.num_ranks} reached {phase} late: rank {by} had given up "
                f"waiting for it after {their_limit} s (EPLIB_TIMEOUT_S). The call is abandoned on every rank; the "
                f"next call meets the other ranks again and works as before")
        self._forget_keys(op)

    def _raise_timed_out(self, op: int, work: dist.Work, gather_words: Optional[int], phase: str, limit: float,
                         missing: List[int]) -> None:
        self._abandon(op, work, gather_words)
        # A rank stopped inside a collective after sending its part lets some peers complete it: a
        # rank waiting in the collective before or after this one (its arrival mark is there) waits
        # for someone else, and is not the one to blame.
        elsewhere = {}
        for r in missing:
            if self._store_has(_key("here", op - 1, r), limit):
                elsewhere[r] = "before"
            elif self._store_has(_key("here", op + 1, r), limit):
                elsewhere[r] = "after"
        missing = [r for r in missing if r not in elsewhere]
        who = f"{describe_ranks(missing)} never arrived" if missing else "no rank is known to be missing"
        for where in ("before", "after"):
            ranks = [r for r, at in elsewhere.items() if at == where]
            if ranks:
                who += f"; {describe_ranks(ranks)} wait in the collective {where} this one"
        raise CollectiveError(
            f"eplib: rank {self.rank} of {self.num_ranks} timed out in {phase} after {limit:g} s "
            f"(EPLIB_TIMEOUT_S): {who}. The call is abandoned on every rank; the next call waits up to "
            f"EPLIB_TIMEOUT_S for every rank to come back, then works as before. If a rank does not come "
            f"back: eplib.abort(group), then a new group (README, 'Failure behaviour')", missing or None)

    def _wait_until(self, work: dist.Work, until: float, op: int, phase: str) -> bool:
        """True when the collective completed by ``until``; False when it has not; raises when it failed."""
        try:
            work.wait(timeout=datetime.timedelta(seconds=max(until - time.monotonic(), 0.001)))
            return True
        except RuntimeError as error:  # gloo: a timed-out wait, or the collective failed
            if not work.is_completed():
                return False
            if work.exception() is None:
                return True  # it completed just after the wait gave up
            self._lose(op, None, phase, str(error), error)

    def _lose(self, op: int, work: Optional[dist.Work], phase: str, cause: str,
              error: Optional[BaseException]) -> None:
        """Raises CollectiveError for a collective that failed here (``error``), or that another rank
        saw fail (its mark says so; ``work`` is still pending here): the group is broken."""
        if work is not None:
            self._abandoned = _Abandoned(op, work, None)  # pending for good: the exit hook ends it
            _exit_hook.register()
        missing = self._missing_after_failure(op, cause)
        who = f"{describe_ranks(missing)} left the group" if missing else "a rank left the group"
        self._broken = f"rank {self.rank} lost the group in {phase}: {who} ({cause})"
        raise CollectiveError(f"eplib: {self._broken}. Call eplib.abort(group), then build a new group of the "
                              f"survivors or restart (README, 'Failure behaviour')", missing) from error

    def _abandon(self, op: int, work: Optional[dist.Work], gather_words: Optional[int]) -> None:
        self._abandoned = _Abandoned(op, work, gather_words)
        if work is not None:
            _exit_hook.register()

    def _resync(self, limit: float) -> None:
        """Meets every rank after an abandoned op (up to ``limit`` s), brings them to the same op, and
        waits for the abandoned collectives to complete.

        The ranks may have given up one op apart: a rank stopped inside a collective after sending
        its part lets some peers complete it, and they give up on the next one. If that next one is
        an all-gather, the ranks behind join it with zeros; otherwise the group is broken."""
        op, work, gather_words = self._abandoned
        keys = [_key("resync", self._resyncs, r) for r in range(self.num_ranks)]
        # "op:words": where this rank gave up, and the all-gather size a rank behind may join it with.
        joinable = gather_words is not None and work is not None
        self._set(keys[self.rank], op, limit, f"{op}:{gather_words if joinable else '-'}")
        deadline = time.monotonic() + limit
        while not self._store_check(keys, limit):
            if time.monotonic() > deadline:
                missing = [r for r in range(self.num_ranks) if not self._store_check([keys[r]], limit)]
                raise CollectiveError(
                    f"eplib: rank {self.rank} of {self.num_ranks}: {describe_ranks(missing)} did not come back in "
                    f"{limit:g} s (EPLIB_TIMEOUT_S) since a call was abandoned; this call was not started. "
                    f"Retry, or call eplib.abort(group) and build a new group (README, 'Failure behaviour')", missing)
            time.sleep(_POLL_S)
        marks = [self._store_get(key, limit).split(":") for key in keys]
        ops = [int(mark[0]) for mark in marks]
        target = max(ops)
        if op < target:
            ahead_words = {mark[1] for mark, their_op in zip(marks, ops) if their_op == target}
            if target > op + 1 or "-" in ahead_words or len(ahead_words) != 1:
                self._broken = (f"the ranks gave up at different collectives (op indices {ops}), which cannot be "
                                f"brought back in step")
                raise CollectiveError(f"eplib: rank {self.rank}: {self._broken}. Call eplib.abort(group) and build "
                                      f"a new group (README, 'Failure behaviour')")
            words = int(ahead_words.pop())
            filler = torch.zeros(words, dtype=torch.int64)
            joined = collectives._all_gather_single(torch.empty(self.num_ranks * words, dtype=torch.int64), filler,
                                                    group=self._live_group(), async_op=True)
            self._finish_abandoned(joined, target, limit)
        if work is not None:
            self._finish_abandoned(work, op, limit)
        self._next_op = target + 1
        self._resyncs += 1
        self._abandoned = None
        self._last_contact, self._last_wait = time.monotonic(), 0.0

    def _finish_abandoned(self, work: dist.Work, op: int, limit: float) -> None:
        if not self._wait_until(work, time.monotonic() + limit, op, "the abandoned call"):
            self._broken = (f"rank {self.rank}: every rank came back, but the collective abandoned at op {op} did "
                            f"not complete in {limit:g} s")
            raise CollectiveError(f"eplib: {self._broken}")

    # ------------------------------------------------------------------------------------------
    # Store
    # ------------------------------------------------------------------------------------------

    def _compare_set(self, key: str, expected: str, value: str, op: int, limit: float) -> Optional[str]:
        """The store's compare-and-set: the key's value afterwards (``value`` if it held ``expected``,
        which "" matches when the key is missing); None when the store did not answer."""
        try:
            mark = self._store.call(lambda store: store.compare_set(key, expected, value), limit).decode()
        except Exception:  # noqa: BLE001 - the store is gone or stuck: callers decide without it
            return None
        if mark == value:
            self._keys.append((op, key))
        return mark

    def _read_mark(self, op: int, limit: float) -> Optional[str]:
        """The op's mark ("" when it has none), or None when the store did not answer."""
        key = _key("op", op)
        try:
            return self._store.call(lambda store: store.get(key) if store.check([key]) else b"", limit).decode()
        except Exception:  # noqa: BLE001
            return None

    def _missing(self, op: int, mark: str, limit: float) -> List[int]:
        """The other ranks that have not issued ``op``: no arrival mark, and not in ``mark``'s late ranks."""
        here = self._ranks_here(op, limit) or []
        return [r for r in range(self.num_ranks) if r != self.rank and r not in here and r not in _arrived(mark)]

    def _claim(self, op: int, limit: float) -> Optional[str]:
        """Adds this rank to the ranks that issued ``op`` late ("arrived:3,1"), unless the op was
        abandoned ("abandoned:<rank>:<limit>"); returns the op's mark, or None without a store."""
        expected = ""
        while True:
            arrived = _arrived(expected)
            mark = self._compare_set(_key("op", op), expected,
                                     _ARRIVED + ",".join(str(r) for r in arrived + [self.rank]), op, limit)
            if mark is None or mark.startswith((_ABANDONED, _LOST)) or self.rank in _arrived(mark):
                return mark
            expected = mark  # another late rank claimed first: add to its mark

    def _try_abandon(self, op: int, limit: float) -> Tuple[Optional[str], List[int]]:
        """At the timeout: marks ``op`` abandoned unless every rank has issued it (it left an arrival
        mark, or claimed the op late). Returns (the op's mark, or None without a store; the ranks that
        had not issued it)."""
        expected = ""
        while True:
            if self._ranks_here(op, limit) is None:
                return None, []
            missing = self._missing(op, expected, limit)
            if not missing:
                return expected, []
            mark = self._compare_set(_key("op", op), expected, f"{_ABANDONED}{self.rank}:{limit:g}", op, limit)
            if mark is None or mark.startswith((_ABANDONED, _LOST)):
                return mark, missing
            expected = mark  # a late rank claimed the op meanwhile: count again

    def _set(self, key: str, op: int, limit: float, value: str = "1") -> None:
        """Sets ``key``, deleted once op ``op`` is stale; a store that does not answer is ignored (the
        marks name ranks in messages; the resynchronization finds missing keys by itself)."""
        try:
            self._store.call(lambda store: store.set(key, value), limit)
            self._keys.append((op, key))
        except Exception:  # noqa: BLE001
            pass

    def _store_get(self, key: str, limit: float) -> str:
        try:
            return self._store.call(lambda store: store.get(key), limit).decode()
        except Exception as error:  # noqa: BLE001
            raise CollectiveError(f"eplib: rank {self.rank}: the process group's store did not answer ({error}); "
                                  f"the ranks cannot resynchronize") from error

    def _store_check(self, keys: Sequence[str], limit: float) -> bool:
        try:
            return self._store.call(lambda store: store.check(list(keys)), limit)
        except Exception as error:  # noqa: BLE001
            raise CollectiveError(f"eplib: rank {self.rank}: the process group's store did not answer ({error}); "
                                  f"the ranks cannot resynchronize") from error

    def _ranks_here(self, op: int, limit: float) -> Optional[List[int]]:
        """The ranks with an arrival mark on ``op``; None when the store did not answer."""
        keys = [_key("here", op, r) for r in range(self.num_ranks)]
        try:
            return self._store.call(lambda store: [r for r, key in enumerate(keys) if store.check([key])], limit)
        except Exception:  # noqa: BLE001
            return None

    def _store_has(self, key: str, limit: float) -> bool:
        try:
            return self._store.call(lambda store: store.check([key]), limit)
        except Exception:  # noqa: BLE001
            return False

    def _missing_after_failure(self, op: int, cause: str) -> Optional[List[int]]:
        """After a collective failed: marks the op lost (the ranks that still wait in it see the mark
        and raise too), leaves this rank's arrival mark, and returns the ranks that are gone: those
        that left no arrival mark within a moment, except those whose process still runs on this
        host (a survivor that has not seen the failure yet). None when the store did not answer."""
        limit = timeout_seconds()
        expected = ""
        while True:  # whatever the mark holds, unless the op was abandoned already
            mark = self._compare_set(_key("op", op), expected, _LOST + cause[:200], op, limit)
            if mark is None or mark.startswith((_LOST, _ABANDONED)):
                break
            expected = mark
        self._set(_key("here", op, self.rank), op, limit)
        deadline = time.monotonic() + min(_FAILURE_SETTLE_S, limit / 4)
        while True:
            here = self._ranks_here(op, limit)
            if here is None:
                return None
            gone = {r: self._process_gone(r, limit) for r in range(self.num_ranks) if r not in here}
            if all(is_gone for is_gone in gone.values()) or time.monotonic() > deadline:
                return [r for r, is_gone in gone.items() if is_gone is not False]
            time.sleep(_POLL_S)

    def _process_gone(self, rank: int, limit: float) -> Optional[bool]:
        """Whether rank ``rank``'s process is gone (it runs on this host; a zombie counts as gone);
        None when that cannot be told (another host, or no record of it)."""
        if rank not in self._processes:
            key = _key("process", rank)
            try:
                where = self._store.call(lambda store: store.get(key) if store.check([key]) else b"", limit)
            except Exception:  # noqa: BLE001
                return None
            host, _, pid = where.decode().rpartition(":")
            if not host:
                return None
            self._processes[rank] = (host, int(pid))
        host, pid = self._processes[rank]
        if host != socket.gethostname():
            return None
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
        except FileNotFoundError:
            return True
        except OSError:
            return None

    def _forget_keys(self, completed_op: int) -> None:
        """Deletes the keys of ops before ``completed_op``: every rank has left them behind (this
        op completed, so every rank issued it, after finishing the earlier ones)."""
        if not self._keys or self._keys[0][0] >= completed_op:
            return
        stale = [key for op, key in self._keys if op < completed_op]
        self._keys = [(op, key) for op, key in self._keys if op >= completed_op]
        try:
            self._store.call(lambda store: [store.delete_key(key) for key in stale], timeout_seconds())
        except Exception:  # noqa: BLE001 - a leftover key costs a few bytes in the store
            pass


def _key(*parts) -> str:
    """The store key of eplib's mark ``parts``, e.g. _key("here", 12, 3) -> "eplib/here/12/3"."""
    return _KEYS + "/".join(str(part) for part in parts)


def _arrived(mark: str) -> List[int]:
    """The ranks of an "arrived:3,1" mark ([] for any other mark)."""
    if not mark.startswith(_ARRIVED):
        return []
    return [int(r) for r in mark[len(_ARRIVED):].split(",") if r]


def describe_ranks(ranks: Sequence[int]) -> str:
    """"rank 3" or "ranks 1, 3"."""
    return f"rank{'s' if len(ranks) != 1 else ''} {', '.join(str(r) for r in ranks)}"


class _StoreClient:
    """The process group's store, for a channel's marks. Every operation is bounded: a store whose
    host is stopped never answers, and in torch 2.13 TCPStore's own timeout does not cover that, so
    each operation runs on a helper thread that is waited for at most min(EPLIB_TIMEOUT_S / 4, 2 s).
    The operations use a client of their own (a clone of the group's); one that did not answer is
    left to its thread, and the next operation clones a fresh one, so that a late answer never
    reaches another operation. After a failure, operations fail at once for as long as one may wait,
    so that a fault costs the wait for the store once, not at every step."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        try:
            self._origin = group.get_group_store() if hasattr(group, "get_group_store") else \
                dist.distributed_c10d._get_process_group_store(group)
        except Exception:  # noqa: BLE001 - a group without a store: timeouts cannot be settled
            self._origin = None
        self._client = None
        self._silent_until = 0.0  # time.monotonic() before which operations fail at once

    def _new_client(self):
        try:
            return self._origin.clone()
        except Exception:  # noqa: BLE001 - stores that cannot clone (file, hash): share the group's
            return self._origin

    def call(self, operation: Callable, limit: float):
        """``operation(store)``'s result; raises what it raised, or TimeoutError when the store did
        not answer in time, or RuntimeError without a store."""
        if self._origin is None:
            raise RuntimeError("the process group has no store")
        if time.monotonic() < self._silent_until:
            raise TimeoutError("the process group's store did not answer a moment ago")
        client, outcome = self._client, {}

        def run() -> None:
            try:
                outcome["client"] = client if client is not None else self._new_client()
                outcome["value"] = operation(outcome["client"])
            except BaseException as error:  # noqa: BLE001 - handed to the caller
                outcome["error"] = error

        thread = threading.Thread(target=run, name="eplib-store", daemon=True)
        thread.start()
        seconds = min(limit / 4, _STORE_TIMEOUT_S)
        thread.join(seconds)
        if thread.is_alive() or "error" in outcome:
            self._client = None
            self._silent_until = time.monotonic() + seconds
            raise outcome.get("error") or TimeoutError(f"the process group's store did not answer in {seconds:g} s")
        self._client = outcome["client"]
        return outcome["value"]


_channels: "weakref.WeakKeyDictionary[dist.ProcessGroup, GroupChannel]" = weakref.WeakKeyDictionary()


def channel_for(group: dist.ProcessGroup) -> GroupChannel:
    """The GroupChannel of ``group``, made on first use; it lives as long as the group object."""
    channel = _channels.get(group)
    if channel is None:
        channel = _channels[group] = GroupChannel(group)
    return channel


# ----------------------------------------------------------------------------------------------
# Ending a group
# ----------------------------------------------------------------------------------------------

def abort(group: Optional[dist.ProcessGroup] = None) -> None:
    """End everything pending on ``group`` (default: the world group) so that the process can exit,
    even when a peer is stuck forever. The group cannot be used afterwards, by eplib or anyone.

    Use it after an eplib call raised because a rank is gone or stuck, before
    ``dist.destroy_process_group()`` and exit: an abandoned gloo collective otherwise keeps a thread
    of the group busy until the group's own timeout (``init_process_group(timeout=...)``, 30 minutes
    by default), and the interpreter waits for it at exit. eplib does this by itself at exit for a
    group where one of its collectives is still pending.

    How: torch's ``ProcessGroup.abort()`` (NCCL: aborts the communicators), and for gloo, whose
    ``abort()`` in torch 2.13 leaves pending collectives waiting, one collective with a 1 ms timeout:
    gloo answers a timeout by closing the group's connections, which ends every collective pending on
    them with an error.
    """
    group = group if group is not None else dist.group.WORLD
    channel = _channels.get(group)
    if channel is not None:
        channel.mark_broken("eplib.abort() was called on it")
    if "gloo" in str(dist.get_backend(group)):
        _close_gloo_connections(group)
    group.abort()


def _close_gloo_connections(group: dist.ProcessGroup) -> None:
    options = dist.distributed_c10d.AllgatherOptions()
    options.timeout = datetime.timedelta(milliseconds=1)
    work = group.all_gather_single(torch.zeros(group.size()), torch.zeros(1), options)
    try:
        work.wait(timeout=datetime.timedelta(seconds=5))
    except RuntimeError:
        pass  # the timeout that closes the connections


class _ExitHook:
    """At interpreter exit, aborts and destroys the groups where a collective that eplib abandoned
    is still pending (see ``abort``); registered with ``atexit`` on the first abandoned collective."""

    def __init__(self) -> None:
        self._registered = False

    def register(self) -> None:
        if not self._registered:
            atexit.register(self._run)
            self._registered = True

    @staticmethod
    def _run() -> None:
        for group, channel in list(_channels.items()):
            if channel.has_pending_collective():
                try:
                    abort(group)
                    # A gloo group still referenced at interpreter exit can end the process with
                    # "terminate called without an active exception" (torch 2.13).
                    dist.destroy_process_group(group)
                except Exception:  # noqa: BLE001 - exiting anyway
                    pass


_exit_hook = _ExitHook()
