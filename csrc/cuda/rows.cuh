// Device helpers of the row kernels: vector loads and stores of element rows with fp32 (or fp64)
// accumulation, and the block-local table of receive regions.
#pragma once

#include <cmath>

#include "common.cuh"
#include "eplib/layout.h"
#include "kernels.h"

namespace eplib::cuda {

// Receive regions of up to kMaxRanks sources, kept in shared memory by the unpack and pack kernels.
constexpr int kMaxRanks = 1024;

// compact_start[0..R] of eplib/layout.h for the device counts recv_counts, computed by thread 0 and
// shared with the block (all threads must call). Returns whether a slot-mode count was clipped.
__device__ inline bool load_compact_starts(const int32_t* recv_counts, int num_ranks, int64_t slot_rows,
                                           int64_t* compact_start) {
  __shared__ bool clipped;
  if (threadIdx.x == 0) {
    int64_t start = 0;
    clipped = false;
    for (int s = 0; s < num_ranks; ++s) {
      compact_start[s] = start;
      const int64_t rows = region_rows(recv_counts[s], slot_rows);
      clipped |= rows < recv_counts[s];
      start += rows;
    }
    compact_start[num_ranks] = start;
  }
  __syncthreads();
  return clipped;
}

// acc[j] += (weighted ? weight * row[v * N + j] : row[v * N + j]) for j < N, in Acc: the same
// operations, in the same order, as the CPU kernels (no FMA contraction: --fmad=false).
template <typename T, int N, typename Acc>
__device__ __forceinline__ void add_vector(Acc (&acc)[N], const T* row, int64_t v, Acc weight, bool weighted) {
  const ElementVector<T, N> loaded = vector_load(reinterpret_cast<const ElementVector<T, N>*>(row) + v);
#pragma unroll
  for (int j = 0; j < N; ++j) {
    const Acc value = to_accumulator(loaded.values[j]);
    acc[j] += weighted ? weight * value : value;
  }
}

template <typename T, int N, typename Acc>
__device__ __forceinline__ void store_vector(T* row, int64_t v, const Acc (&acc)[N]) {
  ElementVector<T, N> stored;
#pragma unroll
  for (int j = 0; j < N; ++j) stored.values[j] = from_accumulator<T>(acc[j]);
  vector_store(reinterpret_cast<ElementVector<T, N>*>(row) + v, stored);
}

// Scales [t, :] through their strides into a packed row: row-major ones as one warp copy, others one
// 4-byte scale per lane.
__device__ __forceinline__ void warp_copy_scales(uint8_t* row_scales, const DispatchPackArgs& args,
                                                 const DispatchRowLayout& layout, int64_t t, int lane) {
  const uint8_t* first = args.x_scales + scale_offset(t, 0, args.scales_token_stride, args.scales_column_stride);
  if (args.scales_column_stride == 1) {
    warp_copy(row_scales, first, layout.scales_bytes, lane);
    return;
  }
  const int64_t num_scales = layout.scales_bytes / kScaleBytes;
  for (int64_t j = lane; j < num_scales; j += kWarpSize)
    vector_store(reinterpret_cast<int32_t*>(row_scales) + j,
                 vector_load(reinterpret_cast<const int32_t*>(first + scale_offset(0, j, 0, args.scales_column_stride))));
}

// Token t's dispatch row for `destination`, written by the whole warp: x, FP8 scales, the source
// index, the token's ids as the destination's local ids (-1 where another rank owns the expert, and
// for an id outside [-1, E), which is no rank's) and its weights where the id is local (else 0).
__device__ __forceinline__ void write_dispatch_row(uint8_t* row, const DispatchPackArgs& args,
                                                   const DispatchRowLayout& layout, int64_t t, int destination,
                                                   int lane) {
  warp_copy(row, args.x + t * layout.x_bytes, layout.x_bytes, lane);
  if (layout.scales_bytes > 0) warp_copy_scales(row + layout.scales_offset, args, layout, t, lane);
  if (lane == 0) *reinterpret_cast<int32_t*>(row + layout.src_idx_offset) = static_cast<int32_t>(t);
  const int experts_per_rank = args.num_experts / args.num_ranks;
  for (int k = lane; k < layout.num_topk; k += kWarpSize) {
    const int64_t expert = args.topk_idx[t * layout.num_topk + k];
    const int32_t local_id = expert < args.num_experts ? local_expert_id(expert, destination, experts_per_rank) : -1;
    const float weight =
        (local_id >= 0 && args.topk_weights != nullptr) ? args.topk_weights[t * layout.num_topk + k] : 0.0f;
    reinterpret_cast<int32_t*>(row + layout.topk_idx_offset)[k] = local_id;
    reinterpret_cast<float*>(row + layout.topk_weights_offset)[k] = weight;
  }
}

// A received dispatch row into output row i (x, scales, source index, ids, weights), by the whole
// warp; count(local_id) is called once for every local expert id of the row.
template <typename Count>
__device__ __forceinline__ void read_dispatch_row(const uint8_t* row, const DispatchUnpackArgs& args,
                                                  const DispatchRowLayout& layout, int64_t i, int num_counted_experts,
                                                  const Count& count, int lane) {
  const int num_topk = layout.num_topk;
  warp_copy(args.recv_x + i * layout.x_bytes, row, layout.x_bytes, lane);
  if (layout.scales_bytes > 0)
    warp_copy(args.recv_x_scales + i * layout.scales_bytes, row + layout.scales_offset, layout.scales_bytes, lane);
  if (lane == 0) args.recv_src_idx[i] = *reinterpret_cast<const int32_t*>(row + layout.src_idx_offset);
  for (int k = lane; k < num_topk; k += kWarpSize) {
    const int32_t local_id = reinterpret_cast<const int32_t*>(row + layout.topk_idx_offset)[k];
    args.recv_topk_idx[i * num_topk + k] = local_id;
    args.recv_topk_weights[i * num_topk + k] = reinterpret_cast<const float*>(row + layout.topk_weights_offset)[k];
    // Senders only write ids in [-1, E_local); the bound keeps a corrupt row harmless.
    if (local_id >= 0 && local_id < num_counted_experts) count(local_id);
  }
}

// Output row i of a dispatch as padding (zero bytes, index -1), by the whole warp.
__device__ __forceinline__ void pad_dispatch_row(const DispatchUnpackArgs& args, const DispatchRowLayout& layout,
                                                 int64_t i, uint8_t byte, int lane) {
  warp_fill(args.recv_x + i * layout.x_bytes, byte, layout.x_bytes, lane);
  if (layout.scales_bytes > 0) warp_fill(args.recv_x_scales + i * layout.scales_bytes, byte, layout.scales_bytes, lane);
  if (lane == 0) args.recv_src_idx[i] = -1;
  for (int k = lane; k < layout.num_topk; k += kWarpSize) {
    args.recv_topk_idx[i * layout.num_topk + k] = -1;
    args.recv_topk_weights[i * layout.num_topk + k] = byte == 0 ? 0.0f : NAN;
  }
}

// Token t's combine, by the whole warp, each lane kVector consecutive elements at a time: per element
// 0, then bias_0, bias_1, then the rows of ranks 0, 1, ... in that order (cpu::combine_reduce's
// order), summed in fp32 and cast once; row_of(r) is rank r's row for t, or null when t did not go to r.
template <typename T, int kVector, typename RowOf>
__device__ __forceinline__ void reduce_token(const CombineReduceArgs& args, const CombineRowLayout& layout, int64_t t,
                                             const RowOf& row_of, int lane) {
  const int64_t hidden = args.hidden;
  const auto* bias_0 = static_cast<const T*>(args.bias_0);
  const auto* bias_1 = static_cast<const T*>(args.bias_1);
  auto* combined_x = static_cast<T*>(args.combined_x);
  for (int64_t v = lane; v < hidden / kVector; v += kWarpSize) {
    float acc[kVector];
#pragma unroll
    for (int j = 0; j < kVector; ++j) acc[j] = 0.0f;
    if (bias_0 != nullptr) add_vector<T, kVector>(acc, bias_0 + t * hidden, v, 1.0f, false);
    if (bias_1 != nullptr) add_vector<T, kVector>(acc, bias_1 + t * hidden, v, 1.0f, false);
    for (int r = 0; r < args.num_ranks; ++r) {
      const uint8_t* row = row_of(r);
      if (row != nullptr) add_vector<T, kVector>(acc, reinterpret_cast<const T*>(row), v, 1.0f, false);
    }
    store_vector<T, kVector>(combined_x + t * hidden, v, acc);
  }
  if (args.combined_topk_weights == nullptr) return;
  for (int k = lane; k < layout.num_topk; k += kWarpSize) {
    float sum = 0.0f;
    for (int r = 0; r < args.num_ranks; ++r) {
      const uint8_t* row = row_of(r);
      if (row != nullptr) sum += reinterpret_cast<const float*>(row + layout.topk_weights_offset)[k];
    }
    args.combined_topk_weights[t * layout.num_topk + k] = sum;
  }
}

}  // namespace eplib::cuda
