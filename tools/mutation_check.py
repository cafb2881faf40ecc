"""Breaks the CUDA sources on purpose, one mutation at a time, and checks that the named tests catch
each one when the sources run on the CPU execution (EPLIB_CUDA_CPU): the proof that the tests of a
protocol or kernel can fail.

Each mutation replaces one exact snippet of a file under csrc/ or python/ (it must occur exactly once,
so a change to the sources that moves the snippet fails loudly instead of testing nothing). The tool
copies csrc/, CMakeLists.txt and the Python package to a scratch directory, builds the native module
there with CMake (incrementally: only the mutated file recompiles), and runs the mutation's tests
with that module; the mutation is caught when they fail. Mutations marked ``tsan`` are caught by
ThreadSanitizer instead (a build with -fsanitize=thread; caught when a report names eplib's code).

Usage: python tools/mutation_check.py [--only NAME ...] [--scratch DIR] [--json OUT]
Takes about a minute per mutation on two cores.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Tuple

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Mutation:
    name: str
    path: str  # under the repository root
    old: str
    new: str
    tests: Tuple[str, ...]  # pytest node ids or -k expressions after "::" is not needed: passed as given
    tsan: bool = False


MUTATIONS: List[Mutation] = [
    Mutation("missing __syncthreads (the source table every thread reads)", "csrc/cuda/rows.cuh",
             "    compact_start[num_ranks] = start;\n  }\n  __syncthreads();",
             "    compact_start[num_ranks] = start;\n  }",
             ("tests/test_cuda_kernels.py::test_dispatch_pack_and_unpack",)),
    Mutation("release store turned into a plain store (publish_rows: a stream's tail)", "csrc/cuda/ipc.cuh",
             "  if (lane == 0) store_release_sys(tail, end);",
             "  if (lane == 0) *tail = end;",
             ("tests/test_ipc_cuda_cpu.py::test_ipc_cuda_cpu_replayed_rounds",), tsan=True),
    Mutation("off-by-one in a ring slot (dispatch and combine senders)", "csrc/cuda/ipc_exchange.cu",
             "    return ring_slot(*view, *rings, destination, view->rank, channel, sent);",
             "    return ring_slot(*view, *rings, destination, view->rank, channel, sent + 1);",
             ("tests/test_ipc_cuda_cpu.py::test_ipc_cuda_cpu_equals_reference",)),
    Mutation("wrong warp-scan offset (block_exclusive_sum)", "csrc/cuda/common.cuh",
             "    const int64_t other = __shfl_up_sync(kFullMask, inclusive, offset);",
             "    const int64_t other = __shfl_up_sync(kFullMask, inclusive, offset + 1);",
             ("tests/test_cuda_kernels.py::test_send_positions",)),
    Mutation("dropped error-flag bit (non-finite weight in dispatch_pack)", "csrc/cuda/dispatch.cu",
             "      if (args.topk_weights != nullptr && !isfinite(args.topk_weights[t * num_topk + k]))\n"
             "        set_error(args.error_flag, kErrorWeight);\n",
             "",
             ("tests/test_cuda_kernels.py::test_dispatch_pack_flags_bad_ids_and_weights",)),
    Mutation("last-block counter not reset (end_exchange)", "csrc/cuda/ipc.cuh",
             "  store_volatile(&own->blocks_finished, 0u);\n",
             "",
             ("tests/test_ipc_cuda_cpu.py::test_ipc_cuda_cpu_many_rounds",)),
    Mutation("dispatch receiver that does not wait for the close of a stream", "csrc/cuda/ipc_exchange.cu",
             "        if (mark < close_mark(round, false)) return false;\n",
             "",
             ("tests/test_ipc_cuda_cpu.py::test_ipc_cuda_cpu_streams_through_small_rings",
              "tests/test_ipc_cuda_cpu.py::test_ipc_cuda_cpu_equals_reference")),
    Mutation("sender that does not wait for its destination to be ready", "csrc/cuda/ipc_exchange.cu",
             "  if (!wait_ready(view, destination, round, kPhaseDispatchSend, lane)) return;\n",
             "",
             ("tests/test_ipc_cuda_cpu.py::test_ipc_cuda_cpu_streams_through_small_rings",)),
    Mutation("credit one ring ahead (combine: senders overwrite unread slots)", "csrc/cuda/ipc_exchange.cu",
             "if (!rejected[r]) store_release_sys(&header_of(view, r)->credit[view.rank][channel], base[r] + rows[r]);",
             "if (!rejected[r]) store_release_sys(&header_of(view, r)->credit[view.rank][channel], base[r] + rows[r] + rings.num_slots);",
             ("tests/test_ipc_cuda_cpu.py::test_ipc_cuda_cpu_streams_through_small_rings",)),
    Mutation("credit returned before the warp read the rows (dispatch receiver)", "csrc/cuda/ipc_exchange.cu",
             "    __syncwarp();  // every lane has read the rows before their slots are handed back\n",
             "",
             ("tests/test_ipc_cuda_cpu.py::test_ipc_cuda_cpu_streams_through_small_rings",), tsan=True),
    Mutation("16-byte copy taken on a misaligned row (warp_copy)", "csrc/cuda/common.cuh",
             "  if (alignment % 16 == 0) {\n    warp_copy_vectors<int4>",
             "  if (alignment % 8 == 0) {\n    warp_copy_vectors<int4>",
             ("tests/test_cuda_kernels.py::test_dispatch_pack_and_unpack",)),
    Mutation("notify tables single-buffered (parity ignored)", "csrc/cuda/ipc_buffer.cu",
             "  const int parity = static_cast<int>(notify_round & 1);",
             "  const int parity = 0;",
             ("tests/test_ipc_cuda_cpu.py::test_ipc_cuda_cpu_notify_tables",)),
    Mutation("no poison after a failed exchange (end_exchange)", "csrc/cuda/ipc.cuh",
             "  if (ipc_aborted(view) || (n != 0 && load_volatile(&own_header(view)->rejected) == n)) poison();\n",
             "",
             ("tests/test_ipc_cuda_cpu.py::test_ipc_cuda_cpu_outputs_poisoned_after_timeout",)),
    Mutation("stale last error left for the next launch (wait_notify and launch keep it)", "csrc/cuda/ipc_buffer.cu",
             "      (void)cudaGetLastError();  // \"not ready\" is an answer, not an error for the next launch\n",
             "",
             ("tests/test_ipc_cuda_cpu.py::test_ipc_cuda_cpu_not_ready_answers_and_preloaded_kernels",)),
    Mutation("FP8 scales read as row-major whatever their strides (write_dispatch_row)", "csrc/cuda/rows.cuh",
             "  if (args.scales_column_stride == 1) {",
             "  if (true) {",
             ("tests/test_cuda_kernels.py::test_dispatch_pack_reads_scales_through_strides",)),
    Mutation("notify record that drops the host's REJECTED mark (ipc: one rank's bad input)", "csrc/cuda/ipc_buffer.cu",
             "      if (f == 0) value = *error_flag;",
             "      if (f == 0) value = *error_flag & 0xFFFF;",
             ("tests/test_peer_errors_cuda_cpu.py::test_one_ranks_bad_input_raises_on_every_rank[ipc]",)),
    Mutation("rejected close ignored by the receiver (ipc dispatch: a peer's input rejected)", "csrc/cuda/ipc_exchange.cu",
             "  if (lane == 0 && !exchange.rejected && mark == close_mark(round, true))\n",
             "  if (false)\n",
             ("tests/test_peer_errors_cuda_cpu.py::test_one_ranks_bad_input_raises_on_every_rank[ipc]",)),
    Mutation("rejected close ignored by the receiver (ipc combine: waits for rows that never come)",
             "csrc/cuda/ipc_exchange.cu",
             "      rejected[r] = load_acquire_sys(closed) == close_mark(round, true);\n      return rejected[r];\n",
             "      return false;\n",
             ("tests/test_peer_errors_cuda_cpu.py::test_one_ranks_bad_input_raises_on_every_rank[ipc]",)),
    Mutation("rejected participant does not drain (ipc dispatch)", "csrc/cuda/ipc_exchange.cu",
             "    else receive_dispatch(unpack, layout, view, rings, exchange, round, warp, channel, compact_start, lane);",
             "    else if (!exchange.rejected) receive_dispatch(unpack, layout, view, rings, exchange, round, warp, channel, compact_start, lane);",
             ("tests/test_peer_errors_cuda_cpu.py::test_one_ranks_bad_input_raises_on_every_rank[ipc]",)),
    Mutation("rejected participant does not drain (ipc combine)", "csrc/cuda/ipc_exchange.cu",
             "    if (warp < view.num_ranks) follow_stream(view, round, warp, channel, kPhaseCombineReceive, lane, [](uint64_t, uint64_t) {});",
             "",
             ("tests/test_peer_errors_cuda_cpu.py::test_one_ranks_bad_input_raises_on_every_rank[ipc]",)),
    Mutation("rejected round's outputs not poisoned (end_exchange)", "csrc/cuda/ipc.cuh",
             "  if (ipc_aborted(view) || (n != 0 && load_volatile(&own_header(view)->rejected) == n)) poison();\n",
             "  if (ipc_aborted(view)) poison();\n",
             ("tests/test_ipc_cuda_cpu.py::test_ipc_cuda_cpu_rejected_round_poisons_only_its_outputs",)),
    Mutation("rejections seen by a call without a host sync not kept (nccl: one rank's bad input)",
             "python/eplib/transports/nccl.py",
             "        torch.where(rejected, heads, self._rejections, out=self._rejections)",
             "        pass",
             ("tests/test_peer_errors_cuda_cpu.py::test_one_ranks_bad_input_raises_on_every_rank[nccl]",)),
    # The ipc transport's low-latency protocol (csrc/cuda/low_latency_ipc.h). Its flag steps are kernels of
    # their own, ordered with the row kernels by the stream, and its flags cross processes: a release store
    # turned into a plain one changes nothing the CPU execution can see (x86 keeps the order, and
    # ThreadSanitizer sees within one process only), so that mutation is left to the GPU.
    Mutation("low-latency receiver that does not wait for the arrival flag", "csrc/cuda/low_latency_ipc.cu",
             "      if (live && wait_for_peer(view, args, &own->arrived[b][peer], round, kPhaseLowLatencyReceive, peer) &&",
             "      if (live && true &&",
             ("tests/test_low_latency_cuda_cpu.py::test_low_latency_cuda_cpu_staggered",)),
    Mutation("low-latency sender that does not wait for its destination to free the slot", "csrc/cuda/low_latency_ipc.cu",
             "      if (live) wait_for_peer(view, args, &ll_flags(view, peer)->freed[b], round - 1, kPhaseLowLatencySend, peer);\n",
             "",
             ("tests/test_low_latency_cuda_cpu.py::test_low_latency_cuda_cpu_staggered",)),
    Mutation("low-latency freed flag raised before the unpack finished", "python/eplib/transports/low_latency_cuda.py",
             "                self._after_receive(buffer_index)\n                events.append(streams.finish(async_finish, outputs",
             "                events.append(streams.finish(async_finish, outputs",
             ("tests/test_low_latency_cuda_cpu.py::test_low_latency_cuda_cpu_staggered",)),
    Mutation("low-latency round number off by one (arrival flag one round ahead)", "csrc/cuda/low_latency_ipc.cu",
             "(args.step == kLLPublishArrived ? 0 : 1)",
             "(args.step == kLLPublishArrived ? 1 : 1)",
             ("tests/test_low_latency_cuda_cpu.py::test_low_latency_cuda_cpu_staggered",)),
    Mutation("low-latency combine sums the slots in another order", "csrc/cuda/low_latency.cu",
             "      for (int k = 0; k < num_topk; ++k) {\n        const int64_t expert = args.topk_idx[t * num_topk + k];",
             "      for (int k = num_topk - 1; k >= 0; --k) {\n        const int64_t expert = args.topk_idx[t * num_topk + k];",
             ("tests/test_low_latency_cuda_cpu.py::test_low_latency_cuda_cpu_equals_reference",)),
]
# Mutations that need a second edit (either one alone is not the mutation).
EXTRA_EDITS = {
    "low-latency freed flag raised before the unpack finished":
        ("python/eplib/transports/low_latency_cuda.py",
         "                self._before_receive(buffer_index, call.wait_stats)\n                self._launch(_C.cuda_ll_dispatch_unpack",
         "                self._before_receive(buffer_index, call.wait_stats)\n                self._after_receive(buffer_index)\n"
         "                self._launch(_C.cuda_ll_dispatch_unpack"),
    # The launch helper's clear removed too (either one alone is enough).
    "stale last error left for the next launch (wait_notify and launch keep it)":
        ("csrc/cuda/common.cuh", "  (void)cudaGetLastError();\n#if defined(__CUDACC__)", "#if defined(__CUDACC__)"),
}


def replace_once(text: str, old: str, new: str, where: str) -> str:
    count = text.count(old)
    if count != 1:
        raise SystemExit(f"mutation_check: the snippet occurs {count} times in {where} (expected once):\n{old}")
    return text.replace(old, new)


def build(scratch: Path, sanitize: str) -> Path:
    """Builds _C from scratch/ into scratch/build-<flavour>; returns the package directory to import."""
    import pybind11

    flavour = sanitize or "plain"
    build_dir = scratch / f"build-{flavour}"
    subprocess.run(["cmake", "-S", str(scratch), "-B", str(build_dir), "-G", "Ninja", "-DEPLIB_CUDA_CPU=ON",
                    f"-DEPLIB_SANITIZE={sanitize}", "-DCMAKE_BUILD_TYPE=RelWithDebInfo",
                    f"-Dpybind11_DIR={pybind11.get_cmake_dir()}", f"-DPython_EXECUTABLE={sys.executable}"],
                   check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(build_dir), "--parallel", str(os.cpu_count() or 1)], check=True,
                   stdout=subprocess.DEVNULL)
    package = scratch / f"package-{flavour}"
    shutil.rmtree(package, ignore_errors=True)
    shutil.copytree(scratch / "python" / "eplib", package / "eplib")
    for stale in (package / "eplib").glob("_C*.so"):
        stale.unlink()
    for module in build_dir.glob("_C*.so"):
        shutil.copy(module, package / "eplib")
    return package


def run_tests(package: Path, tests, tsan: bool, reports: Path) -> Tuple[bool, str]:
    """(caught, evidence): the tests failed, or (tsan) ThreadSanitizer reported a race in eplib's code."""
    env = {**os.environ, "EPLIB_CUDA_CPU": "1", "EPLIB_TIMEOUT_S": "5",
           "PYTHONPATH": f"{package}{os.pathsep}{ROOT / 'tests'}"}
    if tsan:
        shutil.rmtree(reports, ignore_errors=True)
        reports.mkdir(parents=True)
        env["LD_PRELOAD"] = subprocess.run(["gcc", "-print-file-name=libtsan.so"], capture_output=True,
                                           text=True, check=True).stdout.strip()
        env["TSAN_OPTIONS"] = (f"log_path={reports}/tsan suppressions={ROOT / 'tools' / 'tsan.supp'} "
                               f"report_thread_leaks=0")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-3:])
    if not tsan:
        return result.returncode != 0, tail
    races = [line for path in reports.glob("tsan*") for line in path.read_text().splitlines()
             if "csrc/" in line]
    return bool(races), (races[0].strip() if races else "no ThreadSanitizer report names eplib's code")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", help="names (substrings) of the mutations to run")
    parser.add_argument("--scratch", default=str(ROOT / "build" / "mutations"))
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    scratch = Path(args.scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    for part in ("csrc", "python"):
        shutil.rmtree(scratch / part, ignore_errors=True)
        shutil.copytree(ROOT / part, scratch / part, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    shutil.copy(ROOT / "CMakeLists.txt", scratch / "CMakeLists.txt")
    selected = [m for m in MUTATIONS if not args.only or any(o in m.name for o in args.only)]
    results = []
    for mutation in selected:
        edits = [(mutation.path, mutation.old, mutation.new)]
        if mutation.name in EXTRA_EDITS:
            edits.append(EXTRA_EDITS[mutation.name])
        originals = {}
        for path, old, new in edits:
            target = scratch / path
            originals.setdefault(path, target.read_text())
            target.write_text(replace_once(target.read_text(), old, new, path))
        start = time.monotonic()
        try:
            package = build(scratch, "thread" if mutation.tsan else "")
            caught, evidence = run_tests(package, mutation.tests, mutation.tsan, scratch / "tsan-reports")
        finally:
            for path, text in originals.items():
                (scratch / path).write_text(text)
        seconds = time.monotonic() - start
        results.append(dict(mutation=mutation.name, tests=list(mutation.tests), tsan=mutation.tsan, caught=caught,
                            evidence=evidence, seconds=round(seconds, 1)))
        print(f"{'CAUGHT' if caught else 'MISSED'}  {mutation.name}  ({seconds:.0f} s)\n    by {', '.join(mutation.tests)}"
              f"{' under ThreadSanitizer' if mutation.tsan else ''}\n    {evidence.splitlines()[-1] if evidence else ''}",
              flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0 if all(r["caught"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
