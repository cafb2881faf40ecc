#include "common.cuh"
#include "eplib/layout.h"
#include "ipc.cuh"
#include "kernels.h"
#include "rows.cuh"

namespace eplib::cuda {

namespace {

// One warp per compacted row: x then its weights, into the row dispatch_unpack read it from (of
// send_buffer, or, ipc, of the source's receive region within the round hand-shake).
__global__ void __launch_bounds__(kMaxThreadsPerBlock)
    combine_pack_kernel(CombinePackArgs args, CombineRowLayout layout, IpcRound round) {
  __shared__ int64_t compact_start[kMaxRanks + 1];
  __shared__ int64_t row_shift[kMaxIpcRanks];
  const uint64_t round_number = begin_send_round(round);
  if (round_number == 0) return;
  const int num_ranks = args.num_ranks;
  load_compact_starts(args.recv_counts, num_ranks, args.slot_rows, compact_start);
  if (round.active && threadIdx.x == 0)
    combine_row_shifts(args.rank_prefix_matrix, round.view.rank, round.view.num_ranks, args.slot_rows, compact_start,
                       row_shift);
  __syncthreads();
  const int64_t total = compact_start[num_ranks] < args.num_rows ? compact_start[num_ranks] : args.num_rows;
  const int lane = lane_id();
  for (int64_t i = global_warp_id(); i < total; i += num_global_warps()) {
    uint8_t* row;
    if (round.active) {
      const int source = source_of_row(compact_start, num_ranks, i);
      const int64_t region_row = i + row_shift[source];
      if (!row_in_region(round.view, region_row, layout.stride)) continue;  // ranks disagree on the handle
      row = region_of(round.view, source) + region_row * layout.stride;
    } else {
      row = args.send_buffer + region_row_of(compact_start, num_ranks, args.slot_rows, i) * layout.stride;
    }
    warp_copy(row, args.x + i * layout.x_bytes, layout.x_bytes, lane);
    for (int k = lane; k < layout.num_topk; k += kWarpSize)
      reinterpret_cast<float*>(row + layout.topk_weights_offset)[k] = args.topk_weights[i * layout.num_topk + k];
  }
  end_send_round(round, round_number);
}

// One warp per token; each lane owns kVector consecutive elements at a time. Per element: 0, then
// bias_0, bias_1, then the rows of ranks 0, 1, ... in that order (cpu::combine_reduce's order). Ipc:
// each block first waits until every rank has written its rows of the round; if that fails, the
// outputs are poisoned (NaN) instead.
template <typename T, int kVector>
__global__ void __launch_bounds__(kMaxThreadsPerBlock)
    combine_reduce_kernel(CombineReduceArgs args, CombineRowLayout layout, IpcRound round) {
  const int lane = lane_id();
  const int64_t hidden = args.hidden;
  const int num_ranks = args.num_ranks;
  auto* combined_x = static_cast<T*>(args.combined_x);
  if (!begin_receive_round(round)) {
    for (int64_t t = global_warp_id(); t < args.num_tokens; t += num_global_warps()) {
      warp_fill(reinterpret_cast<uint8_t*>(combined_x + t * hidden), 0xFF, hidden * static_cast<int64_t>(sizeof(T)),
                lane);
      if (args.combined_topk_weights != nullptr)
        for (int k = lane; k < layout.num_topk; k += kWarpSize) args.combined_topk_weights[t * layout.num_topk + k] = NAN;
    }
    return;
  }
  const uint8_t* recv_buffer = round.active ? region_of(round.view, round.view.rank) : args.recv_buffer;
  const auto* bias_0 = static_cast<const T*>(args.bias_0);
  const auto* bias_1 = static_cast<const T*>(args.bias_1);
  const int64_t num_vectors = hidden / kVector;
  for (int64_t t = global_warp_id(); t < args.num_tokens; t += num_global_warps()) {
    const int32_t* token_send_pos = args.send_pos + t * num_ranks;
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
    if (args.combined_topk_weights != nullptr)
      for (int k = lane; k < layout.num_topk; k += kWarpSize) {
        float sum = 0.0f;
        for (int r = 0; r < num_ranks; ++r) {
          const int32_t pos = token_send_pos[r];
          if (pos < 0) continue;
          const uint8_t* row = recv_buffer + static_cast<int64_t>(pos) * layout.stride;
          sum += reinterpret_cast<const float*>(row + layout.topk_weights_offset)[k];
        }
        args.combined_topk_weights[t * layout.num_topk + k] = sum;
      }
  }
}

// The vector width of combine_reduce for a call: 16 bytes when every address and stride allows it.
template <typename T>
bool combine_reduce_aligned(const CombineReduceArgs& args, const uint8_t* recv_buffer, const CombineRowLayout& layout) {
  return all_16_byte_aligned({reinterpret_cast<uintptr_t>(recv_buffer), reinterpret_cast<uintptr_t>(args.bias_0),
                              reinterpret_cast<uintptr_t>(args.bias_1), reinterpret_cast<uintptr_t>(args.combined_x),
                              static_cast<uint64_t>(layout.stride), static_cast<uint64_t>(layout.x_bytes)});
}

}  // namespace

void combine_pack(const CombinePackArgs& args, const IpcView* ipc, int max_blocks, cudaStream_t stream) {
  check_ipc_launch(ipc, args.num_ranks, "combine_pack");
  if (ipc != nullptr && args.slot_rows == 0 && args.rank_prefix_matrix == nullptr)
    throw std::invalid_argument("eplib: combine_pack through ipc needs rank_prefix_matrix or slot_rows > 0");
  if (args.num_ranks < 0 || args.num_ranks > kMaxRanks)
    throw std::invalid_argument("eplib: combine_pack supports 0 to " + std::to_string(kMaxRanks) + " ranks, got " +
                                std::to_string(args.num_ranks));
  // (An empty tensor may have no address: without rows there is nothing to read.)
  if (args.num_topk > 0 && args.topk_weights == nullptr && args.num_rows > 0)
    throw std::invalid_argument("eplib: combine_pack got num_topk > 0 but no topk_weights");
  if (ipc == nullptr && args.num_topk > 0 && reinterpret_cast<uintptr_t>(args.send_buffer) % 4 != 0)
    throw std::invalid_argument("eplib: combine_pack needs a send buffer aligned to 4 bytes (float weights)");
  if (args.num_rows == 0 && ipc == nullptr) return;  // ipc: the round hand-shake runs without rows too
  launch("combine_pack_kernel", combine_pack_kernel, warp_launch_shape(args.num_rows, max_blocks), 0, stream, args,
         make_combine_row_layout(args.x_bytes, args.num_topk), make_ipc_round(ipc, kPhaseCombineSend));
}

void combine_reduce(const CombineReduceArgs& args, const IpcView* ipc, cudaStream_t stream) {
  check_ipc_launch(ipc, args.num_ranks, "combine_reduce");
  visit_cuda_dtype(args.dtype, [&](auto element) {
    using T = decltype(element);
    const CombineRowLayout layout = make_combine_row_layout(args.hidden * static_cast<int64_t>(sizeof(T)), args.num_topk);
    // Rows are read as T (and the weights as float): the buffer must be aligned to both.
    const uint8_t* recv_buffer =
        ipc != nullptr ? ipc->bases[ipc->rank] + kIpcRegionOffset : args.recv_buffer;
    if (reinterpret_cast<uintptr_t>(recv_buffer) % (args.num_topk > 0 ? 4 : sizeof(T)) != 0)
      throw std::invalid_argument("eplib: combine_reduce needs a receive buffer aligned to " +
                                  std::to_string(args.num_topk > 0 ? 4 : sizeof(T)) + " bytes");
    if (args.num_tokens == 0 && ipc == nullptr) return;  // ipc: the round hand-shake runs without rows too
    visit_vector_width<T>(combine_reduce_aligned<T>(args, recv_buffer, layout), [&](auto vector) {
      launch("combine_reduce_kernel", combine_reduce_kernel<T, decltype(vector)::value>,
             warp_launch_shape(args.num_tokens, 0), 0, stream, args, layout, make_ipc_round(ipc, kPhaseCombineReceive));
    });
  });
}

void detail::preload_combine_kernels() {
  preload(combine_pack_kernel, combine_reduce_kernel<float, 4>, combine_reduce_kernel<float, 1>,
          combine_reduce_kernel<bf16_t, 8>, combine_reduce_kernel<bf16_t, 1>);
}

}  // namespace eplib::cuda
