#include "runtime.h"

#include <cuda_runtime.h>

#include "common.cuh"

namespace eplib::cuda {

DeviceStatus device_status() {
  DeviceStatus status{0, "", 0, 0};
  cudaDriverGetVersion(&status.driver_version);
  cudaRuntimeGetVersion(&status.runtime_version);
  const cudaError_t error = cudaGetDeviceCount(&status.device_count);
  if (error != cudaSuccess) {
    (void)cudaGetLastError();  // reported here; no later launch inherits it
    status.device_count = 0;
    status.error = std::string(cudaGetErrorName(error)) + ": " + cudaGetErrorString(error);
  }
  return status;
}

int device_count() { return device_status().device_count; }

int current_device() {
  int device = -1;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  return device;
}

DeviceGuard::DeviceGuard(int device) : device_(device) {
  previous_ = current_device();
  // cudaSetDevice also makes that device's primary context current for the thread: only switch when
  // eplib's runtime is on another device.
  if (previous_ != device) check_cuda(cudaSetDevice(device), "cudaSetDevice");
}

DeviceGuard::~DeviceGuard() {
  if (previous_ != device_ && previous_ >= 0 && cudaSetDevice(previous_) != cudaSuccess) (void)cudaGetLastError();
}

}  // namespace eplib::cuda
