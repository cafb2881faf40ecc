#include <cuda_runtime.h>

#include "common.cuh"
#include "runtime.h"

namespace eplib::cuda {

int device_count() {
  int count = 0;
  // Without a driver or device the runtime answers with an error code instead of a count.
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky error in our (static) runtime instance
    return 0;
  }
  return count;
}

int runtime_version() {
  int version = 0;
  cudaRuntimeGetVersion(&version);
  return version;
}

void set_device(int device) { check_cuda(cudaSetDevice(device), "cudaSetDevice"); }

}  // namespace eplib::cuda
