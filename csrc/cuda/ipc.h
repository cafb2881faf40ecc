// The ipc transport's shared memory layout (CUDA peer memory between the ranks of one node): what
// every rank's buffer holds, what the host-mapped status holds, and the view of all ranks' buffers
// that kernels receive by value.
//
// Protocol (one exchange of rows is a "round"; round numbers only grow and live on the device, so
// captured CUDA graphs keep counting on replay). IpcBuffer::dispatch / IpcBuffer::combine own the
// sequence: each launches one send kernel, then one receive kernel, on the same stream.
//   send kernel     every block stores ready[me] = n in every rank's header (release, .sys): "I have
//                   finished reading round n-1 from my region"; waits until ready[s] >= n for every s;
//                   writes its rows straight into the destinations' regions; the last block to finish
//                   (fence + counter) stores done[me] = n in every rank's header.
//   receive kernel  every block waits until done[s] >= n for every s (acquire, .sys), then reads its
//                   own region.
//   notify kernel   (dispatch, one block) writes this rank's record into every rank's table of notify
//                   round k (tables double-buffered by k's parity), stores notified[me] = k, waits for
//                   every rank's; then, when the host waits for it (normal mode), copies its table to
//                   host-mapped memory and publishes the host's ticket after it (release).
//   barrier kernel  stores barrier[me] = k everywhere and waits for every rank's (destroy()).
// Every wait gives up after timeout_ns (%globaltimer): it reports (phase, peer) to the host-mapped
// status, marks the buffer aborted (later waits fail at once) and the kernel poisons what it would
// have written (NaN rows, -1 ids and counts), so that a graph replay after a timeout cannot pass
// stale outputs off as new ones; the host reads the report without synchronizing
// (IpcBuffer::timeout_report).
#pragma once

#include <cstdint>

#include "eplib/layout.h"

namespace eplib::cuda {

// Ranks of one node that share ipc buffers (DeepEP's NVL peer limit).
constexpr int kMaxIpcRanks = 8;
// A notify record: [error flag | 5 format fields | send counts [R] | counts of the receiver's experts].
constexpr int kRecordFormatFields = 6;
constexpr int kMaxIpcLocalExperts = 1024;
constexpr int kRecordCapacity = kRecordFormatFields + kMaxIpcRanks + kMaxIpcLocalExperts;

// Where each wait happens, reported with the rank that did not arrive.
enum IpcPhase : int32_t {
  kPhaseNone = 0,
  kPhaseNotify = 1,           // dispatch: exchange of counts
  kPhaseDispatchSend = 2,     // dispatch: a destination still reading its previous round
  kPhaseDispatchReceive = 3,  // dispatch: a source's rows not all written
  kPhaseCombineSend = 4,
  kPhaseCombineReceive = 5,
  kPhaseBarrier = 6,          // destroy()
};

// Head of every rank's buffer; the receive region follows at kIpcRegionOffset. Flag arrays are
// indexed by the rank that writes them; the "local" fields are touched by the owner only.
struct IpcHeader {
  uint64_t ready[kMaxIpcRanks];
  uint64_t done[kMaxIpcRanks];
  uint64_t notified[kMaxIpcRanks];
  uint64_t barrier[kMaxIpcRanks];
  uint64_t round_sent;       // local: round of the last send kernel that finished
  uint64_t notify_round;     // local
  uint64_t barrier_round;    // local
  uint32_t blocks_finished;  // local: blocks of the running send kernel that are done
  uint32_t aborted;          // local: a wait timed out; every later wait fails at once
  int64_t records[2][kMaxIpcRanks][kRecordCapacity];
};

constexpr int64_t kIpcRegionOffset = align_up(static_cast<int64_t>(sizeof(IpcHeader)), 4096);

// Host memory mapped into the device (cudaHostAllocMapped), written by kernels, read by the host.
struct IpcHostStatus {
  int64_t notify_ticket;  // the ticket of the last notify the host waits for, once `table` holds its table
  int32_t timeout_phase;  // IpcPhase of the first wait that timed out, 0 if none (published after the peer)
  int32_t timeout_peer;   // the rank it waited for
  int64_t table[kMaxIpcRanks * kRecordCapacity];  // [source][field], record_length fields per source
};

// All ranks' buffers as this process maps them; passed to kernels by value.
struct IpcView {
  uint8_t* bases[kMaxIpcRanks];  // bases[rank] is the local allocation, the others are IPC mappings
  IpcHostStatus* status;         // device address of the mapped status
  int64_t region_bytes;          // of every rank's receive region: send kernels never write past it
  int rank;
  int num_ranks;
  int64_t timeout_ns;
};

}  // namespace eplib::cuda
