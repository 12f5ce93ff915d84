// Fused statistics pass (max, argmax, per-(image, class) counts; softmax and bilinear upsample
// when reading logits) on the CPU.
#pragma once
#include "../kernels/stats.h"

namespace fastst {
void stats_cpu(const StatsArgs& args);

// out[i] = exp_nonpositive(x[i]) (kernels/stats.h) for i < n, through the same vectorised code
// as the pass: the tests check its bits against a float32 transcription of the formula.
void exp_nonpositive_cpu(const float* x, int64_t n, float* out);
}
