// Index arithmetic that decides where a token goes. Shared verbatim by the CPU kernels and the
// CUDA kernels, so the CPU tests exercise the same logic the GPU runs.
#pragma once

#include <cstdint>

#include "eplib/macros.h"

namespace eplib {

// Every segment of a packed row starts on a 16-byte boundary so that GPU kernels can move it with
// int4 loads and stores.
constexpr int64_t kRowAlignment = 16;

EPLIB_HOST_DEVICE constexpr int64_t align_up(int64_t value, int64_t alignment) {
  return (value + alignment - 1) / alignment * alignment;
}

// Rank r owns experts [r * experts_per_rank, (r + 1) * experts_per_rank).
EPLIB_HOST_DEVICE int rank_of_expert(int64_t expert, int experts_per_rank) {
  return static_cast<int>(expert / experts_per_rank);
}

// The id that rank `rank` uses for global expert `expert`, or -1 when another rank owns it
// (also for the masked slot -1).
EPLIB_HOST_DEVICE int32_t local_expert_id(int64_t expert, int rank, int experts_per_rank) {
  const int64_t first = static_cast<int64_t>(rank) * experts_per_rank;
  return (expert >= first && expert < first + experts_per_rank) ? static_cast<int32_t>(expert - first) : -1;
}

// FP8 scales are 4-byte elements (float32, or int32 holding four UE8M0 exponents) that the pack
// kernels read through their strides, in elements: DeepEP's callers pass column-major scales.
constexpr int64_t kScaleBytes = 4;

// Byte offset of scale [token, column] from the first scale.
EPLIB_HOST_DEVICE int64_t scale_offset(int64_t token, int64_t column, int64_t token_stride, int64_t column_stride) {
  return (token * token_stride + column * column_stride) * kScaleBytes;
}

// Byte layout of one dispatched row in a send or receive region:
//   [x: x_bytes][pad][scales: scales_bytes][pad][src_idx: int32][topk_idx: int32 x K][topk_weights: f32 x K][pad]
// scales_bytes is 0 unless x is the FP8 tuple; num_topk is 0 when no top-k travels.
struct DispatchRowLayout {
  int64_t x_bytes;
  int64_t scales_offset;
  int64_t scales_bytes;
  int64_t src_idx_offset;
  int64_t topk_idx_offset;
  int64_t topk_weights_offset;
  int num_topk;
  int64_t stride;
};

EPLIB_HOST_DEVICE DispatchRowLayout make_dispatch_row_layout(int64_t x_bytes, int64_t scales_bytes, int num_topk) {
  DispatchRowLayout layout{};
  layout.x_bytes = x_bytes;
  layout.scales_offset = align_up(x_bytes, kRowAlignment);
  layout.scales_bytes = scales_bytes;
  layout.src_idx_offset = align_up(layout.scales_offset + scales_bytes, kRowAlignment);
  layout.topk_idx_offset = layout.src_idx_offset + static_cast<int64_t>(sizeof(int32_t));
  layout.topk_weights_offset = layout.topk_idx_offset + static_cast<int64_t>(sizeof(int32_t)) * num_topk;
  layout.num_topk = num_topk;
  layout.stride = align_up(layout.topk_weights_offset + static_cast<int64_t>(sizeof(float)) * num_topk, kRowAlignment);
  return layout;
}

// Byte layout of one row sent back by combine: [x: x_bytes][pad][topk_weights: f32 x K][pad].
// Without weights the row is x alone, unpadded, so the expert output can be sent as it is.
struct CombineRowLayout {
  int64_t x_bytes;
  int64_t topk_weights_offset;  // -1 when no weights travel
  int num_topk;
  int64_t stride;
};

EPLIB_HOST_DEVICE CombineRowLayout make_combine_row_layout(int64_t x_bytes, int num_topk) {
  CombineRowLayout layout{};
  layout.x_bytes = x_bytes;
  layout.num_topk = num_topk;
  if (num_topk == 0) {
    layout.topk_weights_offset = -1;
    layout.stride = x_bytes;
  } else {
    layout.topk_weights_offset = align_up(x_bytes, kRowAlignment);
    layout.stride = align_up(layout.topk_weights_offset + static_cast<int64_t>(sizeof(float)) * num_topk, kRowAlignment);
  }
  return layout;
}

// Receive regions. Source s's rows sit at s * slot_rows in the padded ("slot") layout (slot_rows > 0),
// or right after the rows of sources < s (slot_rows == 0). Compacted, rows follow each other in
// source order: compact_start[s] = rows of sources < s, compact_start[R] = total.

// Rows of a source that a region holds: its count, clipped to the slot in the slot layout.
EPLIB_HOST_DEVICE int64_t region_rows(int32_t count, int64_t slot_rows) {
  const int64_t rows = count < 0 ? 0 : count;
  return (slot_rows > 0 && rows > slot_rows) ? slot_rows : rows;
}

// Source rank of compacted row i (< compact_start[R]); sources without rows are skipped.
EPLIB_HOST_DEVICE int source_of_row(const int64_t* compact_start, int num_ranks, int64_t i) {
  int low = 0, high = num_ranks;  // compact_start[low] <= i < compact_start[high]
  while (high - low > 1) {
    const int middle = (low + high) / 2;
    if (compact_start[middle] <= i) low = middle;
    else high = middle;
  }
  return low;
}

// Row of the receive region that holds compacted row i (< compact_start[R]).
EPLIB_HOST_DEVICE int64_t region_row_of(const int64_t* compact_start, int num_ranks, int64_t slot_rows, int64_t i) {
  if (slot_rows == 0) return i;
  const int source = source_of_row(compact_start, num_ranks, i);
  return source * slot_rows + (i - compact_start[source]);
}

// ipc transport (rows written straight into the receivers' regions). rank_prefix_matrix is int32
// [R, R] as in the dispatch handle: [i][j] = rows that ranks 0..i send to rank j.

// Rows rank -> r: the row at send_pos p (send_positions' numbering, slot_rows as there) lands at row
// p + row_shift[r] of rank r's receive region, where dispatch_unpack reads source `rank`'s rows: at
// rank * slot_rows (slot layout), else after the rows of lower ranks (prefix order).
EPLIB_HOST_DEVICE void dispatch_row_shifts(const int32_t* rank_prefix_matrix, int rank, int num_ranks,
                                           int64_t slot_rows, int64_t* row_shift) {
  int64_t send_start = 0;  // this rank's send_pos of its first row for r (prefix order)
  for (int r = 0; r < num_ranks; ++r) {
    if (slot_rows > 0) {
      row_shift[r] = static_cast<int64_t>(rank - r) * slot_rows;
      continue;
    }
    const int64_t rows_before_rank = rank > 0 ? rank_prefix_matrix[(rank - 1) * num_ranks + r] : 0;
    row_shift[r] = rows_before_rank - send_start;
    send_start += rank_prefix_matrix[rank * num_ranks + r] - rows_before_rank;
  }
}

// Combine, rank -> s: compacted row i received from source s (compact_start as in dispatch_unpack)
// goes back to row i + row_shift[s] of s's receive region, the row s's send_pos gave that token for
// `rank`, where s's combine_reduce reads it.
EPLIB_HOST_DEVICE void combine_row_shifts(const int32_t* rank_prefix_matrix, int rank, int num_ranks,
                                          int64_t slot_rows, const int64_t* compact_start, int64_t* row_shift) {
  for (int s = 0; s < num_ranks; ++s) {
    int64_t start_at_source = static_cast<int64_t>(rank) * slot_rows;
    if (slot_rows == 0)
      for (int r = 0; r < rank; ++r)
        start_at_source += rank_prefix_matrix[s * num_ranks + r] - (s > 0 ? rank_prefix_matrix[(s - 1) * num_ranks + r] : 0);
    row_shift[s] = start_at_source - compact_start[s];
  }
}

}  // namespace eplib
