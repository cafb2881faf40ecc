// Portability macros shared by the CPU (g++) and CUDA (nvcc) builds.
#pragma once

#if defined(__CUDACC__)
#define EPLIB_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define EPLIB_HOST_DEVICE inline
#endif
