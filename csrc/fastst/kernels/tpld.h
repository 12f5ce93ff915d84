// Per-pixel arithmetic of TPLD (docs/ops.md §6) shared by the CPU kernels and their device twins:
// the voting score and decision, the image confidence, and the per-pixel coefficients of the
// fused self-training losses (bootstrapping, docs/ops.md §6; CRST-MRKLD, docs/ops.md §5).
#pragma once
#include "../common.h"
#include "cbst.h"
#include "loss_inputs.h"
#include "loss_modes.h"

namespace fastst {

// s_k = weight * q_k + (1 - weight) * pool_k in float64 with pool_k = sum / count (0 when
// count == 0); no FMA (dmul/dadd), so every backend rounds alike.
FASTST_HD double vote_score(float q, double sum, int64_t count, double weight, double one_minus_weight) {
  const double pool = count > 0 ? sum / double(count) : 0.0;
  return dadd(dmul(weight, double(q)), dmul(one_minus_weight, pool));
}

// The class an unlabelled pixel takes: k1 when s1 >= s2 and s1 > 1, k2 when s2 > s1 and s2 > 1.
FASTST_HD uint8_t vote_label(int k1, double s1, int k2, double s2) {
  const bool first = s1 >= s2;
  const double best = first ? s1 : s2;
  return best > 1.0 ? uint8_t(first ? k1 : k2) : kUnlabelled;
}

// conf_t = (sum_{k ascending, n_k > 0} (n_sure_k / n_k) / lambda_k) / |{k : n_k > 0}|, float64.
FASTST_HD double image_confidence_of(const int64_t* n, const int64_t* n_sure, const float* lambdas, int64_t C) {
  double total = 0.0;
  int64_t present = 0;
  for (int64_t k = 0; k < C; ++k) {
    if (n[k] == 0) continue;
    total = dadd(total, double(n_sure[k]) / double(n[k]) / double(lambdas[k]));
    ++present;
  }
  return present > 0 ? total / double(present) : 0.0;
}

// Fused self-training losses on (upsampled) logits v with p = softmax(v), u = v - max v,
// s = sum exp(u). Each mode gives every pixel a target vector c (already divided by the
// normaliser); with S = sum_k c_k the pixel contributes
//   -sum_k c_k log(p_k / lambda_k) = S log s - sum_k c_k u_k + sum_k c_k log lambda_k
// to the loss and p_k S - c_k to d loss / d v_k.
//   kBootstrapHard: c = (beta onehot(y) + (1 - beta) q) / n at labelled pixels, else 0.
//   kBootstrapSoft: the same with y = soft_target where the pixel is unlabelled; every pixel.
//   kMrkld:         c = onehot(y) / n_valid + [target crop] (w / n_valid_tgt) / C at valid
//                   pixels (lambda = 1), else 0.
//   kBootstrapTeacher: kBootstrapSoft with the targets made in the pass from a teacher's logits
//                   (LossInputs::aux, upsampled like the student's): p_t = softmax, q_t = p_t /
//                   lambda, y = onehot(argmax q_t) where max q_t >= 1, else q_t ** gamma
//                   (docs/ops.md §6, tpld_soft_targets); every pixel, no label map.
// (StLossMode: kernels/loss_modes.h.)

struct StLossArgs : LossInputs {
  int mode;                   // StLossMode
  const float* lambdas;       // (C,) bootstrap modes
  const float* soft_target;   // (B, C, H, W) contiguous float32, kBootstrapSoft only
  const uint8_t* is_target;   // (B,) kMrkld only
  float beta;                 // bootstrap
  float mrkld_weight;         // kMrkld
  float gamma;                // kBootstrapTeacher: the soft targets' exponent
  bool sum_reduction;         // bootstrap: sum instead of mean
  float* loss;  // out (1,)
};

}  // namespace fastst
