// IAS selection on the CPU: per-(instance, class) order statistics, the sequential threshold
// EMA and the label pass, from the output of the statistics pass (cpu/stats.h).
#pragma once
#include <cstdint>

#include "../kernels/ias.h"

namespace fastst {

void ias_select_cpu(const IasArgs& args);

}  // namespace fastst
