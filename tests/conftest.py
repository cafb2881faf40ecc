"""Session-wide rank pools for the multi-rank tests (see dist_harness.py), and the rules of the
`cuda_cpu` marker: tests that execute the CUDA sources on the CPU (eplib built with EPLIB_CUDA_CPU=1)
skip on other builds, and fail instead when EPLIB_CUDA_CPU=1 says that build was asked for."""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile

import pytest

_HERE = os.path.dirname(os.path.abspath(__file__))
# Let the tests import eplib from the source tree when it is not installed (reference tests
# need no native build). Spawned ranks inherit sys.path, so they see the same eplib.
if importlib.util.find_spec("eplib") is None:
    sys.path.insert(0, os.path.join(os.path.dirname(_HERE), "python"))
if _HERE not in sys.path:  # workers unpickle jobs by module name (test_*.py, dist_harness)
    sys.path.insert(0, _HERE)

from dist_harness import RankPool  # noqa: E402


@pytest.fixture(scope="session")
def pool_cache():
    """get(world_size) -> a RankPool, created on first use and closed at session end."""
    pools = {}

    def get(world_size: int) -> RankPool:
        if world_size not in pools:
            pools[world_size] = RankPool(world_size)
        return pools[world_size]

    yield get
    for p in pools.values():
        p.close()


@pytest.fixture(scope="session")
def pool2(pool_cache) -> RankPool:
    return pool_cache(2)


@pytest.fixture(scope="session")
def pool4(pool_cache) -> RankPool:
    return pool_cache(4)


@pytest.fixture(scope="session", params=[2, 4], ids=["R2", "R4"])
def pool(request, pool_cache) -> RankPool:
    """The test runs once on the 2-rank pool and once on the 4-rank pool."""
    return pool_cache(request.param)


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    """Run a native-kernel test single-threaded and with the parallel path forced on."""
    from eplib import _C

    previous = _C.get_num_threads()
    _C.set_num_threads(request.param)
    yield request.param
    _C.set_num_threads(previous)


# Every process of the session (spawned ranks inherit it) logs the kernels it launches on the CPU
# execution here, for tests/test_cuda_cpu_coverage.py.
os.environ.setdefault("EPLIB_CUDA_CPU_LAUNCH_LOG", tempfile.mkdtemp(prefix="eplib-launches-"))


def pytest_configure(config):
    config.cuda_cpu_selection = {"modules": set(), "deselected": 0}


def pytest_deselected(items):
    config = items[0].config if items else None
    if config is not None:
        config.cuda_cpu_selection["deselected"] += sum(1 for i in items if i.get_closest_marker("cuda_cpu"))


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(session, config, items):
    """Notes the files of the cuda_cpu tests that will run; the kernel-coverage check runs after all of them."""
    config.cuda_cpu_selection["modules"] = {i.path.name for i in items if i.get_closest_marker("cuda_cpu")}
    last = [i for i in items if i.get_closest_marker("after_cuda_cpu_suite")]
    items[:] = [i for i in items if not i.get_closest_marker("after_cuda_cpu_suite")] + last


def pytest_runtest_setup(item):
    if item.get_closest_marker("gpu") is not None:
        _fail_if_eplib_misses_the_gpu()
    if item.get_closest_marker("cuda_cpu") is None:
        return
    from eplib import _C

    if _C.cuda_cpu_execution():
        return
    if os.environ.get("EPLIB_CUDA_CPU") == "1":
        pytest.fail("EPLIB_CUDA_CPU=1 asks for the CPU execution of the CUDA sources, but eplib._C is another build: "
                    "reinstall with `EPLIB_CUDA_CPU=1 pip install -e .`")
    pytest.skip("needs eplib built with EPLIB_CUDA_CPU=1 (the CPU execution of the CUDA sources)")


def _fail_if_eplib_misses_the_gpu() -> None:
    """A `gpu` test fails, rather than skips, where torch sees a GPU that eplib cannot use (no CUDA
    build, or eplib's own CUDA runtime answers an error such as a driver older than the runtime)."""
    import torch

    from eplib import _C
    from eplib.buffer import describe_cuda_status

    if torch.cuda.is_available() and not _C.cuda_available():
        pytest.fail(f"torch sees {torch.cuda.device_count()} GPU(s) but eplib cannot use them: built_with_cuda="
                    f"{_C.built_with_cuda()}, cuda_cpu_execution={_C.cuda_cpu_execution()}; eplib's CUDA runtime: "
                    f"{describe_cuda_status()}")
