// Per-pixel arithmetic of the fused statistics pass, shared by cpu/stats.cpp and cuda/stats.cu so
// the CPU twin runs exactly the arithmetic the GPU runs.
//
// For one output pixel of a (B, C, h, w) input, read the C channel values (bilinearly upsampled
// to (H, W) on the fly when asked, with the index/weight rules of F.interpolate), and produce
//   m = max_c p_c (float32), a = argmax_c p_c (lowest index on ties),
// where p = x (probabilities) or p = softmax(x) computed in float32 (logits).
#pragma once
#include "../common.h"

#if !defined(__CUDA_ARCH__)
#include <cmath>
#endif

namespace fastst {

// One axis of a bilinear resize: source rows/columns i0, i1 and their weights l0, l1, computed
// like ATen's area_pixel_compute_scale / area_pixel_compute_source_index in float.
struct LinearTap {
  int64_t i0, i1;
  float l0, l1;
};

FASTST_HD LinearTap linear_tap(int64_t dst, int64_t in_size, int64_t out_size, bool align_corners) {
  float scale;
  if (align_corners) {
    scale = out_size > 1 ? float(in_size - 1) / float(out_size - 1) : 0.0f;
  } else {
    scale = float(in_size) / float(out_size);
  }
  float src = align_corners ? scale * float(dst) : scale * (float(dst) + 0.5f) - 0.5f;
  if (src < 0.0f) src = 0.0f;
  LinearTap tap;
  tap.i0 = int64_t(src);
  if (tap.i0 > in_size - 1) tap.i0 = in_size - 1;
  tap.i1 = tap.i0 + (tap.i0 < in_size - 1 ? 1 : 0);
  tap.l1 = src - float(tap.i0);
  tap.l0 = 1.0f - tap.l1;
  return tap;
}

// Where the channel values of one output pixel come from: either one input pixel (offset) or
// four, mixed with the weights of the two axes' taps. Offsets are in elements, channel excluded.
struct PixelSource {
  int64_t o00, o01, o10, o11;
  float h0, h1, w0, w1;
  bool resize;
};

template <typename T>
FASTST_HD float channel_value(const T* x, int64_t channel_offset, const PixelSource& s) {
  const T* base = x + channel_offset;
  if (!s.resize) return to_float(base[s.o00]);
  return s.h0 * (s.w0 * to_float(base[s.o00]) + s.w1 * to_float(base[s.o01])) +
         s.h1 * (s.w0 * to_float(base[s.o10]) + s.w1 * to_float(base[s.o11]));
}

FASTST_HD bool is_finite(float v) {
  return (float_to_bits(v) & 0x7f800000u) != 0x7f800000u;
}

// Flags raised by the pass (bitwise OR across pixels): what the value checks report.
enum StatsFlag : int { kNonFinite = 1, kOutOfUnitRange = 2 };

struct PixelStats {
  float m;
  int a;
  int flags;
};

// Running state of one pixel while its channels are read in order c = 0, 1, ..., C - 1. For
// logits an online softmax keeps the running max and the sum of exp(v - max), so the input is
// read once and m = exp(0) / sum = 1 / sum.
struct StatsState {
  float best;
  float sum;
  int arg;
  int flags;
};

FASTST_HD StatsState stats_begin(float v, bool from_logits) {
  StatsState s;
  s.best = v;
  s.sum = 1.0f;
  s.arg = 0;
  s.flags = is_finite(v) ? 0 : kNonFinite;
  if (!from_logits && !(v >= 0.0f && v <= 1.0f)) s.flags |= kOutOfUnitRange;
  return s;
}

FASTST_HD void stats_step(StatsState& s, float v, int c, bool from_logits) {
  if (!is_finite(v)) s.flags |= kNonFinite;
  if (from_logits) {
    if (v > s.best) {
      s.sum = s.sum * expf(s.best - v) + 1.0f;
      s.best = v;
      s.arg = c;
    } else {
      s.sum += expf(v - s.best);
    }
  } else {
    if (!(v >= 0.0f && v <= 1.0f)) s.flags |= kOutOfUnitRange;
    if (v > s.best) {  // strict: the lowest index wins ties
      s.best = v;
      s.arg = c;
    }
  }
}

FASTST_HD PixelStats stats_end(const StatsState& s, bool from_logits) {
  PixelStats out;
  // "+ 0.0f" turns -0 into +0 so the float bits of m sort like its value.
  out.m = from_logits ? 1.0f / s.sum : s.best + 0.0f;
  out.a = s.arg;
  out.flags = s.flags;
  return out;
}

template <typename T>
FASTST_HD PixelStats pixel_stats(const T* x, int64_t C, int64_t stride_c, const PixelSource& src,
                                 bool from_logits) {
  StatsState s = stats_begin(channel_value(x, 0, src), from_logits);
  for (int64_t c = 1; c < C; ++c) stats_step(s, channel_value(x, c * stride_c, src), int(c), from_logits);
  return stats_end(s, from_logits);
}

// Where pixel (y, x) of the output reads from, given the input's strides (elements).
FASTST_HD PixelSource pixel_source(int64_t y, int64_t xo, int64_t h, int64_t w, int64_t H, int64_t W,
                                   int64_t stride_h, int64_t stride_w, bool align_corners) {
  PixelSource s;
  s.resize = (h != H) || (w != W);
  if (!s.resize) {
    s.o00 = s.o01 = s.o10 = s.o11 = y * stride_h + xo * stride_w;
    s.h0 = s.w0 = 1.0f;
    s.h1 = s.w1 = 0.0f;
    return s;
  }
  const LinearTap ty = linear_tap(y, h, H, align_corners);
  const LinearTap tx = linear_tap(xo, w, W, align_corners);
  s.o00 = ty.i0 * stride_h + tx.i0 * stride_w;
  s.o01 = ty.i0 * stride_h + tx.i1 * stride_w;
  s.o10 = ty.i1 * stride_h + tx.i0 * stride_w;
  s.o11 = ty.i1 * stride_h + tx.i1 * stride_w;
  s.h0 = ty.l0;
  s.h1 = ty.l1;
  s.w0 = tx.l0;
  s.w1 = tx.l1;
  return s;
}

// Arguments of the pass, identical for both devices. Strides are in elements.
struct StatsArgs {
  const void* x;
  int dtype;
  int64_t B, C, h, w, H, W;
  int64_t stride_b, stride_c, stride_h, stride_w;
  bool from_logits, align_corners;
  float* m;        // (B, H, W)
  uint8_t* a;      // (B, H, W)
  int64_t* counts; // (B, C), zero-initialised by the caller
  int32_t* flags;  // (1,), zero-initialised by the caller
};

}  // namespace fastst
