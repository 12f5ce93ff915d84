// Fused self-training losses on the CPU: TPLD's bootstrapping loss (SPEC 6, hard and soft
// targets) and CRST-MRKLD (SPEC 5), the loss and d loss / d logits in one pass, with the
// bilinear upsample done on the fly (see kernels/tpld.h for the per-pixel formulas).
#pragma once
#include "../kernels/tpld.h"

namespace fastst {
void st_loss_cpu(const StLossArgs& args);
}
