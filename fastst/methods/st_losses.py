"""Losses of the class-balanced self-training rounds (docs/ops.md §5-§6) on mixed source + target batches,
composed from the fused ops of ``fastst.ops`` (the upsample to the label size is fused in; no
full-resolution logits are made) without any host synchronisation.

Every function takes the batch's low-resolution ``logits`` (B, C, h, w), its ``labels`` (B, H, W)
int64/uint8 (ground truth on source crops, pseudo labels on target crops, 255 = none) and
``is_target`` (B,) bool. Source and target crops are separated by setting the other domain's
labels to 255, not by indexing, so the batch composition never has to be read back to the host.
"""
from __future__ import annotations

import torch

from fastst.ops import bootstrap_loss, mrkld_loss

__all__ = ["IGNORE", "domain_labels", "cbst_loss", "tpld_phase1_loss", "lrent_soft_labels",
           "lrent_loss", "tpld_phase1_lrent_loss"]

IGNORE = 255


def domain_labels(labels: torch.Tensor, is_target: torch.Tensor, target: bool) -> torch.Tensor:
    """``labels`` with every pixel of the other domain's crops set to 255: (B, H, W) int64."""
    keep = is_target if target else ~is_target
    return torch.where(keep.view(-1, 1, 1), labels.long(), torch.full_like(labels.long(), IGNORE))


def cbst_loss(logits: torch.Tensor, labels: torch.Tensor, is_target: torch.Tensor, *,
              mrkld_weight: float) -> torch.Tensor:
    """CBST (``mrkld_weight = 0``: CE over the valid pixels of all crops) and CRST-MRKLD
    (docs/ops.md §5): ``ce_sum / n_valid + w * kld_sum / n_valid_tgt``, one fused pass."""
    return mrkld_loss(logits, labels, is_target, mrkld_weight=mrkld_weight,
                      size=tuple(labels.shape[-2:]))


def tpld_phase1_loss(logits: torch.Tensor, labels: torch.Tensor, is_target: torch.Tensor,
                     lambdas: torch.Tensor, *, beta: float, mrkld_weight: float) -> torch.Tensor:
    """TPLD phase 1 (docs/ops.md §6): the MRKLD loss with the target crops' CE replaced by the
    bootstrapping term, over the same ``n_valid`` (valid pixels of all crops)::

        (ce_sum(source) + boot_sum(target)) / n_valid + w * kld_sum(target) / n_valid_tgt
          = mrkld(all crops) + (boot_sum(target) - ce_sum(target)) / n_valid

    Three fused passes: the MRKLD loss, and two bootstrapping sums on the target crops (with
    the class thresholds ``lambdas`` (C,) and ``beta``; and with lambda = 1, beta = 1, which is
    exactly the CE sum). 0 when no pixel is valid."""
    size = tuple(labels.shape[-2:])
    target_labels = domain_labels(labels, is_target, target=True)
    n_valid = (labels != IGNORE).sum().clamp(min=1)
    boot_sum = bootstrap_loss(logits, target_labels, lambdas, beta=beta, size=size,
                              reduction="sum")
    ce_target_sum = bootstrap_loss(logits, target_labels, torch.ones_like(lambdas), beta=1.0,
                                   size=size, reduction="sum")
    return cbst_loss(logits, labels, is_target, mrkld_weight=mrkld_weight) + \
        (boot_sum - ce_target_sum) / n_valid


def lrent_soft_labels(probs: torch.Tensor, lambdas: torch.Tensor, alpha: float):
    """CRST-LRENT soft pseudo labels of the released code: ``y = normalise((p / lambda) ** (1 /
    alpha))`` over classes, and the pixels it selects, those where ``sum -y log(p + 1e-32) +
    alpha sum y log(y + 1e-32) < sum -y log(lambda + 1e-32)``.

    Args: probs (B, C, H, W) float (the teacher's), lambdas (C,) > 0, alpha > 0.
    Returns: (soft (B, C, H, W) float32, zero at unselected pixels; selected (B, H, W) bool)."""
    probs = probs.float()
    lam = lambdas.float().view(1, -1, 1, 1)
    # The power is taken in log space, as a softmax: (p / lambda) ** (1 / alpha) overflows
    # float32 for small alpha (alpha = 0.05 and p / lambda = 1e3 give 1e60).
    logits = torch.log(probs / lam + 1e-45) / alpha
    soft = torch.softmax(logits, dim=1)
    regularised = (-soft * torch.log(probs + 1e-32)).sum(1) + \
        alpha * (soft * torch.log(soft + 1e-32)).sum(1)
    selection = (-soft * torch.log(lam + 1e-32)).sum(1)
    selected = regularised < selection
    return soft * selected.unsqueeze(1), selected


def lrent_loss(logits: torch.Tensor, labels: torch.Tensor, is_target: torch.Tensor,
               soft: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """CRST-LRENT (released ``reg_loss_calc_expand`` with its default ``mr_weight_kld = 0``):
    ``sum -y log p / n_valid`` with ``y`` the one-hot source label on source crops and the soft
    label on the selected pixels of target crops, ``n_valid`` their number. ``soft``
    (B, C, H, W) and ``selected`` (B, H, W) come from ``lrent_soft_labels`` (their values on
    source crops are not used). One fused soft-target pass."""
    size = tuple(labels.shape[-2:])
    source_labels = domain_labels(labels, is_target, target=False)
    target_selected = selected & is_target.view(-1, 1, 1)
    soft = soft * target_selected.unsqueeze(1)
    ones = torch.ones(logits.shape[1], dtype=torch.float32, device=logits.device)
    n_valid = ((source_labels != IGNORE) | target_selected).sum().clamp(min=1)
    return bootstrap_loss(logits, source_labels, ones, beta=1.0, soft_target=soft, size=size,
                          reduction="sum") / n_valid


def tpld_phase1_lrent_loss(logits: torch.Tensor, labels: torch.Tensor, is_target: torch.Tensor,
                           lambdas: torch.Tensor, soft: torch.Tensor, selected: torch.Tensor, *,
                           beta: float) -> torch.Tensor:
    """TPLD phase 1 on CRST-LRENT: the LRENT loss with its target term through the
    bootstrapping loss, over LRENT's pixels and the phase-1 map's. A target-crop pixel has a
    target where LRENT selects it (``y`` = its soft label) and, elsewhere, where ``labels`` (the
    voted phase-1 map) label it (``y`` = one-hot); each adds
    ``-sum_k (beta * y_k + (1 - beta) * stopgrad(q_k)) * log q_k`` with ``q = p / lambda``.
    Source crops add CE on their labels. The sum is divided by the number of pixels with a target.
    With ``beta = 1`` and no voting its gradient is ``lrent_loss``'s (the value differs by the
    constant ``sum y log lambda / n``).

    Args: logits (B, C, h, w); labels (B, H, W) (source labels on source crops, the phase-1 map
    on target crops, 255 = none); is_target (B,) bool; lambdas (C,) > 0; soft (B, C, H, W) and
    selected (B, H, W) bool from ``lrent_soft_labels`` (not used on source crops); beta in [0, 1].
    Returns a float32 0-dim loss. Three fused passes."""
    size = tuple(labels.shape[-2:])
    source_labels = domain_labels(labels, is_target, target=False)
    target_selected = selected & is_target.view(-1, 1, 1)
    hard = torch.where(target_selected, torch.full_like(labels.long(), IGNORE),
                       domain_labels(labels, is_target, target=True))
    soft = soft.float() * target_selected.unsqueeze(1)
    ones = torch.ones(logits.shape[1], dtype=torch.float32, device=logits.device)
    # The bootstrapping sum is linear in y: its soft part, beta * sum -y log q, is one CE pass
    # with the targets scaled by beta (log p instead of log q: the constant
    # beta * sum y log lambda is added back), passed together with the source CE.
    lam = lambdas.float().to(logits.device)
    supervised = bootstrap_loss(logits, source_labels, ones, beta=1.0, soft_target=beta * soft,
                                size=size, reduction="sum") + \
        beta * (soft * torch.log(lam).view(1, -1, 1, 1)).sum()
    # ... its (1 - beta) * stopgrad(q) part on the selected pixels (beta = 0: y is not read) ...
    marked = torch.where(target_selected, torch.zeros_like(hard), torch.full_like(hard, IGNORE))
    own = bootstrap_loss(logits, marked, lam, beta=0.0, size=size, reduction="sum")
    # ... and the one-hot pixels of the phase-1 map that LRENT did not select.
    voted = bootstrap_loss(logits, hard, lam, beta=beta, size=size, reduction="sum")
    count = (source_labels != IGNORE).sum() + target_selected.sum() + (hard != IGNORE).sum()
    return (supervised + (1.0 - beta) * own + voted) / count.clamp(min=1)
