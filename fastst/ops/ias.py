"""Public `ias_pseudo_label` (docs/ops.md §1): validation, backend choice, dispatch.

Backends: "torch" runs reference.py end to end. "cpp" runs the fused statistics pass of fastst._C
(softmax, upsample, max, argmax, counts in one read of x) and the C++ selection (order
statistics, sequential EMA, labels). "cuda" runs the CUDA statistics pass and the CUDA selection
(no host sync). "triton" runs the Triton statistics pass and the reference's selection.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import _checks, reference
from ._backend import choose_backend
from .ext.ias import ias_select
from .ext.stats import pixel_stats

MODES = ("paper", "official")
IMPLEMENTED = ("cuda", "triton", "cpp", "torch")


def ias_pseudo_label(x: torch.Tensor, theta: Optional[torch.Tensor], *, alpha: float,
                     beta: float = 0.9, gamma: float = 8.0, mode: str = "paper",
                     from_logits: bool = False, size: Optional[Sequence[int]] = None,
                     align_corners: bool = True, group: Optional[int] = None,
                     backend: Optional[str] = None):
    """Instance-adaptive pseudo labels and the updated class thresholds (IAST Algorithm 1).

    Args:
        x: (B, C, h, w) float32/float16/bfloat16 probabilities, or logits when `from_logits`;
            any strides.
        theta: (C,) float64 thresholds left by the previous batch (same device as x), or None
            for 0.9 per class (start of a round).
        alpha: portion parameter, 0 < alpha <= 1. beta: EMA momentum, 0 <= beta <= 1.
        gamma: threshold exponent, >= 0.
        mode: "paper" (docs/ops.md §1.1: instance = image, label where m > theta) or "official"
            (docs/ops.md §1.2: bit-exact with the released NumPy code; instance = `group` images).
        from_logits: p = softmax(x) in float32 (after the upsample) instead of p = x.
        size: (H, W) to bilinearly upsample logits to before the softmax (logits only).
        align_corners: as in F.interpolate.
        group: images per instance: "official" default 2, "paper" must be None or 1.
        backend: "cuda", "triton", "cpp" or "torch" (default: docs/ops.md §0).
    Returns:
        labels: (B, H, W) uint8, class id or 255.
        theta_out: (C,) float64, pass it to the next batch.
        theta_per_instance: (G, C) float64, theta after each instance's update.
    """
    x = _checks.check_scores("x", x)
    B, C, h, w = x.shape
    alpha = _checks.check_real("alpha", alpha, low=0.0, high=1.0, low_open=True)
    beta = _checks.check_real("beta", beta, low=0.0, high=1.0)
    gamma = _checks.check_real("gamma", gamma, low=0.0)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if group is None:
        group = 2 if mode == "official" else 1
    if isinstance(group, bool) or not isinstance(group, int) or group < 1:
        raise ValueError(f"group must be a positive int, got {group!r}")
    if mode == "paper" and group != 1:
        raise ValueError(f"group must be None or 1 in mode='paper' (instance = one image), got {group}")
    size = _checks.check_size("size", size)
    if size is not None and not from_logits and size != (h, w):
        raise ValueError(f"size={size} differs from the input's {(h, w)} but from_logits=False; "
                         "only logits are upsampled (pass from_logits=True)")
    theta = _checks.check_theta(theta, C, x.device)
    chosen = choose_backend("ias_pseudo_label", x.device, IMPLEMENTED, backend)
    out_h, out_w = size if size is not None else (h, w)
    if mode == "official" and min(group, B) * out_h * out_w >= 2**31:
        raise ValueError(f"group={group} images of {out_h}x{out_w} pixels make {min(group, B)} x "
                         f"{out_h * out_w} >= 2^31 pixels in one instance, more than the int32 "
                         "histogram counts of mode='official' hold; use a smaller group or size")

    if chosen == "torch":
        if _checks.value_checks_enabled(x.device):
            finite = torch.isfinite(x).all()
            in_range = True if from_logits else ((x >= 0) & (x <= 1)).all()
            flags = (0 if bool(finite) else 1) | (0 if bool(in_range) else 2)
            _checks.raise_on_stat_flags("x", flags, from_logits)
        return reference.ias_pseudo_label(x, theta, alpha=alpha, beta=beta, gamma=gamma, mode=mode,
                                          from_logits=from_logits, size=size,
                                          align_corners=align_corners, group=group)

    if chosen == "triton":
        from .triton.stats import pixel_stats_triton as stats_op
    else:
        stats_op = pixel_stats
    m, a, counts, flags = stats_op(x, from_logits, out_h, out_w, align_corners)
    if _checks.value_checks_enabled(x.device):
        _checks.raise_on_stat_flags("x", int(flags.item()), from_logits)
    if chosen in ("cpp", "cuda"):
        return ias_select(m, a, counts, theta, alpha, beta, gamma, mode == "official", group)
    return reference.ias_from_stats(m, a, theta, num_classes=C, alpha=alpha, beta=beta,
                                    gamma=gamma, mode=mode, group=group)
