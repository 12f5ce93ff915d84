"""Public CBST / CRST operators (SPEC 5): `ClassBalancedThresholds`, `cbst_pseudo_label`,
`mrkld_loss`; validation, backend choice and dispatch.

Backends: "cpp" (C++/OpenMP in fastst._C, the CPU default) and "torch" (reference.py; also what
runs on CUDA tensors: the statistics use the fused CUDA/Triton pass where built); `mrkld_loss`
also has "triton" (fused, the CUDA default).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import _checks, reference
from ._backend import choose_backend
from ._tpld_ops import MRKLD, cbst_collect_cpp, cbst_label_cpp, cbst_thresholds_cpp, st_loss_cpp

IMPLEMENTED = ("cpp", "torch")
MRKLD_BACKENDS = ("triton", "cpp", "torch")


def check_lambdas(lambdas: object, C: int, device: torch.device) -> torch.Tensor:
    """A (C,) floating tensor on `device` with finite values > 0, as contiguous float32."""
    if not isinstance(lambdas, torch.Tensor):
        raise TypeError(f"lambdas must be a float tensor of shape ({C},) (from ClassBalancedThresholds."
                        f"thresholds), got {type(lambdas).__name__}")
    if not lambdas.is_floating_point():
        raise TypeError(f"lambdas must be a floating-point tensor (float32), got {lambdas.dtype}")
    if tuple(lambdas.shape) != (C,):
        raise ValueError(f"lambdas must have shape ({C},) to match C = {C} classes, got {tuple(lambdas.shape)}")
    if lambdas.device != device:
        raise ValueError(f"lambdas is on {lambdas.device} but the scores are on {device}; keep them on one device")
    lambdas = lambdas.to(torch.float32).contiguous()
    if _checks.value_checks_enabled(device) and not bool((torch.isfinite(lambdas) & (lambdas > 0)).all()):
        raise ValueError("lambdas must be finite and > 0 (class thresholds in (0, 1]); got "
                         f"{lambdas.tolist()}")
    return lambdas


def check_probs(name: str, probs: object) -> torch.Tensor:
    """Shape and dtype of a (B, C, H, W) probability map (the values are checked by the ops)."""
    return _checks.check_scores(name, probs)


def check_prob_values(name: str, probs: torch.Tensor) -> None:
    """NaN/Inf and [0, 1] range, with torch ops (the fused backends flag them in their pass)."""
    if not _checks.value_checks_enabled(probs.device):
        return
    finite = bool(torch.isfinite(probs).all())
    in_range = bool(((probs >= 0) & (probs <= 1)).all()) if finite else True
    _checks.raise_on_stat_flags(name, (0 if finite else 1) | (0 if in_range else 2), False)


def raise_on_flags(name: str, flags: torch.Tensor) -> None:
    if _checks.value_checks_enabled(flags.device):
        _checks.raise_on_stat_flags(name, int(flags.item()), False)


def cbst_pseudo_label(probs: torch.Tensor, lambdas: torch.Tensor, *, backend: Optional[str] = None) -> torch.Tensor:
    """CBST pseudo labels (SPEC 5): w = p / lambda (float32 IEEE division); the label is
    argmax w (lowest index on ties) where max w >= 1, else 255.

    Args:
        probs: (B, C, H, W) float32/float16/bfloat16 probabilities, any strides.
        lambdas: (C,) class thresholds (ClassBalancedThresholds.thresholds), same device.
        backend: "cpp" or "torch" (default: SPEC section 0).
    Returns:
        (B, H, W) uint8.
    """
    probs = check_probs("probs", probs)
    lambdas = check_lambdas(lambdas, probs.shape[1], probs.device)
    name = choose_backend("cbst_pseudo_label", probs.device, IMPLEMENTED, backend)
    if name == "torch":
        check_prob_values("probs", probs)
        return reference.cbst_pseudo_label(probs, lambdas)
    labels, flags = cbst_label_cpp(probs, lambdas)
    raise_on_flags("probs", flags)
    return labels


class ClassBalancedThresholds:
    """Class-balanced confidence thresholds over a whole target set (CBST, SPEC 5), streamed.

    For each class k: the max probabilities of the pixels whose argmax is k (lowest index on
    ties), subsampled per image and class to positions 0, s, 2s, ... in row-major order, sorted
    descending; lambda_k = sorted[floor(len_k * portion) - 1], or 1 when that count is 0.

    Exact: the kept values are stored (float32 + a uint8 class each, in buffers that grow by
    doubling on the device of the first batch) and `thresholds` takes exact per-class order
    statistics (cpp: counting sort by class + nth_element; torch: sort). Memory is 5 bytes per
    kept value, so `subsample=4` (the released setting) quarters it; an exact one-pass selection
    at an unknown rank needs the values (or a histogram of every float32 pattern).

    Args:
        num_classes: C, 2..254.
        subsample: s >= 1.
        backend: "cpp" or "torch" for every call (default: SPEC section 0, from the first batch).
    """

    def __init__(self, num_classes: int, subsample: int = 1, *, backend: Optional[str] = None):
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or not 2 <= num_classes <= _checks.MAX_CLASSES:
            raise ValueError(f"num_classes must be an int in [2, {_checks.MAX_CLASSES}], got {num_classes!r}")
        if isinstance(subsample, bool) or not isinstance(subsample, int) or subsample < 1:
            raise ValueError(f"subsample must be an int >= 1 (the released code uses 4), got {subsample!r}")
        self.num_classes = num_classes
        self.subsample = subsample
        self.backend = backend
        self.reset()

    def reset(self) -> None:
        """Forget every value and count (start of a self-training round)."""
        self._values: Optional[torch.Tensor] = None
        self._classes: Optional[torch.Tensor] = None
        self._size = 0
        self._counts: Optional[torch.Tensor] = None

    def _append(self, values: torch.Tensor, classes: torch.Tensor) -> None:
        need = self._size + values.numel()
        if self._values is None or need > self._values.numel():
            capacity = max(need, 2 * (0 if self._values is None else self._values.numel()), 1024)
            grown_v = values.new_empty((capacity,))
            grown_c = classes.new_empty((capacity,))
            if self._values is not None:
                grown_v[: self._size] = self._values[: self._size]
                grown_c[: self._size] = self._classes[: self._size]
            self._values, self._classes = grown_v, grown_c
        self._values[self._size:need] = values
        self._classes[self._size:need] = classes
        self._size = need

    def update(self, probs: torch.Tensor) -> None:
        """Add one batch of probabilities (B, C, H, W) float32/float16/bfloat16 (any strides)."""
        probs = check_probs("probs", probs)
        if probs.shape[1] != self.num_classes:
            raise ValueError(f"probs has C = {probs.shape[1]} classes but the accumulator was made for "
                             f"num_classes = {self.num_classes}")
        if self._counts is not None and probs.device != self._counts.device:
            raise ValueError(f"probs is on {probs.device} but earlier batches were on {self._counts.device}")
        name = choose_backend("ClassBalancedThresholds", probs.device, IMPLEMENTED, self.backend)
        B, C, H, W = probs.shape
        if name == "cpp":
            from ._library import pixel_stats
            m, a, counts, flags = pixel_stats(probs, False, H, W, True)
            raise_on_flags("probs", flags)
            total = int((-(-counts // self.subsample)).sum())  # ceil(count / s) per (image, class)
            values, classes = cbst_collect_cpp(m, a, C, self.subsample, total)
            counts = counts.sum(0)
        else:
            check_prob_values("probs", probs)
            m, a = reference.pixel_stats(probs, from_logits=False, size=None, align_corners=True)
            a = a.reshape(B, -1)
            counts = torch.bincount(a.reshape(-1), minlength=C)
            keep = reference.cbst_keep_mask(a, C, self.subsample)
            values, classes = m.reshape(B, -1)[keep], a[keep].to(torch.uint8)
        self._counts = counts if self._counts is None else self._counts + counts
        self._append(values, classes)

    def kept(self) -> "tuple[torch.Tensor, torch.Tensor]":
        """(values float32 (n,), classes uint8 (n,)): the subsampled max probabilities kept so
        far and their argmax classes (views of the accumulator's buffers; empty before the
        first batch). What several processes merge to get the thresholds of their union."""
        if self._values is None:
            return torch.zeros(0, dtype=torch.float32), torch.zeros(0, dtype=torch.uint8)
        return self._values[: self._size], self._classes[: self._size]

    def class_counts(self) -> torch.Tensor:
        """Pixels per argmax class over every batch so far, not subsampled: int64 (C,)."""
        if self._counts is None:
            return torch.zeros(self.num_classes, dtype=torch.int64)
        return self._counts.clone()

    def thresholds(self, portion: float) -> torch.Tensor:
        """lambda (C,) float32 for the selected `portion` in [0, 1] (1 for classes with too few
        values), on the device of the batches."""
        portion = _checks.check_real("portion", portion, low=0.0, high=1.0)
        if self._values is None:
            return torch.ones(self.num_classes, dtype=torch.float32)
        values, classes = self._values[: self._size], self._classes[: self._size]
        name = choose_backend("ClassBalancedThresholds", values.device, IMPLEMENTED, self.backend)
        if name == "cpp":
            return cbst_thresholds_cpp(values, classes, self.num_classes, portion)
        return reference.class_balanced_thresholds(values, classes, self.num_classes, portion)


def mrkld_loss(logits: torch.Tensor, target: torch.Tensor, is_target: torch.Tensor, *,
               mrkld_weight: float = 0.01, ignore_index: int = 255, size: Optional[Sequence[int]] = None,
               align_corners: bool = True, backend: Optional[str] = None) -> torch.Tensor:
    """CRST-MRKLD loss (SPEC 5): ce_sum / n_valid + mrkld_weight * kld_sum / n_valid_tgt, with
    kld_sum = sum over the valid pixels of target crops of -(1/C) sum_c log p_c. The KLD term is
    dropped when no target crop has a valid pixel; the loss is 0 when no pixel is valid.

    Args:
        logits: (B, C, h, w) float32/float16/bfloat16, upsampled bilinearly (fused in "cpp" and
            "triton") to the target's (H, W) when the sizes differ.
        target: (B, H, W) uint8/int64 labels, ignore_index = unlabelled.
        is_target: (B,) bool, which crops come from the target domain.
        mrkld_weight: w_eff >= 0 (the released run's effective 0.01).
        size: None or the target's (H, W) (checked).
        backend: "triton", "cpp" or "torch" (default: SPEC section 0).
    Returns:
        float32 0-dim loss (differentiable w.r.t. logits).
    """
    from .region_loss import _check_args
    _check_args(logits, target, 0.0, 0.0, ignore_index, size, align_corners)
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
    compute_grad = torch.is_grad_enabled() and logits.requires_grad
    ones = torch.ones(logits.shape[1], dtype=torch.float32, device=logits.device)
    op = st_loss_cpp
    if name == "triton":
        from .triton.st_loss import st_loss_triton as op  # imports triton only when asked
    loss, _ = op(logits, target, ones, None, is_target, MRKLD, 0.0, mrkld_weight, False,
                 ignore_index, target.shape[1], target.shape[2], align_corners, compute_grad)
    return loss[0]

