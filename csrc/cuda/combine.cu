#include "common.cuh"
#include "eplib/layout.h"
#include "kernels.h"
#include "peer.cuh"
#include "rows.cuh"

namespace eplib::cuda {

namespace {

// One warp per compacted row: x then its weights, into the row dispatch_unpack read it from (of
// send_buffer, or, peer transport, of the source's receive region within the round hand-shake).
__global__ void __launch_bounds__(kMaxThreadsPerBlock)
    combine_pack_kernel(const uint8_t* x, const float* topk_weights, const int32_t* recv_counts, int num_ranks,
                        int64_t slot_rows, int64_t num_rows, CombineRowLayout layout, uint8_t* send_buffer,
                        PeerRound round, const int32_t* rank_prefix_matrix) {
  __shared__ int64_t compact_start[kMaxRanks + 1];
  __shared__ int64_t row_shift[kMaxPeers];
  const uint64_t round_number = begin_send_round(round);
  if (round_number == 0) return;
  load_compact_starts(recv_counts, num_ranks, slot_rows, compact_start);
  if (round.active && threadIdx.x == 0)
    combine_row_shifts(rank_prefix_matrix, round.view.rank, round.view.num_ranks, slot_rows, compact_start,
                       row_shift);
  __syncthreads();
  const int64_t total = compact_start[num_ranks] < num_rows ? compact_start[num_ranks] : num_rows;
  const int lane = lane_id();
  for (int64_t i = global_warp_id(); i < total; i += num_global_warps()) {
    uint8_t* row;
    if (round.active) {
      const int source = source_of_row(compact_start, num_ranks, i);
      const int64_t region_row = i + row_shift[source];
      if (!row_in_region(round.view, region_row, layout.stride)) continue;  // ranks disagree on the handle
      row = region_of(round.view, source) + region_row * layout.stride;
    } else {
      row = send_buffer + region_row_of(compact_start, num_ranks, slot_rows, i) * layout.stride;
    }
    warp_copy(row, x + i * layout.x_bytes, layout.x_bytes, lane);
    for (int k = lane; k < layout.num_topk; k += kWarpSize)
      reinterpret_cast<float*>(row + layout.topk_weights_offset)[k] = topk_weights[i * layout.num_topk + k];
  }
  end_send_round(round, round_number);
}

// One warp per token; each lane owns kVector consecutive elements at a time. Per element: 0, then
// bias_0, bias_1, then the rows of ranks 0, 1, ... in that order (cpu::combine_reduce's order). Peer
// transport: each block first waits until every rank has written its rows of the round.
template <typename T, int kVector>
__global__ void __launch_bounds__(kMaxThreadsPerBlock)
    combine_reduce_kernel(const uint8_t* recv_buffer, int64_t hidden, const int32_t* send_pos, int64_t num_tokens,
                          int num_ranks, const T* bias_0, const T* bias_1, T* combined_x,
                          float* combined_topk_weights, CombineRowLayout layout, PeerRound round) {
  if (!begin_receive_round(round)) return;
  const int lane = lane_id();
  const int64_t num_vectors = hidden / kVector;
  for (int64_t t = global_warp_id(); t < num_tokens; t += num_global_warps()) {
    const int32_t* token_send_pos = send_pos + t * num_ranks;
    for (int64_t v = lane; v < num_vectors; v += kWarpSize) {
      float acc[kVector];
#pragma unroll
      for (int j = 0; j < kVector; ++j) acc[j] = 0.0f;
      if (bias_0 != nullptr) add_vector<T, kVector>(acc, bias_0 + t * hidden, v, 1.0f, false);
      if (bias_1 != nullptr) add_vector<T, kVector>(acc, bias_1 + t * hidden, v, 1.0f, false);
      for (int r = 0; r < num_ranks; ++r) {
        const int32_t pos = token_send_pos[r];
        if (pos < 0) continue;
        const T* row = reinterpret_cast<const T*>(recv_buffer + static_cast<int64_t>(pos) * layout.stride);
        add_vector<T, kVector>(acc, row, v, 1.0f, false);
      }
      store_vector<T, kVector>(combined_x + t * hidden, v, acc);
    }
    if (combined_topk_weights != nullptr)
      for (int k = lane; k < layout.num_topk; k += kWarpSize) {
        float sum = 0.0f;
        for (int r = 0; r < num_ranks; ++r) {
          const int32_t pos = token_send_pos[r];
          if (pos < 0) continue;
          const uint8_t* row = recv_buffer + static_cast<int64_t>(pos) * layout.stride;
          sum += reinterpret_cast<const float*>(row + layout.topk_weights_offset)[k];
        }
        combined_topk_weights[t * layout.num_topk + k] = sum;
      }
  }
}

}  // namespace

void combine_pack(const uint8_t* x, int64_t x_bytes, const float* topk_weights, int num_topk,
                  const int32_t* recv_counts, int num_ranks, int64_t slot_rows, int64_t num_rows,
                  uint8_t* send_buffer, const PeerView* peers, const int32_t* rank_prefix_matrix, int max_blocks,
                  cudaStream_t stream) {
  check_peer_launch(peers, num_ranks, "combine_pack");
  if (peers != nullptr && slot_rows == 0 && rank_prefix_matrix == nullptr)
    throw std::invalid_argument("eplib: combine_pack to peers needs rank_prefix_matrix or slot_rows > 0");
  if (num_ranks < 0 || num_ranks > kMaxRanks)
    throw std::invalid_argument("eplib: combine_pack supports 0 to " + std::to_string(kMaxRanks) + " ranks, got " +
                                std::to_string(num_ranks));
  if (num_topk > 0 && topk_weights == nullptr)
    throw std::invalid_argument("eplib: combine_pack got num_topk > 0 but no topk_weights");
  if (peers == nullptr && num_topk > 0 && reinterpret_cast<uintptr_t>(send_buffer) % 4 != 0)
    throw std::invalid_argument("eplib: combine_pack needs a send buffer aligned to 4 bytes (float weights)");
  if (num_rows == 0 && peers == nullptr) return;  // peers: the round hand-shake runs without rows too
  const CombineRowLayout layout = make_combine_row_layout(x_bytes, num_topk);
  const LaunchShape shape = warp_launch_shape(num_rows, max_blocks);
  combine_pack_kernel<<<shape.blocks, shape.threads, 0, stream>>>(
      x, topk_weights, recv_counts, num_ranks, slot_rows, num_rows, layout, send_buffer,
      make_peer_round(peers, kPhaseCombineSend), rank_prefix_matrix);
  check_launch("combine_pack");
}

void combine_reduce(DType dtype, const uint8_t* recv_buffer, int64_t hidden, int num_topk, const int32_t* send_pos,
                    int64_t num_tokens, int num_ranks, const void* bias_0, const void* bias_1, void* combined_x,
                    float* combined_topk_weights, const PeerView* peers, int max_blocks, cudaStream_t stream) {
  check_peer_launch(peers, num_ranks, "combine_reduce");
  visit_cuda_dtype(dtype, [&](auto element) {
    using T = decltype(element);
    const CombineRowLayout layout = make_combine_row_layout(hidden * static_cast<int64_t>(sizeof(T)), num_topk);
    // Rows are read as T (and the weights as float): the buffer must be aligned to both.
    if (reinterpret_cast<uintptr_t>(recv_buffer) % (num_topk > 0 ? 4 : sizeof(T)) != 0)
      throw std::invalid_argument("eplib: combine_reduce needs a receive buffer aligned to " +
                                  std::to_string(num_topk > 0 ? 4 : sizeof(T)) + " bytes");
    if (num_tokens == 0 && peers == nullptr) return;  // peers: the round hand-shake runs without rows too
    const bool aligned = all_16_byte_aligned({reinterpret_cast<uintptr_t>(recv_buffer),
                                              reinterpret_cast<uintptr_t>(bias_0), reinterpret_cast<uintptr_t>(bias_1),
                                              reinterpret_cast<uintptr_t>(combined_x),
                                              static_cast<uint64_t>(layout.stride),
                                              static_cast<uint64_t>(layout.x_bytes)});
    visit_vector_width<T>(aligned, [&](auto vector) {
      const LaunchShape shape = warp_launch_shape(num_tokens, max_blocks);
      combine_reduce_kernel<T, decltype(vector)::value><<<shape.blocks, shape.threads, 0, stream>>>(
          recv_buffer, hidden, send_pos, num_tokens, num_ranks, static_cast<const T*>(bias_0),
          static_cast<const T*>(bias_1), static_cast<T*>(combined_x), combined_topk_weights, layout,
          make_peer_round(peers, kPhaseCombineReceive));
    });
    check_launch("combine_reduce");
  });
}

}  // namespace eplib::cuda
