// Per-pixel arithmetic of the fused statistics pass, shared by cpu/stats.cpp and cuda/stats.cu.
// Every operation that rounds goes through the helpers of common.h (fadd/fmul never contracted,
// ffma always fused), so the CPU twin and the GPU produce the same bits (also from logits),
// whatever their loop organisation.
//
// For one output pixel of a (B, C, h, w) input, read the C channel values (bilinearly upsampled
// to (H, W) on the fly when asked, with the index/weight rules of F.interpolate), and produce
//   m = max_c p_c (float32), a = argmax_c p_c (lowest index on ties),
// where p = x (probabilities) or p = softmax(x) in float32 (logits): a = argmax of the logits,
// m = 1 / sum_c exp(x_c - x_a), the sum taken in class order.
#pragma once
#include "../common.h"

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
  float src = align_corners ? fmul(scale, float(dst)) : fsub(fmul(scale, fadd(float(dst), 0.5f)), 0.5f);
  if (src < 0.0f) src = 0.0f;
  LinearTap tap;
  tap.i0 = int64_t(src);
  if (tap.i0 > in_size - 1) tap.i0 = in_size - 1;
  tap.i1 = tap.i0 + (tap.i0 < in_size - 1 ? 1 : 0);
  tap.l1 = fsub(src, float(tap.i0));
  tap.l0 = fsub(1.0f, tap.l1);
  return tap;
}

// ATen's order: first along the row (w0 * x0 + w1 * x1), then across rows (h0 * r0 + h1 * r1).
FASTST_HD float lerp2(float l0, float a, float l1, float b) { return fadd(fmul(l0, a), fmul(l1, b)); }

// 2^(j/16) for j in [0, 16), each rounded to float32: the table of exp_nonpositive.
#define FASTST_EXP2_SIXTEENTHS                                                                      \
  {1.0f, 1.0442737340927124f, 1.0905077457427979f, 1.1387885808944702f, 1.1892070770263672f,      \
   1.2418577671051025f, 1.2968395948410034f, 1.3542555570602417f, 1.4142135381698608f,            \
   1.4768261909484863f, 1.5422108173370361f, 1.610490322113037f, 1.6817928552627563f,             \
   1.7562521696090698f, 1.8340080976486206f, 1.9152065515518188f}
#if defined(__CUDACC__)
__device__ const float kExp2SixteenthsDevice[16] = FASTST_EXP2_SIXTEENTHS;
#endif
inline constexpr float kExp2Sixteenths[16] = FASTST_EXP2_SIXTEENTHS;

FASTST_HD float exp2_sixteenths(uint32_t j) {
#if defined(__CUDA_ARCH__)
  return __ldg(kExp2SixteenthsDevice + j);  // read-only cache: lanes with different j do not serialise
#else
  return kExp2Sixteenths[j];
#endif
}

// The constants of exp_nonpositive (also used by the CPU vector kernels, cpu/exp_vector.cpp).
struct ExpConstants {
  static constexpr float kLowest = -87.0f;                  // exp is 0 at or below this
  static constexpr float kSixteenOverLn2 = 23.083120346069336f;
  static constexpr float kRoundShift = 12582912.0f;         // 1.5 * 2^23: adding it rounds to an integer
  static constexpr float kLn2OverSixteenHi = 0.043321698904037476f;
  static constexpr float kLn2OverSixteenLo = -1.1904088825787085e-10f;
  static constexpr float kSixth = 0.1666666716337204f;
};

// exp(x) for x <= 0 (0 for x <= -87), about 1 ulp, for the softmax of the statistics pass:
//   k = round(16 x / ln 2), r = x - k ln2/16 (|r| <= ln2/32, two FMAs: Cody-Waite),
//   exp(x) = 2^(k >> 4) * T[k & 15] * (1 + r + r^2 (1/2 + r/6)),  T[j] = 2^(j/16) (float32).
// A 16-entry table and a cubic instead of the classic ln 2 reduction and sextic: about half the
// arithmetic. Explicit FMAs (never contracted from a * b + c), so the CPU (scalar and vector
// kernels), CUDA and Triton evaluate the same operations and return the same bits. Branch-free:
// k comes out of the rounding step's bits (adding 1.5 * 2^23 leaves k in the low mantissa bits),
// 2^(k >> 4) is added to the exponent field as an integer ((k << 19) with the low 23 bits
// cleared; the result stays normal for x > -87), and the zero at or below -87 is a bit mask.
FASTST_HD float exp_nonpositive(float x) {
  using K = ExpConstants;
  // All ones unless x <= -87 or NaN. Such x go through the same operations (their table index is
  // still k & 15, in bounds; no trap) and the mask zeroes whatever they give: no clamp needed.
  const uint32_t in_range = 0u - uint32_t(x > K::kLowest);
  const float shifted = ffma(x, K::kSixteenOverLn2, K::kRoundShift);  // 1.5 * 2^23 + k
  const float k = fsub(shifted, K::kRoundShift);
  const float r = ffma(k, -K::kLn2OverSixteenLo, ffma(k, -K::kLn2OverSixteenHi, x));
  const uint32_t k_bits = float_to_bits(shifted);  // k in the low bits, two's complement
  const float t = exp2_sixteenths(k_bits & 15u);
  const float em1 = ffma(fmul(r, r), ffma(r, K::kSixth, 0.5f), r);  // exp(r) - 1
  const float e = ffma(t, em1, t);
  const uint32_t exponent = (k_bits << 19) & 0xff800000u;  // (k >> 4) << 23
  return bits_to_float((float_to_bits(e) + exponent) & in_range);
}

FASTST_HD bool is_finite(float v) { return (float_to_bits(v) & 0x7f800000u) != 0x7f800000u; }

// Flags raised by the pass (bitwise OR across pixels): what the value checks report.
enum StatsFlag : int { kNonFinite = 1, kOutOfUnitRange = 2 };

// Branch-free (the CPU loops vectorise): NaN/Inf -> kNonFinite; for probabilities, anything not
// in [0, 1] (NaN included) -> kOutOfUnitRange.
FASTST_HD int value_flags(float v, bool from_logits) {
  const int nonfinite = int((float_to_bits(v) & 0x7f800000u) == 0x7f800000u);
  const int outside = int(!(v >= 0.0f)) | int(!(v <= 1.0f));
  return nonfinite * kNonFinite + int(!from_logits) * outside * kOutOfUnitRange;
}

// Where the channel values of one output pixel come from: one input pixel (o00) or four, mixed
// with the weights of the two axes' taps. Offsets are in elements, channel excluded.
struct PixelSource {
  int64_t o00, o01, o10, o11;
  float h0, h1, w0, w1;
  bool resize;
};

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

template <typename T>
FASTST_HD float channel_value(const T* x, int64_t channel_offset, const PixelSource& s) {
  const T* base = x + channel_offset;
  if (!s.resize) return to_float(base[s.o00]);
  return lerp2(s.h0, lerp2(s.w0, to_float(base[s.o00]), s.w1, to_float(base[s.o01])),
               s.h1, lerp2(s.w0, to_float(base[s.o10]), s.w1, to_float(base[s.o11])));
}

struct PixelStats {
  float m;
  int a;
  int flags;
};

// One pixel, two passes over the channels: max/argmax (strict '>': the lowest index wins ties),
// then, for logits, the sum of exp(x_c - max) in class order.
template <typename T>
FASTST_HD PixelStats pixel_stats(const T* x, int64_t C, int64_t stride_c, const PixelSource& src,
                                 bool from_logits) {
  PixelStats out;
  float best = channel_value(x, 0, src);
  int arg = 0;
  int flags = value_flags(best, from_logits);
  for (int64_t c = 1; c < C; ++c) {
    const float v = channel_value(x, c * stride_c, src);
    flags |= value_flags(v, from_logits);
    if (v > best) {
      best = v;
      arg = int(c);
    }
  }
  if (from_logits) {
    float sum = 0.0f;
    for (int64_t c = 0; c < C; ++c) sum = fadd(sum, exp_nonpositive(fsub(channel_value(x, c * stride_c, src), best)));
    out.m = 1.0f / sum;
  } else {
    out.m = best + 0.0f;  // -0 becomes +0, so the float bits of m sort like its value
  }
  out.a = arg;
  out.flags = flags;
  return out;
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
