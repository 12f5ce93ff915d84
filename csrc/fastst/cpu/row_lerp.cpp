// lerp_row (row_lerp.h): an AVX2 kernel chosen at run time (vector_isa.h), else a portable loop.
//
// Why: an upsample's 8 consecutive outputs read at most 8 consecutive source values, so one
// load of that window and two in-register permutes replace two 8-element gathers (slow on the
// CI machine's cores: the horizontal lerp took ~8 % of the pass from 1/8-resolution logits).
// Groups whose taps do not fit one window (downsampling, the row's right edge) take the loop.
#include "row_lerp.h"

#include "../kernels/stats.h"
#include "vector_isa.h"
#ifdef FASTST_HAVE_X86_KERNELS
#include <immintrin.h>
#endif

namespace fastst {
namespace {

void lerp_row_portable(const float* src, const int32_t* i0, const int32_t* i1, const float* l0, const float* l1,
                       int64_t from, int64_t to, float* dst) {
  for (int64_t x = from; x < to; ++x) dst[x] = lerp2(l0[x], src[i0[x]], l1[x], src[i1[x]]);
}

#ifdef FASTST_HAVE_X86_KERNELS
__attribute__((target("avx2"))) void lerp_row_avx2(const float* src, int64_t w, const int32_t* i0, const int32_t* i1,
                                                   const float* l0, const float* l1, int64_t W, float* dst) {
  const __m256i seven = _mm256_set1_epi32(7);
  int64_t x = 0;
  for (; x + 8 <= W; x += 8) {
    const int32_t base = i0[x];
    const __m256i first = _mm256_set1_epi32(base);
    const __m256i idx0 = _mm256_sub_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(i0 + x)), first);
    const __m256i idx1 = _mm256_sub_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(i1 + x)), first);
    // every offset in [0, 7] (as unsigned: negatives fail too) and the window inside the row
    const __m256i outside = _mm256_or_si256(_mm256_cmpgt_epi32(_mm256_max_epu32(idx0, idx1), seven),
                                            _mm256_cmpgt_epi32(_mm256_setzero_si256(), _mm256_min_epi32(idx0, idx1)));
    if (base + 8 > w || !_mm256_testz_si256(outside, outside)) {
      lerp_row_portable(src, i0, i1, l0, l1, x, x + 8, dst);
      continue;
    }
    const __m256 window = _mm256_loadu_ps(src + base);
    const __m256 a = _mm256_permutevar8x32_ps(window, idx0), b = _mm256_permutevar8x32_ps(window, idx1);
    _mm256_storeu_ps(dst + x, _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(l0 + x), a),
                                            _mm256_mul_ps(_mm256_loadu_ps(l1 + x), b)));
  }
  lerp_row_portable(src, i0, i1, l0, l1, x, W, dst);
}
#endif

}  // namespace

void lerp_row(const float* src, int64_t w, const int32_t* i0, const int32_t* i1, const float* l0, const float* l1,
              int64_t W, float* dst) {
#ifdef FASTST_HAVE_X86_KERNELS
  if (use_x86_kernels()) return lerp_row_avx2(src, w, i0, i1, l0, l1, W, dst);
#endif
  lerp_row_portable(src, i0, i1, l0, l1, 0, W, dst);
}

}  // namespace fastst
