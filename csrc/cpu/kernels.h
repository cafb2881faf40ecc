// CPU kernels for layout, dispatch and combine. They work on raw, contiguous host memory; the
// Python transport checks shapes, dtypes and contiguity before calling them. Values only a scan
// can check (expert ids, weights) are checked here, and a bad one throws std::invalid_argument
// (ValueError in Python) naming the argument, the position and the expected range, before any
// collective has started.
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
// x, FP8 scales (scales_bytes may be 0), the source token index, and, when topk_idx is not null,
// receiver-local expert ids and their weights (weight 0 where the expert lives elsewhere).
void dispatch_pack(const uint8_t* x, int64_t x_bytes, const uint8_t* x_scales, int64_t scales_bytes,
                   const int64_t* topk_idx, const float* topk_weights, int num_topk, int num_experts,
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
// send_pos[t, r] >= 0 of row(send_pos[t, r])), accumulated in fp32 (a missing bias counts as 0).
// combined_topk_weights [T, K] (may be null) sums the returned weights the same way.
void combine_reduce(DType dtype, const uint8_t* recv_buffer, int64_t hidden, int num_topk, const int32_t* send_pos,
                    int64_t num_tokens, int num_ranks, const void* bias_0, const void* bias_1, void* combined_x,
                    float* combined_topk_weights);

// Asks the kernel to back [address, address + num_bytes) with transparent huge pages before it is
// first touched: a fresh tens-of-MB output then costs a few hundred page faults instead of
// thousands. Advisory; a no-op where the kernel or the platform does not offer it.
void advise_huge_pages(void* address, int64_t num_bytes);

}  // namespace eplib::cpu
