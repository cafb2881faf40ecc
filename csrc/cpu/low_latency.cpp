#include "low_latency.h"

#include <fcntl.h>
#include <sched.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <sstream>
#include <stdexcept>
#include <thread>

#include "parallel.h"

namespace eplib::cpu {

namespace {

constexpr int64_t kTokensPerChunk = 8;

uint8_t* row_of(uint8_t* message, const LowLatencyLayout& layout, int64_t row, int64_t stride) {
  return message + layout.header_bytes + row * stride;
}

const uint8_t* row_of(const uint8_t* message, const LowLatencyLayout& layout, int64_t row, int64_t stride) {
  return message + layout.header_bytes + row * stride;
}

const int32_t* header_counts(const uint8_t* message) {
  return reinterpret_cast<const int32_t*>(message) + kLLHeaderFields;
}

// The fields of a message's (or published buffer's) header against the receiver's own: 1 absent (no
// magic), 2 the sender rejected its input, 3 + f field f differs, 0 when they agree.
int header_fields_status(const uint8_t* message, const int32_t* expected_fields) {
  const auto* header = reinterpret_cast<const int32_t*>(message);
  if (header[kLLFieldMagic] != kLLMagic) return 1;
  if (header[kLLFieldRejected] != 0) return 2;
  for (int f = kLLFirstFormatField; f <= kLLLastFormatField; ++f)
    if (header[f] != expected_fields[f]) return 3 + f;
  return 0;
}

// A dispatch row (its source token, x, FP8 scales) -> row `row` of local expert le of the outputs of
// ll_dispatch_unpack.
void store_dispatch_row(const uint8_t* row, const LowLatencyLayout& layout, bool ue8m0, int le, int64_t row_index,
                        int64_t rows_per_expert, uint8_t* recv_x, uint8_t* recv_scales, int32_t* src_info) {
  const int64_t out = static_cast<int64_t>(le) * rows_per_expert + row_index;
  std::memcpy(&src_info[out], row, sizeof(int32_t));
  std::memcpy(recv_x + out * layout.x_bytes, row + kLLRowHeaderBytes, layout.x_bytes);
  if (!layout.fp8) return;
  const auto* scales = reinterpret_cast<const float*>(row + layout.scales_offset);
  for (int64_t c = 0; c < layout.num_scales; ++c) {
    const int64_t index = ll_scale_index(le, row_index, c, layout.num_scales, rows_per_expert, ue8m0);
    if (ue8m0) recv_scales[index] = ue8m0_of(scales[c]);
    else std::memcpy(recv_scales + index * sizeof(float), &scales[c], sizeof(float));
  }
  const int64_t packs = (layout.num_scales + 3) / 4;
  for (int64_t c = layout.num_scales; ue8m0 && c < packs * 4; ++c)  // the last int32's unused bytes
    recv_scales[ll_scale_index(le, row_index, c, layout.num_scales, rows_per_expert, true)] = 0;
}

// The row header of a dispatch row: the source token, then zero padding.
void write_row_header(uint8_t* row, int64_t token) {
  const int32_t index = static_cast<int32_t>(token);
  std::memset(row, 0, kLLRowHeaderBytes);
  std::memcpy(row, &index, sizeof(index));
}

}  // namespace

void ll_layout(const int64_t* topk_idx, int64_t num_tokens, int num_topk, int num_experts, int num_ranks,
               int32_t* send_slot, int32_t* send_counts, int32_t* send_offset) {
  std::memset(send_counts, 0, sizeof(int32_t) * num_experts);
  for (int64_t t = 0; t < num_tokens; ++t) {
    const int64_t* token = topk_idx + t * num_topk;
    for (int k = 0; k < num_topk; ++k) {
      const int64_t expert = token[k];
      if (expert < -1 || expert >= num_experts)
        throw std::invalid_argument("topk_idx[" + std::to_string(t) + ", " + std::to_string(k) + "] = " +
                                    std::to_string(expert) + " is outside [-1, num_experts=" +
                                    std::to_string(num_experts) + ")");
      int32_t& slot = send_slot[t * num_topk + k];
      if (expert < 0) {
        slot = -1;
        continue;
      }
      int earlier = -1;  // an earlier slot of this token with the same expert shares its row
      for (int j = 0; j < k && earlier < 0; ++j)
        if (token[j] == expert) earlier = j;
      slot = earlier >= 0 ? send_slot[t * num_topk + earlier] : send_counts[expert]++;
    }
  }
  const int experts_per_rank = num_experts / num_ranks;
  for (int e = 0; e < num_experts; ++e)
    send_offset[e] = e % experts_per_rank == 0 ? 0 : send_offset[e - 1] + send_counts[e - 1];
}

void ll_quantize_row(const bf16_t* x, int64_t hidden, bool round_scale, uint8_t* values, float* scales) {
  for (int64_t block = 0; block < hidden / kFp8BlockSize; ++block) {
    const bf16_t* in = x + block * kFp8BlockSize;
    const Fp8BlockScale scale = fp8_block_scale(bf16_block_amax(in), round_scale);
    for (int i = 0; i < kFp8BlockSize; ++i) values[block * kFp8BlockSize + i] = e4m3_from_float(to_float(in[i]) * scale.scale);
    scales[block] = scale.scale_inv;
  }
}

void ll_write_header(uint8_t* message, const LowLatencyLayout& layout, const int32_t* fields, const int32_t* counts) {
  auto* header = reinterpret_cast<int32_t*>(message);
  std::memcpy(header, fields, sizeof(int32_t) * kLLHeaderFields);
  std::memcpy(header + kLLHeaderFields, counts, sizeof(int32_t) * layout.num_local_experts);
}

int ll_message_status(const uint8_t* message, const LowLatencyLayout& layout, const int32_t* expected_fields) {
  if (const int status = header_fields_status(message, expected_fields)) return status;
  int64_t rows = 0;
  for (int le = 0; le < layout.num_local_experts; ++le) {
    const int32_t count = header_counts(message)[le];
    if (count < 0 || count > layout.num_max) return -1;
    rows += count;
  }
  return rows <= layout.capacity ? 0 : -1;
}

void ll_dispatch_pack(const bf16_t* x, int64_t num_tokens, const LowLatencyLayout& layout, bool round_scale,
                      const int64_t* topk_idx, int num_topk, int num_experts, int num_ranks, const int32_t* send_slot,
                      const int32_t* send_counts, const int32_t* send_offset, const int32_t* fields,
                      const std::vector<uint8_t*>& messages) {
  const int experts_per_rank = num_experts / num_ranks;
  for (int r = 0; r < num_ranks; ++r)
    if (messages[r] != nullptr) ll_write_header(messages[r], layout, fields, send_counts + r * experts_per_rank);
  parallel_for(num_tokens, kTokensPerChunk, [&](int64_t begin, int64_t end) {
    std::vector<uint8_t> values(layout.fp8 ? layout.hidden : 0);
    std::vector<float> scales(layout.num_scales);
    for (int64_t t = begin; t < end; ++t) {
      const bf16_t* token_x = x + t * layout.hidden;
      if (layout.fp8) ll_quantize_row(token_x, layout.hidden, round_scale, values.data(), scales.data());
      const uint8_t* payload = layout.fp8 ? values.data() : reinterpret_cast<const uint8_t*>(token_x);
      const int64_t* token_topk_idx = topk_idx + t * num_topk;
      for (int k = 0; k < num_topk; ++k) {
        const int64_t expert = token_topk_idx[k];
        if (expert < 0 || repeats_earlier_slot(token_topk_idx, k)) continue;
        uint8_t* message = messages[expert / experts_per_rank];
        if (message == nullptr) continue;
        uint8_t* row = row_of(message, layout, send_offset[expert] + send_slot[t * num_topk + k], layout.dispatch_stride);
        write_row_header(row, t);
        std::memcpy(row + kLLRowHeaderBytes, payload, layout.x_bytes);
        if (layout.fp8) std::memcpy(row + layout.scales_offset, scales.data(), sizeof(float) * layout.num_scales);
      }
    }
  });
}

void ll_dispatch_unpack(const std::vector<const uint8_t*>& messages, const LowLatencyLayout& layout, bool ue8m0,
                        uint8_t* recv_x, uint8_t* recv_scales, int32_t* src_info, int64_t* layout_range,
                        int32_t* recv_count, int32_t* cumulative_stats) {
  const int num_ranks = static_cast<int>(messages.size());
  const int64_t rows_per_expert = num_ranks * layout.num_max;
  parallel_for(layout.num_local_experts, 1, [&](int64_t first, int64_t last) {
    for (int le = static_cast<int>(first); le < last; ++le) {
      int64_t begin = 0;
      for (int s = 0; s < num_ranks; ++s) {
        const uint8_t* message = messages[s];
        const int64_t count = message != nullptr ? header_counts(message)[le] : 0;
        layout_range[static_cast<int64_t>(le) * num_ranks + s] = pack_layout_range(begin, count);
        int64_t offset = 0;  // rows of s's message before expert le's
        for (int j = 0; j < le && message != nullptr; ++j) offset += header_counts(message)[j];
        for (int64_t i = 0; i < count; ++i)
          store_dispatch_row(row_of(message, layout, offset + i, layout.dispatch_stride), layout, ue8m0, le, begin + i,
                             rows_per_expert, recv_x, recv_scales, src_info);
        begin += count;
      }
      recv_count[le] = static_cast<int32_t>(begin);
      if (cumulative_stats != nullptr) cumulative_stats[le] += static_cast<int32_t>(begin);
    }
  });
}

void ll_dispatch_publish(const bf16_t* x, int64_t num_tokens, const LowLatencyLayout& layout, bool round_scale,
                         const int64_t* topk_idx, int num_topk, const int32_t* fields, uint8_t* published) {
  std::memcpy(published, fields, sizeof(int32_t) * kLLHeaderFields);
  std::memcpy(published + sizeof(int32_t) * kLLHeaderFields, topk_idx, sizeof(int64_t) * num_tokens * num_topk);
  uint8_t* rows = published + ll_published_rows_offset(layout.num_max, num_topk);
  parallel_for(num_tokens, kTokensPerChunk, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      uint8_t* row = rows + t * layout.dispatch_stride;
      write_row_header(row, t);
      const bf16_t* token_x = x + t * layout.hidden;
      if (layout.fp8)
        ll_quantize_row(token_x, layout.hidden, round_scale, row + kLLRowHeaderBytes,
                        reinterpret_cast<float*>(row + layout.scales_offset));
      else
        std::memcpy(row + kLLRowHeaderBytes, token_x, layout.x_bytes);
    }
  });
}

int ll_published_status(const uint8_t* published, const LowLatencyLayout& layout, const int32_t* expected_fields) {
  if (const int status = header_fields_status(published, expected_fields)) return status;
  const int32_t num_tokens = reinterpret_cast<const int32_t*>(published)[kLLFieldNumTokens];
  return num_tokens >= 0 && num_tokens <= layout.num_max ? 0 : -1;
}

void ll_dispatch_pull(const std::vector<const uint8_t*>& published, const LowLatencyLayout& layout, int num_topk,
                      int rank, bool ue8m0, uint8_t* recv_x, uint8_t* recv_scales, int32_t* src_info,
                      int64_t* layout_range, int32_t* recv_count, int32_t* cumulative_stats) {
  const int num_ranks = static_cast<int>(published.size());
  const int num_local = layout.num_local_experts;
  const int64_t first_expert = static_cast<int64_t>(rank) * num_local;
  const int64_t rows_per_expert = num_ranks * layout.num_max;
  const int64_t rows_offset = ll_published_rows_offset(layout.num_max, num_topk);
  // Calls row(le, t) for each row that source s sends here: by source token, then slot; a slot adds no
  // row when its expert is another rank's (or -1) or an earlier slot of the token named it.
  auto for_each_row = [&](int s, auto&& row) {
    const uint8_t* source = published[s];
    if (source == nullptr) return;
    const auto* topk = reinterpret_cast<const int64_t*>(source + sizeof(int32_t) * kLLHeaderFields);
    const int64_t num_tokens = reinterpret_cast<const int32_t*>(source)[kLLFieldNumTokens];
    for (int64_t t = 0; t < num_tokens; ++t) {
      const int64_t* token = topk + t * num_topk;
      for (int k = 0; k < num_topk; ++k) {
        const int64_t le = token[k] - first_expert;
        if (le >= 0 && le < num_local && !repeats_earlier_slot(token, k)) row(static_cast<int>(le), t);
      }
    }
  };
  // Rows per (local expert, source), then where each starts: by source rank, then source token.
  std::vector<int64_t> next_row(static_cast<size_t>(num_local) * num_ranks, 0);
  for (int s = 0; s < num_ranks; ++s)
    for_each_row(s, [&](int le, int64_t) { ++next_row[static_cast<size_t>(le) * num_ranks + s]; });
  int64_t total = 0;
  for (int le = 0; le < num_local; ++le) {
    int64_t begin = 0;
    for (int s = 0; s < num_ranks; ++s) {
      int64_t& entry = next_row[static_cast<size_t>(le) * num_ranks + s];
      layout_range[static_cast<int64_t>(le) * num_ranks + s] = pack_layout_range(begin, entry);
      const int64_t count = entry;
      entry = begin;
      begin += count;
    }
    recv_count[le] = static_cast<int32_t>(begin);
    if (cumulative_stats != nullptr) cumulative_stats[le] += static_cast<int32_t>(begin);
    total += begin;
  }
  // The copies: (source row, local expert, its row there), then in parallel.
  struct Copy {
    const uint8_t* row;
    int le;
    int64_t row_index;
  };
  std::vector<Copy> copies;
  copies.reserve(total);
  for (int s = 0; s < num_ranks; ++s)
    for_each_row(s, [&](int le, int64_t t) {
      const uint8_t* row = published[s] + rows_offset + t * layout.dispatch_stride;
      copies.push_back({row, le, next_row[static_cast<size_t>(le) * num_ranks + s]++});
    });
  parallel_for(static_cast<int64_t>(copies.size()), kTokensPerChunk, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      store_dispatch_row(copies[i].row, layout, ue8m0, copies[i].le, copies[i].row_index, rows_per_expert, recv_x,
                         recv_scales, src_info);
  });
}

void ll_combine_pack(const bf16_t* x, const int64_t* layout_range, const LowLatencyLayout& layout, int num_ranks,
                     const int32_t* fields, const std::vector<uint8_t*>& messages) {
  const int64_t rows_per_expert = num_ranks * layout.num_max;
  parallel_for(num_ranks, 1, [&](int64_t first, int64_t last) {
    std::vector<int32_t> counts(layout.num_local_experts);
    for (int s = static_cast<int>(first); s < last; ++s) {
      uint8_t* message = messages[s];
      if (message == nullptr) continue;
      const bool pulled = fields[kLLFieldPulled] != 0;
      auto* begins = reinterpret_cast<int32_t*>(message + layout.header_bytes);
      int64_t offset = 0;
      for (int le = 0; le < layout.num_local_experts; ++le) {
        const int64_t range = layout_range[static_cast<int64_t>(le) * num_ranks + s];
        const int64_t begin = layout_range_begin(range), count = layout_range_count(range);
        counts[le] = static_cast<int32_t>(count);
        if (pulled) begins[le] = static_cast<int32_t>(begin);
        for (int64_t i = 0; i < count && !pulled; ++i)
          std::memcpy(row_of(message, layout, offset + i, layout.combine_stride),
                      x + (static_cast<int64_t>(le) * rows_per_expert + begin + i) * layout.hidden,
                      sizeof(bf16_t) * layout.hidden);
        offset += count;
      }
      ll_write_header(message, layout, fields, counts.data());
    }
  });
}

void ll_combine_reduce(const std::vector<const uint8_t*>& messages, const std::vector<const uint8_t*>& pulled,
                       const LowLatencyLayout& layout, const int64_t* topk_idx, const float* topk_weights,
                       int64_t num_tokens, int num_topk, int num_experts, int num_ranks, const int32_t* send_slot,
                       const int32_t* send_offset, bf16_t* out) {
  const int experts_per_rank = num_experts / num_ranks;
  const int64_t hidden = layout.hidden;
  // Where the rows of each expert start, and the distance between two of them: in the message, or in
  // the expert rank's zero-copy buffer [E_local, R * num_max, H] at the begins the message gives.
  std::vector<const uint8_t*> first_row(num_experts, nullptr);
  std::vector<int64_t> row_stride(num_ranks, layout.combine_stride);
  for (int r = 0; r < num_ranks; ++r) {
    const uint8_t* message = messages[r];
    if (message == nullptr) continue;
    const bool in_buffer = reinterpret_cast<const int32_t*>(message)[kLLFieldPulled] != 0;
    if (in_buffer && pulled[r] == nullptr) continue;  // its rows cannot be reached here
    if (in_buffer) row_stride[r] = hidden * static_cast<int64_t>(sizeof(bf16_t));
    const auto* begins = reinterpret_cast<const int32_t*>(message + layout.header_bytes);
    for (int le = 0; le < experts_per_rank; ++le) {
      const int expert = r * experts_per_rank + le;
      first_row[expert] = in_buffer ? pulled[r] + (le * num_ranks * layout.num_max + begins[le]) * row_stride[r]
                                    : row_of(message, layout, send_offset[expert], layout.combine_stride);
    }
  }
  parallel_for(num_tokens, kTokensPerChunk, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(hidden);
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t h = 0; h < hidden; ++h) acc[h] = 0.0f;
      for (int k = 0; k < num_topk; ++k) {
        const int64_t expert = topk_idx[t * num_topk + k];
        if (expert < 0) continue;
        if (first_row[expert] == nullptr) continue;
        const auto* row = reinterpret_cast<const bf16_t*>(
            first_row[expert] + send_slot[t * num_topk + k] * row_stride[expert / experts_per_rank]);
        const float weight = topk_weights[t * num_topk + k];
        for (int64_t h = 0; h < hidden; ++h) acc[h] = acc[h] + weight * to_float(row[h]);
      }
      for (int64_t h = 0; h < hidden; ++h) out[t * hidden + h] = from_float<bf16_t>(acc[h]);
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Shared host memory
// ---------------------------------------------------------------------------------------------

SharedRegion::SharedRegion(int64_t num_bytes) : num_bytes_(num_bytes) {
  if (num_bytes <= 0) throw std::invalid_argument("eplib: a shared region needs a positive size");
  fd_ = memfd_create("eplib-low-latency", MFD_CLOEXEC);
  if (fd_ < 0) throw std::runtime_error(std::string("eplib: memfd_create failed: ") + std::strerror(errno));
  if (ftruncate(fd_, num_bytes) != 0) {
    const int error = errno;
    close(fd_);
    throw std::runtime_error(std::string("eplib: cannot size shared memory: ") + std::strerror(error));
  }
  void* mapped = mmap(nullptr, num_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd_, 0);
  if (mapped == MAP_FAILED) {
    const int error = errno;
    close(fd_);
    throw std::runtime_error(std::string("eplib: cannot map shared memory: ") + std::strerror(error));
  }
  base_ = static_cast<uint8_t*>(mapped);  // a fresh memfd reads as zeros
}

SharedRegion::~SharedRegion() {
  for (const auto& [address, bytes] : peers_) munmap(address, bytes);
  munmap(base_, num_bytes_);
  close(fd_);
}

std::string SharedRegion::handle() const {
  return std::to_string(getpid()) + " " + std::to_string(fd_) + " " + std::to_string(num_bytes_);
}

uintptr_t SharedRegion::open_peer(const std::string& handle) {
  std::istringstream fields(handle);
  long pid = 0, fd = 0;
  int64_t bytes = 0;
  if (!(fields >> pid >> fd >> bytes) || bytes <= 0)
    throw std::invalid_argument("eplib: not a shared-region handle: '" + handle + "'");
  const std::string path = "/proc/" + std::to_string(pid) + "/fd/" + std::to_string(fd);
  const int peer_fd = open(path.c_str(), O_RDWR | O_CLOEXEC);
  if (peer_fd < 0) throw std::runtime_error("eplib: cannot open " + path + ": " + std::strerror(errno));
  void* mapped = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, peer_fd, 0);
  const int error = errno;
  close(peer_fd);  // the mapping keeps the memory
  if (mapped == MAP_FAILED) throw std::runtime_error("eplib: cannot map " + path + ": " + std::strerror(error));
  peers_.emplace_back(mapped, bytes);
  return reinterpret_cast<uintptr_t>(mapped);
}

void publish_flag(uint64_t* flag, uint64_t value) { __atomic_store_n(flag, value, __ATOMIC_RELEASE); }

std::vector<int64_t> wait_flags(const std::vector<const uint64_t*>& flags, uint64_t target, double timeout_s) {
  using Clock = std::chrono::steady_clock;
  const auto start = Clock::now();
  std::vector<int64_t> waited(flags.size(), -1);
  size_t pending = 0;
  for (size_t i = 0; i < flags.size(); ++i) pending += flags[i] != nullptr;
  for (int polls = 0; pending > 0; ++polls) {
    const int64_t now_ns = std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - start).count();
    for (size_t i = 0; i < flags.size(); ++i) {
      if (flags[i] == nullptr || waited[i] >= 0) continue;
      if (__atomic_load_n(flags[i], __ATOMIC_ACQUIRE) >= target) {
        waited[i] = now_ns;
        --pending;
      }
    }
    if (pending == 0 || now_ns > static_cast<int64_t>(timeout_s * 1e9)) break;
    // Ranks usually outnumber the cores here: let the peers run rather than spin.
    if (polls < 64) sched_yield();
    else std::this_thread::sleep_for(std::chrono::microseconds(20));
  }
  return waited;
}

}  // namespace eplib::cpu
