// Fused region loss on the CPU (OpenMP), on the shared fused-loss scaffolding (fused_loss.h: one
// pass, upsample on the fly, gradient straight into the low-resolution layout, deterministic).
// This file holds what is particular to the region loss: the per-tile parts and gradient of
// kernels/region_loss.h, and the normalisation by the labelled / ignored pixel counts.
#include "region_loss.h"

#include <omp.h>

#include "fused_loss.h"

namespace fastst {
namespace {

using fused_loss::kTile;

struct Constants {
  int64_t C;
  float inv_c, inv_nv, inv_c_ni, lambda_kld, lambda_ent;
  bool grad;
};

struct TileScratch {
  fused_loss::TileSoftmax sm;
  float expected[kTile], scale_p[kTile], scale_pv[kTile], shift[kTile];
  int32_t label[kTile];
};

// Parts (sums[0..3) = CE, KLD, entropy sums) and gradient of one tile: vals holds n pixels'
// logits; on return work holds their gradients (kernels/region_loss.h), in the same layout.
FASTST_CPU_CLONES void region_tile(TileScratch& s, int64_t n, const Constants& k, const float* vals, float* work,
                                   double* sums) {
  const int64_t C = k.C;
  fused_loss::tile_softmax(vals, n, C, work, s.sm);
  float sum_u[kTile], sum_eu[kTile];
  for (int64_t t = 0; t < n; ++t) sum_u[t] = sum_eu[t] = 0.0f;
  for (int64_t c = 0; c < C; ++c) {
    const float* v = vals + c * kTile;
    const float* e = work + c * kTile;
    for (int64_t t = 0; t < n; ++t) {
      const float u = v[t] - s.sm.m[t];
      sum_u[t] += u;
      sum_eu[t] += e[t] * u;
    }
  }
  for (int64_t t = 0; t < n; ++t) {
    const float log_s = s.sm.log_s[t];
    s.expected[t] = sum_eu[t] * s.sm.inv_s[t];  // E_p[u]
    const int32_t y = s.label[t];
    if (y >= 0) {
      sums[0] += double(log_s - (vals[y * kTile + t] - s.sm.m[t]));
      sums[1] += double(log_s - sum_u[t] * k.inv_c);
    } else {
      sums[2] += double(log_s - s.expected[t]);
    }
    const PixelGradCoef coef = pixel_grad_coef(y >= 0, k.inv_nv, k.inv_c_ni, k.lambda_kld, k.lambda_ent, k.inv_c);
    s.scale_p[t] = coef.scale_p;
    s.scale_pv[t] = coef.scale_pv;
    s.shift[t] = coef.shift;
  }
  if (!k.grad) return;
  for (int64_t c = 0; c < C; ++c) {
    const float* v = vals + c * kTile;
    float* g = work + c * kTile;
    for (int64_t t = 0; t < n; ++t) {
      const PixelGradCoef coef{s.scale_p[t], s.scale_pv[t], s.shift[t], 0.0f};
      g[t] = pixel_grad(g[t] * s.sm.inv_s[t], v[t] - s.sm.m[t], s.expected[t], coef);
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
  void tile(Thread& s, int64_t b, int64_t y, int64_t x0, int64_t n, const float* vals, float* work,
            double* sums) const {
    const int64_t offset = (b * a.H + y) * a.W + x0;
    for (int64_t t = 0; t < n; ++t) s.label[t] = class_of(a, offset + t);
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
  const std::vector<double> total = fused_loss::run_for_dtype(a, RegionLoss{a, k});
  const double ce = n_v > 0 ? total[0] / double(n_v) : 0.0;
  const double kld = n_v > 0 ? total[1] / (double(a.C) * double(n_v)) : 0.0;
  const double ent = n_i > 0 ? total[2] / (double(a.C) * double(n_i)) : 0.0;
  a.parts[0] = float(ce + double(a.lambda_kld) * kld + double(a.lambda_ent) * ent);
  a.parts[1] = float(ce);
  a.parts[2] = float(kld);
  a.parts[3] = float(ent);
}

}  // namespace fastst
