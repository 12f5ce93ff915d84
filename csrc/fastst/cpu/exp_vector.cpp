// exp_nonpositive over arrays (exp_vector.h): AVX-512 (16 lanes) or AVX2+FMA (8 lanes) kernels,
// else the scalar formula.
//
// Why hand-written: the formula's 16-entry table lookup is one in-register permute here
// (vpermps), where an auto-vectorised loop would use a gather, which is slower than the whole
// polynomial on the CI machine's cores. Each vector operation below is the scalar formula's
// operation on 8 or 16 lanes (same constants, same FMAs), so every path gives the same bits.
#include "exp_vector.h"

#include "../kernels/stats.h"
#include "vector_isa.h"
#ifdef FASTST_HAVE_X86_KERNELS
#include <immintrin.h>
#endif

namespace fastst {
namespace {

using K = ExpConstants;

void exp_sum_portable(const float* values, int64_t stride, int64_t n, int64_t C, const float* best, float* sum) {
  for (int64_t j = 0; j < n; ++j) sum[j] = 0.0f;
  for (int64_t c = 0; c < C; ++c) {
    const float* v = values + c * stride;
    for (int64_t j = 0; j < n; ++j) sum[j] = fadd(sum[j], exp_nonpositive(fsub(v[j], best[j])));
  }
}

void exp_shifted_portable(const float* x, const float* shift, int64_t n, float* out) {
  for (int64_t j = 0; j < n; ++j) out[j] = exp_nonpositive(shift ? fsub(x[j], shift[j]) : x[j]);
}

#ifdef FASTST_HAVE_X86_KERNELS
__attribute__((target("avx512f"))) inline __m512 exp16(__m512 x, __m512 table) {
  const __m512 lowest = _mm512_set1_ps(K::kLowest);
  const __mmask16 in_range = _mm512_cmp_ps_mask(x, lowest, _CMP_GT_OQ);  // false for NaN
  const __m512 round_shift = _mm512_set1_ps(K::kRoundShift);
  const __m512 shifted = _mm512_fmadd_ps(x, _mm512_set1_ps(K::kSixteenOverLn2), round_shift);
  const __m512 k = _mm512_sub_ps(shifted, round_shift);
  __m512 r = _mm512_fmadd_ps(k, _mm512_set1_ps(-K::kLn2OverSixteenHi), x);
  r = _mm512_fmadd_ps(k, _mm512_set1_ps(-K::kLn2OverSixteenLo), r);
  const __m512i k_bits = _mm512_castps_si512(shifted);
  const __m512 t = _mm512_permutexvar_ps(k_bits, table);  // uses the low 4 bits: k & 15
  const __m512 em1 = _mm512_fmadd_ps(_mm512_mul_ps(r, r), _mm512_fmadd_ps(r, _mm512_set1_ps(K::kSixth),
                                                                          _mm512_set1_ps(0.5f)), r);
  const __m512 e = _mm512_fmadd_ps(t, em1, t);
  const __m512i exponent = _mm512_and_si512(_mm512_slli_epi32(k_bits, 19), _mm512_set1_epi32(int32_t(0xff800000u)));
  return _mm512_castsi512_ps(_mm512_maskz_add_epi32(in_range, _mm512_castps_si512(e), exponent));
}

__attribute__((target("avx512f"))) void exp_sum_avx512(const float* values, int64_t stride, int64_t n, int64_t C,
                                                       const float* best, float* sum) {
  const __m512 table = _mm512_loadu_ps(kExp2Sixteenths);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 lanes = n - j >= 16 ? __mmask16(0xffff) : __mmask16((1u << (n - j)) - 1u);
    const __m512 b = _mm512_maskz_loadu_ps(lanes, best + j);
    __m512 s = _mm512_setzero_ps();
    for (int64_t c = 0; c < C; ++c) {
      const __m512 v = _mm512_maskz_loadu_ps(lanes, values + c * stride + j);
      s = _mm512_add_ps(s, exp16(_mm512_sub_ps(v, b), table));
    }
    _mm512_mask_storeu_ps(sum + j, lanes, s);
  }
}

__attribute__((target("avx512f"))) void exp_shifted_avx512(const float* x, const float* shift, int64_t n,
                                                           float* out) {
  const __m512 table = _mm512_loadu_ps(kExp2Sixteenths);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 lanes = n - j >= 16 ? __mmask16(0xffff) : __mmask16((1u << (n - j)) - 1u);
    __m512 v = _mm512_maskz_loadu_ps(lanes, x + j);
    if (shift) v = _mm512_sub_ps(v, _mm512_maskz_loadu_ps(lanes, shift + j));
    _mm512_mask_storeu_ps(out + j, lanes, exp16(v, table));
  }
}

__attribute__((target("avx2,fma"))) inline __m256 exp8(__m256 x, __m256 table_low, __m256 table_high) {
  const __m256 lowest = _mm256_set1_ps(K::kLowest);
  const __m256 in_range = _mm256_cmp_ps(x, lowest, _CMP_GT_OQ);  // all ones, or zero (also for NaN)
  const __m256 round_shift = _mm256_set1_ps(K::kRoundShift);
  const __m256 shifted = _mm256_fmadd_ps(x, _mm256_set1_ps(K::kSixteenOverLn2), round_shift);
  const __m256 k = _mm256_sub_ps(shifted, round_shift);
  __m256 r = _mm256_fmadd_ps(k, _mm256_set1_ps(-K::kLn2OverSixteenHi), x);
  r = _mm256_fmadd_ps(k, _mm256_set1_ps(-K::kLn2OverSixteenLo), r);
  const __m256i k_bits = _mm256_castps_si256(shifted);
  // T[k & 15]: both halves permuted by the low 3 bits, then bit 3 (moved to the sign) picks one
  const __m256 t = _mm256_blendv_ps(_mm256_permutevar8x32_ps(table_low, k_bits),
                                    _mm256_permutevar8x32_ps(table_high, k_bits),
                                    _mm256_castsi256_ps(_mm256_slli_epi32(k_bits, 28)));
  const __m256 em1 = _mm256_fmadd_ps(_mm256_mul_ps(r, r), _mm256_fmadd_ps(r, _mm256_set1_ps(K::kSixth),
                                                                          _mm256_set1_ps(0.5f)), r);
  const __m256 e = _mm256_fmadd_ps(t, em1, t);
  const __m256i exponent = _mm256_and_si256(_mm256_slli_epi32(k_bits, 19), _mm256_set1_epi32(int32_t(0xff800000u)));
  return _mm256_and_ps(_mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(e), exponent)), in_range);
}

__attribute__((target("avx2,fma"))) void exp_sum_avx2(const float* values, int64_t stride, int64_t n, int64_t C,
                                                      const float* best, float* sum) {
  const __m256 table_low = _mm256_loadu_ps(kExp2Sixteenths), table_high = _mm256_loadu_ps(kExp2Sixteenths + 8);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 b = _mm256_loadu_ps(best + j);
    __m256 s = _mm256_setzero_ps();
    for (int64_t c = 0; c < C; ++c) {
      s = _mm256_add_ps(s, exp8(_mm256_sub_ps(_mm256_loadu_ps(values + c * stride + j), b), table_low, table_high));
    }
    _mm256_storeu_ps(sum + j, s);
  }
  if (j < n) exp_sum_portable(values + j, stride, n - j, C, best + j, sum + j);
}

__attribute__((target("avx2,fma"))) void exp_shifted_avx2(const float* x, const float* shift, int64_t n,
                                                          float* out) {
  const __m256 table_low = _mm256_loadu_ps(kExp2Sixteenths), table_high = _mm256_loadu_ps(kExp2Sixteenths + 8);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    __m256 v = _mm256_loadu_ps(x + j);
    if (shift) v = _mm256_sub_ps(v, _mm256_loadu_ps(shift + j));
    _mm256_storeu_ps(out + j, exp8(v, table_low, table_high));
  }
  if (j < n) exp_shifted_portable(x + j, shift ? shift + j : nullptr, n - j, out + j);
}
#endif

}  // namespace

void exp_sum_classes(const float* values, int64_t stride, int64_t n, int64_t C, const float* best, float* sum) {
#ifdef FASTST_HAVE_X86_KERNELS
  if (use_avx512_kernels()) return exp_sum_avx512(values, stride, n, C, best, sum);
  if (use_x86_kernels()) return exp_sum_avx2(values, stride, n, C, best, sum);
#endif
  exp_sum_portable(values, stride, n, C, best, sum);
}

void exp_shifted(const float* x, const float* shift, int64_t n, float* out) {
#ifdef FASTST_HAVE_X86_KERNELS
  if (use_avx512_kernels()) return exp_shifted_avx512(x, shift, n, out);
  if (use_x86_kernels()) return exp_shifted_avx2(x, shift, n, out);
#endif
  exp_shifted_portable(x, shift, n, out);
}

}  // namespace fastst
