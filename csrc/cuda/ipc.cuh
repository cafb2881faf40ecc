// Device side of the ipc protocol (ipc.h): waits with a timeout, and the round hand-shakes that the
// send and receive kernels wrap around their rows. The flag operations themselves are in device.cuh.
#pragma once

#include <cstddef>

#include "common.cuh"
#include "ipc.h"

namespace eplib::cuda {

// Round hand-shake of one kernel launch; active == false (the nccl transport) skips all of it.
struct IpcRound {
  bool active;
  IpcView view;
  int32_t phase;  // IpcPhase reported if a wait times out
};

// The hand-shake of a launch: inactive without a view (the nccl transport).
inline IpcRound make_ipc_round(const IpcView* view, IpcPhase phase) {
  IpcRound round{};
  if (view != nullptr) {
    round.active = true;
    round.view = *view;
    round.phase = phase;
  }
  return round;
}

// Row `row` of `stride` bytes fits a receive region (rows past it, or before it, come only from
// ranks that disagree on a call's layout: they are dropped, never written out of bounds).
__device__ __forceinline__ bool row_in_region(const IpcView& view, int64_t row, int64_t stride) {
  return row >= 0 && (row + 1) * stride <= view.region_bytes;
}

// A launch through ipc buffers must cover exactly the ranks of the view.
inline void check_ipc_launch(const IpcView* view, int num_ranks, const char* kernel) {
  if (view != nullptr && view->num_ranks != num_ranks)
    throw std::invalid_argument(std::string("eplib: ") + kernel + " got " + std::to_string(num_ranks) +
                                " ranks for an ipc view of " + std::to_string(view->num_ranks));
}

__device__ __forceinline__ IpcHeader* header_of(const IpcView& view, int rank) {
  return reinterpret_cast<IpcHeader*>(view.bases[rank]);
}

__device__ __forceinline__ IpcHeader* own_header(const IpcView& view) { return header_of(view, view.rank); }

__device__ __forceinline__ uint8_t* region_of(const IpcView& view, int rank) {
  return view.bases[rank] + kIpcRegionOffset;
}

// Stores value into flag array `field` (an offsetof into IpcHeader) at index view.rank of every
// rank's header, each store a release.
__device__ __forceinline__ void publish_to_all(const IpcView& view, size_t field, uint64_t value) {
  for (int r = 0; r < view.num_ranks; ++r) {
    auto* flags = reinterpret_cast<uint64_t*>(view.bases[r] + field);
    store_release_sys(flags + view.rank, value);
  }
}

// True when an earlier wait of this buffer timed out.
__device__ __forceinline__ bool ipc_aborted(const IpcView& view) {
  return load_volatile(&own_header(view)->aborted) != 0;
}

// Waits until this rank's flag array `field` holds >= target for every rank, each read an acquire.
// On timeout: reports (phase, rank) to the host status (the first report wins in practice; any is
// correct), marks this buffer aborted, returns false. Returns false at once on an aborted buffer.
__device__ inline bool wait_for_all(const IpcView& view, size_t field, uint64_t target, int32_t phase) {
  // Checked first: after a timeout every later kernel (graph replays included) gives up at once.
  if (ipc_aborted(view)) return false;
  const auto* flags = reinterpret_cast<const uint64_t*>(view.bases[view.rank] + field);
  const uint64_t start = globaltimer_ns();
  for (int r = 0; r < view.num_ranks; ++r) {
    while (load_acquire_sys(flags + r) < target) {
      if (ipc_aborted(view)) return false;
      if (globaltimer_ns() - start > static_cast<uint64_t>(view.timeout_ns)) {
        store_volatile(&own_header(view)->aborted, 1u);
        store_volatile(&view.status->timeout_peer, r);
        store_release_sys(&view.status->timeout_phase, phase);  // the host reads the phase first, then the peer
        return false;
      }
    }
  }
  return true;
}

// Start of a send kernel (every thread of every block calls it): announces that this rank is ready
// for round n = round_sent + 1 and waits until every rank is. Returns n, or 0 when the wait failed
// (the block must then return without writing). Inactive: returns 1 and does nothing.
__device__ inline uint64_t begin_send_round(const IpcRound& round) {
  if (!round.active) return 1;
  __shared__ uint64_t shared_round;
  if (threadIdx.x == 0) {
    // round_sent changes only at the end of a send kernel, after every block has read it here.
    const uint64_t n = load_volatile(&own_header(round.view)->round_sent) + 1;
    publish_to_all(round.view, offsetof(IpcHeader, ready), n);
    shared_round = wait_for_all(round.view, offsetof(IpcHeader, ready), n, round.phase) ? n : 0;
  }
  __syncthreads();
  return shared_round;
}

// End of a send kernel (every thread of every block that began the round): the last block to get
// here publishes done = n to every rank, after the other blocks' rows (threadFenceReduction pattern:
// each block fences its writes at system scope before counting itself).
__device__ inline void end_send_round(const IpcRound& round, uint64_t n) {
  if (!round.active) return;
  __syncthreads();  // the block's rows are written
  if (threadIdx.x != 0) return;
  IpcHeader* own = own_header(round.view);
  __threadfence_system();
  const unsigned finished = atomicAdd(&own->blocks_finished, 1u);
  if (finished != gridDim.x - 1) return;
  __threadfence_system();  // order the other blocks' counted writes before the stores below
  store_volatile(&own->blocks_finished, 0u);
  store_volatile(&own->round_sent, n);
  publish_to_all(round.view, offsetof(IpcHeader, done), n);
}

// Start of a receive kernel (every thread of every block): waits until every rank has written its
// rows of the round this rank last sent in. Returns false when the wait failed or the buffer had
// aborted (then round_sent may be stale and the region half written): the block must then poison
// its outputs instead of reading the region.
__device__ inline bool begin_receive_round(const IpcRound& round) {
  if (!round.active) return true;
  __shared__ bool arrived;
  if (threadIdx.x == 0) {
    const uint64_t n = load_volatile(&own_header(round.view)->round_sent);
    arrived = wait_for_all(round.view, offsetof(IpcHeader, done), n, round.phase);
  }
  __syncthreads();
  return arrived;
}

}  // namespace eplib::cuda
