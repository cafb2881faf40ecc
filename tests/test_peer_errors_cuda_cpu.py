"""One rank's bad input on the nccl and ipc transports (marker cuda_cpu: their real CUDA kernels on the CPU
execution of the CUDA sources, tests/cuda_cpu.py), 2 ranks: rank 1's input fails a check, rank 0's is
right. Rank 1 raises its own ValueError/TypeError; rank 0 raises a RuntimeError naming rank 1 and quoting
its error: in the same call when that call reads the exchange on the host (a normal-mode dispatch, or the
dispatch after a failed get_dispatch_layout), else (nccl: num_worst_tokens and cached dispatch, combine)
at its next normal-mode dispatch. After each case the same Buffers' next calls equal eplib.reference.
EPLIB_TIMEOUT_S is 5 s, so a rank left waiting shows as a slow step, not a hang. The cpu transport's
version is tests/test_faults.py and tests/test_peer_errors.py."""

import re

import pytest

from dist_harness import (describe_diff, eplib_timeout, make_random_rows, make_topk_idx, make_topk_weights, same,
                          timed_outcome)
from gpu_harness import eplib_buffer

pytestmark = pytest.mark.cuda_cpu

BAD_RANK = 1
T, H, K, E = 12, 32, 2, 4
# The peers' limit on raising, in seconds (EPLIB_TIMEOUT_S is 5 s: a rank left waiting takes longer).
MAX_PEER_S = 1.0

# case -> (the call that fails on rank 1, the start of rank 1's error). Calls: "layout", "dispatch" (normal
# mode), "padded" (num_worst_tokens), "cached", "combine".
CASES = {
    "layout: topk_idx int32": ("layout", "TypeError: topk_idx"),
    "dispatch: non-contiguous x": ("dispatch", "ValueError: x"),
    "dispatch: x float16": ("dispatch", "TypeError: x"),
    "dispatch: expert id out of range": ("dispatch", "ValueError: topk_idx: an expert id outside"),
    "padded dispatch: non-contiguous x": ("padded", "ValueError: x"),
    "cached dispatch: bad handle": ("cached", "TypeError: handle"),
    "cached dispatch: x float16": ("cached", "TypeError: x"),
    "combine: wrong row count": ("combine", "ValueError: x: expected"),
    "combine: bad handle": ("combine", "TypeError: handle"),
    # Every rank's input fails: each raises its own error, nobody waits for anybody.
    "every rank: dispatch, non-contiguous x": ("dispatch", "ValueError: x"),
    "every rank: combine, wrong row count": ("combine", "ValueError: x: expected"),
}
# Calls whose exchange the host reads: the peers raise in them. The ipc transport joins only these.
HOST_READ = ("layout", "dispatch")
IPC_CASES = [name for name, (call, _) in CASES.items() if call in HOST_READ or name.startswith("every rank")]


def _inputs(rank: int, seed: int):
    x = make_random_rows(seed, rank, T, H, "fp32")
    return x, make_topk_idx(seed, rank, T, K, E, "uniform"), make_topk_weights(seed, rank, T, K)


def _valid_round(buf, rank: int, seed: int) -> dict:
    """Layout, normal dispatch, cached dispatch, combine with weights, bias: every output."""
    x, idx, w = _inputs(rank, seed)
    x2 = make_random_rows(seed + 50, rank, T, H, "fp32")
    lay = buf.get_dispatch_layout(idx, E)
    recv_x, recv_idx, recv_w, num_list, handle, _ = buf.dispatch(
        x, num_tokens_per_rank=lay[0], is_token_in_rank=lay[3], num_tokens_per_expert=lay[2], topk_idx=idx,
        topk_weights=w)
    cached = buf.dispatch(x2, handle=handle)[0]
    combined_x, combined_w, _ = buf.combine(recv_x * 2, handle, topk_weights=recv_w, bias=x2)
    return dict(layout=lay[:4], recv_x=recv_x, recv_idx=recv_idx, recv_w=recv_w, num_list=num_list,
                rank_prefix_matrix=handle[0], cached=cached, combined_x=combined_x, combined_w=combined_w)


def _failing_step(buf, rank: int, call: str, case: str):
    """(outcome, seconds) of the case's call on this rank: rank 1's input is bad, rank 0's right."""
    import torch

    bad = rank == BAD_RANK or case.startswith("every rank")
    x, idx, w = _inputs(rank, 3)
    if call == "layout" and bad:  # rank 1 joins rank 0's dispatch, which follows the layout, from here
        return timed_outcome(lambda: buf.get_dispatch_layout(idx.to(torch.int32), E))
    lay = buf.get_dispatch_layout(idx, E)
    layout = dict(num_tokens_per_rank=lay[0], is_token_in_rank=lay[3], num_tokens_per_expert=lay[2])
    if call == "layout":
        return timed_outcome(lambda: buf.dispatch(x, **layout, topk_idx=idx, topk_weights=w))
    if bad and "non-contiguous" in case:
        x = x.t().contiguous().t()
    if bad and "float16" in case:
        x = x.half()
    if bad and "out of range" in case:
        idx = idx.clone()
        idx[2, 1] = E
    if call in ("dispatch", "padded"):
        worst = T * buf.group_size if call == "padded" else 0
        return timed_outcome(lambda: buf.dispatch(x, **layout, topk_idx=idx, topk_weights=w, num_worst_tokens=worst))
    x_good = _inputs(rank, 3)[0]
    recv_x, _, recv_w, _, handle, _ = buf.dispatch(x_good, **layout, topk_idx=idx, topk_weights=w)
    if bad and "bad handle" in case:
        handle = tuple(handle)  # what DeepEP's handle is; eplib's is a DispatchHandle
    if call == "cached":
        return timed_outcome(lambda: buf.dispatch(x, handle=handle))
    rows = recv_x[:-1] if bad and "row count" in case else recv_x
    return timed_outcome(lambda: buf.combine(rows, handle, topk_weights=recv_w[:rows.shape[0]]))


def job_peer_errors(rank, R, group, backend: str, cases):
    """Per case: the failing call, the next normal-mode dispatch (where calls without a host read report),
    then a valid round on the same Buffer compared with eplib.reference. Returns {case: (failing call's
    (outcome, s), next dispatch's (outcome, s) or None, mismatches of the valid round)}."""
    from eplib.reference import ReferenceBuffer

    results = {}
    with eplib_timeout(5):
        buf, _ = eplib_buffer(backend, group)
        ref = ReferenceBuffer(group)
        for seed, case in enumerate(cases, start=10):
            call, _ = CASES[case]
            failing = _failing_step(buf, rank, call, case)
            following = None
            if call not in HOST_READ:
                x, idx, w = _inputs(rank, 4)
                lay = buf.get_dispatch_layout(idx, E)
                following = timed_outcome(lambda: buf.dispatch(
                    x, num_tokens_per_rank=lay[0], is_token_in_rank=lay[3], num_tokens_per_expert=lay[2],
                    topk_idx=idx, topk_weights=w))
            got, want = _valid_round(buf, rank, seed), _valid_round(ref, rank, seed)
            errs = [describe_diff(k, got[k], want[k]) for k in want if not same(got[k], want[k])]
            results[case] = (failing, following, errs)
    return results


def _check(results, cases) -> None:
    for case in cases:
        call, own_error = CASES[case]
        (bad_outcome, _), bad_next, bad_errs = results[BAD_RANK][case]
        (peer_outcome, peer_s), peer_next, peer_errs = results[1 - BAD_RANK][case]
        assert bad_outcome.startswith(own_error), (case, bad_outcome)
        assert not bad_errs and not peer_errs, (case, bad_errs, peer_errs)
        if case.startswith("every rank"):
            assert peer_outcome.startswith(own_error) and peer_s < MAX_PEER_S, (case, peer_outcome, peer_s)
            for following in (bad_next, peer_next):  # nothing is left to report
                assert following is None or following[0] == "ok", (case, following)
            continue
        quote = re.escape(own_error)
        if call in HOST_READ:
            reported, reported_s = peer_outcome, peer_s
        else:  # no host read: the call returns, the next normal-mode dispatch raises on every rank
            assert peer_outcome == "ok" and peer_s < MAX_PEER_S, (case, peer_outcome, peer_s)
            reported, reported_s = peer_next
            next_outcome, next_s = bad_next
            assert re.match(r"RuntimeError: .*rank\(s\) \[0\] reported errors found on the device .*another "
                            r"rank's input failed a check", next_outcome), (case, next_outcome)
            assert next_s < MAX_PEER_S, (case, next_s)
        if "out of range" in case:  # found by a kernel: the flag names the rank and the problem
            assert re.match(rf"RuntimeError: .*rank\(s\) \[{BAD_RANK}\] reported errors found on the device "
                            rf"\(rank {BAD_RANK}: topk_idx: an expert id outside", reported), (case, reported)
        else:
            assert re.match(rf"PeerInputError: .*the input of rank {BAD_RANK} failed a check .*rank {BAD_RANK}"
                            rf"(?: in \w[\w ]*)?: {quote}", reported), (case, reported)
        assert reported_s < MAX_PEER_S, f"{case}: rank 0 took {reported_s:.2f} s to raise"


@pytest.mark.parametrize("backend,cases", [("cuda_cpu-nccl", list(CASES)), ("cuda_cpu-ipc", IPC_CASES)],
                         ids=["nccl", "ipc"])
def test_one_ranks_bad_input_raises_on_every_rank(pool_cache, backend, cases):
    results = pool_cache(2).run(job_peer_errors, backend, cases, timeout=240)
    _check(results, cases)


def main() -> None:
    """Prints, per backend and case, the seconds each rank took to raise (min-max over --repeats runs);
    the README's figures. Run with eplib built with EPLIB_CUDA_CPU=1, from the repository root:
    ``python tests/test_peer_errors_cuda_cpu.py --repeats 3``."""
    import argparse

    from dist_harness import RankPool

    parser = argparse.ArgumentParser(description=main.__doc__.split(";")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    pool = RankPool(2)
    try:
        for backend, cases in (("cuda_cpu-nccl", list(CASES)), ("cuda_cpu-ipc", IPC_CASES)):
            runs = [pool.run(job_peer_errors, backend, cases, timeout=240) for _ in range(args.repeats)]
            for case in cases:
                _check([run for run in runs[-1]], [case])
                for rank in (0, 1):
                    raised = [run[rank][case][0][1] for run in runs]  # the failing call
                    later = [run[rank][case][1][1] for run in runs if run[rank][case][1] is not None]
                    line = f"{backend:14} {case:36} rank {rank}: call {min(raised):.3f}-{max(raised):.3f} s"
                    if later:
                        line += f", next normal dispatch {min(later):.3f}-{max(later):.3f} s"
                    print(line, flush=True)
    finally:
        pool.close()


if __name__ == "__main__":
    main()
