// Small helpers shared by the CPU and CUDA kernels: the host/device qualifier, input dtype codes,
// and bit-exact float16/bfloat16 -> float32 widening without any CUDA or torch header.
#pragma once
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define FASTST_HD __host__ __device__ __forceinline__
#else
#define FASTST_HD inline
#endif

// Hot CPU loops get an AVX2 clone next to the baseline x86-64 one, chosen at load time
// (GCC/Clang function multiversioning), so one wheel runs everywhere and uses wide vectors where
// the CPU has them. -ffp-contract=off still holds: no FMA is introduced.
#if !defined(__CUDACC__) && defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTST_CPU_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FASTST_CPU_CLONES
#endif

namespace fastst {

// Input dtype codes, as passed from Python (fastst/ops/_library.py::DTYPE_CODES).
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct Half { uint16_t bits; };
struct BFloat16 { uint16_t bits; };

FASTST_HD float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

FASTST_HD uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

// Arithmetic that is never contracted into a fused multiply-add: the _rn intrinsics on the device
// (nvcc contracts plain a * b + c by default), plain operators on the host (built with
// -ffp-contract=off). ffma is the explicit fused multiply-add, rounded once on every device. Code shared by the CPU and CUDA kernels uses these wherever the CPU twin
// must round exactly like the GPU.
#if defined(__CUDA_ARCH__)
FASTST_HD float fadd(float a, float b) { return __fadd_rn(a, b); }
FASTST_HD float fsub(float a, float b) { return __fsub_rn(a, b); }
FASTST_HD float fmul(float a, float b) { return __fmul_rn(a, b); }
FASTST_HD double dadd(double a, double b) { return __dadd_rn(a, b); }
FASTST_HD double dsub(double a, double b) { return __dsub_rn(a, b); }
FASTST_HD double dmul(double a, double b) { return __dmul_rn(a, b); }
FASTST_HD float ffma(float a, float b, float c) { return __fmaf_rn(a, b, c); }
#else
FASTST_HD float fadd(float a, float b) { return a + b; }
FASTST_HD float fsub(float a, float b) { return a - b; }
FASTST_HD float fmul(float a, float b) { return a * b; }
FASTST_HD double dadd(double a, double b) { return a + b; }
FASTST_HD double dsub(double a, double b) { return a - b; }
FASTST_HD double dmul(double a, double b) { return a * b; }
FASTST_HD float ffma(float a, float b, float c) { return __builtin_fmaf(a, b, c); }
#endif

FASTST_HD float to_float(float v) { return v; }
FASTST_HD float to_float(BFloat16 v) { return bits_to_float(uint32_t(v.bits) << 16); }

// IEEE binary16 -> binary32, exact for every pattern (subnormals, inf, nan included).
FASTST_HD float to_float(Half v) {
  const uint32_t sign = uint32_t(v.bits & 0x8000u) << 16;
  const uint32_t exponent = (v.bits >> 10) & 0x1fu;
  uint32_t mantissa = v.bits & 0x3ffu;
  if (exponent == 0x1fu) return bits_to_float(sign | 0x7f800000u | (mantissa << 13));
  if (exponent != 0) return bits_to_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
  if (mantissa == 0) return bits_to_float(sign);
  // Subnormal: value = mantissa * 2^-24, exact in float32.
  const float magnitude = float(mantissa) * 5.9604644775390625e-08f;
  return sign ? -magnitude : magnitude;
}

}  // namespace fastst
