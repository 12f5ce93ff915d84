// Fused self-training losses on the CPU: TPLD's bootstrapping loss (docs/ops.md §6, hard and soft
// targets) and CRST-MRKLD (docs/ops.md §5), the loss and d loss / d logits in one pass, with the
// bilinear upsample done on the fly (see kernels/tpld.h for the per-pixel formulas).
#pragma once
#include "../kernels/tpld.h"

namespace fastst {
void st_loss_cpu(const StLossArgs& args);
}
