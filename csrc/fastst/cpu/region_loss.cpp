// Fused region loss on the CPU (OpenMP), on the shared fused-loss scaffolding (fused_loss.h: one
// pass, upsample on the fly, gradient straight into the low-resolution layout, deterministic).
// This file holds what is particular to the region loss: the per-tile parts and gradient of
// kernels/region_loss.h, and the normalisation by the labelled / ignored pixel counts.
// A term with lambda 0 whose part is not asked for costs nothing (need_kld / need_ent false):
// its C-long reduction is not run, and without the entropy a tile with no labelled pixel is
// not even softmaxed (its gradient is 0). The branches are per tile, outside the pixel loops.
#include "region_loss.h"

#include <omp.h>

#include <algorithm>
#include <limits>

#include "fused_loss.h"

namespace fastst {
namespace {

using fused_loss::kTile;

struct Constants {
  int64_t C;
  float inv_c, inv_nv, inv_c_ni, lambda_kld, lambda_ent;
  bool grad, need_kld, need_ent;
};

struct TileScratch {
  fused_loss::TileSoftmax sm;
  float expected[kTile], scale_p[kTile], scale_pv[kTile], shift[kTile];
  int32_t label[kTile];
};

// sum_u[t] = sum_c u_c (KLD) and/or sum_eu[t] = sum_c e_c u_c (entropy), u = v - max, over the
// n pixels of a tile; one loop per combination, so each one vectorises without a branch.
FASTST_CPU_CLONES void tile_sums(const float* vals, const float* e_tile, const float* m, int64_t n, int64_t C,
                                 bool need_kld, bool need_ent, float* sum_u, float* sum_eu) {
  for (int64_t t = 0; t < n; ++t) sum_u[t] = sum_eu[t] = 0.0f;
  if (need_kld && need_ent) {
    for (int64_t c = 0; c < C; ++c) {
      const float* v = vals + c * kTile;
      const float* e = e_tile + c * kTile;
      for (int64_t t = 0; t < n; ++t) {
        const float u = v[t] - m[t];
        sum_u[t] += u;
        sum_eu[t] += e[t] * u;
      }
    }
  } else if (need_kld) {
    for (int64_t c = 0; c < C; ++c) {
      const float* v = vals + c * kTile;
      for (int64_t t = 0; t < n; ++t) sum_u[t] += v[t] - m[t];
    }
  } else if (need_ent) {
    for (int64_t c = 0; c < C; ++c) {
      const float* v = vals + c * kTile;
      const float* e = e_tile + c * kTile;
      for (int64_t t = 0; t < n; ++t) sum_eu[t] += e[t] * (v[t] - m[t]);
    }
  }
}

// Parts (sums[0..3) = CE, KLD, entropy sums; a part not needed stays 0) and gradient of one
// tile: vals holds n pixels' logits; on return work holds their gradients
// (kernels/region_loss.h), in the same layout.
FASTST_CPU_CLONES void region_tile(TileScratch& s, int64_t n, const Constants& k, const float* vals, float* work,
                                   double* sums) {
  const int64_t C = k.C;
  fused_loss::tile_softmax(vals, n, C, work, s.sm);
  float sum_u[kTile], sum_eu[kTile];
  tile_sums(vals, work, s.sm.m, n, C, k.need_kld, k.need_ent, sum_u, sum_eu);
  for (int64_t t = 0; t < n; ++t) {
    const float log_s = s.sm.log_s[t];
    s.expected[t] = sum_eu[t] * s.sm.inv_s[t];  // E_p[u] (0, unused, without the entropy)
    const int32_t y = s.label[t];
    if (y >= 0) {
      sums[0] += double(log_s - (vals[y * kTile + t] - s.sm.m[t]));
      if (k.need_kld) sums[1] += double(log_s - sum_u[t] * k.inv_c);
    } else if (k.need_ent) {
      sums[2] += double(log_s - s.expected[t]);
    }
    const PixelGradCoef coef = pixel_grad_coef(y >= 0, k.inv_nv, k.inv_c_ni, k.lambda_kld, k.lambda_ent, k.inv_c);
    s.scale_p[t] = coef.scale_p;
    s.scale_pv[t] = coef.scale_pv;
    s.shift[t] = coef.shift;
  }
  if (!k.grad) return;
  if (k.need_ent) {
    for (int64_t c = 0; c < C; ++c) {
      const float* v = vals + c * kTile;
      float* g = work + c * kTile;
      for (int64_t t = 0; t < n; ++t) {
        const PixelGradCoef coef{s.scale_p[t], s.scale_pv[t], s.shift[t], 0.0f};
        g[t] = pixel_grad(g[t] * s.sm.inv_s[t], v[t] - s.sm.m[t], s.expected[t], coef);
      }
    }
  } else {
    for (int64_t c = 0; c < C; ++c) {
      float* g = work + c * kTile;
      for (int64_t t = 0; t < n; ++t) {
        const PixelGradCoef coef{s.scale_p[t], s.scale_pv[t], s.shift[t], 0.0f};
        g[t] = pixel_grad_without_entropy(g[t] * s.sm.inv_s[t], coef);
      }
    }
  }
  for (int64_t t = 0; t < n; ++t) {
    if (s.label[t] >= 0) work[s.label[t] * kTile + t] -= k.inv_nv;
  }
}

struct RegionLoss {
  static constexpr int kSums = 3;  // CE, KLD, entropy
  using Thread = TileScratch;
  const RegionLossArgs& a;
  Constants k;

  Thread thread() const { return Thread(); }
  void tile(Thread& s, int64_t b, int64_t y, int64_t x0, int64_t n, const float* vals, const float* /*aux*/,
            float* work, double* sums) const {
    const int64_t offset = (b * a.H + y) * a.W + x0;
    bool any_labelled = false;
    for (int64_t t = 0; t < n; ++t) {
      s.label[t] = class_of(a, offset + t);
      any_labelled |= s.label[t] >= 0;
    }
    if (!any_labelled && !k.need_ent) {
      // Only ignored pixels and no entropy: no part, and a gradient of exactly +0 (what the
      // full formula gives there with lambda_ent = 0), so no softmax.
      if (k.grad) std::fill(work, work + k.C * kTile, 0.0f);
      return;
    }
    region_tile(s, n, k, vals, work, sums);
  }
};

int64_t count_labelled(const RegionLossArgs& a) {
  const int64_t n = a.B * a.H * a.W;
  int64_t labelled = 0;
#pragma omp parallel for reduction(+ : labelled) schedule(static)
  for (int64_t e = 0; e < n; ++e) labelled += class_of(a, e) >= 0 ? 1 : 0;
  return labelled;
}

}  // namespace

void region_loss_cpu(const RegionLossArgs& a) {
  const int64_t n_v = count_labelled(a);
  const int64_t n_i = a.B * a.H * a.W - n_v;
  Constants k;
  k.C = a.C;
  k.inv_c = 1.0f / float(a.C);
  k.inv_nv = n_v > 0 ? float(1.0 / double(n_v)) : 0.0f;
  k.inv_c_ni = n_i > 0 ? float(1.0 / (double(a.C) * double(n_i))) : 0.0f;
  k.lambda_kld = a.lambda_kld;
  k.lambda_ent = a.lambda_ent;
  k.grad = a.grad != nullptr;
  k.need_kld = a.need_kld;
  k.need_ent = a.need_ent;
  const std::vector<double> total = fused_loss::run_for_dtype(a, RegionLoss{a, k});
  const double ce = n_v > 0 ? total[0] / double(n_v) : 0.0;
  const double kld = n_v > 0 ? total[1] / (double(a.C) * double(n_v)) : 0.0;
  const double ent = n_i > 0 ? total[2] / (double(a.C) * double(n_i)) : 0.0;
  // Added in the same order as ce + lambda_kld kld + lambda_ent ent; a term left out had
  // lambda 0 and so added a signed zero, which changes no finite sum.
  double loss = ce;
  if (a.need_kld) loss += double(a.lambda_kld) * kld;
  if (a.need_ent) loss += double(a.lambda_ent) * ent;
  const float not_computed = std::numeric_limits<float>::quiet_NaN();
  a.parts[0] = float(loss);
  a.parts[1] = float(ce);
  a.parts[2] = a.need_kld ? float(kld) : not_computed;
  a.parts[3] = a.need_ent ? float(ent) : not_computed;
}

}  // namespace fastst
