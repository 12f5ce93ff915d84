"""Pure-PyTorch reference operators: the definition of truth every backend is tested against.

Readable and vectorised (no Python loop per pixel; loops only over instances, where the EMA is
sequential by definition). See docs/ops.md §1 and §2. One file with one section per op stem
(over 400 lines on purpose): the definitions of truth read as one document beside docs/ops.md,
and the sections share the exact-arithmetic helpers at the top.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

IGNORE = 255
_SPLITTER = 134217729.0  # 2**27 + 1: Veltkamp splitting of a float64 into two 26-bit halves


# ---------------------------------------------------------------------------------------------
# theta ** gamma, shared by every backend (docs/ops.md §1): binary powering in double-double arithmetic,
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
# stats: the statistics pass of the IAS and CBST labels (docs/ops.md §1)
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


# ---------------------------------------------------------------------------------------------
# ias: IAS pseudo labels (docs/ops.md §1)
# ---------------------------------------------------------------------------------------------
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
        mode: "paper" (docs/ops.md §1.1, one image an instance) or "official" (docs/ops.md §1.2).
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
    arr = [theta_c] + the instance's float16 values of class c (docs/ops.md §1.2): n values of class c
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
    """Instance-adaptive pseudo labels (IAST Algorithm 1; docs/ops.md §1), reference version.

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
# region_loss: IAST's region losses, Eq. 3, 8, 9 with the released normalisation (docs/ops.md §2)
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
        target: (B, H, W) uint8/int64 labels in 0..C-1 or == ignore_index; any other value
            (it reaches here only with FASTST_CHECK=0) counts as ignored, as in the fused
            backends (docs/ops.md §0.3).
    Returns:
        (loss, ce, kld, ent), 0-dim tensors in x's dtype.
    """
    C = x.shape[1]
    H, W = target.shape[1], target.shape[2]
    if tuple(x.shape[2:]) != (H, W):
        x = F.interpolate(x, size=(H, W), mode="bilinear", align_corners=align_corners)
    logp = torch.log_softmax(x, dim=1)                       # (B, C, H, W)

    t = target.long()
    valid = (t != ignore_index) & (t >= 0) & (t < C)         # V, (B, H, W)
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


# ---------------------------------------------------------------------------------------------
# cbst: CBST / CRST labels and class thresholds (docs/ops.md §5; q and the confident map are
# TPLD's too)
# ---------------------------------------------------------------------------------------------
def tpld_q(probs: torch.Tensor, lambdas: torch.Tensor) -> torch.Tensor:
    """q_k = float32(p_k) / float32(lambda_k) (IEEE division), (B, C, H, W) float32."""
    C = probs.shape[1]
    return probs.float() / lambdas.to(device=probs.device, dtype=torch.float32).view(1, C, 1, 1)


def _confident(q: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(labels int64 (B, H, W): argmax_k q (lowest index on ties) where max q >= 1, else 255;
    argmax int64 (B, H, W))."""
    best, arg = q.max(dim=1)
    return torch.where(best >= 1.0, arg, torch.full_like(arg, IGNORE)), arg


def cbst_pseudo_label(probs: torch.Tensor, lambdas: torch.Tensor) -> torch.Tensor:
    """CBST labels (docs/ops.md §5): w = p / lambda; argmax w where max w >= 1, else 255.

    Args:
        probs: (B, C, H, W) float32/float16/bfloat16. lambdas: (C,) thresholds.
    Returns:
        (B, H, W) uint8.
    """
    return _confident(tpld_q(probs, lambdas))[0].to(torch.uint8)


def cbst_keep_mask(a: torch.Tensor, num_classes: int, subsample: int) -> torch.Tensor:
    """Which pixels a class-balanced threshold keeps (docs/ops.md §5): per image and per class, the
    pixels of that class at positions 0, s, 2s, ... in row-major order.

    Args:
        a: (B, N) integer argmax per pixel (row-major pixels of each image).
    Returns:
        (B, N) bool.
    """
    if subsample == 1:
        return torch.ones_like(a, dtype=torch.bool)
    B, N = a.shape
    a = a.long()
    order = torch.sort(a, dim=1, stable=True)
    counts = torch.zeros((B, num_classes), dtype=torch.int64, device=a.device)
    counts.scatter_add_(1, a, torch.ones_like(a))
    starts = torch.cumsum(counts, 1) - counts
    positions = torch.arange(N, device=a.device).expand(B, N)
    rank_sorted = positions - starts.gather(1, order.values)
    rank = torch.empty_like(rank_sorted).scatter_(1, order.indices, rank_sorted)
    return rank % subsample == 0


def class_balanced_thresholds(values: torch.Tensor, classes: torch.Tensor, num_classes: int,
                              portion: float) -> torch.Tensor:
    """lambda_k = (values of class k sorted descending)[floor(len_k * portion) - 1], or 1 where
    that count is 0 (docs/ops.md §5).

    Args:
        values: (n,) float32 max probabilities kept by `cbst_keep_mask`. classes: (n,) their argmax.
    Returns:
        (C,) float32.
    """
    lambdas = torch.ones(num_classes, dtype=torch.float32, device=values.device)
    for k in range(num_classes):
        v = values[classes == k]
        n_k = int(math.floor(v.numel() * portion))
        if n_k > 0:
            lambdas[k] = torch.sort(v, descending=True).values[n_k - 1]
    return lambdas


# ---------------------------------------------------------------------------------------------
# tpld: voting, image confidence, easy/hard split, soft targets (docs/ops.md §6)
# ---------------------------------------------------------------------------------------------
def tpld_vote(probs: torch.Tensor, lambdas: torch.Tensor, *, window: int = 7, weight: float = 0.7,
              iterations: int = 3) -> torch.Tensor:
    """Sliding-window top-2 voting (docs/ops.md §6), reference version.

    Each iteration decides every pixel from the previous map: for an unlabelled pixel, with k1, k2
    its two largest q (lower index first on ties), pool_k = mean of q_k(y) over the labelled
    pixels y of class k in its window (clipped at the border; float64 sum in row-major window
    order; 0 without any), s_k = weight * q_k + (1 - weight) * pool_k in float64; it takes k1 if
    s_k1 >= s_k2 and s_k1 > 1, k2 if s_k2 > s_k1 and s_k2 > 1.

    Args:
        probs: (B, C, H, W) float32/float16/bfloat16. lambdas: (C,).
    Returns:
        (B, H, W) uint8, 255 = unlabelled.
    """
    q = tpld_q(probs, lambdas)
    labels, k1 = _confident(q)
    if iterations == 0:
        return labels.to(torch.uint8)
    B, C, H, W = q.shape
    others = q.scatter(1, k1.unsqueeze(1), float("-inf"))
    k2 = others.argmax(dim=1)
    q1 = q.gather(1, k1.unsqueeze(1)).squeeze(1).double()
    q2 = q.gather(1, k2.unsqueeze(1)).squeeze(1).double()
    r = window // 2
    one_minus_weight = 1.0 - weight
    for _ in range(iterations):
        labelled = labels != IGNORE
        own_q = q.gather(1, torch.where(labelled, labels, 0).unsqueeze(1)).squeeze(1).double()
        own_q = torch.where(labelled, own_q, 0.0)
        lab_pad = F.pad(labels, (r, r, r, r), value=IGNORE)
        q_pad = F.pad(own_q, (r, r, r, r), value=0.0)
        sums = [torch.zeros_like(q1), torch.zeros_like(q2)]
        counts = [torch.zeros_like(k1), torch.zeros_like(k2)]
        for dy in range(window):
            for dx in range(window):
                lab_s = lab_pad[:, dy:dy + H, dx:dx + W]
                q_s = q_pad[:, dy:dy + H, dx:dx + W]
                for i, k in enumerate((k1, k2)):
                    hit = lab_s == k
                    sums[i] = sums[i] + torch.where(hit, q_s, 0.0)
                    counts[i] = counts[i] + hit.long()
        scores = []
        for i, qk in enumerate((q1, q2)):
            pool = torch.where(counts[i] > 0, sums[i] / counts[i].clamp(min=1).double(), 0.0)
            scores.append(weight * qk + one_minus_weight * pool)
        first = scores[0] >= scores[1]
        best = torch.where(first, scores[0], scores[1])
        choice = torch.where(first, k1, k2)
        labels = torch.where(~labelled & (best > 1.0), choice, labels)
    return labels.to(torch.uint8)


def image_confidence(probs: torch.Tensor, lambdas: torch.Tensor) -> torch.Tensor:
    """conf_t = (sum over classes k ascending with N_k > 0 of (N*_k / N_k) / lambda_k) / |K'|
    in float64 (docs/ops.md §6); N_k = pixels whose argmax p is k, N*_k = those with q_k >= 1.

    Returns:
        (B,) float64, 0 for an image with no class (impossible for H, W >= 1).
    """
    B, C = probs.shape[:2]
    q = tpld_q(probs, lambdas)
    a = probs.max(dim=1).indices.reshape(B, -1)
    sure = (q.gather(1, a.view(B, 1, *probs.shape[2:])).reshape(B, -1) >= 1.0).long()
    n = torch.zeros((B, C), dtype=torch.int64, device=probs.device).scatter_add_(1, a, torch.ones_like(a))
    n_sure = torch.zeros_like(n).scatter_add_(1, a, sure)
    return confidence_from_counts(n, n_sure, lambdas)


def confidence_from_counts(n: torch.Tensor, n_sure: torch.Tensor, lambdas: torch.Tensor) -> torch.Tensor:
    """conf_t from the per-image counts n, n_sure (B, C) integer (N_k and N*_k of docs/ops.md §6):
    float64, the classes added in ascending order (the C++ twin's order, so equal bits)."""
    B, C = n.shape
    lam = lambdas.to(device=n.device, dtype=torch.float32).double()
    total = torch.zeros(B, dtype=torch.float64, device=n.device)
    present = torch.zeros(B, dtype=torch.int64, device=n.device)
    for k in range(C):
        ratio = n_sure[:, k].double() / n[:, k].clamp(min=1).double() / lam[k]
        total = total + torch.where(n[:, k] > 0, ratio, 0.0)
        present = present + (n[:, k] > 0).long()
    return torch.where(present > 0, total / present.clamp(min=1).double(), 0.0)


def split_easy_hard(conf: torch.Tensor, easy_portion: float = 0.3) -> torch.Tensor:
    """Easy (True) = the first floor(easy_portion * N) images by conf descending, ties by
    ascending index (docs/ops.md §6). conf: (N,). Returns (N,) bool."""
    N = conf.numel()
    order = torch.sort(conf, descending=True, stable=True).indices
    easy = torch.zeros(N, dtype=torch.bool, device=conf.device)
    easy[order[: int(math.floor(easy_portion * N))]] = True
    return easy


def tpld_soft_targets(probs: torch.Tensor, lambdas: torch.Tensor, *, gamma: float = 2.0) -> torch.Tensor:
    """Full soft targets of easy images (docs/ops.md §6): the one-hot vector of the confident class at
    confident pixels, y_k = q_k ** gamma (float32, not normalised) elsewhere.

    Returns:
        (B, C, H, W) float32.
    """
    q = tpld_q(probs, lambdas)
    labels, _ = _confident(q)
    confident = labels != IGNORE
    onehot = F.one_hot(torch.where(confident, labels, 0), q.shape[1]).permute(0, 3, 1, 2).float()
    return torch.where(confident.unsqueeze(1), onehot, torch.pow(q, gamma))


def self_information(probs: torch.Tensor) -> torch.Tensor:
    """ADVENT's weighted self-information I = -p * log2(p + 1e-30) / log2(C), (B, C, H, W),
    in the dtype of `probs` (differentiable)."""
    C = probs.shape[1]
    return -probs * torch.log2(probs + 1e-30) / math.log2(C)


# ---------------------------------------------------------------------------------------------
# bootstrap_loss: the fused self-training losses, bootstrapping (docs/ops.md §6) and CRST-MRKLD
# (docs/ops.md §5)
# ---------------------------------------------------------------------------------------------
def _upsample(x: torch.Tensor, H: int, W: int, align_corners: bool) -> torch.Tensor:
    if tuple(x.shape[2:]) != (H, W):
        return F.interpolate(x, size=(H, W), mode="bilinear", align_corners=align_corners)
    return x


def bootstrap_loss_terms(x: torch.Tensor, target: torch.Tensor, lambdas: torch.Tensor, *,
                         beta: float, soft_target: Optional[torch.Tensor], ignore_index: int,
                         align_corners: bool, reduction: str = "mean") -> torch.Tensor:
    """The computation of `bootstrap_loss` in the floating dtype of `x` (no validation).

    Per pixel with a target: -sum_k (beta * y_k + (1 - beta) * stopgrad(q_k)) * log q_k with
    log q_k = log_softmax(x)_k - log lambda_k and q = p / lambda (detached). Hard targets
    (soft_target None): y = onehot(target), pixels with target == ignore_index have none. Soft
    targets: every pixel has one, y = onehot(target) where target != ignore_index, else
    soft_target. Gradient w.r.t. the upsampled logits per pixel: p * sum_k c_k - c.

    Returns:
        0-dim: the sum over pixels with a target, divided by their number for "mean" (0 when
        there are none).
    """
    B, C = x.shape[:2]
    H, W = target.shape[1:]
    logp = torch.log_softmax(_upsample(x, H, W, align_corners), dim=1)
    lam = lambdas.to(device=x.device, dtype=torch.float32)
    q = (logp.detach().exp().float() / lam.view(1, C, 1, 1)).to(x.dtype)
    log_q = logp - torch.log(lam).to(x.dtype).view(1, C, 1, 1)
    t = target.long()
    labelled = t != ignore_index
    onehot = F.one_hot(torch.where(labelled, t, 0), C).permute(0, 3, 1, 2).to(x.dtype)
    if soft_target is None:
        y, has_target = onehot, labelled
    else:
        y = torch.where(labelled.unsqueeze(1), onehot, soft_target.to(x.dtype))
        has_target = torch.ones_like(labelled)
    per_pixel = -((beta * y + (1.0 - beta) * q) * log_q).sum(dim=1)
    total = torch.where(has_target, per_pixel, torch.zeros_like(per_pixel)).sum()
    if reduction == "sum":
        return total
    return total / has_target.sum().clamp(min=1).to(x.dtype)


def teacher_targets(teacher_logits: torch.Tensor, lambdas: torch.Tensor, *, gamma: float,
                    size: Sequence[int], align_corners: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Phase-2 targets from a teacher's logits (B, C, h, w): p = softmax of the logits upsampled
    (F.interpolate) to ``size``, float32; returns (the confident map uint8 (B, H, W), the soft
    targets `tpld_soft_targets(p)` float32 (B, C, H, W))."""
    probs = torch.softmax(_upsample(teacher_logits.detach().float(), size[0], size[1], align_corners), dim=1)
    return cbst_pseudo_label(probs, lambdas), tpld_soft_targets(probs, lambdas, gamma=gamma)


def bootstrap_loss(logits: torch.Tensor, target: Optional[torch.Tensor], lambdas: torch.Tensor, *,
                   beta: float = 0.95, soft_target: Optional[torch.Tensor] = None,
                   teacher_logits: Optional[torch.Tensor] = None, gamma: float = 2.0,
                   ignore_index: int = 255, size: Optional[Sequence[int]] = None,
                   align_corners: bool = True, reduction: str = "mean") -> torch.Tensor:
    """TPLD's bootstrapping loss (docs/ops.md §6), reference: `bootstrap_loss_terms` on float32 logits
    (upsampled with F.interpolate to the target's (H, W)). With ``teacher_logits`` (target None,
    ``size`` given) the targets are `teacher_targets`'. Returns a float32 0-dim tensor."""
    if teacher_logits is not None:
        target, soft_target = teacher_targets(teacher_logits, lambdas, gamma=gamma, size=size,
                                              align_corners=align_corners)
    soft = None if soft_target is None else soft_target.float()
    return bootstrap_loss_terms(logits.float(), target, lambdas, beta=beta, soft_target=soft,
                                ignore_index=ignore_index, align_corners=align_corners,
                                reduction=reduction)


def mrkld_loss_terms(x: torch.Tensor, target: torch.Tensor, is_target: torch.Tensor, *,
                     mrkld_weight: float, ignore_index: int, align_corners: bool) -> torch.Tensor:
    """CRST-MRKLD (docs/ops.md §5) in the dtype of `x`: ce_sum / n_valid + w * kld_sum / n_valid_tgt,
    kld_sum = sum over valid pixels of target crops of -(1/C) sum_c log p_c; the KLD term is
    dropped when n_valid_tgt = 0 and the loss is 0 when n_valid = 0.

    Args:
        x: (B, C, h, w) logits. target: (B, H, W). is_target: (B,) bool, target-domain crops.
    """
    C = x.shape[1]
    H, W = target.shape[1:]
    logp = torch.log_softmax(_upsample(x, H, W, align_corners), dim=1)
    t = target.long()
    valid = t != ignore_index
    valid_tgt = valid & is_target.to(device=x.device, dtype=torch.bool).view(-1, 1, 1)
    nll = -logp.gather(1, torch.where(valid, t, 0).unsqueeze(1)).squeeze(1)
    ce_sum = torch.where(valid, nll, torch.zeros_like(nll)).sum()
    kl_pix = -logp.sum(dim=1) / C
    kld_sum = torch.where(valid_tgt, kl_pix, torch.zeros_like(kl_pix)).sum()
    one = torch.ones((), dtype=x.dtype, device=x.device)
    n_valid = torch.maximum(valid.sum().to(x.dtype), one)
    n_tgt = torch.maximum(valid_tgt.sum().to(x.dtype), one)
    return ce_sum / n_valid + mrkld_weight * kld_sum / n_tgt


def mrkld_loss(logits: torch.Tensor, target: torch.Tensor, is_target: torch.Tensor, *,
               mrkld_weight: float = 0.01, ignore_index: int = 255,
               size: Optional[Sequence[int]] = None, align_corners: bool = True) -> torch.Tensor:
    """CRST-MRKLD loss, reference: `mrkld_loss_terms` on float32 logits. float32 0-dim."""
    return mrkld_loss_terms(logits.float(), target, is_target, mrkld_weight=mrkld_weight,
                            ignore_index=ignore_index, align_corners=align_corners)
