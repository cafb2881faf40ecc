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

void set_device(int device) {
  // cudaSetDevice also makes that device's primary context current for the thread, which torch's
  // runtime sees too: only switch when eplib's runtime is on another device.
  int current = -1;
  if (cudaGetDevice(&current) == cudaSuccess && current == device) return;
  check_cuda(cudaSetDevice(device), "cudaSetDevice");
}

}  // namespace eplib::cuda
