// Launchers of selftest.cu: kernels that test the CPU execution itself (what it computes for the warp
// intrinsics, that shared memory is per block, and the faults and errors it reports).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace eplib_cuda_cpu::selftest {

void warp_intrinsics(int64_t* out, int threads, cudaStream_t stream);                  // out: int64 [threads, 6]
void shared_memory(int32_t* out, int blocks, int threads, bool with_barrier, cudaStream_t stream);  // [blocks, threads]
void misaligned(uint8_t* buffer, cudaStream_t stream);  // buffer: 16-byte aligned, >= 48 bytes
void divergent_barrier(cudaStream_t stream);
void busy(uint64_t nanoseconds, int32_t* counter, int threads, cudaStream_t stream);
// What cudaIpcOpenMemHandle answers for this process's own handle (a cudaError_t code).
int open_own_ipc_handle();

}  // namespace eplib_cuda_cpu::selftest
