// Arrays of exp_nonpositive (kernels/stats.h): the softmax exponentials of the CPU statistics pass
// and fused losses. AVX-512 and AVX2+FMA kernels chosen at run time (vector_isa.h), else the scalar
// formula; every path returns the scalar formula's bits.
#pragma once
#include <cstdint>

namespace fastst {

// sum[j] = sum over c < C, in class order, of exp_nonpositive(values[c * stride + j] - best[j]),
// for j < n. values: C rows of float32, `stride` floats apart; best, sum: n floats.
void exp_sum_classes(const float* values, int64_t stride, int64_t n, int64_t C, const float* best, float* sum);

// out[j] = exp_nonpositive(x[j] - shift[j]) for j < n; shift == nullptr means exp_nonpositive(x[j]).
void exp_shifted(const float* x, const float* shift, int64_t n, float* out);

}  // namespace fastst
