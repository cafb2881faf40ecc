// Host-side queries of the CUDA runtime (linked statically, so they work without a driver) and the
// device guard every CUDA entry point of eplib runs under.
#pragma once

#include <string>

namespace eplib::cuda {

// What eplib's own runtime sees: the number of devices, or the error that the count query returned
// (a driver older than the runtime, no driver, ...), with the driver and runtime versions.
struct DeviceStatus {
  int device_count;  // 0 when the query failed
  std::string error;  // empty when the query succeeded
  int driver_version;
  int runtime_version;
};
DeviceStatus device_status();

int device_count();  // device_status().device_count

// Makes `device` current in eplib's own (static) runtime for a scope, whose launches then use that
// device's primary context (the one torch uses for it), and restores the previous device at the end:
// the driver's current context is torch's too, which must not change under torch's feet.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device);
  ~DeviceGuard();
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = -1;
  int device_;
};

int current_device();  // eplib's runtime's current device (tests of DeviceGuard)

}  // namespace eplib::cuda
