"""eplib.ops: dispatch and combine as autograd functions, checked on real rank processes.

The function under test is a round trip: dispatch, a receiver-side function that depends on the
receiving rank and is quadratic in (x, weights), combine. Each rank's output then depends only on
its own inputs, so torch.autograd.gradcheck can run on all ranks at once, each perturbing its own
inputs, while both backwards (combine of gradients, cached dispatch) run as collectives.
"""

import pytest
import torch

RECEIVER_OFFSET = 0.5  # receiving rank d multiplies by (sum of its weights + RECEIVER_OFFSET * (d + 1))


def _inputs(seed: int, rank: int, num_tokens: int, hidden: int, num_topk: int, num_experts: int,
            dtype: torch.dtype):
    """Dyadic x and weights (exact in float32, so the weights' float32 transport loses nothing)
    and distinct expert ids per token with some masked slots."""
    gen = torch.Generator().manual_seed(seed * 1009 + rank)
    topk_idx = torch.stack([torch.randperm(num_experts, generator=gen)[:num_topk] for _ in range(num_tokens)])
    topk_idx[torch.rand(num_tokens, num_topk, generator=gen) < 0.2] = -1
    x = (torch.randint(-16, 17, (num_tokens, hidden), generator=gen) / 16).to(dtype)
    weights = (torch.randint(1, 17, (num_tokens, num_topk), generator=gen) / 16).to(
        torch.float64 if dtype == torch.float64 else torch.float32)
    return x, topk_idx, weights


def _round_trip(buffer, x, topk_idx, weights, num_experts):
    from eplib import ops

    recv_x, recv_topk_idx, recv_weights, _, handle = ops.dispatch(buffer, x, topk_idx, weights, num_experts)
    assert recv_weights.dtype == weights.dtype
    factor = recv_weights.sum(-1, keepdim=True) + RECEIVER_OFFSET * (buffer.rank + 1)
    return ops.combine(buffer, (recv_x * factor.to(recv_x.dtype)).contiguous(), handle)


def _local_round_trip(x, topk_idx, weights, num_experts, num_ranks):
    """The same function on one process: token t gets, from each rank d owning one of its experts,
    x[t] * (sum of its weights for d's experts + offset * (d + 1))."""
    num_local = num_experts // num_ranks
    owner = torch.where(topk_idx >= 0, topk_idx // num_local, -1)
    out = torch.zeros_like(x, dtype=torch.float64)
    for d in range(num_ranks):
        goes = (owner == d).any(-1, keepdim=True)
        factor = (weights * (owner == d)).sum(-1, keepdim=True) + RECEIVER_OFFSET * (d + 1)
        out = out + torch.where(goes, x.double() * factor.double(), torch.zeros_like(out))
    return out


def job_gradcheck(rank, world_size, group, seed):
    import eplib

    buffer = eplib.Buffer(group)
    num_experts = 2 * world_size
    x, topk_idx, weights = _inputs(seed, rank, 4, 3, 3, num_experts, torch.float64)
    x.requires_grad_()
    weights.requires_grad_()
    # eps = 2^-10 keeps every perturbed input dyadic, and central differences are exact on a
    # function quadratic in its inputs: any mismatch is a wrong backward, not rounding.
    return torch.autograd.gradcheck(lambda a, b: _round_trip(buffer, a, topk_idx, b, num_experts), (x, weights),
                                    eps=2.0 ** -10, atol=1e-9, rtol=1e-6, check_batched_grad=False)


def test_dispatch_combine_gradcheck_float64_two_ranks(pool2):
    assert pool2.run(job_gradcheck, 3) == [True, True]


def job_grads_match_local(rank, world_size, group, seed, dtype_name):
    import eplib

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    buffer = eplib.Buffer(group)
    num_experts = 2 * world_size
    x, topk_idx, weights = _inputs(seed, rank, 37, 8, 4, num_experts, dtype)
    upstream = _inputs(seed + 1, rank, 37, 8, 4, num_experts, torch.float32)[0]
    grads = []
    for fn in (lambda a, b: _round_trip(buffer, a, topk_idx, b, num_experts),
               lambda a, b: _local_round_trip(a, topk_idx, b, num_experts, world_size)):
        a, b = x.clone().requires_grad_(), weights.clone().requires_grad_()
        out = fn(a, b)
        (out.double() * upstream.double()).sum().backward()
        grads.append((out.detach().double(), a.grad.double(), b.grad.double()))
    return grads


@pytest.mark.parametrize("dtype_name", ["fp32", "bf16"])
def test_dispatch_combine_gradients_match_single_process_function(pool4, dtype_name):
    for (out, grad_x, grad_w), (ref_out, ref_grad_x, ref_grad_w) in pool4.run(job_grads_match_local, 5, dtype_name):
        # Inputs are dyadic, so the forward is exact in fp32; in bf16 the products round once.
        tolerance = 0 if dtype_name == "fp32" else 2e-2
        torch.testing.assert_close(out, ref_out, atol=tolerance, rtol=tolerance)
        torch.testing.assert_close(grad_x, ref_grad_x, atol=tolerance, rtol=1e-6 if tolerance == 0 else tolerance)
        torch.testing.assert_close(grad_w, ref_grad_w, atol=1e-5 + tolerance, rtol=1e-5 + tolerance)
        assert grad_w.abs().sum() > 0 and grad_x.abs().sum() > 0


def _handles():
    """DispatchHandles of the three forms: host counts (cpu transport), device counts (a padded,
    num_worst_tokens dispatch), and with the ipc transport's per-channel counts."""
    from eplib import DispatchHandle

    prefix = torch.tensor([[1, 2], [3, 3]], dtype=torch.int32)
    sent = torch.tensor([1, 2], dtype=torch.int32)
    tensors = dict(rank_prefix_matrix=prefix, device_send_counts=sent, recv_src_idx=torch.arange(4, dtype=torch.int32),
                   is_token_in_rank=torch.ones(3, 2, dtype=torch.bool),
                   send_pos=torch.arange(6, dtype=torch.int32).view(3, 2), hidden=16)
    host = DispatchHandle(send_counts=(1, 2), recv_counts=(3, 1), num_recv_tokens=4, **tensors)
    padded = DispatchHandle(send_counts=sent, recv_counts=torch.tensor([3, 1], dtype=torch.int32),
                            num_recv_tokens=torch.tensor([4], dtype=torch.int32), slot_rows=2,
                            device_recv_counts=torch.tensor([3, 1], dtype=torch.int32), **tensors)
    channels = DispatchHandle(send_counts=(1, 2), recv_counts=(3, 1), num_recv_tokens=4,
                              device_recv_counts=torch.tensor([3, 1], dtype=torch.int32),
                              channel_counts=torch.tensor([[1, 2, 0], [1, 0, 0]], dtype=torch.int32), **tensors)
    return {"host": host, "padded": padded, "channels": channels}


ATTRIBUTES = ("send_counts", "recv_counts", "num_recv_tokens", "hidden", "slot_rows", "device_recv_counts",
              "channel_counts")


@pytest.mark.parametrize("form", ["host", "padded", "channels"])
def test_tensor_handle_round_trip(form):
    """eplib's custom ops carry the handle as tensors: to_dispatch_handle(to_tensor_handle(h)) is h."""
    from eplib import ops

    handle = _handles()[form]
    tensors = ops.to_tensor_handle(handle)
    assert all(isinstance(t, torch.Tensor) for t in tensors)
    back = ops.to_dispatch_handle(tensors)
    assert len(back) == len(handle) == 6
    pairs = list(zip(back, handle)) + [(getattr(back, name), getattr(handle, name)) for name in ATTRIBUTES]
    for index, (got, want) in enumerate(pairs):
        if isinstance(want, torch.Tensor):
            assert torch.equal(got, want), index
        else:
            assert got == want, index
