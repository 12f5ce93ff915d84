// Fused bootstrapping / MRKLD losses on the CPU (OpenMP), on the shared fused-loss scaffolding
// (fused_loss.h: one pass, upsample on the fly, gradient straight into the low-resolution layout,
// deterministic). Only the per-pixel target vector differs from the region loss (kernels/tpld.h):
//   loss_pixel = S log s - sum_k c_k u_k + sum_k c_k log lambda_k,  grad_k = g (p_k S - c_k).
#include "bootstrap_loss.h"

#include <omp.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "fused_loss.h"

namespace fastst {
namespace {

using fused_loss::kTile;

struct TileScratch {
  fused_loss::TileSoftmax sm;
  std::vector<float> target;  // (C, kTile): soft targets in, coefficients c out
  int32_t label[kTile];
  fused_loss::TileSoftmax teacher_sm;  // kBootstrapTeacher: the teacher's softmax, then its q
  std::vector<float> teacher;
};

struct Constants {
  int64_t C;
  int mode;
  float beta, one_minus_beta, inv_c;
  float grad_scale;         // bootstrap: 1 / n (mean) or 1 (sum)
  float inv_nv, w_inv_nt;   // mrkld: 1 / n_valid, w / n_valid_tgt (0 for an empty set)
  float gamma;              // teacher: the soft targets' exponent
  std::vector<float> lambdas, log_lambdas;
  bool grad;
};

// One tile of n pixels: vals holds the logits (channel-major, row stride kTile), s.target the
// soft targets (kBootstrapSoft); sums[0] gets the loss (bootstrap) or CE sum (mrkld), sums[1] the
// KLD sum (mrkld); on return work holds the gradients.
FASTST_CPU_CLONES void process_tile(TileScratch& s, int64_t n, bool target_crop, const Constants& k,
                                    const float* vals, float* work, double* sums) {
  const int64_t C = k.C;
  fused_loss::tile_softmax(vals, n, C, work, s.sm);
  const float* inv_s = s.sm.inv_s;
  const float* log_s = s.sm.log_s;
  const float* m = s.sm.m;
  if (k.mode == kMrkld) {
    float sum_u[kTile];
    for (int64_t t = 0; t < n; ++t) sum_u[t] = 0.0f;
    for (int64_t c = 0; c < C; ++c) {
      const float* v = vals + c * kTile;
      for (int64_t t = 0; t < n; ++t) sum_u[t] += v[t] - m[t];
    }
    for (int64_t t = 0; t < n; ++t) {
      const int32_t y = s.label[t];
      if (y < 0) continue;
      sums[0] += double(log_s[t] - (vals[y * kTile + t] - m[t]));
      if (target_crop) sums[1] += double(log_s[t] - sum_u[t] * k.inv_c);
    }
    if (!k.grad) return;
    for (int64_t t = 0; t < n; ++t) {
      const bool valid = s.label[t] >= 0;
      const float a = valid ? k.inv_nv : 0.0f;
      const float b = valid && target_crop ? k.w_inv_nt : 0.0f;
      const float total = a + b, shift = b * k.inv_c;
      for (int64_t c = 0; c < C; ++c) work[c * kTile + t] = work[c * kTile + t] * inv_s[t] * total - shift;
      if (valid) work[s.label[t] * kTile + t] -= a;
    }
    return;
  }
  // Bootstrap: c_k = beta y_k + (1 - beta) q_k with q = p / lambda; s.target receives c.
  const bool soft = k.mode == kBootstrapSoft || k.mode == kBootstrapTeacher;
  float* target = s.target.data();
  float S[kTile], A[kTile], L[kTile], has[kTile];
  for (int64_t t = 0; t < n; ++t) {
    S[t] = A[t] = L[t] = 0.0f;
    has[t] = (s.label[t] >= 0 || soft) ? 1.0f : 0.0f;
  }
  for (int64_t c = 0; c < C; ++c) {
    const float* v = vals + c * kTile;
    const float* e = work + c * kTile;
    float* tc = target + c * kTile;
    const float lam = k.lambdas[c], log_lam = k.log_lambdas[c];
    for (int64_t t = 0; t < n; ++t) {
      const float y = s.label[t] >= 0 ? (s.label[t] == c ? 1.0f : 0.0f) : (soft ? tc[t] : 0.0f);
      const float q = fdiv(e[t] * inv_s[t], lam);
      const float coef = has[t] * (k.beta * y + k.one_minus_beta * q);
      tc[t] = coef;
      S[t] += coef;
      A[t] += coef * (v[t] - m[t]);
      L[t] += coef * log_lam;
    }
  }
  for (int64_t t = 0; t < n; ++t) sums[0] += double(S[t] * log_s[t] - A[t] + L[t]);
  if (!k.grad) return;
  for (int64_t c = 0; c < C; ++c) {
    float* g = work + c * kTile;
    const float* tc = target + c * kTile;
    for (int64_t t = 0; t < n; ++t) g[t] = k.grad_scale * (g[t] * inv_s[t] * S[t] - tc[t]);
  }
}


// q ** gamma as torch.pow(q, gamma) computes it for the common exponents (0, 1, 2: exact).
inline float power(float q, float gamma) {
  if (gamma == 2.0f) return q * q;
  if (gamma == 1.0f) return q;
  if (gamma == 0.0f) return 1.0f;
  return std::pow(q, gamma);
}

// kBootstrapTeacher: s.target = the soft targets of a tile from the teacher's upsampled logits
// (channel-major, row stride kTile): one-hot of argmax q (lowest index on ties) where max q >= 1,
// else q ** gamma, with q = fdiv(softmax, lambda) (docs/ops.md §6, tpld_soft_targets).
FASTST_CPU_CLONES void teacher_targets(TileScratch& s, int64_t n, const Constants& k, const float* teacher) {
  const int64_t C = k.C;
  float* q = s.teacher.data();
  fused_loss::tile_softmax(teacher, n, C, q, s.teacher_sm);
  float best[kTile];
  int32_t arg[kTile];
  for (int64_t t = 0; t < n; ++t) best[t] = -1.0f, arg[t] = 0;
  for (int64_t c = 0; c < C; ++c) {
    float* qc = q + c * kTile;
    const float lam = k.lambdas[c];
    for (int64_t t = 0; t < n; ++t) {
      qc[t] = fdiv(qc[t] * s.teacher_sm.inv_s[t], lam);
      arg[t] = qc[t] > best[t] ? int32_t(c) : arg[t];
      best[t] = qc[t] > best[t] ? qc[t] : best[t];
    }
  }
  for (int64_t c = 0; c < C; ++c) {
    const float* qc = q + c * kTile;
    float* yc = s.target.data() + c * kTile;
    for (int64_t t = 0; t < n; ++t) {
      yc[t] = best[t] >= 1.0f ? (arg[t] == c ? 1.0f : 0.0f) : power(qc[t], k.gamma);
    }
  }
  for (int64_t t = 0; t < n; ++t) s.label[t] = -1;  // no label map: every pixel's y is s.target
}

void load_tile_targets(const StLossArgs& a, TileScratch& s, int64_t b, int64_t y, int64_t x0, int64_t n) {
  const int64_t base = (b * a.H + y) * a.W + x0;
  for (int64_t t = 0; t < n; ++t) s.label[t] = class_of(a, base + t);
  if (a.mode != kBootstrapSoft) return;
  for (int64_t c = 0; c < a.C; ++c) {
    const float* src = a.soft_target + ((b * a.C + c) * a.H + y) * a.W + x0;
    std::memcpy(&s.target[c * kTile], src, sizeof(float) * n);
  }
}

struct StLoss {
  static constexpr int kSums = 2;
  using Thread = TileScratch;
  const StLossArgs& a;
  const Constants& k;

  Thread thread() const {
    Thread s;
    s.target.resize(static_cast<size_t>(a.C * kTile));
    if (a.mode == kBootstrapTeacher) s.teacher.resize(static_cast<size_t>(a.C * kTile));
    return s;
  }
  void tile(Thread& s, int64_t b, int64_t y, int64_t x0, int64_t n, const float* vals, const float* teacher,
            float* work, double* sums) const {
    if (a.mode == kBootstrapTeacher) {
      teacher_targets(s, n, k, teacher);
    } else {
      load_tile_targets(a, s, b, y, x0, n);
    }
    process_tile(s, n, a.mode == kMrkld && a.is_target[b] != 0, k, vals, work, sums);
  }
};

}  // namespace

void st_loss_cpu(const StLossArgs& a) {
  const int64_t pixels = a.B * a.H * a.W;
  int64_t n_valid = 0, n_valid_tgt = 0;
  const bool every_pixel = a.mode == kBootstrapSoft || a.mode == kBootstrapTeacher;
#pragma omp parallel for reduction(+ : n_valid, n_valid_tgt) schedule(static)
  for (int64_t e = 0; e < (a.mode == kBootstrapTeacher ? 0 : pixels); ++e) {  // no label map in mode 3
    const bool valid = class_of(a, e) >= 0;
    n_valid += valid ? 1 : 0;
    n_valid_tgt += (valid && a.mode == kMrkld && a.is_target[e / (a.H * a.W)] != 0) ? 1 : 0;
  }
  Constants k;
  k.C = a.C;
  k.mode = a.mode;
  k.beta = a.beta;
  k.one_minus_beta = float(1.0 - double(a.beta));
  k.inv_c = 1.0f / float(a.C);
  k.gamma = a.gamma;
  const int64_t n_bootstrap = every_pixel ? pixels : n_valid;
  k.grad_scale = a.sum_reduction ? 1.0f : (n_bootstrap > 0 ? float(1.0 / double(n_bootstrap)) : 0.0f);
  k.inv_nv = n_valid > 0 ? float(1.0 / double(n_valid)) : 0.0f;
  k.w_inv_nt = n_valid_tgt > 0 ? float(double(a.mrkld_weight) / double(n_valid_tgt)) : 0.0f;
  k.lambdas.assign(static_cast<size_t>(a.C), 1.0f);
  k.log_lambdas.assign(static_cast<size_t>(a.C), 0.0f);
  if (a.mode != kMrkld) {
    for (int64_t c = 0; c < a.C; ++c) k.lambdas[c] = a.lambdas[c], k.log_lambdas[c] = std::log(a.lambdas[c]);
  }
  k.grad = a.grad != nullptr;
  const std::vector<double> total = fused_loss::run_for_dtype(a, StLoss{a, k});
  if (a.mode == kMrkld) {
    const double ce = n_valid > 0 ? total[0] / double(n_valid) : 0.0;
    const double kld = n_valid_tgt > 0 ? total[1] / double(n_valid_tgt) : 0.0;
    a.loss[0] = float(ce + double(a.mrkld_weight) * kld);
  } else if (a.sum_reduction) {
    a.loss[0] = float(total[0]);
  } else {
    a.loss[0] = float(n_bootstrap > 0 ? total[0] / double(n_bootstrap) : 0.0);
  }
}

}  // namespace fastst
