// Device helpers of the row kernels: vector loads and stores of element rows with fp32 (or fp64)
// accumulation, and the block-local table of receive regions.
#pragma once

#include "common.cuh"
#include "eplib/layout.h"

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

}  // namespace eplib::cuda
