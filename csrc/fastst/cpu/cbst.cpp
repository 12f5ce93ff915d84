// CBST thresholds on the CPU (OpenMP).
//
// Collect: each image is cut into chunks of rows; a first pass counts the classes per chunk, so
// every chunk knows the rank (within its image and class) of its first pixel of each class and
// how many kept values precede it; a second pass writes the kept values. The output order is
// row-major per image whatever the thread count.
// Thresholds: the float bits of the values (m >= +0, so the bits order like the values) are
// bucketed by class with a counting sort, then one std::nth_element per class: exact, O(n).
#include "cbst.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../common.h"

namespace fastst {
namespace {

constexpr int64_t kChunk = 1 << 15;

// Multiples of s in [first, first + n).
int64_t kept_in(int64_t first, int64_t n, int64_t s) { return (first + n + s - 1) / s - (first + s - 1) / s; }

}  // namespace

void cbst_collect_cpu(const float* m, const uint8_t* a, int64_t B, int64_t HW,
                      int64_t C, int64_t subsample, float* values, uint8_t* classes) {
  const int64_t chunks = (HW + kChunk - 1) / kChunk;
  const int64_t tasks = B * chunks;
  std::vector<int64_t> chunk_counts(static_cast<size_t>(tasks * C), 0);
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < tasks; ++t) {
    const int64_t b = t / chunks, first = (t % chunks) * kChunk, last = std::min(first + kChunk, HW);
    int64_t* own = chunk_counts.data() + t * C;
    const uint8_t* ab = a + b * HW;
    for (int64_t p = first; p < last; ++p) own[ab[p]] += 1;
  }
  // Per task: the rank of its first pixel of each class, and its output offset.
  std::vector<int64_t> rank(static_cast<size_t>(tasks * C));
  std::vector<int64_t> offset(static_cast<size_t>(tasks));
  int64_t out = 0;
  for (int64_t b = 0; b < B; ++b) {
    std::vector<int64_t> seen(static_cast<size_t>(C), 0);
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t t = b * chunks + c;
      offset[t] = out;
      for (int64_t k = 0; k < C; ++k) {
        const int64_t n = chunk_counts[t * C + k];
        rank[t * C + k] = seen[k];
        out += kept_in(seen[k], n, subsample);
        seen[k] += n;
      }
    }
  }
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < tasks; ++t) {
    const int64_t b = t / chunks, first = (t % chunks) * kChunk, last = std::min(first + kChunk, HW);
    std::vector<int64_t> r(rank.begin() + t * C, rank.begin() + (t + 1) * C);
    const uint8_t* ab = a + b * HW;
    const float* mb = m + b * HW;
    int64_t o = offset[t];
    for (int64_t p = first; p < last; ++p) {
      const uint8_t k = ab[p];
      if (r[k]++ % subsample == 0) {
        values[o] = mb[p];
        classes[o] = k;
        ++o;
      }
    }
  }
}

void cbst_thresholds_cpu(const float* values, const uint8_t* classes, int64_t n, int64_t C, double portion,
                         float* lambdas) {
  std::vector<int64_t> start(static_cast<size_t>(C) + 1, 0);
  for (int64_t i = 0; i < n; ++i) start[size_t(classes[i]) + 1] += 1;
  for (int64_t k = 0; k < C; ++k) start[k + 1] += start[k];
  std::vector<uint32_t> bits(static_cast<size_t>(n));
  std::vector<int64_t> fill(start.begin(), start.end() - 1);
  for (int64_t i = 0; i < n; ++i) bits[size_t(fill[classes[i]]++)] = float_to_bits(values[i]);
#pragma omp parallel for schedule(dynamic)
  for (int64_t k = 0; k < C; ++k) {
    const int64_t len = start[k + 1] - start[k];
    const int64_t selected = int64_t(std::floor(double(len) * portion));
    if (selected == 0) {
      lambdas[k] = 1.0f;
      continue;
    }
    uint32_t* first = bits.data() + start[k];
    // The selected-th largest is the (len - selected)-th smallest (0-based).
    std::nth_element(first, first + (len - selected), first + len);
    lambdas[k] = bits_to_float(first[len - selected]);
  }
}

}  // namespace fastst
