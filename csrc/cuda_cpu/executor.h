// Internals of the CPU execution shared by executor.cpp (running kernels) and runtime.cpp
// (streams, memory, errors). See include/cuda_runtime.h for what is modelled.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>

namespace eplib_cuda_cpu {

// A launch that passed its checks: what the device thread runs.
struct KernelLaunch {
  std::string name;
  dim3 grid;
  dim3 block;
  size_t shared_bytes;
  bool cooperative;
  std::shared_ptr<KernelBody> body;
};

// Dynamic shared memory a block may use without opting in (as on every sm_80+ device).
constexpr size_t kMaxDynamicSharedBytes = 48 * 1024;
constexpr unsigned kMaxThreadsPerBlock = 1024;
// Blocks of a cooperative launch (all co-resident, one host thread each); more is
// cudaErrorCooperativeLaunchTooLarge, as on a GPU whose SMs cannot hold the grid at once.
constexpr unsigned kMaxCooperativeBlocks = 64;

// Runs every block of `launch` (shuffled, on this thread and the block workers; a cooperative launch
// runs all of them at once, one host thread each) and returns when all have finished or the device
// has faulted.
void run_kernel(const KernelLaunch& launch);

// First fault of the process wins; later calls add nothing. Thread-safe (runtime.cpp).
void record_fault(cudaError_t code, const std::string& message);
bool device_faulted();

// The seed of every shuffle of this process (EPLIB_CUDA_CPU_SEED, else drawn at start): a failing
// schedule can be replayed by setting it.
uint64_t schedule_seed();

// Host threads that run the blocks of one kernel at once (EPLIB_CUDA_CPU_BLOCK_WORKERS, default 2).
int block_workers();

// Test hook: the blocks [first_block, end_block) of kernel `name` sleep `seconds` whenever one of their
// barriers or warp intrinsics completes, with probability `probability` (a slow or preempted SM:
// senders or receivers that fall behind). seconds <= 0 removes the stall.
void set_stall(const std::string& name, double seconds, double probability, unsigned first_block, unsigned end_block);

// What the runtime counted, for tests: launches per __global__ function and launches that had to wait
// for the device to go idle because their kernel was not loaded yet (lazy loading).
struct Statistics {
  std::map<std::string, uint64_t> launches;
  std::map<std::string, uint64_t> lazy_load_waits;
  uint64_t seed = 0;
};
Statistics statistics();

}  // namespace eplib_cuda_cpu
