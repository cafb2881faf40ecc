#include "peer_buffer.h"

#include <atomic>
#include <chrono>
#include <cstring>
#include <stdexcept>
#include <thread>

#include "common.cuh"
#include "peer.cuh"

namespace eplib::cuda {

namespace {

constexpr int kNotifyThreads = 256;

// One block. Record of this rank -> row `rank` of every rank's table of notify round k; then the
// hand-shake; then this rank's table -> count_matrix and, when host_ticket > 0, the host-mapped
// status (the host polls for its ticket). Without a ticket the host status is not touched: an
// earlier notify that finishes late must not pass its table off as a later one's.
__global__ void notify_kernel(PeerView view, const int32_t* error_flag, NotifyFields fields,
                              const int32_t* send_counts, const int32_t* num_tokens_per_expert,
                              int num_local_experts, int32_t* count_matrix, int64_t host_ticket) {
  __shared__ uint64_t notify_round;
  __shared__ bool arrived;
  PeerHeader* own = own_header(view);
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
    publish_to_all(view, offsetof(PeerHeader, notified), notify_round);
    arrived = wait_for_all(view, offsetof(PeerHeader, notified), notify_round, kPhaseNotify);
  }
  __syncthreads();
  if (!arrived) return;
  for (int i = threadIdx.x; i < num_ranks * record_length; i += blockDim.x) {
    const int source = i / record_length, field = i % record_length;
    // Volatile: written by other GPUs or processes (never a non-coherent load).
    const int64_t value = *reinterpret_cast<volatile const int64_t*>(&own->records[parity][source][field]);
    if (host_ticket > 0) view.status->table[i] = value;
    if (field >= kRecordFormatFields && field < kRecordFormatFields + num_ranks)
      count_matrix[source * num_ranks + field - kRecordFormatFields] = static_cast<int32_t>(value);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    own->notify_round = notify_round;
    if (host_ticket > 0) {
      __threadfence_system();  // the table reaches host memory before the ticket does
      *reinterpret_cast<volatile int64_t*>(&view.status->notify_ticket) = host_ticket;
    }
  }
}

// One thread: every rank stores barrier = k at every rank and waits for all.
__global__ void barrier_kernel(PeerView view) {
  PeerHeader* own = own_header(view);
  const uint64_t barrier_round = own->barrier_round + 1;
  publish_to_all(view, offsetof(PeerHeader, barrier), barrier_round);
  if (wait_for_all(view, offsetof(PeerHeader, barrier), barrier_round, kPhaseBarrier))
    own->barrier_round = barrier_round;
}

}  // namespace

PeerBuffer::PeerBuffer(int rank, int num_ranks, int64_t num_bytes, int device)
    : rank_(rank), num_ranks_(num_ranks), device_(device), num_bytes_(num_bytes) {
  if (num_ranks < 1 || num_ranks > kMaxPeers || rank < 0 || rank >= num_ranks)
    throw std::invalid_argument("eplib: a peer buffer serves 1 to " + std::to_string(kMaxPeers) +
                                " ranks, got rank " + std::to_string(rank) + " of " + std::to_string(num_ranks));
  if (num_bytes < kPeerRegionOffset + kRowAlignment)
    throw std::invalid_argument("eplib: a peer buffer needs at least " + std::to_string(kPeerRegionOffset + kRowAlignment) +
                                " bytes, got " + std::to_string(num_bytes));
  check_cuda(cudaSetDevice(device), "cudaSetDevice (peer buffer)");
  try {
    // Our own cudaMalloc: IPC exports the base of an allocation (GPU_NOTES "CUDA IPC").
    check_cuda(cudaMalloc(&base_, num_bytes), "cudaMalloc (peer buffer)");
    check_cuda(cudaMemset(base_, 0, kPeerRegionOffset), "cudaMemset (peer buffer header)");
    check_cuda(cudaHostAlloc(reinterpret_cast<void**>(&status_), sizeof(PeerHostStatus), cudaHostAllocMapped),
               "cudaHostAlloc (peer status)");
    std::memset(status_, 0, sizeof(PeerHostStatus));
    status_->timeout_peer = -1;
    PeerHostStatus* device_status = nullptr;
    check_cuda(cudaHostGetDevicePointer(reinterpret_cast<void**>(&device_status), status_, 0),
               "cudaHostGetDevicePointer (peer status)");
    check_cuda(cudaEventCreateWithFlags(&notify_done_, cudaEventDisableTiming), "cudaEventCreate (peer buffer)");
    // Peers write into the header as soon as they have the handle: it must be zero by then.
    check_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize (peer buffer)");
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
    throw;
  }
}

PeerBuffer::~PeerBuffer() {
  try {
    // No barrier: garbage collection frees the ranks' buffers at unrelated times (a rank can hold
    // its Buffer in a reference cycle while the others have moved on), and a rank would wait for
    // the others' collection. Peers no longer use the buffer once their owners dropped it too.
    destroy(0.0);
  } catch (...) {  // a destructor must not throw: at interpreter exit CUDA may already be gone
  }
}

std::string PeerBuffer::ipc_handle() const {
  if (destroyed_) throw std::runtime_error("eplib: the peer buffer was destroyed");
  cudaIpcMemHandle_t handle;
  check_cuda(cudaIpcGetMemHandle(&handle, base_), "cudaIpcGetMemHandle");
  return std::string(reinterpret_cast<const char*>(&handle), sizeof(handle));
}

void PeerBuffer::open_peers(const std::vector<std::string>& handles) {
  if (destroyed_ || open_) throw std::runtime_error("eplib: open_peers() on a peer buffer that is open or destroyed");
  if (static_cast<int>(handles.size()) != num_ranks_)
    throw std::invalid_argument("eplib: open_peers() needs one handle per rank (" + std::to_string(num_ranks_) +
                                "), got " + std::to_string(handles.size()));
  check_cuda(cudaSetDevice(device_), "cudaSetDevice (peer buffer)");
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
      cudaGetLastError();  // clear it in our runtime instance
      close_peers();
      throw std::runtime_error("eplib: cannot open the peer buffer of rank " + std::to_string(r) +
                               " (cudaIpcOpenMemHandle: " + cudaGetErrorString(error) + ")");
    }
    view_.bases[r] = static_cast<uint8_t*>(mapped);
  }
  open_ = true;
}

void PeerBuffer::close_peers() {
  for (int r = 0; r < num_ranks_; ++r) {
    if (r != rank_ && view_.bases[r] != nullptr) cudaIpcCloseMemHandle(view_.bases[r]);
    if (r != rank_) view_.bases[r] = nullptr;
  }
  open_ = false;
}

bool PeerBuffer::destroy(double timeout_s) {
  if (destroyed_) return true;
  destroyed_ = true;
  cudaSetDevice(device_);
  // No kernel of any rank may still touch a mapping when it closes (GPU_NOTES "CUDA IPC"): finish
  // ours, then meet the others at a barrier, as DeepEP's destroy() does.
  bool clean = cudaDeviceSynchronize() == cudaSuccess;
  if (open_ && timeout_s > 0) {
    set_timeout(timeout_s);
    barrier_kernel<<<1, 1>>>(view_);
    clean = cudaGetLastError() == cudaSuccess && cudaDeviceSynchronize() == cudaSuccess && clean;
    clean = clean && status_->timeout_phase == kPhaseNone;
  } else if (open_) {
    clean = false;  // no barrier: nothing says the peers are done
  }
  if (open_) close_peers();
  cudaEventDestroy(notify_done_);
  cudaFreeHost(status_);
  cudaFree(base_);
  cudaGetLastError();
  notify_done_ = nullptr;
  status_ = nullptr;
  base_ = nullptr;
  return clean;
}

const PeerView* PeerBuffer::view() const {
  if (!open_) throw std::runtime_error("eplib: the peer buffer is not open (destroyed, or open_peers() not called)");
  return &view_;
}

void PeerBuffer::set_timeout(double seconds) {
  if (!(seconds > 0)) throw std::invalid_argument("eplib: a peer wait timeout must be positive");
  view_.timeout_ns = static_cast<int64_t>(seconds * 1e9);
}

std::pair<int, int> PeerBuffer::timeout_report() const {
  if (status_ == nullptr) return {kPhaseNone, -1};
  const volatile PeerHostStatus* status = status_;
  const int phase = status->timeout_phase;
  std::atomic_thread_fence(std::memory_order_acquire);  // the kernel stores the peer before the phase
  return {phase, phase != kPhaseNone ? status->timeout_peer : -1};
}

void PeerBuffer::notify(const int32_t* error_flag, const NotifyFields& fields, const int32_t* send_counts,
                        const int32_t* num_tokens_per_expert, int num_experts, int32_t* count_matrix,
                        bool host_wait, cudaStream_t stream) {
  const PeerView* peers = view();
  if (num_experts <= 0 || num_experts % num_ranks_ != 0 || num_experts / num_ranks_ > kMaxPeerLocalExperts)
    throw std::invalid_argument("eplib: the peer transport needs num_experts a positive multiple of the " +
                                std::to_string(num_ranks_) + " ranks with at most " +
                                std::to_string(kMaxPeerLocalExperts) + " per rank, got " + std::to_string(num_experts));
  notify_record_length_ = kRecordFormatFields + num_ranks_ + num_experts / num_ranks_;
  const int64_t ticket = host_wait ? ++notify_ticket_ : 0;
  notify_kernel<<<1, kNotifyThreads, 0, stream>>>(*peers, error_flag, fields, send_counts, num_tokens_per_expert,
                                                   num_experts / num_ranks_, count_matrix, ticket);
  check_launch("notify");
  // Only where the host will poll: an event recorded during graph capture must not be queried.
  if (host_wait) check_cuda(cudaEventRecord(notify_done_, stream), "cudaEventRecord (notify)");
}

std::vector<int64_t> PeerBuffer::wait_notify(double timeout_s) {
  const volatile PeerHostStatus* status = status_;
  const auto start = std::chrono::steady_clock::now();
  for (int polls = 0;; ++polls) {
    if (status->notify_ticket == notify_ticket_) {
      // Reads of the table after the ticket's (on x86 loads keep their order anyway; not on Arm).
      std::atomic_thread_fence(std::memory_order_acquire);
      std::vector<int64_t> table(static_cast<size_t>(num_ranks_) * notify_record_length_);
      for (size_t i = 0; i < table.size(); ++i) table[i] = status->table[i];
      return table;
    }
    if (status->timeout_phase != kPhaseNone) return {};
    // The kernel has ended without publishing (an earlier abort) or CUDA failed: nothing will come.
    const cudaError_t event = cudaEventQuery(notify_done_);
    if (event != cudaErrorNotReady && status->notify_ticket != notify_ticket_ &&
        status->timeout_phase == kPhaseNone) {
      if (event != cudaSuccess) check_cuda(event, "the notify kernel");
      throw std::runtime_error("eplib: the notify kernel ended without a table (the peer buffer had aborted)");
    }
    const double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (waited > timeout_s)
      throw std::runtime_error("eplib: no answer from the notify kernel within " + std::to_string(timeout_s) +
                               " s (is the device busy with other work?)");
    // Spin briefly for latency, then sleep so that a long wait does not burn a core.
    if (polls > 10000) std::this_thread::sleep_for(std::chrono::microseconds(50));
  }
}

}  // namespace eplib::cuda
