// Per-pixel arithmetic of the fused region loss (docs/ops.md §2), for the CPU kernel and any device twin.
//
// For one full-resolution pixel with (upsampled) logits v_c, u_c = v_c - max_c v_c,
// e_c = exp(u_c), s = sum_c e_c, p_c = e_c / s and E = sum_c p_c u_c (all relative to the max, so
// that no large logit cancels against another):
//   -log p_y                  = log s - u_y                    (CE, labelled pixels)
//   -(1/C) sum_c log p_c      = log s - (1/C) sum_c u_c        (KLD to uniform, labelled pixels)
//   -sum_c p_c log p_c        = log s - E                      (entropy, ignored pixels)
// and the gradient of loss = ce + lambda_kld kld + lambda_ent ent with respect to v_c is
//   labelled: p_c (1 + lambda_kld / C) / n_v - [c = y] / n_v - lambda_kld / (C^2 n_v)
//   ignored:  -lambda_ent p_c (u_c - E) / (C n_i)           (since log p_c + H = u_c - E).
// A term whose lambda is 0 and whose part nobody asked for is not computed (need_kld / need_ent
// false): no sum_c u_c without the KLD; no E, no (u_c - E) and a zero gradient at ignored pixels
// without the entropy. Skipping changes no bit of the loss or the gradient (see
// pixel_grad_without_entropy), because the weight-0 term only ever added a signed zero.
#pragma once
#include "loss_inputs.h"

namespace fastst {

struct RegionLossArgs : LossInputs {
  float lambda_kld, lambda_ent;
  // Whether to compute the KLD / entropy part; a term left out must have lambda 0 (its part
  // is then reported as NaN: not computed).
  bool need_kld, need_ent;
  float* parts;  // out (4,): loss, ce, kld, ent
};

// Per-pixel coefficients of the gradient, set once per pixel from its label and the counts:
// grad_c = p_c * (scale_p + scale_pv * (u_c - E)) + shift - [c = y] * onehot.
struct PixelGradCoef {
  float scale_p, scale_pv, shift, onehot;
};

FASTST_HD PixelGradCoef pixel_grad_coef(bool labelled, float inv_nv, float inv_c_ni, float lambda_kld,
                                        float lambda_ent, float inv_c) {
  PixelGradCoef k;
  const float lab = labelled ? 1.0f : 0.0f;
  k.scale_p = lab * (1.0f + lambda_kld * inv_c) * inv_nv;
  k.scale_pv = (1.0f - lab) * -lambda_ent * inv_c_ni;
  k.shift = lab * -lambda_kld * inv_c * inv_c * inv_nv;
  k.onehot = lab * inv_nv;
  return k;
}

FASTST_HD float pixel_grad(float p, float u, float expected_u, const PixelGradCoef& k) {
  return p * (k.scale_p + k.scale_pv * (u - expected_u)) + k.shift;
}

// pixel_grad when lambda_ent = 0, without E, and bit-identical to it as long as neither form is
// fused into FMAs differently (the CPU build has -ffp-contract=off). scale_pv is then a signed
// zero at every pixel (0 * -lambda_ent * ... at labelled pixels, -0 * inv_c_ni at ignored ones),
// so scale_pv * (u - E) is +-0 and scale_p + (+-0) == scale_p, whether scale_p is positive
// (labelled) or +0 (ignored, where the result is +0 * p + (-0) = +0, as before).
FASTST_HD float pixel_grad_without_entropy(float p, const PixelGradCoef& k) {
  return p * k.scale_p + k.shift;
}

}  // namespace fastst
