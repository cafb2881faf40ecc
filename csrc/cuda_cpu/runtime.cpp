// The CUDA runtime API of the CPU execution: one device thread per process runs the work of every
// stream in CUDA's order (each stream in order; a stream waiting on an event waits for the event's
// record to be reached; the legacy stream waits for the other streams), picking among the streams
// that can go on at random, one operation at a time (kernels of different streams never overlap: a
// GPU does not promise that they do). The host thread only enqueues, so it runs ahead until it
// synchronizes. Errors follow the CUDA runtime: each host thread has a last error (set by every call
// that fails, cudaErrorNotReady of a query included; cudaGetLastError returns and clears it), and a
// device fault is sticky: every later call returns it.
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "executor.h"

namespace eplib_cuda_cpu {
namespace {

struct Operation {
  enum class Kind { kKernel, kMemset, kMemcpy, kRecord, kWait };
  Kind kind = Kind::kKernel;
  KernelLaunch kernel;       // kKernel
  void* pointer = nullptr;   // kMemset, kMemcpy (destination)
  const void* source = nullptr;  // kMemcpy
  int value = 0;
  size_t bytes = 0;
  CUevent_st* event = nullptr;  // kRecord, kWait
  uint64_t generation = 0;      // the event's record this operation makes or waits for
};

}  // namespace
}  // namespace eplib_cuda_cpu

struct CUstream_st {
  std::deque<eplib_cuda_cpu::Operation> queue;
  bool running = false;  // its head operation is executing
};

struct CUevent_st {
  uint64_t recorded = 0;   // records enqueued so far
  uint64_t completed = 0;  // the last record the device has reached
};

namespace eplib_cuda_cpu {
namespace {

thread_local cudaError_t last_error = cudaSuccess;
thread_local int current_device = 0;

// Memory shared with other processes: memfd-backed, mapped by peers through /proc/<pid>/fd/<fd>.
struct DeviceAllocation {
  int fd;
  size_t bytes;
};

// The content of a cudaIpcMemHandle_t.
struct IpcHandle {
  char magic[8];
  int32_t pid;
  int32_t fd;
  uint64_t bytes;
};
static_assert(sizeof(IpcHandle) <= sizeof(cudaIpcMemHandle_t), "an IPC handle fits CUDA's 64 bytes");
constexpr char kIpcMagic[8] = {'e', 'p', 'l', 'i', 'b', 'C', 'P', 'U'};

struct IpcMapping {
  int32_t pid;
  int32_t fd;
  size_t bytes;
  int references;
};

class Device {
 public:
  cudaError_t enqueue(cudaStream_t stream, Operation operation);
  cudaError_t synchronize(cudaStream_t stream);  // nullptr: every stream
  bool idle_locked() const;
  void wait_idle_locked(std::unique_lock<std::mutex>& lock);
  CUstream_st* resolve_locked(cudaStream_t stream);  // nullptr when not a stream of this device

  std::mutex mutex;
  std::condition_variable changed;
  std::set<CUstream_st*> streams;
  CUstream_st legacy;  // stream 0
  std::set<CUevent_st*> events;
  std::set<const void*> loaded_functions;
  Statistics statistics;
  std::mt19937_64 random{schedule_seed()};
  std::atomic<bool> faulted{false};
  cudaError_t fault = cudaSuccess;
  std::string fault_message;

  std::mutex memory_mutex;
  std::map<uintptr_t, DeviceAllocation> allocations;  // by base
  std::map<uintptr_t, IpcMapping> ipc_mappings;       // by base
  std::map<uintptr_t, bool> host_allocations;         // by base -> mapped

 private:
  void loop();
  void execute(const Operation& operation);
  bool thread_started_ = false;
};

Device& device() {
  static Device* instance = new Device();  // never destroyed: its thread runs until the process exits
  return *instance;
}

cudaError_t fail(cudaError_t error) {
  last_error = error;
  return error;
}

// The sticky fault, if any (every call returns it, as after a fault on a GPU).
cudaError_t sticky() {
  Device& d = device();
  if (!d.faulted.load()) return cudaSuccess;
  std::lock_guard<std::mutex> lock(d.mutex);
  return d.fault;
}

CUstream_st* Device::resolve_locked(cudaStream_t stream) {
  if (stream == nullptr) return &legacy;
  return streams.count(stream) ? stream : nullptr;
}

bool Device::idle_locked() const {
  if (!legacy.queue.empty() || legacy.running) return false;
  return std::all_of(streams.begin(), streams.end(), [](const CUstream_st* s) { return s->queue.empty() && !s->running; });
}

void Device::wait_idle_locked(std::unique_lock<std::mutex>& lock) {
  changed.wait(lock, [this] { return idle_locked(); });
}

cudaError_t Device::enqueue(cudaStream_t stream, Operation operation) {
  std::unique_lock<std::mutex> lock(mutex);
  CUstream_st* target = resolve_locked(stream);
  if (target == nullptr) return fail(cudaErrorInvalidResourceHandle);
  if (operation.kind == Operation::Kind::kRecord) operation.generation = ++operation.event->recorded;
  if (operation.kind == Operation::Kind::kWait) operation.generation = operation.event->recorded;
  target->queue.push_back(std::move(operation));
  if (!thread_started_) {
    thread_started_ = true;
    std::thread([this] { loop(); }).detach();
  }
  lock.unlock();
  changed.notify_all();
  return cudaSuccess;
}

cudaError_t Device::synchronize(cudaStream_t stream) {
  std::unique_lock<std::mutex> lock(mutex);
  if (stream == nullptr) {
    wait_idle_locked(lock);
  } else {
    CUstream_st* target = resolve_locked(stream);
    if (target == nullptr) return fail(cudaErrorInvalidResourceHandle);
    changed.wait(lock, [target] { return target->queue.empty() && !target->running; });
  }
  if (faulted.load()) return fail(fault);
  return cudaSuccess;
}

void Device::execute(const Operation& operation) {
  if (faulted.load()) return;  // after a fault the device runs nothing
  switch (operation.kind) {
    case Operation::Kind::kKernel: run_kernel(operation.kernel); break;
    case Operation::Kind::kMemset: std::memset(operation.pointer, operation.value, operation.bytes); break;
    case Operation::Kind::kMemcpy: std::memcpy(operation.pointer, operation.source, operation.bytes); break;
    case Operation::Kind::kRecord:
    case Operation::Kind::kWait: break;
  }
}

void Device::loop() {
  std::unique_lock<std::mutex> lock(mutex);
  std::vector<CUstream_st*> ready;
  for (;;) {
    ready.clear();
    bool others_busy = false;
    auto consider = [&](CUstream_st* stream) {
      if (stream->running || stream->queue.empty()) return;
      const Operation& head = stream->queue.front();
      if (head.kind == Operation::Kind::kWait && head.event->completed < head.generation) return;
      ready.push_back(stream);
    };
    for (CUstream_st* stream : streams) {
      others_busy |= !stream->queue.empty() || stream->running;
      consider(stream);
    }
    if (!others_busy) consider(&legacy);  // the legacy stream waits for every other stream
    if (ready.empty()) {
      changed.wait(lock);
      continue;
    }
    CUstream_st* stream = ready[random() % ready.size()];
    Operation operation = std::move(stream->queue.front());
    stream->queue.pop_front();
    stream->running = true;
    lock.unlock();
    execute(operation);
    lock.lock();
    stream->running = false;
    if (operation.kind == Operation::Kind::kRecord)
      operation.event->completed = std::max(operation.event->completed, operation.generation);
    changed.notify_all();
  }
}

bool valid_launch(const LaunchConfig& config) {
  const dim3 grid = config.grid, block = config.block;
  if (grid.x < 1 || grid.y < 1 || grid.z < 1 || grid.y > 65535 || grid.z > 65535) return false;
  if (block.x < 1 || block.y < 1 || block.z < 1 || block.z > 64) return false;
  if (static_cast<uint64_t>(block.x) * block.y * block.z > kMaxThreadsPerBlock) return false;
  return config.shared_bytes <= kMaxDynamicSharedBytes;
}

// EPLIB_CUDA_CPU_LAUNCH_LOG=<directory>: each process appends the name of every kernel it launches
// (once) to <directory>/<pid>, so that a test suite can check that every __global__ function ran.
void log_first_launch(const char* name) {
  static const char* directory = std::getenv("EPLIB_CUDA_CPU_LAUNCH_LOG");
  if (directory == nullptr) return;
  const std::string path = std::string(directory) + "/" + std::to_string(getpid());
  const int fd = open(path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  if (fd < 0) return;
  const std::string line = std::string(name) + "\n";
  (void)!write(fd, line.data(), line.size());
  close(fd);
}

int device_count_setting() {
  const char* text = std::getenv("EPLIB_CUDA_CPU_DEVICES");
  return text != nullptr ? std::atoi(text) : 1;
}

}  // namespace

void record_fault(cudaError_t code, const std::string& message) {
  Device& d = device();
  {
    std::lock_guard<std::mutex> lock(d.mutex);
    if (d.faulted.load()) return;
    d.fault = code;
    d.fault_message = message;
    d.faulted.store(true);
  }
  d.changed.notify_all();
}

bool device_faulted() { return device().faulted.load(); }

Statistics statistics() {
  Device& d = device();
  std::lock_guard<std::mutex> lock(d.mutex);
  Statistics copy = d.statistics;
  copy.seed = schedule_seed();
  return copy;
}

cudaError_t launch(const char* name, const void* function, const LaunchConfig& config,
                   std::shared_ptr<KernelBody> body) {
  Device& d = device();
  if (const cudaError_t error = sticky()) return fail(error);
  if (!valid_launch(config)) return fail(cudaErrorInvalidConfiguration);
  if (config.cooperative && config.grid.x * config.grid.y * config.grid.z > kMaxCooperativeBlocks)
    return fail(cudaErrorCooperativeLaunchTooLarge);
  {
    std::unique_lock<std::mutex> lock(d.mutex);
    if (d.resolve_locked(config.stream) == nullptr) return fail(cudaErrorInvalidResourceHandle);
    // Lazy loading: the first launch of a kernel that nothing loaded before (cudaFuncGetAttributes)
    // loads its module, which waits for the device to go idle (CUDA_MODULE_LOADING=LAZY).
    if (d.loaded_functions.insert(function).second && !d.idle_locked()) {
      ++d.statistics.lazy_load_waits[name];
      d.wait_idle_locked(lock);
    }
    if (++d.statistics.launches[name] == 1) log_first_launch(name);
  }
  Operation operation;
  operation.kind = Operation::Kind::kKernel;
  operation.kernel = KernelLaunch{name, config.grid, config.block, config.shared_bytes, config.cooperative,
                                  std::move(body)};
  return d.enqueue(config.stream, std::move(operation));
}

}  // namespace eplib_cuda_cpu

using eplib_cuda_cpu::device;
using eplib_cuda_cpu::fail;
using eplib_cuda_cpu::Operation;
using eplib_cuda_cpu::sticky;

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

const char* cudaGetErrorName(cudaError_t error) {
  switch (error) {
#define EPLIB_ERROR_NAME(code) \
  case code: return #code;
    EPLIB_ERROR_NAME(cudaSuccess)
    EPLIB_ERROR_NAME(cudaErrorInvalidValue)
    EPLIB_ERROR_NAME(cudaErrorMemoryAllocation)
    EPLIB_ERROR_NAME(cudaErrorInitializationError)
    EPLIB_ERROR_NAME(cudaErrorInvalidConfiguration)
    EPLIB_ERROR_NAME(cudaErrorInvalidDevicePointer)
    EPLIB_ERROR_NAME(cudaErrorInsufficientDriver)
    EPLIB_ERROR_NAME(cudaErrorNoDevice)
    EPLIB_ERROR_NAME(cudaErrorInvalidDevice)
    EPLIB_ERROR_NAME(cudaErrorInvalidContext)
    EPLIB_ERROR_NAME(cudaErrorMapBufferObjectFailed)
    EPLIB_ERROR_NAME(cudaErrorInvalidResourceHandle)
    EPLIB_ERROR_NAME(cudaErrorNotReady)
    EPLIB_ERROR_NAME(cudaErrorIllegalAddress)
    EPLIB_ERROR_NAME(cudaErrorIllegalInstruction)
    EPLIB_ERROR_NAME(cudaErrorMisalignedAddress)
    EPLIB_ERROR_NAME(cudaErrorLaunchFailure)
    EPLIB_ERROR_NAME(cudaErrorCooperativeLaunchTooLarge)
#undef EPLIB_ERROR_NAME
  }
  return "cudaErrorUnknown";
}

const char* cudaGetErrorString(cudaError_t error) {
  auto& d = device();
  if (d.faulted.load()) {
    std::lock_guard<std::mutex> lock(d.mutex);
    if (error == d.fault) return d.fault_message.c_str();  // set once, never changed: the pointer stays valid
  }
  switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorInvalidContext: return "invalid device context";
    case cudaErrorNotReady: return "device not ready";
    case cudaErrorInvalidResourceHandle: return "invalid resource handle";
    case cudaErrorNoDevice: return "no CUDA-capable device is detected";
    case cudaErrorInsufficientDriver: return "CUDA driver version is insufficient for CUDA runtime version";
    case cudaErrorMapBufferObjectFailed: return "mapping of buffer object failed";
    default: return cudaGetErrorName(error);
  }
}

cudaError_t cudaGetLastError() {
  if (const cudaError_t error = sticky()) return error;
  const cudaError_t error = eplib_cuda_cpu::last_error;
  eplib_cuda_cpu::last_error = cudaSuccess;
  return error;
}

cudaError_t cudaPeekAtLastError() {
  if (const cudaError_t error = sticky()) return error;
  return eplib_cuda_cpu::last_error;
}

// ---------------------------------------------------------------------------------------------
// Devices
// ---------------------------------------------------------------------------------------------

cudaError_t cudaGetDeviceCount(int* count) {
  // EPLIB_CUDA_CPU_DEVICE_ERROR=<code> makes the query fail as a broken driver would (tests of how
  // eplib reports it).
  if (const char* forced = std::getenv("EPLIB_CUDA_CPU_DEVICE_ERROR")) {
    *count = 0;
    return fail(static_cast<cudaError_t>(std::atoi(forced)));
  }
  *count = eplib_cuda_cpu::device_count_setting();
  return cudaSuccess;
}

cudaError_t cudaGetDevice(int* device_index) {
  *device_index = eplib_cuda_cpu::current_device;
  return cudaSuccess;
}

cudaError_t cudaSetDevice(int device_index) {
  if (device_index < 0 || device_index >= eplib_cuda_cpu::device_count_setting()) return fail(cudaErrorInvalidDevice);
  eplib_cuda_cpu::current_device = device_index;
  return sticky() ? fail(sticky()) : cudaSuccess;
}

cudaError_t cudaDeviceSynchronize() { return device().synchronize(nullptr); }

cudaError_t cudaRuntimeGetVersion(int* version) {
  *version = 0;  // no CUDA runtime: the CPU execution
  return cudaSuccess;
}

cudaError_t cudaDriverGetVersion(int* version) {
  *version = 0;  // no driver
  return cudaSuccess;
}

cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attributes, const void* function) {
  if (const cudaError_t error = sticky()) return fail(error);
  auto& d = device();
  std::lock_guard<std::mutex> lock(d.mutex);
  d.loaded_functions.insert(function);  // loads the kernel: later launches never wait for it
  *attributes = cudaFuncAttributes{static_cast<int>(eplib_cuda_cpu::kMaxThreadsPerBlock), 0, 0};
  return cudaSuccess;
}

// ---------------------------------------------------------------------------------------------
// Memory
// ---------------------------------------------------------------------------------------------

cudaError_t cudaMalloc(void** pointer, size_t bytes) {
  *pointer = nullptr;
  if (const cudaError_t error = sticky()) return fail(error);
  if (bytes == 0) return cudaSuccess;
  const int fd = memfd_create("eplib-cuda-cpu", MFD_CLOEXEC);
  if (fd < 0) return fail(cudaErrorMemoryAllocation);
  void* mapped = MAP_FAILED;
  if (ftruncate(fd, static_cast<off_t>(bytes)) == 0)
    mapped = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (mapped == MAP_FAILED) {
    close(fd);
    return fail(cudaErrorMemoryAllocation);
  }
  std::memset(mapped, 0xA5, bytes);  // device memory starts undefined, not zero
  auto& d = device();
  std::lock_guard<std::mutex> lock(d.memory_mutex);
  d.allocations[reinterpret_cast<uintptr_t>(mapped)] = {fd, bytes};
  *pointer = mapped;
  return cudaSuccess;
}

cudaError_t cudaFree(void* pointer) {
  if (pointer == nullptr) return cudaSuccess;
  auto& d = device();
  const cudaError_t synchronized = d.synchronize(nullptr);  // cudaFree waits for the device, as CUDA's does
  std::lock_guard<std::mutex> lock(d.memory_mutex);
  const auto found = d.allocations.find(reinterpret_cast<uintptr_t>(pointer));
  if (found == d.allocations.end()) return fail(cudaErrorInvalidDevicePointer);
  munmap(pointer, found->second.bytes);
  close(found->second.fd);
  d.allocations.erase(found);
  return synchronized;
}

cudaError_t cudaMemsetAsync(void* pointer, int value, size_t bytes, cudaStream_t stream) {
  if (const cudaError_t error = sticky()) return fail(error);
  Operation operation;
  operation.kind = Operation::Kind::kMemset;
  operation.pointer = pointer;
  operation.value = value;
  operation.bytes = bytes;
  return device().enqueue(stream, std::move(operation));
}

cudaError_t cudaMemset(void* pointer, int value, size_t bytes) { return cudaMemsetAsync(pointer, value, bytes, nullptr); }

cudaError_t cudaMemcpyAsync(void* destination, const void* source, size_t bytes, cudaMemcpyKind kind,
                            cudaStream_t stream) {
  (void)kind;  // one address space
  if (const cudaError_t error = sticky()) return fail(error);
  Operation operation;
  operation.kind = Operation::Kind::kMemcpy;
  operation.pointer = destination;
  operation.source = source;
  operation.bytes = bytes;
  return device().enqueue(stream, std::move(operation));
}

// On the legacy stream, and the host waits for it, as CUDA's synchronous copy does.
cudaError_t cudaMemcpy(void* destination, const void* source, size_t bytes, cudaMemcpyKind kind) {
  if (const cudaError_t error = cudaMemcpyAsync(destination, source, bytes, kind, nullptr)) return error;
  return device().synchronize(nullptr);
}

cudaError_t cudaHostAlloc(void** pointer, size_t bytes, unsigned flags) {
  *pointer = nullptr;
  if (const cudaError_t error = sticky()) return fail(error);
  void* allocation = nullptr;
  if (posix_memalign(&allocation, 4096, bytes == 0 ? 1 : bytes) != 0) return fail(cudaErrorMemoryAllocation);
  std::memset(allocation, 0xA5, bytes);  // pinned memory starts undefined too
  auto& d = device();
  std::lock_guard<std::mutex> lock(d.memory_mutex);
  d.host_allocations[reinterpret_cast<uintptr_t>(allocation)] = (flags & cudaHostAllocMapped) != 0;
  *pointer = allocation;
  return cudaSuccess;
}

cudaError_t cudaFreeHost(void* pointer) {
  if (pointer == nullptr) return cudaSuccess;
  auto& d = device();
  std::lock_guard<std::mutex> lock(d.memory_mutex);
  if (d.host_allocations.erase(reinterpret_cast<uintptr_t>(pointer)) == 0) return fail(cudaErrorInvalidValue);
  free(pointer);
  return cudaSuccess;
}

cudaError_t cudaHostGetDevicePointer(void** device_pointer, void* host_pointer, unsigned flags) {
  *device_pointer = nullptr;
  auto& d = device();
  std::lock_guard<std::mutex> lock(d.memory_mutex);
  const auto found = d.host_allocations.find(reinterpret_cast<uintptr_t>(host_pointer));
  if (flags != 0 || found == d.host_allocations.end() || !found->second) return fail(cudaErrorInvalidValue);
  *device_pointer = host_pointer;  // one address space
  return cudaSuccess;
}

// ---------------------------------------------------------------------------------------------
// Streams and events
// ---------------------------------------------------------------------------------------------

cudaError_t cudaStreamCreateWithFlags(cudaStream_t* stream, unsigned flags) {
  (void)flags;  // every stream is non-blocking with respect to the others
  auto& d = device();
  std::lock_guard<std::mutex> lock(d.mutex);
  *stream = new CUstream_st();
  d.streams.insert(*stream);
  return cudaSuccess;
}

cudaError_t cudaStreamDestroy(cudaStream_t stream) {
  auto& d = device();
  std::unique_lock<std::mutex> lock(d.mutex);
  if (stream == nullptr || !d.streams.count(stream)) return fail(cudaErrorInvalidResourceHandle);
  // CUDA lets the work finish first; so does this, on the caller's time.
  d.changed.wait(lock, [stream] { return stream->queue.empty() && !stream->running; });
  d.streams.erase(stream);
  delete stream;
  return cudaSuccess;
}

cudaError_t cudaStreamSynchronize(cudaStream_t stream) { return device().synchronize(stream); }

cudaError_t cudaStreamQuery(cudaStream_t stream) {
  auto& d = device();
  std::lock_guard<std::mutex> lock(d.mutex);
  CUstream_st* target = d.resolve_locked(stream);
  if (target == nullptr) return fail(cudaErrorInvalidResourceHandle);
  if (d.faulted.load()) return fail(d.fault);
  return (target->queue.empty() && !target->running) ? cudaSuccess : fail(cudaErrorNotReady);
}

cudaError_t cudaStreamWaitEvent(cudaStream_t stream, cudaEvent_t event, unsigned flags) {
  (void)flags;
  {
    auto& d = device();
    std::lock_guard<std::mutex> lock(d.mutex);
    if (!d.events.count(event)) return fail(cudaErrorInvalidResourceHandle);
  }
  Operation operation;
  operation.kind = Operation::Kind::kWait;
  operation.event = event;
  return device().enqueue(stream, std::move(operation));
}

cudaError_t cudaEventCreateWithFlags(cudaEvent_t* event, unsigned flags) {
  (void)flags;  // events never time here
  auto& d = device();
  std::lock_guard<std::mutex> lock(d.mutex);
  *event = new CUevent_st();
  d.events.insert(*event);
  return cudaSuccess;
}

cudaError_t cudaEventDestroy(cudaEvent_t event) {
  auto& d = device();
  std::unique_lock<std::mutex> lock(d.mutex);
  if (!d.events.count(event)) return fail(cudaErrorInvalidResourceHandle);
  d.changed.wait(lock, [event] { return event->completed >= event->recorded; });  // no record still refers to it
  d.events.erase(event);
  delete event;
  return cudaSuccess;
}

cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t stream) {
  if (const cudaError_t error = sticky()) return fail(error);
  {
    auto& d = device();
    std::lock_guard<std::mutex> lock(d.mutex);
    if (!d.events.count(event)) return fail(cudaErrorInvalidResourceHandle);
  }
  Operation operation;
  operation.kind = Operation::Kind::kRecord;
  operation.event = event;
  return device().enqueue(stream, std::move(operation));
}

cudaError_t cudaEventQuery(cudaEvent_t event) {
  auto& d = device();
  std::lock_guard<std::mutex> lock(d.mutex);
  if (!d.events.count(event)) return fail(cudaErrorInvalidResourceHandle);
  if (d.faulted.load()) return fail(d.fault);
  // Not ready is an error like any other for the last-error state (torch clears it after a query).
  return event->completed >= event->recorded ? cudaSuccess : fail(cudaErrorNotReady);
}

cudaError_t cudaEventSynchronize(cudaEvent_t event) {
  auto& d = device();
  std::unique_lock<std::mutex> lock(d.mutex);
  if (!d.events.count(event)) return fail(cudaErrorInvalidResourceHandle);
  const uint64_t target = event->recorded;
  d.changed.wait(lock, [&] { return event->completed >= target || d.faulted.load(); });
  return d.faulted.load() ? fail(d.fault) : cudaSuccess;
}

// ---------------------------------------------------------------------------------------------
// IPC
// ---------------------------------------------------------------------------------------------

cudaError_t cudaIpcGetMemHandle(cudaIpcMemHandle_t* handle, void* pointer) {
  if (const cudaError_t error = sticky()) return fail(error);
  auto& d = device();
  std::lock_guard<std::mutex> lock(d.memory_mutex);
  // The handle names the whole allocation that holds `pointer` (opening it maps the allocation's base).
  const auto address = reinterpret_cast<uintptr_t>(pointer);
  auto found = d.allocations.upper_bound(address);
  if (found == d.allocations.begin()) return fail(cudaErrorInvalidValue);
  --found;
  if (address >= found->first + found->second.bytes) return fail(cudaErrorInvalidValue);
  eplib_cuda_cpu::IpcHandle content{};
  std::memcpy(content.magic, eplib_cuda_cpu::kIpcMagic, sizeof(content.magic));
  content.pid = getpid();
  content.fd = found->second.fd;
  content.bytes = found->second.bytes;
  std::memset(handle, 0, sizeof(*handle));
  std::memcpy(handle, &content, sizeof(content));
  return cudaSuccess;
}

cudaError_t cudaIpcOpenMemHandle(void** pointer, cudaIpcMemHandle_t handle, unsigned flags) {
  (void)flags;
  *pointer = nullptr;
  if (const cudaError_t error = sticky()) return fail(error);
  eplib_cuda_cpu::IpcHandle content;
  std::memcpy(&content, &handle, sizeof(content));
  if (std::memcmp(content.magic, eplib_cuda_cpu::kIpcMagic, sizeof(content.magic)) != 0)
    return fail(cudaErrorInvalidResourceHandle);
  if (content.pid == getpid()) return fail(cudaErrorInvalidContext);  // as CUDA: never one's own handle
  auto& d = device();
  std::lock_guard<std::mutex> lock(d.memory_mutex);
  for (auto& [base, mapping] : d.ipc_mappings) {
    if (mapping.pid == content.pid && mapping.fd == content.fd) {  // CUDA counts a reopen
      ++mapping.references;
      *pointer = reinterpret_cast<void*>(base);
      return cudaSuccess;
    }
  }
  const std::string path = "/proc/" + std::to_string(content.pid) + "/fd/" + std::to_string(content.fd);
  const int fd = open(path.c_str(), O_RDWR | O_CLOEXEC);
  if (fd < 0) return fail(cudaErrorMapBufferObjectFailed);
  void* mapped = mmap(nullptr, content.bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  close(fd);
  if (mapped == MAP_FAILED) return fail(cudaErrorMapBufferObjectFailed);
  d.ipc_mappings[reinterpret_cast<uintptr_t>(mapped)] = {content.pid, content.fd, content.bytes, 1};
  *pointer = mapped;
  return cudaSuccess;
}

cudaError_t cudaIpcCloseMemHandle(void* pointer) {
  auto& d = device();
  std::lock_guard<std::mutex> lock(d.memory_mutex);
  const auto found = d.ipc_mappings.find(reinterpret_cast<uintptr_t>(pointer));
  if (found == d.ipc_mappings.end()) return fail(cudaErrorInvalidValue);
  if (--found->second.references == 0) {
    munmap(pointer, found->second.bytes);
    d.ipc_mappings.erase(found);
  }
  return cudaSuccess;
}
