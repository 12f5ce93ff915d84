// Launcher of the fused bootstrapping and CRST-MRKLD losses (cpu/bootstrap_loss.h).
#include "../cpu/bootstrap_loss.h"
#include "decode.h"

namespace fastst::bindings {

void register_st_loss(py::module_& mod) {
  mod.def(
      "st_loss_cpu",
      [](uintptr_t logits, int dtype, Sizes4 shape_in, Sizes2 size_out, Sizes4 strides, uintptr_t target,
         bool target_is_u8, int ignore_index, int mode, uintptr_t lambdas, uintptr_t soft_target,
         uintptr_t is_target, float beta, float mrkld_weight, float gamma, bool sum_reduction, bool align_corners,
         uintptr_t loss, uintptr_t grad) {
        if (mode < kBootstrapHard || mode > kBootstrapTeacher) {
          throw std::invalid_argument("fastst._C.st_loss_cpu: unknown loss mode " + std::to_string(mode) +
                                      " (expected 0 hard, 1 soft, 2 MRKLD or 3 teacher)");
        }
        StLossArgs args{};
        set_loss_inputs(args, decode_strided("st_loss_cpu", logits, dtype, shape_in, strides), size_out, target,
                        target_is_u8, ignore_index, align_corners);
        args.mode = mode;
        args.lambdas = ptr<const float>(lambdas);
        args.is_target = ptr<const uint8_t>(is_target);
        args.beta = beta;
        args.mrkld_weight = mrkld_weight;
        args.gamma = gamma;
        // Mode 3 reads the teacher's logits through the scaffolding's second input.
        if (mode == kBootstrapTeacher) {
          args.aux = ptr<const float>(soft_target);
        } else {
          args.soft_target = ptr<const float>(soft_target);
        }
        args.sum_reduction = sum_reduction;
        args.loss = ptr<float>(loss);
        args.grad = ptr<float>(grad);
        st_loss_cpu(args);
      },
      py::call_guard<py::gil_scoped_release>(),
      "Fused bootstrapping (mode 0 hard, 1 soft, 3 soft from a teacher's logits passed as soft_target) "
      "or CRST-MRKLD (mode 2) loss with on-the-fly "
      "bilinear upsample: the loss and, when grad != 0, d loss / d logits, on the CPU.");
}

}  // namespace fastst::bindings
