// CPU kernels for layout, dispatch, combine and the expert permutation. They work on raw,
// contiguous host memory; the Python callers check shapes, dtypes and contiguity before calling
// them. Values only a scan can check (expert ids, weights) are checked here, and a bad one throws
// std::invalid_argument (ValueError in Python) naming the argument, the position and the expected
// range, before any collective has started.
#pragma once

#include <cstdint>

#include "eplib/dtype.h"

namespace eplib::cpu {

// topk_idx [T, K] int64 in [-1, E) -> num_tokens_per_rank [R], num_tokens_per_expert [E] (int32),
// is_token_in_rank [T, R] (bool). A token counts once per rank however many of its experts live there.
void dispatch_layout(const int64_t* topk_idx, int64_t num_tokens, int num_topk, int num_experts, int num_ranks,
                     int32_t* num_tokens_per_rank, int32_t* num_tokens_per_expert, bool* is_token_in_rank);

// is_token_in_rank [T, R] -> send_pos [T, R] int32: the row of token t in the send region (rows
// grouped by destination rank, then by token index), or -1; and num_tokens_per_rank [R].
void send_positions(const bool* is_token_in_rank, int64_t num_tokens, int num_ranks, int32_t* send_pos,
                    int32_t* num_tokens_per_rank);

// Gathers each token's row into the send region once per destination rank (DispatchRowLayout):
// x, FP8 scales (scales_bytes may be 0; scale [t, j] is read at scale_offset(t, j, scales_token_stride,
// scales_column_stride) of eplib/layout.h), the source token index, and, when topk_idx is not null,
// receiver-local expert ids and their weights (weight 0 where the expert lives elsewhere).
void dispatch_pack(const uint8_t* x, int64_t x_bytes, const uint8_t* x_scales, int64_t scales_bytes,
                   int64_t scales_token_stride, int64_t scales_column_stride, const int64_t* topk_idx, const float* topk_weights, int num_topk, int num_experts,
                   const int32_t* send_pos, int64_t num_tokens, int num_ranks, uint8_t* send_buffer);

// Splits received rows back into recv_x [N, x_bytes], recv_x_scales, recv_src_idx [N] int32 and,
// when num_topk > 0, recv_topk_idx [N, K] int64, recv_topk_weights [N, K] float32 and
// num_recv_tokens_per_expert [num_local_experts] (received (row, slot) pairs per local expert).
void dispatch_unpack(const uint8_t* recv_buffer, int64_t num_rows, int64_t x_bytes, int64_t scales_bytes,
                     int num_topk, int num_local_experts, uint8_t* recv_x, uint8_t* recv_x_scales,
                     int32_t* recv_src_idx, int64_t* recv_topk_idx, float* recv_topk_weights,
                     int64_t* num_recv_tokens_per_expert);

// Packs expert-side rows for the way back (CombineRowLayout with num_topk > 0): x then weights.
void combine_pack(const uint8_t* x, int64_t x_bytes, const float* topk_weights, int num_topk, int64_t num_rows,
                  uint8_t* send_buffer);

// For each token t: combined_x[t] = cast(bias_0[t] + bias_1[t] + sum over ranks r ascending with
// send_pos[t, r] >= 0 of row(send_pos[t, r])), accumulated in fp32 (fp64 for fp64 data; a missing
// bias counts as 0).
// combined_topk_weights [T, K] (may be null) sums the returned weights the same way.
void combine_reduce(DType dtype, const uint8_t* recv_buffer, int64_t hidden, int num_topk, const int32_t* send_pos,
                    int64_t num_tokens, int num_ranks, const void* bias_0, const void* bias_1, void* combined_x,
                    float* combined_topk_weights);

// Expert-major permutation (index arithmetic in eplib/permute.h). topk_idx [N, K] int64 holds local
// expert ids in [-1, num_local_experts) (an id outside throws). Writes pair_pos [N, K] int32 (the
// output row of pair (n, k), -1 for id -1), expert_offsets [E + 1] int64 (aligned segment starts;
// the last is the total of aligned rows) and num_tokens_per_expert [E] int64 (pairs, unaligned).
// num_out_rows > 0 fixes the output size; a permutation that needs more rows throws.
void permute_layout(const int64_t* topk_idx, int64_t num_rows, int num_topk, int num_local_experts,
                    int64_t expert_alignment, int64_t num_out_rows, int32_t* pair_pos, int64_t* expert_offsets,
                    int64_t* num_tokens_per_expert);

// out [num_out_rows, H]: out[pair_pos[n, k]] = x[n], times topk_weights[n, k] when given (weights are
// float32, float64 for fp64 data; the product is rounded once to the element type); the padding rows
// of every segment and the rows past expert_offsets[E] are zeroed.
void permute_rows(DType dtype, const void* x, int64_t num_rows, int64_t hidden, int num_topk, const int32_t* pair_pos,
                  const void* topk_weights, const int64_t* expert_offsets, const int64_t* num_tokens_per_expert,
                  int num_local_experts, int64_t num_out_rows, void* out);

// out [N, H]: out[n] = sum over k ascending with 0 <= pair_pos[n, k] < num_in_rows of
// topk_weights[n, k] * y[pair_pos[n, k]] (weight 1 when topk_weights is null), accumulated from 0 in
// fp32 (fp64 for fp64 data) and cast to the element type.
void unpermute_rows(DType dtype, const void* y, int64_t num_in_rows, int64_t hidden, int num_topk,
                    const int32_t* pair_pos, const void* topk_weights, int64_t num_rows, void* out);

// Asks the kernel to back [address, address + num_bytes) with transparent huge pages before it is
// first touched: a fresh tens-of-MB output then costs a few hundred page faults instead of
// thousands. Advisory; a no-op where the kernel or the platform does not offer it.
void advise_huge_pages(void* address, int64_t num_bytes);

}  // namespace eplib::cpu
