"""Pure-PyTorch reference operators: the definition of truth every backend is tested against.

Readable and vectorised (no Python loop per pixel; loops only over instances, where the EMA is
sequential by definition). See SPEC sections 1 and 2.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

IGNORE = 255
_SPLITTER = 134217729.0  # 2**27 + 1: Veltkamp splitting of a float64 into two 26-bit halves


# ---------------------------------------------------------------------------------------------
# theta ** gamma, shared by every backend (SPEC 1): binary powering in double-double arithmetic,
# rounded once to float64. Every line is one IEEE operation in a fixed order with no FMA, so the
# C++ and CUDA twins (csrc/fastst/kernels/ias.h) give the same bits.
# ---------------------------------------------------------------------------------------------
def _split(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    c = a * _SPLITTER
    hi = c - (c - a)
    return hi, a - hi


def _two_prod(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """p = fl(a * b) and the exact error a * b - p (Dekker)."""
    p = a * b
    a_hi, a_lo = _split(a)
    b_hi, b_lo = _split(b)
    err = (((a_hi * b_hi - p) + a_hi * b_lo) + a_lo * b_hi) + a_lo * b_lo
    return p, err


def _dd_mul(a_hi, a_lo, b_hi, b_lo):
    p, e = _two_prod(a_hi, b_hi)
    e = e + (a_hi * b_lo + a_lo * b_hi)
    hi = p + e
    return hi, e - (hi - p)


def theta_pow(theta: torch.Tensor, gamma: float) -> torch.Tensor:
    """theta ** gamma for a float64 tensor: double-double binary powering when gamma is an
    integer up to 2**62 (correctly rounded in practice), else torch.pow."""
    theta = theta.to(torch.float64)
    if float(gamma) != int(gamma) or float(gamma) > 2.0 ** 62:
        return torch.pow(theta, float(gamma))
    n = int(gamma)
    r_hi, r_lo = torch.ones_like(theta), torch.zeros_like(theta)
    b_hi, b_lo = theta.clone(), torch.zeros_like(theta)
    while n:
        if n & 1:
            r_hi, r_lo = _dd_mul(r_hi, r_lo, b_hi, b_lo)
        n >>= 1
        if n:
            b_hi, b_lo = _dd_mul(b_hi, b_lo, b_hi, b_lo)
    return r_hi + r_lo


# ---------------------------------------------------------------------------------------------
# IAS pseudo labels (SPEC 1)
# ---------------------------------------------------------------------------------------------
def pixel_stats(x: torch.Tensor, *, from_logits: bool, size: Optional[Sequence[int]],
                align_corners: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Max and argmax of the class probabilities per pixel.

    Args:
        x: (B, C, h, w) float32/float16/bfloat16 probabilities, or logits if `from_logits`.
        size: (H, W) to upsample logits to (bilinear, as F.interpolate), or None.
    Returns:
        m: (B, H, W) float32, max_c p; a: (B, H, W) int64, argmax_c p (lowest index on ties).
    """
    if from_logits:
        logits = x.float()
        if size is not None and tuple(size) != tuple(logits.shape[-2:]):
            logits = F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=align_corners)
        p = torch.softmax(logits, dim=1)
    else:
        p = x
    m, a = p.max(dim=1)
    return m.float() + 0.0, a  # + 0.0: -0 becomes +0, so float bits sort like values


def _segments(a: torch.Tensor, values_key: torch.Tensor, instance: torch.Tensor, C: int,
              shift: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort pixels by (instance, class, value) at once.

    Returns the sorted value keys (int64, low `shift` bits of the packed key), the class of
    each sorted entry, and the counts (G, C) and start offsets (G, C) of every (instance, class)
    segment.
    """
    segment = instance * C + a
    keys, _ = torch.sort((segment << shift) | values_key)
    G = int(instance.max()) + 1
    counts = torch.bincount(segment, minlength=G * C).view(G, C)
    starts = (torch.cumsum(counts.flatten(), 0) - counts.flatten()).view(G, C)
    return keys & ((1 << shift) - 1), (keys >> shift) % C, counts, starts


def _label(m: torch.Tensor, a: torch.Tensor, theta: torch.Tensor, strict: bool) -> torch.Tensor:
    threshold = theta[a]
    keep = m.double() > threshold if strict else m.double() >= threshold
    return torch.where(keep, a, torch.full_like(a, IGNORE)).to(torch.uint8)


def ias_from_stats(m: torch.Tensor, a: torch.Tensor, theta: torch.Tensor, *, num_classes: int,
                   alpha: float, beta: float, gamma: float, mode: str,
                   group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """IAS thresholds (sequential EMA over instances) and labels from per-pixel max/argmax.

    Args:
        m: (B, H, W) float32 max probability (>= +0). a: (B, H, W) integer argmax.
        theta: (C,) float64 threshold before the first instance.
        mode: "paper" (SPEC 1.1, one image an instance) or "official" (SPEC 1.2).
        group: images per instance (1 in paper mode).
    Returns:
        labels (B, H, W) uint8, theta_out (C,) float64, theta_per_instance (G, C) float64.
    """
    B = m.shape[0]
    C = num_classes
    a = a.long()
    instance = (torch.arange(B, device=m.device) // group).view(B, 1, 1).expand_as(a).reshape(-1)
    flat_a = a.reshape(-1)
    if mode == "paper":
        bits = m.reshape(-1).view(torch.int32).long() & 0xFFFFFFFF
        sorted_keys, sorted_class, counts, starts = _segments(flat_a, bits, instance, C, 32)
        sorted_values = sorted_keys.to(torch.int32).view(torch.float32).double()
    else:
        bits = m.reshape(-1).half().view(torch.int16).long() & 0xFFFF
        sorted_keys, sorted_class, counts, starts = _segments(flat_a, bits, instance, C, 16)
        sorted_values = sorted_keys.to(torch.int16).view(torch.float16).double()
    last = sorted_values.numel() - 1
    theta = theta.to(torch.float64).clone()
    per_instance = []
    labels = torch.empty(a.shape, dtype=torch.uint8, device=m.device)
    for g in range(counts.shape[0]):
        n, start = counts[g], starts[g]
        k = alpha * theta_pow(theta, gamma)
        if mode == "paper":
            r = torch.floor(k * n.double()).long().clamp(min=0)
            r = torch.minimum(r, (n - 1).clamp(min=0))
            psi = sorted_values[(start + n - 1 - r).clamp(0, last)]
            updated = beta * theta + (1.0 - beta) * psi
            theta = torch.where(n > 0, updated, theta)
        else:
            segment = slice(int(start[0]), int(start[0] + n.sum()))
            below = sorted_values[segment] < theta[sorted_class[segment]]
            n_below = torch.bincount(sorted_class[segment][below], minlength=C)
            psi = _official_percentile(sorted_values, start, n, n_below, theta, k, last)
            one_minus_beta = torch.tensor(1.0 - beta, dtype=torch.float32, device=m.device)
            theta = beta * theta + (psi.float() * one_minus_beta).double()
            theta = torch.where(theta >= 1.0, torch.full_like(theta, 0.999), theta)
        per_instance.append(theta)
        images = slice(g * group, min((g + 1) * group, B))
        labels[images] = _label(m[images], a[images], theta, strict=(mode == "paper"))
    return labels, theta, torch.stack(per_instance)


def _official_percentile(sorted_values, start, n, n_below, theta, k, last):
    """numpy.percentile(arr, 100 * (1 - k)), default "linear" method, per class at once, where
    arr = [theta_c] + the instance's float16 values of class c (SPEC 1.2): n values of class c
    start at sorted_values[start], n_below of them are smaller than theta_c."""
    q = 100.0 * (1.0 - k)
    quantile = q / 100.0
    size = n + 1  # the seed element theta_c is part of arr
    v = (size - 1).double() * quantile
    i = torch.floor(v)
    t = v - i
    above = v >= (size - 1).double()
    i = i.long().clamp(min=0)

    def element(j):
        """sorted(arr)[j] without building arr: theta_c sits right after the smaller values."""
        from_values = sorted_values[(start + j - (j > n_below).long()).clamp(0, last)]
        return torch.where(j == n_below, theta, from_values)

    lo = element(torch.where(above, n, i))
    hi = element(torch.where(above, n, torch.minimum(i + 1, n)))
    diff = hi - lo
    return torch.where(t < 0.5, lo + diff * t, hi - diff * (1.0 - t))


def ias_pseudo_label(x: torch.Tensor, theta: Optional[torch.Tensor], *, alpha: float,
                     beta: float = 0.9, gamma: float = 8.0, mode: str = "paper",
                     from_logits: bool = False, size: Optional[Sequence[int]] = None,
                     align_corners: bool = True, group: Optional[int] = None):
    """Instance-adaptive pseudo labels (IAST Algorithm 1; SPEC section 1), reference version.

    Args:
        x: (B, C, h, w) float32/float16/bfloat16 probabilities, or logits if `from_logits`.
        theta: (C,) float64 thresholds carried from the previous batch, or None (0.9 each).
        alpha, beta, gamma: the selector's portion, EMA momentum and threshold exponent.
        mode: "paper" (instance = image, strict `>`) or "official" (released code, groups).
        from_logits, size, align_corners: p = softmax(upsample(x)) instead of p = x.
        group: images per instance ("official": default 2; "paper": None or 1).
    Returns:
        labels (B, H, W) uint8 (255 = ignored), theta_out (C,) float64,
        theta_per_instance (G, C) float64 (theta after each instance's update).
    """
    C = x.shape[1]
    group = group if group is not None else (2 if mode == "official" else 1)
    if theta is None:
        theta = torch.full((C,), 0.9, dtype=torch.float64, device=x.device)
    m, a = pixel_stats(x, from_logits=from_logits, size=size, align_corners=align_corners)
    return ias_from_stats(m, a, theta, num_classes=C, alpha=alpha, beta=beta, gamma=gamma,
                          mode=mode, group=group)


# ---------------------------------------------------------------------------------------------
# Region losses (SPEC 2): IAST Eq. 3, 8, 9 with the released normalisation
# ---------------------------------------------------------------------------------------------
def region_loss_terms(x: torch.Tensor, target: torch.Tensor, *, lambda_kld: float, lambda_ent: float,
                      ignore_index: int, align_corners: bool
                      ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The computation of `region_loss`, in the floating dtype of `x` (no validation).

    `region_loss` calls it with `x = logits.float()`; tests call it in float64 for gradcheck.
    Per-pixel gradients w.r.t. the upsampled logits, with H = -sum_c p_c log p_c:
    CE (p - onehot)/n_v and KLD (C p - 1)/(C^2 n_v) on V, ENT -p (log p + H)/(C n_i) on I;
    autograd back-projects them through the adjoint of the bilinear upsampling.

    Args:
        x: (B, C, h, w) floating logits; upsampled bilinearly to target's (H, W) when (h, w) differs
            (bilinear resampling to the same size is the identity for both align_corners values).
        target: (B, H, W) uint8/int64 labels; values must be < C or == ignore_index.
    Returns:
        (loss, ce, kld, ent), 0-dim tensors in x's dtype.
    """
    B, C = x.shape[0], x.shape[1]
    H, W = target.shape[1], target.shape[2]
    if tuple(x.shape[2:]) != (H, W):
        x = F.interpolate(x, size=(H, W), mode="bilinear", align_corners=align_corners)
    logp = torch.log_softmax(x, dim=1)                       # (B, C, H, W)

    t = target.long()
    valid = t != ignore_index                                # V, (B, H, W)
    invalid = ~valid                                         # I
    n_v = valid.sum().to(x.dtype)
    n_i = invalid.sum().to(x.dtype)

    # CE: -log p_y on V (labels of ignored pixels replaced by 0 so that gather stays in range).
    y = torch.where(valid, t, torch.zeros_like(t))
    nll = -logp.gather(1, y.unsqueeze(1)).squeeze(1)          # (B, H, W)
    ce_sum = torch.where(valid, nll, torch.zeros_like(nll)).sum()

    # KLD to uniform: sum_c -(1/C) log p_c on V.
    kl_pix = -logp.sum(dim=1) / C                            # (B, H, W)
    kld_sum = torch.where(valid, kl_pix, torch.zeros_like(kl_pix)).sum()

    # Entropy: sum_c -p_c log p_c on I.
    ent_pix = -(logp.exp() * logp).sum(dim=1)                # (B, H, W)
    ent_sum = torch.where(invalid, ent_pix, torch.zeros_like(ent_pix)).sum()

    # An empty part has a zero sum (and zero gradient); clamping its count to 1 makes it exactly 0.
    one = torch.ones((), dtype=x.dtype, device=x.device)
    ce = ce_sum / torch.maximum(n_v, one)
    kld = kld_sum / (C * torch.maximum(n_v, one))
    ent = ent_sum / (C * torch.maximum(n_i, one))
    loss = ce + lambda_kld * kld + lambda_ent * ent
    return loss, ce, kld, ent


def region_loss(logits: torch.Tensor, target: torch.Tensor, *, lambda_kld: float = 0.1,
                lambda_ent: float = 3.0, ignore_index: int = 255,
                size: Optional[Sequence[int]] = None, align_corners: bool = True,
                return_parts: bool = False):
    """IAST's region loss, reference version: logits cast to float32, upsampled with
    F.interpolate to the target's (H, W) when the sizes differ, then `region_loss_terms`.

    Args:
        logits: (B, C, h, w) float32/float16/bfloat16. target: (B, H, W) uint8/int64.
        size: None or the target's (H, W) (checked by the public op).
    Returns:
        a float32 0-dim loss, or (loss, ce, kld, ent) with return_parts=True.
    """
    loss, ce, kld, ent = region_loss_terms(logits.float(), target, lambda_kld=lambda_kld,
                                           lambda_ent=lambda_ent, ignore_index=ignore_index,
                                           align_corners=align_corners)
    return (loss, ce, kld, ent) if return_parts else loss
