// Device side of the ipc protocol (ipc.h): waits with a timeout, the round of an exchange kernel, and
// the streams' rings. The flag operations themselves are in device.cuh.
#pragma once

#include <cstddef>

#include "common.cuh"
#include "eplib/errors.h"
#include "ipc.h"

namespace eplib::cuda {

__device__ __forceinline__ IpcHeader* header_of(const IpcView& view, int rank) {
  return reinterpret_cast<IpcHeader*>(view.bases[rank]);
}

__device__ __forceinline__ IpcHeader* own_header(const IpcView& view) { return header_of(view, view.rank); }

__device__ __forceinline__ uint8_t* region_of(const IpcView& view, int rank) {
  return view.bases[rank] + kIpcRegionOffset;
}

// Slot `row` (a stream's running row number) of stream (source, channel) in rank `rank`'s rings.
__device__ __forceinline__ uint8_t* ring_slot(const IpcView& view, const IpcRings& rings, int rank, int source,
                                              int channel, uint64_t row) {
  const int64_t stream = static_cast<int64_t>(source) * rings.num_channels + channel;
  const int64_t slot = stream * rings.num_slots + static_cast<int64_t>(row % static_cast<uint64_t>(rings.num_slots));
  return region_of(view, rank) + slot * rings.slot_bytes;
}

// A launch through ipc buffers must cover exactly the ranks of the view.
inline void check_ipc_launch(const IpcView* view, int num_ranks, const char* kernel) {
  if (view != nullptr && view->num_ranks != num_ranks)
    throw std::invalid_argument(std::string("eplib: ") + kernel + " got " + std::to_string(num_ranks) +
                                " ranks for an ipc view of " + std::to_string(view->num_ranks));
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

// A wait that gave up: the first report wins in practice (any is correct); every later wait fails.
__device__ __forceinline__ void report_timeout(const IpcView& view, int32_t phase, int peer) {
  store_volatile(&own_header(view)->aborted, 1u);
  store_volatile(&view.status->timeout_peer, peer);
  store_release_sys(&view.status->timeout_phase, phase);  // the host reads the phase first, then the peer
}

// A receiver of round n found `peer`'s stream closed as rejected (ipc.h "Rejected rounds"): this round's
// outputs are poisoned at its end, the next normal-mode record carries kErrorPeerInput, the host learns
// (phase, peer). Unlike a timeout, nothing later is affected.
__device__ __forceinline__ void report_rejected(const IpcView& view, uint64_t round, int32_t phase, int peer,
                                                int32_t* error_flag) {
  store_volatile(&own_header(view)->rejected, round);
  if (error_flag != nullptr) set_error(error_flag, kErrorPeerInput);
  store_volatile(&view.status->rejected_peer, peer);
  store_release_sys(&view.status->rejected_phase, phase);  // the host reads the phase first, then the peer
}

// Spins until ready() (whose loads are acquires), for at most view.timeout_ns from `start`. On timeout
// reports (phase, peer) and returns false; returns false at once on an aborted buffer.
template <typename Ready>
__device__ inline bool wait_until(const IpcView& view, int32_t phase, int peer, const Ready& ready,
                                  uint64_t start = globaltimer_ns()) {
  while (!ready()) {
    if (ipc_aborted(view)) return false;
    if (globaltimer_ns() - start > static_cast<uint64_t>(view.timeout_ns)) {
      report_timeout(view, phase, peer);
      return false;
    }
  }
  return true;
}

// Waits until *flag >= target (acquire); see wait_until.
__device__ inline bool wait_at_least(const IpcView& view, const uint64_t* flag, uint64_t target, int32_t phase,
                                     int peer, uint64_t start) {
  return wait_until(view, phase, peer, [&] { return load_acquire_sys(flag) >= target; }, start);
}

// Waits until this rank's flag array `field` holds >= target for every rank (notify, barrier).
__device__ inline bool wait_for_all(const IpcView& view, size_t field, uint64_t target, int32_t phase) {
  if (ipc_aborted(view)) return false;  // after a timeout every later kernel gives up at once
  const auto* flags = reinterpret_cast<const uint64_t*>(view.bases[view.rank] + field);
  const uint64_t start = globaltimer_ns();
  for (int r = 0; r < view.num_ranks; ++r)
    if (!wait_at_least(view, flags + r, target, phase, r, start)) return false;
  return true;
}

// Start of an exchange kernel (every thread of every block calls it): the round n = round + 1, and
// ready[me] = n stored at every rank ("my receivers finished round n - 1"). Returns n, or 0 on an
// aborted buffer (the block then does no work).
__device__ inline uint64_t begin_exchange(const IpcView& view) {
  __shared__ uint64_t shared_round;
  if (threadIdx.x == 0) {
    // `round` changes only at the end of an exchange kernel, after every block has read it here.
    const uint64_t n = load_volatile(&own_header(view)->round) + 1;
    shared_round = ipc_aborted(view) ? 0 : n;
    if (shared_round != 0) publish_to_all(view, offsetof(IpcHeader, ready), n);
  }
  __syncthreads();
  return shared_round;
}

// End of an exchange kernel (every thread of every block): the last block to finish (each block fences
// its writes before counting itself) runs poison() when the buffer aborted or a source rejected round n
// (report_rejected), then stores round = n.
// The counter does not depend on n, so an aborted round (n == 0 in some blocks) still resets it.
template <typename Poison>
__device__ inline void end_exchange(const IpcView& view, uint64_t n, const Poison& poison) {
  __shared__ bool last;
  __syncthreads();  // the block's work is done
  if (threadIdx.x == 0) {
    IpcHeader* own = own_header(view);
    __threadfence_system();
    last = atomicAdd(&own->blocks_finished, 1u) == gridDim.x - 1;
    if (last) __threadfence_system();  // order the other blocks' counted writes before what follows
  }
  __syncthreads();
  if (!last) return;
  if (ipc_aborted(view) || (n != 0 && load_volatile(&own_header(view)->rejected) == n)) poison();
  __syncthreads();
  if (threadIdx.x != 0) return;
  IpcHeader* own = own_header(view);
  store_volatile(&own->blocks_finished, 0u);
  if (n != 0) store_volatile(&own->round, n);
}

// Rows [first, first + count) of this warp's stream are in the destination's ring: publish them
// (every lane calls it; lane 0 stores tail = first + count with a release after the warp's rows).
__device__ __forceinline__ void publish_rows(uint64_t* tail, uint64_t end, int lane) {
  __syncwarp();
  if (lane == 0) store_release_sys(tail, end);
}

// A sender warp's wait for room in its destination's ring: until credit > row - num_slots, i.e. the
// slot of `row` has been read. Lane 0 waits, the warp learns the outcome. Returns false on failure.
__device__ inline bool wait_for_slot(const IpcView& view, const IpcRings& rings, const uint64_t* credit, uint64_t row,
                                     int32_t phase, int peer, int lane) {
  bool ok = true;
  if (lane == 0 && row >= static_cast<uint64_t>(rings.num_slots))
    ok = wait_at_least(view, credit, row - rings.num_slots + 1, phase, peer, globaltimer_ns());
  return __shfl_sync(kFullMask, ok, 0);
}

}  // namespace eplib::cuda
