// Fused region loss on the CPU (OpenMP): one pass over the full-resolution pixels, upsampling
// the low-resolution logits on the fly; the gradient is accumulated straight into the
// low-resolution layout, so no (B, C, H, W) tensor exists, forward or backward.
//
// Work is split into tasks that own a band of full-resolution rows: with a resize, the rows y
// whose upper source row is i (task (b, i)); those rows only touch low-resolution rows i and
// i + 1, which the task accumulates into its own two-row buffer. A final pass adds the buffers
// of tasks i and i - 1 into row i. Loss partial sums are kept per task in double and added in
// task order. Nothing depends on the thread count or scheduling: the results are bit-identical
// from run to run and from 1 to N threads.
#include "region_loss.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "../kernels/stats.h"

namespace fastst {
namespace {

constexpr int64_t kTile = 64;  // pixels processed together, channel-major, so the loops vectorise

struct PartialSums {
  double ce = 0.0, kld = 0.0, ent = 0.0;
};

// Per-thread scratch: one tile of upsampled logits and of exp / gradient values, per-pixel
// statistics, the lerped source row and the row's gradient in low-resolution columns.
struct Scratch {
  std::vector<float> vals, work, source_row, row_grad;
  float m[kTile], inv_s[kTile], expected[kTile], scale_p[kTile], scale_pv[kTile], shift[kTile];
  int32_t label[kTile];
  Scratch(int64_t C, int64_t w)
      : vals(static_cast<size_t>(C * kTile)), work(static_cast<size_t>(C * kTile)),
        source_row(static_cast<size_t>(C * w)), row_grad(static_cast<size_t>(C * w)) {}
};

struct Constants {
  int64_t C;
  float inv_c, inv_nv, inv_c_ni, lambda_kld, lambda_ent;
  bool grad;
};

// The class of a labelled pixel, or -1 for ignore_index. Labels outside 0..C-1 only reach here
// with the value checks off (FASTST_CHECK=0): they count as ignored instead of reading out of
// bounds.
int32_t class_of(const RegionLossArgs& a, int64_t index) {
  const int64_t v = a.target_is_u8 ? int64_t(static_cast<const uint8_t*>(a.target)[index])
                                   : static_cast<const int64_t*>(a.target)[index];
  return (v >= 0 && v < a.C && v != a.ignore_index) ? int32_t(v) : -1;
}

void load_labels(const RegionLossArgs& a, int64_t offset, int64_t n, int32_t* out) {
  for (int64_t t = 0; t < n; ++t) out[t] = class_of(a, offset + t);
}

// The loss and (optionally) gradient of one tile: s.vals holds n pixels' logits, channel-major
// with row stride kTile; on return s.work holds their gradients in the same layout.
FASTST_CPU_CLONES void process_tile(Scratch& s, int64_t n, const Constants& k, PartialSums& sums) {
  const int64_t C = k.C;
  const float* vals = s.vals.data();
  float* work = s.work.data();
  for (int64_t t = 0; t < n; ++t) s.m[t] = vals[t];
  for (int64_t c = 1; c < C; ++c) {
    const float* v = vals + c * kTile;
    for (int64_t t = 0; t < n; ++t) s.m[t] = v[t] > s.m[t] ? v[t] : s.m[t];
  }
  // With u = v - max: e = exp(u), s = sum e = 1 + rest, log s = log1p(rest). The maximum's
  // e is exactly 1; leaving the ones out of the float sum keeps rest (and -log p of a confident
  // pixel, which is about rest) accurate instead of rounding it against 1.
  float rest[kTile], sum_u[kTile], sum_eu[kTile];
  for (int64_t t = 0; t < n; ++t) rest[t] = -1.0f, sum_u[t] = sum_eu[t] = 0.0f;
  float rest_small[kTile];
  for (int64_t t = 0; t < n; ++t) rest_small[t] = 0.0f;
  for (int64_t c = 0; c < C; ++c) {
    const float* v = vals + c * kTile;
    float* e = work + c * kTile;
    for (int64_t t = 0; t < n; ++t) {
      const float u = v[t] - s.m[t];
      e[t] = exp_nonpositive(u);
      // 1.0f where e == 1, else 0, through a bit mask: GCC vectorises this, not float(bool)
      const float one = bits_to_float((0u - uint32_t(e[t] == 1.0f)) & 0x3f800000u);
      rest_small[t] += e[t] - one;            // e is 1 exactly where one is
      rest[t] += one;                         // starts at -1: (number of ones) - 1, exact
      sum_u[t] += u;
      sum_eu[t] += e[t] * u;
    }
  }
  for (int64_t t = 0; t < n; ++t) {
    const float r = rest_small[t] + rest[t];
    const float log_s = std::log1p(r);
    s.inv_s[t] = 1.0f / (1.0f + r);
    s.expected[t] = sum_eu[t] * s.inv_s[t];  // E_p[u]
    const int32_t y = s.label[t];
    if (y >= 0) {
      sums.ce += double(log_s - (vals[y * kTile + t] - s.m[t]));
      sums.kld += double(log_s - sum_u[t] * k.inv_c);
    } else {
      sums.ent += double(log_s - s.expected[t]);
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
      g[t] = pixel_grad(g[t] * s.inv_s[t], v[t] - s.m[t], s.expected[t], coef);
    }
  }
  for (int64_t t = 0; t < n; ++t) {
    if (s.label[t] >= 0) work[s.label[t] * kTile + t] -= k.inv_nv;
  }
}

template <typename T>
const T* logits_at(const RegionLossArgs& a, int64_t b, int64_t c, int64_t row) {
  return static_cast<const T*>(a.logits) + b * a.stride_b + c * a.stride_c + row * a.stride_h;
}

// Same size: task (b, y) owns row y, and each pixel's gradient is its logit's.
template <typename T>
void run_same_size(const RegionLossArgs& a, const Constants& k, std::vector<PartialSums>& partial) {
  const int64_t B = a.B, C = a.C, H = a.H, W = a.W;
#pragma omp parallel
  {
    Scratch s(C, 1);
#pragma omp for schedule(dynamic, 4)
    for (int64_t task = 0; task < B * H; ++task) {
      const int64_t b = task / H, y = task % H;
      PartialSums sums;
      for (int64_t x0 = 0; x0 < W; x0 += kTile) {
        const int64_t n = std::min(kTile, W - x0);
        for (int64_t c = 0; c < C; ++c) {
          const T* row = logits_at<T>(a, b, c, y);
          for (int64_t t = 0; t < n; ++t) s.vals[c * kTile + t] = to_float(row[(x0 + t) * a.stride_w]);
        }
        load_labels(a, (b * H + y) * W + x0, n, s.label);
        process_tile(s, n, k, sums);
        if (k.grad) {
          for (int64_t c = 0; c < C; ++c) {
            float* out = a.grad + ((b * C + c) * H + y) * W + x0;
            std::memcpy(out, &s.work[c * kTile], sizeof(float) * n);
          }
        }
      }
      partial[task] = sums;
    }
  }
}

// The column taps of a resize, one array per field (int32 indices: AVX2 gathers them).
struct ColumnTaps {
  std::vector<int32_t> i0, i1;
  std::vector<float> l0, l1;
  ColumnTaps(int64_t w, int64_t W, bool align_corners)
      : i0(static_cast<size_t>(W)), i1(static_cast<size_t>(W)), l0(static_cast<size_t>(W)), l1(static_cast<size_t>(W)) {
    for (int64_t x = 0; x < W; ++x) {
      const LinearTap tap = linear_tap(x, w, W, align_corners);
      i0[x] = int32_t(tap.i0);
      i1[x] = int32_t(tap.i1);
      l0[x] = tap.l0;
      l1[x] = tap.l1;
    }
  }
};

// v[t] = l0[t] src[i0[t]] + l1[t] src[i1[t]]: one channel of a tile of upsampled pixels.
FASTST_CPU_CLONES void gather_columns(const float* src, const int32_t* i0, const int32_t* i1, const float* l0,
                                      const float* l1, float* v, int64_t n) {
  for (int64_t t = 0; t < n; ++t) v[t] = l0[t] * src[i0[t]] + l1[t] * src[i1[t]];
}

// The adjoint: row_grad[i0[t]] += l0[t] g[t], row_grad[i1[t]] += l1[t] g[t]. The upper taps are
// non-decreasing, so runs of equal i0 (about W / w pixels) are summed in registers and added once,
// instead of a read-modify-write of memory per pixel.
void scatter_columns(const float* g, const int32_t* i0, const int32_t* i1, const float* l0, const float* l1,
                     float* row_grad, int64_t n) {
  int64_t t = 0;
  while (t < n) {
    const int32_t run = i0[t];
    float to0 = 0.0f, to1 = 0.0f;
    for (; t < n && i0[t] == run; ++t) {
      to0 += l0[t] * g[t];
      to1 += l1[t] * g[t];
    }
    row_grad[run] += to0;
    row_grad[i1[t - 1]] += to1;
  }
}

// Bilinear upsample: task (b, i) owns the rows whose upper source row is i.
template <typename T>
void run_resized(const RegionLossArgs& a, const Constants& k, std::vector<PartialSums>& partial) {
  const int64_t B = a.B, C = a.C, h = a.h, w = a.w, H = a.H, W = a.W;
  const ColumnTaps col(w, W, a.align_corners);
  std::vector<int64_t> first_row(static_cast<size_t>(h + 1), H);  // rows of band i: [first_row[i], first_row[i+1])
  for (int64_t y = H - 1; y >= 0; --y) first_row[linear_tap(y, h, H, a.align_corners).i0] = y;
  for (int64_t i = h - 1; i >= 0; --i) first_row[i] = std::min(first_row[i], first_row[i + 1]);
  const int64_t plane = C * w;
  std::vector<float> band(k.grad ? static_cast<size_t>(B * h * 2 * plane) : 0);

#pragma omp parallel
  {
    Scratch s(C, w);
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < B * h; ++task) {
      const int64_t b = task / h, i = task % h;
      float* upper = k.grad ? band.data() + task * 2 * plane : nullptr;  // gradient of row i
      float* lower = k.grad ? upper + plane : nullptr;                   // of row i + 1
      if (k.grad) std::fill(upper, upper + 2 * plane, 0.0f);
      PartialSums sums;
      for (int64_t y = first_row[i]; y < first_row[i + 1]; ++y) {
        const LinearTap ty = linear_tap(y, h, H, a.align_corners);
        for (int64_t c = 0; c < C; ++c) {
          const T* r0 = logits_at<T>(a, b, c, ty.i0);
          const T* r1 = logits_at<T>(a, b, c, ty.i1);
          float* src = &s.source_row[c * w];
          for (int64_t j = 0; j < w; ++j) {
            src[j] = ty.l0 * to_float(r0[j * a.stride_w]) + ty.l1 * to_float(r1[j * a.stride_w]);
          }
        }
        if (k.grad) std::fill(s.row_grad.begin(), s.row_grad.end(), 0.0f);
        for (int64_t x0 = 0; x0 < W; x0 += kTile) {
          const int64_t n = std::min(kTile, W - x0);
          const int32_t* i0 = &col.i0[x0];
          const int32_t* i1 = &col.i1[x0];
          const float* l0 = &col.l0[x0];
          const float* l1 = &col.l1[x0];
          for (int64_t c = 0; c < C; ++c) gather_columns(&s.source_row[c * w], i0, i1, l0, l1, &s.vals[c * kTile], n);
          load_labels(a, (b * H + y) * W + x0, n, s.label);
          process_tile(s, n, k, sums);
          if (!k.grad) continue;
          for (int64_t c = 0; c < C; ++c) scatter_columns(&s.work[c * kTile], i0, i1, l0, l1, &s.row_grad[c * w], n);
        }
        if (!k.grad) continue;
        // At the last source row i1 == i0: both weights belong to row i.
        const float to_upper = ty.i1 == ty.i0 ? ty.l0 + ty.l1 : ty.l0;
        const float to_lower = ty.i1 == ty.i0 ? 0.0f : ty.l1;
        for (int64_t e = 0; e < plane; ++e) {
          upper[e] += to_upper * s.row_grad[e];
          lower[e] += to_lower * s.row_grad[e];
        }
      }
      partial[task] = sums;
    }
  }
  if (!k.grad) return;
#pragma omp parallel for schedule(static)
  for (int64_t bi = 0; bi < B * h; ++bi) {
    const int64_t b = bi / h, i = bi % h;
    const float* upper = band.data() + bi * 2 * plane;
    const float* lower_of_previous = i > 0 ? band.data() + (bi - 1) * 2 * plane + plane : nullptr;
    for (int64_t c = 0; c < C; ++c) {
      float* out = a.grad + ((b * C + c) * h + i) * w;
      for (int64_t j = 0; j < w; ++j) {
        out[j] = upper[c * w + j] + (lower_of_previous ? lower_of_previous[c * w + j] : 0.0f);
      }
    }
  }
}

int64_t count_labelled(const RegionLossArgs& a) {
  const int64_t n = a.B * a.H * a.W;
  int64_t labelled = 0;
#pragma omp parallel for reduction(+ : labelled) schedule(static)
  for (int64_t e = 0; e < n; ++e) labelled += class_of(a, e) >= 0 ? 1 : 0;
  return labelled;
}

template <typename T>
void region_loss_typed(const RegionLossArgs& a) {
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
  const bool resize = a.h != a.H || a.w != a.W;
  std::vector<PartialSums> partial(static_cast<size_t>(a.B * (resize ? a.h : a.H)));
  if (resize) {
    run_resized<T>(a, k, partial);
  } else {
    run_same_size<T>(a, k, partial);
  }
  PartialSums total;
  for (const PartialSums& p : partial) {
    total.ce += p.ce;
    total.kld += p.kld;
    total.ent += p.ent;
  }
  const double ce = n_v > 0 ? total.ce / double(n_v) : 0.0;
  const double kld = n_v > 0 ? total.kld / (double(a.C) * double(n_v)) : 0.0;
  const double ent = n_i > 0 ? total.ent / (double(a.C) * double(n_i)) : 0.0;
  a.parts[0] = float(ce + double(a.lambda_kld) * kld + double(a.lambda_ent) * ent);
  a.parts[1] = float(ce);
  a.parts[2] = float(kld);
  a.parts[3] = float(ent);
}

}  // namespace

void region_loss_cpu(const RegionLossArgs& args) {
  switch (args.dtype) {
    case kFloat32: region_loss_typed<float>(args); break;
    case kFloat16: region_loss_typed<Half>(args); break;
    default: region_loss_typed<BFloat16>(args); break;
  }
}

}  // namespace fastst
