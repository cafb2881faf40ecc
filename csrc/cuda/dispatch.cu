#include <cmath>

#include "common.cuh"
#include "eplib/layout.h"
#include "ipc.cuh"
#include "kernels.h"
#include "rows.cuh"

namespace eplib::cuda {

namespace {

// Scales [t, :] through their strides into a packed row: row-major ones as one warp copy, others one
// 4-byte scale per lane.
__device__ void warp_copy_scales(uint8_t* row_scales, const DispatchPackArgs& args, const DispatchRowLayout& layout,
                                 int64_t t, int lane) {
  const uint8_t* first = args.x_scales + scale_offset(t, 0, args.scales_token_stride, args.scales_column_stride);
  if (args.scales_column_stride == 1) {
    warp_copy(row_scales, first, layout.scales_bytes, lane);
    return;
  }
  const int64_t num_scales = layout.scales_bytes / kScaleBytes;
  for (int64_t j = lane; j < num_scales; j += kWarpSize)
    vector_store(reinterpret_cast<int32_t*>(row_scales) + j,
                 vector_load(reinterpret_cast<const int32_t*>(first + scale_offset(0, j, 0, args.scales_column_stride))));
}

// One warp per token: checks its ids and weights once, then writes its row to every destination
// rank: into send_buffer, or (ipc) straight into the destinations' receive regions within the round
// hand-shake of ipc.cuh. The repeated reads of x hit L2 after the first, so HBM sees x once.
__global__ void __launch_bounds__(kMaxThreadsPerBlock)
    dispatch_pack_kernel(DispatchPackArgs args, DispatchRowLayout layout, IpcRound round) {
  __shared__ int64_t row_shift[kMaxIpcRanks];
  const uint64_t round_number = begin_send_round(round);
  if (round_number == 0) return;
  if (round.active && threadIdx.x == 0)
    dispatch_row_shifts(args.rank_prefix_matrix, round.view.rank, round.view.num_ranks, args.slot_rows, row_shift);
  __syncthreads();
  const int lane = lane_id();
  const int num_ranks = args.num_ranks;
  const int experts_per_rank = args.num_experts / num_ranks;
  const int num_topk = layout.num_topk;
  for (int64_t t = global_warp_id(); t < args.num_tokens; t += num_global_warps()) {
    const int64_t* token_topk_idx = args.topk_idx + t * num_topk;
    const float* token_weights = args.topk_weights != nullptr ? args.topk_weights + t * num_topk : nullptr;
    for (int k = lane; k < num_topk; k += kWarpSize) {
      const int64_t expert = token_topk_idx[k];
      if (expert < -1 || expert >= args.num_experts) set_error(args.error_flag, kErrorExpertId);
      if (token_weights != nullptr && !isfinite(token_weights[k])) set_error(args.error_flag, kErrorWeight);
    }
    for (int r = 0; r < num_ranks; ++r) {
      const int32_t pos = args.send_pos[t * num_ranks + r];
      if (pos < 0) continue;
      uint8_t* row;
      if (round.active) {
        const int64_t region_row = pos + row_shift[r];
        if (!row_in_region(round.view, region_row, layout.stride)) {  // ranks disagree on the layout
          if (lane == 0) set_error(args.error_flag, kErrorOverflow);
          continue;
        }
        row = region_of(round.view, r) + region_row * layout.stride;
      } else {
        row = args.send_buffer + static_cast<int64_t>(pos) * layout.stride;
      }
      warp_copy(row, args.x + t * layout.x_bytes, layout.x_bytes, lane);
      if (layout.scales_bytes > 0) warp_copy_scales(row + layout.scales_offset, args, layout, t, lane);
      if (lane == 0) *reinterpret_cast<int32_t*>(row + layout.src_idx_offset) = static_cast<int32_t>(t);
      for (int k = lane; k < num_topk; k += kWarpSize) {
        const int64_t expert = token_topk_idx[k];
        // An id outside [-1, E) is no local expert of any rank: it travels as -1.
        const int32_t local_id = expert < args.num_experts ? local_expert_id(expert, r, experts_per_rank) : -1;
        const float weight = (local_id >= 0 && token_weights != nullptr) ? token_weights[k] : 0.0f;
        reinterpret_cast<int32_t*>(row + layout.topk_idx_offset)[k] = local_id;
        reinterpret_cast<float*>(row + layout.topk_weights_offset)[k] = weight;
      }
    }
  }
  end_send_round(round, round_number);
}

// Per-block expert counters live in shared memory next to the static compact_start table; an sm_80+
// launch gets 48 KiB without opting in, static and dynamic together. With more local experts than
// fit, the kernel counts straight into the (zeroed) global counters.
constexpr int64_t kMaxSharedCounters =
    (48 * 1024 - static_cast<int64_t>(kMaxRanks + 1) * sizeof(int64_t) - 64) / sizeof(int32_t);

// What a receive kernel writes when its round failed (a timeout, or a buffer that had aborted): every
// output row, so that no caller (a CUDA graph replay included) reads last call's values as this one's.
// 0xFF bytes are NaN in every float type eplib moves (fp32, bf16, fp8 e4m3) and -1 in the int ones.
__device__ void poison_dispatch_outputs(const DispatchUnpackArgs& args, const DispatchRowLayout& layout,
                                        int num_counted_experts) {
  const int lane = lane_id();
  for (int64_t i = global_warp_id(); i < args.num_out_rows; i += num_global_warps()) {
    warp_fill(args.recv_x + i * layout.x_bytes, 0xFF, layout.x_bytes, lane);
    if (layout.scales_bytes > 0)
      warp_fill(args.recv_x_scales + i * layout.scales_bytes, 0xFF, layout.scales_bytes, lane);
    if (lane == 0) args.recv_src_idx[i] = -1;
    for (int k = lane; k < layout.num_topk; k += kWarpSize) {
      args.recv_topk_idx[i * layout.num_topk + k] = -1;
      args.recv_topk_weights[i * layout.num_topk + k] = NAN;
    }
  }
  if (blockIdx.x == 0) {
    for (int e = threadIdx.x; e < num_counted_experts; e += blockDim.x) args.num_recv_tokens_per_expert[e] = -1;
    if (threadIdx.x == 0 && args.num_recv_out != nullptr) *args.num_recv_out = -1;
  }
}

// One warp per output row (grid-stride); every block recomputes the source table. Ipc: each block
// first waits until every source has written its rows of the round.
__global__ void __launch_bounds__(kMaxThreadsPerBlock)
    dispatch_unpack_kernel(DispatchUnpackArgs args, DispatchRowLayout layout, int num_counted_experts,
                           bool shared_counts, IpcRound round) {
  __shared__ int64_t compact_start[kMaxRanks + 1];
  if (!begin_receive_round(round)) {
    poison_dispatch_outputs(args, layout, num_counted_experts);
    return;
  }
  int32_t* expert_counts = dynamic_shared_memory<int32_t>();  // [num_counted_experts] (shared_counts)
  if (shared_counts)
    for (int e = threadIdx.x; e < num_counted_experts; e += blockDim.x) expert_counts[e] = 0;
  const uint8_t* recv_buffer = round.active ? region_of(round.view, round.view.rank) : args.recv_buffer;
  const int num_ranks = args.num_ranks;
  const bool clipped = load_compact_starts(args.recv_counts, num_ranks, args.slot_rows, compact_start);
  const int64_t total = compact_start[num_ranks];
  const int64_t num_real = total < args.num_out_rows ? total : args.num_out_rows;
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    if (clipped || total > args.num_out_rows) set_error(args.error_flag, kErrorOverflow);
    if (args.num_recv_out != nullptr) *args.num_recv_out = static_cast<int32_t>(num_real);
  }
  const int lane = lane_id();
  const int num_topk = layout.num_topk;
  auto* global_counts = reinterpret_cast<unsigned long long*>(args.num_recv_tokens_per_expert);
  for (int64_t i = global_warp_id(); i < args.num_out_rows; i += num_global_warps()) {
    if (i >= num_real) {  // padding row
      warp_fill(args.recv_x + i * layout.x_bytes, 0, layout.x_bytes, lane);
      if (layout.scales_bytes > 0) warp_fill(args.recv_x_scales + i * layout.scales_bytes, 0, layout.scales_bytes, lane);
      if (lane == 0) args.recv_src_idx[i] = -1;
      for (int k = lane; k < num_topk; k += kWarpSize) {
        args.recv_topk_idx[i * num_topk + k] = -1;
        args.recv_topk_weights[i * num_topk + k] = 0.0f;
      }
      continue;
    }
    const uint8_t* row =
        recv_buffer + region_row_of(compact_start, num_ranks, args.slot_rows, i) * layout.stride;
    warp_copy(args.recv_x + i * layout.x_bytes, row, layout.x_bytes, lane);
    if (layout.scales_bytes > 0)
      warp_copy(args.recv_x_scales + i * layout.scales_bytes, row + layout.scales_offset, layout.scales_bytes, lane);
    if (lane == 0) args.recv_src_idx[i] = *reinterpret_cast<const int32_t*>(row + layout.src_idx_offset);
    for (int k = lane; k < num_topk; k += kWarpSize) {
      const int32_t local_id = reinterpret_cast<const int32_t*>(row + layout.topk_idx_offset)[k];
      args.recv_topk_idx[i * num_topk + k] = local_id;
      args.recv_topk_weights[i * num_topk + k] = reinterpret_cast<const float*>(row + layout.topk_weights_offset)[k];
      // Senders only write ids in [-1, E_local); the bound keeps a corrupt row harmless.
      if (local_id >= 0 && local_id < num_counted_experts) {
        if (shared_counts) atomicAdd(&expert_counts[local_id], 1);
        else atomicAdd(&global_counts[local_id], 1ull);
      }
    }
  }
  if (!shared_counts) return;
  __syncthreads();
  for (int e = threadIdx.x; e < num_counted_experts; e += blockDim.x)
    if (expert_counts[e] != 0) atomicAdd(&global_counts[e], static_cast<unsigned long long>(expert_counts[e]));
}

}  // namespace

void dispatch_pack(const DispatchPackArgs& args, const IpcView* ipc, int max_blocks, cudaStream_t stream) {
  check_ipc_launch(ipc, args.num_ranks, "dispatch_pack");
  if (ipc != nullptr && args.slot_rows == 0 && args.rank_prefix_matrix == nullptr)
    throw std::invalid_argument("eplib: dispatch_pack through ipc needs rank_prefix_matrix or slot_rows > 0");
  if (args.num_ranks <= 0 || args.num_experts < 0 || args.num_experts % args.num_ranks != 0)
    throw std::invalid_argument("eplib: dispatch_pack needs num_ranks > 0 dividing num_experts, got E=" +
                                std::to_string(args.num_experts) + ", R=" + std::to_string(args.num_ranks));
  if (ipc == nullptr && reinterpret_cast<uintptr_t>(args.send_buffer) % 4 != 0)
    throw std::invalid_argument("eplib: dispatch_pack needs a send buffer aligned to 4 bytes (int32 metadata)");
  // num_topk, not the address, says whether top-k data travels: an empty tensor may have no address.
  const DispatchRowLayout layout = make_dispatch_row_layout(args.x_bytes, args.scales_bytes, args.num_topk);
  if (args.num_tokens == 0 && ipc == nullptr) return;  // ipc: the round hand-shake runs without rows too
  DispatchPackArgs kernel_args = args;
  if (args.num_topk == 0) kernel_args.topk_weights = nullptr;
  launch("dispatch_pack_kernel", dispatch_pack_kernel, warp_launch_shape(args.num_tokens, max_blocks), 0, stream,
         kernel_args, layout, make_ipc_round(ipc, kPhaseDispatchSend));
}

void dispatch_unpack(const DispatchUnpackArgs& args, const IpcView* ipc, cudaStream_t stream) {
  check_ipc_launch(ipc, args.num_ranks, "dispatch_unpack");
  if (args.num_ranks < 0 || args.num_ranks > kMaxRanks)
    throw std::invalid_argument("eplib: dispatch_unpack supports 0 to " + std::to_string(kMaxRanks) + " ranks, got " +
                                std::to_string(args.num_ranks));
  if (args.num_out_rows < 0 || args.num_out_rows > INT32_MAX)
    throw std::invalid_argument("eplib: dispatch_unpack needs 0 <= num_out_rows <= INT32_MAX, got " +
                                std::to_string(args.num_out_rows));
  if (ipc == nullptr && reinterpret_cast<uintptr_t>(args.recv_buffer) % 4 != 0)
    throw std::invalid_argument("eplib: dispatch_unpack needs a receive buffer aligned to 4 bytes (int32 metadata)");
  const DispatchRowLayout layout = make_dispatch_row_layout(args.x_bytes, args.scales_bytes, args.num_topk);
  const int num_counted_experts =
      args.num_recv_tokens_per_expert != nullptr && args.num_local_experts > 0 ? args.num_local_experts : 0;
  if (num_counted_experts > 0)  // blocks add their counts into it
    check_cuda(cudaMemsetAsync(args.num_recv_tokens_per_expert, 0, num_counted_experts * sizeof(int64_t), stream),
               "cudaMemsetAsync (dispatch_unpack)");
  const bool shared_counts = num_counted_experts <= kMaxSharedCounters;
  const size_t shared_bytes = shared_counts ? static_cast<size_t>(num_counted_experts) * sizeof(int32_t) : 0;
  // At least one block runs, so num_recv_out and the overflow check happen even without rows.
  launch("dispatch_unpack_kernel", dispatch_unpack_kernel, warp_launch_shape(args.num_out_rows, 0), shared_bytes,
         stream, args, layout, num_counted_experts, shared_counts, make_ipc_round(ipc, kPhaseDispatchReceive));
}

void detail::preload_dispatch_kernels() { preload(dispatch_pack_kernel, dispatch_unpack_kernel); }

}  // namespace eplib::cuda
