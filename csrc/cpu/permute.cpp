#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "dtype_dispatch.h"
#include "eplib/permute.h"
#include "kernels.h"
#include "parallel.h"

namespace eplib::cpu {

namespace {

constexpr int64_t kRowsPerLayoutChunk = 2048;
constexpr int64_t kRowsPerCopyChunk = 64;

// out[pair_pos[n, k]] = x[n] (times w[n, k] when weights are given), then the padding rows zeroed.
template <typename T>
void permute_rows_typed(const T* x, int64_t num_rows, int64_t hidden, int num_topk, const int32_t* pair_pos,
                        const AccumulatorOf<T>* topk_weights, const int64_t* expert_offsets,
                        const int64_t* num_tokens_per_expert, int num_local_experts, int64_t num_out_rows, T* out) {
  parallel_for(num_rows, kRowsPerCopyChunk, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const T* source = x + n * hidden;
      for (int k = 0; k < num_topk; ++k) {
        const int32_t pos = pair_pos[n * num_topk + k];
        if (pos < 0 || pos >= num_out_rows) continue;
        T* target = out + static_cast<int64_t>(pos) * hidden;
        if (topk_weights == nullptr) {
          std::memcpy(target, source, hidden * sizeof(T));
        } else {
          const AccumulatorOf<T> weight = topk_weights[n * num_topk + k];
          for (int64_t h = 0; h < hidden; ++h) target[h] = from_accumulator<T>(to_accumulator(source[h]) * weight);
        }
      }
    }
  });
  // Zero bytes are +0.0 in every float type.
  for (int segment = 0; segment <= num_local_experts; ++segment) {
    const RowRange padding = padding_rows(expert_offsets, num_tokens_per_expert, num_local_experts, segment,
                                          num_out_rows);
    if (padding.end > padding.begin)
      std::memset(out + padding.begin * hidden, 0, (padding.end - padding.begin) * hidden * sizeof(T));
  }
}

// out[n] = sum over k ascending with a valid pair_pos of w[n, k] * y[pair_pos[n, k]] (w = 1 without
// weights), accumulated in AccumulatorOf<T> from 0; a row without pairs is 0.
template <typename T>
void unpermute_rows_typed(const T* y, int64_t num_in_rows, int64_t hidden, int num_topk, const int32_t* pair_pos,
                          const AccumulatorOf<T>* topk_weights, int64_t num_rows, T* out) {
  using Acc = AccumulatorOf<T>;
  parallel_for(num_rows, kRowsPerCopyChunk, [&](int64_t begin, int64_t end) {
    std::vector<Acc> acc(hidden);
    for (int64_t n = begin; n < end; ++n) {
      std::fill(acc.begin(), acc.end(), Acc{0});
      for (int k = 0; k < num_topk; ++k) {
        const int32_t pos = pair_pos[n * num_topk + k];
        if (pos < 0 || pos >= num_in_rows) continue;
        const T* source = y + static_cast<int64_t>(pos) * hidden;
        if (topk_weights == nullptr) {
          for (int64_t h = 0; h < hidden; ++h) acc[h] += to_accumulator(source[h]);
        } else {
          const Acc weight = topk_weights[n * num_topk + k];
          for (int64_t h = 0; h < hidden; ++h) acc[h] += weight * to_accumulator(source[h]);
        }
      }
      for (int64_t h = 0; h < hidden; ++h) out[n * hidden + h] = from_accumulator<T>(acc[h]);
    }
  });
}

}  // namespace

void permute_layout(const int64_t* topk_idx, int64_t num_rows, int num_topk, int num_local_experts,
                    int64_t expert_alignment, int64_t num_out_rows, int32_t* pair_pos, int64_t* expert_offsets,
                    int64_t* num_tokens_per_expert) {
  const int64_t num_chunks = num_chunks_for(num_rows, kRowsPerLayoutChunk);
  // Pass 1: pairs per (chunk, expert). Pass 2: each chunk numbers its pairs from its own offsets.
  std::vector<int64_t> chunk_counts(num_chunks * num_local_experts, 0);
  parallel_chunks(num_rows, num_chunks, [&](int64_t chunk, int64_t begin, int64_t end) {
    int64_t* counts = chunk_counts.data() + chunk * num_local_experts;
    for (int64_t n = begin; n < end; ++n)
      for (int k = 0; k < num_topk; ++k) {
        const int64_t expert = topk_idx[n * num_topk + k];
        if (!is_valid_local_expert_id(expert, num_local_experts))
          throw std::invalid_argument("topk_idx[" + std::to_string(n) + ", " + std::to_string(k) + "] = " +
                                      std::to_string(expert) + " is outside [-1, num_local_experts=" +
                                      std::to_string(num_local_experts) + ")");
        if (expert >= 0) ++counts[expert];
      }
  });
  std::vector<int64_t> chunk_offsets(num_chunks * num_local_experts);
  expert_offsets[0] = 0;
  for (int e = 0; e < num_local_experts; ++e) {
    int64_t offset = expert_offsets[e];
    for (int64_t chunk = 0; chunk < num_chunks; ++chunk) {
      chunk_offsets[chunk * num_local_experts + e] = offset;
      offset += chunk_counts[chunk * num_local_experts + e];
    }
    num_tokens_per_expert[e] = offset - expert_offsets[e];
    expert_offsets[e + 1] = expert_offsets[e] + align_up(num_tokens_per_expert[e], expert_alignment);
  }
  if (num_out_rows > 0 && expert_offsets[num_local_experts] > num_out_rows)
    throw std::invalid_argument("num_out_rows: the permutation needs " +
                                std::to_string(expert_offsets[num_local_experts]) + " rows (expert_alignment=" +
                                std::to_string(expert_alignment) + "), more than num_out_rows=" +
                                std::to_string(num_out_rows));
  parallel_chunks(num_rows, num_chunks, [&](int64_t chunk, int64_t begin, int64_t end) {
    std::vector<int64_t> next(chunk_offsets.begin() + chunk * num_local_experts,
                              chunk_offsets.begin() + (chunk + 1) * num_local_experts);
    for (int64_t n = begin; n < end; ++n)
      for (int k = 0; k < num_topk; ++k) {
        const int64_t expert = topk_idx[n * num_topk + k];
        pair_pos[n * num_topk + k] = expert >= 0 ? bounded_pair_pos(next[expert]++, num_out_rows) : -1;
      }
  });
}

void permute_rows(DType dtype, const void* x, int64_t num_rows, int64_t hidden, int num_topk, const int32_t* pair_pos,
                  const void* topk_weights, const int64_t* expert_offsets, const int64_t* num_tokens_per_expert,
                  int num_local_experts, int64_t num_out_rows, void* out) {
  visit_dtype(dtype, [&](auto element) {
    using T = decltype(element);
    permute_rows_typed<T>(static_cast<const T*>(x), num_rows, hidden, num_topk, pair_pos,
                          static_cast<const AccumulatorOf<T>*>(topk_weights), expert_offsets, num_tokens_per_expert,
                          num_local_experts, num_out_rows, static_cast<T*>(out));
  });
}

void unpermute_rows(DType dtype, const void* y, int64_t num_in_rows, int64_t hidden, int num_topk,
                    const int32_t* pair_pos, const void* topk_weights, int64_t num_rows, void* out) {
  visit_dtype(dtype, [&](auto element) {
    using T = decltype(element);
    unpermute_rows_typed<T>(static_cast<const T*>(y), num_in_rows, hidden, num_topk, pair_pos,
                            static_cast<const AccumulatorOf<T>*>(topk_weights), num_rows, static_cast<T*>(out));
  });
}

}  // namespace eplib::cpu
