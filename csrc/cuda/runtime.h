// Host-side queries of the CUDA runtime (linked statically, so they work without a driver).
#pragma once

namespace eplib::cuda {

// Number of visible CUDA devices; 0 when there is no driver or no device.
int device_count();

// Version of the CUDA runtime eplib was built with (e.g. 13000), for diagnostics.
int runtime_version();

// Makes `device` current in eplib's own (static) runtime instance, whose launches then use that
// device's primary context: the one torch uses for it. Throws std::runtime_error on failure.
void set_device(int device);

}  // namespace eplib::cuda
