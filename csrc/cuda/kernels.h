// CUDA kernels for layout, dispatch, combine and the expert permutation. Each launcher takes one
// argument struct (the same struct crosses into Python as _C.<Name>Args, fields by name); every
// pointer is device memory allocated by the caller (torch); each launches on `stream`, never
// synchronizes, never allocates, and throws std::runtime_error when a launch fails. Values only the
// device sees (expert ids, weights, received counts) are checked on the device: a bad one sets a bit
// of error_flag (eplib/errors.h; null = unchecked) and the kernel stays in bounds. Semantics match
// the CPU kernels of the same name (cpu/kernels.h) bit for bit.
//
// The four row kernels (dispatch_pack, dispatch_unpack, combine_pack, combine_reduce) are the nccl
// transport's. The ipc transport moves the same rows with the same arithmetic (rows.cuh) through its
// exchange kernels (ipc_exchange.cu), launched by IpcBuffer::dispatch / combine, which own its rounds.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "eplib/dtype.h"
#include "ipc.h"

namespace eplib::cuda {

// cpu::dispatch_layout; an id outside [-1, E) sets kErrorExpertId and counts as -1.
struct DispatchLayoutArgs {
  const int64_t* topk_idx;  // [T, K]
  int64_t num_tokens;
  int num_topk;
  int num_experts;
  int num_ranks;
  int32_t* num_tokens_per_rank;    // [R]
  int32_t* num_tokens_per_expert;  // [E]
  bool* is_token_in_rank;          // [T, R]
  int32_t* error_flag;
};

// slot_rows == 0: cpu::send_positions. slot_rows > 0: send_pos[t, r] = r * slot_rows + (tokens before
// t bound for r), or -1 with kErrorOverflow when that index is >= slot_rows. num_tokens_per_rank: the
// rows placed for each rank (clipped to slot_rows).
struct SendPositionsArgs {
  const bool* is_token_in_rank;  // [T, R]
  int64_t num_tokens;
  int num_ranks;
  int64_t slot_rows;
  int32_t* send_pos;             // [T, R]
  int32_t* num_tokens_per_rank;  // [R]
  int32_t* error_flag;
};

// The checks of a dispatch's inputs that need their values, in one launch (what the cpu transport
// checks on the host): send_counts (from send_positions) against num_tokens_per_rank (clipped to
// slot_rows > 0) -> kErrorRankCounts; the per-expert counts of topk_idx against num_tokens_per_expert
// -> kErrorExpertCounts, ids outside [-1, E) -> kErrorExpertId, non-finite weights -> kErrorWeight.
// Without top-k ids (num_topk == 0), a negative num_tokens_per_expert sets kErrorExpertCounts.
struct DispatchCheckArgs {
  const int32_t* send_counts;            // [R]
  const int32_t* num_tokens_per_rank;    // [R]
  int num_ranks;
  int64_t slot_rows;
  const int64_t* topk_idx;               // [T, K] or null
  const float* topk_weights;             // [T, K] or null
  int64_t num_tokens;
  int num_topk;
  const int32_t* num_tokens_per_expert;  // [E]
  int num_experts;
  int32_t* error_flag;
};

// cpu::dispatch_pack; bad ids (kErrorExpertId) travel as -1, non-finite weights set kErrorWeight.
// Through ipc, rank_prefix_matrix (device int32 [R, R], as in DispatchHandle) or, when slot_rows > 0,
// the slot layout (send_pos made with slot_rows) tells each row's index among this rank's rows for its
// destination.
struct DispatchPackArgs {
  const uint8_t* x;  // [T, x_bytes]
  int64_t x_bytes;
  const uint8_t* x_scales;  // [T, scales_bytes / kScaleBytes] 4-byte scales or null, read through the strides
  int64_t scales_bytes;
  int64_t scales_token_stride;   // in elements
  int64_t scales_column_stride;  // in elements; 1 for row-major scales
  const int64_t* topk_idx;    // [T, K]
  const float* topk_weights;  // [T, K]
  int num_topk;               // 0: x only
  int num_experts;
  const int32_t* send_pos;  // [T, R]
  int64_t num_tokens;
  int num_ranks;
  int64_t slot_rows;
  const int32_t* rank_prefix_matrix;  // ipc only
  uint8_t* send_buffer;               // nccl only
  int32_t* error_flag;
};

// Received rows -> compacted outputs in source order. recv_counts [R] (device) are the rows from each
// source, found at s * slot_rows (slot_rows > 0; counts above slot_rows are clipped with
// kErrorOverflow) or at their prefix sum. Output rows [total, num_out_rows) are padding (zero bytes,
// index -1); total > num_out_rows sets kErrorOverflow and keeps the first num_out_rows.
// num_recv_tokens_per_expert int64 [E_local] and num_recv_out int32 [1] (rows written) may be null.
// Through ipc, recv_buffer is ignored (rows come from the rings).
struct DispatchUnpackArgs {
  const uint8_t* recv_buffer;
  const int32_t* recv_counts;
  int num_ranks;
  int64_t slot_rows;
  int64_t num_out_rows;
  int64_t x_bytes;
  int64_t scales_bytes;
  int num_topk;
  int num_local_experts;
  uint8_t* recv_x;
  uint8_t* recv_x_scales;
  int32_t* recv_src_idx;
  int64_t* recv_topk_idx;
  float* recv_topk_weights;
  int64_t* num_recv_tokens_per_expert;
  int32_t* num_recv_out;
  int32_t* error_flag;
};

// The inverse placement of dispatch_unpack: compacted row i of source s goes to send row
// s * slot_rows + (i - start of s) (slot_rows > 0) or i, as CombineRowLayout (x, then K weights).
// Rows past the (clipped) total of recv_counts are not read. Through ipc, each row goes back through
// the channel its token came by (IpcExchangeArgs.channel_counts), in order.
struct CombinePackArgs {
  const uint8_t* x;  // [num_rows, x_bytes]
  int64_t x_bytes;
  const float* topk_weights;  // [num_rows, K] or null
  int num_topk;
  const int32_t* recv_counts;  // [R]
  int num_ranks;
  int64_t slot_rows;
  int64_t num_rows;
  uint8_t* send_buffer;  // nccl only
};

// cpu::combine_reduce for float32 / bfloat16. Through ipc, recv_buffer is ignored (rows come from the rings).
struct CombineReduceArgs {
  DType dtype;
  const uint8_t* recv_buffer;
  int64_t hidden;
  int num_topk;
  const int32_t* send_pos;  // [T, R]
  int64_t num_tokens;
  int num_ranks;
  const void* bias_0;  // [T, H] or null
  const void* bias_1;
  void* combined_x;              // [T, H]
  float* combined_topk_weights;  // [T, K] or null
};

// cpu::permute_layout; an id outside [-1, E_local) sets kErrorExpertId and counts as -1, a pair past
// num_out_rows (> 0) gets -1; aligned rows past num_out_rows (> 0), pairs or padding alone, set
// kErrorOverflow where the CPU kernel raises (expert_offsets keep the rows needed). One block;
// 1 <= E_local <= about 12K (shared counters).
struct PermuteLayoutArgs {
  const int64_t* topk_idx;  // [N, K]
  int64_t num_rows;
  int num_topk;
  int num_local_experts;
  int64_t expert_alignment;
  int64_t num_out_rows;
  int32_t* pair_pos;               // [N, K]
  int64_t* expert_offsets;         // [E_local + 1]
  int64_t* num_tokens_per_expert;  // [E_local]
  int32_t* error_flag;
};

// cpu::permute_rows for float32 / bfloat16.
struct PermuteRowsArgs {
  DType dtype;
  const void* x;  // [N, H]
  int64_t num_rows;
  int64_t hidden;
  int num_topk;
  const int32_t* pair_pos;
  const void* topk_weights;  // [N, K] of the accumulator type, or null
  const int64_t* expert_offsets;
  const int64_t* num_tokens_per_expert;
  int num_local_experts;
  int64_t num_out_rows;
  void* out;  // [num_out_rows, H]
};

// cpu::unpermute_rows for float32 / bfloat16.
struct UnpermuteRowsArgs {
  DType dtype;
  const void* y;  // [num_in_rows, H]
  int64_t num_in_rows;
  int64_t hidden;
  int num_topk;
  const int32_t* pair_pos;
  const void* topk_weights;
  int64_t num_rows;
  void* out;  // [num_rows, H]
};

void dispatch_layout(const DispatchLayoutArgs& args, cudaStream_t stream);
void send_positions(const SendPositionsArgs& args, cudaStream_t stream);
void check_dispatch_inputs(const DispatchCheckArgs& args, cudaStream_t stream);
// The ipc transport's part of one exchange (ipc.h): its channels and ring sizes (Config's
// num_sms / 2, num_max_nvl_chunked_recv_tokens, num_max_nvl_chunked_send_tokens), and the rows each
// (source, channel) stream carried: int32 [R, C], written by a dispatch (null: not recorded), read by
// the combine on its handle.
struct IpcExchangeArgs {
  int num_channels;
  int64_t ring_rows;   // slots per stream wanted; fewer when the buffer holds fewer (at least chunk_rows)
  int64_t chunk_rows;  // rows a sender publishes at once
  int32_t* channel_counts;
  // This rank's input failed a host check: it joins the round with no rows (ipc.h "Rejected rounds").
  bool rejected;
  // Where a receiver ORs kErrorPeerInput when a source's stream was closed as rejected (may be null).
  int32_t* error_flag;
};

void dispatch_pack(const DispatchPackArgs& args, cudaStream_t stream);
void dispatch_unpack(const DispatchUnpackArgs& args, cudaStream_t stream);
void combine_pack(const CombinePackArgs& args, cudaStream_t stream);
void combine_reduce(const CombineReduceArgs& args, cudaStream_t stream);
void permute_layout(const PermuteLayoutArgs& args, cudaStream_t stream);
void permute_rows(const PermuteRowsArgs& args, cudaStream_t stream);
void unpermute_rows(const UnpermuteRowsArgs& args, cudaStream_t stream);

// ---- Low-latency mode (eplib/low_latency.h; csrc/cuda/low_latency.cu): rows placed exactly where the CPU
// kernels of cpu/low_latency.h place them. Messages are reached through `messages`, device int64 [R] of
// addresses (per destination when sending, per source when receiving): the nccl transport's send and
// receive buffers, or the ipc transport's slots in the peers' mapped memory. `mask`: device int32 [R],
// 1 = masked (nothing written to it or read from it). `poisoned` (int32 [1] or null): when nonzero the
// receive kernels write poison (recv_count and layout_range -1, combined rows NaN) instead of results.
// A received header that the receiver cannot use (rejected by its sender, another call's format, counts
// beyond the message) sets kErrorLowLatencyMessage and counts as empty; an absent one (no magic: the
// sender masked this rank) counts as empty.

// cpu::ll_layout; an id outside [-1, E) sets kErrorExpertId and counts as -1.
struct LLLayoutArgs {
  const int64_t* topk_idx;  // [T, K]
  int64_t num_tokens;
  int num_topk;
  int num_experts;
  int num_ranks;
  int32_t* send_slot;    // [T, K]
  int32_t* send_counts;  // [E]
  int32_t* send_offset;  // [E]
  int32_t* error_flag;
};

// cpu::ll_dispatch_pack: headers, then the rows of bf16 x, FP8-cast when format has kLLFp8. rejected: the
// headers say so and no row is written (num_tokens 0).
struct LLDispatchPackArgs {
  const bf16_t* x;  // [T, H]
  int64_t num_tokens;
  int64_t num_max;
  int64_t hidden;
  int num_topk;
  int num_experts;
  int num_ranks;
  int32_t format;  // LowLatencyFormat bits
  bool rejected;
  const int64_t* topk_idx;
  const int32_t* send_slot;
  const int32_t* send_counts;
  const int32_t* send_offset;
  const int64_t* messages;
  const int32_t* mask;
};

// cpu::ll_dispatch_unpack (header checks on the device, see above).
struct LLDispatchUnpackArgs {
  const int64_t* messages;
  const int32_t* mask;
  const int32_t* poisoned;
  int64_t num_max;
  int64_t hidden;
  int num_topk;
  int num_experts;
  int num_ranks;
  int32_t format;
  uint8_t* recv_x;            // [E_local, R * num_max, H] bf16 or FP8 bytes
  uint8_t* recv_scales;       // float32 or UE8M0 bytes, column-major (ll_scale_index); null for bf16
  int32_t* src_info;          // [E_local, R * num_max]
  int64_t* layout_range;      // [E_local, R]
  int32_t* recv_count;        // [E_local]
  int32_t* cumulative_stats;  // [E_local] or null
  int32_t* error_flag;
};

// cpu::ll_combine_pack (rows always travel in the messages).
struct LLCombinePackArgs {
  const bf16_t* x;  // [E_local, R * num_max, H]
  const int64_t* layout_range;
  int64_t num_max;
  int64_t hidden;
  int num_topk;
  int num_experts;
  int num_ranks;
  int64_t num_tokens;  // the header's (information)
  const int64_t* messages;
  const int32_t* mask;
};

// cpu::ll_combine_reduce.
struct LLCombineReduceArgs {
  const int64_t* messages;
  const int32_t* mask;
  const int32_t* poisoned;
  int64_t num_max;
  int64_t hidden;
  int num_topk;
  int num_experts;
  int num_ranks;
  const int64_t* topk_idx;
  const float* topk_weights;
  int64_t num_tokens;
  const int32_t* send_slot;
  const int32_t* send_offset;
  bf16_t* out;  // [T, H]
  int32_t* error_flag;
};

void ll_layout(const LLLayoutArgs& args, cudaStream_t stream);
void ll_dispatch_pack(const LLDispatchPackArgs& args, cudaStream_t stream);
void ll_dispatch_unpack(const LLDispatchUnpackArgs& args, cudaStream_t stream);
void ll_combine_pack(const LLCombinePackArgs& args, cudaStream_t stream);
void ll_combine_reduce(const LLCombineReduceArgs& args, cudaStream_t stream);

// Loads every kernel above now (cudaFuncGetAttributes), so that no later launch loads a module
// lazily: with CUDA_MODULE_LOADING=LAZY a first launch waits for the device to go idle, which can mean
// waiting behind an ipc kernel that spins on a peer. The CUDA transports and IpcBuffer call it once.
void preload_kernels();

namespace detail {  // preload_kernels' parts, one per source file
void preload_layout_kernels();
void preload_dispatch_kernels();
void preload_combine_kernels();
void preload_permute_kernels();
void preload_low_latency_kernels();
void preload_ipc_kernels();
}  // namespace detail

// Shared by the nccl and ipc launchers (dispatch.cu, combine.cu).
DispatchPackArgs dispatch_kernel_args(const DispatchPackArgs& args);  // weights dropped when num_topk == 0
DispatchRowLayout dispatch_row_layout(const DispatchPackArgs& args);
int zero_expert_counts(const DispatchUnpackArgs& args, cudaStream_t stream);  // returns the experts counted
void check_combine_weights(const CombinePackArgs& args);

}  // namespace eplib::cuda
