#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "eplib/layout.h"
#include "kernels.h"
#include "parallel.h"

namespace eplib::cpu {

namespace {

constexpr int64_t kRowsPerChunk = 256;

std::string slot_name(const char* tensor, int64_t token, int k) {
  return std::string(tensor) + "[" + std::to_string(token) + ", " + std::to_string(k) + "]";
}

// Rejects ids outside [-1, E), non-finite weights, and experts whose rank is not marked in
// is_token_in_rank (their slot would silently be dropped).
void check_token_topk(const int64_t* topk_idx, const float* topk_weights, int num_topk, int num_experts,
                      const int32_t* token_send_pos, int experts_per_rank, int64_t token) {
  for (int k = 0; k < num_topk; ++k) {
    const int64_t expert = topk_idx[k];
    if (expert < -1 || expert >= num_experts)
      throw std::invalid_argument(slot_name("topk_idx", token, k) + " = " + std::to_string(expert) +
                                  " is outside [-1, num_experts=" + std::to_string(num_experts) + ")");
    if (topk_weights != nullptr && !std::isfinite(topk_weights[k]))
      throw std::invalid_argument(slot_name("topk_weights", token, k) + " = " + std::to_string(topk_weights[k]) +
                                  " is not finite");
    if (expert >= 0 && token_send_pos[rank_of_expert(expert, experts_per_rank)] < 0)
      throw std::invalid_argument(slot_name("topk_idx", token, k) + " = " + std::to_string(expert) +
                                  " lives on rank " + std::to_string(rank_of_expert(expert, experts_per_rank)) +
                                  ", but is_token_in_rank[" + std::to_string(token) + ", " +
                                  std::to_string(rank_of_expert(expert, experts_per_rank)) + "] is False");
  }
}

// Scales [token, 0..num_scales) through their strides into a packed row.
void copy_scales(uint8_t* row_scales, const uint8_t* x_scales, int64_t token, int64_t num_scales, int64_t token_stride,
                 int64_t column_stride) {
  if (column_stride == 1) {
    std::memcpy(row_scales, x_scales + scale_offset(token, 0, token_stride, 1), num_scales * kScaleBytes);
    return;
  }
  for (int64_t j = 0; j < num_scales; ++j)
    std::memcpy(row_scales + j * kScaleBytes, x_scales + scale_offset(token, j, token_stride, column_stride),
                kScaleBytes);
}

}  // namespace

void dispatch_pack(const uint8_t* x, int64_t x_bytes, const uint8_t* x_scales, int64_t scales_bytes,
                   int64_t scales_token_stride, int64_t scales_column_stride, const int64_t* topk_idx, const float* topk_weights, int num_topk, int num_experts,
                   const int32_t* send_pos, int64_t num_tokens, int num_ranks, uint8_t* send_buffer) {
  const bool has_topk = topk_idx != nullptr;
  const DispatchRowLayout layout = make_dispatch_row_layout(x_bytes, scales_bytes, has_topk ? num_topk : 0);
  const int experts_per_rank = num_experts / num_ranks;
  parallel_for(num_tokens, kRowsPerChunk, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int32_t* token_send_pos = send_pos + t * num_ranks;
      const int64_t* token_topk_idx = has_topk ? topk_idx + t * num_topk : nullptr;
      const float* token_topk_weights = has_topk && topk_weights != nullptr ? topk_weights + t * num_topk : nullptr;
      if (has_topk)
        check_token_topk(token_topk_idx, token_topk_weights, num_topk, num_experts, token_send_pos, experts_per_rank,
                         t);
      for (int r = 0; r < num_ranks; ++r) {
        if (token_send_pos[r] < 0) continue;
        uint8_t* row = send_buffer + static_cast<int64_t>(token_send_pos[r]) * layout.stride;
        std::memcpy(row, x + t * x_bytes, x_bytes);
        if (scales_bytes > 0)
          copy_scales(row + layout.scales_offset, x_scales, t, scales_bytes / kScaleBytes, scales_token_stride,
                      scales_column_stride);
        const int32_t src_idx = static_cast<int32_t>(t);
        std::memcpy(row + layout.src_idx_offset, &src_idx, sizeof(src_idx));
        for (int k = 0; k < layout.num_topk; ++k) {
          const int32_t local_id = local_expert_id(token_topk_idx[k], r, experts_per_rank);
          const float weight = (local_id >= 0 && token_topk_weights != nullptr) ? token_topk_weights[k] : 0.0f;
          std::memcpy(row + layout.topk_idx_offset + k * sizeof(int32_t), &local_id, sizeof(local_id));
          std::memcpy(row + layout.topk_weights_offset + k * sizeof(float), &weight, sizeof(weight));
        }
      }
    }
  });
}

void dispatch_unpack(const uint8_t* recv_buffer, int64_t num_rows, int64_t x_bytes, int64_t scales_bytes,
                     int num_topk, int num_local_experts, uint8_t* recv_x, uint8_t* recv_x_scales,
                     int32_t* recv_src_idx, int64_t* recv_topk_idx, float* recv_topk_weights,
                     int64_t* num_recv_tokens_per_expert) {
  const DispatchRowLayout layout = make_dispatch_row_layout(x_bytes, scales_bytes, num_topk);
  const int64_t num_chunks = num_chunks_for(num_rows, kRowsPerChunk);
  // Per-chunk expert counts, summed in chunk order afterwards.
  std::vector<int64_t> chunk_counts(num_chunks * static_cast<int64_t>(num_local_experts), 0);
  parallel_chunks(num_rows, num_chunks, [&](int64_t chunk, int64_t begin, int64_t end) {
    int64_t* counts = chunk_counts.data() + chunk * num_local_experts;
    for (int64_t i = begin; i < end; ++i) {
      const uint8_t* row = recv_buffer + i * layout.stride;
      std::memcpy(recv_x + i * x_bytes, row, x_bytes);
      if (scales_bytes > 0) std::memcpy(recv_x_scales + i * scales_bytes, row + layout.scales_offset, scales_bytes);
      std::memcpy(recv_src_idx + i, row + layout.src_idx_offset, sizeof(int32_t));
      for (int k = 0; k < num_topk; ++k) {
        int32_t local_id;
        std::memcpy(&local_id, row + layout.topk_idx_offset + k * sizeof(int32_t), sizeof(local_id));
        recv_topk_idx[i * num_topk + k] = local_id;
        // Senders only write ids in [-1, num_local_experts); the bound keeps a corrupt row harmless.
        if (local_id >= 0 && local_id < num_local_experts) ++counts[local_id];
        std::memcpy(recv_topk_weights + i * num_topk + k, row + layout.topk_weights_offset + k * sizeof(float),
                    sizeof(float));
      }
    }
  });
  if (num_recv_tokens_per_expert == nullptr) return;
  std::fill(num_recv_tokens_per_expert, num_recv_tokens_per_expert + num_local_experts, 0);
  for (int64_t chunk = 0; chunk < num_chunks; ++chunk)
    for (int e = 0; e < num_local_experts; ++e) num_recv_tokens_per_expert[e] += chunk_counts[chunk * num_local_experts + e];
}

}  // namespace eplib::cpu
