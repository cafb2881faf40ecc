#!/usr/bin/env bash
# ThreadSanitizer run of the CPU execution of the CUDA sources (csrc/cuda_cpu): builds eplib's native
# module with EPLIB_CUDA_CPU=ON and -fsanitize=thread into a scratch directory, puts it in a copy of
# the Python package, and runs the ipc protocol's tests at 2 and 4 ranks (plus the CPU execution's own
# runtime tests) in processes that load libtsan. Every process writes its reports to $OUT/tsan.<pid>;
# the check passes when there is none. Suppressions, each with its reason: tools/tsan.supp.
#
# Usage: tools/tsan_check.sh [OUT]     (OUT defaults to build/tsan-reports; run from any directory)
# Needs: gcc's libtsan, cmake, ninja and the project's test dependencies in the current Python.
# Sanitizers instrument only eplib: races inside torch or Python are not looked for, and TSan sees
# within one process only (the rank processes' shared memory is outside its view).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT=$(realpath -m "${1:-build/tsan-reports}")
BUILD="$ROOT/build/tsan"
PYTHON=${PYTHON:-python}
TESTS=(tests/test_ipc_cuda_cpu.py tests/test_cuda_cpu_runtime.py tests/test_low_latency_cuda_cpu.py)
# A selection sized for CI: rows streaming through small rings (2 channels; wrap-around, senders
# blocked on credits) under random stalls at 2 and 4 ranks, and at 2 ranks (1 too for the replays) two
# contract cases, the replayed rounds, the notify tables under a slow reader, the timeout that poisons,
# a round rejected by one rank (no rows from it, its drain), the runtime state and the executor's own
# tests; the low-latency ipc protocol at 2 ranks (FP8 UE8M0
# rows, and ranks out of step). The default configs' 10 channels at 4 ranks (2560
# fibers per exchange kernel per rank) outlast the tests' timeouts under ThreadSanitizer on two cores.
# EPLIB_TSAN_SELECT="" runs every test of the two files.
SELECT=${EPLIB_TSAN_SELECT-"(equals_reference and R2 and (fp32-uniform or bf16-hot-bias_tuple-num_worst)) or (streams_through and random_stalls) or (replayed and not 4) or (notify_tables and R2) or runtime or poisoned or rejected_round or (low_latency_cuda_cpu and cuda_cpu-ipc and (staggered or (equals_reference and R2 and fp8-ue8m0)))"}

LIBTSAN=$(gcc -print-file-name=libtsan.so)
[ -e "$LIBTSAN" ] || { echo "tsan_check: gcc's libtsan.so not found" >&2; exit 2; }

cmake -S "$ROOT" -B "$BUILD" -G Ninja -DEPLIB_CUDA_CPU=ON -DEPLIB_SANITIZE=thread -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -Dpybind11_DIR="$("$PYTHON" -c 'import pybind11; print(pybind11.get_cmake_dir())')" \
  -DPython_EXECUTABLE="$(command -v "$PYTHON")" >/dev/null
cmake --build "$BUILD" --parallel "$(nproc)"
rm -rf "$BUILD/package" && mkdir -p "$BUILD/package"
cp -r "$ROOT/python/eplib" "$BUILD/package/eplib"
rm -f "$BUILD/package/eplib"/_C*.so
cp "$BUILD"/_C*.so "$BUILD/package/eplib/"

rm -rf "$OUT" && mkdir -p "$OUT"
# report_thread_leaks=0: the executor's worker threads live until the process exits, by design.
export TSAN_OPTIONS="log_path=$OUT/tsan suppressions=$ROOT/tools/tsan.supp report_thread_leaks=0 halt_on_error=0 ${TSAN_OPTIONS:-}"
export PYTHONPATH="$BUILD/package:$ROOT/tests${PYTHONPATH:+:$PYTHONPATH}"
export EPLIB_CUDA_CPU=1
status=0
LD_PRELOAD="$LIBTSAN" "$PYTHON" -m pytest -q -p no:cacheprovider ${SELECT:+-k "$SELECT"} "${TESTS[@]}" || status=$?
reports=$(ls "$OUT" | grep -c '^tsan' || true)
echo "tsan_check: pytest exit $status, $reports ThreadSanitizer report file(s) in $OUT"
if [ "$reports" -gt 0 ]; then
  grep -h -A3 "WARNING: ThreadSanitizer" "$OUT"/tsan* | head -60
  exit 1
fi
exit "$status"
