// pybind11 module fastst._C: launchers that take raw pointers (ints), sizes, dtype codes and, for
// CUDA, a device index and a stream handle. No torch header: one binary serves every torch.
// Python side: fastst/ops/. Each op family registers its launchers in bindings/<family>.cpp.
// Also the build's facts (has_cuda, cuda_runtime_version, cuda_archs) and the driver probe
// _cuda_probe, which fastst/ops/_cuda_probe.py reads (docs/design.md §1.3).
#include <algorithm>
#include <string>
#include <tuple>

#include "decode.h"
#if defined(FASTST_WITH_CUDA)
#include "../cuda/probe.h"
#endif

#ifndef FASTST_CUDA_ARCHS
#define FASTST_CUDA_ARCHS ""
#endif

namespace {
using ProbeTuple = std::tuple<bool, int, int, int, std::string>;

ProbeTuple cuda_probe() {
#if defined(FASTST_WITH_CUDA)
  const fastst::CudaProbe p = fastst::probe_cuda();
  return {p.ok, p.driver_version, p.runtime_version, p.device_count, p.error};
#else
  return {false, 0, 0, 0, "fastst._C was built without CUDA"};
#endif
}

// CMAKE_CUDA_ARCHITECTURES, passed comma-separated as FASTST_CUDA_ARCHS.
pybind11::list cuda_archs() {
  pybind11::list archs;
  std::string all = FASTST_CUDA_ARCHS;
  size_t start = 0;
  while (start < all.size()) {
    const size_t end = std::min(all.find(',', start), all.size());
    if (end > start) archs.append(all.substr(start, end - start));
    start = end + 1;
  }
  return archs;
}
}  // namespace

PYBIND11_MODULE(_C, mod) {
  mod.doc() = "fastst kernels (C++/OpenMP always, CUDA when built with nvcc)";
#if defined(FASTST_WITH_CUDA)
  mod.attr("has_cuda") = true;
  mod.attr("cuda_runtime_version") = fastst::cuda_built_runtime_version();  // e.g. 13000 for CUDA 13.0
#else
  mod.attr("has_cuda") = false;
  mod.attr("cuda_runtime_version") = 0;
#endif
  mod.attr("cuda_archs") = cuda_archs();  // e.g. ["80-real", "90-real", "90-virtual"]; [] without CUDA
  // Underscore: not a launcher (tests/ops/test_bindings.py lists the launchers).
  mod.def("_cuda_probe", &cuda_probe,
          "_cuda_probe() -> (ok, driver_version, runtime_version, device_count, error): "
          "cudaGetDeviceCount, cudaDriverGetVersion and cudaRuntimeGetVersion as the CUDA runtime "
          "linked into this module sees them; never raises. Without CUDA: (False, 0, 0, 0, reason).");
  fastst::bindings::register_stats(mod);
  fastst::bindings::register_ias(mod);
  fastst::bindings::register_region_loss(mod);
  fastst::bindings::register_st_loss(mod);
  fastst::bindings::register_cbst(mod);
  fastst::bindings::register_tpld(mod);
}
