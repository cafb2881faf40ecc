"""Prints the versions a GPU run depends on (tools/gpu_check.sh); exits 1 if eplib cannot use the GPU."""

import platform
import sys

import torch

import eplib


def main() -> int:
    print("python", platform.python_version())
    print("torch", torch.__version__, "cuda", torch.version.cuda)
    if not torch.cuda.is_available():
        print("torch sees no CUDA device")
        return 1
    print("gpu", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0))
    try:  # a tuple (major, minor, patch) in current torch, an int in old releases
        nccl = torch.cuda.nccl.version()
        nccl = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl)
    except Exception as error:  # noqa: BLE001 - a version report must not stop the run
        nccl = f"unknown ({type(error).__name__}: {error})"
    print("nccl", nccl, "(2.30+ allows several ranks on one GPU with NCCL_MULTI_RANK_GPU_ENABLE=1)")
    from eplib.buffer import describe_cuda_status

    # Both counts side by side: a driver older than eplib's (static) runtime shows as torch seeing
    # GPUs and eplib seeing an error.
    print("devices: torch sees", torch.cuda.device_count(), "| eplib's CUDA runtime sees", describe_cuda_status())
    print("eplib built_with_cuda", eplib._C.built_with_cuda(), "cuda_cpu_execution", eplib._C.cuda_cpu_execution(),
          "cuda_available", eplib._C.cuda_available())
    return 0 if eplib._C.cuda_available() else 1


if __name__ == "__main__":
    sys.exit(main())
