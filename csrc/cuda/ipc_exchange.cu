// The ipc transport's exchange kernels: dispatch and combine rows streaming through the rings of the
// peers' buffers while senders still write (protocol and invariants: ipc.h). One cooperative launch
// per exchange: blocks [0, C) send, blocks [C, 2C) receive, R warps each (warp w serves peer w).
#include "ipc_exchange.h"

#include <cmath>

#include "common.cuh"
#include "eplib/layout.h"
#include "ipc.cuh"
#include "rows.cuh"

namespace eplib::cuda {

namespace {

constexpr int kExchangeThreads = kMaxIpcRanks * kWarpSize;
// Tokens a combine receiver block reduces between two waits (each stream then needs at most this many rows).
constexpr int kCombineTile = kWarpSize;

// First token of `channel` of a rank's num_tokens tokens: channels are contiguous token ranges.
__device__ __forceinline__ int64_t channel_begin(int64_t num_tokens, int channel, int num_channels) {
  return num_tokens * channel / num_channels;
}

// Lane 0's value of a warp-uniform 64-bit quantity, for every lane.
__device__ __forceinline__ uint64_t from_lane_0(uint64_t value) { return __shfl_sync(kFullMask, value, 0); }

// A sender warp's stream (this rank -> destination, channel): the rows it has written (`sent`), the
// ones it has published to the destination (`published`) and the credit it last saw.
struct SendStream {
  const IpcView* view;
  const IpcRings* rings;
  int destination;
  int channel;
  int32_t phase;
  uint64_t close;  // what the sender stores into closed at the end (close_mark, ipc.h)
  uint64_t sent;
  uint64_t published;
  uint64_t credit_seen;

  __device__ uint64_t* tail() const { return &header_of(*view, destination)->tail[view->rank][channel]; }

  // Slot of the next row, once the destination has read its previous occupant; null when a wait failed.
  // Rows written but not yet published are published before waiting (the reader needs them to move on).
  __device__ uint8_t* next_slot(int lane) {
    if (sent - credit_seen >= static_cast<uint64_t>(rings->num_slots)) {
      if (sent > published) publish(lane);
      const uint64_t* credit = &own_header(*view)->credit[destination][channel];
      if (!wait_for_slot(*view, *rings, credit, sent, phase, destination, lane)) return nullptr;
      credit_seen = from_lane_0(lane == 0 ? load_acquire_sys(credit) : 0);
    }
    return ring_slot(*view, *rings, destination, view->rank, channel, sent);
  }

  // After a row: publish every chunk_rows rows.
  __device__ void row_written(int lane) {
    ++sent;
    if (sent - published >= static_cast<uint64_t>(rings->chunk_rows)) publish(lane);
  }

  __device__ void publish(int lane) {
    publish_rows(tail(), sent, lane);
    published = sent;
  }
};

__device__ SendStream open_send_stream(const IpcView& view, const IpcRings& rings, int destination, int channel,
                                       int32_t phase, uint64_t round, bool rejected) {
  const uint64_t sent = load_volatile(&own_header(view)->sent[destination][channel]);
  // At a round's start the destination has read every earlier row (it waited for ready, see ipc.h).
  return SendStream{&view, &rings, destination, channel, phase, close_mark(round, rejected), sent, sent, sent};
}

// The end of a sender warp's stream: the rest published, the running count kept for the next round,
// then the close (after the rows: the receiver reads the final tail after it).
__device__ void close_send_stream(SendStream& stream, int lane) {
  if (stream.sent > stream.published) stream.publish(lane);
  __syncwarp();
  if (lane != 0) return;
  const IpcView& view = *stream.view;
  store_volatile(&own_header(view)->sent[stream.destination][stream.channel], stream.sent);
  store_release_sys(&header_of(view, stream.destination)->closed[view.rank][stream.channel], stream.close);
}

// What a receiver warp learnt from following one stream through a round.
struct StreamEnd {
  uint64_t mark;  // the source's close mark (close_mark, ipc.h); 0 when a wait failed
  uint64_t rows;  // rows consumed in this round
};

// Receiver warp for stream (source, channel) of round n: hands each batch of published rows [first, end)
// to read_rows (every lane calls it), then their slots back (credit), until the source closed the round
// and every row is consumed. The running count is kept for the next round.
template <typename ReadRows>
__device__ StreamEnd follow_stream(const IpcView& view, uint64_t round, int source, int channel, int32_t phase,
                                   int lane, const ReadRows& read_rows) {
  IpcHeader* own = own_header(view);
  const uint64_t* tail = &own->tail[source][channel];
  const uint64_t* closed = &own->closed[source][channel];
  uint64_t* credit = &header_of(view, source)->credit[view.rank][channel];
  const uint64_t first = load_volatile(&own->consumed[source][channel]);
  uint64_t consumed = first, mark = 0;
  for (;;) {
    // Lane 0 waits for new rows, or for the close of a stream it has read to the end.
    uint64_t available = consumed;
    bool ok = true;
    if (lane == 0) {
      ok = wait_until(view, phase, source, [&] {
        available = load_acquire_sys(tail);
        if (available > consumed) return true;
        mark = load_acquire_sys(closed);
        if (mark < close_mark(round, false)) return false;
        available = load_acquire_sys(tail);  // final: the close was published after it
        return true;
      });
    }
    if (!__shfl_sync(kFullMask, ok, 0)) {
      mark = 0;
      break;
    }
    available = from_lane_0(available);
    if (available == consumed) break;  // closed, and read to the end
    read_rows(consumed, available);
    consumed = available;
    __syncwarp();  // every lane has read the rows before their slots are handed back
    if (lane == 0) store_release_sys(credit, consumed);
  }
  if (lane == 0) store_volatile(&own->consumed[source][channel], consumed);
  return StreamEnd{from_lane_0(mark), consumed - first};
}

// The wait of a sender warp for its destination to enter round n (its rings from this rank are empty).
__device__ bool wait_ready(const IpcView& view, int destination, uint64_t round, int32_t phase, int lane) {
  bool ready = true;
  if (lane == 0)
    ready = wait_at_least(view, &own_header(view)->ready[destination], round, phase, destination, globaltimer_ns());
  return __shfl_sync(kFullMask, ready, 0);
}

// What a block of an exchange kernel does: blocks [0, C) send on channel blockIdx.x, blocks [C, 2C)
// receive on channel blockIdx.x - C; warp w serves peer w. round is 0 on an aborted buffer.
struct ExchangeBlock {
  uint64_t round;
  bool sending;
  int channel;
  int warp;
  int lane;
};

__device__ ExchangeBlock begin_exchange_block(const IpcView& view, const IpcRings& rings) {
  const bool sending = blockIdx.x < static_cast<unsigned>(rings.num_channels);
  return ExchangeBlock{begin_exchange(view), sending,
                       static_cast<int>(blockIdx.x) - (sending ? 0 : rings.num_channels),
                       static_cast<int>(threadIdx.x / kWarpSize), lane_id()};
}

// ---------------------------------------------------------------------------------------------
// Dispatch
// ---------------------------------------------------------------------------------------------

// Sender warp for (destination, channel): the channel's tokens bound for the destination, in token
// order; each slot carries the row's index j among this rank's rows for the destination (the output
// row is the destination's start of this source plus j).
__device__ void send_dispatch(const DispatchPackArgs& pack, const DispatchRowLayout& layout, const IpcView& view,
                              const IpcRings& rings, const IpcExchangeArgs& exchange, uint64_t round, int destination,
                              int channel, int lane) {
  const int num_ranks = view.num_ranks, me = view.rank;
  // send_pos numbers the rows for a destination from first_row on: destination * slot_rows in the slot
  // layout, else the rows this rank sends to lower ranks.
  int64_t first_row = static_cast<int64_t>(destination) * pack.slot_rows;
  if (pack.slot_rows == 0 && lane == 0 && !exchange.rejected) {
    for (int r = 0; r < destination; ++r)
      first_row += pack.rank_prefix_matrix[me * num_ranks + r] - (me > 0 ? pack.rank_prefix_matrix[(me - 1) * num_ranks + r] : 0);
  }
  first_row = static_cast<int64_t>(from_lane_0(static_cast<uint64_t>(first_row)));
  if (!wait_ready(view, destination, round, kPhaseDispatchSend, lane)) return;
  SendStream stream = open_send_stream(view, rings, destination, channel, kPhaseDispatchSend, round, exchange.rejected);
  // A rejected participant has no rows (pack.num_tokens is 0): it only closes its streams.
  const int64_t end = channel_begin(pack.num_tokens, channel + 1, rings.num_channels);
  for (int64_t first = channel_begin(pack.num_tokens, channel, rings.num_channels); first < end; first += kWarpSize) {
    const int32_t pos = first + lane < end ? pack.send_pos[(first + lane) * num_ranks + destination] : -1;
    for (unsigned bound = __ballot_sync(kFullMask, pos >= 0); bound != 0; bound &= bound - 1) {
      const int source_lane = __ffs(bound) - 1;
      const int32_t row_pos = __shfl_sync(kFullMask, pos, source_lane);
      uint8_t* slot = stream.next_slot(lane);
      if (slot == nullptr) return;
      if (lane == 0) *reinterpret_cast<int32_t*>(slot) = static_cast<int32_t>(row_pos - first_row);
      write_dispatch_row(slot + kSlotHeaderBytes, pack, layout, first + source_lane, destination, lane);
      stream.row_written(lane);
    }
  }
  close_send_stream(stream, lane);
}

// The end of a receiver warp's stream: when its source closed the round as rejected, report it (once per
// warp, lane 0; ipc.h "Rejected rounds"). A rejected participant reports nothing: it raises its own error.
__device__ void check_close(const IpcView& view, const IpcExchangeArgs& exchange, uint64_t round, int32_t phase,
                            int source, uint64_t mark, int lane) {
  if (lane == 0 && !exchange.rejected && mark == close_mark(round, true))
    report_rejected(view, round, phase, source, exchange.error_flag);
}

// Receiver warp for (source, channel): every row the source's stream brings, until the source closed
// the round and every row is read; a row goes to output row compact_start[source] + j. A rejected
// participant drains: it hands the slots back unread.
__device__ void receive_dispatch(const DispatchUnpackArgs& unpack, const DispatchRowLayout& layout,
                                 const IpcView& view, const IpcRings& rings, const IpcExchangeArgs& exchange,
                                 uint64_t round, int source, int channel, const int64_t* compact_start, int lane) {
  const int64_t count = exchange.rejected ? 0 : compact_start[source + 1] - compact_start[source];
  auto* expert_counts = reinterpret_cast<unsigned long long*>(unpack.num_recv_tokens_per_expert);
  const int num_counted = unpack.num_recv_tokens_per_expert != nullptr ? unpack.num_local_experts : 0;
  const StreamEnd end = follow_stream(view, round, source, channel, kPhaseDispatchReceive, lane,
                                      [&](uint64_t first, uint64_t available) {
    if (exchange.rejected) return;
    for (uint64_t row = first; row < available; ++row) {
      const uint8_t* slot = ring_slot(view, rings, view.rank, source, channel, row);
      const int32_t j = *reinterpret_cast<const int32_t*>(slot);
      const int64_t i = compact_start[source] + j;
      if (j < 0 || j >= count || i >= unpack.num_out_rows) {  // ranks disagree on the counts
        if (lane == 0) set_error(unpack.error_flag, kErrorOverflow);
        continue;
      }
      read_dispatch_row(slot + kSlotHeaderBytes, unpack, layout, i, num_counted,
                        [&](int32_t local_id) { atomicAdd(&expert_counts[local_id], 1ull); }, lane);
    }
  });
  check_close(view, exchange, round, kPhaseDispatchReceive, source, end.mark, lane);
  if (lane == 0 && exchange.channel_counts != nullptr)
    exchange.channel_counts[source * rings.num_channels + channel] = static_cast<int32_t>(end.rows);
}

// Every output row of a dispatch as 0xFF bytes (NaN rows, -1 ids, indices and counts), by one block.
__device__ void poison_dispatch(const DispatchUnpackArgs& unpack, const DispatchRowLayout& layout) {
  const int lane = lane_id();
  const int num_warps = static_cast<int>(blockDim.x / kWarpSize);
  for (int64_t i = threadIdx.x / kWarpSize; i < unpack.num_out_rows; i += num_warps)
    pad_dispatch_row(unpack, layout, i, 0xFF, lane);
  const int num_counted = unpack.num_recv_tokens_per_expert != nullptr ? unpack.num_local_experts : 0;
  for (int e = threadIdx.x; e < num_counted; e += blockDim.x) unpack.num_recv_tokens_per_expert[e] = -1;
  if (threadIdx.x == 0 && unpack.num_recv_out != nullptr) *unpack.num_recv_out = -1;
}

__global__ void __launch_bounds__(kExchangeThreads)
    ipc_dispatch_kernel(DispatchPackArgs pack, DispatchUnpackArgs unpack, DispatchRowLayout layout, IpcView view,
                        IpcRings rings, IpcExchangeArgs exchange) {
  __shared__ int64_t compact_start[kMaxIpcRanks + 1];
  const ExchangeBlock block = begin_exchange_block(view, rings);
  const uint64_t round = block.round;
  const bool sending = block.sending;
  const int channel = block.channel, warp = block.warp, lane = block.lane;
  if (!sending && !exchange.rejected) {  // a rejected participant has no outputs
    const bool clipped = load_compact_starts(unpack.recv_counts, view.num_ranks, unpack.slot_rows, compact_start);
    const int64_t total = compact_start[view.num_ranks];
    const int64_t num_real = total < unpack.num_out_rows ? total : unpack.num_out_rows;
    if (channel == 0 && threadIdx.x == 0) {
      if (clipped || total > unpack.num_out_rows) set_error(unpack.error_flag, kErrorOverflow);
      if (unpack.num_recv_out != nullptr) *unpack.num_recv_out = static_cast<int32_t>(num_real);
    }
    const int num_warps = static_cast<int>(blockDim.x / kWarpSize);
    for (int64_t i = num_real + channel * num_warps + warp; i < unpack.num_out_rows; i += rings.num_channels * num_warps)
      pad_dispatch_row(unpack, layout, i, 0, lane);
  }
  if (round != 0 && warp < view.num_ranks) {
    if (sending) send_dispatch(pack, layout, view, rings, exchange, round, warp, channel, lane);
    else receive_dispatch(unpack, layout, view, rings, exchange, round, warp, channel, compact_start, lane);
  }
  end_exchange(view, round, [&] { poison_dispatch(unpack, layout); });
}

// ---------------------------------------------------------------------------------------------
// Combine
// ---------------------------------------------------------------------------------------------

// Sender warp for (destination, channel): the rows this rank received from the destination through
// that channel (their number is channel_counts[destination][channel], after those of lower channels),
// in order, x then the weights. A rejected participant sends none (it has no channel counts).
__device__ void send_combine(const CombinePackArgs& pack, const CombineRowLayout& layout, const IpcView& view,
                             const IpcRings& rings, const IpcExchangeArgs& exchange, uint64_t round, int destination,
                             int channel, const int64_t* compact_start, int lane) {
  int64_t first = 0, end = 0;
  if (!exchange.rejected) {
    const int32_t* counts = exchange.channel_counts + destination * rings.num_channels;
    first = compact_start[destination];
    for (int c = 0; c < channel; ++c) first += counts[c];
    end = first + counts[channel];
  }
  if (!wait_ready(view, destination, round, kPhaseCombineSend, lane)) return;
  SendStream stream = open_send_stream(view, rings, destination, channel, kPhaseCombineSend, round, exchange.rejected);
  for (int64_t i = first; i < end && i < pack.num_rows; ++i) {
    uint8_t* slot = stream.next_slot(lane);
    if (slot == nullptr) return;
    uint8_t* row = slot + kSlotHeaderBytes;
    warp_copy(row, pack.x + i * layout.x_bytes, layout.x_bytes, lane);
    for (int k = lane; k < layout.num_topk; k += kWarpSize)
      reinterpret_cast<float*>(row + layout.topk_weights_offset)[k] = pack.topk_weights[i * layout.num_topk + k];
    stream.row_written(lane);
  }
  close_send_stream(stream, lane);
}

// Receiver block for `channel`: this rank's tokens of the channel, kCombineTile at a time. Warp 0 finds
// where each token's row from each rank is in that rank's stream (streams carry them in token order);
// thread 0 waits until every stream holds the tile's rows, or its source closed the round as rejected
// (then that source's rows are skipped: it sent none); the warps reduce one token each; thread 0 hands
// the slots back. At the end thread 0 waits for every source's close, so that a rejected round is seen
// even by a channel that needs no rows from its source. Returns false when a wait failed.
template <typename T, int kVector>
__device__ bool receive_combine(const CombineReduceArgs& reduce, const CombineRowLayout& layout, const IpcView& view,
                                const IpcRings& rings, const IpcExchangeArgs& exchange, uint64_t round, int channel) {
  __shared__ int64_t stream_row[kCombineTile][kMaxIpcRanks];  // -1: the token did not go to that rank
  __shared__ uint64_t base[kMaxIpcRanks];                     // each stream's rows before this round
  __shared__ uint64_t rows[kMaxIpcRanks];                     // rows of this round needed so far
  __shared__ bool rejected[kMaxIpcRanks];                     // the source closed this round as rejected
  __shared__ bool ok;
  IpcHeader* own = own_header(view);
  const int num_ranks = view.num_ranks, lane = lane_id(), warp = static_cast<int>(threadIdx.x / kWarpSize);
  const int num_warps = static_cast<int>(blockDim.x / kWarpSize);
  if (threadIdx.x < static_cast<unsigned>(num_ranks)) {
    base[threadIdx.x] = load_volatile(&own->consumed[threadIdx.x][channel]);
    rows[threadIdx.x] = 0;
    rejected[threadIdx.x] = false;
  }
  if (threadIdx.x == 0) ok = true;
  __syncthreads();
  // Thread 0: waits until source r's stream holds `target` rows or r closed the round as rejected.
  const auto wait_for_rows = [&](int r, uint64_t target, uint64_t start) {
    const uint64_t* tail = &own->tail[r][channel];
    const uint64_t* closed = &own->closed[r][channel];
    return wait_until(view, kPhaseCombineReceive, r, [&] {
      if (load_acquire_sys(tail) >= target) return true;
      rejected[r] = load_acquire_sys(closed) == close_mark(round, true);
      return rejected[r];
    }, start);
  };
  const int64_t tile = rings.num_slots < kCombineTile ? rings.num_slots : kCombineTile;
  const int64_t end = channel_begin(reduce.num_tokens, channel + 1, rings.num_channels);
  for (int64_t first = channel_begin(reduce.num_tokens, channel, rings.num_channels); first < end; first += tile) {
    if (warp == 0) {
      for (int r = 0; r < num_ranks; ++r) {
        const int64_t t = first + lane;
        const bool bound = lane < tile && t < end && reduce.send_pos[t * num_ranks + r] >= 0;
        const unsigned mask = __ballot_sync(kFullMask, bound);
        const uint64_t before = rows[r];
        if (lane < tile)
          stream_row[lane][r] = bound ? static_cast<int64_t>(base[r] + before) + __popc(mask & ((1u << lane) - 1u)) : -1;
        __syncwarp();
        if (lane == 0) rows[r] = before + __popc(mask);
        __syncwarp();
      }
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      const uint64_t start = globaltimer_ns();
      for (int r = 0; r < num_ranks && ok; ++r)
        if (!rejected[r]) ok = wait_for_rows(r, base[r] + rows[r], start);
    }
    __syncthreads();
    if (!ok) return false;
    for (int l = warp; l < tile && first + l < end; l += num_warps) {
      reduce_token<T, kVector>(reduce, layout, first + l, [&](int r) -> const uint8_t* {
        const int64_t row = stream_row[l][r];
        return row < 0 || rejected[r] ? nullptr
                                      : ring_slot(view, rings, view.rank, r, channel, static_cast<uint64_t>(row)) + kSlotHeaderBytes;
      }, lane);
    }
    __syncthreads();  // every warp has read the tile's rows before their slots are handed back
    if (threadIdx.x == 0)
      for (int r = 0; r < num_ranks; ++r)
        if (!rejected[r]) store_release_sys(&header_of(view, r)->credit[view.rank][channel], base[r] + rows[r]);
  }
  if (threadIdx.x == 0) {
    const uint64_t start = globaltimer_ns();
    for (int r = 0; r < num_ranks && ok; ++r) {
      ok = wait_at_least(view, &own->closed[r][channel], close_mark(round, false), kPhaseCombineReceive, r, start);
      if (ok && load_acquire_sys(&own->closed[r][channel]) == close_mark(round, true)) {
        rejected[r] = true;
        report_rejected(view, round, kPhaseCombineReceive, r, exchange.error_flag);
      }
    }
  }
  __syncthreads();
  // A rejected source sent no rows: its stream stays where the last round left it.
  if (threadIdx.x < static_cast<unsigned>(num_ranks))
    store_volatile(&own->consumed[threadIdx.x][channel], base[threadIdx.x] + (rejected[threadIdx.x] ? 0 : rows[threadIdx.x]));
  return ok;
}

// Every combined row as 0xFF bytes (NaN) and NaN weights, by one block.
template <typename T>
__device__ void poison_combine(const CombineReduceArgs& reduce, const CombineRowLayout& layout) {
  const int lane = lane_id();
  const int num_warps = static_cast<int>(blockDim.x / kWarpSize);
  const int64_t row_bytes = reduce.hidden * static_cast<int64_t>(sizeof(T));
  for (int64_t t = threadIdx.x / kWarpSize; t < reduce.num_tokens; t += num_warps) {
    warp_fill(static_cast<uint8_t*>(reduce.combined_x) + t * row_bytes, 0xFF, row_bytes, lane);
    if (reduce.combined_topk_weights != nullptr)
      for (int k = lane; k < layout.num_topk; k += kWarpSize) reduce.combined_topk_weights[t * layout.num_topk + k] = NAN;
  }
}

template <typename T, int kVector>
__global__ void __launch_bounds__(kExchangeThreads)
    ipc_combine_kernel(CombinePackArgs pack, CombineReduceArgs reduce, CombineRowLayout layout, IpcView view,
                       IpcRings rings, IpcExchangeArgs exchange) {
  __shared__ int64_t compact_start[kMaxIpcRanks + 1];
  const ExchangeBlock block = begin_exchange_block(view, rings);
  const uint64_t round = block.round;
  const bool sending = block.sending;
  const int channel = block.channel, warp = block.warp, lane = block.lane;
  if (sending) {
    if (!exchange.rejected) load_compact_starts(pack.recv_counts, view.num_ranks, pack.slot_rows, compact_start);
    if (round != 0 && warp < view.num_ranks)
      send_combine(pack, layout, view, rings, exchange, round, warp, channel, compact_start, lane);
  } else if (round != 0 && exchange.rejected) {  // drain: warp w hands back source w's rows unread
    if (warp < view.num_ranks) follow_stream(view, round, warp, channel, kPhaseCombineReceive, lane, [](uint64_t, uint64_t) {});
  } else if (round != 0) {
    receive_combine<T, kVector>(reduce, layout, view, rings, exchange, round, channel);
  }
  end_exchange(view, round, [&] { poison_combine<T>(reduce, layout); });
}

// The rings of an exchange whose rows are `row_stride` bytes: as many slots per stream as asked for
// and as the region holds; invalid_argument when it holds fewer than a chunk.
IpcRings exchange_rings(const IpcView& view, const IpcExchangeArgs& exchange, int64_t row_stride) {
  if (exchange.num_channels < 1 || exchange.num_channels > kMaxIpcChannels || exchange.chunk_rows < 1 ||
      exchange.ring_rows < exchange.chunk_rows)
    throw std::invalid_argument("eplib: an ipc exchange needs 1 to " + std::to_string(kMaxIpcChannels) +
                                " channels and ring_rows >= chunk_rows >= 1, got " +
                                std::to_string(exchange.num_channels) + " channels, ring_rows " +
                                std::to_string(exchange.ring_rows) + ", chunk_rows " + std::to_string(exchange.chunk_rows));
  IpcRings rings{exchange.num_channels, 0, ipc_slot_bytes(row_stride), exchange.chunk_rows};
  const int64_t fits = view.region_bytes / ipc_ring_bytes(view.num_ranks, rings.num_channels, 1, rings.slot_bytes);
  rings.num_slots = fits < exchange.ring_rows ? fits : exchange.ring_rows;
  if (rings.num_slots < rings.chunk_rows)
    throw std::invalid_argument(
        "eplib: the ipc buffer holds " + std::to_string(fits) + " slots per stream, fewer than a chunk of " +
        std::to_string(rings.chunk_rows) + " rows; it needs " +
        std::to_string(ipc_buffer_bytes(view.num_ranks, rings.num_channels, row_stride, rings.chunk_rows)) +
        " bytes");
  return rings;
}

LaunchShape exchange_shape(const IpcView& view, int num_channels) {
  return LaunchShape{2u * static_cast<unsigned>(num_channels), static_cast<unsigned>(view.num_ranks) * kWarpSize, true};
}

}  // namespace

void ipc_dispatch(const IpcView& view, const DispatchPackArgs& pack, const DispatchUnpackArgs& unpack,
                  const IpcExchangeArgs& exchange, cudaStream_t stream) {
  check_ipc_launch(&view, pack.num_ranks, "ipc dispatch");
  check_ipc_launch(&view, unpack.num_ranks, "ipc dispatch");
  if (pack.slot_rows == 0 && pack.rank_prefix_matrix == nullptr)
    throw std::invalid_argument("eplib: an ipc dispatch needs rank_prefix_matrix or slot_rows > 0");
  if (pack.num_experts < 0 || pack.num_experts % pack.num_ranks != 0)
    throw std::invalid_argument("eplib: an ipc dispatch needs num_ranks dividing num_experts, got E=" +
                                std::to_string(pack.num_experts) + ", R=" + std::to_string(pack.num_ranks));
  if (unpack.num_out_rows < 0 || unpack.num_out_rows > INT32_MAX)
    throw std::invalid_argument("eplib: an ipc dispatch needs 0 <= num_out_rows <= INT32_MAX, got " +
                                std::to_string(unpack.num_out_rows));
  const DispatchRowLayout layout = dispatch_row_layout(pack);
  if (layout.num_topk != unpack.num_topk || layout.x_bytes != unpack.x_bytes || layout.scales_bytes != unpack.scales_bytes)
    throw std::invalid_argument("eplib: an ipc dispatch's pack and unpack rows differ");
  const IpcRings rings = exchange_rings(view, exchange, layout.stride);
  zero_expert_counts(unpack, stream);
  launch("ipc_dispatch_kernel", ipc_dispatch_kernel, exchange_shape(view, rings.num_channels), 0, stream,
         dispatch_kernel_args(pack), unpack, layout, view, rings, exchange);
}

void ipc_combine(const IpcView& view, const CombinePackArgs& pack, const CombineReduceArgs& reduce,
                 const IpcExchangeArgs& exchange, cudaStream_t stream) {
  check_ipc_launch(&view, pack.num_ranks, "ipc combine");
  check_ipc_launch(&view, reduce.num_ranks, "ipc combine");
  check_combine_weights(pack);
  if (exchange.channel_counts == nullptr)
    throw std::invalid_argument("eplib: an ipc combine needs the channel counts of its dispatch");
  visit_cuda_dtype(reduce.dtype, [&](auto element) {
    using T = decltype(element);
    const CombineRowLayout layout = make_combine_row_layout(reduce.hidden * static_cast<int64_t>(sizeof(T)), reduce.num_topk);
    if (layout.x_bytes != pack.x_bytes || layout.num_topk != pack.num_topk)
      throw std::invalid_argument("eplib: an ipc combine's rows and reduction differ");
    const IpcRings rings = exchange_rings(view, exchange, layout.stride);
    // Ring rows are read as T from slot + 16 bytes: 16-byte vectors when the slots and outputs allow.
    const bool aligned = all_16_byte_aligned({reinterpret_cast<uintptr_t>(reduce.bias_0),
                                              reinterpret_cast<uintptr_t>(reduce.bias_1),
                                              reinterpret_cast<uintptr_t>(reduce.combined_x),
                                              static_cast<uint64_t>(layout.x_bytes)});
    visit_vector_width<T>(aligned, [&](auto vector) {
      launch("ipc_combine_kernel", ipc_combine_kernel<T, decltype(vector)::value>,
             exchange_shape(view, rings.num_channels), 0, stream, pack, reduce, layout, view, rings, exchange);
    });
  });
}

void ipc_join_rejected(const IpcView& view, bool combine, const IpcExchangeArgs& exchange, cudaStream_t stream) {
  if (!exchange.rejected) throw std::invalid_argument("eplib: ipc_join_rejected needs exchange.rejected");
  // No slot is written or read: rows of 0 bytes, so that any buffer holds the rings.
  const IpcRings rings = exchange_rings(view, exchange, 0);
  const LaunchShape shape = exchange_shape(view, rings.num_channels);
  if (combine) {
    CombinePackArgs pack{};
    pack.num_ranks = view.num_ranks;
    CombineReduceArgs reduce{};
    reduce.num_ranks = view.num_ranks;
    launch("ipc_combine_kernel", ipc_combine_kernel<float, 1>, shape, 0, stream, pack, reduce, CombineRowLayout{},
           view, rings, exchange);
  } else {
    DispatchPackArgs pack{};
    pack.num_ranks = view.num_ranks;
    DispatchUnpackArgs unpack{};
    unpack.num_ranks = view.num_ranks;
    launch("ipc_dispatch_kernel", ipc_dispatch_kernel, shape, 0, stream, pack, unpack, DispatchRowLayout{}, view,
           rings, exchange);
  }
}

void detail::preload_ipc_kernels() {
  preload(ipc_dispatch_kernel, ipc_combine_kernel<float, 4>, ipc_combine_kernel<float, 1>,
          ipc_combine_kernel<bf16_t, 8>, ipc_combine_kernel<bf16_t, 1>);
}

}  // namespace eplib::cuda
