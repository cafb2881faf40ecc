// Kernels that exercise the CPU execution itself (tests/test_cuda_cpu_runtime.py): the warp
// intrinsics, per-block shared memory, the faults it must report (a misaligned vector access, a
// barrier not every thread reaches), and a kernel that runs for a while (streams, events). Written
// in CUDA like csrc/cuda, built only into the CPU execution.
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "cuda/common.cuh"
#include "selftest.h"

namespace eplib_cuda_cpu::selftest {

namespace {

using eplib::cuda::globaltimer_ns;
using eplib::cuda::kFullMask;
using eplib::cuda::lane_id;
using eplib::cuda::LaunchShape;

// out[t][0..5] of thread t = its answers of __shfl_sync (lane 3), __shfl_up_sync (1),
// __shfl_down_sync (2), __shfl_xor_sync (5), __match_any_sync (value lane % 3), __ballot_sync
// (lane even); each lane contributes 100 * warp + lane.
__global__ void warp_intrinsics_kernel(int64_t* out) {
  const int lane = lane_id();
  const int64_t value = 100 * static_cast<int64_t>(threadIdx.x / 32) + lane;
  int64_t* mine = out + threadIdx.x * 6;
  mine[0] = __shfl_sync(kFullMask, value, 3);
  mine[1] = __shfl_up_sync(kFullMask, value, 1);
  mine[2] = __shfl_down_sync(kFullMask, value, 2);
  mine[3] = __shfl_xor_sync(kFullMask, value, 5);
  mine[4] = __match_any_sync(kFullMask, lane % 3);
  mine[5] = __ballot_sync(kFullMask, lane % 2 == 0);
}

// Thread 0 of each block stores the block's index in shared memory, then every thread reads it:
// after a barrier (with_barrier) or without one (a data race: threads that run first read whatever
// the block before left there). out[block][thread] = what it read.
__global__ void shared_memory_kernel(int32_t* out, bool with_barrier) {
  __shared__ int32_t block_value;
  if (threadIdx.x == 0) block_value = static_cast<int32_t>(blockIdx.x);
  if (with_barrier) __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = block_value;
}

// A 16-byte access at an address 4 bytes past a 16-byte boundary.
__global__ void misaligned_kernel(uint8_t* buffer) {
  if (threadIdx.x != 0) return;
  const auto* vectors = reinterpret_cast<const int4*>(buffer + 4);
  eplib::cuda::vector_store(reinterpret_cast<int4*>(buffer + 32), eplib::cuda::vector_load(vectors));
}

// Lane 0 of warp 0 waits at __syncwarp while every other thread waits at __syncthreads: neither can
// complete (undefined on a GPU, where it hangs or corrupts the barrier).
__global__ void divergent_barrier_kernel() {
  if (threadIdx.x == 0) __syncwarp();
  else __syncthreads();
}

// Spins until `nanoseconds` have passed on the timer, then adds 1 to *counter (every thread).
__global__ void busy_kernel(uint64_t nanoseconds, int32_t* counter) {
  const uint64_t start = globaltimer_ns();
  while (globaltimer_ns() - start < nanoseconds) {
  }
  atomicAdd(counter, 1);
}

}  // namespace

void warp_intrinsics(int64_t* out, int threads, cudaStream_t stream) {
  eplib::cuda::launch("warp_intrinsics_kernel", warp_intrinsics_kernel, LaunchShape{1, static_cast<unsigned>(threads)},
                      0, stream, out);
}

void shared_memory(int32_t* out, int blocks, int threads, bool with_barrier, cudaStream_t stream) {
  eplib::cuda::launch("shared_memory_kernel", shared_memory_kernel,
                      LaunchShape{static_cast<unsigned>(blocks), static_cast<unsigned>(threads)}, 0, stream, out,
                      with_barrier);
}

void misaligned(uint8_t* buffer, cudaStream_t stream) {
  eplib::cuda::launch("misaligned_kernel", misaligned_kernel, LaunchShape{1, 32}, 0, stream, buffer);
}

void divergent_barrier(cudaStream_t stream) {
  eplib::cuda::launch("divergent_barrier_kernel", divergent_barrier_kernel, LaunchShape{1, 64}, 0, stream);
}

void busy(uint64_t nanoseconds, int32_t* counter, int threads, cudaStream_t stream) {
  eplib::cuda::launch("busy_kernel", busy_kernel, LaunchShape{1, static_cast<unsigned>(threads)}, 0, stream,
                      nanoseconds, counter);
}

int open_own_ipc_handle() {
  void* allocation = nullptr;
  eplib::cuda::check_cuda(cudaMalloc(&allocation, 4096), "cudaMalloc");
  cudaIpcMemHandle_t handle;
  eplib::cuda::check_cuda(cudaIpcGetMemHandle(&handle, allocation), "cudaIpcGetMemHandle");
  void* mapped = nullptr;
  const cudaError_t answer = cudaIpcOpenMemHandle(&mapped, handle, cudaIpcMemLazyEnablePeerAccess);
  (void)cudaGetLastError();
  cudaFree(allocation);
  return static_cast<int>(answer);
}

}  // namespace eplib_cuda_cpu::selftest
