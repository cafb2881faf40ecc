"""The implementations the benchmark times, behind one interface: layout -> dispatch -> combine.

Every pipeline holds the same inputs (x, topk_idx, topk_weights) and runs its three phases on
them. ``check_output`` runs them once with identity experts and returns the combined x for the
correctness guard: each token must come back as ``x * K`` (K copies, each its expert's identity
output). eplib and the reference send a token to a rank once, so there the expert side returns
each received row times the number of its slots on that rank; the framework baseline sums K
copies. x holds small integers, so these sums are exact in every dtype and the guard can
demand equality. ``reference_mismatches`` (the ipc transport's check) goes further: eplib's
outputs on CUDA against eplib.reference's on CPU copies of the same inputs, bit for bit.
"""

from typing import Any, List, Protocol, Union

import torch
import torch.distributed as dist

import eplib
from baselines import FrameworkDispatcher
from eplib.reference import ReferenceBuffer

Tensor = torch.Tensor


class Pipeline(Protocol):
    """What the benchmark times: three phases, each fed by the previous one's result."""

    name: str
    x: Tensor

    def layout(self) -> Any: ...

    def dispatch(self, layout: Any) -> Any: ...

    def combine(self, dispatched: Any) -> Tensor: ...

    def check_output(self) -> Tensor: ...


class DeepEPStylePipeline:
    """eplib.Buffer or eplib.reference.ReferenceBuffer (the same DeepEP-style calls).

    dispatch sends the top-k ids and weights with x; combine sends x back without weights."""

    def __init__(self, name: str, buffer: Union[eplib.Buffer, ReferenceBuffer], x: Tensor, topk_idx: Tensor,
                 topk_weights: Tensor, num_experts: int) -> None:
        self.name = name
        self.buffer = buffer
        self.x, self.topk_idx, self.topk_weights, self.num_experts = x, topk_idx, topk_weights, num_experts

    def layout(self) -> Any:
        return self.buffer.get_dispatch_layout(self.topk_idx, self.num_experts)

    def dispatch(self, layout: Any) -> Any:
        num_tokens_per_rank, _, num_tokens_per_expert, is_token_in_rank, _ = layout
        return self.buffer.dispatch(self.x, num_tokens_per_rank=num_tokens_per_rank,
                                    is_token_in_rank=is_token_in_rank, num_tokens_per_expert=num_tokens_per_expert,
                                    topk_idx=self.topk_idx, topk_weights=self.topk_weights)

    def cached_dispatch(self, dispatched: Any) -> Any:
        """x alone, along the handle of an earlier dispatch (its layout is reused)."""
        return self.buffer.dispatch(self.x, handle=dispatched[4])

    def combine(self, dispatched: Any) -> Tensor:
        recv_x, handle = dispatched[0], dispatched[4]
        return self.buffer.combine(recv_x, handle)[0]

    def check_output(self) -> Tensor:
        recv_x, recv_topk_idx, _, _, handle, _ = self.dispatch(self.layout())
        local_slots = (recv_topk_idx >= 0).sum(dim=1, keepdim=True).to(recv_x.dtype)
        return self.buffer.combine(recv_x * local_slots, handle)[0]


_LAYOUT_OUTPUTS = ((0, "num_tokens_per_rank"), (2, "num_tokens_per_expert"), (3, "is_token_in_rank"))
_DISPATCH_OUTPUTS = ("recv_x", "recv_topk_idx", "recv_topk_weights", "num_recv_tokens_per_expert_list")


def reference_mismatches(pipeline: DeepEPStylePipeline, reference: DeepEPStylePipeline) -> List[str]:
    """The outputs in which ``pipeline`` (eplib, CUDA tensors) and ``reference``
    (eplib.reference.ReferenceBuffer on CPU copies of the same inputs) differ; empty when all agree
    bit for bit. Compared: the layout, dispatch's four outputs and handle[0] (rank_prefix_matrix),
    a cached dispatch's recv_x, and the combine of ``check_output`` (which must also be x * K)."""
    mismatches = []

    def compare(name: str, got: Any, want: Any) -> None:
        if isinstance(want, Tensor):
            same = isinstance(got, Tensor) and got.dtype == want.dtype and torch.equal(got.cpu(), want)
        else:
            same = got == want
        if not same:
            mismatches.append(name)

    got_layout, want_layout = pipeline.layout(), reference.layout()
    for i, name in _LAYOUT_OUTPUTS:
        compare(name, got_layout[i], want_layout[i])
    got, want = pipeline.dispatch(got_layout), reference.dispatch(want_layout)
    for i, name in enumerate(_DISPATCH_OUTPUTS):
        compare(name, got[i], want[i])
    compare("rank_prefix_matrix", got[4][0], want[4][0])
    compare("cached dispatch recv_x", pipeline.cached_dispatch(got)[0], want[0])
    combined = pipeline.check_output()
    compare("combine", combined, reference.check_output())
    x = reference.x
    compare("combine == x * K", combined, (x.float() * reference.topk_idx.shape[1]).to(x.dtype))
    return mismatches


class FrameworkPipeline:
    """The framework-style baseline (``baselines.FrameworkDispatcher``)."""

    name = "framework"

    def __init__(self, group: dist.ProcessGroup, x: Tensor, topk_idx: Tensor, num_experts: int) -> None:
        self.dispatcher = FrameworkDispatcher(group, num_experts)
        self.x, self.topk_idx = x, topk_idx

    def layout(self) -> Any:
        return self.dispatcher.layout(self.topk_idx)

    def dispatch(self, layout: Any) -> Any:
        return self.dispatcher.dispatch(self.x, layout, self.topk_idx.shape[1])

    def combine(self, dispatched: Any) -> Tensor:
        received, handle = dispatched
        return self.dispatcher.combine(received, handle)

    def check_output(self) -> Tensor:
        return self.combine(self.dispatch(self.layout()))
