// What the CUDA runtime linked into fastst._C sees on this machine: the driver's and the runtime's
// CUDA versions and the device count, without throwing (fastst/ops/_cuda_probe.py decides from it
// whether the cuda backend can run; docs/design.md §1.3). No CUDA header: module.cpp includes it.
#pragma once
#include <string>

namespace fastst {
struct CudaProbe {
  bool ok;             // cudaGetDeviceCount succeeded
  int driver_version;  // cudaDriverGetVersion: the newest CUDA the driver supports (12020 = 12.2); 0 without one
  int runtime_version; // cudaRuntimeGetVersion: the runtime fastst._C was built with (13000 = 13.0)
  int device_count;    // 0 when !ok
  std::string error;   // "" when ok, else the CUDA error's name and text
};

CudaProbe probe_cuda();
int cuda_built_runtime_version();  // CUDART_VERSION of the toolkit that built fastst._C
}  // namespace fastst
