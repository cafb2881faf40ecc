// The ipc transport's shared memory layout (CUDA peer memory between the ranks of one node): what
// every rank's buffer holds, what the host-mapped status holds, and the view of all ranks' buffers
// that kernels receive by value.
//
// Streams. Rows travel from a source s to a destination d through C channels; each (s, d, channel c)
// is a stream: a ring of `num_slots` slots in d's receive region, written only by s's sender warp for
// (d, c) and read only by d's receiver warp (dispatch) or receiver block (combine) for (s, c). Rows
// are numbered per stream from the first row ever sent (uint64, never reset, never wraps in practice:
// 2^64 rows); row n sits in slot n % num_slots. Two counters per stream, each written by one side only:
//   tail    in d's header, tail[s][c]: rows s has written into the ring so far (s publishes it with a
//           release store after the rows; d reads it with an acquire load before reading them);
//   credit  in s's header, credit[d][c]: rows d has consumed so far (d publishes it with a release
//           store after reading them; s reads it with an acquire load before overwriting their slots).
// Invariants: credit <= tail <= credit + num_slots, so a slot is never written while its row is
// unread, and never read before its row is written. The sender keeps its running count in its own
// header (sent[d][c]), the receiver its own (consumed[s][c]); between calls sent == d's consumed ==
// tail == credit for every stream, since every call consumes every row it sends.
//
// Rounds. One exchange (a dispatch or a combine) is one cooperative kernel, round n = round + 1 of the
// own header: C sender blocks (one warp per destination) and C receiver blocks run at once, so rows
// stream through the rings while senders still write (a ring smaller than a call is fine). At kernel
// start each block stores ready[me] = n in every rank's header (release): "my receivers have finished
// round n - 1" (the kernel of round n - 1 has ended on this rank); a sender warp waits for ready[d] >= n
// before its first row, so that every ring it writes is empty, whatever slot size the new round uses.
// Every sender warp (dispatch and combine), once its last row is published, closes its stream: it
// stores closed[me][c] = close_mark(n) = 2n in d's header (release). A dispatch receiver stops when it
// has consumed every row and seen closed >= 2n (its row count is not known to it per channel); a
// combine receiver knows its row counts from send_pos, and waits for every source's close at its end
// only to learn whether the round was rejected (below).
// The last block to finish (a fence, then a counter) stores round = n; if the buffer aborted meanwhile
// it first poisons the outputs (0xFF bytes: NaN rows, -1 ids and counts).
//
// Rejected rounds. A rank whose input failed a host check in a call without a host sync (num_worst_tokens
// or cached dispatch, combine) still runs that round's exchange kernel, as a participant with no rows
// (IpcExchangeArgs.rejected): its senders do the ready hand-shake and close each stream at once with
// the rejected mark 2n + 1, and its receivers drain: they hand back every row their peers send (credit
// = tail, rows unread) until each stream is closed (>= 2n) and empty. A receiver that finds a source's
// stream closed with 2n + 1 stops waiting for that source's rows (there are none: tail stays where the
// last round left it), finishes the round, ORs kErrorPeerInput into the call's error flag (the next
// normal-mode notify record carries it, so every rank raises alike there), stores rejected = n in its
// own header (the round's last block then poisons this round's outputs; later rounds are not affected,
// the buffer does not abort) and reports (phase, source) to the host-mapped status. So a rejected round
// ends with every counter pair equal, as any other.
//
// Also: the notify kernel (dispatch counts exchange, one block) writes this rank's record into every
// rank's table of notify round k (tables double-buffered by k's parity), stores notified[me] = k and
// waits for every rank's; with a host ticket it copies its table to host-mapped memory and publishes
// the ticket after it (release). The barrier kernel (destroy()) stores barrier[me] = k everywhere and
// waits for every rank's.
//
// Every wait gives up after timeout_ns (%globaltimer): it reports (phase, peer) to the host-mapped
// status and marks the buffer aborted; every later wait fails at once and every later round poisons
// its outputs, so that a CUDA graph replay after a timeout cannot pass stale outputs off as new ones.
// The host reads the report without synchronizing (IpcBuffer::timeout_report).
#pragma once

#include <cstdint>

#include "eplib/layout.h"

namespace eplib::cuda {

// Ranks of one node that share ipc buffers (DeepEP's NVL peer limit).
constexpr int kMaxIpcRanks = 8;
// Channels of an exchange (Config.num_sms / 2 by default): 2 * channels blocks run at once.
constexpr int kMaxIpcChannels = 32;
// A notify record: [error flag | 5 format fields | send counts [R] | counts of the receiver's experts].
constexpr int kRecordFormatFields = 6;
constexpr int kMaxIpcLocalExperts = 1024;
constexpr int kRecordCapacity = kRecordFormatFields + kMaxIpcRanks + kMaxIpcLocalExperts;
// Every ring slot starts with this header (the row's index among the rows from its source, for the
// dispatch receiver), then the row.
constexpr int64_t kSlotHeaderBytes = 16;

// Where each wait happens, reported with the rank that did not arrive.
enum IpcPhase : int32_t {
  kPhaseNone = 0,
  kPhaseNotify = 1,           // dispatch: exchange of counts
  kPhaseDispatchSend = 2,     // dispatch: a destination not ready, or its ring full
  kPhaseDispatchReceive = 3,  // dispatch: a source's rows not written
  kPhaseCombineSend = 4,
  kPhaseCombineReceive = 5,
  kPhaseBarrier = 6,          // destroy()
  kPhaseLowLatencySend = 7,     // low-latency call: a destination had not freed its slot (low_latency_ipc.h)
  kPhaseLowLatencyReceive = 8,  // low-latency call: a source's message had not arrived
};

// Head of every rank's buffer; the rings follow at kIpcRegionOffset. Flag arrays are indexed by the
// rank that writes them (then by channel); the "local" fields are touched by the owner only.
struct IpcHeader {
  uint64_t ready[kMaxIpcRanks];
  uint64_t notified[kMaxIpcRanks];
  uint64_t barrier[kMaxIpcRanks];
  uint64_t tail[kMaxIpcRanks][kMaxIpcChannels];    // [source][channel]: rows the source wrote into my rings
  uint64_t closed[kMaxIpcRanks][kMaxIpcChannels];  // [source][channel]: the last round the source closed
  uint64_t credit[kMaxIpcRanks][kMaxIpcChannels];  // [destination][channel]: rows it consumed from my stream
  uint64_t sent[kMaxIpcRanks][kMaxIpcChannels];      // local, [destination][channel]
  uint64_t consumed[kMaxIpcRanks][kMaxIpcChannels];  // local, [source][channel]
  uint64_t round;            // local: round of the last exchange kernel that finished
  uint64_t notify_round;     // local
  uint64_t barrier_round;    // local
  uint32_t blocks_finished;  // local: blocks of the running exchange kernel that are done
  uint32_t aborted;          // local: a wait timed out; every later wait fails at once
  uint64_t rejected;         // local: the last round in which a source closed a stream as rejected
  int64_t records[2][kMaxIpcRanks][kRecordCapacity];
};

constexpr int64_t kIpcRegionOffset = align_up(static_cast<int64_t>(sizeof(IpcHeader)), 4096);

// Host memory mapped into the device (cudaHostAllocMapped), written by kernels, read by the host.
struct IpcHostStatus {
  int64_t notify_ticket;  // the ticket of the last notify the host waits for, once `table` holds its table
  int32_t timeout_phase;  // IpcPhase of the first wait that timed out, 0 if none (published after the peer)
  int32_t timeout_peer;   // the rank it waited for
  int32_t rejected_phase;  // IpcPhase of the last stream found closed as rejected, 0 if none (after the peer)
  int32_t rejected_peer;   // its source; the host clears both once it has raised
  int64_t table[kMaxIpcRanks * kRecordCapacity];  // [source][field], record_length fields per source
};

// All ranks' buffers as this process maps them; passed to kernels by value.
struct IpcView {
  uint8_t* bases[kMaxIpcRanks];  // bases[rank] is the local allocation, the others are IPC mappings
  IpcHostStatus* status;         // device address of the mapped status
  int64_t region_bytes;          // of every rank's rings: kernels never touch bytes past it
  int rank;
  int num_ranks;
  int64_t timeout_ns;
};

// The rings of one exchange: C channels per source, num_slots slots of slot_bytes each, source-major
// ([source][channel][slot]) in every rank's region. IpcBuffer computes it per call.
struct IpcRings {
  int num_channels;
  int64_t num_slots;   // per stream, >= chunk_rows
  int64_t slot_bytes;  // kSlotHeaderBytes + the call's row stride, 16-byte aligned
  int64_t chunk_rows;  // rows a sender publishes at once (Config.num_max_nvl_chunked_send_tokens)
};

// The value a sender stores into closed[me][c] at the end of round n: 2n, or 2n + 1 for a rejected
// participant's streams (ipc.h "Rejected rounds"). A receiver of round n waits for closed >= 2n.
EPLIB_HOST_DEVICE constexpr uint64_t close_mark(uint64_t round, bool rejected) { return 2 * round + (rejected ? 1 : 0); }

// Bytes of the rings of `num_ranks` sources with this geometry (what a region must hold).
inline int64_t ipc_ring_bytes(int num_ranks, int num_channels, int64_t num_slots, int64_t slot_bytes) {
  return static_cast<int64_t>(num_ranks) * num_channels * num_slots * slot_bytes;
}

// Bytes of a ring slot for rows of `row_stride` bytes (a 16-byte header, then the row).
inline int64_t ipc_slot_bytes(int64_t row_stride) { return align_up(kSlotHeaderBytes + row_stride, kRowAlignment); }

// The smallest ipc buffer (header included) that streams rows of `row_stride` bytes through
// `num_channels` channels of `num_ranks` sources, with `ring_rows` slots per stream.
inline int64_t ipc_buffer_bytes(int num_ranks, int num_channels, int64_t row_stride, int64_t ring_rows) {
  return kIpcRegionOffset + ipc_ring_bytes(num_ranks, num_channels, ring_rows, ipc_slot_bytes(row_stride));
}

}  // namespace eplib::cuda
