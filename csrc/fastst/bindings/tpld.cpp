// Launchers of the TPLD/CBST per-pixel pass and the TPLD voting (cpu/tpld.h).
#include "../cpu/tpld.h"
#include "decode.h"

namespace fastst::bindings {

void register_tpld(py::module_& mod) {
  mod.def(
      "tpld_pixels_cpu",
      [](uintptr_t probs, int dtype, Sizes4 shape, Sizes4 strides, uintptr_t lambdas, uintptr_t labels, uintptr_t k1,
         uintptr_t k2, uintptr_t q1, uintptr_t q2, uintptr_t confidence, uintptr_t flags) {
        const StridedInput in = decode_strided("tpld_pixels_cpu", probs, dtype, shape, strides);
        TpldPixelArgs args{};
        args.probs = in.data;
        set_layout(args, in);
        args.H = in.sizes[2];
        args.W = in.sizes[3];
        args.lambdas = ptr<const float>(lambdas);
        args.labels = ptr<uint8_t>(labels);
        args.k1 = ptr<uint8_t>(k1);
        args.k2 = ptr<uint8_t>(k2);
        args.q1 = ptr<float>(q1);
        args.q2 = ptr<float>(q2);
        args.confidence = ptr<double>(confidence);
        args.flags = ptr<int32_t>(flags);
        tpld_pixels_cpu(args);
      },
      py::call_guard<py::gil_scoped_release>(),
      "TPLD/CBST per-pixel pass: confident labels and, when the pointers are non-zero, the top-2 "
      "voting candidates and the image confidence, on the CPU.");

  mod.def(
      "tpld_vote_cpu",
      [](uintptr_t labels, uintptr_t k1, uintptr_t k2, uintptr_t q1, uintptr_t q2, int64_t B, int64_t H, int64_t W,
         int64_t window, double weight, int64_t iterations) {
        tpld_vote_cpu(ptr<uint8_t>(labels), ptr<const uint8_t>(k1), ptr<const uint8_t>(k2), ptr<const float>(q1),
                      ptr<const float>(q2), B, H, W, window, weight, iterations);
      },
      py::call_guard<py::gil_scoped_release>(),
      "TPLD sliding-window top-2 voting, in place on the confident map, on the CPU.");
}

}  // namespace fastst::bindings
