#include <cmath>

#include "common.cuh"
#include "eplib/layout.h"
#include "kernels.h"
#include "low_latency_ipc.h"

namespace eplib::cuda {

namespace {

constexpr int kLayoutThreads = 1024;
constexpr int kScanThreads = 512;
constexpr int kScanItems = 4;  // tokens per thread and tile in send_positions
// Counters of dispatch_layout and check_dispatch_inputs live in shared memory; 48 KiB is what every
// sm_80+ launch gets without opting in.
constexpr int64_t kMaxSharedBytes = 48 * 1024;

// One block does the whole layout: with the counters in shared memory it needs no zeroed global
// memory, no second launch and no cross-block reduction; at T=4096, K=8 each thread handles 4 tokens.
__global__ void __launch_bounds__(kLayoutThreads) dispatch_layout_kernel(DispatchLayoutArgs args) {
  int32_t* expert_counts = dynamic_shared_memory<int32_t>();  // [E] per expert, then [R] per rank
  int32_t* rank_counts = expert_counts + args.num_experts;
  for (int i = threadIdx.x; i < args.num_experts + args.num_ranks; i += blockDim.x) expert_counts[i] = 0;
  __syncthreads();
  const int experts_per_rank = args.num_experts / args.num_ranks;
  for (int64_t t = threadIdx.x; t < args.num_tokens; t += blockDim.x) {
    bool* in_rank = args.is_token_in_rank + t * args.num_ranks;
    for (int r = 0; r < args.num_ranks; ++r) in_rank[r] = false;
    for (int k = 0; k < args.num_topk; ++k) {
      const int64_t expert = args.topk_idx[t * args.num_topk + k];
      if (expert < -1 || expert >= args.num_experts) set_error(args.error_flag, kErrorExpertId);
      if (expert < 0 || expert >= args.num_experts) continue;
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
  for (int e = threadIdx.x; e < args.num_experts; e += blockDim.x) args.num_tokens_per_expert[e] = expert_counts[e];
  for (int r = threadIdx.x; r < args.num_ranks; r += blockDim.x) args.num_tokens_per_rank[r] = rank_counts[r];
}

// Block r numbers the tokens bound for rank r with a block-wide scan over tiles of
// kScanThreads * kScanItems tokens (thread-local sums of kScanItems consecutive tokens, then one
// block scan per tile); contiguous mode first sums the tokens bound for ranks < r.
__global__ void __launch_bounds__(kScanThreads) send_positions_kernel(SendPositionsArgs args) {
  __shared__ int64_t warp_totals[kWarpSize];
  const int rank = blockIdx.x;
  const int num_ranks = args.num_ranks;
  int64_t region_start = rank * args.slot_rows;
  if (args.slot_rows == 0) {
    int64_t before = 0;
    for (int64_t t = threadIdx.x; t < args.num_tokens; t += blockDim.x)
      for (int r = 0; r < rank; ++r) before += args.is_token_in_rank[t * num_ranks + r];
    block_exclusive_sum(before, warp_totals, &region_start);
  }
  int64_t tokens_before_tile = 0;
  constexpr int64_t kTile = static_cast<int64_t>(kScanThreads) * kScanItems;
  for (int64_t tile = 0; tile < args.num_tokens; tile += kTile) {
    const int64_t first = tile + static_cast<int64_t>(threadIdx.x) * kScanItems;
    bool bound[kScanItems];
    int64_t thread_count = 0;
#pragma unroll
    for (int j = 0; j < kScanItems; ++j) {
      bound[j] = first + j < args.num_tokens && args.is_token_in_rank[(first + j) * num_ranks + rank];
      thread_count += bound[j];
    }
    int64_t tile_count;
    int64_t index = tokens_before_tile + block_exclusive_sum(thread_count, warp_totals, &tile_count);
#pragma unroll
    for (int j = 0; j < kScanItems; ++j) {
      if (first + j >= args.num_tokens) break;
      int32_t pos = -1;
      if (bound[j]) {
        if (args.slot_rows > 0 && index >= args.slot_rows) set_error(args.error_flag, kErrorOverflow);
        else pos = static_cast<int32_t>(region_start + index);
        ++index;
      }
      args.send_pos[(first + j) * num_ranks + rank] = pos;
    }
    tokens_before_tile += tile_count;
  }
  if (threadIdx.x == 0) {
    const bool clipped = args.slot_rows > 0 && tokens_before_tile > args.slot_rows;
    args.num_tokens_per_rank[rank] = static_cast<int32_t>(clipped ? args.slot_rows : tokens_before_tile);
  }
}

// One block: each thread ORs the problems it finds into a local mask, set once at the end.
__global__ void __launch_bounds__(kLayoutThreads) check_dispatch_inputs_kernel(DispatchCheckArgs args) {
  int32_t* expert_counts = dynamic_shared_memory<int32_t>();  // [E] when top-k ids are given
  const bool has_topk = args.num_topk > 0;  // (an empty topk_idx may have no address)
  if (has_topk)
    for (int e = threadIdx.x; e < args.num_experts; e += blockDim.x) expert_counts[e] = 0;
  __syncthreads();
  int32_t found = 0;
  for (int r = threadIdx.x; r < args.num_ranks; r += blockDim.x) {
    int64_t expected = args.num_tokens_per_rank[r];
    if (args.slot_rows > 0 && expected > args.slot_rows) expected = args.slot_rows;  // rows a slot holds
    if (args.send_counts[r] != expected) found |= kErrorRankCounts;
  }
  if (has_topk) {
    const int64_t num_pairs = args.num_tokens * args.num_topk;
    for (int64_t i = threadIdx.x; i < num_pairs; i += blockDim.x) {
      const int64_t expert = args.topk_idx[i];
      if (expert < -1 || expert >= args.num_experts) found |= kErrorExpertId;
      else if (expert >= 0) atomicAdd(&expert_counts[expert], 1);
      if (args.topk_weights != nullptr && !isfinite(args.topk_weights[i])) found |= kErrorWeight;
    }
  }
  __syncthreads();
  for (int e = threadIdx.x; e < args.num_experts; e += blockDim.x) {
    const int32_t given = args.num_tokens_per_expert[e];
    if (has_topk ? expert_counts[e] != given : given < 0) found |= kErrorExpertCounts;
  }
  if (found != 0) set_error(args.error_flag, found);
}

// Shared bytes of `counters` int32 counters, or invalid_argument naming what does not fit.
size_t shared_counter_bytes(int64_t counters, const char* kernel, const std::string& what) {
  const int64_t bytes = counters * static_cast<int64_t>(sizeof(int32_t));
  if (bytes > kMaxSharedBytes)
    throw std::invalid_argument(std::string("eplib: the CUDA ") + kernel + " keeps " + what +
                                " counters in 48 KiB of shared memory: too many");
  return static_cast<size_t>(bytes);
}

}  // namespace

void dispatch_layout(const DispatchLayoutArgs& args, cudaStream_t stream) {
  // rank_of_expert divides by E / R: R must divide E, or a valid id maps past the last rank.
  if (args.num_ranks <= 0 || args.num_experts < 0 || args.num_experts % args.num_ranks != 0)
    throw std::invalid_argument("eplib: dispatch_layout needs num_ranks > 0 dividing num_experts, got E=" +
                                std::to_string(args.num_experts) + ", R=" + std::to_string(args.num_ranks));
  const size_t shared_bytes = shared_counter_bytes(
      static_cast<int64_t>(args.num_experts) + args.num_ranks, "layout",
      "E + R (E=" + std::to_string(args.num_experts) + ", R=" + std::to_string(args.num_ranks) + ")");
  launch("dispatch_layout_kernel", dispatch_layout_kernel, {1, kLayoutThreads}, shared_bytes, stream, args);
}

void send_positions(const SendPositionsArgs& args, cudaStream_t stream) {
  if (static_cast<int64_t>(args.num_ranks) * args.slot_rows > INT32_MAX)
    throw std::invalid_argument("eplib: slot_rows * num_ranks = " + std::to_string(args.num_ranks * args.slot_rows) +
                                " exceeds the int32 positions");
  if (args.num_ranks <= 0) return;  // no rank, nothing to write (and a grid of 0 blocks is a launch error)
  launch("send_positions_kernel", send_positions_kernel, {static_cast<unsigned>(args.num_ranks), kScanThreads}, 0,
         stream, args);
}

void check_dispatch_inputs(const DispatchCheckArgs& args, cudaStream_t stream) {
  const size_t shared_bytes =
      args.num_topk > 0
          ? shared_counter_bytes(args.num_experts, "dispatch check", "E (E=" + std::to_string(args.num_experts) + ")")
          : 0;
  launch("check_dispatch_inputs_kernel", check_dispatch_inputs_kernel, {1, kLayoutThreads}, shared_bytes, stream,
         args);
}

void detail::preload_layout_kernels() {
  preload(dispatch_layout_kernel, send_positions_kernel, check_dispatch_inputs_kernel);
}

void preload_kernels() {
  detail::preload_layout_kernels();
  detail::preload_dispatch_kernels();
  detail::preload_combine_kernels();
  detail::preload_permute_kernels();
  detail::preload_low_latency_kernels();
  detail::preload_low_latency_ipc_kernels();
  detail::preload_ipc_kernels();
}

}  // namespace eplib::cuda
