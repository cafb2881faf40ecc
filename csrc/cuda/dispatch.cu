#include <cmath>

#include "common.cuh"
#include "eplib/layout.h"
#include "kernels.h"
#include "peer.cuh"
#include "rows.cuh"

namespace eplib::cuda {

namespace {

// One warp per token: checks its ids and weights once, then writes its row to every destination
// rank: into send_buffer, or (peer transport) straight into the destinations' receive regions within
// the round hand-shake of peer.cuh. The repeated reads of x hit L2 after the first, so HBM sees x once.
__global__ void __launch_bounds__(kMaxThreadsPerBlock) dispatch_pack_kernel(const uint8_t* x, const uint8_t* x_scales, const int64_t* topk_idx,
                                     const float* topk_weights, int num_experts, const int32_t* send_pos,
                                     int64_t num_tokens, int num_ranks, DispatchRowLayout layout,
                                     uint8_t* send_buffer, int32_t* error_flag, PeerRound round,
                                     const int32_t* rank_prefix_matrix, int64_t slot_rows) {
  __shared__ int64_t row_shift[kMaxPeers];
  const uint64_t round_number = begin_send_round(round);
  if (round_number == 0) return;
  if (round.active && threadIdx.x == 0)
    dispatch_row_shifts(rank_prefix_matrix, round.view.rank, round.view.num_ranks, slot_rows, row_shift);
  __syncthreads();
  const int lane = lane_id();
  const int experts_per_rank = num_experts / num_ranks;
  const int num_topk = layout.num_topk;
  for (int64_t t = global_warp_id(); t < num_tokens; t += num_global_warps()) {
    const int64_t* token_topk_idx = topk_idx + t * num_topk;
    const float* token_weights = topk_weights != nullptr ? topk_weights + t * num_topk : nullptr;
    for (int k = lane; k < num_topk; k += kWarpSize) {
      const int64_t expert = token_topk_idx[k];
      if (expert < -1 || expert >= num_experts) set_error(error_flag, kErrorExpertId);
      if (token_weights != nullptr && !isfinite(token_weights[k])) set_error(error_flag, kErrorWeight);
    }
    for (int r = 0; r < num_ranks; ++r) {
      const int32_t pos = send_pos[t * num_ranks + r];
      if (pos < 0) continue;
      uint8_t* row;
      if (round.active) {
        const int64_t region_row = pos + row_shift[r];
        if (!row_in_region(round.view, region_row, layout.stride)) {  // ranks disagree on the layout
          if (lane == 0) set_error(error_flag, kErrorOverflow);
          continue;
        }
        row = region_of(round.view, r) + region_row * layout.stride;
      } else {
        row = send_buffer + static_cast<int64_t>(pos) * layout.stride;  // send_buffer is null with peers
      }
      warp_copy(row, x + t * layout.x_bytes, layout.x_bytes, lane);
      if (layout.scales_bytes > 0)
        warp_copy(row + layout.scales_offset, x_scales + t * layout.scales_bytes, layout.scales_bytes, lane);
      if (lane == 0) *reinterpret_cast<int32_t*>(row + layout.src_idx_offset) = static_cast<int32_t>(t);
      for (int k = lane; k < num_topk; k += kWarpSize) {
        const int64_t expert = token_topk_idx[k];
        // An id outside [-1, E) is no local expert of any rank: it travels as -1.
        const int32_t local_id = expert < num_experts ? local_expert_id(expert, r, experts_per_rank) : -1;
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

// One warp per output row (grid-stride); every block recomputes the source table. Peer transport:
// each block first waits until every source has written its rows of the round.
__global__ void __launch_bounds__(kMaxThreadsPerBlock)
    dispatch_unpack_kernel(const uint8_t* recv_buffer, const int32_t* recv_counts, int num_ranks, int64_t slot_rows,
                           int64_t num_out_rows, DispatchRowLayout layout, int num_local_experts, bool shared_counts,
                           uint8_t* recv_x, uint8_t* recv_x_scales, int32_t* recv_src_idx, int64_t* recv_topk_idx,
                           float* recv_topk_weights, unsigned long long* num_recv_tokens_per_expert,
                           int32_t* num_recv_out, int32_t* error_flag, PeerRound round) {
  __shared__ int64_t compact_start[kMaxRanks + 1];
  if (!begin_receive_round(round)) return;
  extern __shared__ int32_t expert_counts[];  // [num_local_experts] for this block's rows (shared_counts)
  if (shared_counts)
    for (int e = threadIdx.x; e < num_local_experts; e += blockDim.x) expert_counts[e] = 0;
  const bool clipped = load_compact_starts(recv_counts, num_ranks, slot_rows, compact_start);
  const int64_t total = compact_start[num_ranks];
  const int64_t num_real = total < num_out_rows ? total : num_out_rows;
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    if (clipped || total > num_out_rows) set_error(error_flag, kErrorOverflow);
    if (num_recv_out != nullptr) *num_recv_out = static_cast<int32_t>(num_real);
  }
  const int lane = lane_id();
  const int num_topk = layout.num_topk;
  for (int64_t i = global_warp_id(); i < num_out_rows; i += num_global_warps()) {
    if (i >= num_real) {  // padding row
      warp_zero(recv_x + i * layout.x_bytes, layout.x_bytes, lane);
      if (layout.scales_bytes > 0) warp_zero(recv_x_scales + i * layout.scales_bytes, layout.scales_bytes, lane);
      if (lane == 0) recv_src_idx[i] = -1;
      for (int k = lane; k < num_topk; k += kWarpSize) {
        recv_topk_idx[i * num_topk + k] = -1;
        recv_topk_weights[i * num_topk + k] = 0.0f;
      }
      continue;
    }
    const uint8_t* row = recv_buffer + region_row_of(compact_start, num_ranks, slot_rows, i) * layout.stride;
    warp_copy(recv_x + i * layout.x_bytes, row, layout.x_bytes, lane);
    if (layout.scales_bytes > 0)
      warp_copy(recv_x_scales + i * layout.scales_bytes, row + layout.scales_offset, layout.scales_bytes, lane);
    if (lane == 0) recv_src_idx[i] = *reinterpret_cast<const int32_t*>(row + layout.src_idx_offset);
    for (int k = lane; k < num_topk; k += kWarpSize) {
      const int32_t local_id = reinterpret_cast<const int32_t*>(row + layout.topk_idx_offset)[k];
      recv_topk_idx[i * num_topk + k] = local_id;
      recv_topk_weights[i * num_topk + k] = reinterpret_cast<const float*>(row + layout.topk_weights_offset)[k];
      // Senders only write ids in [-1, E_local); the bound keeps a corrupt row harmless.
      if (local_id >= 0 && local_id < num_local_experts) {
        if (shared_counts) atomicAdd(&expert_counts[local_id], 1);
        else atomicAdd(&num_recv_tokens_per_expert[local_id], 1ull);
      }
    }
  }
  if (!shared_counts) return;
  __syncthreads();
  for (int e = threadIdx.x; e < num_local_experts; e += blockDim.x)
    if (expert_counts[e] != 0)
      atomicAdd(&num_recv_tokens_per_expert[e], static_cast<unsigned long long>(expert_counts[e]));
}

}  // namespace

void dispatch_pack(const uint8_t* x, int64_t x_bytes, const uint8_t* x_scales, int64_t scales_bytes,
                   const int64_t* topk_idx, const float* topk_weights, int num_topk, int num_experts,
                   const int32_t* send_pos, int64_t num_tokens, int num_ranks, uint8_t* send_buffer,
                   int32_t* error_flag, const PeerView* peers, const int32_t* rank_prefix_matrix, int64_t slot_rows,
                   int max_blocks, cudaStream_t stream) {
  check_peer_launch(peers, num_ranks, "dispatch_pack");
  if (peers != nullptr && slot_rows == 0 && rank_prefix_matrix == nullptr)
    throw std::invalid_argument("eplib: dispatch_pack to peers needs rank_prefix_matrix or slot_rows > 0");
  if (num_ranks <= 0 || num_experts < 0 || num_experts % num_ranks != 0)
    throw std::invalid_argument("eplib: dispatch_pack needs num_ranks > 0 dividing num_experts, got E=" +
                                std::to_string(num_experts) + ", R=" + std::to_string(num_ranks));
  if (peers == nullptr && reinterpret_cast<uintptr_t>(send_buffer) % 4 != 0)
    throw std::invalid_argument("eplib: dispatch_pack needs a send buffer aligned to 4 bytes (int32 metadata)");
  const bool has_topk = topk_idx != nullptr;
  const DispatchRowLayout layout = make_dispatch_row_layout(x_bytes, scales_bytes, has_topk ? num_topk : 0);
  if (num_tokens == 0 && peers == nullptr) return;  // peers: the round hand-shake runs without rows too
  const LaunchShape shape = warp_launch_shape(num_tokens, max_blocks);
  dispatch_pack_kernel<<<shape.blocks, shape.threads, 0, stream>>>(
      x, x_scales, topk_idx, has_topk ? topk_weights : nullptr, num_experts, send_pos, num_tokens, num_ranks, layout,
      send_buffer, error_flag, make_peer_round(peers, kPhaseDispatchSend), rank_prefix_matrix, slot_rows);
  check_launch("dispatch_pack");
}

void dispatch_unpack(const uint8_t* recv_buffer, const int32_t* recv_counts, int num_ranks, int64_t slot_rows,
                     int64_t num_out_rows, int64_t x_bytes, int64_t scales_bytes, int num_topk, int num_local_experts,
                     uint8_t* recv_x, uint8_t* recv_x_scales, int32_t* recv_src_idx, int64_t* recv_topk_idx,
                     float* recv_topk_weights, int64_t* num_recv_tokens_per_expert, int32_t* num_recv_out,
                     int32_t* error_flag, const PeerView* peers, int max_blocks, cudaStream_t stream) {
  check_peer_launch(peers, num_ranks, "dispatch_unpack");
  if (num_ranks < 0 || num_ranks > kMaxRanks)
    throw std::invalid_argument("eplib: dispatch_unpack supports 0 to " + std::to_string(kMaxRanks) + " ranks, got " +
                                std::to_string(num_ranks));
  if (num_out_rows < 0 || num_out_rows > INT32_MAX)
    throw std::invalid_argument("eplib: dispatch_unpack needs 0 <= num_out_rows <= INT32_MAX, got " +
                                std::to_string(num_out_rows));
  if (reinterpret_cast<uintptr_t>(recv_buffer) % 4 != 0)
    throw std::invalid_argument("eplib: dispatch_unpack needs a receive buffer aligned to 4 bytes (int32 metadata)");
  const DispatchRowLayout layout = make_dispatch_row_layout(x_bytes, scales_bytes, num_topk);
  const int num_counted_experts =
      num_recv_tokens_per_expert != nullptr && num_local_experts > 0 ? num_local_experts : 0;
  if (num_counted_experts > 0)  // blocks add their counts into it
    check_cuda(cudaMemsetAsync(num_recv_tokens_per_expert, 0, num_counted_experts * sizeof(int64_t), stream),
               "cudaMemsetAsync (dispatch_unpack)");
  const bool shared_counts = num_counted_experts <= kMaxSharedCounters;
  const size_t shared_bytes = shared_counts ? static_cast<size_t>(num_counted_experts) * sizeof(int32_t) : 0;
  // At least one block runs, so num_recv_out and the overflow check happen even without rows.
  const LaunchShape shape = warp_launch_shape(num_out_rows, max_blocks);
  dispatch_unpack_kernel<<<shape.blocks, shape.threads, shared_bytes, stream>>>(
      recv_buffer, recv_counts, num_ranks, slot_rows, num_out_rows, layout, num_counted_experts, shared_counts,
      recv_x, recv_x_scales, recv_src_idx, recv_topk_idx, recv_topk_weights,
      reinterpret_cast<unsigned long long*>(num_recv_tokens_per_expert), num_recv_out, error_flag,
      make_peer_round(peers, kPhaseDispatchReceive));
  check_launch("dispatch_unpack");
}

}  // namespace eplib::cuda
