"""The self-training losses of the fused st-loss kernel (csrc/fastst/cpu/bootstrap_loss.cpp,
fastst/ops/ext/bootstrap_loss.py, fastst/ops/triton/st_loss.py): TPLD's bootstrapping loss
(docs/ops.md §6) and the CRST-MRKLD loss (docs/ops.md §5); validation, backend choice, dispatch.

Backends: "cpp" (C++/OpenMP, the CPU default), "triton" (the CUDA default), "torch"
(reference.py), for both.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import _checks, reference
from ._backend import choose_backend
from ._checks import check_lambdas, check_loss_args
from .ext.bootstrap_loss import st_loss_cpp
from .loss_modes import BOOTSTRAP_HARD, BOOTSTRAP_SOFT, BOOTSTRAP_TEACHER, MRKLD

__all__ = ["bootstrap_loss", "mrkld_loss", "LOSS_BACKENDS", "MRKLD_BACKENDS"]

LOSS_BACKENDS = ("triton", "cpp", "torch")
MRKLD_BACKENDS = ("triton", "cpp", "torch")
REDUCTIONS = ("mean", "sum")


def bootstrap_loss(logits: torch.Tensor, target: Optional[torch.Tensor], lambdas: torch.Tensor, *,
                   beta: float = 0.95, soft_target: Optional[torch.Tensor] = None,
                   teacher_logits: Optional[torch.Tensor] = None, gamma: float = 2.0,
                   ignore_index: int = 255, size: Optional[Sequence[int]] = None,
                   align_corners: bool = True, reduction: str = "mean",
                   backend: Optional[str] = None) -> torch.Tensor:
    """TPLD's bootstrapping loss (docs/ops.md §6), fused forward and backward in "cpp" and "triton".

    With p = softmax(upsample(logits)) and q = p / lambda, each pixel with a target adds
    -sum_k (beta * y_k + (1 - beta) * stopgrad(q_k)) * log q_k.
    Hard targets (soft_target None, phase 1): y = onehot(target); pixels equal to ignore_index
    have no target. Soft targets (easy images, phase 2): every pixel has one; y = onehot(target)
    where target != ignore_index (the confident map), else soft_target (q_teacher ** gamma from
    `tpld_soft_targets`, whose confident pixels hold the same one-hot vectors). Teacher targets
    (``teacher_logits``, phase 2 without materialising anything): the soft targets made inside
    the pass from the teacher's low-resolution logits, upsampled with the same taps: p_t =
    softmax, q_t = p_t / lambda, y = onehot(argmax q_t) where max q_t >= 1, else q_t ** gamma.

    Args:
        logits: (B, C, h, w) float32/float16/bfloat16, any strides; upsampled bilinearly (as
            F.interpolate with align_corners) to the target's (H, W) on the fly.
        target: (B, H, W) uint8/int64, classes or ignore_index; None with teacher_logits.
        lambdas: (C,) class thresholds > 0.
        beta: in [0, 1]. soft_target: None or (B, C, H, W) float tensor (a constant: no gradient).
        teacher_logits: None or (B, C, h, w) float logits of the teacher (a constant), with
            target None and size given. gamma: the teacher targets' exponent, finite >= 0.
        size: None or the target's (H, W) (checked); required with teacher_logits.
        reduction: "mean" (divide by the number of pixels with a target; 0 if none) or "sum"
            (for callers with their own normaliser, e.g. phase 1's n_valid over all crops).
        backend: "triton", "cpp" or "torch" (default: docs/ops.md §0).
    Returns:
        float32 0-dim loss, differentiable w.r.t. logits.
    """
    if teacher_logits is not None:
        return _bootstrap_from_teacher(logits, target, lambdas, beta=beta, soft_target=soft_target,
                                       teacher_logits=teacher_logits, gamma=gamma, size=size,
                                       align_corners=align_corners, reduction=reduction, backend=backend)
    check_loss_args(logits, target, 0.0, 0.0, ignore_index, size, align_corners)
    B, C = logits.shape[:2]
    lambdas = check_lambdas(lambdas, C, logits.device)
    beta = _checks.check_real("beta", beta, low=0.0, high=1.0)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if soft_target is not None:
        shape = (B, C) + tuple(target.shape[1:])
        soft_target = _checks.check_tensor("soft_target", soft_target, ndim=4, dtypes=_checks.FLOAT_DTYPES,
                                           layout="(B, C, H, W)")
        if tuple(soft_target.shape) != shape:
            raise ValueError(f"soft_target must have shape {shape} (the target's size, C classes), "
                             f"got {tuple(soft_target.shape)}")
        if soft_target.device != logits.device:
            raise ValueError(f"soft_target is on {soft_target.device} but logits are on {logits.device}")
        soft_target = soft_target.detach()
    name = choose_backend("bootstrap_loss", logits.device, LOSS_BACKENDS, backend)
    if name == "torch":
        return reference.bootstrap_loss(logits, target, lambdas, beta=beta, soft_target=soft_target,
                                        ignore_index=ignore_index, align_corners=align_corners,
                                        reduction=reduction)
    soft = None if soft_target is None else soft_target.float()
    mode = BOOTSTRAP_HARD if soft is None else BOOTSTRAP_SOFT
    return _run_fused(name, logits, target, lambdas, soft, mode, beta, 0.0, reduction, ignore_index,
                      target.shape[1], target.shape[2], align_corners)


def _run_fused(name, logits, target, lambdas, soft, mode, beta, gamma, reduction, ignore_index, out_h, out_w,
               align_corners, *, is_target=None, mrkld_weight=0.0) -> torch.Tensor:
    """The fused self-training loss of ``mode`` on backend ``name`` ("cpp" or "triton")."""
    op = st_loss_cpp
    if name == "triton":
        from .triton.st_loss import st_loss_triton as op  # imports triton only when asked
    compute_grad = torch.is_grad_enabled() and logits.requires_grad
    loss, _ = op(logits, target, lambdas, soft, is_target, mode, beta, mrkld_weight, gamma,
                 reduction == "sum", ignore_index, out_h, out_w, align_corners, compute_grad)
    return loss[0]


def _bootstrap_from_teacher(logits, target, lambdas, *, beta, soft_target, teacher_logits, gamma, size,
                            align_corners, reduction, backend) -> torch.Tensor:
    """`bootstrap_loss` with teacher_logits: validation and dispatch."""
    if target is not None or soft_target is not None:
        raise ValueError("with teacher_logits every pixel's target comes from the teacher: pass target=None "
                         "and soft_target=None, and the targets' size=(H, W)")
    logits = _checks.check_scores("logits", logits, layout="(B, C, h, w)")
    teacher = _checks.check_scores("teacher_logits", teacher_logits, layout="(B, C, h, w)")
    if tuple(teacher.shape) != tuple(logits.shape):
        raise ValueError(f"teacher_logits must have the logits' shape {tuple(logits.shape)} (the same images "
                         f"through the teacher), got {tuple(teacher.shape)}")
    if teacher.device != logits.device:
        raise ValueError(f"teacher_logits is on {teacher.device} but logits are on {logits.device}; move it "
                         "with teacher_logits.to(logits.device)")
    size = _checks.check_size("size", size)
    if size is None:
        raise ValueError("with teacher_logits give size=(H, W), the resolution of the targets (there is no "
                         "target map to take it from)")
    if not isinstance(align_corners, bool):
        raise TypeError(f"align_corners must be a bool, got {type(align_corners).__name__}")
    lambdas = check_lambdas(lambdas, logits.shape[1], logits.device)
    beta = _checks.check_real("beta", beta, low=0.0, high=1.0)
    gamma = _checks.check_real("gamma", gamma, low=0.0)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    teacher = teacher.detach()
    name = choose_backend("bootstrap_loss", logits.device, LOSS_BACKENDS, backend)
    if name == "torch":
        return reference.bootstrap_loss(logits, None, lambdas, beta=beta, teacher_logits=teacher, gamma=gamma,
                                        size=size, align_corners=align_corners, reduction=reduction)
    no_labels = torch.empty(0, dtype=torch.uint8, device=logits.device)
    return _run_fused(name, logits, no_labels, lambdas, teacher.float().contiguous(), BOOTSTRAP_TEACHER, beta,
                      gamma, reduction, 255, size[0], size[1], align_corners)


def mrkld_loss(logits: torch.Tensor, target: torch.Tensor, is_target: torch.Tensor, *,
               mrkld_weight: float = 0.01, ignore_index: int = 255, size: Optional[Sequence[int]] = None,
               align_corners: bool = True, backend: Optional[str] = None) -> torch.Tensor:
    """CRST-MRKLD loss (docs/ops.md §5): ce_sum / n_valid + mrkld_weight * kld_sum / n_valid_tgt, with
    kld_sum = sum over the valid pixels of target crops of -(1/C) sum_c log p_c. The KLD term is
    dropped when no target crop has a valid pixel; the loss is 0 when no pixel is valid.

    Args:
        logits: (B, C, h, w) float32/float16/bfloat16, upsampled bilinearly (fused in "cpp" and
            "triton") to the target's (H, W) when the sizes differ.
        target: (B, H, W) uint8/int64 labels, ignore_index = unlabelled.
        is_target: (B,) bool, which crops come from the target domain.
        mrkld_weight: w_eff >= 0 (the released run's effective 0.01).
        size: None or the target's (H, W) (checked).
        backend: "triton", "cpp" or "torch" (default: docs/ops.md §0).
    Returns:
        float32 0-dim loss (differentiable w.r.t. logits).
    """
    check_loss_args(logits, target, 0.0, 0.0, ignore_index, size, align_corners)
    mrkld_weight = _checks.check_real("mrkld_weight", mrkld_weight, low=0.0)
    if not isinstance(is_target, torch.Tensor) or tuple(is_target.shape) != (logits.shape[0],):
        raise ValueError(f"is_target must be a bool tensor of shape ({logits.shape[0]},), one flag per crop, "
                         f"got {getattr(is_target, 'shape', type(is_target).__name__)}")
    if is_target.device != logits.device:
        raise ValueError(f"is_target is on {is_target.device} but logits are on {logits.device}")
    is_target = is_target.to(torch.bool)
    name = choose_backend("mrkld_loss", logits.device, MRKLD_BACKENDS, backend)
    if name == "torch":
        return reference.mrkld_loss(logits, target, is_target, mrkld_weight=mrkld_weight,
                                    ignore_index=ignore_index, align_corners=align_corners)
    ones = torch.ones(logits.shape[1], dtype=torch.float32, device=logits.device)
    return _run_fused(name, logits, target, ones, None, MRKLD, 0.0, 0.0, "mean", ignore_index,
                      target.shape[1], target.shape[2], align_corners, is_target=is_target,
                      mrkld_weight=mrkld_weight)
