// The steps of the ipc transport's low-latency protocol (low_latency_ipc.h, where it is described).
#include "ipc.cuh"
#include "low_latency_ipc.h"

namespace eplib::cuda {

namespace {

__device__ __forceinline__ LowLatencyIpcFlags* ll_flags(const IpcView& view, int rank) {
  return reinterpret_cast<LowLatencyIpcFlags*>(region_of(view, rank));
}

// Waits until *flag >= target for peer `peer`. On timeout the peer is masked, and without shrink the
// buffer aborts with (phase, peer) reported and the call's outputs are poisoned. False on failure.
__device__ inline bool wait_for_peer(const IpcView& view, const LLSyncArgs& args, const uint64_t* flag,
                                     uint64_t target, int32_t phase, int peer) {
  const uint64_t start = globaltimer_ns();
  const auto arrived = [&] { return load_acquire_sys(flag) >= target; };
  bool ok;
  if (args.shrink) {
    ok = true;
    while (!arrived() && ok) ok = globaltimer_ns() - start <= static_cast<uint64_t>(view.timeout_ns);
  } else {
    ok = wait_until(view, phase, peer, arrived, start);
    if (!ok) store_volatile(args.poisoned, 1);
  }
  // Either way nothing more goes to or comes from it in this call (nor, under shrink, later).
  if (!ok) store_volatile(&args.mask[peer], 1);
  return ok;
}

// One block, thread r for peer r.
__global__ void ll_ipc_sync_kernel(IpcView view, LLSyncArgs args) {
  __shared__ uint64_t round;
  LowLatencyIpcFlags* own = ll_flags(view, view.rank);
  const int b = args.buffer_index;
  const int peer = static_cast<int>(threadIdx.x);
  if (threadIdx.x == 0) {
    const bool sending = args.step == kLLWaitFreed || args.step == kLLPublishArrived;
    round = (sending ? own->send_round[b] : own->recv_round[b]) + (args.step == kLLPublishArrived ? 0 : 1);
  }
  __syncthreads();
  const bool live = peer < view.num_ranks && load_volatile(&args.mask[peer]) == 0;
  switch (args.step) {
    case kLLWaitFreed:
      if (live) wait_for_peer(view, args, &ll_flags(view, peer)->freed[b], round - 1, kPhaseLowLatencySend, peer);
      __syncthreads();
      if (threadIdx.x == 0) own->send_round[b] = round;
      break;
    case kLLPublishArrived:
      __threadfence_system();  // the pack kernel's writes into the peers' slots, before the flags
      if (live) store_release_sys(&ll_flags(view, peer)->arrived[b][view.rank], round);
      break;
    case kLLWaitArrived: {
      const uint64_t start = globaltimer_ns();
      if (live && wait_for_peer(view, args, &own->arrived[b][peer], round, kPhaseLowLatencyReceive, peer) &&
          args.wait_stats != nullptr)
        args.wait_stats[peer] += static_cast<int64_t>(globaltimer_ns() - start);
      break;
    }
    case kLLPublishFreed:
      if (threadIdx.x == 0) {
        own->recv_round[b] = round;
        __threadfence_system();  // the unpack kernel's reads of the slots are done (it ended before this one)
        store_release_sys(&own->freed[b], round);
      }
      break;
    default:
      break;
  }
}

}  // namespace

void ipc_low_latency_sync(const IpcView& view, const LLSyncArgs& args, cudaStream_t stream) {
  if (args.buffer_index < 0 || args.buffer_index > 1 || args.step < kLLWaitFreed || args.step > kLLPublishFreed)
    throw std::invalid_argument("eplib: ipc_low_latency_sync needs buffer 0 or 1 and a LowLatencySyncStep, got " +
                                std::to_string(args.buffer_index) + ", " + std::to_string(args.step));
  if (view.region_bytes < kLLIpcSlotsOffset)
    throw std::invalid_argument("eplib: the ipc buffer is too small for the low-latency flags");
  launch("ll_ipc_sync_kernel", ll_ipc_sync_kernel, {1, kWarpSize}, 0, stream, view, args);
}

void detail::preload_low_latency_ipc_kernels() { preload(ll_ipc_sync_kernel); }

}  // namespace eplib::cuda
