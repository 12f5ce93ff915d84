"""Triton twin of the fused self-training losses `fastst::st_loss_cpp`: TPLD's bootstrapping
loss with hard or soft targets (docs/ops.md §6) and CRST-MRKLD (docs/ops.md §5), forward and d loss / d logits in
one pass, upsampling on the fly, no (B, C, H, W) tensor, no atomics (deterministic gradients).

The kernel is the shared fused-loss skeleton of `fused_loss.py`, in the mode given by the op's
`mode` argument (the StLossMode codes of kernels/tpld.h). This file holds the op: the pixel
counts and normalisers, computed on the device (no host synchronisation), and the loss from the
kernel's float64-added sums.

Runs on CUDA tensors, or on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .._checks import check_triton_device
from ..ext.bootstrap_loss import new_st_loss_outputs, register_st_loss_op
from ..loss_modes import BOOTSTRAP_HARD, BOOTSTRAP_SOFT, BOOTSTRAP_TEACHER, MRKLD
from .fused_loss import labelled_mask, launch_fused_loss
from .stats import INTERPRETED

__all__ = ["st_loss_triton"]


def _inverse_or_zero(count: torch.Tensor) -> torch.Tensor:
    """1 / count in float64, 0 where count is 0 (an empty pixel set contributes nothing)."""
    return torch.where(count > 0, 1.0 / torch.clamp(count, min=1.0), torch.zeros_like(count))


@torch.library.custom_op("fastst::st_loss_triton", mutates_args=())
def st_loss_triton(logits: torch.Tensor, target: torch.Tensor, lambdas: torch.Tensor,
                   soft_target: Optional[torch.Tensor], is_target: Optional[torch.Tensor], mode: int,
                   beta: float, mrkld_weight: float, gamma: float, sum_reduction: bool, ignore_index: int,
                   out_h: int, out_w: int, align_corners: bool,
                   compute_grad: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fused bootstrapping (mode 0 hard / 1 soft / 3 soft from a teacher, docs/ops.md §6) or CRST-MRKLD
    (mode 2, docs/ops.md §5) loss in Triton; arguments and outputs exactly those of `fastst::st_loss_cpp`.

    Args:
        logits: (B, C, h, w) float32/float16/bfloat16, any strides; upsampled on the fly to
            (out_h, out_w) when that differs.
        target: (B, out_h, out_w) uint8/int64 (not read in mode 3). lambdas: (C,) float32.
        soft_target: (B, C, out_h, out_w) float32 (mode 1); the teacher's logits (B, C, h, w)
            (mode 3, soft targets with exponent gamma made in the pass); else None.
        is_target: (B,) bool, target-domain crops (mode 2), else None.
    Returns:
        loss (1,) float32; grad (B, C, h, w) float32 or (0,).
    """
    B, C, h, w = logits.shape
    loss, grad = new_st_loss_outputs(logits, compute_grad)
    check_triton_device("fastst::st_loss_triton", logits.device, INTERPRETED)
    if mode not in (BOOTSTRAP_HARD, BOOTSTRAP_SOFT, MRKLD, BOOTSTRAP_TEACHER):
        raise ValueError(f"fastst::st_loss_triton: mode must be {BOOTSTRAP_HARD} (bootstrap, hard targets), "
                         f"{BOOTSTRAP_SOFT} (bootstrap, soft targets), {MRKLD} (MRKLD) or {BOOTSTRAP_TEACHER} "
                         f"(bootstrap, teacher targets), got {mode}")
    if mode in (BOOTSTRAP_SOFT, BOOTSTRAP_TEACHER) and soft_target is None:
        raise ValueError(f"fastst::st_loss_triton: mode {mode} needs soft_target (the soft targets or the "
                         "teacher's logits)")
    if mode == MRKLD and is_target is None:
        raise ValueError("fastst::st_loss_triton: mode 2 (MRKLD) needs is_target (B,)")
    target = target.contiguous()
    every_pixel = torch.full((), float(B * out_h * out_w), dtype=torch.float64, device=logits.device)
    n_valid = every_pixel if mode == BOOTSTRAP_TEACHER else labelled_mask(target, C, ignore_index).sum(dtype=torch.float64)
    out_grad = grad if compute_grad else None
    if mode == MRKLD:
        crops = is_target.to(torch.uint8).contiguous()
        labelled = labelled_mask(target, C, ignore_index)
        n_valid_tgt = (labelled & is_target.to(torch.bool).view(B, 1, 1)).sum(dtype=torch.float64)
        inv_nv = _inverse_or_zero(n_valid)
        w_inv_nt = mrkld_weight * _inverse_or_zero(n_valid_tgt)
        coef = torch.stack([inv_nv, w_inv_nt]).to(torch.float32)
        sums = launch_fused_loss(MRKLD, logits, target, coef, ignore_index, out_h, out_w, align_corners,
                                 out_grad, is_target=crops)
        loss.copy_((sums[0] * inv_nv + sums[1] * w_inv_nt).reshape(1))
        return loss, grad
    lambdas = lambdas.to(torch.float32).contiguous()
    soft = soft_target.to(torch.float32).contiguous() if mode in (BOOTSTRAP_SOFT, BOOTSTRAP_TEACHER) else None
    n_bootstrap = every_pixel if mode in (BOOTSTRAP_SOFT, BOOTSTRAP_TEACHER) else n_valid
    scale = torch.ones_like(n_valid) if sum_reduction else _inverse_or_zero(n_bootstrap)
    one = torch.ones_like(n_valid)
    # 1 - beta rounded once from float64, as the C++ twin does
    coef = torch.stack([scale, beta * one, (1.0 - beta) * one, gamma * one]).to(torch.float32)
    sums = launch_fused_loss(mode, logits, target, coef, ignore_index, out_h, out_w, align_corners, out_grad,
                             lambdas=lambdas, log_lambdas=torch.log(lambdas), soft_target=soft)
    loss.copy_((sums[0] * scale).reshape(1))
    return loss, grad


register_st_loss_op(st_loss_triton)
