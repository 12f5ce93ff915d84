// CBST class-balanced thresholds (docs/ops.md §5) on the CPU: the subsampled value store and the exact
// per-class order statistics.
#pragma once
#include <cstdint>

namespace fastst {

// Append, for every image b, the max probabilities m of the pixels that the subsample keeps
// (per image and class, positions 0, s, 2s, ... of that class in row-major order), in row-major
// order, with their classes. a holds classes < C; values/classes must hold
// sum_{b,k} ceil(n_{b,k} / s) entries, n_{b,k} the pixels of class k in image b.
void cbst_collect_cpu(const float* m, const uint8_t* a, int64_t B, int64_t HW,
                      int64_t C, int64_t subsample, float* values, uint8_t* classes);

// lambda_k = (class-k values sorted descending)[floor(len_k * portion) - 1], 1 when that is 0.
void cbst_thresholds_cpu(const float* values, const uint8_t* classes, int64_t n, int64_t C, double portion,
                         float* lambdas);

}  // namespace fastst
