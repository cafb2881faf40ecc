#include <algorithm>
#include <stdexcept>
#include <string>
#include <vector>

#include "eplib/layout.h"
#include "kernels.h"
#include "parallel.h"

namespace eplib::cpu {

namespace {
constexpr int64_t kTokensPerChunk = 2048;
}

void dispatch_layout(const int64_t* topk_idx, int64_t num_tokens, int num_topk, int num_experts, int num_ranks,
                     int32_t* num_tokens_per_rank, int32_t* num_tokens_per_expert, bool* is_token_in_rank) {
  const int experts_per_rank = num_experts / num_ranks;
  const int64_t num_chunks = num_chunks_for(num_tokens, kTokensPerChunk);
  // One row of partial counts per chunk, summed in chunk order afterwards.
  std::vector<int32_t> rank_counts(num_chunks * num_ranks, 0);
  std::vector<int32_t> expert_counts(num_chunks * num_experts, 0);
  parallel_chunks(num_tokens, num_chunks, [&](int64_t chunk, int64_t begin, int64_t end) {
    int32_t* chunk_rank_counts = rank_counts.data() + chunk * num_ranks;
    int32_t* chunk_expert_counts = expert_counts.data() + chunk * num_experts;
    for (int64_t t = begin; t < end; ++t) {
      bool* in_rank = is_token_in_rank + t * num_ranks;
      std::fill(in_rank, in_rank + num_ranks, false);
      for (int k = 0; k < num_topk; ++k) {
        const int64_t expert = topk_idx[t * num_topk + k];
        if (expert < -1 || expert >= num_experts)
          throw std::invalid_argument("topk_idx[" + std::to_string(t) + ", " + std::to_string(k) + "] = " +
                                      std::to_string(expert) + " is outside [-1, num_experts=" +
                                      std::to_string(num_experts) + ")");
        if (expert < 0) continue;
        ++chunk_expert_counts[expert];
        in_rank[rank_of_expert(expert, experts_per_rank)] = true;
      }
      for (int r = 0; r < num_ranks; ++r) chunk_rank_counts[r] += in_rank[r];
    }
  });
  std::fill(num_tokens_per_rank, num_tokens_per_rank + num_ranks, 0);
  std::fill(num_tokens_per_expert, num_tokens_per_expert + num_experts, 0);
  for (int64_t chunk = 0; chunk < num_chunks; ++chunk) {
    for (int r = 0; r < num_ranks; ++r) num_tokens_per_rank[r] += rank_counts[chunk * num_ranks + r];
    for (int e = 0; e < num_experts; ++e) num_tokens_per_expert[e] += expert_counts[chunk * num_experts + e];
  }
}

void send_positions(const bool* is_token_in_rank, int64_t num_tokens, int num_ranks, int32_t* send_pos,
                    int32_t* num_tokens_per_rank) {
  const int64_t num_chunks = num_chunks_for(num_tokens, kTokensPerChunk);
  // Pass 1: tokens per (chunk, rank). Pass 2: positions from the exclusive prefix over ranks, then chunks.
  std::vector<int32_t> chunk_counts(num_chunks * num_ranks, 0);
  parallel_chunks(num_tokens, num_chunks, [&](int64_t chunk, int64_t begin, int64_t end) {
    int32_t* counts = chunk_counts.data() + chunk * num_ranks;
    for (int64_t t = begin; t < end; ++t)
      for (int r = 0; r < num_ranks; ++r) counts[r] += is_token_in_rank[t * num_ranks + r];
  });
  std::vector<int32_t> chunk_offsets(num_chunks * num_ranks);
  int32_t rank_start = 0;
  for (int r = 0; r < num_ranks; ++r) {
    int32_t offset = rank_start;
    for (int64_t chunk = 0; chunk < num_chunks; ++chunk) {
      chunk_offsets[chunk * num_ranks + r] = offset;
      offset += chunk_counts[chunk * num_ranks + r];
    }
    num_tokens_per_rank[r] = offset - rank_start;
    rank_start = offset;
  }
  parallel_chunks(num_tokens, num_chunks, [&](int64_t chunk, int64_t begin, int64_t end) {
    std::vector<int32_t> next(chunk_offsets.begin() + chunk * num_ranks, chunk_offsets.begin() + (chunk + 1) * num_ranks);
    for (int64_t t = begin; t < end; ++t)
      for (int r = 0; r < num_ranks; ++r)
        send_pos[t * num_ranks + r] = is_token_in_rank[t * num_ranks + r] ? next[r]++ : -1;
  });
}

}  // namespace eplib::cpu
