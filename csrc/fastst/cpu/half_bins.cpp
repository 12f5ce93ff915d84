// half_bins (half_bins.h): an F16C kernel chosen at run time (vector_isa.h), else a portable
// loop; both give the same slots.
//
// Why F16C: vcvtps2ph rounds 8 floats to float16 in one instruction, exactly as half_bits_of
// does for normal float16 results; the portable conversion is a dozen integer operations with a
// subnormal branch, and it made the slot computation ~4x the cost of the histogram scatter that
// follows (1.7-2.7 ms vs 0.35-0.6 ms for 1M pixels on one core of the CI machine). vcvtps2ph
// ignores MXCSR's flush-to-zero for its float16 results, and a float32 denormal input rounds to
// a float16 zero either way, so torch.set_flush_denormal does not change the slots (tested).
#include "half_bins.h"

#include "../kernels/ias.h"
#include "vector_isa.h"
#ifdef FASTST_HAVE_X86_KERNELS
#include <immintrin.h>
#endif

namespace fastst {
namespace {

inline uint32_t slot(float m, uint8_t a, uint32_t min_bin, uint32_t max_bin, uint32_t bins) {
  const uint32_t bin = half_bits_of(m);
  return uint32_t(a) * bins + (bin < max_bin ? bin : max_bin) - min_bin;
}

void half_bins_portable(const float* m, const uint8_t* a, int64_t from, int64_t n, uint32_t min_bin,
                        uint32_t max_bin, uint32_t bins, uint32_t* index) {
  for (int64_t j = from; j < n; ++j) index[j] = slot(m[j], a[j], min_bin, max_bin, bins);
}

#ifdef FASTST_HAVE_X86_KERNELS
__attribute__((target("avx2,f16c"))) void half_bins_f16c(const float* m, const uint8_t* a, int64_t n,
                                                         uint32_t min_bin, uint32_t max_bin, uint32_t bins,
                                                         uint32_t* index) {
  const __m256i top = _mm256_set1_epi32(int32_t(max_bin)), low = _mm256_set1_epi32(int32_t(min_bin));
  const __m256i width = _mm256_set1_epi32(int32_t(bins));
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 values = _mm256_loadu_ps(m + j);
    const __m256i half = _mm256_cvtepu16_epi32(_mm256_cvtps_ph(values, _MM_FROUND_TO_NEAREST_INT));
    const __m256i classes = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(a + j)));
    const __m256i slots = _mm256_add_epi32(_mm256_mullo_epi32(classes, width),
                                           _mm256_sub_epi32(_mm256_min_epu32(half, top), low));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(index + j), slots);
  }
  half_bins_portable(m, a, j, n, min_bin, max_bin, bins, index);
}
#endif

}  // namespace

void half_bins(const float* m, const uint8_t* a, int64_t n, uint32_t min_bin, uint32_t max_bin, uint32_t bins,
               uint32_t* index) {
#ifdef FASTST_HAVE_X86_KERNELS
  if (use_x86_kernels()) return half_bins_f16c(m, a, n, min_bin, max_bin, bins, index);
#endif
  half_bins_portable(m, a, 0, n, min_bin, max_bin, bins, index);
}

}  // namespace fastst
