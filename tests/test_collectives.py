"""Which collectives block the host: gloo always does; CUDA tensors on NCCL wait in stream order
unless the caller reads the result on the host next (host_wait=True)."""

import datetime

import pytest
import torch
import torch.distributed as dist

from eplib import collectives


class _Work:
    """Records how the collective was waited for."""

    def __init__(self) -> None:
        self.timeouts = []

    def wait(self, timeout=None):
        self.timeouts.append(timeout)
        return True


class _CudaLike:
    """Stands in for a CUDA tensor: the decision reads only ``is_cuda``."""

    is_cuda = True


@pytest.fixture
def backend(monkeypatch):
    name = {"value": "gloo"}
    monkeypatch.setattr(dist, "get_backend", lambda group=None: name["value"])
    return name


@pytest.mark.parametrize("backend_name, tensor, expect_stream", [
    ("gloo", torch.zeros(1), False),
    ("gloo", _CudaLike(), False),       # gloo's wait() blocks the host whatever the tensor
    ("nccl", torch.zeros(1), False),    # CPU tensors are never stream-ordered
    ("nccl", _CudaLike(), True),
    ("cpu:gloo,cuda:nccl", _CudaLike(), False),
])
def test_stream_ordered(backend, backend_name, tensor, expect_stream):
    backend["value"] = backend_name
    assert collectives.stream_ordered(tensor, group=object()) is expect_stream


@pytest.mark.parametrize("backend_name, host_wait, expect_timeout", [
    ("nccl", None, False),   # the Balancer's and tp's collectives on NCCL: no host wait
    ("nccl", True, True),    # a caller that reads the result next gets EPLIB_TIMEOUT_S
    ("gloo", None, True),
    ("gloo", False, False),
])
def test_finish_waits_on_the_host_only_where_needed(backend, backend_name, host_wait, expect_timeout):
    backend["value"] = backend_name

    class _Group:
        def rank(self):
            return 0

        def size(self):
            return 1

    work = _Work()
    collectives._finish(work, 7.0, _Group(), "test", _CudaLike(), host_wait)
    if expect_timeout:
        assert work.timeouts == [datetime.timedelta(seconds=7.0)]
    else:
        assert work.timeouts == [None]
