#include "common.cuh"
#include "eplib/permute.h"
#include "kernels.h"
#include "rows.cuh"

namespace eplib::cuda {

namespace {

constexpr int kLayoutThreads = 1024;
constexpr int kRowThreads = 256;
constexpr int kWarpsPerRowBlock = kRowThreads / kWarpSize;
// The layout keeps one counter per (warp, expert) in shared memory: 48 KiB, what every sm_80+ launch
// gets without opting in, is for static and dynamic shared memory together, so the kernel's static
// warp_totals (and a margin) come off the top.
constexpr int64_t kLayoutSharedInts = (48 * 1024 - kWarpSize * sizeof(int64_t) - 256) / sizeof(int32_t);
constexpr unsigned kPaddingBlocks = 64;

// One block. The pairs (n * K + k order) are cut into one contiguous chunk per ranking warp.
// Pass 1 counts each chunk's pairs per expert; a scan over chunks and experts turns the counts into
// each chunk's first row per expert; pass 2 walks each chunk 32 pairs at a time, in order, ranking
// equal experts among the lanes with __match_any_sync, so pairs keep (row, slot) order.
__global__ void __launch_bounds__(kLayoutThreads) permute_layout_kernel(PermuteLayoutArgs args, int num_ranking_warps) {
  int32_t* chunk_next = dynamic_shared_memory<int32_t>();  // [num_ranking_warps][E]: counts, then next row per expert
  __shared__ int64_t warp_totals[kWarpSize];
  const int lane = lane_id();
  const int warp = static_cast<int>(threadIdx.x / kWarpSize);
  const int num_experts = args.num_local_experts;
  const int64_t num_pairs = args.num_rows * args.num_topk;
  const int64_t* topk_idx = args.topk_idx;
  const int64_t expert_alignment = args.expert_alignment;
  const int64_t num_out_rows = args.num_out_rows;
  int32_t* error_flag = args.error_flag;
  for (int i = threadIdx.x; i < num_ranking_warps * num_experts; i += blockDim.x) chunk_next[i] = 0;
  __syncthreads();

  // Chunk bounds, whole tiles of 32 pairs so pass 2's tiles never straddle two chunks.
  const int64_t num_tiles = (num_pairs + kWarpSize - 1) / kWarpSize;
  const int64_t tiles_per_chunk = (num_tiles + num_ranking_warps - 1) / num_ranking_warps;
  const int64_t chunk_begin = warp * tiles_per_chunk * kWarpSize;
  const int64_t chunk_end = min(num_pairs, chunk_begin + tiles_per_chunk * kWarpSize);
  const bool is_ranking_warp = warp < num_ranking_warps;

  // Pass 1.
  if (is_ranking_warp)
    for (int64_t p = chunk_begin + lane; p < chunk_end; p += kWarpSize) {
      const int64_t expert = topk_idx[p];
      if (!is_valid_local_expert_id(expert, num_experts)) set_error(error_flag, kErrorExpertId);
      else if (expert >= 0) atomicAdd(&chunk_next[warp * num_experts + expert], 1);
    }
  __syncthreads();

  // Per expert: exclusive scan over chunks (one thread per expert), then the aligned offsets by a
  // block scan over experts, kLayoutThreads experts per round.
  int64_t segment_start = 0;
  for (int round = 0; round < num_experts; round += blockDim.x) {
    const int expert = round + static_cast<int>(threadIdx.x);
    int64_t count = 0;
    if (expert < num_experts)
      for (int w = 0; w < num_ranking_warps; ++w) {
        const int32_t chunk_count = chunk_next[w * num_experts + expert];
        chunk_next[w * num_experts + expert] = static_cast<int32_t>(count);
        count += chunk_count;
      }
    int64_t round_rows;
    const int64_t offset = segment_start +
                           block_exclusive_sum(expert < num_experts ? align_up(count, expert_alignment) : 0,
                                               warp_totals, &round_rows);
    if (expert < num_experts) {
      args.num_tokens_per_expert[expert] = count;
      args.expert_offsets[expert] = offset;
      for (int w = 0; w < num_ranking_warps; ++w) chunk_next[w * num_experts + expert] += static_cast<int32_t>(offset);
    }
    segment_start += round_rows;
  }
  if (threadIdx.x == 0) {
    args.expert_offsets[num_experts] = segment_start;
    // As cpu::permute_layout, which raises when the aligned rows exceed num_out_rows, even if only
    // padding rows fall past the end.
    if (num_out_rows > 0 && segment_start > num_out_rows) set_error(error_flag, kErrorOverflow);
  }
  __syncthreads();

  // Pass 2.
  if (!is_ranking_warp) return;
  const unsigned lanes_below = (1u << lane) - 1u;
  for (int64_t tile = chunk_begin; tile < chunk_end; tile += kWarpSize) {
    const int64_t p = tile + lane;
    const int64_t id = p < chunk_end ? topk_idx[p] : -1;
    const int expert = (id >= 0 && id < num_experts) ? static_cast<int>(id) : -1;
    const unsigned same_expert = __match_any_sync(kFullMask, expert);
    int32_t* next = expert >= 0 ? &chunk_next[warp * num_experts + expert] : nullptr;
    const int64_t row = expert >= 0 ? *next + __popc(same_expert & lanes_below) : -1;
    __syncwarp();  // every lane has read its expert's next row before the first lane moves it on
    if (expert >= 0 && lane == __ffs(same_expert) - 1) *next += __popc(same_expert);
    __syncwarp();
    if (p < chunk_end) {
      const int32_t pos = expert >= 0 ? bounded_pair_pos(row, num_out_rows) : -1;
      if (expert >= 0 && pos < 0) set_error(error_flag, kErrorOverflow);
      args.pair_pos[p] = pos;
    }
  }
}

// Blocks [0, grid - kPaddingBlocks) scatter rows, one warp per source row; the last kPaddingBlocks
// zero the padding rows of every segment (eplib/permute.h), so one launch writes every output row.
template <typename T, int kVector>
__global__ void permute_rows_kernel(PermuteRowsArgs args) {
  using Acc = AccumulatorOf<T>;
  const auto* x = static_cast<const T*>(args.x);
  auto* out = static_cast<T*>(args.out);
  const auto* topk_weights = static_cast<const Acc*>(args.topk_weights);
  const int64_t hidden = args.hidden, num_rows = args.num_rows, num_out_rows = args.num_out_rows;
  const int num_topk = args.num_topk, num_local_experts = args.num_local_experts;
  const int lane = lane_id();
  const int64_t row_bytes = hidden * static_cast<int64_t>(sizeof(T));
  const unsigned num_scatter_blocks = gridDim.x - kPaddingBlocks;
  if (blockIdx.x >= num_scatter_blocks) {
    const int64_t first_warp = static_cast<int64_t>(blockIdx.x - num_scatter_blocks) * kWarpsPerRowBlock +
                               threadIdx.x / kWarpSize;
    const int64_t num_warps = static_cast<int64_t>(kPaddingBlocks) * kWarpsPerRowBlock;
    for (int segment = 0; segment <= num_local_experts; ++segment) {
      const RowRange padding = padding_rows(args.expert_offsets, args.num_tokens_per_expert, num_local_experts,
                                            segment, num_out_rows);
      for (int64_t row = padding.begin + first_warp; row < padding.end; row += num_warps)
        warp_fill(reinterpret_cast<uint8_t*>(out + row * hidden), 0, row_bytes, lane);
    }
    return;
  }
  const int64_t first_warp = static_cast<int64_t>(blockIdx.x) * kWarpsPerRowBlock + threadIdx.x / kWarpSize;
  const int64_t num_warps = static_cast<int64_t>(num_scatter_blocks) * kWarpsPerRowBlock;
  for (int64_t n = first_warp; n < num_rows; n += num_warps)
    for (int k = 0; k < num_topk; ++k) {
      const int32_t pos = args.pair_pos[n * num_topk + k];
      if (pos < 0 || pos >= num_out_rows) continue;
      T* target = out + static_cast<int64_t>(pos) * hidden;
      if (topk_weights == nullptr) {
        warp_copy(reinterpret_cast<uint8_t*>(target), reinterpret_cast<const uint8_t*>(x + n * hidden), row_bytes,
                  lane);
        continue;
      }
      const Acc weight = topk_weights[n * num_topk + k];
      // The product rounded once to T, as cpu::permute_rows writes it.
      for (int64_t v = lane; v < hidden / kVector; v += kWarpSize) {
        const ElementVector<T, kVector> loaded =
            vector_load(reinterpret_cast<const ElementVector<T, kVector>*>(x + n * hidden) + v);
        Acc product[kVector];
#pragma unroll
        for (int j = 0; j < kVector; ++j) product[j] = to_accumulator(loaded.values[j]) * weight;
        store_vector<T, kVector>(target, v, product);
      }
    }
}

// One warp per output row; lanes own kVector consecutive elements at a time.
template <typename T, int kVector>
__global__ void unpermute_rows_kernel(UnpermuteRowsArgs args) {
  using Acc = AccumulatorOf<T>;
  const auto* y = static_cast<const T*>(args.y);
  auto* out = static_cast<T*>(args.out);
  const auto* topk_weights = static_cast<const Acc*>(args.topk_weights);
  const int64_t hidden = args.hidden, num_in_rows = args.num_in_rows, num_rows = args.num_rows;
  const int num_topk = args.num_topk;
  const int32_t* pair_pos = args.pair_pos;
  const int lane = lane_id();
  for (int64_t n = global_warp_id(); n < num_rows; n += num_global_warps())
    for (int64_t v = lane; v < hidden / kVector; v += kWarpSize) {
      Acc acc[kVector];
#pragma unroll
      for (int j = 0; j < kVector; ++j) acc[j] = Acc{0};
      for (int k = 0; k < num_topk; ++k) {
        const int32_t pos = pair_pos[n * num_topk + k];
        if (pos < 0 || pos >= num_in_rows) continue;
        const Acc weight = topk_weights != nullptr ? topk_weights[n * num_topk + k] : Acc{1};
        add_vector<T, kVector>(acc, y + static_cast<int64_t>(pos) * hidden, v, weight, topk_weights != nullptr);
      }
      store_vector<T, kVector>(out + n * hidden, v, acc);
    }
}

}  // namespace

void permute_layout(const PermuteLayoutArgs& args, cudaStream_t stream) {
  if (args.num_local_experts < 1 || args.num_local_experts > kLayoutSharedInts)
    throw std::invalid_argument("eplib: the CUDA permutation supports 1 to " + std::to_string(kLayoutSharedInts) +
                                " local experts, got " + std::to_string(args.num_local_experts));
  if (args.expert_alignment < 1)
    throw std::invalid_argument("eplib: expert_alignment must be >= 1, got " + std::to_string(args.expert_alignment));
  // As many ranking warps as the per-(warp, expert) counters leave room for.
  const int max_warps = kLayoutThreads / kWarpSize;
  const int64_t fitting_warps = kLayoutSharedInts / args.num_local_experts;
  const int num_ranking_warps = static_cast<int>(fitting_warps < max_warps ? fitting_warps : max_warps);
  const size_t shared_bytes = static_cast<size_t>(num_ranking_warps) * args.num_local_experts * sizeof(int32_t);
  launch("permute_layout_kernel", permute_layout_kernel, {1, kLayoutThreads}, shared_bytes, stream, args,
         num_ranking_warps);
}

void permute_rows(const PermuteRowsArgs& args, cudaStream_t stream) {
  visit_cuda_dtype(args.dtype, [&](auto element) {
    using T = decltype(element);
    if (args.num_out_rows == 0) return;
    const bool aligned = all_16_byte_aligned({reinterpret_cast<uintptr_t>(args.x), reinterpret_cast<uintptr_t>(args.out),
                                              static_cast<uint64_t>(args.hidden * sizeof(T))});
    const unsigned grid = grid_for(args.num_rows, kWarpsPerRowBlock) + kPaddingBlocks;
    visit_vector_width<T>(aligned, [&](auto vector) {
      launch("permute_rows_kernel", permute_rows_kernel<T, decltype(vector)::value>, {grid, kRowThreads}, 0, stream,
             args);
    });
  });
}

void unpermute_rows(const UnpermuteRowsArgs& args, cudaStream_t stream) {
  visit_cuda_dtype(args.dtype, [&](auto element) {
    using T = decltype(element);
    if (args.num_rows == 0) return;
    const bool aligned = all_16_byte_aligned({reinterpret_cast<uintptr_t>(args.y), reinterpret_cast<uintptr_t>(args.out),
                                              static_cast<uint64_t>(args.hidden * sizeof(T))});
    visit_vector_width<T>(aligned, [&](auto vector) {
      launch("unpermute_rows_kernel", unpermute_rows_kernel<T, decltype(vector)::value>,
             {grid_for(args.num_rows, kWarpsPerRowBlock), kRowThreads}, 0, stream, args);
    });
  });
}

void detail::preload_permute_kernels() {
  preload(permute_layout_kernel, permute_rows_kernel<float, 4>, permute_rows_kernel<float, 1>,
          permute_rows_kernel<bf16_t, 8>, permute_rows_kernel<bf16_t, 1>, unpermute_rows_kernel<float, 4>,
          unpermute_rows_kernel<float, 1>, unpermute_rows_kernel<bf16_t, 8>, unpermute_rows_kernel<bf16_t, 1>);
}

}  // namespace eplib::cuda
