// Fused statistics pass (max, argmax, per-(image, class) counts; softmax and bilinear upsample
// when reading logits) on the CPU.
#pragma once
#include "../kernels/stats.h"

namespace fastst {
void stats_cpu(const StatsArgs& args);
}
