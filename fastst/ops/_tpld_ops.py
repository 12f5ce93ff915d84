"""torch.library custom ops around the CBST/TPLD launchers of fastst._C (docs/ops.md §5, §6).

Outputs are allocated with torch; raw pointers, sizes and dtype codes go down to C++. Every op has
a fake (meta) kernel so it traces under torch.compile; the fused losses have an autograd formula
(the gradient is produced in the forward pass, in the low-resolution layout, like region_loss).
"""
from typing import Optional, Tuple

import torch

from ._backend import extension
from ._library import DTYPE_CODES
from ._region_loss_ops import register_fused_loss_op



def _pixels(probs: torch.Tensor, lambdas: torch.Tensor, *, vote: bool, confidence: bool):
    """Run the per-pixel pass; returns (labels, k1, k2, q1, q2, conf, flags), unused ones None."""
    B, C, H, W = probs.shape
    labels = torch.empty((B, H, W), dtype=torch.uint8, device=probs.device)
    k1 = k2 = q1 = q2 = conf = None
    if vote:
        k1, k2 = torch.empty_like(labels), torch.empty_like(labels)
        q1 = torch.empty((B, H, W), dtype=torch.float32, device=probs.device)
        q2 = torch.empty_like(q1)
    if confidence:
        conf = torch.empty((B,), dtype=torch.float64, device=probs.device)
    flags = torch.zeros((1,), dtype=torch.int32, device=probs.device)
    address = lambda t: 0 if t is None else t.data_ptr()  # noqa: E731
    extension().tpld_pixels_cpu(probs.data_ptr(), DTYPE_CODES[probs.dtype], (B, C, H, W), tuple(probs.stride()),
                                lambdas.data_ptr(), labels.data_ptr(), address(k1), address(k2), address(q1),
                                address(q2), address(conf), flags.data_ptr())
    return labels, k1, k2, q1, q2, conf, flags


@torch.library.custom_op("fastst::cbst_label_cpp", mutates_args=())
def cbst_label_cpp(probs: torch.Tensor, lambdas: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """CBST labels / TPLD confident map (docs/ops.md §5, §6) on the CPU.

    Args:
        probs: (B, C, H, W) float32/float16/bfloat16, any strides. lambdas: (C,) float32 contiguous.
    Returns:
        labels (B, H, W) uint8; flags (1,) int32 (kernels/stats.h value flags of probs).
    """
    labels, *_, flags = _pixels(probs, lambdas, vote=False, confidence=False)
    return labels, flags


@cbst_label_cpp.register_fake
def _cbst_label_fake(probs, lambdas):
    B, _, H, W = probs.shape
    return probs.new_empty((B, H, W), dtype=torch.uint8), probs.new_empty((1,), dtype=torch.int32)


@torch.library.custom_op("fastst::image_confidence_cpp", mutates_args=())
def image_confidence_cpp(probs: torch.Tensor, lambdas: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """conf_t per image fused with the confident-label pass (docs/ops.md §6) on the CPU.

    Returns:
        labels (B, H, W) uint8, conf (B,) float64, flags (1,) int32.
    """
    labels, _, _, _, _, conf, flags = _pixels(probs, lambdas, vote=False, confidence=True)
    return labels, conf, flags


@image_confidence_cpp.register_fake
def _image_confidence_fake(probs, lambdas):
    B, _, H, W = probs.shape
    return (probs.new_empty((B, H, W), dtype=torch.uint8), probs.new_empty((B,), dtype=torch.float64),
            probs.new_empty((1,), dtype=torch.int32))


@torch.library.custom_op("fastst::tpld_vote_cpp", mutates_args=())
def tpld_vote_cpp(probs: torch.Tensor, lambdas: torch.Tensor, window: int, weight: float,
                  iterations: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """TPLD voting (docs/ops.md §6) on the CPU: one pass for q, top-2 and the confident map, then one
    window pass per iteration over the two candidate classes.

    Returns:
        labels (B, H, W) uint8, flags (1,) int32.
    """
    labels, k1, k2, q1, q2, _, flags = _pixels(probs, lambdas, vote=iterations > 0, confidence=False)
    if iterations > 0:
        B, _, H, W = probs.shape
        extension().tpld_vote_cpu(labels.data_ptr(), k1.data_ptr(), k2.data_ptr(), q1.data_ptr(), q2.data_ptr(),
                                  B, H, W, window, weight, iterations)
    return labels, flags


@tpld_vote_cpp.register_fake
def _tpld_vote_fake(probs, lambdas, window, weight, iterations):
    return _cbst_label_fake(probs, lambdas)


@torch.library.custom_op("fastst::cbst_collect_cpp", mutates_args=())
def cbst_collect_cpp(m: torch.Tensor, a: torch.Tensor, num_classes: int, subsample: int,
                     total: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The values a class-balanced threshold keeps (docs/ops.md §5), on the CPU.

    Args:
        m: (B, H, W) float32 max probability; a: (B, H, W) uint8 argmax (< num_classes).
        total: sum over (image, class) of ceil(count / subsample), the number of kept values.
    Returns:
        values (total,) float32 and classes (total,) uint8, row-major per image.
    """
    B = m.shape[0]
    m, a = m.contiguous(), a.contiguous()
    values = torch.empty((total,), dtype=torch.float32, device=m.device)
    classes = torch.empty((total,), dtype=torch.uint8, device=m.device)
    extension().cbst_collect_cpu(m.data_ptr(), a.data_ptr(), B, m[0].numel(), num_classes, subsample,
                                 values.data_ptr(), classes.data_ptr())
    return values, classes


@cbst_collect_cpp.register_fake
def _cbst_collect_fake(m, a, num_classes, subsample, total):
    return m.new_empty((total,), dtype=torch.float32), m.new_empty((total,), dtype=torch.uint8)


@torch.library.custom_op("fastst::cbst_thresholds_cpp", mutates_args=())
def cbst_thresholds_cpp(values: torch.Tensor, classes: torch.Tensor, num_classes: int,
                        portion: float) -> torch.Tensor:
    """Exact class-balanced thresholds (C,) float32 from the kept values (docs/ops.md §5), on the CPU."""
    values, classes = values.contiguous(), classes.contiguous()
    lambdas = torch.empty((num_classes,), dtype=torch.float32, device=values.device)
    extension().cbst_thresholds_cpu(values.data_ptr(), classes.data_ptr(), values.numel(), num_classes,
                                    portion, lambdas.data_ptr())
    return lambdas


@cbst_thresholds_cpp.register_fake
def _cbst_thresholds_fake(values, classes, num_classes, portion):
    return values.new_empty((num_classes,), dtype=torch.float32)


# ------------------------------------------------------------------------------ fused losses
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
