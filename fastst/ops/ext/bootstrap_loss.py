"""The fused self-training losses (bootstrapping, docs/ops.md §6; CRST-MRKLD, docs/ops.md §5):
fastst::st_loss_cpp, its fake kernel and autograd (the gradient is produced in the forward pass, in
the low-resolution layout, like the region loss)."""
from typing import Optional, Tuple

import torch

from .._backend import extension
from . import DTYPE_CODES
from .fused_loss import register_fused_loss_op


def new_st_loss_outputs(logits: torch.Tensor, compute_grad: bool):
    """loss (1,) float32 and grad (B, C, h, w) float32 contiguous, or (0,) without gradient."""
    grad_shape = tuple(logits.shape) if compute_grad else (0,)
    return logits.new_empty((1,), dtype=torch.float32), logits.new_empty(grad_shape, dtype=torch.float32)


def st_loss_fake(logits, target, lambdas, soft_target, is_target, mode, beta, mrkld_weight, gamma,
                 sum_reduction, ignore_index, out_h, out_w, align_corners, compute_grad):
    """The fake (meta) kernel of every fused self-training-loss op."""
    return new_st_loss_outputs(logits, compute_grad)


def register_st_loss_op(op) -> None:
    """Give a fused self-training-loss custom op its fake kernel and autograd formula (the
    gradient flows to the logits only: targets, lambdas and soft targets are constants)."""
    register_fused_loss_op(op, st_loss_fake, 15, "fastst.ops.bootstrap_loss / mrkld_loss")


@torch.library.custom_op("fastst::st_loss_cpp", mutates_args=())
def st_loss_cpp(logits: torch.Tensor, target: torch.Tensor, lambdas: torch.Tensor,
                soft_target: Optional[torch.Tensor], is_target: Optional[torch.Tensor], mode: int,
                beta: float, mrkld_weight: float, gamma: float, sum_reduction: bool, ignore_index: int,
                out_h: int, out_w: int, align_corners: bool,
                compute_grad: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fused bootstrapping (mode 0 hard / 1 soft / 3 soft from a teacher, docs/ops.md §6) or CRST-MRKLD
    (mode 2, docs/ops.md §5) loss on the CPU, deterministic for any thread count.

    Args:
        logits: (B, C, h, w) float32/float16/bfloat16, any strides; upsampled on the fly to
            (out_h, out_w) when that differs.
        target: (B, out_h, out_w) uint8/int64 (not read in mode 3). lambdas: (C,) float32
            (bootstrap).
        soft_target: (B, C, out_h, out_w) float32 (mode 1); the teacher's logits (B, C, h, w)
            (mode 3, made into soft targets in the pass with exponent gamma); else None.
        is_target: (B,) bool, target-domain crops (mode 2), else None.
    Returns:
        loss (1,) float32; grad (B, C, h, w) float32 or (0,).
    """
    B, C, h, w = logits.shape
    loss, grad = new_st_loss_outputs(logits, compute_grad)
    target = target.contiguous()
    lambdas = lambdas.contiguous()
    soft = soft_target.float().contiguous() if soft_target is not None else None
    flags = is_target.to(torch.uint8).contiguous() if is_target is not None else None
    extension().st_loss_cpu(
        logits.data_ptr(), DTYPE_CODES[logits.dtype], (B, C, h, w), (out_h, out_w), tuple(logits.stride()),
        target.data_ptr(), target.dtype == torch.uint8, ignore_index, mode, lambdas.data_ptr(),
        soft.data_ptr() if soft is not None else 0, flags.data_ptr() if flags is not None else 0,
        beta, mrkld_weight, gamma, sum_reduction, align_corners, loss.data_ptr(),
        grad.data_ptr() if compute_grad else 0)
    return loss, grad


register_st_loss_op(st_loss_cpp)
