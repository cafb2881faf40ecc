// Device side of the peer-memory protocol (peer.h): system-scope release/acquire flags, waits with a
// timeout, and the round hand-shakes that the send and receive kernels wrap around their rows.
#pragma once

#include <cstddef>

#include "common.cuh"
#include "peer.h"

namespace eplib::cuda {

// Round hand-shake of one kernel launch; active == false (the nccl transport) skips all of it.
struct PeerRound {
  bool active;
  PeerView view;
  int32_t phase;  // PeerPhase reported if a wait times out
};

// The hand-shake of a launch: inactive without peers (the nccl transport).
inline PeerRound make_peer_round(const PeerView* peers, PeerPhase phase) {
  PeerRound round{};
  if (peers != nullptr) {
    round.active = true;
    round.view = *peers;
    round.phase = phase;
  }
  return round;
}

// Row `row` of `stride` bytes fits a receive region (rows past it, or before it, come only from
// ranks that disagree on a call's layout: they are dropped, never written out of bounds).
__device__ __forceinline__ bool row_in_region(const PeerView& view, int64_t row, int64_t stride) {
  return row >= 0 && (row + 1) * stride <= view.region_bytes;
}

// A launch to peers must cover exactly the ranks of the view.
inline void check_peer_launch(const PeerView* peers, int num_ranks, const char* kernel) {
  if (peers != nullptr && peers->num_ranks != num_ranks)
    throw std::invalid_argument(std::string("eplib: ") + kernel + " got " + std::to_string(num_ranks) +
                                " ranks for a peer view of " + std::to_string(peers->num_ranks));
}

__device__ __forceinline__ uint64_t globaltimer_ns() {
  uint64_t now;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
  return now;
}

// Flags cross GPUs and processes: system scope (GPU_NOTES "Memory ordering").
__device__ __forceinline__ void store_release_sys(uint64_t* address, uint64_t value) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(address), "l"(value) : "memory");
}

__device__ __forceinline__ uint64_t load_acquire_sys(const uint64_t* address) {
  uint64_t value;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(value) : "l"(address) : "memory");
  return value;
}

__device__ __forceinline__ PeerHeader* header_of(const PeerView& view, int rank) {
  return reinterpret_cast<PeerHeader*>(view.bases[rank]);
}

__device__ __forceinline__ PeerHeader* own_header(const PeerView& view) { return header_of(view, view.rank); }

__device__ __forceinline__ uint8_t* region_of(const PeerView& view, int rank) {
  return view.bases[rank] + kPeerRegionOffset;
}

// Stores value into flag array `field` (an offsetof into PeerHeader) at index view.rank of every
// rank's header, each store a release: everything this thread (and, through the block barrier before
// it, its block) wrote earlier is visible to whoever acquires the flag.
__device__ __forceinline__ void publish_to_all(const PeerView& view, size_t field, uint64_t value) {
  for (int r = 0; r < view.num_ranks; ++r) {
    auto* flags = reinterpret_cast<uint64_t*>(view.bases[r] + field);
    store_release_sys(flags + view.rank, value);
  }
}

// Waits until this rank's flag array `field` holds >= target for every rank, each read an acquire.
// On timeout: reports (phase, rank) to the host status (the first report wins in practice; any is
// correct), marks this buffer aborted, returns false. Returns false at once on an aborted buffer.
__device__ inline bool wait_for_all(const PeerView& view, size_t field, uint64_t target, int32_t phase) {
  PeerHeader* own = own_header(view);
  volatile uint32_t* aborted = &own->aborted;
  // Checked first: after a timeout every later kernel (graph replays included) does nothing.
  if (*aborted != 0) return false;
  const auto* flags = reinterpret_cast<const uint64_t*>(view.bases[view.rank] + field);
  const uint64_t start = globaltimer_ns();
  for (int r = 0; r < view.num_ranks; ++r) {
    while (load_acquire_sys(flags + r) < target) {
      if (*aborted != 0) return false;
      if (globaltimer_ns() - start > static_cast<uint64_t>(view.timeout_ns)) {
        volatile PeerHostStatus* status = view.status;
        *aborted = 1;
        status->timeout_peer = r;
        __threadfence_system();  // the host reads the phase first, then the peer
        status->timeout_phase = phase;
        __threadfence_system();
        return false;
      }
    }
  }
  return true;
}

// Start of a send kernel (every thread of every block calls it): announces that this rank is ready
// for round n = round_sent + 1 and waits until every rank is. Returns n, or 0 when the wait failed
// (the block must then return without writing). Inactive: returns 1 and does nothing.
__device__ inline uint64_t begin_send_round(const PeerRound& round) {
  if (!round.active) return 1;
  __shared__ uint64_t shared_round;
  if (threadIdx.x == 0) {
    // round_sent changes only at the end of a send kernel, after every block has read it here.
    const uint64_t n = own_header(round.view)->round_sent + 1;
    publish_to_all(round.view, offsetof(PeerHeader, ready), n);
    shared_round = wait_for_all(round.view, offsetof(PeerHeader, ready), n, round.phase) ? n : 0;
  }
  __syncthreads();
  return shared_round;
}

// End of a send kernel (every thread of every block that began the round): the last block to get
// here publishes done = n to every rank, after the other blocks' rows (threadFenceReduction pattern:
// each block fences its writes at system scope before counting itself).
__device__ inline void end_send_round(const PeerRound& round, uint64_t n) {
  if (!round.active) return;
  __syncthreads();  // the block's rows are written
  if (threadIdx.x != 0) return;
  PeerHeader* own = own_header(round.view);
  __threadfence_system();
  const unsigned finished = atomicAdd(&own->blocks_finished, 1u);
  if (finished != gridDim.x - 1) return;
  __threadfence_system();  // order the other blocks' counted writes before the stores below
  own->blocks_finished = 0;
  own->round_sent = n;
  publish_to_all(round.view, offsetof(PeerHeader, done), n);
}

// Start of a receive kernel (every thread of every block): waits until every rank has written its
// rows of the round this rank last sent in. Returns false when the wait failed or the buffer had
// aborted (then round_sent may be stale and the region half written): the block must return.
__device__ inline bool begin_receive_round(const PeerRound& round) {
  if (!round.active) return true;
  __shared__ bool arrived;
  if (threadIdx.x == 0) {
    const uint64_t n = own_header(round.view)->round_sent;
    arrived = wait_for_all(round.view, offsetof(PeerHeader, done), n, round.phase);
  }
  __syncthreads();
  return arrived;
}

}  // namespace eplib::cuda
