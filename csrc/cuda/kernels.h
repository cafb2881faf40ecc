// CUDA kernels for layout, dispatch, combine and the expert permutation. Host launchers: every
// pointer is device memory allocated by the caller (torch); each launches on `stream`, never
// synchronizes, never allocates, and throws std::runtime_error when a launch fails. Values only
// the device sees (expert ids, weights, received counts) are checked on the device: a bad one sets
// a bit of error_flag (eplib/errors.h; null = unchecked) and the kernel stays in bounds.
// Semantics match the CPU kernels of the same name (cpu/kernels.h) bit for bit.
//
// The four row kernels (dispatch_pack, dispatch_unpack, combine_pack, combine_reduce) also serve the
// peer-memory transport: with `peers` (the view of every rank's buffer, peer.h) the packs write
// straight into the destinations' receive regions instead of send_buffer and the receivers read their
// own region, each inside the round hand-shake of peer.h; peers == nullptr is the nccl transport.
// max_blocks > 0 bounds their grid (Config.num_sms); 0 sizes it by the work.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "eplib/dtype.h"
#include "peer.h"

namespace eplib::cuda {

// cpu::dispatch_layout; an id outside [-1, E) sets kErrorExpertId and counts as -1. One block.
void dispatch_layout(const int64_t* topk_idx, int64_t num_tokens, int num_topk, int num_experts, int num_ranks,
                     int32_t* num_tokens_per_rank, int32_t* num_tokens_per_expert, bool* is_token_in_rank,
                     int32_t* error_flag, cudaStream_t stream);

// slot_rows == 0: cpu::send_positions. slot_rows > 0: send_pos[t, r] = r * slot_rows + (tokens
// before t bound for r), or -1 with kErrorOverflow when that index is >= slot_rows;
// num_tokens_per_rank holds the true (unclipped) counts. One block per rank.
void send_positions(const bool* is_token_in_rank, int64_t num_tokens, int num_ranks, int32_t* send_pos,
                    int32_t* num_tokens_per_rank, int64_t slot_rows, int32_t* error_flag, cudaStream_t stream);

// cpu::dispatch_pack; bad ids (kErrorExpertId) travel as -1, non-finite weights set kErrorWeight.
// With peers, row placement in the destinations' regions follows rank_prefix_matrix (device int32
// [R, R], as in DispatchHandle) or, when slot_rows > 0, the slot layout (send_pos made with slot_rows).
void dispatch_pack(const uint8_t* x, int64_t x_bytes, const uint8_t* x_scales, int64_t scales_bytes,
                   const int64_t* topk_idx, const float* topk_weights, int num_topk, int num_experts,
                   const int32_t* send_pos, int64_t num_tokens, int num_ranks, uint8_t* send_buffer,
                   int32_t* error_flag, const PeerView* peers, const int32_t* rank_prefix_matrix, int64_t slot_rows,
                   int max_blocks, cudaStream_t stream);

// Received rows -> compacted outputs in source order. recv_counts [R] (device) are the rows from
// each source, found at s * slot_rows (slot_rows > 0; counts above slot_rows are clipped with
// kErrorOverflow) or at their prefix sum. Output rows [total, num_out_rows) are padding (zero bytes,
// index -1); total > num_out_rows sets kErrorOverflow and keeps the first num_out_rows.
// num_recv_tokens_per_expert int64 [E_local] and num_recv_out int32 [1] (rows written) may be null.
void dispatch_unpack(const uint8_t* recv_buffer, const int32_t* recv_counts, int num_ranks, int64_t slot_rows,
                     int64_t num_out_rows, int64_t x_bytes, int64_t scales_bytes, int num_topk, int num_local_experts,
                     uint8_t* recv_x, uint8_t* recv_x_scales, int32_t* recv_src_idx, int64_t* recv_topk_idx,
                     float* recv_topk_weights, int64_t* num_recv_tokens_per_expert, int32_t* num_recv_out,
                     int32_t* error_flag, const PeerView* peers, int max_blocks, cudaStream_t stream);

// The inverse placement of dispatch_unpack: compacted row i of source s goes to send row
// s * slot_rows + (i - start of s) (slot_rows > 0) or i, as CombineRowLayout (x, then K weights).
// Rows past the (clipped) total of recv_counts are not read. With peers, each row goes back to the
// row of its source's region that the source's send_pos gave it (rank_prefix_matrix or slot_rows).
void combine_pack(const uint8_t* x, int64_t x_bytes, const float* topk_weights, int num_topk,
                  const int32_t* recv_counts, int num_ranks, int64_t slot_rows, int64_t num_rows,
                  uint8_t* send_buffer, const PeerView* peers, const int32_t* rank_prefix_matrix, int max_blocks,
                  cudaStream_t stream);

// cpu::combine_reduce for float32 / bfloat16.
void combine_reduce(DType dtype, const uint8_t* recv_buffer, int64_t hidden, int num_topk, const int32_t* send_pos,
                    int64_t num_tokens, int num_ranks, const void* bias_0, const void* bias_1, void* combined_x,
                    float* combined_topk_weights, const PeerView* peers, int max_blocks, cudaStream_t stream);

// cpu::permute_layout; an id outside [-1, E_local) sets kErrorExpertId and counts as -1, a pair past
// num_out_rows (> 0) gets -1; aligned rows past num_out_rows (> 0), pairs or padding alone, set
// kErrorOverflow where the CPU kernel raises (expert_offsets keep the rows needed). One block;
// 1 <= E_local <= about 12K (shared counters).
void permute_layout(const int64_t* topk_idx, int64_t num_rows, int num_topk, int num_local_experts,
                    int64_t expert_alignment, int64_t num_out_rows, int32_t* pair_pos, int64_t* expert_offsets,
                    int64_t* num_tokens_per_expert, int32_t* error_flag, cudaStream_t stream);

// cpu::permute_rows and cpu::unpermute_rows for float32 / bfloat16.
void permute_rows(DType dtype, const void* x, int64_t num_rows, int64_t hidden, int num_topk, const int32_t* pair_pos,
                  const void* topk_weights, const int64_t* expert_offsets, const int64_t* num_tokens_per_expert,
                  int num_local_experts, int64_t num_out_rows, void* out, cudaStream_t stream);

void unpermute_rows(DType dtype, const void* y, int64_t num_in_rows, int64_t hidden, int num_topk,
                    const int32_t* pair_pos, const void* topk_weights, int64_t num_rows, void* out,
                    cudaStream_t stream);

}  // namespace eplib::cuda
