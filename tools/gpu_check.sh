#!/usr/bin/env bash
# Everything eplib checks on a GPU, in one go: tools/gpu_check.sh OUTDIR
#
# For a GPU machine without network access where CUDA, torch (CUDA build) and Python are already
# installed (for example CUDA 13, torch 2.11+cu130, Python 3.12). Steps, each under `timeout` and
# each run even when an earlier one failed:
#   build          pip install --no-build-isolation --no-deps -e . (EPLIB_CUDA=1, the device's arch)
#   env            GPU, driver, CUDA, torch and NCCL versions
#   pytest_gpu     every test marked gpu (junit XML + log), the IPC transport's included
#   bench_ipc      torchrun (python -m torch.distributed.run, 1 process) benchmarks/bench_dispatch.py
#                  --transport ipc --json: the goal shapes (T=4096 and 128, H=7168, top-8 of 256, bf16),
#                  checked against eplib.reference, copy efficiency against torch copy_, launch time
#   bench_ipc_2p   the same with 2 processes on the GPU: the reference check only (processes on one GPU
#                  time-slice, so it reports no timings)
#   bench_kernels  benchmarks/bench_kernels.py --json
#   memcheck       tools/sanitizer_case.py under compute-sanitizer --tool memcheck
#   bench_dispatch torchrun, 1 process, benchmarks/bench_dispatch.py --transport nccl --quick --json
#   bench_ll_nccl  torchrun, 1 process, benchmarks/bench_dispatch.py --mode ll --transport nccl --quick: the
#                  low-latency calls beside the normal mode, with their correctness guard
#   bench_ll_ipc   the same on the ipc transport with 2 processes on the GPU (guard; timings time-slice)
#   racecheck      tools/sanitizer_case.py under compute-sanitizer --tool racecheck (if time is left)
# Steps run in order of what the run must not miss; later ones are the first to be cut.
# The whole run stops starting steps past TOTAL_LIMIT_S (7.5 minutes); each step's limit is cut to
# the time left. OUTDIR gets one log per step, the JSON and XML outputs, and summary.txt
# ("step status seconds"). Exit status: 0 when every step passed, 1 otherwise, 2 on bad usage.

# The step functions run through run_step's `bash -c` (exported), which shellcheck cannot see:
# shellcheck disable=SC2329
set -uo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: $0 OUTDIR" >&2
    exit 2
fi
OUT=$(mkdir -p "$1" && cd "$1" && pwd) || { echo "cannot create $1" >&2; exit 2; }
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2

TOTAL_LIMIT_S=450
START_S=$SECONDS
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
FAILED=0

PYTHON=${PYTHON:-python3}
# nvcc and compute-sanitizer live in the toolkit, which is not always on PATH.
for dir in "${CUDA_HOME:-}" /usr/local/cuda; do
    if [[ -n "$dir" && -d "$dir/bin" ]]; then
        PATH="$PATH:$dir/bin"
    fi
done
export PATH
export EPLIB_TIMEOUT_S=${EPLIB_TIMEOUT_S:-60}

# run_step NAME LIMIT_S COMMAND...: runs COMMAND with its output in OUT/NAME.log, under a limit cut
# to the time left, and records the outcome in the summary.
run_step() {
    local name=$1 limit=$2
    shift 2
    local left=$((TOTAL_LIMIT_S - (SECONDS - START_S)))
    if ((left < 15)); then
        echo "== $name: skipped, out of time" | tee -a "$OUT/$name.log"
        printf '%-15s %-22s %5s\n' "$name" "SKIPPED(out of time)" 0 >> "$SUMMARY"
        FAILED=1
        return
    fi
    ((limit > left - 5)) && limit=$((left - 5))
    echo "== $name (limit ${limit}s)"
    local began=$SECONDS status
    # bash -c runs the shell functions below as well as plain commands (they are exported).
    timeout --kill-after=10 "$limit" bash -c '"$@"' "$name" "$@" > "$OUT/$name.log" 2>&1
    status=$?
    local took=$((SECONDS - began))
    local outcome=PASS
    if ((status == 124 || status == 137)); then
        outcome="TIMEOUT(${limit}s)"
    elif ((status == 3)) && grep -q "not supported in this sandbox" "$OUT/$name.log"; then
        outcome="UNSUPPORTED(sandbox)"
    elif ((status != 0)); then
        outcome="FAIL(rc=$status)"
    fi
    [[ $outcome != PASS ]] && FAILED=1
    printf '%-15s %-22s %5s\n' "$name" "$outcome" "$took" | tee -a "$SUMMARY"
    tail -n 5 "$OUT/$name.log" | sed 's/^/   | /'
}

# The device's compute capability as CMake wants it ("90" for sm_90); 90 when torch cannot tell.
ARCH=$("$PYTHON" -c 'import torch; major, minor = torch.cuda.get_device_capability(0); print(f"{major}{minor}")' \
       2> "$OUT/arch.log" | tail -n 1)
[[ $ARCH =~ ^[0-9]+$ ]] || ARCH=90
echo "building for sm_$ARCH"

build() {
    EPLIB_CUDA=1 EPLIB_CUDA_ARCHS="$ARCH" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
        "$PYTHON" -m pip install --no-build-isolation --no-deps -v -e .
}

environment() {
    nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv
    nvcc --version | tail -n 2
    compute-sanitizer --version | head -n 2
    "$PYTHON" tools/gpu_env.py
}

sanitize() {
    # One cudaMalloc per tensor, so that an access past a tensor leaves its allocation.
    local log status
    log=$(mktemp)
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool "$1" --error-exitcode 1 \
        "$PYTHON" tools/sanitizer_case.py 2>&1 | tee "$log"
    status=${PIPESTATUS[0]}
    # Some sandboxes (gVisor) refuse the sanitizer: say so instead of a bare failure of eplib.
    if ((status != 0)) && grep -q "Device not supported" "$log"; then
        echo "compute-sanitizer: the device is not supported in this sandbox (not an eplib failure)"
        status=3
    fi
    rm -f "$log"
    return "$status"
}

export PYTHON ARCH
export -f build environment sanitize

run_step build 180 build
run_step env 20 environment
# -v: each test's outcome is in the log as it finishes, even if the step is cut off at its limit.
run_step pytest_gpu 210 "$PYTHON" -m pytest -m gpu -v -ra --durations=15 -p no:cacheprovider \
    --junitxml="$OUT/pytest_gpu.xml" tests
# torch.distributed.run is torchrun, without relying on the venv's bin folder being on PATH.
run_step bench_ipc 60 "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node=1 \
    benchmarks/bench_dispatch.py --transport ipc --json "$OUT/bench_ipc.json"
run_step bench_ipc_2p 60 "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node=2 \
    benchmarks/bench_dispatch.py --transport ipc --routing uniform,hot --json "$OUT/bench_ipc_2p.json"
run_step bench_kernels 60 "$PYTHON" benchmarks/bench_kernels.py --json "$OUT/bench_kernels.json"
run_step memcheck 90 sanitize memcheck
run_step bench_dispatch 45 "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node=1 \
    benchmarks/bench_dispatch.py \
    --transport nccl --quick --json "$OUT/bench_dispatch.json"
run_step bench_ll_nccl 45 "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node=1 \
    benchmarks/bench_dispatch.py --mode ll --transport nccl --quick --json "$OUT/bench_ll_nccl.json"
run_step bench_ll_ipc 60 "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node=2 \
    benchmarks/bench_dispatch.py --mode ll --transport ipc --quick --json "$OUT/bench_ll_ipc.json"
run_step racecheck 60 sanitize racecheck

echo "== total $((SECONDS - START_S))s; summary in $SUMMARY"
cat "$SUMMARY"
exit "$FAILED"
