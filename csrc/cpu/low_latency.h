// CPU kernels of the low-latency mode (layout and messages: eplib/low_latency.h) and the shared host
// memory through which the cpu transport's ranks on one host exchange those messages.
//
// The kernels read and write messages through an array of R message addresses: the messages this
// rank sends (one per destination) or receives (one per source). A null address skips that rank
// (masked): nothing is written to it or read from it. The addresses may point into staging tensors
// (messages that travel through gloo) or straight into the peers' shared memory.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "eplib/dtype.h"
#include "eplib/low_latency.h"

namespace eplib::cpu {

// topk_idx [T, K] -> send_slot int32 [T, K], send_counts int32 [E], send_offset int32 [E]
// (eplib/low_latency.h). An id outside [-1, E) throws std::invalid_argument naming it.
void ll_layout(const int64_t* topk_idx, int64_t num_tokens, int num_topk, int num_experts, int num_ranks,
               int32_t* send_slot, int32_t* send_counts, int32_t* send_offset);

// bf16 x [H] -> FP8 values [H] and scale_inv [H / 128] (eplib/fp8.h).
void ll_quantize_row(const bf16_t* x, int64_t hidden, bool round_scale, uint8_t* values, float* scales);

// The header of a message: fields (int32 [kLLHeaderFields]) and counts (int32 [E_local]).
void ll_write_header(uint8_t* message, const LowLatencyLayout& layout, const int32_t* fields, const int32_t* counts);

// What a received message says about itself against the receiver's own fields: 0 usable; 1 absent
// (no magic); 2 the sender rejected its input; 3 + f: field f differs; -1: its counts exceed the
// message's capacity.
int ll_message_status(const uint8_t* message, const LowLatencyLayout& layout, const int32_t* expected_fields);

// The dispatch messages of bf16 x [T, H], messages[r] for destination rank r: its header (`fields`,
// the send_counts of r's experts), then the row of (t, e) at send_offset[e] + send_slot[t, k], FP8-cast
// when layout.fp8 (round_scale: power-of-two scales).
void ll_dispatch_pack(const bf16_t* x, int64_t num_tokens, const LowLatencyLayout& layout, bool round_scale,
                      const int64_t* topk_idx, int num_topk, int num_experts, int num_ranks, const int32_t* send_slot,
                      const int32_t* send_counts, const int32_t* send_offset, const int32_t* fields,
                      const std::vector<uint8_t*>& messages);

// Received dispatch messages (messages[s] from source s; null: masked, counts as empty) -> outputs:
// recv_x [E_local, R * num_max, H] (bf16 or FP8 bytes), recv_scales (float32 or UE8M0 bytes, column-major,
// eplib::ll_scale_index; ignored for bf16), src_info int32 [E_local, R * num_max], layout_range int64
// [E_local, R], recv_count int32 [E_local]; cumulative_stats int32 [E_local] (may be null) += recv_count.
// Rows past recv_count are not written.
void ll_dispatch_unpack(const std::vector<const uint8_t*>& messages, const LowLatencyLayout& layout, bool ue8m0,
                        uint8_t* recv_x, uint8_t* recv_scales, int32_t* src_info, int64_t* layout_range,
                        int32_t* recv_count, int32_t* cumulative_stats);

// Published dispatch (eplib/low_latency.h), the source's side: the header (`fields`), topk_idx and the rows
// of bf16 x [T, H] (FP8-cast when layout.fp8) into this rank's published buffer.
void ll_dispatch_publish(const bf16_t* x, int64_t num_tokens, const LowLatencyLayout& layout, bool round_scale,
                         const int64_t* topk_idx, int num_topk, const int32_t* fields, uint8_t* published);

// What a published buffer's header says against the receiver's own fields: as ll_message_status, -1
// when its token count is outside [0, num_max].
int ll_published_status(const uint8_t* published, const LowLatencyLayout& layout, const int32_t* expected_fields);

// Published dispatch, the destination's side: the rows of this rank's experts (rank `rank`) from the
// published buffers of the sources (published[s]; null: masked, counts as empty) -> the outputs of
// ll_dispatch_unpack, the same values in the same places. Ids outside this rank's experts are passed
// over (the sources checked them).
void ll_dispatch_pull(const std::vector<const uint8_t*>& published, const LowLatencyLayout& layout, int num_topk,
                      int rank, bool ue8m0, uint8_t* recv_x, uint8_t* recv_scales, int32_t* src_info,
                      int64_t* layout_range, int32_t* recv_count, int32_t* cumulative_stats);

// Expert side of a combine: rows of bf16 x [E_local, R * num_max, H] that source s sent (layout_range)
// -> messages[s], at the place its dispatch message had them; the header gets `fields`. With
// fields[kLLFieldPulled] = 1 the rows stay in x (a zero-copy buffer the receivers map) and the message
// holds their begins instead (eplib/low_latency.h).
void ll_combine_pack(const bf16_t* x, const int64_t* layout_range, const LowLatencyLayout& layout, int num_ranks,
                     const int32_t* fields, const std::vector<uint8_t*>& messages);

// Source side of a combine: out[t] = bf16(sum over k ascending of w[t, k] * row of (t, k)) in fp32, the
// rows from messages[rank of the expert]; slots with id -1 or a null message are skipped.
// pulled[r] (may be null): expert rank r's zero-copy buffer as mapped here, for messages that say
// their rows stayed there.
void ll_combine_reduce(const std::vector<const uint8_t*>& messages, const std::vector<const uint8_t*>& pulled,
                       const LowLatencyLayout& layout,
                       const int64_t* topk_idx, const float* topk_weights, int64_t num_tokens, int num_topk,
                       int num_experts, int num_ranks, const int32_t* send_slot, const int32_t* send_offset,
                       bf16_t* out);

// Host memory shared between the rank processes of one host (memfd), mapped by the peers through
// /proc/<pid>/fd/<fd>: the cpu transport's low-latency messages and flags.
class SharedRegion {
 public:
  explicit SharedRegion(int64_t num_bytes);  // zeroed
  ~SharedRegion();
  SharedRegion(const SharedRegion&) = delete;
  SharedRegion& operator=(const SharedRegion&) = delete;

  // What a peer needs to map this region: "pid fd bytes".
  std::string handle() const;
  // Maps a peer's region from its handle; returns its address here. Throws when it cannot.
  uintptr_t open_peer(const std::string& handle);
  uintptr_t address() const { return reinterpret_cast<uintptr_t>(base_); }
  int64_t num_bytes() const { return num_bytes_; }

 private:
  uint8_t* base_ = nullptr;
  int64_t num_bytes_;
  int fd_ = -1;
  std::vector<std::pair<void*, int64_t>> peers_;
};

// Release store of a flag in shared memory.
void publish_flag(uint64_t* flag, uint64_t value);
// Waits until every flags[i] (acquire loads) holds >= target, or timeout_s passed; skips null flags.
// Returns, per flag, the nanoseconds it took to arrive, or -1 when it did not.
std::vector<int64_t> wait_flags(const std::vector<const uint64_t*>& flags, uint64_t target, double timeout_s);

}  // namespace eplib::cpu
