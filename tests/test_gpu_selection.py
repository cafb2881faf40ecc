"""Which transport a Buffer uses, and the errors for CUDA tensors where eplib cannot run them.
Runs on CPU-only machines (CUDA tensors are imitated by a Tensor subclass that reports cuda:0)."""

import re

import pytest
import torch

import eplib
from dist_harness import outcome
from gpu_harness import gpu_usable

CUDA_USABLE = gpu_usable()


class _FakeCudaTensor(torch.Tensor):
    """A CPU tensor that says it lives on cuda:0: enough to reach the Buffer's device checks."""

    @property
    def device(self):
        return torch.device("cuda", 0)


def job_selection(rank, R, group):
    fake_idx = torch.zeros(4, 2, dtype=torch.int64).as_subclass(_FakeCudaTensor)
    fake_x = torch.zeros(4, 8).as_subclass(_FakeCudaTensor)
    return {
        "unknown transport": outcome(lambda: eplib.Buffer(group, transport="rdma")),
        "ipc transport": outcome(lambda: eplib.Buffer(group, transport="ipc")),
        "nccl transport": outcome(lambda: eplib.Buffer(group, transport="nccl")),
        "cuda layout": outcome(lambda: eplib.Buffer(group).get_dispatch_layout(fake_idx, 2 * R)),
        "cuda dispatch": outcome(lambda: eplib.Buffer(group).dispatch(fake_x, handle=None)),
        "cuda on transport cpu": outcome(lambda: eplib.Buffer(group, transport="cpu").get_dispatch_layout(
            fake_idx, 2 * R)),
        "meta tensor": outcome(lambda: eplib.Buffer(group).get_dispatch_layout(
            torch.zeros(4, 2, dtype=torch.int64, device="meta"), 2 * R)),
        "previous_event type": outcome(lambda: eplib.Buffer(group).get_dispatch_layout(
            torch.zeros(4, 2, dtype=torch.int64), 2 * R, previous_event="event")),
        "comm stream": repr(eplib.Buffer(group).get_comm_stream()),
    }


@pytest.mark.skipif(CUDA_USABLE, reason="checks the errors of machines where eplib cannot use CUDA")
def test_transport_names_and_cuda_errors_without_cuda(pool2):
    no_cuda = r"ValueError: .*(built without CUDA kernels|no usable CUDA device)"
    expected = {
        "unknown transport": r"ValueError: transport: expected one of \('auto', 'cpu', 'nccl', 'ipc'\), got 'rdma'",
        "ipc transport": r"ValueError: transport='ipc': .*(built without CUDA kernels|no usable CUDA device)",
        "nccl transport": r"ValueError: transport='nccl': .*(built without CUDA kernels|no usable CUDA device)",
        "cuda layout": no_cuda,
        "cuda dispatch": no_cuda,
        "cuda on transport cpu": r"ValueError: topk_idx: this Buffer was made with transport='cpu'",
        "meta tensor": r"ValueError: topk_idx: expected a CPU or CUDA tensor, got a tensor on meta",
        "previous_event type": r"TypeError: previous_event: expected an eplib.EventOverlap or None, got str",
        "comm stream": r"^None$",
    }
    for rank, result in enumerate(pool2.run(job_selection)):
        for name, pattern in expected.items():
            assert re.search(pattern, result[name]), f"rank {rank} {name}: {result[name]!r} !~ {pattern!r}"
