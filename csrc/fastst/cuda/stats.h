// Fused statistics pass on a CUDA device; launched on `stream` (a cudaStream_t), never synchronises.
#pragma once
#include <cstdint>

#include "../kernels/stats.h"

namespace fastst {
void stats_cuda(const StatsArgs& args, int device, uintptr_t stream);
}
