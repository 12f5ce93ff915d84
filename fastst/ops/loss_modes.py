"""The loss-mode codes of the fused per-pixel losses: the Python mirror of
csrc/fastst/kernels/loss_modes.h (StLossMode), checked against it by tests/ops/test_loss_modes.py.

BOOTSTRAP_HARD .. BOOTSTRAP_TEACHER are the `mode` argument of the st_loss ops (docs/ops.md §5,
§6); REGION is the region loss (docs/ops.md §2), a mode only of the shared Triton kernel
(fastst/ops/triton/fused_loss.py)."""

BOOTSTRAP_HARD = 0
BOOTSTRAP_SOFT = 1
MRKLD = 2
BOOTSTRAP_TEACHER = 3
REGION = 4
