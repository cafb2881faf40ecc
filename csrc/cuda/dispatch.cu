// The nccl transport's dispatch kernels: rows into a send buffer, and the received buffer into the
// outputs. (The ipc transport streams its rows through the peers' rings: ipc_exchange.cu.)
#include <cmath>

#include "common.cuh"
#include "eplib/layout.h"
#include "kernels.h"
#include "rows.cuh"

namespace eplib::cuda {

namespace {

// One warp per token: checks its ids and weights once, then writes its row to every destination
// rank's place in send_buffer. The repeated reads of x hit L2 after the first, so HBM sees x once.
__global__ void __launch_bounds__(kMaxThreadsPerBlock) dispatch_pack_kernel(DispatchPackArgs args, DispatchRowLayout layout) {
  const int lane = lane_id();
  const int num_ranks = args.num_ranks;
  const int num_topk = layout.num_topk;
  for (int64_t t = global_warp_id(); t < args.num_tokens; t += num_global_warps()) {
    for (int k = lane; k < num_topk; k += kWarpSize) {
      const int64_t expert = args.topk_idx[t * num_topk + k];
      if (expert < -1 || expert >= args.num_experts) set_error(args.error_flag, kErrorExpertId);
      if (args.topk_weights != nullptr && !isfinite(args.topk_weights[t * num_topk + k]))
        set_error(args.error_flag, kErrorWeight);
    }
    for (int r = 0; r < num_ranks; ++r) {
      const int32_t pos = args.send_pos[t * num_ranks + r];
      if (pos >= 0) write_dispatch_row(args.send_buffer + static_cast<int64_t>(pos) * layout.stride, args, layout, t, r, lane);
    }
  }
}

// Per-block expert counters live in shared memory next to the static compact_start table; an sm_80+
// launch gets 48 KiB without opting in, static and dynamic together. With more local experts than
// fit, the kernel counts straight into the (zeroed) global counters.
constexpr int64_t kMaxSharedCounters =
    (48 * 1024 - static_cast<int64_t>(kMaxRanks + 1) * sizeof(int64_t) - 64) / sizeof(int32_t);

// One warp per output row (grid-stride); every block recomputes the source table.
__global__ void __launch_bounds__(kMaxThreadsPerBlock)
    dispatch_unpack_kernel(DispatchUnpackArgs args, DispatchRowLayout layout, int num_counted_experts,
                           bool shared_counts) {
  __shared__ int64_t compact_start[kMaxRanks + 1];
  int32_t* expert_counts = dynamic_shared_memory<int32_t>();  // [num_counted_experts] (shared_counts)
  if (shared_counts)
    for (int e = threadIdx.x; e < num_counted_experts; e += blockDim.x) expert_counts[e] = 0;
  const int num_ranks = args.num_ranks;
  const bool clipped = load_compact_starts(args.recv_counts, num_ranks, args.slot_rows, compact_start);
  const int64_t total = compact_start[num_ranks];
  const int64_t num_real = total < args.num_out_rows ? total : args.num_out_rows;
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    if (clipped || total > args.num_out_rows) set_error(args.error_flag, kErrorOverflow);
    if (args.num_recv_out != nullptr) *args.num_recv_out = static_cast<int32_t>(num_real);
  }
  const int lane = lane_id();
  auto* global_counts = reinterpret_cast<unsigned long long*>(args.num_recv_tokens_per_expert);
  const auto count = [&](int32_t local_id) {
    if (shared_counts) atomicAdd(&expert_counts[local_id], 1);
    else atomicAdd(&global_counts[local_id], 1ull);
  };
  for (int64_t i = global_warp_id(); i < args.num_out_rows; i += num_global_warps()) {
    if (i >= num_real) {
      pad_dispatch_row(args, layout, i, 0, lane);
      continue;
    }
    const uint8_t* row = args.recv_buffer + region_row_of(compact_start, num_ranks, args.slot_rows, i) * layout.stride;
    read_dispatch_row(row, args, layout, i, num_counted_experts, count, lane);
  }
  if (!shared_counts) return;
  __syncthreads();
  for (int e = threadIdx.x; e < num_counted_experts; e += blockDim.x)
    if (expert_counts[e] != 0) atomicAdd(&global_counts[e], static_cast<unsigned long long>(expert_counts[e]));
}

}  // namespace

void dispatch_pack(const DispatchPackArgs& args, cudaStream_t stream) {
  if (args.num_ranks <= 0 || args.num_experts < 0 || args.num_experts % args.num_ranks != 0)
    throw std::invalid_argument("eplib: dispatch_pack needs num_ranks > 0 dividing num_experts, got E=" +
                                std::to_string(args.num_experts) + ", R=" + std::to_string(args.num_ranks));
  if (reinterpret_cast<uintptr_t>(args.send_buffer) % 4 != 0)
    throw std::invalid_argument("eplib: dispatch_pack needs a send buffer aligned to 4 bytes (int32 metadata)");
  if (args.num_tokens == 0) return;
  launch("dispatch_pack_kernel", dispatch_pack_kernel, warp_launch_shape(args.num_tokens, 0), 0, stream,
         dispatch_kernel_args(args), dispatch_row_layout(args));
}

void dispatch_unpack(const DispatchUnpackArgs& args, cudaStream_t stream) {
  if (args.num_ranks < 0 || args.num_ranks > kMaxRanks)
    throw std::invalid_argument("eplib: dispatch_unpack supports 0 to " + std::to_string(kMaxRanks) + " ranks, got " +
                                std::to_string(args.num_ranks));
  if (args.num_out_rows < 0 || args.num_out_rows > INT32_MAX)
    throw std::invalid_argument("eplib: dispatch_unpack needs 0 <= num_out_rows <= INT32_MAX, got " +
                                std::to_string(args.num_out_rows));
  if (reinterpret_cast<uintptr_t>(args.recv_buffer) % 4 != 0)
    throw std::invalid_argument("eplib: dispatch_unpack needs a receive buffer aligned to 4 bytes (int32 metadata)");
  const int num_counted_experts = zero_expert_counts(args, stream);
  const bool shared_counts = num_counted_experts <= kMaxSharedCounters;
  const size_t shared_bytes = shared_counts ? static_cast<size_t>(num_counted_experts) * sizeof(int32_t) : 0;
  // At least one block runs, so num_recv_out and the overflow check happen even without rows.
  launch("dispatch_unpack_kernel", dispatch_unpack_kernel, warp_launch_shape(args.num_out_rows, 0), shared_bytes,
         stream, args, make_dispatch_row_layout(args.x_bytes, args.scales_bytes, args.num_topk), num_counted_experts,
         shared_counts);
}

DispatchPackArgs dispatch_kernel_args(const DispatchPackArgs& args) {
  DispatchPackArgs kernel_args = args;
  // num_topk, not the address, says whether top-k data travels: an empty tensor may have no address.
  if (args.num_topk == 0) kernel_args.topk_weights = nullptr;
  return kernel_args;
}

DispatchRowLayout dispatch_row_layout(const DispatchPackArgs& args) {
  return make_dispatch_row_layout(args.x_bytes, args.scales_bytes, args.num_topk);
}

int zero_expert_counts(const DispatchUnpackArgs& args, cudaStream_t stream) {
  const int num_counted_experts =
      args.num_recv_tokens_per_expert != nullptr && args.num_local_experts > 0 ? args.num_local_experts : 0;
  if (num_counted_experts > 0)  // the kernels add their counts into it
    check_cuda(cudaMemsetAsync(args.num_recv_tokens_per_expert, 0, num_counted_experts * sizeof(int64_t), stream),
               "cudaMemsetAsync (dispatch_unpack)");
  return num_counted_experts;
}

void detail::preload_dispatch_kernels() { preload(dispatch_pack_kernel, dispatch_unpack_kernel); }

}  // namespace eplib::cuda
