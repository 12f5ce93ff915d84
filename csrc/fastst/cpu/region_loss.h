// Fused region loss (docs/ops.md §2) on the CPU: forward parts and, when asked, d loss / d logits.
#pragma once
#include "../kernels/region_loss.h"

namespace fastst {
void region_loss_cpu(const RegionLossArgs& args);
}
