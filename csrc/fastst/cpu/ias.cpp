// IAS selection on the CPU (OpenMP). The per-class arithmetic is kernels/ias.h, shared with the
// CUDA kernels; this file only organises the data:
//  - "official": per-instance histograms of the float16 bit patterns of m per class (exact:
//    sorted(arr)[j] is found by walking the cumulative histogram), built per thread and summed;
//  - "paper": an exact two-level radix select over the float32 bits of m per class (paper_instance).
// Classes are independent within an instance (parallel); instances run in order (the EMA).
#include "ias.h"

#include <omp.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "../kernels/ias.h"
#include "half_bins.h"

namespace fastst {
namespace {

constexpr uint32_t kMaxHalfBin = 0x7c00u;  // +inf; NaN/negative patterns (checks off) clamp here
constexpr int64_t kChunk = 4096;

constexpr uint32_t kOneBits = 0x3f800000u;  // 1.0f

// low = min(low, bits of m), high = max(high, bits of m) over m[0 .. n), the bits read as uint32.
FASTST_CPU_CLONES void chunk_bits_range(const float* __restrict m, int64_t n, uint32_t& low, uint32_t& high) {
  uint32_t lowest = low, highest = high;
  for (int64_t p = 0; p < n; ++p) {
    const uint32_t bits = float_to_bits(m[p]);
    lowest = bits < lowest ? bits : lowest;
    highest = bits > highest ? bits : highest;
  }
  low = lowest, high = highest;
}

void bits_range(const float* m, int64_t n, uint32_t& low, uint32_t& high) {
  uint32_t lowest = low, highest = high;
#pragma omp parallel for schedule(static) reduction(min : lowest) reduction(max : highest)
  for (int64_t p0 = 0; p0 < n; p0 += kChunk) chunk_bits_range(m + p0, std::min<int64_t>(kChunk, n - p0), lowest, highest);
  low = lowest, high = highest;
}

// Slots a * bins + (bits(m) >> 16) - low_key of a chunk of pixels (paper mode's first round).
FASTST_CPU_CLONES void high_half_bins(const float* __restrict m, const uint8_t* __restrict a, int64_t n,
                                      uint32_t low_key, uint32_t bins, uint32_t* __restrict index) {
  for (int64_t j = 0; j < n; ++j) index[j] = uint32_t(a[j]) * bins + (float_to_bits(m[j]) >> 16) - low_key;
}

// Per-(class, bin) counts int32 (C * bins) of `pixels` pixels: each thread counts its chunks into
// its own table, then the tables are summed. fill(p0, n, index) writes the slots of pixels
// p0 .. p0 + n - 1 (n <= kChunk).
template <typename Fill>
std::vector<int32_t> class_histograms(int64_t pixels, int64_t C, int64_t bins, Fill fill) {
  std::vector<std::vector<int32_t>> local(static_cast<size_t>(omp_get_max_threads()));
  std::vector<int32_t> hist(size_t(C * bins), 0);
#pragma omp parallel
  {
    std::vector<int32_t>& own = local[size_t(omp_get_thread_num())];
    own.resize(size_t(C * bins));
    std::fill(own.begin(), own.end(), 0);  // a memset; assign() was a scalar loop
    uint32_t index[kChunk];
#pragma omp for schedule(static)
    for (int64_t p0 = 0; p0 < pixels; p0 += kChunk) {
      const int64_t n = std::min<int64_t>(kChunk, pixels - p0);
      fill(p0, n, index);
      for (int64_t j = 0; j < n; ++j) own[index[j]] += 1;
    }
#pragma omp for schedule(static)
    for (int64_t i = 0; i < C * bins; ++i) {
      int32_t sum = 0;
      for (const auto& l : local) sum += l.empty() ? 0 : l[size_t(i)];
      hist[size_t(i)] = sum;
    }
  }
  return hist;
}

// hit[j] = 1 where the high 16 bits of m[j] are the bin chosen for its class a[j], else 0
// (vectorised, the table read a gather; the caller then visits only the rare hits).
FASTST_CPU_CLONES void chosen_hits(const float* __restrict m, const uint8_t* __restrict a, int64_t n,
                                   const uint32_t* __restrict chosen, uint8_t* __restrict hit) {
  for (int64_t j = 0; j < n; ++j) hit[j] = uint8_t((float_to_bits(m[j]) >> 16) == chosen[a[j]]);
}

// labels = a where m passes the class's float32 threshold (see float_threshold), else 255.
template <bool kStrict>
FASTST_CPU_CLONES void label_pixels(const float* __restrict m, const uint8_t* __restrict a, int64_t n,
                                    const float* __restrict threshold, uint8_t* __restrict labels) {
  for (int64_t p = 0; p < n; ++p) labels[p] = ias_label_f32(m[p], a[p], threshold[a[p]], kStrict);
}

// j-th smallest (0-based) value of one class's histogram of float16 bit patterns, bin b holding
// the pattern min_bin + b.
double histogram_value(const int32_t* hist, int64_t bins, uint32_t min_bin, int64_t j) {
  int64_t seen = 0;
  for (int64_t b = 0; b < bins; ++b) {
    seen += hist[b];
    if (seen > j) return (double)to_float(Half{(uint16_t)(min_bin + b)});
  }
  return (double)to_float(Half{(uint16_t)(min_bin + bins - 1)});
}

void official_instance(const IasArgs& args, int64_t b0, int64_t b1, const double* k, double* theta) {
  const int64_t C = args.C;
  const int64_t pixels = (b1 - b0) * args.HW;
  const float* m = args.m + b0 * args.HW;
  const uint8_t* a = args.a + b0 * args.HW;
  // Histogram window: the patterns of the smallest and the largest m (float16 rounding is
  // monotonic): at most 0x3c00 + 1 bins for 0 <= m <= 1, and about 4,400 for m >= 1/19 (every
  // max of a softmax), so the per-thread histograms stay small enough for the L2 cache. NaN and
  // negative m (checks off) never win the max and are clamped to the top bin, as before.
  // The extremes are taken over the bits read as uint32 (a vectorised integer reduction): for
  // m >= +0 they order like the values, and NaN or negative m read as larger than any of them,
  // so at worst they widen the window up to the top bin, where they are clamped anyway.
  uint32_t high = 0, low = kOneBits;
  bits_range(m, pixels, low, high);
  const uint32_t max_bin = std::min<uint32_t>(half_bits_of(bits_to_float(high)), kMaxHalfBin);
  const uint32_t min_bin = std::min<uint32_t>(half_bits_of(bits_to_float(low)), max_bin);
  const int64_t bins = int64_t(max_bin - min_bin) + 1;
  const std::vector<int32_t> hist = class_histograms(pixels, C, bins, [&](int64_t p0, int64_t n, uint32_t* index) {
    half_bins(m + p0, a + p0, n, min_bin, max_bin, uint32_t(bins), index);
  });
#pragma omp parallel for schedule(dynamic)
  for (int64_t c = 0; c < C; ++c) {
    const int32_t* hc = hist.data() + c * bins;
    int64_t n = 0;
    for (int64_t b = b0; b < b1; ++b) n += args.counts[b * C + c];
    // values strictly smaller than the seed element theta_c: the bins below the first pattern
    // whose value reaches theta_c (patterns in the window order like their values)
    int64_t low = 0, high = bins;
    while (low < high) {
      const int64_t mid = (low + high) / 2;
      if ((double)to_float(Half{(uint16_t)(min_bin + mid)}) < theta[c]) {
        low = mid + 1;
      } else {
        high = mid;
      }
    }
    int64_t n_below = 0;
    for (int64_t b = 0; b < low; ++b) n_below += hc[b];
    const PercentilePlan plan = official_plan(k[c], n);
    const int64_t s_lo = official_source(plan.j_lo, n_below);
    const int64_t s_hi = official_source(plan.j_hi, n_below);
    const double lo = s_lo < 0 ? theta[c] : histogram_value(hc, bins, min_bin, s_lo);
    const double hi = s_hi < 0 ? theta[c] : histogram_value(hc, bins, min_bin, s_hi);
    theta[c] = official_ema(theta[c], official_lerp(lo, hi, plan.t), args.beta);
  }
}

// Paper mode: per class the (n - 1 - r)-th smallest float32 bit pattern of m (the bits of
// m >= +0 order like the values; any bits order as integers), by an exact two-level radix select
// instead of sorting: per-class histograms of the high 16 bits over the window of patterns
// present (about 560 bins for softmax maxima >= 1/19, so they stay in L1) locate the bin of each
// sought element; only the values in that bin are gathered and nth_element'ed.
void paper_instance(const IasArgs& args, int64_t b, const double* k, double* theta) {
  const int64_t C = args.C, HW = args.HW;
  const int64_t* counts = args.counts + b * C;
  const float* m = args.m + b * HW;
  const uint8_t* a = args.a + b * HW;
  uint32_t low_bits = 0xffffffffu, high_bits = 0;
  bits_range(m, HW, low_bits, high_bits);
  const uint32_t low_key = low_bits >> 16, high_key = high_bits >> 16;
  if (high_key < low_key) return;  // no pixel
  const int64_t bins = int64_t(high_key - low_key) + 1;
  const std::vector<int32_t> hist = class_histograms(HW, C, bins, [&](int64_t p0, int64_t n, uint32_t* index) {
    high_half_bins(m + p0, a + p0, n, low_key, uint32_t(bins), index);
  });
  const int threads = omp_get_max_threads();
  // The bin (as a high-16-bit key) holding each class's sought element, and its index inside
  // the bin; classes without pixels keep theta and get a key no pattern has.
  constexpr uint32_t kNone = 0xffffffffu;
  std::vector<uint32_t> chosen(static_cast<size_t>(C), kNone);
  std::vector<int64_t> inside(static_cast<size_t>(C), 0);
  for (int64_t c = 0; c < C; ++c) {
    const int64_t n = counts[c];
    if (n == 0) continue;  // theta_c unchanged, bit for bit
    int64_t index = n - 1 - paper_rank(k[c], n);
    const int32_t* hc = hist.data() + c * bins;
    int64_t bin = 0;
    while (bin < bins - 1 && index >= hc[bin]) index -= hc[bin++];
    chosen[size_t(c)] = low_key + uint32_t(bin);
    inside[size_t(c)] = index;
  }
  // Gather the chosen bins' patterns, per thread in pixel order, then per class in thread order.
  std::vector<std::vector<std::vector<uint32_t>>> gathered(
      static_cast<size_t>(threads), std::vector<std::vector<uint32_t>>(static_cast<size_t>(C)));
#pragma omp parallel
  {
    std::vector<std::vector<uint32_t>>& own = gathered[size_t(omp_get_thread_num())];
    uint8_t hit[kChunk];
#pragma omp for schedule(static)
    for (int64_t p0 = 0; p0 < HW; p0 += kChunk) {
      const int64_t n = std::min<int64_t>(kChunk, HW - p0);
      chosen_hits(m + p0, a + p0, n, chosen.data(), hit);
      for (int64_t j = 0; j < n; j += 8) {  // hits are rare: skip 8 misses at a time
        uint64_t word = 0;
        std::memcpy(&word, hit + j, size_t(std::min<int64_t>(8, n - j)));
        if (word == 0) continue;
        for (int64_t k = j; k < std::min<int64_t>(j + 8, n); ++k) {
          if (hit[k]) own[a[p0 + k]].push_back(float_to_bits(m[p0 + k]));
        }
      }
    }
  }
#pragma omp parallel for schedule(dynamic)
  for (int64_t c = 0; c < C; ++c) {
    if (chosen[size_t(c)] == kNone) continue;
    std::vector<uint32_t> bin;
    for (auto& per_thread : gathered) bin.insert(bin.end(), per_thread[size_t(c)].begin(), per_thread[size_t(c)].end());
    std::nth_element(bin.begin(), bin.begin() + inside[size_t(c)], bin.end());
    theta[c] = paper_ema(theta[c], (double)bits_to_float(bin[size_t(inside[size_t(c)])]), args.beta);
  }
}

}  // namespace

void ias_select_cpu(const IasArgs& args) {
  const int64_t C = args.C;
  std::vector<double> theta(args.theta_in, args.theta_in + C);
  std::vector<double> k(static_cast<size_t>(C));
  const bool strict = !args.official;
  for (int64_t b0 = 0, g = 0; b0 < args.B; b0 += args.group, ++g) {
    const int64_t b1 = std::min(b0 + args.group, args.B);
    for (int64_t c = 0; c < C; ++c) k[c] = dmul(args.alpha, theta_pow(theta[c], args.gamma));
    if (args.official) {
      official_instance(args, b0, b1, k.data(), theta.data());
    } else {
      paper_instance(args, b0, k.data(), theta.data());
    }
    std::copy(theta.begin(), theta.end(), args.theta_per_instance + g * C);
    float threshold[256];
    for (int64_t c = 0; c < C; ++c) threshold[c] = float_threshold(theta[c], strict);
    const int64_t first = b0 * args.HW, last = b1 * args.HW;
#pragma omp parallel for schedule(static)
    for (int64_t p0 = first; p0 < last; p0 += kChunk) {
      const int64_t n = std::min<int64_t>(kChunk, last - p0);
      if (strict) {
        label_pixels<true>(args.m + p0, args.a + p0, n, threshold, args.labels + p0);
      } else {
        label_pixels<false>(args.m + p0, args.a + p0, n, threshold, args.labels + p0);
      }
    }
  }
  std::copy(theta.begin(), theta.end(), args.theta_out);
}

}  // namespace fastst
