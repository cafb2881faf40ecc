// Low-latency (LL) mode: DeepEP's low_latency_dispatch / low_latency_combine. The index arithmetic
// and the message layout that every transport shares (CPU kernels, CUDA kernels of the nccl and ipc
// transports), so that they place every row in the same spot.
//
// Rows. A token travels once to each distinct expert among its top-k slots (a slot that repeats an
// expert of an earlier slot of the same token adds no row; in combine it reads that row). On the
// receiving rank, the rows of local expert le are ordered by source rank, then by source token:
// rows from source s start at begin(le, s) = sum over s' < s of count(le, s'), where count(le, s)
// is the number of tokens of s that name expert le (0 for a masked source).
//
// Sender side (ll_layout): send_slot[t, k] = number of tokens t' < t of this rank that name expert
// e = topk_idx[t, k] (its row among this rank's rows for e), -1 for a masked slot; send_counts[e] =
// tokens naming e; send_offset[e] = rows of the experts of e's rank before e (their send_counts).
//
// Messages. Every exchange moves one message per (source, destination) pair, in a slot of
// message_bytes: a header (kLLHeaderFields int32 fields, then one int32 count per local expert of
// the message's expert side) and rows. A dispatch message from s to r holds s's rows for r's
// experts, expert after expert: the row of (t, e) at send_offset[e] + send_slot[t, k]. Each row is
// [int32 source token, 12 bytes padding][x: bf16, or FP8 values then float32 scales], 16-byte aligned.
// A combine message from expert rank r back to s holds bf16 rows at the same places (no source
// index), so s finds the row of slot (t, k) at send_offset[e] + send_slot[t, k].
// A message holds at most capacity = num_max * min(num_topk, E_local) rows.
#pragma once

#include <cstdint>

#include "eplib/fp8.h"
#include "eplib/layout.h"
#include "eplib/macros.h"

namespace eplib {

// Header fields of a message (int32 each); the receiver checks the format fields against its own.
enum LowLatencyHeaderField : int {
  kLLFieldMagic = 0,      // kLLMagic: a message was written here
  kLLFieldNumMax = 1,     // num_max_dispatch_tokens_per_rank
  kLLFieldHidden = 2,
  kLLFieldNumExperts = 3,
  kLLFieldNumTopk = 4,    // sets the capacity of a message
  kLLFieldFormat = 5,     // LowLatencyFormat bits of the rows
  kLLFieldRejected = 6,   // 1: the sender rejected its input (it raises; its message has no rows)
  kLLFieldNumTokens = 7,  // the sender's T (information)
  kLLFieldPulled = 8,     // combine: 1 when the rows stay in the sender's zero-copy buffer (shared
                          // memory), which the receiver reads; the message then holds, after the
                          // header, int32 begins[E_local]: the row of its first token per expert

  kLLHeaderFields = 16,
};
constexpr int32_t kLLMagic = 0x4C4C4550;  // "PELL"
// The format fields a receiver compares with its own call's.
constexpr int kLLFirstFormatField = kLLFieldNumMax;
constexpr int kLLLastFormatField = kLLFieldFormat;

// Row formats (kLLFieldFormat bits). Combine rows are bf16, kLLCombine.
enum LowLatencyFormat : int32_t {
  kLLFp8 = 1,         // FP8 values and float32 scales
  kLLRoundScale = 2,  // power-of-two scales
  kLLUe8m0 = 4,       // the receivers pack the scales as UE8M0 bytes
  kLLCombine = 8,     // a combine message
};

constexpr int kLLRowHeaderBytes = 16;  // int32 source token index, then padding
constexpr int kLLMaxTopk = 32;

struct LowLatencyLayout {
  int64_t num_max;           // tokens per rank at most
  int64_t hidden;
  int num_local_experts;
  bool fp8;
  int64_t num_scales;        // FP8 scales per row (hidden / 128), 0 for bf16
  int64_t x_bytes;           // of a dispatch row's x part: hidden bytes (FP8) or 2 * hidden (bf16)
  int64_t scales_offset;     // in a dispatch row
  int64_t dispatch_stride;   // bytes of a dispatch row
  int64_t combine_stride;    // bytes of a combine row (bf16, 16-byte aligned)
  int64_t header_bytes;      // of a message: fields and counts, 16-byte aligned
  int64_t capacity;          // rows of a message
  int64_t message_bytes;     // of a message slot: header, then capacity rows of the widest kind (bf16 dispatch)
};

EPLIB_HOST_DEVICE LowLatencyLayout make_low_latency_layout(int64_t num_max, int64_t hidden, int num_topk,
                                                           int num_local_experts, bool fp8) {
  LowLatencyLayout layout{};
  layout.num_max = num_max;
  layout.hidden = hidden;
  layout.num_local_experts = num_local_experts;
  layout.fp8 = fp8;
  layout.num_scales = fp8 ? hidden / kFp8BlockSize : 0;
  layout.x_bytes = fp8 ? hidden : 2 * hidden;
  layout.scales_offset = kLLRowHeaderBytes + align_up(layout.x_bytes, 4);
  layout.dispatch_stride =
      align_up(layout.scales_offset + layout.num_scales * static_cast<int64_t>(sizeof(float)), kRowAlignment);
  layout.combine_stride = align_up(2 * hidden, kRowAlignment);
  layout.header_bytes = align_up((kLLHeaderFields + num_local_experts) * static_cast<int64_t>(sizeof(int32_t)),
                                 kRowAlignment);
  const int64_t distinct = num_topk < num_local_experts ? num_topk : num_local_experts;
  layout.capacity = num_max * distinct;
  // The widest row of any call of this shape (a bf16 dispatch row), so that FP8 and bf16 dispatches and
  // combines share one slot size.
  const int64_t widest = align_up(kLLRowHeaderBytes + 2 * hidden, kRowAlignment);
  // A zero-copy combine message holds int32 begins[E_local] in place of rows.
  const int64_t begins = align_up(num_local_experts * static_cast<int64_t>(sizeof(int32_t)), kRowAlignment);
  layout.message_bytes = layout.header_bytes + (layout.capacity * widest > begins ? layout.capacity * widest : begins);
  return layout;
}

// Field `field` of the header of a call's messages (what eplib.low_latency.header_fields gives the host).
EPLIB_HOST_DEVICE int32_t ll_header_field(int field, int64_t num_max, int64_t hidden, int num_experts, int num_topk,
                                          int32_t format, bool rejected, int64_t num_tokens) {
  switch (field) {
    case kLLFieldMagic: return kLLMagic;
    case kLLFieldNumMax: return static_cast<int32_t>(num_max);
    case kLLFieldHidden: return static_cast<int32_t>(hidden);
    case kLLFieldNumExperts: return num_experts;
    case kLLFieldNumTopk: return num_topk;
    case kLLFieldFormat: return format;
    case kLLFieldRejected: return rejected ? 1 : 0;
    case kLLFieldNumTokens: return static_cast<int32_t>(num_tokens);
    default: return 0;
  }
}

// What a received message's header (fields, then one count per local expert) says against the
// receiver's own header fields: 0 usable; 1 absent (no magic); 2 its sender rejected its input; 3 + f:
// format field f differs; -1: its counts exceed num_max or the message's capacity.
EPLIB_HOST_DEVICE int ll_header_status(const int32_t* header, const LowLatencyLayout& layout,
                                       const int32_t* expected_fields) {
  if (header[kLLFieldMagic] != kLLMagic) return 1;
  if (header[kLLFieldRejected] != 0) return 2;
  for (int f = kLLFirstFormatField; f <= kLLLastFormatField; ++f)
    if (header[f] != expected_fields[f]) return 3 + f;
  int64_t rows = 0;
  for (int le = 0; le < layout.num_local_experts; ++le) {
    const int32_t count = header[kLLHeaderFields + le];
    if (count < 0 || count > layout.num_max) return -1;
    rows += count;
  }
  return rows <= layout.capacity ? 0 : -1;
}

// Published dispatch (the cpu transport's shared memory: the destinations pull the rows). A source
// writes its call once, into a buffer of its own that every destination reads: the kLLHeaderFields
// fields of a message header (no counts), topk_idx int64 [T, K] at kLLHeaderFields * 4 bytes, then
// from ll_published_rows_offset the T rows in the dispatch row format, row t for token t (FP8-cast
// once per token). A destination picks the rows of its experts and places them where the unpacking
// of the messages would (same rows, same order). Sized by the widest rows (bf16), as message slots.
EPLIB_HOST_DEVICE int64_t ll_published_rows_offset(int64_t num_max, int num_topk) {
  return align_up((kLLHeaderFields + 2 * num_max * num_topk) * static_cast<int64_t>(sizeof(int32_t)), kRowAlignment);
}
EPLIB_HOST_DEVICE int64_t ll_published_bytes(int64_t num_max, int64_t hidden, int num_topk) {
  return ll_published_rows_offset(num_max, num_topk) + num_max * align_up(kLLRowHeaderBytes + 2 * hidden, kRowAlignment);
}

// True when expert `expert` of slot k of a token already appeared in an earlier slot of the token.
EPLIB_HOST_DEVICE bool repeats_earlier_slot(const int64_t* token_topk_idx, int k) {
  for (int j = 0; j < k; ++j)
    if (token_topk_idx[j] == token_topk_idx[k]) return true;
  return false;
}

// The packed layout range DeepEP keeps per (local expert, source rank): begin << 32 | count.
EPLIB_HOST_DEVICE int64_t pack_layout_range(int64_t begin, int64_t count) {
  return static_cast<int64_t>((static_cast<uint64_t>(begin) << 32) | static_cast<uint32_t>(count));
}
EPLIB_HOST_DEVICE int64_t layout_range_begin(int64_t range) { return static_cast<int64_t>(static_cast<uint64_t>(range) >> 32); }
EPLIB_HOST_DEVICE int64_t layout_range_count(int64_t range) { return static_cast<int64_t>(range & 0xFFFFFFFF); }

// Output scales, column-major in the last two dims as DeepEP lays them out: float32 [E_local, RM, S]
// stored as [E_local][S][RM]; UE8M0: int32 [E_local, RM, ceil(S / 4)] stored as [E_local][S4][RM],
// scale c of a row in byte c % 4 of its int32 c / 4. Returns the element index (float32) or the byte
// index (UE8M0) of scale c of output row `row` of local expert le; rows_per_expert = RM.
EPLIB_HOST_DEVICE int64_t ll_scale_index(int le, int64_t row, int64_t c, int64_t num_scales, int64_t rows_per_expert,
                                          bool ue8m0) {
  if (!ue8m0) return (static_cast<int64_t>(le) * num_scales + c) * rows_per_expert + row;
  const int64_t packs = (num_scales + 3) / 4;
  return ((static_cast<int64_t>(le) * packs + c / 4) * rows_per_expert + row) * 4 + c % 4;
}

}  // namespace eplib
