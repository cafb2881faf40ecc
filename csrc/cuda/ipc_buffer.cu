#include "ipc_buffer.h"

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <thread>

#include "common.cuh"
#include "ipc.cuh"
#include "ipc_exchange.h"
#include "runtime.h"

namespace eplib::cuda {

namespace {

constexpr int kNotifyThreads = 256;
// wait_notify polls the mapped ticket this often before it also asks whether the kernel has ended
// (an event query costs far more than a load from host memory).
constexpr int kNotifySpinPolls = 20000;

// One block. Record of this rank -> row `rank` of every rank's table of notify round k; then the
// hand-shake; then this rank's table -> count_matrix and, when host_ticket > 0, the host-mapped
// status (the host polls for its ticket). Without a ticket the host status is not touched: an
// earlier notify that finishes late must not pass its table off as a later one's.
__global__ void notify_kernel(IpcView view, const int32_t* error_flag, NotifyFields fields,
                              const int32_t* send_counts, const int32_t* num_tokens_per_expert,
                              int num_local_experts, int32_t* count_matrix, int64_t host_ticket) {
  __shared__ uint64_t notify_round;
  __shared__ bool arrived;
  IpcHeader* own = own_header(view);
  const int num_ranks = view.num_ranks;
  const int record_length = kRecordFormatFields + num_ranks + num_local_experts;
  if (threadIdx.x == 0) notify_round = own->notify_round + 1;
  __syncthreads();
  const int parity = static_cast<int>(notify_round & 1);
  for (int r = 0; r < num_ranks; ++r) {
    int64_t* record = header_of(view, r)->records[parity][view.rank];
    for (int f = threadIdx.x; f < record_length; f += blockDim.x) {
      int64_t value;
      if (f == 0) value = *error_flag;
      else if (f < kRecordFormatFields) value = fields.values[f - 1];
      else if (f < kRecordFormatFields + num_ranks) value = send_counts[f - kRecordFormatFields];
      else value = num_tokens_per_expert[static_cast<int64_t>(r) * num_local_experts + f - kRecordFormatFields - num_ranks];
      record[f] = value;
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    // Tables are double-buffered by parity: a rank reaches round k + 2 only after every rank has
    // announced round k + 1, which each does after reading its table of round k.
    publish_to_all(view, offsetof(IpcHeader, notified), notify_round);
    arrived = wait_for_all(view, offsetof(IpcHeader, notified), notify_round, kPhaseNotify);
  }
  __syncthreads();
  if (!arrived) {  // no counts: -1 everywhere rather than last call's (they would place rows)
    for (int i = threadIdx.x; i < num_ranks * num_ranks; i += blockDim.x) count_matrix[i] = -1;
    return;
  }
  for (int i = threadIdx.x; i < num_ranks * record_length; i += blockDim.x) {
    const int source = i / record_length, field = i % record_length;
    const int64_t value = load_volatile(&own->records[parity][source][field]);  // written by other ranks
    if (host_ticket > 0) view.status->table[i] = value;
    if (field >= kRecordFormatFields && field < kRecordFormatFields + num_ranks)
      count_matrix[source * num_ranks + field - kRecordFormatFields] = static_cast<int32_t>(value);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    own->notify_round = notify_round;
    if (host_ticket > 0) store_release_sys(&view.status->notify_ticket, host_ticket);  // after the table
  }
}

// One thread: every rank stores barrier = k at every rank and waits for all.
__global__ void barrier_kernel(IpcView view) {
  IpcHeader* own = own_header(view);
  const uint64_t barrier_round = own->barrier_round + 1;
  publish_to_all(view, offsetof(IpcHeader, barrier), barrier_round);
  if (wait_for_all(view, offsetof(IpcHeader, barrier), barrier_round, kPhaseBarrier))
    own->barrier_round = barrier_round;
}

}  // namespace

IpcBuffer::IpcBuffer(int rank, int num_ranks, int64_t num_bytes, int device)
    : rank_(rank), num_ranks_(num_ranks), device_(device), num_bytes_(num_bytes) {
  if (num_ranks < 1 || num_ranks > kMaxIpcRanks || rank < 0 || rank >= num_ranks)
    throw std::invalid_argument("eplib: an ipc buffer serves 1 to " + std::to_string(kMaxIpcRanks) +
                                " ranks, got rank " + std::to_string(rank) + " of " + std::to_string(num_ranks));
  if (num_bytes < kIpcRegionOffset + kRowAlignment)
    throw std::invalid_argument("eplib: an ipc buffer needs at least " + std::to_string(kIpcRegionOffset + kRowAlignment) +
                                " bytes, got " + std::to_string(num_bytes));
  DeviceGuard guard(device);
  try {
    // Our own cudaMalloc: IPC exports the base of an allocation (GPU_NOTES "CUDA IPC").
    check_cuda(cudaMalloc(&base_, num_bytes), "cudaMalloc (ipc buffer)");
    check_cuda(cudaMemset(base_, 0, kIpcRegionOffset), "cudaMemset (ipc buffer header)");
    check_cuda(cudaHostAlloc(reinterpret_cast<void**>(&status_), sizeof(IpcHostStatus), cudaHostAllocMapped),
               "cudaHostAlloc (ipc status)");
    std::memset(status_, 0, sizeof(IpcHostStatus));
    status_->timeout_peer = -1;
    IpcHostStatus* device_status = nullptr;
    check_cuda(cudaHostGetDevicePointer(reinterpret_cast<void**>(&device_status), status_, 0),
               "cudaHostGetDevicePointer (ipc status)");
    check_cuda(cudaEventCreateWithFlags(&notify_done_, cudaEventDisableTiming), "cudaEventCreate (ipc buffer)");
    // Loaded now, not at a first launch that could wait behind a spinning kernel (kernels.h).
    preload(notify_kernel, barrier_kernel);
    preload_kernels();
    // Peers write into the header as soon as they have the handle: it must be zero by then.
    check_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize (ipc buffer)");
    view_.bases[rank] = base_;
    view_.status = device_status;
    view_.region_bytes = region_bytes();
    view_.rank = rank;
    view_.num_ranks = num_ranks;
    set_timeout(100.0);
  } catch (...) {
    if (notify_done_ != nullptr) cudaEventDestroy(notify_done_);
    if (status_ != nullptr) cudaFreeHost(status_);
    if (base_ != nullptr) cudaFree(base_);
    (void)cudaGetLastError();  // reported by the exception; no later launch inherits it
    throw;
  }
}

IpcBuffer::~IpcBuffer() {
  try {
    // No barrier: garbage collection frees the ranks' buffers at unrelated times (a rank can hold
    // its Buffer in a reference cycle while the others have moved on), and a rank would wait for
    // the others' collection. Peers no longer use the buffer once their owners dropped it too.
    destroy(0.0);
  } catch (...) {  // a destructor must not throw: at interpreter exit CUDA may already be gone
  }
}

std::string IpcBuffer::ipc_handle() const {
  if (destroyed_) throw std::runtime_error("eplib: the ipc buffer was destroyed");
  DeviceGuard guard(device_);
  cudaIpcMemHandle_t handle;
  check_cuda(cudaIpcGetMemHandle(&handle, base_), "cudaIpcGetMemHandle");
  return std::string(reinterpret_cast<const char*>(&handle), sizeof(handle));
}

void IpcBuffer::open_peers(const std::vector<std::string>& handles) {
  if (destroyed_ || open_) throw std::runtime_error("eplib: open_peers() on an ipc buffer that is open or destroyed");
  if (static_cast<int>(handles.size()) != num_ranks_)
    throw std::invalid_argument("eplib: open_peers() needs one handle per rank (" + std::to_string(num_ranks_) +
                                "), got " + std::to_string(handles.size()));
  DeviceGuard guard(device_);
  for (int r = 0; r < num_ranks_; ++r) {
    if (r == rank_) continue;
    if (handles[r].size() != sizeof(cudaIpcMemHandle_t)) {
      close_peers();
      throw std::invalid_argument("eplib: the IPC handle of rank " + std::to_string(r) + " has " +
                                  std::to_string(handles[r].size()) + " bytes, expected " +
                                  std::to_string(sizeof(cudaIpcMemHandle_t)));
    }
    cudaIpcMemHandle_t handle;
    std::memcpy(&handle, handles[r].data(), sizeof(handle));
    void* mapped = nullptr;
    const cudaError_t error = cudaIpcOpenMemHandle(&mapped, handle, cudaIpcMemLazyEnablePeerAccess);
    if (error != cudaSuccess) {
      (void)cudaGetLastError();  // reported below; the fallback to nccl must not inherit it
      close_peers();
      throw std::runtime_error("eplib: cannot open the ipc buffer of rank " + std::to_string(r) +
                               " (cudaIpcOpenMemHandle: " + cudaGetErrorString(error) + ")");
    }
    view_.bases[r] = static_cast<uint8_t*>(mapped);
  }
  open_ = true;
}

void IpcBuffer::close_peers() {
  DeviceGuard guard(device_);
  for (int r = 0; r < num_ranks_; ++r) {
    if (r != rank_ && view_.bases[r] != nullptr) cudaIpcCloseMemHandle(view_.bases[r]);
    if (r != rank_) view_.bases[r] = nullptr;
  }
  open_ = false;
}

bool IpcBuffer::destroy(double timeout_s) {
  if (destroyed_) return true;
  destroyed_ = true;
  DeviceGuard guard(device_);
  // No kernel of any rank may still touch a mapping when it closes (GPU_NOTES "CUDA IPC"): finish
  // ours, then meet the others at a barrier, as DeepEP's destroy() does.
  bool clean = cudaDeviceSynchronize() == cudaSuccess;
  if (open_ && timeout_s > 0) {
    set_timeout(timeout_s);
    try {
      launch("barrier_kernel", barrier_kernel, {1, 1}, 0, nullptr, view_);
      clean = cudaDeviceSynchronize() == cudaSuccess && clean;
    } catch (const std::runtime_error&) {
      clean = false;
    }
    clean = clean && timeout_report().first == kPhaseNone;
  } else if (open_) {
    clean = false;  // no barrier: nothing says the peers are done
  }
  if (open_) close_peers();
  cudaEventDestroy(notify_done_);
  cudaFreeHost(status_);
  cudaFree(base_);
  (void)cudaGetLastError();
  notify_done_ = nullptr;
  status_ = nullptr;
  base_ = nullptr;
  return clean;
}

const IpcView* IpcBuffer::view() const {
  if (!open_) throw std::runtime_error("eplib: the ipc buffer is not open (destroyed, or open_peers() not called)");
  return &view_;
}

void IpcBuffer::set_timeout(double seconds) {
  if (!(seconds > 0)) throw std::invalid_argument("eplib: an ipc wait timeout must be positive");
  view_.timeout_ns = static_cast<int64_t>(seconds * 1e9);
}

std::pair<int, int> IpcBuffer::timeout_report() const {
  if (status_ == nullptr) return {kPhaseNone, -1};
  // The kernel stores the peer before it publishes the phase (release).
  const int phase = __atomic_load_n(&status_->timeout_phase, __ATOMIC_ACQUIRE);
  return {phase, phase != kPhaseNone ? __atomic_load_n(&status_->timeout_peer, __ATOMIC_RELAXED) : -1};
}

std::pair<int, int> IpcBuffer::rejection_report() const {
  if (status_ == nullptr) return {kPhaseNone, -1};
  const int phase = __atomic_load_n(&status_->rejected_phase, __ATOMIC_ACQUIRE);  // published after the peer
  return {phase, phase != kPhaseNone ? __atomic_load_n(&status_->rejected_peer, __ATOMIC_RELAXED) : -1};
}

void IpcBuffer::clear_rejection_report() {
  if (status_ != nullptr) __atomic_store_n(&status_->rejected_phase, static_cast<int32_t>(kPhaseNone), __ATOMIC_RELAXED);
}

IpcBuffer::Counters IpcBuffer::counters() const {
  if (destroyed_) throw std::runtime_error("eplib: the ipc buffer was destroyed");
  DeviceGuard guard(device_);
  auto header = std::make_unique<IpcHeader>();
  check_cuda(cudaMemcpy(header.get(), base_, offsetof(IpcHeader, records), cudaMemcpyDeviceToHost),
             "cudaMemcpy (ipc counters)");
  Counters counters{header->round, header->notify_round, header->barrier_round, header->blocks_finished,
                    header->aborted, 0, 0};
  for (int r = 0; r < kMaxIpcRanks; ++r)
    for (int c = 0; c < kMaxIpcChannels; ++c) {
      counters.rows_sent += header->sent[r][c];
      counters.rows_received += header->consumed[r][c];
    }
  return counters;
}

void IpcBuffer::notify(const int32_t* error_flag, const NotifyFields& fields, const int32_t* send_counts,
                       const int32_t* num_tokens_per_expert, int num_experts, int32_t* count_matrix, bool host_wait,
                       cudaStream_t stream) {
  const IpcView* ipc = view();
  if (num_experts <= 0 || num_experts % num_ranks_ != 0 || num_experts / num_ranks_ > kMaxIpcLocalExperts)
    throw std::invalid_argument("eplib: the ipc transport needs num_experts a positive multiple of the " +
                                std::to_string(num_ranks_) + " ranks with at most " +
                                std::to_string(kMaxIpcLocalExperts) + " per rank, got " + std::to_string(num_experts));
  DeviceGuard guard(device_);
  notify_record_length_ = kRecordFormatFields + num_ranks_ + num_experts / num_ranks_;
  const int64_t ticket = host_wait ? ++notify_ticket_ : 0;
  launch("notify_kernel", notify_kernel, {1, kNotifyThreads}, 0, stream, *ipc, error_flag, fields, send_counts,
         num_tokens_per_expert, num_experts / num_ranks_, count_matrix, ticket);
  // Only where the host will poll: an event recorded during graph capture must not be queried.
  if (host_wait) check_cuda(cudaEventRecord(notify_done_, stream), "cudaEventRecord (notify)");
}

std::vector<int64_t> IpcBuffer::wait_notify(double timeout_s) {
  DeviceGuard guard(device_);
  const auto start = std::chrono::steady_clock::now();
  for (int polls = 0;; ++polls) {
    if (__atomic_load_n(&status_->notify_ticket, __ATOMIC_ACQUIRE) == notify_ticket_) {  // the table is there
      std::vector<int64_t> table(static_cast<size_t>(num_ranks_) * notify_record_length_);
      std::memcpy(table.data(), status_->table, table.size() * sizeof(int64_t));
      return table;
    }
    if (timeout_report().first != kPhaseNone) return {};
    if (polls < kNotifySpinPolls) continue;  // spin phase: the mapped ticket alone
    // The kernel has ended without publishing (an earlier abort) or CUDA failed: nothing will come.
    const cudaError_t event = cudaEventQuery(notify_done_);
    if (event == cudaErrorNotReady) {
      (void)cudaGetLastError();  // "not ready" is an answer, not an error for the next launch
    } else if (__atomic_load_n(&status_->notify_ticket, __ATOMIC_ACQUIRE) != notify_ticket_ &&
               timeout_report().first == kPhaseNone) {
      check_cuda(event, "the notify kernel");
      throw std::runtime_error("eplib: the notify kernel ended without a table (the ipc buffer had aborted)");
    }
    const double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (waited > timeout_s)
      throw std::runtime_error("eplib: no answer from the notify kernel within " + std::to_string(timeout_s) +
                               " s (is the device busy with other work?)");
    // Past the spin phase, sleep between polls so that a long wait does not burn a core.
    std::this_thread::sleep_for(std::chrono::microseconds(50));
  }
}

void IpcBuffer::dispatch(const DispatchPackArgs& pack, const DispatchUnpackArgs& unpack,
                         const IpcExchangeArgs& exchange, cudaStream_t stream) {
  const IpcView* ipc = view();
  DeviceGuard guard(device_);
  ipc_dispatch(*ipc, pack, unpack, exchange, stream);
}

void IpcBuffer::combine(const CombinePackArgs& pack, const CombineReduceArgs& reduce, const IpcExchangeArgs& exchange,
                        cudaStream_t stream) {
  const IpcView* ipc = view();
  DeviceGuard guard(device_);
  ipc_combine(*ipc, pack, reduce, exchange, stream);
}

void IpcBuffer::join_rejected(bool combine, const IpcExchangeArgs& exchange, cudaStream_t stream) {
  const IpcView* ipc = view();
  DeviceGuard guard(device_);
  ipc_join_rejected(*ipc, combine, exchange, stream);
}

void IpcBuffer::low_latency_sync(const LLSyncArgs& args, cudaStream_t stream) {
  const IpcView* ipc = view();
  DeviceGuard guard(device_);
  ipc_low_latency_sync(*ipc, args, stream);
}

std::vector<uintptr_t> IpcBuffer::region_addresses() const {
  const IpcView* ipc = view();
  std::vector<uintptr_t> addresses;
  for (int r = 0; r < num_ranks_; ++r) addresses.push_back(reinterpret_cast<uintptr_t>(ipc->bases[r]) + kIpcRegionOffset);
  return addresses;
}

}  // namespace eplib::cuda
