"""Public TPLD operators (docs/ops.md §6): `tpld_vote`, `image_confidence`, `split_easy_hard`,
`tpld_soft_targets`, `bootstrap_loss`, `self_information`; validation, backend choice, dispatch.

Backends: "cpp" (C++/OpenMP, the CPU default) for the vote, the confidence and the fused loss;
"triton" (the CUDA default) for the vote, the confidence and the fused loss; "torch"
(reference.py) for all.
`split_easy_hard`, `tpld_soft_targets` and `self_information` are elementwise or O(N) torch
expressions (one fused kernel each under torch.compile), so they have only "torch".
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import _checks, reference
from ._backend import choose_backend
from ._checks import check_int, check_lambdas, check_loss_args, check_prob_values, check_probs, raise_on_flags
from .ext.bootstrap_loss import st_loss_cpp
from .ext.tpld import image_confidence_cpp, tpld_vote_cpp
from .loss_modes import BOOTSTRAP_HARD, BOOTSTRAP_SOFT, BOOTSTRAP_TEACHER

VOTE_BACKENDS = ("triton", "cpp", "torch")
CONFIDENCE_BACKENDS = ("triton", "cpp", "torch")
LOSS_BACKENDS = ("triton", "cpp", "torch")
TORCH_ONLY = ("torch",)
REDUCTIONS = ("mean", "sum")


def tpld_vote(probs: torch.Tensor, lambdas: torch.Tensor, *, window: int = 7, weight: float = 0.7,
              iterations: int = 3, backend: Optional[str] = None) -> torch.Tensor:
    """TPLD's sliding-window two-phase voting (docs/ops.md §6): densify the confident map.

    q = p / lambda; the confident map labels argmax q where max q >= 1. Each iteration gives
    every unlabelled pixel x, with candidates k1, k2 (its two largest q, lower index first on
    ties), s_k = weight * q_k(x) + (1 - weight) * pool_k(x), pool_k = the mean q_k over the
    pixels labelled k in the window around x (clipped at the border; float64 sum in row-major
    window order; 0 if none), and labels x with the larger s (k1 on ties) if it exceeds 1. All
    pixels of an iteration read the previous map.

    Args:
        probs: (B, C, H, W) float32/float16/bfloat16 probabilities, any strides.
        lambdas: (C,) class thresholds, > 0.
        window: odd window side >= 1. weight: in [0, 1]. iterations: >= 0 (0: the confident map).
        backend: "triton", "cpp" or "torch" (default: docs/ops.md §0).
    Returns:
        (B, H, W) uint8, 255 = unlabelled.
    """
    probs = check_probs("probs", probs)
    lambdas = check_lambdas(lambdas, probs.shape[1], probs.device)
    window = check_int("window", window, 1)
    if window % 2 == 0:
        raise ValueError(f"window must be odd (the window is centred on the pixel), got {window}")
    weight = _checks.check_real("weight", weight, low=0.0, high=1.0)
    iterations = check_int("iterations", iterations, 0)
    name = choose_backend("tpld_vote", probs.device, VOTE_BACKENDS, backend)
    if name == "torch":
        check_prob_values("probs", probs)
        return reference.tpld_vote(probs, lambdas, window=window, weight=weight, iterations=iterations)
    if name == "triton":
        from .triton.tpld import tpld_vote_triton
        labels, flags = tpld_vote_triton(probs, lambdas, window, weight, iterations)
    else:
        labels, flags = tpld_vote_cpp(probs, lambdas, window, weight, iterations)
    raise_on_flags("probs", flags)
    return labels


def image_confidence(probs: torch.Tensor, lambdas: torch.Tensor, *, backend: Optional[str] = None) -> torch.Tensor:
    """TPLD's image confidence conf_t (docs/ops.md §6), fused with the confident-label pass in "cpp" and
    "triton" (the CUDA default):
    the mean over the classes k present as argmax p of (N*_k / N_k) / lambda_k, float64, with
    N_k the pixels whose argmax p is k and N*_k those of them with q_k >= 1.

    Args:
        probs: (B, C, H, W) float32/float16/bfloat16. lambdas: (C,) > 0.
    Returns:
        (B,) float64.
    """
    probs = check_probs("probs", probs)
    lambdas = check_lambdas(lambdas, probs.shape[1], probs.device)
    name = choose_backend("image_confidence", probs.device, CONFIDENCE_BACKENDS, backend)
    if name == "torch":
        check_prob_values("probs", probs)
        return reference.image_confidence(probs, lambdas)
    op = image_confidence_cpp
    if name == "triton":
        from .triton.tpld import image_confidence_triton as op  # imports triton only when asked
    _, conf, flags = op(probs, lambdas)
    raise_on_flags("probs", flags)
    return conf


def split_easy_hard(conf: torch.Tensor, easy_portion: float = 0.3, *, backend: Optional[str] = None) -> torch.Tensor:
    """Easy/hard split (docs/ops.md §6): sort by conf descending (ties: ascending index); the first
    floor(easy_portion * N) images are easy.

    Args:
        conf: (N,) floating confidences (image_confidence over the target set).
        easy_portion: in [0, 1].
    Returns:
        (N,) bool, True = easy.
    """
    if not isinstance(conf, torch.Tensor) or conf.dim() != 1 or not conf.is_floating_point():
        raise ValueError(f"conf must be a 1-D floating tensor (N,), got "
                         f"{tuple(conf.shape) if isinstance(conf, torch.Tensor) else type(conf).__name__}")
    easy_portion = _checks.check_real("easy_portion", easy_portion, low=0.0, high=1.0)
    choose_backend("split_easy_hard", conf.device, TORCH_ONLY, backend)
    if _checks.value_checks_enabled(conf.device) and not bool(torch.isfinite(conf).all()):
        raise ValueError("conf contains NaN or Inf values")
    return reference.split_easy_hard(conf, easy_portion)


def tpld_soft_targets(probs: torch.Tensor, lambdas: torch.Tensor, *, gamma: float = 2.0,
                      backend: Optional[str] = None) -> torch.Tensor:
    """Full soft targets of an easy image (docs/ops.md §6): the one-hot vector of the confident class at
    confident pixels, y_k = q_k ** gamma (not normalised) elsewhere.

    Args:
        probs: (B, C, H, W) float32/float16/bfloat16. lambdas: (C,) > 0. gamma: finite >= 0.
    Returns:
        (B, C, H, W) float32.
    """
    probs = check_probs("probs", probs)
    lambdas = check_lambdas(lambdas, probs.shape[1], probs.device)
    gamma = _checks.check_real("gamma", gamma, low=0.0)
    choose_backend("tpld_soft_targets", probs.device, TORCH_ONLY, backend)
    check_prob_values("probs", probs)
    return reference.tpld_soft_targets(probs, lambdas, gamma=gamma)


def self_information(probs: torch.Tensor, *, backend: Optional[str] = None) -> torch.Tensor:
    """Weighted self-information I = -p * log2(p + 1e-30) / log2(C) (docs/ops.md §6, ADVENT), the input
    of the intra-domain discriminator; differentiable, in the dtype of probs (float64 too),
    (B, C, H, W)."""
    probs = _checks.check_tensor("probs", probs, ndim=4, dtypes=_checks.FLOAT_DTYPES + (torch.float64,),
                                 layout="(B, C, H, W)")
    choose_backend("self_information", probs.device, TORCH_ONLY, backend)
    return reference.self_information(probs)


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
               align_corners) -> torch.Tensor:
    op = st_loss_cpp
    if name == "triton":
        from .triton.st_loss import st_loss_triton as op  # imports triton only when asked
    compute_grad = torch.is_grad_enabled() and logits.requires_grad
    loss, _ = op(logits, target, lambdas, soft, None, mode, beta, 0.0, gamma, reduction == "sum", ignore_index,
                 out_h, out_w, align_corners, compute_grad)
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
