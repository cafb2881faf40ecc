// The nccl transport's combine kernels: expert outputs into a send buffer, and the received rows
// reduced per token. (The ipc transport streams its rows through the peers' rings: ipc_exchange.cu.)
#include "common.cuh"
#include "eplib/layout.h"
#include "kernels.h"
#include "rows.cuh"

namespace eplib::cuda {

namespace {

// One warp per compacted row: x then its weights, into the row dispatch_unpack read it from.
__global__ void __launch_bounds__(kMaxThreadsPerBlock) combine_pack_kernel(CombinePackArgs args, CombineRowLayout layout) {
  __shared__ int64_t compact_start[kMaxRanks + 1];
  const int num_ranks = args.num_ranks;
  load_compact_starts(args.recv_counts, num_ranks, args.slot_rows, compact_start);
  const int64_t total = compact_start[num_ranks] < args.num_rows ? compact_start[num_ranks] : args.num_rows;
  const int lane = lane_id();
  for (int64_t i = global_warp_id(); i < total; i += num_global_warps()) {
    uint8_t* row = args.send_buffer + region_row_of(compact_start, num_ranks, args.slot_rows, i) * layout.stride;
    warp_copy(row, args.x + i * layout.x_bytes, layout.x_bytes, lane);
    for (int k = lane; k < layout.num_topk; k += kWarpSize)
      reinterpret_cast<float*>(row + layout.topk_weights_offset)[k] = args.topk_weights[i * layout.num_topk + k];
  }
}

// One warp per token: its rows at send_pos of recv_buffer (reduce_token of rows.cuh).
template <typename T, int kVector>
__global__ void __launch_bounds__(kMaxThreadsPerBlock) combine_reduce_kernel(CombineReduceArgs args, CombineRowLayout layout) {
  const int lane = lane_id();
  for (int64_t t = global_warp_id(); t < args.num_tokens; t += num_global_warps()) {
    const int32_t* token_send_pos = args.send_pos + t * args.num_ranks;
    reduce_token<T, kVector>(args, layout, t, [&](int r) -> const uint8_t* {
      const int32_t pos = token_send_pos[r];
      return pos < 0 ? nullptr : args.recv_buffer + static_cast<int64_t>(pos) * layout.stride;
    }, lane);
  }
}

}  // namespace

void combine_pack(const CombinePackArgs& args, cudaStream_t stream) {
  if (args.num_ranks < 0 || args.num_ranks > kMaxRanks)
    throw std::invalid_argument("eplib: combine_pack supports 0 to " + std::to_string(kMaxRanks) + " ranks, got " +
                                std::to_string(args.num_ranks));
  check_combine_weights(args);
  if (args.num_topk > 0 && reinterpret_cast<uintptr_t>(args.send_buffer) % 4 != 0)
    throw std::invalid_argument("eplib: combine_pack needs a send buffer aligned to 4 bytes (float weights)");
  if (args.num_rows == 0) return;
  launch("combine_pack_kernel", combine_pack_kernel, warp_launch_shape(args.num_rows, 0), 0, stream, args,
         make_combine_row_layout(args.x_bytes, args.num_topk));
}

void combine_reduce(const CombineReduceArgs& args, cudaStream_t stream) {
  visit_cuda_dtype(args.dtype, [&](auto element) {
    using T = decltype(element);
    const CombineRowLayout layout = make_combine_row_layout(args.hidden * static_cast<int64_t>(sizeof(T)), args.num_topk);
    // Rows are read as T (and the weights as float): the buffer must be aligned to both.
    if (reinterpret_cast<uintptr_t>(args.recv_buffer) % (args.num_topk > 0 ? 4 : sizeof(T)) != 0)
      throw std::invalid_argument("eplib: combine_reduce needs a receive buffer aligned to " +
                                  std::to_string(args.num_topk > 0 ? 4 : sizeof(T)) + " bytes");
    if (args.num_tokens == 0) return;
    const bool aligned = all_16_byte_aligned(
        {reinterpret_cast<uintptr_t>(args.recv_buffer), reinterpret_cast<uintptr_t>(args.bias_0),
         reinterpret_cast<uintptr_t>(args.bias_1), reinterpret_cast<uintptr_t>(args.combined_x),
         static_cast<uint64_t>(layout.stride), static_cast<uint64_t>(layout.x_bytes)});
    visit_vector_width<T>(aligned, [&](auto vector) {
      launch("combine_reduce_kernel", combine_reduce_kernel<T, decltype(vector)::value>,
             warp_launch_shape(args.num_tokens, 0), 0, stream, args, layout);
    });
  });
}

void check_combine_weights(const CombinePackArgs& args) {
  // (An empty tensor may have no address: without rows there is nothing to read.)
  if (args.num_topk > 0 && args.topk_weights == nullptr && args.num_rows > 0)
    throw std::invalid_argument("eplib: combine_pack got num_topk > 0 but no topk_weights");
}

void detail::preload_combine_kernels() {
  preload(combine_pack_kernel, combine_reduce_kernel<float, 4>, combine_reduce_kernel<float, 1>,
          combine_reduce_kernel<bf16_t, 8>, combine_reduce_kernel<bf16_t, 1>);
}

}  // namespace eplib::cuda
