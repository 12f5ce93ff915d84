// Per-class arithmetic of the IAS selector (docs/ops.md §1), shared by cpu/ias.cpp and
// cuda/ias.cu and transcribed operation by operation from fastst/ops/reference.py, so every
// backend rounds identically. Every floating-point operation goes through dmul/dadd/dsub: on the
// device these are the _rn intrinsics, which nvcc never contracts into an FMA; on the host the
// build uses -ffp-contract=off.
#pragma once
#include <cmath>

#include "../common.h"

namespace fastst {

// Arguments of the selection (order statistics, EMA, labels), identical for both devices.
struct IasArgs {
  const float* m;            // (B, HW) max probability, >= +0
  const uint8_t* a;          // (B, HW) argmax
  const int64_t* counts;     // (B, C) pixels per (image, argmax class)
  int64_t B, C, HW;
  const double* theta_in;    // (C,)
  double* theta_out;         // (C,)
  double* theta_per_instance;// (G, C), G = ceil(B / group)
  uint8_t* labels;           // (B, HW)
  double alpha, beta, gamma;
  bool official;             // docs/ops.md §1.2 when true, else 1.1 ("paper")
  int64_t group;             // images per instance (1 in paper mode)
  int32_t* hist;             // CUDA official mode: (G, C, kOfficialBins) workspace, zeroed
};


// ---- theta ** gamma: double-double binary powering, rounded once (reference.theta_pow) ----
struct DoubleDouble {
  double hi, lo;
};

FASTST_HD void veltkamp_split(double a, double& hi, double& lo) {
  const double c = dmul(a, 134217729.0);
  hi = dsub(c, dsub(c, a));
  lo = dsub(a, hi);
}

FASTST_HD DoubleDouble dd_mul(DoubleDouble a, DoubleDouble b) {
  const double p = dmul(a.hi, b.hi);
  double a_hi, a_lo, b_hi, b_lo;
  veltkamp_split(a.hi, a_hi, a_lo);
  veltkamp_split(b.hi, b_hi, b_lo);
  double e = dadd(dadd(dadd(dsub(dmul(a_hi, b_hi), p), dmul(a_hi, b_lo)), dmul(a_lo, b_hi)), dmul(a_lo, b_lo));
  e = dadd(e, dadd(dmul(a.hi, b.lo), dmul(a.lo, b.hi)));
  const double hi = dadd(p, e);
  return DoubleDouble{hi, dsub(e, dsub(hi, p))};
}

FASTST_HD double theta_pow(double theta, double gamma) {
  // Integer exponents up to 2^62 use binary powering; others (and larger ones, which would
  // overflow the integer) use pow, exactly as reference.theta_pow decides.
  if (!(gamma <= 4611686018427387904.0) || gamma != floor(gamma)) return pow(theta, gamma);
  const long long n0 = (long long)gamma;
  long long n = n0;
  DoubleDouble r{1.0, 0.0};
  DoubleDouble b{theta, 0.0};
  while (n) {
    if (n & 1) r = dd_mul(r, b);
    n >>= 1;
    if (n) b = dd_mul(b, b);
  }
  return dadd(r.hi, r.lo);
}

// ---- mode "paper" (docs/ops.md §1.1) ----
// Rank r (0-based, in descending order) of psi among the n values of a class; n >= 1.
FASTST_HD int64_t paper_rank(double k, int64_t n) {
  double r = floor(dmul(k, (double)n));
  if (r < 0.0) r = 0.0;
  if (r > (double)(n - 1)) r = (double)(n - 1);
  return (int64_t)r;
}

FASTST_HD double paper_ema(double theta, double psi, double beta) {
  return dadd(dmul(beta, theta), dmul(dsub(1.0, beta), psi));
}

// ---- mode "official" (docs/ops.md §1.2): numpy.percentile(arr, q), "linear", arr = [theta] + values ----
// Where the two order statistics lo = sorted(arr)[j_lo], hi = sorted(arr)[j_hi] come from and how
// they are mixed; n = number of values (arr has n + 1 elements).
struct PercentilePlan {
  int64_t j_lo, j_hi;
  double t;
};

FASTST_HD PercentilePlan official_plan(double k, int64_t n) {
  const double q = dmul(100.0, dsub(1.0, k));
  const double quantile = q / 100.0;  // IEEE division, correctly rounded on host and device
  const double v = dmul((double)n, quantile);  // (len(arr) - 1) * quantile
  PercentilePlan plan;
  if (v >= (double)n) {  // at or past the last element: lo = hi = max(arr)
    plan.j_lo = plan.j_hi = n;
    plan.t = 0.0;
    return plan;
  }
  double i = floor(v);
  plan.t = dsub(v, i);
  if (i < 0.0) i = 0.0;
  plan.j_lo = (int64_t)i;
  plan.j_hi = plan.j_lo + 1 <= n ? plan.j_lo + 1 : n;
  return plan;
}

// Index into the class's sorted values of sorted(arr)[j], or -1 when it is the seed theta,
// which sits right after the n_below values smaller than it.
FASTST_HD int64_t official_source(int64_t j, int64_t n_below) {
  if (j == n_below) return -1;
  return j < n_below ? j : j - 1;
}

FASTST_HD double official_lerp(double lo, double hi, double t) {
  const double diff = dsub(hi, lo);
  return t < 0.5 ? dadd(lo, dmul(diff, t)) : dsub(hi, dmul(diff, dsub(1.0, t)));
}

// theta <- fl64(beta * theta) + double(fl32(fl32(1 - beta) * fl32(psi))), then >= 1 -> 0.999.
FASTST_HD double official_ema(double theta, double psi, double beta) {
  const float psi32 = (float)psi;
  const float one_minus_beta = (float)dsub(1.0, beta);
  double out = dadd(dmul(beta, theta), (double)fmul(psi32, one_minus_beta));
  return out >= 1.0 ? 0.999 : out;
}

// float32 -> float16 bits, round to nearest even (as torch's .half() and NumPy's astype), for
// every input. Branch-free (the three cases are computed and selected with masks), so the CPU
// loop vectorises: overflow/inf/nan, subnormal (via a float add that rounds at 2^-24), normal
// (integer rounding of the mantissa with ties to even).
FASTST_HD uint16_t half_bits_of(float f) {
  const uint32_t u = float_to_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t magnitude = u & 0x7fffffffu;
  const uint32_t big = magnitude > 0x7f800000u ? 0x7e00u : 0x7c00u;  // nan : overflow or inf
  const uint32_t subnormal = float_to_bits(fadd(bits_to_float(magnitude), 0.5f)) - 0x3f000000u;
  const uint32_t normal = (magnitude + 0xc8000fffu + ((magnitude >> 13) & 1u)) >> 13;
  const uint32_t half = magnitude >= 0x47800000u ? big : magnitude < 0x38800000u ? subnormal : normal;
  return (uint16_t)(sign | half);
}

// The float32 threshold equivalent to comparing a float32 m with the float64 theta in double:
// m >= theta  <=>  m >= smallest float32 >= theta   (official, `>=`),
// m >  theta  <=>  m >  largest float32 <= theta    (paper, `>`).
// Lets the label pass compare in float32 against a per-class table.
FASTST_HD float float_threshold(double theta, bool strict) {
  float f = (float)theta;
  if (!strict && (double)f < theta) f = nextafterf(f, INFINITY);
  if (strict && (double)f > theta) f = nextafterf(f, -INFINITY);
  return f;
}

FASTST_HD uint8_t ias_label_f32(float m, int a, float threshold_a, bool strict) {
  const bool keep = strict ? m > threshold_a : m >= threshold_a;
  return keep ? (uint8_t)a : (uint8_t)255;
}

}  // namespace fastst
