// max_argmax_probs / max_argmax_logits (max_argmax.h): an AVX-512 or AVX2 kernel chosen at run
// time (vector_isa.h), else a portable loop; all give the same bits. Both screens are the largest
// value bits seen, masked: raw bits for probabilities, without the sign for logits.
//
// Why intrinsics: the AVX2 kernel keeps the running max and argmax of 32 pixels in registers
// while it walks a sweep of channel rows: one load, compare, blend and max per 8 values (the
// AVX-512 one: 64 pixels, per 16 values; from probabilities, B = 2, two threads, 2.6-3.1 ms
// instead of 3.1-3.4 ms). The
// portable loop walks every channel of one pixel at a time (GCC does not vectorise it across
// pixels).
#include "max_argmax.h"

#include <cstring>

#include "vector_isa.h"
#ifdef FASTST_HAVE_X86_KERNELS
#include <immintrin.h>
#endif

namespace fastst {
namespace {

constexpr uint32_t kOneBits = 0x3f800000u;       // 1.0f
constexpr uint32_t kInfinityBits = 0x7f800000u;  // +inf: |v| bits at or above it are Inf or NaN

inline uint32_t bits_of(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  return u;
}

// Pixels [from, n) one at a time; returns the largest (value bits & mask) seen.
uint32_t max_argmax_scalar(const float* const* rows, int64_t from, int64_t n, int64_t C, uint32_t mask,
                           float* best, int32_t* arg) {
  uint32_t high = 0;
  for (int64_t t = from; t < n; ++t) {
    float b = rows[0][t];
    int32_t a = 0;
    high = (bits_of(b) & mask) > high ? (bits_of(b) & mask) : high;
    for (int64_t c = 1; c < C; ++c) {
      const float v = rows[c][t];
      high = (bits_of(v) & mask) > high ? (bits_of(v) & mask) : high;
      if (v > b) b = v, a = int32_t(c);
    }
    best[t] = b;
    arg[t] = a;
  }
  return high;
}

#ifdef FASTST_HAVE_X86_KERNELS
// kGroups x 8 pixels per step, their running max and argmax in registers. The max is a max_ps
// (v > b ? v : b, so NaNs and a -0.0 after a +0.0 never win: the scalar rule) and the argmax a
// blend on the compare of the value with the max before it, off the max's dependency chain.
constexpr int kGroups = 4;
// Channels per sweep: the C rows are walked in sweeps of about this many channels over the whole
// tile, the running max and argmax parked in best/arg (L1/L2) between sweeps. Reading 19 rows
// 128 bytes at a time defeats the hardware prefetcher; a few rows read in long runs do not
// (2 threads, B = 2, 19 x 512 x 1024: 5.2 ms for one sweep of 19 rows, 2.9 ms for sweeps of
// 5-7 rows over tiles of 8,192 pixels; a plain read of the same bytes takes ~2.5 ms).
constexpr int64_t kSweepChannels = 6;

__attribute__((target("avx2"))) void sweep_avx2(const float* const* rows, int64_t steps, int64_t c0, int64_t c1,
                                                __m256i mask, __m256i& high, float* best, int32_t* arg) {
  for (int64_t t = 0; t < steps * 8 * kGroups; t += 8 * kGroups) {
    __m256 b[kGroups], a[kGroups];  // running max; class ids as bit patterns
    for (int g = 0; g < kGroups; ++g) {
      if (c0 == 0) {
        b[g] = _mm256_loadu_ps(rows[0] + t + 8 * g);
        a[g] = _mm256_setzero_ps();
        high = _mm256_max_epu32(high, _mm256_and_si256(_mm256_castps_si256(b[g]), mask));
      } else {
        b[g] = _mm256_loadu_ps(best + t + 8 * g);
        a[g] = _mm256_loadu_ps(reinterpret_cast<const float*>(arg + t + 8 * g));
      }
    }
    for (int64_t c = c0 == 0 ? 1 : c0; c < c1; ++c) {
      const __m256 c_bits = _mm256_castsi256_ps(_mm256_set1_epi32(int32_t(c)));
      const float* row = rows[c] + t;
      for (int g = 0; g < kGroups; ++g) {
        const __m256 v = _mm256_loadu_ps(row + 8 * g);
        high = _mm256_max_epu32(high, _mm256_and_si256(_mm256_castps_si256(v), mask));
        a[g] = _mm256_blendv_ps(a[g], c_bits, _mm256_cmp_ps(v, b[g], _CMP_GT_OQ));
        b[g] = _mm256_max_ps(v, b[g]);
      }
    }
    for (int g = 0; g < kGroups; ++g) {
      _mm256_storeu_ps(best + t + 8 * g, b[g]);
      _mm256_storeu_ps(reinterpret_cast<float*>(arg + t + 8 * g), a[g]);
    }
  }
}

__attribute__((target("avx2"))) uint32_t max_argmax_avx2(const float* const* rows, int64_t n, int64_t C,
                                                         uint32_t mask, float* best, int32_t* arg) {
  __m256i high = _mm256_setzero_si256();
  const __m256i lanes_mask = _mm256_set1_epi32(int32_t(mask));
  const int64_t steps = n / (8 * kGroups);
  const int64_t sweeps = (C + kSweepChannels - 1) / kSweepChannels;
  for (int64_t s = 0; s < sweeps; ++s) sweep_avx2(rows, steps, s * C / sweeps, (s + 1) * C / sweeps, lanes_mask, high, best, arg);
  uint32_t lanes[8];
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(lanes), high);
  uint32_t largest = max_argmax_scalar(rows, steps * 8 * kGroups, n, C, mask, best, arg);
  for (uint32_t lane : lanes) largest = lane > largest ? lane : largest;
  return largest;
}
// The AVX-512 twin of sweep_avx2: 16 lanes per register, the argmax a masked move of the class id.
__attribute__((target("avx512f"))) void sweep_avx512(const float* const* rows, int64_t steps, int64_t c0, int64_t c1,
                                                     __m512i mask, __m512i& high, float* best, int32_t* arg) {
  for (int64_t t = 0; t < steps * 16 * kGroups; t += 16 * kGroups) {
    __m512 b[kGroups];
    __m512i a[kGroups];
    for (int g = 0; g < kGroups; ++g) {
      if (c0 == 0) {
        b[g] = _mm512_loadu_ps(rows[0] + t + 16 * g);
        a[g] = _mm512_setzero_si512();
        high = _mm512_max_epu32(high, _mm512_and_si512(_mm512_castps_si512(b[g]), mask));
      } else {
        b[g] = _mm512_loadu_ps(best + t + 16 * g);
        a[g] = _mm512_loadu_si512(arg + t + 16 * g);
      }
    }
    for (int64_t c = c0 == 0 ? 1 : c0; c < c1; ++c) {
      const __m512i class_id = _mm512_set1_epi32(int32_t(c));
      const float* row = rows[c] + t;
      for (int g = 0; g < kGroups; ++g) {
        const __m512 v = _mm512_loadu_ps(row + 16 * g);
        high = _mm512_max_epu32(high, _mm512_and_si512(_mm512_castps_si512(v), mask));
        a[g] = _mm512_mask_mov_epi32(a[g], _mm512_cmp_ps_mask(v, b[g], _CMP_GT_OQ), class_id);
        b[g] = _mm512_max_ps(v, b[g]);
      }
    }
    for (int g = 0; g < kGroups; ++g) {
      _mm512_storeu_ps(best + t + 16 * g, b[g]);
      _mm512_storeu_si512(arg + t + 16 * g, a[g]);
    }
  }
}

__attribute__((target("avx512f"))) uint32_t max_argmax_avx512(const float* const* rows, int64_t n, int64_t C,
                                                             uint32_t mask, float* best, int32_t* arg) {
  __m512i high = _mm512_setzero_si512();
  const __m512i lanes_mask = _mm512_set1_epi32(int32_t(mask));
  const int64_t steps = n / (16 * kGroups);
  const int64_t sweeps = (C + kSweepChannels - 1) / kSweepChannels;
  for (int64_t s = 0; s < sweeps; ++s) {
    sweep_avx512(rows, steps, s * C / sweeps, (s + 1) * C / sweeps, lanes_mask, high, best, arg);
  }
  const uint32_t largest = max_argmax_scalar(rows, steps * 16 * kGroups, n, C, mask, best, arg);
  const uint32_t lanes = _mm512_reduce_max_epu32(high);
  return lanes > largest ? lanes : largest;
}
#endif

uint32_t max_argmax(const float* const* rows, int64_t n, int64_t C, uint32_t mask, float* best, int32_t* arg) {
#ifdef FASTST_HAVE_X86_KERNELS
  if (use_avx512_kernels()) return max_argmax_avx512(rows, n, C, mask, best, arg);
  if (use_x86_kernels()) return max_argmax_avx2(rows, n, C, mask, best, arg);
#endif
  return max_argmax_scalar(rows, 0, n, C, mask, best, arg);
}

}  // namespace

bool max_argmax_probs(const float* const* rows, int64_t n, int64_t C, float* best, int32_t* arg) {
  return max_argmax(rows, n, C, 0xffffffffu, best, arg) > kOneBits;
}

bool max_argmax_logits(const float* const* rows, int64_t n, int64_t C, float* best, int32_t* arg) {
  return max_argmax(rows, n, C, 0x7fffffffu, best, arg) >= kInfinityBits;
}

}  // namespace fastst
