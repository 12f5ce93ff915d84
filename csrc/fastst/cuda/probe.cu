// See probe.h. Creates no context (cudaGetDeviceCount only initialises the driver) and leaves no
// sticky error behind.
#include <cuda_runtime.h>

#include "probe.h"

namespace fastst {

CudaProbe probe_cuda() {
  CudaProbe result{false, 0, 0, 0, ""};
  if (cudaDriverGetVersion(&result.driver_version) != cudaSuccess) result.driver_version = 0;
  if (cudaRuntimeGetVersion(&result.runtime_version) != cudaSuccess) result.runtime_version = CUDART_VERSION;
  int count = 0;
  const cudaError_t status = cudaGetDeviceCount(&count);
  if (status == cudaSuccess) {
    result.ok = true;
    result.device_count = count;
  } else {
    result.error = std::string(cudaGetErrorName(status)) + ": " + cudaGetErrorString(status);
    (void)cudaGetLastError();  // clear it: the next CUDA call must not report this one
  }
  return result;
}

int cuda_built_runtime_version() { return CUDART_VERSION; }

}  // namespace fastst
