// The loss-mode codes of the fused per-pixel losses (docs/ops.md §5, §6): the `mode` argument of
// fastst._C.st_loss / the st_loss custom ops (kBootstrapHard .. kBootstrapTeacher, see
// kernels/tpld.h for each mode's per-pixel target). kRegion is the region loss (docs/ops.md §2):
// it has its own C++ kernel, and the Triton scaffolding (fastst/ops/triton/fused_loss.py) takes
// it as a fifth mode of one shared kernel. The Python mirror is fastst/ops/loss_modes.py,
// checked against this file by tests/ops/test_loss_modes.py.
#pragma once

namespace fastst {

enum StLossMode : int {
  kBootstrapHard = 0,
  kBootstrapSoft = 1,
  kMrkld = 2,
  kBootstrapTeacher = 3,
  kRegion = 4,
};

}  // namespace fastst
