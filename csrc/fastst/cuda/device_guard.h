// A scoped CUDA device switch for the launchers: switches to the input's device only when it is
// not current already, and switches back when the scope ends on every path (exceptions too).
// The Python side calls the launchers under torch.cuda.device(input device), so no switch
// happens there; the guard keeps direct callers correct. Errors name the launcher.
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace fastst {

inline void check_cuda(cudaError_t err, const char* launcher, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("fastst ") + launcher + ": " + what + ": " +
                             cudaGetErrorString(err));
  }
}

class DeviceGuard {
 public:
  DeviceGuard(int device, const char* launcher) {
    check_cuda(cudaGetDevice(&previous_), launcher, "cudaGetDevice");
    if (previous_ != device) {
      check_cuda(cudaSetDevice(device), launcher, "cudaSetDevice");
      switched_ = true;
    }
  }
  ~DeviceGuard() {
    if (switched_) cudaSetDevice(previous_);  // no throw from a destructor; nothing to undo
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
  bool switched_ = false;
};

}  // namespace fastst
