"""The nccl transport on the CPU execution of the CUDA sources (marker cuda_cpu; eplib built with
EPLIB_CUDA_CPU=1): the real NcclTransport with its real CUDA kernels, run by csrc/cuda_cpu, over the
gloo staging path, behind eplib.Buffer (tests/cuda_cpu.py).

Covers the counts records and their checks, split sizes, the padded (num_worst_tokens) slot exchange,
handles with device counts, cached dispatch, combine, and the error-flag protocol (which call raises,
on which rank, and that the flag is cleared), bit for bit against eplib.reference and, for fp32, the
cpu transport. The same cases run on a GPU in tests/test_gpu_buffer.py.
"""

import pytest

from dist_harness import base_case, fill_case
from gpu_harness import job_gpu_compare
from test_gpu_buffer import COMPARE_PARAMS, GPU_CASES, check_error_flag

pytestmark = pytest.mark.cuda_cpu


@pytest.mark.parametrize("name,against", COMPARE_PARAMS)
def test_nccl_cuda_cpu_equals_cpu_implementations(pool, name, against):
    """One run on the nccl transport, every output torch.equal to eplib.reference's and, for fp32, to the
    cpu transport's."""
    case = fill_case(base_case(**GPU_CASES[name]), pool.world_size)
    errs = pool.run(job_gpu_compare, "cuda_cpu-nccl", case, against, timeout=60)
    assert not any(errs), "\n".join(e for rank_errs in errs for e in rank_errs)


@pytest.mark.parametrize("world_size", [1, 2])
def test_nccl_cuda_cpu_error_flag(pool_cache, world_size):
    check_error_flag(pool_cache, "cuda_cpu-nccl", world_size)
