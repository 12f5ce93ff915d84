// CPU (OpenMP) launcher of the fused statistics pass; the per-pixel arithmetic is in
// kernels/stats.h (the same functions the CUDA kernel calls, in the same channel order).
//
// Work is split by output rows. Within a row the channel loop is outside the pixel loop, so each
// channel's row of the input is read contiguously (for the usual W-contiguous layout) instead of
// striding over C planes per pixel; per-pixel states live in a per-thread row buffer.
#include "stats.h"

#include <omp.h>

#include <vector>

#include "../kernels/stats.h"

namespace fastst {
namespace {

template <typename T>
void stats_cpu_typed(const StatsArgs& args) {
  const T* x = static_cast<const T*>(args.x);
  const int64_t rows = args.B * args.H;
  const int64_t C = args.C;
  const int64_t W = args.W;
  const bool resize = args.h != args.H || args.w != args.W;
  const bool logits = args.from_logits;
  // Column taps are the same for every row: compute them once.
  std::vector<LinearTap> col(size_t(W > 0 ? W : 0));
  for (int64_t xo = 0; xo < W; ++xo) col[xo] = linear_tap(xo, args.w, W, args.align_corners);
  int32_t flags = 0;
#pragma omp parallel reduction(| : flags)
  {
    std::vector<int64_t> counts(size_t(args.B * C), 0);  // merged once at the end: no atomics
    std::vector<StatsState> state(static_cast<size_t>(W));
    std::vector<float> values(static_cast<size_t>(W));
#pragma omp for schedule(static)
    for (int64_t row = 0; row < rows; ++row) {
      const int64_t b = row / args.H;
      const int64_t y = row % args.H;
      const T* xb = x + b * args.stride_b;
      const LinearTap ty = resize ? linear_tap(y, args.h, args.H, args.align_corners) : LinearTap{y, y, 1.0f, 0.0f};
      for (int64_t c = 0; c < C; ++c) {
        const T* r0 = xb + c * args.stride_c + ty.i0 * args.stride_h;
        const T* r1 = xb + c * args.stride_c + ty.i1 * args.stride_h;
        const int64_t sw = args.stride_w;
        if (resize) {
          for (int64_t xo = 0; xo < W; ++xo) {
            const LinearTap& tx = col[xo];
            values[xo] = ty.l0 * (tx.l0 * to_float(r0[tx.i0 * sw]) + tx.l1 * to_float(r0[tx.i1 * sw])) +
                         ty.l1 * (tx.l0 * to_float(r1[tx.i0 * sw]) + tx.l1 * to_float(r1[tx.i1 * sw]));
          }
        } else {
          for (int64_t xo = 0; xo < W; ++xo) values[xo] = to_float(r0[xo * sw]);
        }
        if (c == 0) {
          for (int64_t xo = 0; xo < W; ++xo) state[xo] = stats_begin(values[xo], logits);
        } else {
          for (int64_t xo = 0; xo < W; ++xo) stats_step(state[xo], values[xo], int(c), logits);
        }
      }
      int64_t* counts_b = counts.data() + b * C;
      const int64_t out_row = (b * args.H + y) * W;
      for (int64_t xo = 0; xo < W; ++xo) {
        const PixelStats st = stats_end(state[xo], logits);
        args.m[out_row + xo] = st.m;
        args.a[out_row + xo] = uint8_t(st.a);
        counts_b[st.a] += 1;
        flags |= st.flags;
      }
    }
#pragma omp critical
    for (size_t i = 0; i < counts.size(); ++i) args.counts[i] += counts[i];
  }
  *args.flags |= flags;
}

}  // namespace

void stats_cpu(const StatsArgs& args) {
  switch (args.dtype) {
    case kFloat32: return stats_cpu_typed<float>(args);
    case kFloat16: return stats_cpu_typed<Half>(args);
    case kBFloat16: return stats_cpu_typed<BFloat16>(args);
  }
}

}  // namespace fastst
