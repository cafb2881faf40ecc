// The device-specific operations of the CUDA kernels, each with its CUDA definition and its
// definition for the CPU execution of the CUDA sources (EPLIB_CUDA_CPU=1, csrc/cuda_cpu) side by
// side: flags between ranks (system-scope release/acquire), the timer, accesses to memory that
// another thread, block or process writes concurrently, vector accesses, and dynamic shared memory.
// Kernel bodies call these and are the same in both builds.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace eplib::cuda {

#if defined(__CUDACC__)

// Nanoseconds of the GPU's global timer: spin-loop budgets that do not depend on the SM clock.
__device__ __forceinline__ uint64_t globaltimer_ns() {
  uint64_t now;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
  return now;
}

// Flags cross GPUs and processes: system scope (GPU_NOTES "Memory ordering"). The store publishes
// everything this thread (and, through a block barrier before it, its block) wrote earlier to
// whoever acquires the flag.
template <typename T>
__device__ __forceinline__ void store_release_sys(T* address, T value) {
  static_assert(std::is_integral<T>::value && (sizeof(T) == 4 || sizeof(T) == 8), "32- or 64-bit flags");
  if constexpr (sizeof(T) == 8)
    asm volatile("st.release.sys.global.b64 [%0], %1;" ::"l"(address), "l"(static_cast<uint64_t>(value)) : "memory");
  else
    asm volatile("st.release.sys.global.b32 [%0], %1;" ::"l"(address), "r"(static_cast<uint32_t>(value)) : "memory");
}

template <typename T>
__device__ __forceinline__ T load_acquire_sys(const T* address) {
  static_assert(std::is_integral<T>::value && (sizeof(T) == 4 || sizeof(T) == 8), "32- or 64-bit flags");
  if constexpr (sizeof(T) == 8) {
    uint64_t value;
    asm volatile("ld.acquire.sys.global.b64 %0, [%1];" : "=l"(value) : "l"(address) : "memory");
    return static_cast<T>(value);
  } else {
    uint32_t value;
    asm volatile("ld.acquire.sys.global.b32 %0, [%1];" : "=r"(value) : "l"(address) : "memory");
    return static_cast<T>(value);
  }
}

// Relaxed accesses to memory that other threads, blocks or processes write or read at the same time
// (never a non-coherent load: GPU_NOTES).
template <typename T>
__device__ __forceinline__ T load_volatile(const T* address) {
  return *const_cast<const volatile T*>(address);
}

template <typename T>
__device__ __forceinline__ void store_volatile(T* address, T value) {
  *const_cast<volatile T*>(address) = value;
}

// Vector accesses (int4, ElementVector): the address must be aligned to the vector's size, or the
// GPU faults (cudaErrorMisalignedAddress).
template <typename V>
__device__ __forceinline__ V vector_load(const V* address) {
  return *address;
}

template <typename V>
__device__ __forceinline__ void vector_store(V* address, const V& value) {
  *address = value;
}

// The block's dynamic shared memory (the launch's shared_bytes), 16-byte aligned.
template <typename T>
__device__ __forceinline__ T* dynamic_shared_memory() {
  extern __shared__ __align__(16) unsigned char eplib_dynamic_shared[];
  return reinterpret_cast<T*>(eplib_dynamic_shared);
}

#else  // the CPU execution: csrc/cuda_cpu

// Also lets the block's other fibers run: every spin loop reads the timer.
inline uint64_t globaltimer_ns() { return eplib_cuda_cpu::globaltimer_ns(); }

template <typename T>
inline void store_release_sys(T* address, T value) {
  static_assert(std::is_integral<T>::value && (sizeof(T) == 4 || sizeof(T) == 8), "32- or 64-bit flags");
  __atomic_store_n(address, value, __ATOMIC_RELEASE);
}

template <typename T>
inline T load_acquire_sys(const T* address) {
  static_assert(std::is_integral<T>::value && (sizeof(T) == 4 || sizeof(T) == 8), "32- or 64-bit flags");
  return __atomic_load_n(address, __ATOMIC_ACQUIRE);
}

template <typename T>
inline T load_volatile(const T* address) {
  return __atomic_load_n(address, __ATOMIC_RELAXED);
}

template <typename T>
inline void store_volatile(T* address, T value) {
  __atomic_store_n(address, value, __ATOMIC_RELAXED);
}

// A misaligned vector access is a device fault here too (the host would not notice otherwise).
template <typename V>
inline void check_vector_alignment(const V* address) {
  if (reinterpret_cast<uintptr_t>(address) % alignof(V) != 0)
    eplib_cuda_cpu::device_fault(cudaErrorMisalignedAddress, "a misaligned vector access", address);
}

// memcpy: after the fault is recorded, a misaligned access must not crash the host (an aligned SSE
// move would).
template <typename V>
inline V vector_load(const V* address) {
  check_vector_alignment(address);
  V value;
  std::memcpy(&value, address, sizeof(V));
  return value;
}

template <typename V>
inline void vector_store(V* address, const V& value) {
  check_vector_alignment(address);
  std::memcpy(address, &value, sizeof(V));
}

template <typename T>
inline T* dynamic_shared_memory() {
  return static_cast<T*>(eplib_cuda_cpu::dynamic_shared_memory());
}

#endif

}  // namespace eplib::cuda
