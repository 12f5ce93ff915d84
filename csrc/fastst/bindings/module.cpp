// pybind11 module fastst._C: launchers that take raw pointers (ints), sizes, dtype codes and, for
// CUDA, a device index and a stream handle. No torch header: one binary serves every torch.
// Python side: fastst/ops/. Each op family registers its launchers in bindings/<family>.cpp.
#include "decode.h"

PYBIND11_MODULE(_C, mod) {
  mod.doc() = "fastst kernels (C++/OpenMP always, CUDA when built with nvcc)";
#if defined(FASTST_WITH_CUDA)
  mod.attr("has_cuda") = true;
#else
  mod.attr("has_cuda") = false;
#endif
  fastst::bindings::register_stats(mod);
  fastst::bindings::register_ias(mod);
  fastst::bindings::register_region_loss(mod);
  fastst::bindings::register_st_loss(mod);
  fastst::bindings::register_cbst(mod);
  fastst::bindings::register_tpld(mod);
}
