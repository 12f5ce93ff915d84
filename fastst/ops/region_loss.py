"""Public `region_loss` (docs/ops.md §2): validation, backend choice and dispatch.

Backends: "cpp" (C++/OpenMP, the CPU default) and "triton" (the CUDA default) are fused: one pass
reads the low-resolution logits and the labels, upsamples on the fly, and yields the parts and
d loss / d logits in the low-resolution layout; no (B, C, H, W) tensor is made, forward or
backward. "torch" is reference.py (F.interpolate + log_softmax + masked sums, autograd).

In the fused backends a term whose lambda is 0 costs nothing unless `return_parts` asks for the
parts: lambda_kld = 0 skips the KLD's reduction, lambda_ent = 0 the entropy's (and the softmax
of runs of ignored pixels); both 0 is plain mean cross-entropy over the labelled pixels. The
loss and gradient are bit-for-bit the same either way.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import _checks, reference
from ._backend import choose_backend
from .ext.region_loss import region_loss_cpp

IMPLEMENTED = ("triton", "cpp", "torch")


def _fused_op(backend: str):
    if backend == "cpp":
        return region_loss_cpp
    from .triton.region_loss import region_loss_triton  # imports triton only when asked
    return region_loss_triton


def region_loss(logits: torch.Tensor, target: torch.Tensor, *, lambda_kld: float = 0.1,
                lambda_ent: float = 3.0, ignore_index: int = 255,
                size: Optional[Sequence[int]] = None, align_corners: bool = True,
                return_parts: bool = False, deterministic: bool = False,
                backend: Optional[str] = None):
    """IAST's self-training loss: CE + lambda_kld * KLD-to-uniform on labelled pixels, plus
    lambda_ent * entropy on ignored pixels, with the released normalisation (docs/ops.md §2).

    Args:
        logits: (B, C, h, w) float32/float16/bfloat16, any strides; upsampled bilinearly (as
            F.interpolate with `align_corners`) to the target's (H, W) when the sizes differ.
        target: (B, H, W) uint8 or int64 labels in 0..C-1, `ignore_index` = unlabelled.
        lambda_kld, lambda_ent: weights of the KLD and entropy terms, finite and >= 0; a 0
            turns the term off, and the fused backends then skip its work (unless
            `return_parts`).
        size: None or the target's (H, W) (checked).
        return_parts: also return the unweighted (ce, kld, ent), for logging; the fused
            backends compute them in the same pass and return them detached (only `loss`
            carries a gradient there).
        deterministic: ask for bit-identical gradients from run to run. Every fused backend
            already is (no atomics: each low-resolution gradient cell is summed by one owner in
            a fixed order), so this is a promise kept, not a slower path.
        backend: "triton", "cpp" or "torch" (default: docs/ops.md §0).
    Returns:
        a float32 0-dim tensor, or (loss, ce, kld, ent). A part with no pixels is 0.
    """
    lambda_kld, lambda_ent, ignore_index = _checks.check_loss_args(
        logits, target, lambda_kld, lambda_ent, ignore_index, size, align_corners, return_parts)
    if not isinstance(deterministic, bool):
        raise TypeError(f"deterministic must be a bool, got {type(deterministic).__name__}")
    name = choose_backend("region_loss", logits.device, IMPLEMENTED, backend)
    if name == "torch":
        return reference.region_loss(logits, target, lambda_kld=lambda_kld, lambda_ent=lambda_ent,
                                     ignore_index=ignore_index, align_corners=align_corners,
                                     return_parts=return_parts)
    compute_grad = torch.is_grad_enabled() and logits.requires_grad
    parts, _ = _fused_op(name)(logits, target, lambda_kld, lambda_ent, ignore_index,
                               target.shape[1], target.shape[2], align_corners, return_parts, compute_grad)
    if return_parts:
        return parts[0], parts[1].detach(), parts[2].detach(), parts[3].detach()
    return parts[0]
