// Index arithmetic of the expert-major permutation (eplib.permute_by_expert), shared by the CPU
// and CUDA kernels.
//
// The (row n, slot k) pairs whose local expert id is e >= 0 are laid out expert after expert; inside
// expert e's segment they keep (row, slot) order. Each segment is padded to a multiple of
// `expert_alignment` rows, so that grouped GEMMs can tile it:
//   expert_offsets[0] = 0, expert_offsets[e + 1] = expert_offsets[e] + align_up(count[e], alignment)
//   pair_pos[n, k]    = expert_offsets[e] + #(pairs of expert e before (n, k)), or -1
// Rows [expert_offsets[e] + count[e], expert_offsets[e + 1]) are padding (zero), as are the rows
// past expert_offsets[E] of a fixed-size output.
#pragma once

#include <cstdint>

#include "eplib/layout.h"
#include "eplib/macros.h"

namespace eplib {

// True for an id the permutation accepts: a local expert or the masked slot -1.
EPLIB_HOST_DEVICE bool is_valid_local_expert_id(int64_t id, int num_local_experts) {
  return id >= -1 && id < num_local_experts;
}

// pair_pos of a pair at `row` of the expert-major output, or -1 when a fixed-size output of
// num_out_rows rows (> 0) cannot hold it.
EPLIB_HOST_DEVICE int32_t bounded_pair_pos(int64_t row, int64_t num_out_rows) {
  return (num_out_rows > 0 && row >= num_out_rows) ? -1 : static_cast<int32_t>(row);
}

// The padding rows of one segment, clipped to the output's num_out_rows rows: segment e <
// num_local_experts is expert e's alignment padding; segment num_local_experts is the tail past the
// last expert (non-empty only for a fixed-size output).
struct RowRange {
  int64_t begin;
  int64_t end;
};

EPLIB_HOST_DEVICE int64_t min_rows(int64_t a, int64_t b) { return a < b ? a : b; }

EPLIB_HOST_DEVICE RowRange padding_rows(const int64_t* expert_offsets, const int64_t* num_tokens_per_expert,
                                        int num_local_experts, int segment, int64_t num_out_rows) {
  if (segment == num_local_experts) return RowRange{min_rows(expert_offsets[segment], num_out_rows), num_out_rows};
  return RowRange{min_rows(expert_offsets[segment] + num_tokens_per_expert[segment], num_out_rows),
                  min_rows(expert_offsets[segment + 1], num_out_rows)};
}

}  // namespace eplib
