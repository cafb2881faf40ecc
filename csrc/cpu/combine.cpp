#include <cstring>
#include <vector>

#include "dtype_dispatch.h"
#include "eplib/layout.h"
#include "kernels.h"
#include "parallel.h"

namespace eplib::cpu {

namespace {

constexpr int64_t kRowsPerChunk = 128;

template <typename T>
void combine_reduce_typed(const uint8_t* recv_buffer, int64_t hidden, int num_topk, const int32_t* send_pos,
                          int64_t num_tokens, int num_ranks, const T* bias_0, const T* bias_1, T* combined_x,
                          float* combined_topk_weights) {
  const CombineRowLayout layout = make_combine_row_layout(hidden * static_cast<int64_t>(sizeof(T)), num_topk);
  using Acc = AccumulatorOf<T>;
  parallel_for(num_tokens, kRowsPerChunk, [&](int64_t begin, int64_t end) {
    std::vector<Acc> acc(hidden);
    for (int64_t t = begin; t < end; ++t) {
      // Bias first, then ranks in ascending order: the summation order every transport follows.
      for (int64_t h = 0; h < hidden; ++h) acc[h] = Acc{0};
      if (bias_0 != nullptr)
        for (int64_t h = 0; h < hidden; ++h) acc[h] += to_accumulator(bias_0[t * hidden + h]);
      if (bias_1 != nullptr)
        for (int64_t h = 0; h < hidden; ++h) acc[h] += to_accumulator(bias_1[t * hidden + h]);
      float* token_weights = combined_topk_weights != nullptr ? combined_topk_weights + t * num_topk : nullptr;
      if (token_weights != nullptr)
        for (int k = 0; k < num_topk; ++k) token_weights[k] = 0.0f;
      for (int r = 0; r < num_ranks; ++r) {
        const int32_t pos = send_pos[t * num_ranks + r];
        if (pos < 0) continue;
        const uint8_t* row = recv_buffer + static_cast<int64_t>(pos) * layout.stride;
        const T* values = reinterpret_cast<const T*>(row);
        for (int64_t h = 0; h < hidden; ++h) acc[h] += to_accumulator(values[h]);
        if (token_weights != nullptr)
          for (int k = 0; k < num_topk; ++k) {
            float weight;
            std::memcpy(&weight, row + layout.topk_weights_offset + k * sizeof(float), sizeof(weight));
            token_weights[k] += weight;
          }
      }
      for (int64_t h = 0; h < hidden; ++h) combined_x[t * hidden + h] = from_accumulator<T>(acc[h]);
    }
  });
}

}  // namespace

void combine_pack(const uint8_t* x, int64_t x_bytes, const float* topk_weights, int num_topk, int64_t num_rows,
                  uint8_t* send_buffer) {
  const CombineRowLayout layout = make_combine_row_layout(x_bytes, num_topk);
  parallel_for(num_rows, kRowsPerChunk, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      uint8_t* row = send_buffer + i * layout.stride;
      std::memcpy(row, x + i * x_bytes, x_bytes);
      std::memcpy(row + layout.topk_weights_offset, topk_weights + i * num_topk, num_topk * sizeof(float));
    }
  });
}

void combine_reduce(DType dtype, const uint8_t* recv_buffer, int64_t hidden, int num_topk, const int32_t* send_pos,
                    int64_t num_tokens, int num_ranks, const void* bias_0, const void* bias_1, void* combined_x,
                    float* combined_topk_weights) {
  visit_dtype(dtype, [&](auto element) {
    using T = decltype(element);
    combine_reduce_typed<T>(recv_buffer, hidden, num_topk, send_pos, num_tokens, num_ranks,
                            static_cast<const T*>(bias_0), static_cast<const T*>(bias_1), static_cast<T*>(combined_x),
                            combined_topk_weights);
  });
}

}  // namespace eplib::cpu
