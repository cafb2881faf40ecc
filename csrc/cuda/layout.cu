#include "common.cuh"
#include "eplib/layout.h"
#include "kernels.h"

namespace eplib::cuda {

namespace {

constexpr int kLayoutThreads = 1024;
constexpr int kScanThreads = 512;
constexpr int kScanItems = 4;  // tokens per thread and tile in send_positions
// Counters of dispatch_layout live in shared memory; 48 KiB is what every sm_80+ launch gets
// without opting in.
constexpr int64_t kMaxSharedBytes = 48 * 1024;

// One block does the whole layout: with the counters in shared memory it needs no zeroed global
// memory, no second launch and no cross-block reduction; at T=4096, K=8 each thread handles 4 tokens.
__global__ void __launch_bounds__(kLayoutThreads)
    dispatch_layout_kernel(const int64_t* topk_idx, int64_t num_tokens, int num_topk, int num_experts, int num_ranks,
                           int32_t* num_tokens_per_rank, int32_t* num_tokens_per_expert, bool* is_token_in_rank,
                           int32_t* error_flag) {
  extern __shared__ int32_t counters[];  // [E] per expert, then [R] per rank
  int32_t* expert_counts = counters;
  int32_t* rank_counts = counters + num_experts;
  for (int i = threadIdx.x; i < num_experts + num_ranks; i += blockDim.x) counters[i] = 0;
  __syncthreads();
  const int experts_per_rank = num_experts / num_ranks;
  for (int64_t t = threadIdx.x; t < num_tokens; t += blockDim.x) {
    bool* in_rank = is_token_in_rank + t * num_ranks;
    for (int r = 0; r < num_ranks; ++r) in_rank[r] = false;
    for (int k = 0; k < num_topk; ++k) {
      const int64_t expert = topk_idx[t * num_topk + k];
      if (expert < -1 || expert >= num_experts) set_error(error_flag, kErrorExpertId);
      if (expert < 0 || expert >= num_experts) continue;
      atomicAdd(&expert_counts[expert], 1);
      const int rank = rank_of_expert(expert, experts_per_rank);
      // This thread wrote the row: reading it back tells whether an earlier slot chose this rank.
      if (!in_rank[rank]) {
        in_rank[rank] = true;
        atomicAdd(&rank_counts[rank], 1);
      }
    }
  }
  __syncthreads();
  for (int e = threadIdx.x; e < num_experts; e += blockDim.x) num_tokens_per_expert[e] = expert_counts[e];
  for (int r = threadIdx.x; r < num_ranks; r += blockDim.x) num_tokens_per_rank[r] = rank_counts[r];
}

// Block r numbers the tokens bound for rank r with a block-wide scan over tiles of
// kScanThreads * kScanItems tokens (thread-local sums of kScanItems consecutive tokens, then one
// block scan per tile); contiguous mode first sums the tokens bound for ranks < r.
__global__ void __launch_bounds__(kScanThreads)
    send_positions_kernel(const bool* is_token_in_rank, int64_t num_tokens, int num_ranks, int32_t* send_pos,
                          int32_t* num_tokens_per_rank, int64_t slot_rows, int32_t* error_flag) {
  __shared__ int64_t warp_totals[kWarpSize];
  const int rank = blockIdx.x;
  int64_t region_start = rank * slot_rows;
  if (slot_rows == 0) {
    int64_t before = 0;
    for (int64_t t = threadIdx.x; t < num_tokens; t += blockDim.x)
      for (int r = 0; r < rank; ++r) before += is_token_in_rank[t * num_ranks + r];
    block_exclusive_sum(before, warp_totals, &region_start);
  }
  int64_t tokens_before_tile = 0;
  constexpr int64_t kTile = static_cast<int64_t>(kScanThreads) * kScanItems;
  for (int64_t tile = 0; tile < num_tokens; tile += kTile) {
    const int64_t first = tile + static_cast<int64_t>(threadIdx.x) * kScanItems;
    bool bound[kScanItems];
    int64_t thread_count = 0;
#pragma unroll
    for (int j = 0; j < kScanItems; ++j) {
      bound[j] = first + j < num_tokens && is_token_in_rank[(first + j) * num_ranks + rank];
      thread_count += bound[j];
    }
    int64_t tile_count;
    int64_t index = tokens_before_tile + block_exclusive_sum(thread_count, warp_totals, &tile_count);
#pragma unroll
    for (int j = 0; j < kScanItems; ++j) {
      if (first + j >= num_tokens) break;
      int32_t pos = -1;
      if (bound[j]) {
        if (slot_rows > 0 && index >= slot_rows) set_error(error_flag, kErrorOverflow);
        else pos = static_cast<int32_t>(region_start + index);
        ++index;
      }
      send_pos[(first + j) * num_ranks + rank] = pos;
    }
    tokens_before_tile += tile_count;
  }
  if (threadIdx.x == 0) num_tokens_per_rank[rank] = static_cast<int32_t>(tokens_before_tile);
}

}  // namespace

void dispatch_layout(const int64_t* topk_idx, int64_t num_tokens, int num_topk, int num_experts, int num_ranks,
                     int32_t* num_tokens_per_rank, int32_t* num_tokens_per_expert, bool* is_token_in_rank,
                     int32_t* error_flag, cudaStream_t stream) {
  // rank_of_expert divides by E / R: R must divide E, or a valid id maps past the last rank.
  if (num_ranks <= 0 || num_experts < 0 || num_experts % num_ranks != 0)
    throw std::invalid_argument("eplib: dispatch_layout needs num_ranks > 0 dividing num_experts, got E=" +
                                std::to_string(num_experts) + ", R=" + std::to_string(num_ranks));
  const int64_t shared_bytes = static_cast<int64_t>(num_experts + num_ranks) * sizeof(int32_t);
  if (shared_bytes > kMaxSharedBytes)
    throw std::invalid_argument("eplib: the CUDA layout keeps E + R counters in 48 KiB of shared memory; E=" +
                                std::to_string(num_experts) + ", R=" + std::to_string(num_ranks) + " is too many");
  dispatch_layout_kernel<<<1, kLayoutThreads, shared_bytes, stream>>>(topk_idx, num_tokens, num_topk, num_experts,
                                                                     num_ranks, num_tokens_per_rank,
                                                                     num_tokens_per_expert, is_token_in_rank,
                                                                     error_flag);
  check_launch("dispatch_layout");
}

void send_positions(const bool* is_token_in_rank, int64_t num_tokens, int num_ranks, int32_t* send_pos,
                    int32_t* num_tokens_per_rank, int64_t slot_rows, int32_t* error_flag, cudaStream_t stream) {
  if (static_cast<int64_t>(num_ranks) * slot_rows > INT32_MAX)
    throw std::invalid_argument("eplib: slot_rows * num_ranks = " + std::to_string(num_ranks * slot_rows) +
                                " exceeds the int32 positions");
  if (num_ranks <= 0) return;  // no rank, nothing to write (and a grid of 0 blocks is a launch error)
  send_positions_kernel<<<num_ranks, kScanThreads, 0, stream>>>(is_token_in_rank, num_tokens, num_ranks, send_pos,
                                                                num_tokens_per_rank, slot_rows, error_flag);
  check_launch("send_positions");
}

}  // namespace eplib::cuda
