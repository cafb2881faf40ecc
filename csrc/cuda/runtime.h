// Host-side queries of the CUDA runtime (linked statically, so they work without a driver).
#pragma once

namespace eplib::cuda {

// Number of visible CUDA devices; 0 when there is no driver or no device.
int device_count();

// Version of the CUDA runtime eplib was built with (e.g. 13000), for diagnostics.
int runtime_version();

}  // namespace eplib::cuda
