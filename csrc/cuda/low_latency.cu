// The low-latency (LL) kernels of the nccl and ipc transports: layout, dispatch pack (FP8 cast inside),
// unpack, combine pack, combine reduce. Message layout and placement: eplib/low_latency.h, the same as
// the CPU kernels of cpu/low_latency.cpp, row for row and bit for bit. Every message is reached through
// an address array (kernels.h), so the same kernels write the nccl transport's send buffer and the ipc
// transport's slots in the peers' memory; how messages travel and when they may be read is the
// transports' (ipc: low_latency_ipc.h).
#include "common.cuh"
#include "eplib/fp8.h"
#include "eplib/low_latency.h"
#include "kernels.h"
#include "rows.cuh"

namespace eplib::cuda {

namespace {

constexpr int kLayoutThreads = 256;
constexpr int kUnpackThreads = 256;
// Blocks that share one local expert's rows in the unpack kernel, at most.
constexpr int kMaxBlocksPerExpert = 8;

__device__ __forceinline__ uint8_t* message_of(const int64_t* messages, int rank) {
  return reinterpret_cast<uint8_t*>(messages[rank]);
}

// The header fields this rank expects from every message of its call (receiving side).
__device__ __forceinline__ void expected_fields(int32_t (&fields)[kLLHeaderFields], int64_t num_max, int64_t hidden,
                                                int num_experts, int num_topk, int32_t format) {
  for (int f = 0; f < kLLHeaderFields; ++f)
    fields[f] = ll_header_field(f, num_max, hidden, num_experts, num_topk, format, false, 0);
}

// Whether source s's message may be read: present, not masked, its header usable against `expected`.
// A header that is present but not usable sets kErrorLowLatencyMessage.
__device__ inline bool message_usable(const int64_t* messages, const int32_t* mask, int s,
                                      const LowLatencyLayout& layout, const int32_t* expected, int32_t* error_flag) {
  const uint8_t* message = message_of(messages, s);
  if (message == nullptr || mask[s] != 0) return false;
  const int status = ll_header_status(reinterpret_cast<const int32_t*>(message), layout, expected);
  if (status != 0 && status != 1) set_error(error_flag, kErrorLowLatencyMessage);
  return status == 0;
}

// Writes a message header: the call's fields, then counts[le] for each local expert of its expert side.
template <typename CountOf>
__device__ __forceinline__ void write_header(uint8_t* message, int field_or_count, int32_t field_value,
                                             const CountOf& count_of) {
  auto* header = reinterpret_cast<int32_t*>(message);
  header[field_or_count] = field_or_count < kLLHeaderFields ? field_value : count_of(field_or_count - kLLHeaderFields);
}

// One block per destination rank (grid-stride): its experts one after another, each a block-wide scan
// over the tokens that name it (a token counts once per distinct expert). Block 0 also marks the slots
// without a valid expert (-1, and kErrorExpertId for ids outside [-1, E)).
__global__ void ll_layout_kernel(LLLayoutArgs args) {
  __shared__ int64_t warp_totals[kWarpSize];
  __shared__ int64_t total;
  const int num_topk = args.num_topk;
  const int experts_per_rank = args.num_experts / args.num_ranks;
  if (blockIdx.x == 0)
    for (int64_t i = threadIdx.x; i < args.num_tokens * num_topk; i += blockDim.x) {
      const int64_t expert = args.topk_idx[i];
      if (expert < 0 || expert >= args.num_experts) args.send_slot[i] = -1;
      if (expert < -1 || expert >= args.num_experts) set_error(args.error_flag, kErrorExpertId);
    }
  for (int r = blockIdx.x; r < args.num_ranks; r += gridDim.x) {
    int64_t offset = 0;  // rows of the experts of r before e
    for (int e = r * experts_per_rank; e < (r + 1) * experts_per_rank; ++e) {
      int64_t rows = 0;
      for (int64_t first = 0; first < args.num_tokens; first += blockDim.x) {
        const int64_t t = first + threadIdx.x;
        const int64_t* token = args.topk_idx + t * num_topk;
        int named = -1;  // the first slot of t naming e
        for (int k = 0; t < args.num_tokens && k < num_topk && named < 0; ++k)
          if (token[k] == e) named = k;
        const int64_t before = block_exclusive_sum(named >= 0 ? 1 : 0, warp_totals, &total);
        for (int k = named; named >= 0 && k < num_topk; ++k)
          if (token[k] == e) args.send_slot[t * num_topk + k] = static_cast<int32_t>(rows + before);
        rows += total;
      }
      if (threadIdx.x == 0) {
        args.send_counts[e] = static_cast<int32_t>(rows);
        args.send_offset[e] = static_cast<int32_t>(offset);
      }
      offset += rows;
    }
  }
}

// One warp per token: for each distinct expert of the token whose rank is not masked, its row at
// send_offset[e] + send_slot[t, k] of the destination's message. FP8: the warp casts each block of 128
// channels once (4 per lane, the block's amax by a warp-wide maximum) and writes it to every row.
// The headers are written by the grid's first threads (also without tokens).
template <bool kFp8>
__global__ void __launch_bounds__(kMaxThreadsPerBlock) ll_dispatch_pack_kernel(LLDispatchPackArgs args,
                                                                              LowLatencyLayout layout) {
  const int num_ranks = args.num_ranks, num_topk = args.num_topk;
  const int experts_per_rank = args.num_experts / num_ranks;
  const int header_ints = kLLHeaderFields + experts_per_rank;
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  for (int64_t i = thread; i < static_cast<int64_t>(num_ranks) * header_ints;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int r = static_cast<int>(i / header_ints);
    if (args.mask[r] != 0 || message_of(args.messages, r) == nullptr) continue;
    const int f = static_cast<int>(i % header_ints);
    const int32_t value = f < kLLHeaderFields ? ll_header_field(f, args.num_max, args.hidden, args.num_experts,
                                                                num_topk, args.format, args.rejected, args.num_tokens)
                                              : 0;
    write_header(message_of(args.messages, r), f, value, [&](int le) {
      return args.rejected ? 0 : args.send_counts[r * experts_per_rank + le];
    });
  }
  if (args.rejected) {
    __threadfence_system();
    return;
  }
  const int lane = lane_id();
  for (int64_t t = global_warp_id(); t < args.num_tokens; t += num_global_warps()) {
    const int64_t* token = args.topk_idx + t * num_topk;
    // Bit k: slot k adds a row (a valid expert seen first at k, its rank not masked).
    unsigned rows = 0;
    for (int k = 0; k < num_topk; ++k) {
      const int64_t expert = token[k];
      if (expert < 0 || expert >= args.num_experts || repeats_earlier_slot(token, k)) continue;
      const int r = static_cast<int>(expert / experts_per_rank);
      if (args.mask[r] == 0 && message_of(args.messages, r) != nullptr) rows |= 1u << k;
    }
    const auto row_of = [&](int k) {
      const int64_t expert = token[k];
      uint8_t* message = message_of(args.messages, static_cast<int>(expert / experts_per_rank));
      return message + layout.header_bytes +
             (args.send_offset[expert] + args.send_slot[t * num_topk + k]) * layout.dispatch_stride;
    };
    for (unsigned left = rows; left != 0; left &= left - 1) {
      uint8_t* row = row_of(__ffs(left) - 1);
      if (lane == 0) vector_store(reinterpret_cast<int4*>(row), make_int4(static_cast<int32_t>(t), 0, 0, 0));
      if (!kFp8)
        warp_copy(row + kLLRowHeaderBytes, reinterpret_cast<const uint8_t*>(args.x + t * layout.hidden),
                  layout.x_bytes, lane);
    }
    if (!kFp8) continue;
    const bool round_scale = (args.format & kLLRoundScale) != 0;
    for (int64_t block = 0; block < layout.num_scales; ++block) {
      constexpr int kPerLane = kFp8BlockSize / kWarpSize;
      const bf16_t* in = args.x + t * layout.hidden + block * kFp8BlockSize + lane * kPerLane;
      uint32_t largest = 0;
      for (int j = 0; j < kPerLane; ++j) {
        const uint32_t bits = bf16_amax_bits(in[j]);
        largest = bits > largest ? bits : largest;
      }
      for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
        const uint32_t other = __shfl_xor_sync(kFullMask, largest, offset);
        largest = other > largest ? other : largest;
      }
      const Fp8BlockScale scale = fp8_block_scale(fp8_amax_of_bits(static_cast<uint16_t>(largest)), round_scale);
      uint32_t values = 0;
      for (int j = 0; j < kPerLane; ++j)
        values |= static_cast<uint32_t>(e4m3_from_float(to_float(in[j]) * scale.scale)) << (8 * j);
      for (unsigned left = rows; left != 0; left &= left - 1) {
        uint8_t* row = row_of(__ffs(left) - 1);
        reinterpret_cast<uint32_t*>(row + kLLRowHeaderBytes + block * kFp8BlockSize)[lane] = values;
        if (lane == 0) reinterpret_cast<float*>(row + layout.scales_offset)[block] = scale.scale_inv;
      }
    }
  }
  __threadfence_system();  // this thread's writes into peer memory, before the ipc publish step's flags
}

// Blocks per local expert of the unpack kernel: enough warps for its rows, at most kMaxBlocksPerExpert.
inline int unpack_blocks_per_expert(int64_t rows_per_expert) {
  const int64_t warps = kUnpackThreads / kWarpSize;
  const int64_t blocks = (rows_per_expert + warps - 1) / warps;
  return static_cast<int>(blocks < 1 ? 1 : (blocks > kMaxBlocksPerExpert ? kMaxBlocksPerExpert : blocks));
}

// Block (le, part) of the unpack: every block of local expert le finds each source's count and the
// offset of le's rows in its message (shared tables), then its warps copy every part-th row of le's
// output rows; part 0 also writes layout_range, recv_count and the statistics.
template <bool kFp8, bool kUe8m0>
__global__ void __launch_bounds__(kUnpackThreads) ll_dispatch_unpack_kernel(LLDispatchUnpackArgs args,
                                                                            LowLatencyLayout layout,
                                                                            int blocks_per_expert) {
  __shared__ int32_t count[kMaxRanks];
  __shared__ int32_t offset[kMaxRanks];
  __shared__ int32_t begin[kMaxRanks + 1];
  __shared__ bool usable[kMaxRanks];
  const int num_ranks = args.num_ranks;
  const int le = static_cast<int>(blockIdx.x / blocks_per_expert);
  const int part = static_cast<int>(blockIdx.x % blocks_per_expert);
  const int64_t rows_per_expert = num_ranks * args.num_max;
  int32_t expected[kLLHeaderFields];
  expected_fields(expected, args.num_max, args.hidden, args.num_experts, args.num_topk, args.format);
  for (int s = threadIdx.x; s < num_ranks; s += blockDim.x) {
    usable[s] = message_usable(args.messages, args.mask, s, layout, expected, args.error_flag);
    count[s] = usable[s] ? reinterpret_cast<const int32_t*>(message_of(args.messages, s))[kLLHeaderFields + le] : 0;
    offset[s] = 0;
  }
  __syncthreads();
  for (int64_t i = threadIdx.x; i < static_cast<int64_t>(num_ranks) * le; i += blockDim.x) {
    const int s = static_cast<int>(i / le);
    if (usable[s])
      atomicAdd(&offset[s], reinterpret_cast<const int32_t*>(message_of(args.messages, s))[kLLHeaderFields + i % le]);
  }
  if (threadIdx.x == 0) {
    begin[0] = 0;
    for (int s = 0; s < num_ranks; ++s) begin[s + 1] = begin[s] + count[s];
  }
  __syncthreads();
  const bool poisoned = args.poisoned != nullptr && *args.poisoned != 0;
  if (part == 0) {
    for (int s = threadIdx.x; s < num_ranks; s += blockDim.x)
      args.layout_range[static_cast<int64_t>(le) * num_ranks + s] = poisoned ? -1 : pack_layout_range(begin[s], count[s]);
    if (threadIdx.x == 0) {
      args.recv_count[le] = poisoned ? -1 : begin[num_ranks];
      if (args.cumulative_stats != nullptr && !poisoned) args.cumulative_stats[le] += begin[num_ranks];
    }
  }
  if (poisoned) return;
  const int lane = lane_id();
  const int64_t warps = blockDim.x / kWarpSize;
  const int64_t packs = (layout.num_scales + 3) / 4;
  for (int64_t i = part * warps + threadIdx.x / kWarpSize; i < begin[num_ranks]; i += blocks_per_expert * warps) {
    int s = 0;
    while (begin[s + 1] <= i) ++s;
    const uint8_t* row = message_of(args.messages, s) + layout.header_bytes +
                         (offset[s] + i - begin[s]) * layout.dispatch_stride;
    const int64_t out = static_cast<int64_t>(le) * rows_per_expert + i;
    if (lane == 0) args.src_info[out] = *reinterpret_cast<const int32_t*>(row);
    warp_copy(args.recv_x + out * layout.x_bytes, row + kLLRowHeaderBytes, layout.x_bytes, lane);
    if (!kFp8) continue;
    const auto* scales = reinterpret_cast<const float*>(row + layout.scales_offset);
    for (int64_t c = lane; c < (kUe8m0 ? packs * 4 : layout.num_scales); c += kWarpSize) {
      const int64_t index = ll_scale_index(le, i, c, layout.num_scales, rows_per_expert, kUe8m0);
      if (!kUe8m0) reinterpret_cast<float*>(args.recv_scales)[index] = scales[c];
      else args.recv_scales[index] = c < layout.num_scales ? ue8m0_of(scales[c]) : 0;  // the last int32's unused bytes
    }
  }
}

// Block (s, le) (grid-stride): source s's rows of local expert le (layout_range) into s's message, after
// the rows of le's predecessors; block (s, 0) also writes the header.
__global__ void __launch_bounds__(kMaxThreadsPerBlock) ll_combine_pack_kernel(LLCombinePackArgs args,
                                                                             LowLatencyLayout layout) {
  __shared__ int64_t offset;
  const int num_ranks = args.num_ranks;
  const int num_local = args.num_experts / num_ranks;
  const int64_t rows_per_expert = num_ranks * args.num_max;
  const int lane = lane_id();
  const auto count_of = [&](int le, int s) {
    return layout_range_count(args.layout_range[static_cast<int64_t>(le) * num_ranks + s]);
  };
  for (int64_t pair = blockIdx.x; pair < static_cast<int64_t>(num_ranks) * num_local; pair += gridDim.x) {
    const int s = static_cast<int>(pair / num_local), le = static_cast<int>(pair % num_local);
    uint8_t* message = message_of(args.messages, s);
    if (message == nullptr || args.mask[s] != 0) continue;  // the same for the whole block
    if (le == 0)
      for (int f = threadIdx.x; f < kLLHeaderFields + num_local; f += blockDim.x) {
        const int32_t value = ll_header_field(f, args.num_max, args.hidden, args.num_experts, args.num_topk,
                                              kLLCombine, false, args.num_tokens);
        write_header(message, f, value, [&](int j) { return static_cast<int32_t>(count_of(j, s)); });
      }
    if (threadIdx.x == 0) offset = 0;
    __syncthreads();
    for (int j = threadIdx.x; j < le; j += blockDim.x) atomicAdd(reinterpret_cast<unsigned long long*>(&offset),
                                                                 static_cast<unsigned long long>(count_of(j, s)));
    __syncthreads();
    const int64_t range = args.layout_range[static_cast<int64_t>(le) * num_ranks + s];
    const int64_t begin = layout_range_begin(range), count = layout_range_count(range);
    for (int64_t i = threadIdx.x / kWarpSize; i < count; i += blockDim.x / kWarpSize)
      warp_copy(message + layout.header_bytes + (offset + i) * layout.combine_stride,
                reinterpret_cast<const uint8_t*>(args.x + (le * rows_per_expert + begin + i) * layout.hidden),
                layout.hidden * static_cast<int64_t>(sizeof(bf16_t)), lane);
    __syncthreads();  // `offset` is reused by the block's next pair
  }
  __threadfence_system();  // as in ll_dispatch_pack_kernel
}

// One warp per token: per element, from 0, for each slot k ascending whose expert is valid and whose
// rank's message is usable, acc = acc + w[t, k] * row; cast once to bf16. Poisoned: NaN rows.
template <int kVector>
__global__ void __launch_bounds__(kMaxThreadsPerBlock) ll_combine_reduce_kernel(LLCombineReduceArgs args,
                                                                               LowLatencyLayout layout) {
  __shared__ bool usable[kMaxRanks];
  const int num_ranks = args.num_ranks, num_topk = args.num_topk;
  const int experts_per_rank = args.num_experts / num_ranks;
  int32_t expected[kLLHeaderFields];
  expected_fields(expected, args.num_max, args.hidden, args.num_experts, num_topk, kLLCombine);
  for (int r = threadIdx.x; r < num_ranks; r += blockDim.x)
    usable[r] = message_usable(args.messages, args.mask, r, layout, expected, args.error_flag);
  __syncthreads();
  const bool poisoned = args.poisoned != nullptr && *args.poisoned != 0;
  const int lane = lane_id();
  const int64_t hidden = args.hidden;
  for (int64_t t = global_warp_id(); t < args.num_tokens; t += num_global_warps()) {
    if (poisoned) {
      warp_fill(reinterpret_cast<uint8_t*>(args.out + t * hidden), 0xFF, hidden * static_cast<int64_t>(sizeof(bf16_t)),
                lane);
      continue;
    }
    for (int64_t v = lane; v < hidden / kVector; v += kWarpSize) {
      float acc[kVector];
#pragma unroll
      for (int j = 0; j < kVector; ++j) acc[j] = 0.0f;
      for (int k = 0; k < num_topk; ++k) {
        const int64_t expert = args.topk_idx[t * num_topk + k];
        if (expert < 0 || expert >= args.num_experts) continue;
        const int r = static_cast<int>(expert / experts_per_rank);
        if (!usable[r]) continue;
        const uint8_t* row = message_of(args.messages, r) + layout.header_bytes +
                             (args.send_offset[expert] + args.send_slot[t * num_topk + k]) * layout.combine_stride;
        add_vector<bf16_t, kVector>(acc, reinterpret_cast<const bf16_t*>(row), v, args.topk_weights[t * num_topk + k],
                                    true);
      }
      store_vector<bf16_t, kVector>(args.out + t * hidden, v, acc);
    }
  }
}

void check_ranks(int num_ranks, int num_experts, const char* kernel) {
  if (num_ranks <= 0 || num_ranks > kMaxRanks || num_experts <= 0 || num_experts % num_ranks != 0)
    throw std::invalid_argument(std::string("eplib: ") + kernel + " needs 1 to " + std::to_string(kMaxRanks) +
                                " ranks dividing num_experts, got E=" + std::to_string(num_experts) +
                                ", R=" + std::to_string(num_ranks));
}

// The checked layout of a call, from the shape fields every row kernel's arguments carry (num_max, hidden,
// num_topk, num_experts, num_ranks).
template <typename Args>
LowLatencyLayout checked_layout(const Args& args, bool fp8, const char* kernel) {
  check_ranks(args.num_ranks, args.num_experts, kernel);
  return make_low_latency_layout(args.num_max, args.hidden, args.num_topk, args.num_experts / args.num_ranks, fp8);
}

// The one place where a low-latency row format becomes the kernels' template arguments.
template <typename Body>
void visit_ll_format(int32_t format, const Body& body) {
  const bool fp8 = (format & kLLFp8) != 0, ue8m0 = (format & kLLUe8m0) != 0;
  if (!fp8) return body(std::false_type{}, std::false_type{});
  if (!ue8m0) return body(std::true_type{}, std::false_type{});
  return body(std::true_type{}, std::true_type{});
}

}  // namespace

void ll_layout(const LLLayoutArgs& args, cudaStream_t stream) {
  check_ranks(args.num_ranks, args.num_experts, "ll_layout");
  launch("ll_layout_kernel", ll_layout_kernel, {static_cast<unsigned>(args.num_ranks), kLayoutThreads}, 0, stream,
         args);
}

void ll_dispatch_pack(const LLDispatchPackArgs& args, cudaStream_t stream) {
  const LowLatencyLayout layout = checked_layout(args, args.format & kLLFp8, "ll_dispatch_pack");
  if (args.num_topk > kLLMaxTopk)
    throw std::invalid_argument("eplib: ll_dispatch_pack takes at most " + std::to_string(kLLMaxTopk) + " slots");
  visit_ll_format(args.format, [&](auto fp8, auto) {
    launch("ll_dispatch_pack_kernel", ll_dispatch_pack_kernel<decltype(fp8)::value>,
           warp_launch_shape(args.num_tokens, 0), 0, stream, args, layout);
  });
}

void ll_dispatch_unpack(const LLDispatchUnpackArgs& args, cudaStream_t stream) {
  const LowLatencyLayout layout = checked_layout(args, args.format & kLLFp8, "ll_dispatch_unpack");
  const int blocks_per_expert = unpack_blocks_per_expert(args.num_ranks * args.num_max);
  const unsigned blocks = static_cast<unsigned>(layout.num_local_experts * blocks_per_expert);
  visit_ll_format(args.format, [&](auto fp8, auto ue8m0) {
    launch("ll_dispatch_unpack_kernel", ll_dispatch_unpack_kernel<decltype(fp8)::value, decltype(ue8m0)::value>,
           {blocks, kUnpackThreads}, 0, stream, args, layout, blocks_per_expert);
  });
}

void ll_combine_pack(const LLCombinePackArgs& args, cudaStream_t stream) {
  const LowLatencyLayout layout = checked_layout(args, false, "ll_combine_pack");
  launch("ll_combine_pack_kernel", ll_combine_pack_kernel,
         {grid_for(static_cast<int64_t>(args.num_ranks) * layout.num_local_experts, 1), 256}, 0, stream, args, layout);
}

void ll_combine_reduce(const LLCombineReduceArgs& args, cudaStream_t stream) {
  const LowLatencyLayout layout = checked_layout(args, false, "ll_combine_reduce");
  // Message rows are 16-byte aligned when the messages are; `out` rows when H * 2 is a multiple of 16.
  const bool aligned = all_16_byte_aligned({reinterpret_cast<uintptr_t>(args.out),
                                            static_cast<uint64_t>(args.hidden * sizeof(bf16_t))});
  visit_vector_width<bf16_t>(aligned, [&](auto vector) {
    launch("ll_combine_reduce_kernel", ll_combine_reduce_kernel<decltype(vector)::value>,
           warp_launch_shape(args.num_tokens, 0), 0, stream, args, layout);
  });
}

void detail::preload_low_latency_kernels() {
  preload(ll_layout_kernel, ll_dispatch_pack_kernel<false>, ll_dispatch_pack_kernel<true>,
          ll_dispatch_unpack_kernel<false, false>, ll_dispatch_unpack_kernel<true, false>,
          ll_dispatch_unpack_kernel<true, true>, ll_combine_pack_kernel, ll_combine_reduce_kernel<8>,
          ll_combine_reduce_kernel<1>);
}

}  // namespace eplib::cuda
