"""torch.library custom ops of the fused region loss (docs/ops.md §2) and their autograd.

Each fused backend is one op with the signature of `region_loss_cpp` below. It returns the four
parts and, when `compute_grad`, d loss / d logits in float32 in the low-resolution layout: the
fused kernels produce the gradient in the same pass as the loss (the softmax of every
full-resolution pixel is computed once), so the backward is a scale by the incoming gradient and
no full-resolution tensor is ever kept. Only `loss` (parts[0]) is differentiable: the public op
returns ce, kld and ent detached, for logging.

A term whose lambda is 0 costs nothing unless `need_parts` asks for every part (`needed_terms`):
its reductions are not run and its part comes back as NaN (not computed); the loss and the
gradient are bit-for-bit those of the full computation, where the term added a signed zero.
"""
from typing import Tuple

import torch

from .._backend import extension
from . import DTYPE_CODES
from .fused_loss import register_fused_loss_op


def new_region_loss_outputs(logits: torch.Tensor, compute_grad: bool):
    """parts (4,) float32 and grad (B, C, h, w) float32 contiguous, or (0,) without gradient."""
    parts = logits.new_empty((4,), dtype=torch.float32)
    grad_shape = tuple(logits.shape) if compute_grad else (0,)
    return parts, logits.new_empty(grad_shape, dtype=torch.float32)


def needed_terms(lambda_kld: float, lambda_ent: float, need_parts: bool) -> Tuple[bool, bool]:
    """(need_kld, need_ent): which of the KLD and entropy terms a fused op computes. A term is
    skipped only when its lambda is 0 (it adds nothing to the loss or the gradient) and the
    caller does not want the parts."""
    return need_parts or lambda_kld != 0.0, need_parts or lambda_ent != 0.0


def region_loss_fake(logits, target, lambda_kld, lambda_ent, ignore_index, out_h, out_w,
                     align_corners, need_parts, compute_grad):
    """The fake (meta) kernel of every fused region-loss op: shapes and dtypes only."""
    return new_region_loss_outputs(logits, compute_grad)


def register_region_loss_op(op) -> None:
    """Give a fused region-loss custom op its fake kernel and autograd formula."""
    register_fused_loss_op(op, region_loss_fake, 10, "fastst.ops.region_loss")


@torch.library.custom_op("fastst::region_loss_cpp", mutates_args=())
def region_loss_cpp(logits: torch.Tensor, target: torch.Tensor, lambda_kld: float, lambda_ent: float,
                    ignore_index: int, out_h: int, out_w: int, align_corners: bool,
                    need_parts: bool, compute_grad: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fused region loss on the CPU (C++/OpenMP, deterministic for any thread count).

    Args:
        logits: (B, C, h, w) float32/float16/bfloat16, any strides.
        target: (B, out_h, out_w) uint8 or int64.
        out_h, out_w: the target's size; logits are upsampled to it on the fly when it differs.
        need_parts: compute ce, kld and ent whatever the lambdas; without it a term whose
            lambda is 0 is skipped (`needed_terms`).
        compute_grad: also produce d loss / d logits.
    Returns:
        parts (4,) float32 = (loss, ce, kld, ent), a skipped part NaN; grad (B, C, h, w)
        float32 or (0,).
    """
    B, C, h, w = logits.shape
    parts, grad = new_region_loss_outputs(logits, compute_grad)
    target = target.contiguous()
    need_kld, need_ent = needed_terms(lambda_kld, lambda_ent, need_parts)
    extension().region_loss_cpu(
        logits.data_ptr(), DTYPE_CODES[logits.dtype], (B, C, h, w), (out_h, out_w),
        tuple(logits.stride()), target.data_ptr(), target.dtype == torch.uint8, ignore_index,
        lambda_kld, lambda_ent, need_kld, need_ent, align_corners, parts.data_ptr(),
        grad.data_ptr() if compute_grad else 0)
    return parts, grad


register_region_loss_op(region_loss_cpp)
