// Device helpers shared by the CUDA kernels: the launch, the dtype switch, the error flag, warp-wide
// row copies and a block-wide scan.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>

#include "device.cuh"
#include "eplib/dtype.h"
#include "eplib/errors.h"

namespace eplib::cuda {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xFFFFFFFFu;

// cudart is linked statically, so its error state is ours alone: read it through our runtime, right
// after the call that may have failed, and turn it into an exception (RuntimeError in Python). The
// error is reported once: the last-error state is cleared, so that no later launch is blamed for it.
inline void check_cuda(cudaError_t error, const char* what) {
  if (error == cudaSuccess) return;
  (void)cudaGetLastError();
  throw std::runtime_error(std::string("eplib: ") + what + " failed: " + cudaGetErrorString(error));
}

// Grid size for a grid-stride loop over `items` work items of `items_per_block` each: enough blocks to
// fill the device several times over, never zero.
inline unsigned grid_for(int64_t items, int64_t items_per_block) {
  constexpr int64_t kMaxBlocks = 8192;
  const int64_t blocks = (items + items_per_block - 1) / items_per_block;
  return static_cast<unsigned>(blocks < 1 ? 1 : (blocks > kMaxBlocks ? kMaxBlocks : blocks));
}

// Block count and size of a kernel that gives each of `items` work items to one warp. max_blocks == 0:
// 256-thread blocks, as many as grid_for allows. max_blocks > 0 (the ipc transport's Config.num_sms,
// which bounds the SMs it occupies): at most that many blocks of 512 threads.
struct LaunchShape {
  unsigned blocks;
  unsigned threads;
  // Every block resident at once (a cooperative launch): for kernels whose blocks wait for each other.
  bool cooperative = false;
};

// The largest block warp_launch_shape makes: the row kernels declare it in __launch_bounds__, which
// keeps their registers within what a block that size may use.
constexpr int kMaxThreadsPerBlock = 512;

inline LaunchShape warp_launch_shape(int64_t items, int max_blocks) {
  constexpr unsigned kDefaultThreads = 256, kBoundedThreads = kMaxThreadsPerBlock;
  if (max_blocks <= 0) return {grid_for(items, kDefaultThreads / kWarpSize), kDefaultThreads};
  const unsigned blocks = grid_for(items, kBoundedThreads / kWarpSize);
  return {blocks < static_cast<unsigned>(max_blocks) ? blocks : static_cast<unsigned>(max_blocks), kBoundedThreads};
}

// Launches kernel<<<shape.blocks, shape.threads, shared_bytes, stream>>>(args...) (the CPU execution runs
// the same kernel through its executor) and throws when the launch fails. `name` is the __global__
// function's. An error an earlier call left in the per-thread last-error state, such as the
// cudaErrorNotReady of an event query, was that call's to report: it is cleared first, so that it is
// not blamed on this launch (a sticky device fault is not cleared by this and still fails it).
template <typename... Params, typename... Args>
void launch(const char* name, void (*kernel)(Params...), LaunchShape shape, size_t shared_bytes, cudaStream_t stream,
            Args&&... args) {
  (void)cudaGetLastError();
#if defined(__CUDACC__)
  if (shape.cooperative) {
    // The driver refuses a grid that cannot be resident at once (cudaErrorCooperativeLaunchTooLarge).
    cudaLaunchAttribute attribute{};
    attribute.id = cudaLaunchAttributeCooperative;
    attribute.val.cooperative = 1;
    cudaLaunchConfig_t config{};
    config.gridDim = dim3(shape.blocks);
    config.blockDim = dim3(shape.threads);
    config.dynamicSmemBytes = shared_bytes;
    config.stream = stream;
    config.attrs = &attribute;
    config.numAttrs = 1;
    check_cuda(cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...), name);
    return;
  }
  kernel<<<shape.blocks, shape.threads, shared_bytes, stream>>>(std::forward<Args>(args)...);
#else
  eplib_cuda_cpu::launch_kernel(name, kernel,
                                {dim3(shape.blocks), dim3(shape.threads), shared_bytes, stream, shape.cooperative},
                                std::forward<Args>(args)...);
#endif
  check_cuda(cudaGetLastError(), name);
}

// Loads kernels now (cudaFuncGetAttributes) rather than at their first launch (see kernels.h).
template <typename... Kernels>
void preload(Kernels... kernels) {
  cudaFuncAttributes attributes;
  (check_cuda(cudaFuncGetAttributes(&attributes, kernels), "cudaFuncGetAttributes (preload)"), ...);
}

// The one place where a runtime dtype code becomes an element type for the CUDA kernels.
template <typename Body>
void visit_cuda_dtype(DType dtype, const Body& body) {
  switch (dtype) {
    case DType::kFloat32: return body(float{});
    case DType::kBFloat16: return body(bf16_t{});
    default: break;
  }
  throw std::invalid_argument("eplib: the CUDA kernels take float32 or bfloat16 rows, got dtype code " +
                              std::to_string(static_cast<int>(dtype)));
}

// True when every address and byte stride given is a multiple of 16 (null counts as aligned): rows
// of elements can then move as 16-byte vectors; otherwise kernels take their one-element path.
inline bool all_16_byte_aligned(std::initializer_list<uint64_t> values) {
  for (const uint64_t value : values)
    if (value % 16 != 0) return false;
  return true;
}

// Runs body(std::integral_constant<int, N>{}) with N = the elements of T in 16 bytes when `aligned`,
// else N = 1: the vector width of a row kernel, chosen once per launch.
template <typename T, typename Body>
void visit_vector_width(bool aligned, const Body& body) {
  if (aligned) return body(std::integral_constant<int, static_cast<int>(16 / sizeof(T))>{});
  return body(std::integral_constant<int, 1>{});
}

// N elements of T moved as one access (16 bytes when N * sizeof(T) == 16).
template <typename T, int N>
struct alignas(sizeof(T) * N) ElementVector {
  T values[N];
};

__device__ __forceinline__ void set_error(int32_t* error_flag, int32_t bit) {
  if (error_flag != nullptr) atomicOr(error_flag, bit);
}

__device__ __forceinline__ int lane_id() { return static_cast<int>(threadIdx.x % kWarpSize); }

__device__ __forceinline__ int64_t global_warp_id() {
  return (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarpSize;
}

__device__ __forceinline__ int64_t num_global_warps() {
  return static_cast<int64_t>(gridDim.x) * blockDim.x / kWarpSize;
}

// num_vectors items of type Vector from src to dst, spread over the lanes of a warp. Unrolled so a lane
// keeps several loads in flight.
template <typename Vector>
__device__ __forceinline__ void warp_copy_vectors(uint8_t* dst, const uint8_t* src, int64_t num_vectors, int lane) {
  auto* dst_vectors = reinterpret_cast<Vector*>(dst);
  const auto* src_vectors = reinterpret_cast<const Vector*>(src);
#pragma unroll 4
  for (int64_t i = lane; i < num_vectors; i += kWarpSize) vector_store(dst_vectors + i, vector_load(src_vectors + i));
}

// Copies `bytes` bytes with the whole warp: the widest of 16/8/4-byte accesses that both pointers'
// alignment allows, then the remaining tail byte by byte.
__device__ __forceinline__ void warp_copy(uint8_t* dst, const uint8_t* src, int64_t bytes, int lane) {
  const uintptr_t alignment = reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src);
  int64_t copied = 0;
  if (alignment % 16 == 0) {
    warp_copy_vectors<int4>(dst, src, bytes / 16, lane);
    copied = bytes / 16 * 16;
  } else if (alignment % 8 == 0) {
    warp_copy_vectors<int2>(dst, src, bytes / 8, lane);
    copied = bytes / 8 * 8;
  } else if (alignment % 4 == 0) {
    warp_copy_vectors<int32_t>(dst, src, bytes / 4, lane);
    copied = bytes / 4 * 4;
  }
  for (int64_t i = copied + lane; i < bytes; i += kWarpSize) dst[i] = src[i];
}

// Fills `bytes` bytes with `value` using the whole warp (zero bytes are +0.0 in every float type,
// 0xFF bytes NaN).
__device__ __forceinline__ void warp_fill(uint8_t* dst, uint8_t value, int64_t bytes, int lane) {
  int64_t filled = 0;
  if (reinterpret_cast<uintptr_t>(dst) % 16 == 0) {
    const int word = static_cast<int>(value * 0x01010101u);
    const int4 pattern = make_int4(word, word, word, word);
    auto* vectors = reinterpret_cast<int4*>(dst);
    for (int64_t i = lane; i < bytes / 16; i += kWarpSize) vector_store(vectors + i, pattern);
    filled = bytes / 16 * 16;
  }
  for (int64_t i = filled + lane; i < bytes; i += kWarpSize) dst[i] = value;
}

// Block-wide exclusive prefix sum of one value per thread; also returns the block's total. Needs
// kWarpSize int64 of shared memory and every thread of the block; reusable back to back.
__device__ __forceinline__ int64_t block_exclusive_sum(int64_t value, int64_t* warp_totals, int64_t* total) {
  const int lane = lane_id();
  const int warp = static_cast<int>(threadIdx.x / kWarpSize);
  const int num_warps = static_cast<int>((blockDim.x + kWarpSize - 1) / kWarpSize);
  int64_t inclusive = value;
#pragma unroll
  for (int offset = 1; offset < kWarpSize; offset *= 2) {
    const int64_t other = __shfl_up_sync(kFullMask, inclusive, offset);
    if (lane >= offset) inclusive += other;
  }
  __syncthreads();  // an earlier call may still be reading warp_totals
  if (lane == kWarpSize - 1) warp_totals[warp] = inclusive;
  __syncthreads();
  if (warp == 0) {
    int64_t warp_sum = lane < num_warps ? warp_totals[lane] : 0;
#pragma unroll
    for (int offset = 1; offset < kWarpSize; offset *= 2) {
      const int64_t other = __shfl_up_sync(kFullMask, warp_sum, offset);
      if (lane >= offset) warp_sum += other;
    }
    warp_totals[lane] = warp_sum;  // inclusive over warps
  }
  __syncthreads();
  *total = warp_totals[num_warps - 1];
  return (warp > 0 ? warp_totals[warp - 1] : 0) + inclusive - value;
}

}  // namespace eplib::cuda
