// The scaffolding shared by the fused per-pixel losses on the CPU (region_loss.cpp,
// bootstrap_loss.cpp): one pass over the full-resolution pixels, the low-resolution logits
// upsampled on the fly (F.interpolate's bilinear rule), the per-pixel gradient accumulated
// straight into the low-resolution layout, so no (B, C, H, W) tensor exists, forward or backward.
//
// Work is split into tasks that own rows. Same size: task (b, y) owns row y and writes its
// gradient in place. With a resize: task (b, i) owns the rows whose upper source row is i; those
// only touch low-resolution rows i and i + 1, which the task accumulates in its own two-row
// buffer, and a final pass adds the buffers of tasks i and i - 1 into row i. Loss partial sums are
// kept per task in double and added in task order. Nothing depends on the thread count or the
// scheduling: results are bit-identical from run to run and from 1 to N threads.
//
// A loss plugs in as a class `Loss` with
//   static constexpr int kSums;               // partial sums per task
//   struct Thread; Thread thread() const;     // per-thread scratch of the loss
//   void tile(Thread&, int64_t b, int64_t y, int64_t x0, int64_t n, const float* vals,
//             const float* aux_vals, float* work, double* sums) const;
// where vals[c * kTile + t] (t < n) are the upsampled logits of pixels (b, y, x0 + t), aux_vals
// the same for LossInputs::aux (null without it); `tile` adds
// to sums[0 .. kSums) and, when the inputs ask for a gradient (LossInputs::grad set), leaves
// d loss / d v in `work` (same layout; `work` is its scratch otherwise).
#pragma once
#include <algorithm>
#include <cstdint>
#include <vector>

#include "../kernels/loss_inputs.h"
#include "../kernels/stats.h"

namespace fastst {
namespace fused_loss {

constexpr int64_t kTile = 64;  // pixels processed together, channel-major, so the loops vectorise

// Softmax statistics of a tile: m = max_c v, e_c = exp(v_c - m) (written to `e`, layout of
// vals), s = sum_c e_c = 1 + rest with log_s = log1p(rest) and inv_s = 1 / s. The maximum's e is
// exactly 1; keeping the ones out of the float sum keeps rest (and -log p of a confident pixel,
// which is about rest) accurate instead of rounding it against 1.
struct TileSoftmax {
  float m[kTile], log_s[kTile], inv_s[kTile];
};
void tile_softmax(const float* vals, int64_t n, int64_t C, float* e, TileSoftmax& sm);

// The column taps of a resize, one array per field (int32 indices: AVX2 gathers them).
struct ColumnTaps {
  std::vector<int32_t> i0, i1;
  std::vector<float> l0, l1;
  ColumnTaps(int64_t w, int64_t W, bool align_corners);
};

// v[t] = l0[t] src[i0[t]] + l1[t] src[i1[t]]: one channel of a tile of upsampled pixels.
void gather_columns(const float* src, const int32_t* i0, const int32_t* i1, const float* l0, const float* l1,
                    float* v, int64_t n);
// Its adjoint: row_grad[i0[t]] += l0[t] g[t], row_grad[i1[t]] += l1[t] g[t].
void scatter_columns(const float* g, const int32_t* i0, const int32_t* i1, const float* l0, const float* l1,
                     float* row_grad, int64_t n);
// out[(b, c, i, :)] = band (b, i) upper + band (b, i - 1) lower, for every (b, c, i).
void add_bands(const float* band, int64_t B, int64_t C, int64_t h, int64_t w, float* out);
// rows[i] .. rows[i + 1]: the output rows whose upper source row is i (size h + 1).
std::vector<int64_t> rows_by_source(int64_t h, int64_t H, bool align_corners);

template <typename T>
const T* logits_row(const LossInputs& g, int64_t b, int64_t c, int64_t row) {
  return static_cast<const T*>(g.logits) + b * g.stride_b + c * g.stride_c + row * g.stride_h;
}

template <typename T, typename Loss>
void run_same_size(const LossInputs& g, const Loss& loss, std::vector<double>& partial) {
  const int64_t C = g.C, H = g.H, W = g.W;
#pragma omp parallel
  {
    std::vector<float> vals(static_cast<size_t>(C * kTile)), work(static_cast<size_t>(C * kTile));
    std::vector<float> aux_vals(g.aux ? static_cast<size_t>(C * kTile) : 0);
    typename Loss::Thread scratch = loss.thread();
#pragma omp for schedule(dynamic, 4)
    for (int64_t task = 0; task < g.B * H; ++task) {
      const int64_t b = task / H, y = task % H;
      double* sums = &partial[task * Loss::kSums];
      for (int64_t x0 = 0; x0 < W; x0 += kTile) {
        const int64_t n = std::min(kTile, W - x0);
        for (int64_t c = 0; c < C; ++c) {
          const T* row = logits_row<T>(g, b, c, y);
          for (int64_t t = 0; t < n; ++t) vals[c * kTile + t] = to_float(row[(x0 + t) * g.stride_w]);
          if (g.aux) std::copy_n(g.aux + ((b * C + c) * H + y) * W + x0, n, &aux_vals[c * kTile]);
        }
        loss.tile(scratch, b, y, x0, n, vals.data(), g.aux ? aux_vals.data() : nullptr, work.data(), sums);
        if (!g.grad) continue;
        for (int64_t c = 0; c < C; ++c) {
          std::copy(&work[c * kTile], &work[c * kTile] + n, g.grad + ((b * C + c) * H + y) * W + x0);
        }
      }
    }
  }
}

template <typename T, typename Loss>
void run_resized(const LossInputs& g, const Loss& loss, std::vector<double>& partial) {
  const int64_t C = g.C, h = g.h, w = g.w, H = g.H, W = g.W;
  const ColumnTaps col(w, W, g.align_corners);
  const std::vector<int64_t> rows = rows_by_source(h, H, g.align_corners);
  const int64_t plane = C * w;
  std::vector<float> band(g.grad ? static_cast<size_t>(g.B * h * 2 * plane) : 0);
#pragma omp parallel
  {
    std::vector<float> vals(static_cast<size_t>(C * kTile)), work(static_cast<size_t>(C * kTile));
    std::vector<float> source_row(static_cast<size_t>(plane)), row_grad(static_cast<size_t>(plane));
    std::vector<float> aux_row(g.aux ? static_cast<size_t>(plane) : 0), aux_vals(g.aux ? static_cast<size_t>(C * kTile) : 0);
    typename Loss::Thread scratch = loss.thread();
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < g.B * h; ++task) {
      const int64_t b = task / h, i = task % h;
      double* sums = &partial[task * Loss::kSums];
      float* upper = g.grad ? band.data() + task * 2 * plane : nullptr;  // gradient of row i
      float* lower = g.grad ? upper + plane : nullptr;                   // of row i + 1
      if (g.grad) std::fill(upper, upper + 2 * plane, 0.0f);
      for (int64_t y = rows[i]; y < rows[i + 1]; ++y) {
        const LinearTap ty = linear_tap(y, h, H, g.align_corners);
        for (int64_t c = 0; c < C; ++c) {
          const T* r0 = logits_row<T>(g, b, c, ty.i0);
          const T* r1 = logits_row<T>(g, b, c, ty.i1);
          float* src = &source_row[c * w];
          for (int64_t j = 0; j < w; ++j) {
            src[j] = ty.l0 * to_float(r0[j * g.stride_w]) + ty.l1 * to_float(r1[j * g.stride_w]);
          }
          if (!g.aux) continue;
          const float* a0 = g.aux + ((b * C + c) * h + ty.i0) * w;
          const float* a1 = g.aux + ((b * C + c) * h + ty.i1) * w;
          for (int64_t j = 0; j < w; ++j) aux_row[c * w + j] = ty.l0 * a0[j] + ty.l1 * a1[j];
        }
        if (g.grad) std::fill(row_grad.begin(), row_grad.end(), 0.0f);
        for (int64_t x0 = 0; x0 < W; x0 += kTile) {
          const int64_t n = std::min(kTile, W - x0);
          const int32_t* i0 = &col.i0[x0];
          const int32_t* i1 = &col.i1[x0];
          const float* l0 = &col.l0[x0];
          const float* l1 = &col.l1[x0];
          for (int64_t c = 0; c < C; ++c) gather_columns(&source_row[c * w], i0, i1, l0, l1, &vals[c * kTile], n);
          if (g.aux) {
            for (int64_t c = 0; c < C; ++c) gather_columns(&aux_row[c * w], i0, i1, l0, l1, &aux_vals[c * kTile], n);
          }
          loss.tile(scratch, b, y, x0, n, vals.data(), g.aux ? aux_vals.data() : nullptr, work.data(), sums);
          if (!g.grad) continue;
          for (int64_t c = 0; c < C; ++c) scatter_columns(&work[c * kTile], i0, i1, l0, l1, &row_grad[c * w], n);
        }
        if (!g.grad) continue;
        // At the last source row i1 == i0: both weights belong to row i.
        const float to_upper = ty.i1 == ty.i0 ? ty.l0 + ty.l1 : ty.l0;
        const float to_lower = ty.i1 == ty.i0 ? 0.0f : ty.l1;
        for (int64_t e = 0; e < plane; ++e) {
          upper[e] += to_upper * row_grad[e];
          lower[e] += to_lower * row_grad[e];
        }
      }
    }
  }
  if (g.grad) add_bands(band.data(), g.B, C, h, w, g.grad);
}

// Runs `loss` over every pixel; returns its kSums totals, each added in task order (double).
template <typename T, typename Loss>
std::vector<double> run(const LossInputs& g, const Loss& loss) {
  const bool resize = g.h != g.H || g.w != g.W;
  const int64_t tasks = g.B * (resize ? g.h : g.H);
  std::vector<double> partial(static_cast<size_t>(tasks * Loss::kSums), 0.0);
  if (resize) {
    run_resized<T>(g, loss, partial);
  } else {
    run_same_size<T>(g, loss, partial);
  }
  std::vector<double> total(Loss::kSums, 0.0);
  for (int64_t task = 0; task < tasks; ++task) {
    for (int s = 0; s < Loss::kSums; ++s) total[s] += partial[task * Loss::kSums + s];
  }
  return total;
}

// Runs `loss` for the dtype of the logits (common.h DType).
template <typename Loss>
std::vector<double> run_for_dtype(const LossInputs& g, const Loss& loss) {
  switch (g.dtype) {
    case kFloat32: return run<float>(g, loss);
    case kFloat16: return run<Half>(g, loss);
    default: return run<BFloat16>(g, loss);
  }
}

}  // namespace fused_loss
}  // namespace fastst
