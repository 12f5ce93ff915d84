// Launcher of the fused region loss (cpu/region_loss.h).
#include "../cpu/region_loss.h"
#include "decode.h"

namespace fastst::bindings {

void register_region_loss(py::module_& mod) {
  mod.def(
      "region_loss_cpu",
      [](uintptr_t logits, int dtype, Sizes4 shape_in, Sizes2 size_out, Sizes4 strides, uintptr_t target,
         bool target_is_u8, int ignore_index, float lambda_kld, float lambda_ent, bool need_kld, bool need_ent,
         bool align_corners, uintptr_t parts, uintptr_t grad) {
        if ((!need_kld && lambda_kld != 0.0f) || (!need_ent && lambda_ent != 0.0f)) {
          throw std::invalid_argument("fastst._C.region_loss_cpu: a term with a non-zero lambda must be computed "
                                      "(need_kld / need_ent may be false only where lambda_kld / lambda_ent is 0)");
        }
        RegionLossArgs args{};
        set_loss_inputs(args, decode_strided("region_loss_cpu", logits, dtype, shape_in, strides), size_out, target,
                        target_is_u8, ignore_index, align_corners);
        args.lambda_kld = lambda_kld;
        args.lambda_ent = lambda_ent;
        args.need_kld = need_kld;
        args.need_ent = need_ent;
        args.parts = ptr<float>(parts);
        args.grad = ptr<float>(grad);
        region_loss_cpu(args);
      },
      py::call_guard<py::gil_scoped_release>(),
      "Fused region loss (docs/ops.md §2) with on-the-fly bilinear upsample: parts (loss, ce, kld, ent) "
      "and, when grad != 0, d loss / d logits in the low-resolution layout, on the CPU. A term whose "
      "need_kld / need_ent is false (its lambda must be 0) is skipped and its part set to NaN.");
}

}  // namespace fastst::bindings
