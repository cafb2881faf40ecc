// The ipc transport's low-latency (LL) protocol: messages straight into the peers' CUDA peer memory, and
// the flags that say when a message may be read and when its slot may be written again. This is the one
// owner of that protocol; the row kernels (low_latency.cu) only read and write messages at the addresses
// they are given.
//
// Memory. Every rank holds one IpcBuffer (ipc.h: header, then region) of its own for LL calls. Its region
// starts with LowLatencyIpcFlags, then, at kLLIpcSlotsOffset, two buffers of R message slots of slot_bytes
// each: slot (b, s) at kLLIpcSlotsOffset + (b * R + s) * slot_bytes holds the message that source s sends
// this rank in a call on buffer b (eplib/low_latency.h). LL call n of a Buffer uses buffer n % 2.
//
// Rounds. Per buffer b, each rank counts its calls on b: the sends (send_round[b]) and the receives
// (recv_round[b]); call number k on b is round k on every rank (all ranks make the same LL calls), so
// flags carry round numbers and are never zeroed.
//   arrived[b][s] in rank d's flags: the last round in which source s has written its message to d's
//           slot (b, s). Written by s only: a release store (.sys) after the message, by the send's
//           publish step. d's receive waits until arrived[b][s] >= round (acquire) before reading it.
//   freed[b] in rank d's flags: the last round of buffer b that d has finished reading. Written by d
//           only: a release store after the whole unpack / reduction of that round, by the receive's
//           release step. A sender waits until freed[b] >= round - 1 at d (acquire) before it writes
//           d's slot (b, s) for round `round`, so a slot is never overwritten while d still reads it.
// One call, on the stream, in this order:
//   send     kLLWaitFreed (round = ++send_round[b]; wait freed at every live destination),
//            the pack kernel (messages into the destinations' slots), kLLPublishArrived (a system
//            fence, then arrived[b][me] = round at every live destination);
//   receive  (the call, or its hook) kLLWaitArrived (round = recv_round[b] + 1; wait arrived[b][s] for
//            every live source), the unpack / reduce kernel, kLLPublishFreed (recv_round[b] = round,
//            a system fence, then freed[b] = round).
// The steps are kernels of their own (one block each), ordered with the row kernels by the stream; the
// pack kernels end with a system fence in every thread, so the publish step's release covers their rows.
// Invariants: a slot's message is read only in the round its arrival flag names (arrived >= round and a
// sender cannot reach round + 1 before freed >= round), and written only after its reader freed the
// previous round. Masked ranks (mask[r] = 1) are neither waited for, written to nor read.
//
// Waits. Each wait gives up after the buffer's timeout (%globaltimer). With shrink, the peer is then
// masked in the device mask and the call completes for the live ranks. Without, the wait reports
// (phase, peer) to the host-mapped status and aborts the buffer (ipc.cuh report_timeout: every later wait
// fails at once), and sets `poisoned`: the receive kernels then write poison instead of results; the
// host raises naming the phase and the peer.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "ipc.h"

namespace eplib::cuda {

struct LowLatencyIpcFlags {
  uint64_t arrived[2][kMaxIpcRanks];  // [buffer][source], written by the source
  uint64_t freed[2];                  // written by the owner, read by the senders
  uint64_t send_round[2];             // local
  uint64_t recv_round[2];             // local
};

constexpr int64_t kLLIpcSlotsOffset = align_up(static_cast<int64_t>(sizeof(LowLatencyIpcFlags)), 4096);

enum LowLatencySyncStep : int32_t {
  kLLWaitFreed = 0,
  kLLPublishArrived = 1,
  kLLWaitArrived = 2,
  kLLPublishFreed = 3,
};

// One protocol step of an LL call on buffer `buffer_index` (see above).
struct LLSyncArgs {
  int32_t step;            // LowLatencySyncStep
  int buffer_index;
  int32_t* mask;           // device int32 [R]: 1 = masked; a timed-out peer is masked here under shrink
  int32_t* poisoned;       // device int32 [1]: set by a timeout without shrink
  bool shrink;
  int64_t* wait_stats;     // kLLWaitArrived: device int64 [R] += ns waited for each source, or null
};

// Launches the step (one block) on `stream`.
void ipc_low_latency_sync(const IpcView& view, const LLSyncArgs& args, cudaStream_t stream);

namespace detail {
void preload_low_latency_ipc_kernels();
}  // namespace detail

}  // namespace eplib::cuda
