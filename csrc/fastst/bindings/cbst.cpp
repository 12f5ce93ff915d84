// Launchers of the CBST class-balanced thresholds (cpu/cbst.h).
#include "../cpu/cbst.h"
#include "decode.h"

namespace fastst::bindings {

void register_cbst(py::module_& mod) {
  mod.def(
      "cbst_collect_cpu",
      [](uintptr_t m, uintptr_t a, int64_t B, int64_t HW, int64_t C, int64_t subsample, uintptr_t values,
         uintptr_t classes) {
        cbst_collect_cpu(ptr<const float>(m), ptr<const uint8_t>(a), B, HW, C, subsample, ptr<float>(values),
                         ptr<uint8_t>(classes));
      },
      py::call_guard<py::gil_scoped_release>(),
      "CBST: append the subsampled (per image and class, every s-th in row-major order) max "
      "probabilities and their classes, on the CPU.");

  mod.def(
      "cbst_thresholds_cpu",
      [](uintptr_t values, uintptr_t classes, int64_t n, int64_t C, double portion, uintptr_t lambdas) {
        cbst_thresholds_cpu(ptr<const float>(values), ptr<const uint8_t>(classes), n, C, portion,
                            ptr<float>(lambdas));
      },
      py::call_guard<py::gil_scoped_release>(),
      "CBST class-balanced thresholds (exact per-class order statistics) on the CPU.");
}

}  // namespace fastst::bindings
