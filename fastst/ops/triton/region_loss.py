"""Triton twin of the fused region loss `fastst::region_loss_cpp` (docs/ops.md §2): parts and d loss /
d logits from the low-resolution logits and the labels, upsampling on the fly, with no
(B, C, H, W) tensor and no atomics.

The kernel is the shared fused-loss skeleton of `fused_loss.py` in its REGION mode (program
(jb, i, b) gathers the gradient of the low-resolution cells it owns, recomputing the softmax of
every full-resolution pixel that touches them), so gradients are bit-identical from run to run
(`deterministic=True` holds by construction). This file holds the op: the normalisers, computed
on the device (no host synchronisation), and the parts from the kernel's (ce, kld, ent) sums.
A term whose lambda is 0 is compiled out unless `need_parts` (`needed_terms`); its part is NaN.

Runs on CUDA tensors, or on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1).
"""
from __future__ import annotations

from typing import Tuple

import torch

from .._checks import check_triton_device
from ..ext.region_loss import needed_terms, new_region_loss_outputs, register_region_loss_op
from ..loss_modes import REGION
from .fused_loss import labelled_mask, launch_fused_loss
from .stats import INTERPRETED

__all__ = ["region_loss_triton"]


@torch.library.custom_op("fastst::region_loss_triton", mutates_args=())
def region_loss_triton(logits: torch.Tensor, target: torch.Tensor, lambda_kld: float,
                       lambda_ent: float, ignore_index: int, out_h: int, out_w: int,
                       align_corners: bool, need_parts: bool,
                       compute_grad: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fused region loss (Triton): arguments and outputs as `fastst::region_loss_cpp`
    (parts (4,) float32, a skipped part NaN; grad (B, C, h, w) float32 or (0,)). CUDA tensors,
    or CPU tensors under TRITON_INTERPRET=1."""
    B, C, h, w = logits.shape
    parts, grad = new_region_loss_outputs(logits, compute_grad)
    check_triton_device("fastst::region_loss_triton", logits.device, INTERPRETED)
    target = target.contiguous()
    labelled = labelled_mask(target, C, ignore_index).sum(dtype=torch.float64)
    ignored = float(B * out_h * out_w) - labelled
    one = torch.ones((), dtype=torch.float64, device=logits.device)
    coef64 = torch.stack([torch.where(labelled > 0, 1.0 / torch.maximum(labelled, one), 0.0 * one),
                          torch.where(ignored > 0, 1.0 / (C * torch.maximum(ignored, one)), 0.0 * one),
                          lambda_kld * one, lambda_ent * one])
    need_kld, need_ent = needed_terms(lambda_kld, lambda_ent, need_parts)
    sums = launch_fused_loss(REGION, logits, target, coef64.to(torch.float32), ignore_index, out_h, out_w,
                             align_corners, grad if compute_grad else None, need_kld=need_kld, need_ent=need_ent)
    not_computed = torch.full_like(one, float("nan"))
    ce = sums[0] * coef64[0]
    kld = sums[1] * coef64[0] / C if need_kld else not_computed
    ent = sums[2] * coef64[1] if need_ent else not_computed
    # the order of ce + lambda_kld kld + lambda_ent ent; a term left out added a signed zero
    loss = ce
    if need_kld:
        loss = loss + lambda_kld * kld
    if need_ent:
        loss = loss + lambda_ent * ent
    parts.copy_(torch.stack([loss, ce, kld, ent]))
    return parts, grad


register_region_loss_op(region_loss_triton)
