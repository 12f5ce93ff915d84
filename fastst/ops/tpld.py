"""Public TPLD operators (docs/ops.md §6): `tpld_vote`, `image_confidence`, `split_easy_hard`,
`tpld_soft_targets`, `self_information`; validation, backend choice, dispatch (the bootstrapping
loss is fastst.ops.bootstrap_loss).

Backends: "cpp" (C++/OpenMP, the CPU default) for the vote and the confidence; "triton" (the
CUDA default) for the vote and the confidence; "torch"
(reference.py) for all.
`split_easy_hard`, `tpld_soft_targets` and `self_information` are elementwise or O(N) torch
expressions (one fused kernel each under torch.compile), so they have only "torch".
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _checks, reference
from ._backend import choose_backend
from ._checks import check_int, check_lambdas, check_prob_values, check_probs, raise_on_flags
from .ext.tpld import image_confidence_cpp, tpld_vote_cpp

VOTE_BACKENDS = ("triton", "cpp", "torch")
CONFIDENCE_BACKENDS = ("triton", "cpp", "torch")
TORCH_ONLY = ("torch",)


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
