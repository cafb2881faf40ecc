"""Plain-torch reference implementation of the eplib Buffer contract (DESIGN.md §2).

`ReferenceBuffer` runs on every rank of a `torch.distributed` group and implements the
DeepEP-V1-compatible normal-mode calls (`get_dispatch_layout`, `dispatch`, `combine`) with the
simplest collectives there are: one `all_gather` of the per-rank counts and one
`all_to_all_single` per tensor that travels. It imports nothing else from eplib on purpose: it is
the independent oracle the tests compare `eplib.Buffer` against, and the baseline of the
benchmarks. Clarity beats speed everywhere in this file.

Conventions (shared with eplib.Buffer, bit for bit):
- R = group size, E experts with E % R == 0; rank r owns experts [r*E/R, (r+1)*E/R).
- topk_idx int64 [T, K] in [-1, E) (-1 = masked slot), topk_weights float32 [T, K].
- x is [T, H] float32 / bfloat16 / float16 / float64, or the FP8 tuple
  (float8_e4m3fn [T, H], float32 or int32 scales [T, S] of any strides) whose scales travel with
  their token.
- A token goes to a rank at most once; received rows are ordered by source rank, then by
  source token index.
- combine sums in fp32 (fp64 for float64 x): 0, then bias_0, then bias_1, then the rows sent back by the
  destination ranks in ascending rank order; the sum is cast to x.dtype.
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist

Tensor = torch.Tensor
#: x as dispatch accepts it: a [T, H] tensor or the FP8 tuple (values, scales).
DispatchX = Union[Tensor, Tuple[Tensor, Tensor]]

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_FP8_DTYPE = torch.float8_e4m3fn


class ReferenceHandle(NamedTuple):
    """What `dispatch` hands back and `combine` / cached `dispatch` reuse.

    Element [0] is the contract's `rank_prefix_matrix`; the rest is the reference's own.
    """

    rank_prefix_matrix: Tensor  # int32 [R, R]: [i][j] = tokens that source ranks 0..i send to rank j
    is_token_in_rank: Tensor  # bool [T, R] of this rank's tokens, as given to dispatch
    send_token_idx: Tensor  # int64 [S]: sent token ids, grouped by destination rank, then ascending
    send_counts: Tuple[int, ...]  # [R]: rows this rank sent to each rank
    recv_counts: Tuple[int, ...]  # [R]: rows this rank received from each rank
    num_recv_tokens: int  # N: real received rows
    num_rows: int  # rows of the dispatch outputs: N, or num_worst_tokens when that was > 0


def _fail(exc_type: type, argument: str, expected: str, got: object) -> None:
    raise exc_type(f"{argument}: expected {expected}, got {got}")


def _describe(t: Tensor) -> str:
    return f"{t.dtype} tensor of shape {list(t.shape)}"


def _check_tensor(t: object, name: str, dtype: torch.dtype, shape: Sequence[Optional[int]]) -> Tensor:
    """Checks type, dtype, rank and the known sizes (None = any) of a tensor argument."""
    expected = f"{dtype} tensor of shape [{', '.join('*' if s is None else str(s) for s in shape)}]"
    if not isinstance(t, Tensor):
        _fail(TypeError, name, expected, type(t).__name__)
    if t.dtype != dtype:
        _fail(TypeError, name, expected, _describe(t))
    if t.dim() != len(shape) or any(s is not None and s != n for s, n in zip(shape, t.shape)):
        _fail(ValueError, name, expected, _describe(t))
    return t


def _check_float_x(x: object, name: str) -> Tensor:
    """x of combine (or the plain-tensor x of dispatch): contiguous [T, H] fp32/bf16/fp16/fp64."""
    if not isinstance(x, Tensor):
        _fail(TypeError, name, "a [T, H] float32/bfloat16/float16/float64 tensor", type(x).__name__)
    if x.dtype not in _FLOAT_DTYPES:
        _fail(TypeError, name, "dtype float32, bfloat16, float16 or float64", _describe(x))
    if x.dim() != 2:
        _fail(ValueError, name, "a 2-D [T, H] tensor", _describe(x))
    if not x.is_contiguous():
        # The contract (like DeepEP) takes contiguous rows only; copying silently would hide a
        # caller's layout bug and cost a full copy.
        _fail(ValueError, name, "a contiguous tensor", f"strides {x.stride()}")
    return x


def _check_dispatch_x(x: object) -> Tuple[Tensor, Optional[Tensor]]:
    """Splits dispatch's x into (values [T, H], scales [T, S] or None) after checking it."""
    if isinstance(x, tuple):
        if len(x) != 2:
            _fail(ValueError, "x", "a tensor or the FP8 tuple (values, scales)", f"a tuple of {len(x)}")
        values, scales = x
        _check_tensor(values, "x[0]", _FP8_DTYPE, (None, None))
        if not values.is_contiguous():
            _fail(ValueError, "x[0]", "a contiguous tensor", f"strides {values.stride()}")
        # Scales of any strides, float32 or int32 (four UE8M0 exponents each), as DeepEP takes them.
        if not isinstance(scales, Tensor) or scales.dtype not in (torch.float32, torch.int32):
            _fail(TypeError, "x[1]", "a float32 or int32 tensor", scales)
        _check_tensor(scales, "x[1]", scales.dtype, (values.shape[0], None))
        return values, scales
    return _check_float_x(x, "x"), None


def _round_up(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


class ReferenceBuffer:
    """Plain-torch Buffer over `torch.distributed` (any backend with all_gather / all_to_all).

    Every call is collective except `get_dispatch_layout`: all ranks of `group` must call
    `dispatch` / `combine` together, as with `eplib.Buffer` and `deep_ep.Buffer`.
    """

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.group_size = dist.get_world_size(group)

    # ------------------------------------------------------------------ communication helpers

    def _all_to_all_rows(self, send: Tensor, send_counts: Sequence[int], recv_counts: Sequence[int]) -> Tensor:
        """Sends rows [sum(send_counts[:r]), sum(send_counts[:r+1])) of `send` [S, W] to rank r.

        Returns [sum(recv_counts), W] with the rows from rank 0 first, then rank 1, ...
        The rows travel as raw bytes so that every dtype (bf16, fp16, FP8, int64) takes the same
        path whatever the backend supports, and arrives bit-identical.
        """
        send = send.contiguous()
        send_bytes = send.view(torch.uint8)  # [S, W * element_size]
        recv_bytes = torch.empty((sum(recv_counts), send_bytes.shape[1]), dtype=torch.uint8)
        dist.all_to_all_single(
            recv_bytes,
            send_bytes,
            output_split_sizes=list(recv_counts),
            input_split_sizes=list(send_counts),
            group=self.group,
        )
        return recv_bytes.view(send.dtype)

    def _all_gather_vector(self, v: Tensor) -> Tensor:
        """all_gather of an int64 vector [L] → [R, L] (row i from rank i)."""
        parts = [torch.empty_like(v) for _ in range(self.group_size)]
        dist.all_gather(parts, v, group=self.group)
        return torch.stack(parts)

    @staticmethod
    def _pad_rows(t: Tensor, num_rows: int, fill: float) -> Tensor:
        """t [N, W] → [num_rows, W] with rows N.. set to `fill` (num_rows >= N)."""
        out = torch.full((num_rows,) + tuple(t.shape[1:]), fill, dtype=t.dtype)
        out[: t.shape[0]] = t
        return out

    # ------------------------------------------------------------------ layout

    def get_dispatch_layout(
        self,
        topk_idx: Tensor,
        num_experts: int,
        previous_event: object = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ) -> Tuple[Tensor, None, Tensor, Tensor, None]:
        """Where each token goes. Local; no communication.

        Args:
            topk_idx: int64 [T, K], values in [-1, num_experts).
            num_experts: E, a multiple of the group size.
            previous_event, async_finish, allocate_on_comm_stream: accepted for API parity, ignored.

        Returns:
            (num_tokens_per_rank int32 [R], None, num_tokens_per_expert int32 [E] (one count per
            (token, slot) pair), is_token_in_rank bool [T, R], None).
        """
        num_experts = self._check_num_experts(num_experts)
        self._check_topk_idx(topk_idx, None, num_experts)
        experts_per_rank = num_experts // self.group_size
        valid = topk_idx >= 0
        # Destination rank of every slot, -1 for masked slots.
        dest_rank = torch.where(valid, topk_idx // experts_per_rank, torch.full_like(topk_idx, -1))
        is_token_in_rank = torch.stack(
            [(dest_rank == r).any(dim=1) for r in range(self.group_size)], dim=1
        ).reshape(topk_idx.shape[0], self.group_size)
        num_tokens_per_rank = is_token_in_rank.sum(dim=0).to(torch.int32)
        num_tokens_per_expert = torch.bincount(topk_idx[valid], minlength=num_experts).to(torch.int32)
        return num_tokens_per_rank, None, num_tokens_per_expert, is_token_in_rank, None

    # ------------------------------------------------------------------ dispatch

    def dispatch(
        self,
        x: DispatchX,
        handle: Optional[ReferenceHandle] = None,
        num_tokens_per_rank: Optional[Tensor] = None,
        num_tokens_per_rdma_rank: Optional[Tensor] = None,
        is_token_in_rank: Optional[Tensor] = None,
        num_tokens_per_expert: Optional[Tensor] = None,
        topk_idx: Optional[Tensor] = None,
        topk_weights: Optional[Tensor] = None,
        expert_alignment: int = 1,
        num_worst_tokens: int = 0,
        config: object = None,
        previous_event: object = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ) -> Tuple[DispatchX, Optional[Tensor], Optional[Tensor], Optional[List[int]], Optional[ReferenceHandle], None]:
        """Sends every token to each rank that owns one of its experts (at most once per rank).

        Args:
            x: [T, H] float32/bfloat16/float16/float64, or (float8_e4m3fn [T, H], float32 or int32 scales [T, S]).
            handle: a handle from an earlier dispatch (cached mode: the layout is reused and only
                x travels; every other argument is ignored).
            num_tokens_per_rank: int32 [R], is_token_in_rank: bool [T, R],
                num_tokens_per_expert: int32 [E]: the layout from get_dispatch_layout; required
                without handle.
            num_tokens_per_rdma_rank: accepted for API parity, ignored (single node).
            topk_idx: int64 [T, K] or None; topk_weights: float32 [T, K], given with topk_idx.
            expert_alignment: each count of the returned list is rounded up to a multiple of it.
            num_worst_tokens: if > 0, outputs have exactly this many rows (zero / -1 padded past
                the real count) and the list is empty; a rank receiving more raises ValueError
                (on every rank, so that none waits for the others).
            config, previous_event, async_finish, allocate_on_comm_stream: ignored.

        Returns:
            (recv_x [N, H] (a tuple with scales [N, S] for FP8 input),
             recv_topk_idx int64 [N, K] with local expert ids / -1, or None,
             recv_topk_weights float32 [N, K], 0 where recv_topk_idx is -1, or None,
             num_recv_tokens_per_expert_list: list of E/R ints ([] with num_worst_tokens > 0,
             None in cached mode),
             handle (None in cached mode), None).
        """
        values, scales = _check_dispatch_x(x)
        num_tokens = values.shape[0]
        if handle is not None:
            return self._cached_dispatch(values, scales, handle)

        R = self.group_size
        if num_tokens_per_rank is None or is_token_in_rank is None or num_tokens_per_expert is None:
            raise ValueError(
                "dispatch without handle needs num_tokens_per_rank, is_token_in_rank and "
                "num_tokens_per_expert (from get_dispatch_layout), got "
                f"num_tokens_per_rank={'None' if num_tokens_per_rank is None else 'tensor'}, "
                f"is_token_in_rank={'None' if is_token_in_rank is None else 'tensor'}, "
                f"num_tokens_per_expert={'None' if num_tokens_per_expert is None else 'tensor'}"
            )
        _check_tensor(num_tokens_per_rank, "num_tokens_per_rank", torch.int32, (R,))
        _check_tensor(is_token_in_rank, "is_token_in_rank", torch.bool, (num_tokens, R))
        _check_tensor(num_tokens_per_expert, "num_tokens_per_expert", torch.int32, (None,))
        num_experts = self._check_num_experts(num_tokens_per_expert.shape[0], "num_tokens_per_expert")
        if not torch.equal(is_token_in_rank.sum(dim=0).to(torch.int32), num_tokens_per_rank):
            _fail(ValueError, "num_tokens_per_rank", "the column sums of is_token_in_rank",
                  num_tokens_per_rank.tolist())
        if topk_idx is not None:
            self._check_topk_idx(topk_idx, num_tokens, num_experts)
            self._check_topk_weights(topk_weights, topk_idx.shape)
        elif topk_weights is not None:
            _fail(ValueError, "topk_weights", "None when topk_idx is None", _describe(topk_weights))
        if not isinstance(expert_alignment, int) or expert_alignment < 1:
            _fail(ValueError, "expert_alignment", "an int >= 1", expert_alignment)
        if not isinstance(num_worst_tokens, int) or num_worst_tokens < 0:
            _fail(ValueError, "num_worst_tokens", "an int >= 0", num_worst_tokens)

        # 1. Every rank learns every rank's per-rank and per-expert counts and num_worst_tokens,
        #    in one all_gather. Row i of `meta` comes from source rank i.
        meta = self._all_gather_vector(
            torch.cat([
                num_tokens_per_rank.to(torch.int64),
                num_tokens_per_expert.to(torch.int64),
                torch.tensor([num_worst_tokens], dtype=torch.int64),
            ])
        )
        counts = meta[:, :R]  # [R_src, R_dst]: tokens source i sends to destination j
        per_expert = meta[:, R : R + num_experts]  # [R_src, E]
        worst = meta[:, R + num_experts]  # [R]: num_worst_tokens of each rank
        rank_prefix_matrix = counts.cumsum(dim=0).to(torch.int32)
        recv_counts = tuple(int(n) for n in counts[:, self.rank])
        send_counts = tuple(int(n) for n in counts[self.rank])
        num_recv = sum(recv_counts)

        # 2. Every rank checks every rank's num_worst_tokens against what it will receive, so
        #    that all raise together before the data moves (nobody waits in all_to_all).
        received_by = counts.sum(dim=0)  # [R]
        for r in range(R):
            if 0 < int(worst[r]) < int(received_by[r]):
                whose = "this rank's" if r == self.rank else f"rank {r}'s"
                raise ValueError(
                    f"num_worst_tokens: {whose} num_worst_tokens={int(worst[r])} is smaller than the "
                    f"{int(received_by[r])} tokens rank {r} receives"
                )

        # 3. Tokens to send: for each destination rank ascending, its tokens ascending.
        send_token_idx = torch.cat(
            [is_token_in_rank[:, r].nonzero().flatten() for r in range(R)]
        ).to(torch.int64)

        recv_values = self._all_to_all_rows(values[send_token_idx], send_counts, recv_counts)
        recv_scales = None
        if scales is not None:
            recv_scales = self._all_to_all_rows(scales[send_token_idx], send_counts, recv_counts)

        recv_topk_idx = recv_topk_weights = None
        if topk_idx is not None:
            experts_per_rank = num_experts // R
            first_local = self.rank * experts_per_rank
            recv_global = self._all_to_all_rows(topk_idx[send_token_idx], send_counts, recv_counts)
            is_local = (recv_global >= first_local) & (recv_global < first_local + experts_per_rank)
            recv_topk_idx = torch.where(is_local, recv_global - first_local, torch.full_like(recv_global, -1))
            recv_w = self._all_to_all_rows(topk_weights[send_token_idx], send_counts, recv_counts)
            recv_topk_weights = torch.where(is_local, recv_w, torch.zeros_like(recv_w))

        # 4. Per local expert: (token, slot) pairs naming it, summed over source ranks.
        experts_per_rank = num_experts // R
        local = slice(self.rank * experts_per_rank, (self.rank + 1) * experts_per_rank)
        per_local_expert = per_expert[:, local].sum(dim=0)
        num_list = [_round_up(int(n), expert_alignment) for n in per_local_expert]

        num_rows = num_recv
        if num_worst_tokens > 0:
            num_rows = num_worst_tokens
            num_list = []
            recv_values = self._pad_rows(recv_values, num_rows, 0)
            if recv_scales is not None:
                recv_scales = self._pad_rows(recv_scales, num_rows, 0)
            if recv_topk_idx is not None:
                recv_topk_idx = self._pad_rows(recv_topk_idx, num_rows, -1)
                recv_topk_weights = self._pad_rows(recv_topk_weights, num_rows, 0)

        handle = ReferenceHandle(
            rank_prefix_matrix=rank_prefix_matrix,
            is_token_in_rank=is_token_in_rank.clone(),
            send_token_idx=send_token_idx,
            send_counts=send_counts,
            recv_counts=recv_counts,
            num_recv_tokens=num_recv,
            num_rows=num_rows,
        )
        recv_x = recv_values if recv_scales is None else (recv_values, recv_scales)
        return recv_x, recv_topk_idx, recv_topk_weights, num_list, handle, None

    def _cached_dispatch(
        self, values: Tensor, scales: Optional[Tensor], handle: ReferenceHandle
    ) -> Tuple[DispatchX, None, None, None, None, None]:
        """Dispatch of x alone along the layout of an earlier dispatch (same rows out)."""
        self._check_handle(handle)
        num_tokens = handle.is_token_in_rank.shape[0]
        if values.shape[0] != num_tokens:
            _fail(ValueError, "x", f"{num_tokens} rows (the T of the dispatch that made handle)",
                  f"{values.shape[0]} rows")
        recv_values = self._all_to_all_rows(values[handle.send_token_idx], handle.send_counts, handle.recv_counts)
        recv_values = self._pad_rows(recv_values, handle.num_rows, 0)
        if scales is None:
            return recv_values, None, None, None, None, None
        recv_scales = self._all_to_all_rows(scales[handle.send_token_idx], handle.send_counts, handle.recv_counts)
        recv_scales = self._pad_rows(recv_scales, handle.num_rows, 0)
        return (recv_values, recv_scales), None, None, None, None, None

    # ------------------------------------------------------------------ combine

    def combine(
        self,
        x: Tensor,
        handle: ReferenceHandle,
        topk_weights: Optional[Tensor] = None,
        bias: Union[None, Tensor, Tuple[Tensor, ...]] = None,
        config: object = None,
        previous_event: object = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ) -> Tuple[Tensor, Optional[Tensor], None]:
        """Sends the expert-side rows back and sums them per original token.

        Args:
            x: [N, H] float32/bfloat16/float16/float64, N = rows of the dispatch output that made handle
                (num_worst_tokens padding included; padding rows are ignored).
            handle: from that dispatch.
            topk_weights: float32 [N, K] or None; summed back like x (in fp32, no bias).
            bias: None, a [T, H] tensor, or a tuple of one or two, dtype x.dtype.
            config, previous_event, async_finish, allocate_on_comm_stream: ignored.

        Returns:
            (combined_x [T, H] x.dtype: cast of the fp32 (fp64 for float64 x) sum 0 + bias_0 +
             bias_1 + the returned rows in ascending destination-rank order,
             combined_topk_weights float32 [T, K] or None, None).
        """
        _check_float_x(x, "x")
        self._check_handle(handle)
        num_tokens = handle.is_token_in_rank.shape[0]
        if x.shape[0] != handle.num_rows:
            _fail(ValueError, "x", f"{handle.num_rows} rows (the rows of the dispatch output of handle)",
                  f"{x.shape[0]} rows")
        if topk_weights is not None:
            self._check_topk_weights(topk_weights, (handle.num_rows, None))
        biases: Tuple[Tensor, ...]
        if bias is None:
            biases = ()
        elif isinstance(bias, Tensor):
            biases = (bias,)
        elif isinstance(bias, tuple) and 1 <= len(bias) <= 2:
            biases = tuple(b for b in bias if b is not None)
        else:
            _fail(TypeError, "bias", "None, a tensor or a tuple of two tensors", type(bias).__name__)
        for i, b in enumerate(biases):
            _check_tensor(b, f"bias[{i}]", x.dtype, (num_tokens, x.shape[1]))

        # Rows sent back: the real received rows, already grouped by source rank, go back to it.
        real = slice(0, handle.num_recv_tokens)
        back_x = self._all_to_all_rows(x[real], handle.recv_counts, handle.send_counts)
        back_w = None
        if topk_weights is not None:
            back_w = self._all_to_all_rows(topk_weights[real], handle.recv_counts, handle.send_counts)

        # fp32 sum (fp64 for fp64 x) in the contract's order: 0, bias_0, bias_1, then destination
        # ranks ascending.
        acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        acc = torch.zeros((num_tokens, x.shape[1]), dtype=acc_dtype)
        for b in biases:
            acc = acc + b.to(acc_dtype)
        acc_w = None
        if back_w is not None:
            acc_w = torch.zeros((num_tokens, topk_weights.shape[1]), dtype=torch.float32)
        start = 0
        for r in range(self.group_size):
            end = start + handle.send_counts[r]
            tokens = handle.send_token_idx[start:end]  # distinct, so one addition per element
            acc[tokens] = acc[tokens] + back_x[start:end].to(acc_dtype)
            if acc_w is not None:
                acc_w[tokens] = acc_w[tokens] + back_w[start:end]
            start = end
        return acc.to(x.dtype), acc_w, None

    # ------------------------------------------------------------------ validation

    def _check_num_experts(self, num_experts: object, name: str = "num_experts") -> int:
        if not isinstance(num_experts, int) or isinstance(num_experts, bool):
            _fail(TypeError, name, "an int", type(num_experts).__name__)
        if num_experts <= 0 or num_experts % self.group_size != 0:
            _fail(ValueError, name, f"a positive multiple of the group size {self.group_size}", num_experts)
        return num_experts

    @staticmethod
    def _check_topk_idx(topk_idx: object, num_tokens: Optional[int], num_experts: int) -> None:
        _check_tensor(topk_idx, "topk_idx", torch.int64, (num_tokens, None))
        if topk_idx.numel() > 0:
            lo, hi = int(topk_idx.min()), int(topk_idx.max())
            if lo < -1 or hi >= num_experts:
                _fail(ValueError, "topk_idx", f"values in [-1, {num_experts})", f"values in [{lo}, {hi}]")

    @staticmethod
    def _check_topk_weights(topk_weights: object, shape: Sequence[Optional[int]]) -> None:
        if topk_weights is None:
            _fail(ValueError, "topk_weights", "a float32 tensor together with topk_idx", None)
        _check_tensor(topk_weights, "topk_weights", torch.float32, tuple(shape))
        if not bool(torch.isfinite(topk_weights).all()):
            _fail(ValueError, "topk_weights", "finite values", "NaN or inf")

    def _check_handle(self, handle: object) -> None:
        if not isinstance(handle, ReferenceHandle):
            _fail(TypeError, "handle", "a handle returned by ReferenceBuffer.dispatch", type(handle).__name__)
        if handle.rank_prefix_matrix.shape != (self.group_size, self.group_size):
            _fail(ValueError, "handle", f"a handle of a group of {self.group_size}",
                  f"rank_prefix_matrix of shape {list(handle.rank_prefix_matrix.shape)}")

    # ------------------------------------------------------------------ low-latency mode

    def low_latency_dispatch(
        self,
        x: Tensor,
        topk_idx: Tensor,
        num_max_dispatch_tokens_per_rank: int,
        num_experts: int,
        use_fp8: bool = True,
        round_scale: bool = False,
        use_ue8m0: bool = False,
        masked_ranks: Sequence[int] = (),
    ) -> Tuple[Union[Tensor, Tuple[Tensor, Tensor]], Tensor, Tuple, None, None]:
        """DeepEP's low_latency_dispatch in plain torch: every rank's x and topk_idx are all-gathered,
        then `low_latency_dispatch_expected` computes this rank's outputs.

        Returns (recv_x, recv_count, handle, None, None) as eplib.Buffer.low_latency_dispatch does;
        handle = (src_info, layout_range, num_max, hidden, num_experts, all ranks' topk_idx).
        """
        xs = self._all_gather_rows(x)
        idxs = self._all_gather_rows(topk_idx)
        recv_x, recv_count, src_info, layout_range = low_latency_dispatch_expected(
            self.rank, xs, idxs, num_max_dispatch_tokens_per_rank, num_experts, use_fp8, round_scale, use_ue8m0,
            masked_ranks)
        handle = (src_info, layout_range, num_max_dispatch_tokens_per_rank, x.shape[1], num_experts, idxs)
        return recv_x, recv_count, handle, None, None

    def low_latency_combine(
        self,
        x: Tensor,
        topk_idx: Tensor,
        topk_weights: Tensor,
        handle: Tuple,
        masked_ranks: Sequence[int] = (),
    ) -> Tuple[Tensor, None, None]:
        """DeepEP's low_latency_combine in plain torch: every rank's expert outputs x [E_local, R * num_max, H]
        are all-gathered, then `low_latency_combine_expected` reduces this rank's tokens."""
        num_experts, idxs = handle[4], handle[5]
        ys = self._all_gather_rows(x.reshape(-1, x.shape[-1]))
        ys = [y.view(x.shape) for y in ys]
        combined = low_latency_combine_expected(self.rank, ys, idxs, topk_weights, num_experts, masked_ranks)
        return combined, None, None

    def _all_gather_rows(self, t: Tensor) -> List[Tensor]:
        """Every rank's 2-D tensor t (row counts may differ between ranks), in rank order."""
        sizes = self._all_gather_vector(torch.tensor([t.shape[0]], dtype=torch.int64)).flatten().tolist()
        padded = torch.zeros((max(sizes),) + tuple(t.shape[1:]), dtype=t.dtype)
        padded[: t.shape[0]] = t
        raw = padded.view(torch.uint8) if padded.element_size() == 1 else padded
        parts = [torch.empty_like(raw) for _ in range(self.group_size)]
        dist.all_gather(parts, raw.contiguous(), group=self.group)
        return [p.view(t.dtype)[:n] for p, n in zip(parts, sizes)]


# ---------------------------------------------------------------------- low-latency mode
#
# DeepEP's low_latency_dispatch / low_latency_combine, as pure functions of every rank's inputs (the
# tests also use them where a rank is gone). Conventions (eplib's, bit for bit on every transport):
# - A token travels once to each distinct expert among its slots. On the receiving rank, expert le's
#   rows are ordered by source rank, then source token; a masked source contributes no rows.
# - FP8: per token and block of 128 channels, amax = max(|x|, 1e-4) in fp32; scale = 448 / amax and
#   scale_inv = amax * (1 / 448) (round_scale: scale_inv = 2^ceil(log2(amax * (1 / 448))), scale =
#   1 / scale_inv); values = cast(x * scale) to float8_e4m3fn (nearest even, saturating at 448); the
#   scales that travel are scale_inv, float32 [E_local, R * num_max, H / 128] column-major in the last
#   two dims, or (use_ue8m0) their exponent bytes packed four to an int32 [.., ceil(H / 512)].
# - Combine: per token, acc = 0 in fp32, then for each slot k ascending whose expert is not -1 and
#   whose rank is not masked, acc = acc + w[t, k] * float(row of that expert); cast once to bf16.

_FP8_MAX = 448.0


def fp8_quantize(x: Tensor, round_scale: bool = False, use_ue8m0: bool = False) -> Tuple[Tensor, Tensor]:
    """bf16 x [T, H] (H a multiple of 128) -> (float8_e4m3fn values [T, H], float32 scale_inv [T, H / 128]).
    use_ue8m0 needs round_scale (the scales are then powers of two)."""
    if use_ue8m0 and not round_scale:
        _fail(ValueError, "use_ue8m0", "round_scale=True with it", "round_scale=False")
    num_tokens, hidden = x.shape
    blocks = x.float().view(num_tokens, hidden // 128, 128)
    amax = blocks.abs().amax(dim=-1).clamp_min(torch.tensor(1e-4, dtype=torch.float32))
    max_inv = torch.tensor(1.0, dtype=torch.float32) / torch.tensor(_FP8_MAX, dtype=torch.float32)
    if round_scale:
        bits = (amax * max_inv).view(torch.int32)
        exponent = ((bits >> 23) & 0xFF) - 127 + ((bits & 0x7FFFFF) != 0).to(torch.int32)
        scale_inv = ((exponent + 127) << 23).view(torch.float32)
        scale = ((127 - exponent) << 23).view(torch.float32)
    else:
        scale_inv = amax * max_inv
        scale = torch.tensor(_FP8_MAX, dtype=torch.float32) / amax
    values = (blocks * scale[..., None]).clamp(-_FP8_MAX, _FP8_MAX).to(_FP8_DTYPE)
    return values.view(num_tokens, hidden), scale_inv


def _tokens_naming(topk_idx: Tensor, expert: int) -> Tensor:
    """int64 indices of the tokens whose slots name `expert` (once per token), ascending."""
    return (topk_idx == expert).any(dim=1).nonzero().flatten()


def low_latency_dispatch_expected(rank: int, xs: Sequence[Tensor], topk_idxs: Sequence[Tensor], num_max: int,
                                  num_experts: int, use_fp8: bool = True, round_scale: bool = False,
                                  use_ue8m0: bool = False, masked_ranks: Sequence[int] = ()):
    """Rank `rank`'s low_latency_dispatch outputs from every rank's bf16 x [T_s, H] and topk_idx [T_s, K].

    Returns (recv_x, recv_count int32 [E_local], src_info int32 [E_local, R * num_max], layout_range int64
    [E_local, R]). recv_x is bf16 [E_local, R * num_max, H], or with use_fp8 the tuple (float8_e4m3fn values,
    scales) laid out as DeepEP's. Rows past recv_count are zero (src_info -1 there): DeepEP leaves them
    unspecified, and eplib's transports do too.
    """
    num_ranks = len(xs)
    hidden = xs[0].shape[1]
    experts_per_rank = num_experts // num_ranks
    rows = num_ranks * num_max
    quantized = [fp8_quantize(x, round_scale, use_ue8m0) if use_fp8 else None for x in xs]
    num_scales = hidden // 128
    recv_values = torch.zeros((experts_per_rank, rows, hidden), dtype=_FP8_DTYPE if use_fp8 else torch.bfloat16)
    recv_scales = torch.zeros((experts_per_rank, rows, num_scales), dtype=torch.float32)
    src_info = torch.full((experts_per_rank, rows), -1, dtype=torch.int32)
    layout_range = torch.zeros((experts_per_rank, num_ranks), dtype=torch.int64)
    recv_count = torch.zeros(experts_per_rank, dtype=torch.int32)
    for local in range(experts_per_rank):
        expert = rank * experts_per_rank + local
        begin = 0
        for source in range(num_ranks):
            tokens = _tokens_naming(topk_idxs[source], expert) if source not in masked_ranks else \
                torch.zeros(0, dtype=torch.int64)
            count = tokens.numel()
            if use_fp8:
                recv_values[local, begin:begin + count] = quantized[source][0][tokens]
                recv_scales[local, begin:begin + count] = quantized[source][1][tokens]
            else:
                recv_values[local, begin:begin + count] = xs[source][tokens]
            src_info[local, begin:begin + count] = tokens.to(torch.int32)
            layout_range[local, source] = (begin << 32) | count
            begin += count
        recv_count[local] = begin
    if not use_fp8:
        return recv_values, recv_count, src_info, layout_range
    return (recv_values, _column_major_scales(recv_scales, use_ue8m0)), recv_count, src_info, layout_range


def _column_major_scales(scales: Tensor, use_ue8m0: bool) -> Tensor:
    """float32 [E_local, RM, S] -> DeepEP's layout: the same values with strides (S * RM, 1, RM), or
    (use_ue8m0) int32 [E_local, RM, ceil(S / 4)], strides likewise, scale c in byte c % 4 of int32 c // 4."""
    experts, rows, num_scales = scales.shape
    if not use_ue8m0:
        return scales.transpose(1, 2).contiguous().transpose(1, 2)
    packs = (num_scales + 3) // 4
    exponents = torch.zeros((experts, rows, packs * 4), dtype=torch.uint8)
    exponents[..., :num_scales] = ((scales.view(torch.int32) >> 23) & 0xFF).to(torch.uint8)
    packed = exponents.view(experts, rows, packs, 4).permute(0, 2, 1, 3).contiguous()  # [E_local, S4, RM, 4]
    return packed.view(torch.int32).view(experts, packs, rows).transpose(1, 2)


def low_latency_combine_expected(rank: int, ys: Sequence[Tensor], topk_idxs: Sequence[Tensor], topk_weights: Tensor,
                                 num_experts: int, masked_ranks: Sequence[int] = ()) -> Tensor:
    """Rank `rank`'s low_latency_combine output bf16 [T, H] from every rank's expert outputs ys[r] (bf16
    [E_local, R * num_max, H], row for row as r's low_latency_dispatch output), every rank's topk_idx (they
    give the rows' places) and this rank's topk_weights [T, K]."""
    num_ranks = len(ys)
    experts_per_rank = num_experts // num_ranks
    # names[s][t, e]: token t of rank s names expert e; its row on e's rank sits at begin[s][e] (the rows of
    # unmasked ranks before s) + the tokens of s before t that name e.
    names = []
    for idx in topk_idxs:
        named = torch.zeros((idx.shape[0], num_experts + 1), dtype=torch.int64)
        named.scatter_(1, torch.where(idx >= 0, idx, num_experts), 1)
        names.append(named[:, :num_experts])
    begin = torch.zeros(num_experts, dtype=torch.int64)
    for source in range(rank):
        if source not in masked_ranks:
            begin += names[source].sum(0)
    position = begin[None, :] + names[rank].cumsum(0) - 1  # [T, E]
    topk_idx = topk_idxs[rank]
    num_tokens, num_topk = topk_idx.shape
    acc = torch.zeros((num_tokens, ys[0].shape[-1]), dtype=torch.float32)
    for k in range(num_topk):
        expert = topk_idx[:, k]
        for owner in range(num_ranks):
            sel = ((expert >= 0) & (expert // experts_per_rank == owner)).nonzero().flatten()
            if owner in masked_ranks or sel.numel() == 0:
                continue
            rows = position[sel, expert[sel]]
            acc[sel] = acc[sel] + topk_weights[sel, k:k + 1] * ys[owner][expert[sel] % experts_per_rank, rows].float()
    return acc.to(torch.bfloat16)


__all__ = ["ReferenceBuffer", "ReferenceHandle", "DispatchX", "fp8_quantize", "low_latency_dispatch_expected",
           "low_latency_combine_expected"]
