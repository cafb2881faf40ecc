// One rank's buffer of the ipc transport (CUDA peer memory): allocation, IPC export and import, the
// host-mapped status, the counts exchange, the row exchanges (which own the rounds) and the teardown.
// Layout and protocol: ipc.h.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "ipc.h"
#include "kernels.h"
#include "low_latency_ipc.h"

namespace eplib::cuda {

// The format fields of a notify record after the error flag (kRecordFormatFields - 1 of them).
struct NotifyFields {
  int64_t values[kRecordFormatFields - 1];
};

class IpcBuffer {
 public:
  // cudaMallocs num_bytes on `device` (header zeroed), host-mapped status memory, and loads the
  // kernels it launches. Collective use starts with ipc_handle() on every rank, an all-gather of the
  // handles, then open_peers().
  IpcBuffer(int rank, int num_ranks, int64_t num_bytes, int device);
  ~IpcBuffer();  // destroy(0): without the barrier; errors ignored
  IpcBuffer(const IpcBuffer&) = delete;
  IpcBuffer& operator=(const IpcBuffer&) = delete;

  // CUDA IPC handle of the allocation's base (CUDA_IPC_HANDLE_SIZE bytes).
  std::string ipc_handle() const;
  // Opens every other rank's handle (handles[r] from rank r; this rank's own entry is not opened: a
  // process cannot open its own handle). On failure closes what it opened and throws.
  void open_peers(const std::vector<std::string>& handles);
  // Synchronizes the device, meets the other ranks at a barrier in peer memory (gives up after
  // timeout_s), closes the peer mappings and frees everything. Returns false when the barrier timed
  // out or the buffer had aborted. timeout_s <= 0: no barrier (ranks that never opened their peers).
  // Idempotent; afterwards the buffer is unusable.
  bool destroy(double timeout_s);
  // Closes the peer mappings only (the buffer is then not open): for teardowns that meet the other
  // ranks at a host barrier between every rank's close and any rank's free.
  void close_peers();

  bool is_open() const { return open_; }
  int64_t num_bytes() const { return num_bytes_; }
  int64_t region_bytes() const { return num_bytes_ - kIpcRegionOffset; }
  // Limit of every device-side wait from the next launch on.
  void set_timeout(double seconds);
  // (IpcPhase, peer rank) of the first wait that timed out; (0, -1) if none did. Reads host-mapped
  // memory: never synchronizes, so it is the cheap check after CUDA graph replays too.
  std::pair<int, int> timeout_report() const;
  // (IpcPhase, source rank) of the last stream an exchange found closed as rejected (ipc.h "Rejected
  // rounds"); (0, -1) if none since the last clear. Reads host-mapped memory, like timeout_report.
  std::pair<int, int> rejection_report() const;
  void clear_rejection_report();

  // The own header's local counters (a synchronous copy from the device: for tests and diagnostics).
  struct Counters {
    uint64_t round;
    uint64_t notify_round;
    uint64_t barrier_round;
    uint32_t blocks_finished;
    uint32_t aborted;
    uint64_t rows_sent;      // into every stream, since the buffer was made
    uint64_t rows_received;  // from every stream
  };
  Counters counters() const;

  // Normal-mode counts exchange: writes this rank's record (error flag, fields, send counts int32 [R],
  // the per-expert counts int32 [E] of each receiver's E/R experts) into every rank's table, waits for
  // every rank's, writes count_matrix (device int32 [R, R], [source][destination]; -1 everywhere if
  // the wait failed) and hands the table to the host. With host_wait, wait_notify() then returns it:
  // R records of kRecordFormatFields + R + E/R int64 each, source-major. Without, nothing on the host
  // changes (capturable in a CUDA graph).
  void notify(const int32_t* error_flag, const NotifyFields& fields, const int32_t* send_counts,
              const int32_t* num_tokens_per_expert, int num_experts, int32_t* count_matrix, bool host_wait,
              cudaStream_t stream);
  // Polls the host-mapped status. Returns the table, or an empty vector when a device wait timed out
  // (timeout_report() says where). Throws when neither happened within timeout_s or CUDA failed.
  std::vector<int64_t> wait_notify(double timeout_s);

  // One round each, the only way rows move through the buffers: one cooperative kernel whose senders
  // stream rows into the peers' rings while its receivers read the own rings (ipc_exchange.h), on
  // `stream`. The receive ends of the args (recv_buffer) are not used.
  void dispatch(const DispatchPackArgs& pack, const DispatchUnpackArgs& unpack, const IpcExchangeArgs& exchange,
                cudaStream_t stream);
  void combine(const CombinePackArgs& pack, const CombineReduceArgs& reduce, const IpcExchangeArgs& exchange,
               cudaStream_t stream);
  // This rank's input failed a host check in a dispatch (combine: false) or combine without a host sync:
  // its part of the round with no rows (ipc.h "Rejected rounds"). exchange: the call's channels and
  // rings, rejected set.
  void join_rejected(bool combine, const IpcExchangeArgs& exchange, cudaStream_t stream);

  // Low-latency mode (low_latency_ipc.h): one protocol step on `stream`; the addresses of every rank's
  // region as this process maps them (the LL kernels write and read messages there).
  void low_latency_sync(const LLSyncArgs& args, cudaStream_t stream);
  std::vector<uintptr_t> region_addresses() const;

 private:
  const IpcView* view() const;  // throws unless open

  int rank_;
  int num_ranks_;
  int device_;
  int64_t num_bytes_;
  uint8_t* base_ = nullptr;
  IpcHostStatus* status_ = nullptr;  // host address; view_.status is its device address
  cudaEvent_t notify_done_ = nullptr;
  int64_t notify_ticket_ = 0;  // of the last notify launched with host_wait
  int notify_record_length_ = 0;
  IpcView view_{};
  bool open_ = false;
  bool destroyed_ = false;
};

}  // namespace eplib::cuda
