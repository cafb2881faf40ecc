// The CPU execution of eplib's CUDA sources (EPLIB_CUDA_CPU=1): the part of the CUDA language and
// runtime that csrc/cuda uses, implemented on the host, so that the same .cu files build with the
// host C++ compiler and run on machines without a GPU.
//
// This header stands in for the toolkit's <cuda_runtime.h> (it comes first on the include path of a
// CPU-execution build; nvcc builds never see it). What it models, and how:
//   - Every CUDA thread is a fiber; the fibers of one block share one host thread (so `__shared__`
//     is `static thread_local`: one copy per block in flight), run in a shuffled order between
//     synchronisation points, and meet at real barriers (__syncthreads, __syncwarp and the warp
//     intrinsics, which exchange values between the lanes of a warp). Blocks run in a shuffled
//     order on several host threads at once.
//   - Streams keep CUDA's order, and the host runs ahead of the "device" (a thread per process
//     that runs the streams' work); events, the last-error state (per host thread, not-ready
//     answers included) and sticky device faults work as in the CUDA runtime.
//   - Device memory is host memory. cudaMalloc'ed memory lives in a memfd, so that
//     cudaIpcGetMemHandle / cudaIpcOpenMemHandle map it into other processes (a process cannot
//     open its own handle, as with CUDA); host-mapped memory is plain host memory.
//   - Atomics are relaxed and fences are full fences (std::atomic's), as CUDA's are.
// What it cannot model: the GPU's memory model and caches, its speed, the driver's IPC and CUDA
// graph capture. Device-specific instructions of the kernels (flags, timers, vector accesses) sit
// behind named functions in csrc/cuda/device.cuh, with one CUDA and one CPU definition each.
#pragma once

#include <math.h>  // ::isfinite and friends, as device code sees them

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <tuple>
#include <type_traits>
#include <utility>

#define EPLIB_CUDA_CPU_EXECUTION 1

// ---------------------------------------------------------------------------------------------
// Language
// ---------------------------------------------------------------------------------------------

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// One copy per host thread = per block in flight (a block's fibers share their host thread).
#define __shared__ static thread_local

struct uint3 {
  unsigned x, y, z;
};

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

struct alignas(8) int2 {
  int x, y;
};
struct alignas(16) int4 {
  int x, y, z, w;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
inline int2 make_int2(int x, int y) { return int2{x, y}; }
inline int4 make_int4(int x, int y, int z, int w) { return int4{x, y, z, w}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }

namespace eplib_cuda_cpu {

// The built-in variables of the CUDA thread running on this host thread.
struct BuiltinIds {
  uint3 thread_idx;
  uint3 block_idx;
  dim3 block_dim;
  dim3 grid_dim;
};
extern thread_local const BuiltinIds* current_ids;

// The fiber's exits to the executor (executor.cpp).
void sync_block();                                    // __syncthreads
uint64_t warp_exchange(int kind, unsigned mask, uint64_t value, int argument);
void yield_thread();                                  // lets the block's other fibers run (spin loops)

enum WarpOpKind : int { kWarpSync = 1, kShuffle, kShuffleUp, kShuffleDown, kShuffleXor, kMatchAny, kBallot };

template <typename T>
uint64_t to_lane_bits(T value) {
  static_assert(sizeof(T) <= sizeof(uint64_t) && std::is_trivially_copyable<T>::value, "warp values are <= 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  return bits;
}

template <typename T>
T from_lane_bits(uint64_t bits) {
  T value;
  std::memcpy(&value, &bits, sizeof(T));
  return value;
}

}  // namespace eplib_cuda_cpu

#define threadIdx (::eplib_cuda_cpu::current_ids->thread_idx)
#define blockIdx (::eplib_cuda_cpu::current_ids->block_idx)
#define blockDim (::eplib_cuda_cpu::current_ids->block_dim)
#define gridDim (::eplib_cuda_cpu::current_ids->grid_dim)
constexpr int warpSize = 32;

inline void __syncthreads() { eplib_cuda_cpu::sync_block(); }
inline void __syncwarp(unsigned mask = 0xFFFFFFFFu) {
  eplib_cuda_cpu::warp_exchange(eplib_cuda_cpu::kWarpSync, mask, 0, 0);
}

// Warp intrinsics: `width` must be 32 (what eplib uses; other widths are rejected as a fault).
template <typename T>
T __shfl_sync(unsigned mask, T value, int src_lane, int width = warpSize) {
  (void)width;
  return eplib_cuda_cpu::from_lane_bits<T>(eplib_cuda_cpu::warp_exchange(
      eplib_cuda_cpu::kShuffle, mask, eplib_cuda_cpu::to_lane_bits(value), src_lane));
}
template <typename T>
T __shfl_up_sync(unsigned mask, T value, unsigned delta, int width = warpSize) {
  (void)width;
  return eplib_cuda_cpu::from_lane_bits<T>(eplib_cuda_cpu::warp_exchange(
      eplib_cuda_cpu::kShuffleUp, mask, eplib_cuda_cpu::to_lane_bits(value), static_cast<int>(delta)));
}
template <typename T>
T __shfl_down_sync(unsigned mask, T value, unsigned delta, int width = warpSize) {
  (void)width;
  return eplib_cuda_cpu::from_lane_bits<T>(eplib_cuda_cpu::warp_exchange(
      eplib_cuda_cpu::kShuffleDown, mask, eplib_cuda_cpu::to_lane_bits(value), static_cast<int>(delta)));
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = warpSize) {
  (void)width;
  return eplib_cuda_cpu::from_lane_bits<T>(eplib_cuda_cpu::warp_exchange(
      eplib_cuda_cpu::kShuffleXor, mask, eplib_cuda_cpu::to_lane_bits(value), lane_mask));
}
template <typename T>
unsigned __match_any_sync(unsigned mask, T value) {
  return static_cast<unsigned>(eplib_cuda_cpu::warp_exchange(eplib_cuda_cpu::kMatchAny, mask,
                                                              eplib_cuda_cpu::to_lane_bits(value), 0));
}
inline unsigned __ballot_sync(unsigned mask, int predicate) {
  return static_cast<unsigned>(eplib_cuda_cpu::warp_exchange(eplib_cuda_cpu::kBallot, mask, predicate != 0, 0));
}
inline int __any_sync(unsigned mask, int predicate) { return __ballot_sync(mask, predicate) != 0; }
inline int __all_sync(unsigned mask, int predicate) { return __ballot_sync(mask, predicate) == __ballot_sync(mask, 1); }

inline int __popc(unsigned value) { return __builtin_popcount(value); }
inline int __popcll(unsigned long long value) { return __builtin_popcountll(value); }
inline int __ffs(int value) { return __builtin_ffs(value); }
inline int __ffsll(long long value) { return __builtin_ffsll(value); }
inline int __clz(int value) { return value == 0 ? 32 : __builtin_clz(static_cast<unsigned>(value)); }

template <typename T>
inline T min(T a, T b) {
  return b < a ? b : a;
}
template <typename T>
inline T max(T a, T b) {
  return a < b ? b : a;
}

// Fences are full fences; CUDA's scopes all map to the one host.
inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_system() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

// Atomics: relaxed read-modify-writes, as CUDA's (they order nothing; fences do). The types CUDA has.
#define EPLIB_CUDA_CPU_INTEGER_ATOMICS(T)                                                                  \
  inline T atomicAdd(T* address, T value) { return __atomic_fetch_add(address, value, __ATOMIC_RELAXED); } \
  inline T atomicSub(T* address, T value) { return __atomic_fetch_sub(address, value, __ATOMIC_RELAXED); } \
  inline T atomicOr(T* address, T value) { return __atomic_fetch_or(address, value, __ATOMIC_RELAXED); }   \
  inline T atomicAnd(T* address, T value) { return __atomic_fetch_and(address, value, __ATOMIC_RELAXED); } \
  inline T atomicXor(T* address, T value) { return __atomic_fetch_xor(address, value, __ATOMIC_RELAXED); } \
  inline T atomicExch(T* address, T value) { return __atomic_exchange_n(address, value, __ATOMIC_RELAXED); } \
  inline T atomicCAS(T* address, T compare, T value) {                                                     \
    __atomic_compare_exchange_n(address, &compare, value, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);      \
    return compare;                                                                                        \
  }                                                                                                        \
  inline T atomicMax(T* address, T value) {                                                                \
    T old = __atomic_load_n(address, __ATOMIC_RELAXED);                                                    \
    while (old < value &&                                                                                  \
           !__atomic_compare_exchange_n(address, &old, value, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {   \
    }                                                                                                      \
    return old;                                                                                            \
  }                                                                                                        \
  inline T atomicMin(T* address, T value) {                                                                \
    T old = __atomic_load_n(address, __ATOMIC_RELAXED);                                                    \
    while (value < old &&                                                                                  \
           !__atomic_compare_exchange_n(address, &old, value, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {   \
    }                                                                                                      \
    return old;                                                                                            \
  }                                                                                                        \
  inline T atomicAdd_system(T* address, T value) { return atomicAdd(address, value); }                     \
  inline T atomicOr_system(T* address, T value) { return atomicOr(address, value); }
EPLIB_CUDA_CPU_INTEGER_ATOMICS(int)
EPLIB_CUDA_CPU_INTEGER_ATOMICS(unsigned int)
EPLIB_CUDA_CPU_INTEGER_ATOMICS(unsigned long long int)
#undef EPLIB_CUDA_CPU_INTEGER_ATOMICS

// ---------------------------------------------------------------------------------------------
// Runtime API (the subset eplib calls); definitions in runtime.cpp
// ---------------------------------------------------------------------------------------------

// The codes of CUDA's cudaError_t that the CPU execution returns (same values as the toolkit's).
enum cudaError : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInitializationError = 3,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDevicePointer = 17,
  cudaErrorInsufficientDriver = 35,
  cudaErrorNoDevice = 100,
  cudaErrorInvalidDevice = 101,
  cudaErrorInvalidContext = 201,
  cudaErrorMapBufferObjectFailed = 205,
  cudaErrorInvalidResourceHandle = 400,
  cudaErrorNotReady = 600,
  cudaErrorIllegalAddress = 700,
  cudaErrorIllegalInstruction = 715,
  cudaErrorMisalignedAddress = 716,
  cudaErrorLaunchFailure = 719,
  cudaErrorCooperativeLaunchTooLarge = 720,
};
typedef cudaError cudaError_t;

struct CUstream_st;
typedef CUstream_st* cudaStream_t;
struct CUevent_st;
typedef CUevent_st* cudaEvent_t;

struct cudaIpcMemHandle_t {
  char reserved[64];
};

struct cudaFuncAttributes {
  int maxThreadsPerBlock;
  size_t sharedSizeBytes;
  int numRegs;
};

constexpr unsigned cudaHostAllocDefault = 0x00;
constexpr unsigned cudaHostAllocMapped = 0x02;
constexpr unsigned cudaIpcMemLazyEnablePeerAccess = 0x01;
constexpr unsigned cudaEventDefault = 0x00;
constexpr unsigned cudaEventDisableTiming = 0x02;
constexpr unsigned cudaStreamDefault = 0x00;
constexpr unsigned cudaStreamNonBlocking = 0x01;

const char* cudaGetErrorString(cudaError_t error);
const char* cudaGetErrorName(cudaError_t error);
cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();

cudaError_t cudaGetDeviceCount(int* count);
cudaError_t cudaGetDevice(int* device);
cudaError_t cudaSetDevice(int device);
cudaError_t cudaDeviceSynchronize();
cudaError_t cudaRuntimeGetVersion(int* version);
cudaError_t cudaDriverGetVersion(int* version);
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attributes, const void* function);
template <typename Function>
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attributes, Function* function) {
  return cudaFuncGetAttributes(attributes, reinterpret_cast<const void*>(function));
}

cudaError_t cudaMalloc(void** pointer, size_t bytes);
template <typename T>
cudaError_t cudaMalloc(T** pointer, size_t bytes) {
  return cudaMalloc(reinterpret_cast<void**>(pointer), bytes);
}
cudaError_t cudaFree(void* pointer);
enum cudaMemcpyKind : int {
  cudaMemcpyHostToHost = 0,
  cudaMemcpyHostToDevice = 1,
  cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3,
  cudaMemcpyDefault = 4,
};
cudaError_t cudaMemcpy(void* destination, const void* source, size_t bytes, cudaMemcpyKind kind);
cudaError_t cudaMemcpyAsync(void* destination, const void* source, size_t bytes, cudaMemcpyKind kind,
                            cudaStream_t stream = nullptr);
cudaError_t cudaMemset(void* pointer, int value, size_t bytes);
cudaError_t cudaMemsetAsync(void* pointer, int value, size_t bytes, cudaStream_t stream = nullptr);
cudaError_t cudaHostAlloc(void** pointer, size_t bytes, unsigned flags);
cudaError_t cudaFreeHost(void* pointer);
cudaError_t cudaHostGetDevicePointer(void** device_pointer, void* host_pointer, unsigned flags);

cudaError_t cudaStreamCreateWithFlags(cudaStream_t* stream, unsigned flags);
cudaError_t cudaStreamDestroy(cudaStream_t stream);
cudaError_t cudaStreamSynchronize(cudaStream_t stream);
cudaError_t cudaStreamQuery(cudaStream_t stream);
cudaError_t cudaStreamWaitEvent(cudaStream_t stream, cudaEvent_t event, unsigned flags = 0);

cudaError_t cudaEventCreateWithFlags(cudaEvent_t* event, unsigned flags);
cudaError_t cudaEventDestroy(cudaEvent_t event);
cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t stream = nullptr);
cudaError_t cudaEventQuery(cudaEvent_t event);
cudaError_t cudaEventSynchronize(cudaEvent_t event);

cudaError_t cudaIpcGetMemHandle(cudaIpcMemHandle_t* handle, void* pointer);
cudaError_t cudaIpcOpenMemHandle(void** pointer, cudaIpcMemHandle_t handle, unsigned flags);
cudaError_t cudaIpcCloseMemHandle(void* pointer);

// ---------------------------------------------------------------------------------------------
// Kernel launch (what nvcc makes of kernel<<<grid, block, shared_bytes, stream>>>(args...))
// ---------------------------------------------------------------------------------------------

namespace eplib_cuda_cpu {

struct LaunchConfig {
  dim3 grid;
  dim3 block;
  size_t shared_bytes;
  cudaStream_t stream;
  bool cooperative;  // every block runs at once (cudaLaunchAttributeCooperative)
};

// A kernel body with its arguments bound: run once by every CUDA thread of the grid.
class KernelBody {
 public:
  virtual ~KernelBody() = default;
  virtual void run() = 0;
};

// Checks the configuration (the last error and the return value say why not) and enqueues the
// kernel on config.stream; `name` is the __global__ function's name (launch statistics, faults).
cudaError_t launch(const char* name, const void* function, const LaunchConfig& config,
                   std::shared_ptr<KernelBody> body);

template <typename... Params>
class BoundKernel final : public KernelBody {
 public:
  template <typename... Args>
  BoundKernel(void (*kernel)(Params...), Args&&... args) : kernel_(kernel), params_(std::forward<Args>(args)...) {}
  void run() override { std::apply(kernel_, params_); }

 private:
  void (*kernel_)(Params...);
  std::tuple<std::decay_t<Params>...> params_;  // copied at launch, as CUDA copies kernel parameters
};

template <typename... Params, typename... Args>
cudaError_t launch_kernel(const char* name, void (*kernel)(Params...), const LaunchConfig& config, Args&&... args) {
  return launch(name, reinterpret_cast<const void*>(kernel), config,
                std::make_shared<BoundKernel<Params...>>(kernel, std::forward<Args>(args)...));
}

// Device-memory base of the shared dynamic shared memory of the running block (16-byte aligned).
void* dynamic_shared_memory();

// Nanoseconds of a monotonic clock (%globaltimer); lets the block's other fibers run first, since
// it is read in spin loops.
uint64_t globaltimer_ns();

// Records a device fault for the running kernel: the kernel's later work may run, but the device
// is then broken for good (a sticky error), as after a fault on a GPU.
void device_fault(cudaError_t code, const char* what, const void* address);

}  // namespace eplib_cuda_cpu
