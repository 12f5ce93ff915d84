"""Argument validation shared by every op (docs/ops.md §0).

Shape and dtype checks always run. Value checks (NaN/Inf, label range) cost one host sync on
CUDA; they are on unless FASTST_CHECK=0, and skipped under torch.compile and CUDA graph capture.
"""
from __future__ import annotations

import math
import os
from typing import Optional, Sequence

import torch

IGNORE = 255
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LABEL_DTYPES = (torch.uint8, torch.int64)
MAX_CLASSES = 254


def value_checks_enabled(device: torch.device) -> bool:
    """Whether value checks (which may sync the host) should run now."""
    if os.environ.get("FASTST_CHECK", "1") == "0":
        return False
    if torch.compiler.is_compiling():
        return False
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return False
    return True


def check_tensor(name: str, x: object, *, ndim: int, dtypes: Sequence[torch.dtype], layout: str) -> torch.Tensor:
    """Raise TypeError/ValueError unless `x` is a tensor of rank `ndim` with one of `dtypes`."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {layout}, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have shape {layout} ({ndim} dims), got shape {tuple(x.shape)}")
    if x.dtype not in dtypes:
        names = [str(d).replace("torch.", "") for d in dtypes]
        names = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]
        raise TypeError(f"{name} must have dtype {names}; got {str(x.dtype).replace('torch.', '')}")
    return x


def check_scores(name: str, x: object, layout: str = "(B, C, H, W)") -> torch.Tensor:
    """A (B, C, H, W) float32/float16/bfloat16 tensor with B >= 1 and 2 <= C <= 254."""
    x = check_tensor(name, x, ndim=4, dtypes=FLOAT_DTYPES, layout=layout)
    if x.shape[0] == 0:
        raise ValueError(f"{name}: empty batch (B = 0); pass at least one image")
    if not 2 <= x.shape[1] <= MAX_CLASSES:
        raise ValueError(f"{name} must have 2 <= C <= {MAX_CLASSES} classes in dim 1, got C = {x.shape[1]}")
    if x.shape[2] == 0 or x.shape[3] == 0:
        raise ValueError(f"{name}: images must have at least one pixel, got shape {tuple(x.shape)}")
    return x


def check_labels(name: str, target: object, *, num_classes: int, batch: int,
                 ignore_index: int = IGNORE, scores_name: str = "the scores") -> torch.Tensor:
    """A (B, H, W) uint8/int64 label map whose values are < num_classes or == ignore_index."""
    target = check_tensor(name, target, ndim=3, dtypes=LABEL_DTYPES, layout="(B, H, W)")
    if target.shape[0] != batch:
        raise ValueError(f"{name} has batch size {target.shape[0]} but {scores_name} have {batch}")
    if value_checks_enabled(target.device) and target.numel() > 0:
        bad = (target >= num_classes) & (target != ignore_index)
        if target.dtype == torch.int64:
            bad |= target < 0
        if bool(bad.any()):
            value = int(target[bad][0])
            raise ValueError(
                f"{name} contains label {value} but {scores_name} have C={num_classes} classes; valid "
                f"labels are 0..{num_classes - 1} and {ignore_index} (ignore) (FASTST_CHECK=0 skips "
                "this check)")
    return target


def check_real(name: str, value: object, *, low: float, high: float = math.inf,
               low_open: bool = False, high_open: bool = False) -> float:
    """A finite real number in the interval given by low/high (open or closed ends)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    below = value <= low if low_open else value < low
    above = value >= high if high_open else value > high
    if not math.isfinite(value) or below or above:
        if high == math.inf:
            interval = f"{'>' if low_open else '>='} {low:g}"
        else:
            interval = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be finite and {interval}, got {value}")
    return value


def check_size(name: str, size: Optional[Sequence[int]]) -> Optional[tuple[int, int]]:
    """None or a pair of positive ints (H, W)."""
    if size is None:
        return None
    try:
        pair = tuple(int(s) for s in size)
    except TypeError:
        raise TypeError(f"{name} must be None or a pair (H, W) of ints, got {size!r}") from None
    if len(pair) != 2 or min(pair) <= 0:
        raise ValueError(f"{name} must be None or a pair (H, W) of positive ints, got {size!r}")
    return pair


def raise_on_stat_flags(name: str, flags: int, from_logits: bool) -> None:
    """Turn the flags of the fused statistics pass into a ValueError (see kernels/stats.h)."""
    if flags & 1:
        raise ValueError(f"{name} contains NaN or Inf values; check the model output (or set "
                         "FASTST_CHECK=0 to skip this check)")
    if flags & 2 and not from_logits:
        raise ValueError(f"{name} has values outside [0, 1] but from_logits=False; pass "
                         "probabilities or set from_logits=True")


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
    if value_checks_enabled(device) and not bool((torch.isfinite(lambdas) & (lambdas > 0)).all()):
        raise ValueError("lambdas must be finite and > 0 (class thresholds in (0, 1]); got "
                         f"{lambdas.tolist()}")
    return lambdas


def check_probs(name: str, probs: object) -> torch.Tensor:
    """Shape and dtype of a (B, C, H, W) probability map (the values are checked by the ops)."""
    return check_scores(name, probs)


def check_prob_values(name: str, probs: torch.Tensor) -> None:
    """NaN/Inf and [0, 1] range, with torch ops (the fused backends flag them in their pass)."""
    if not value_checks_enabled(probs.device):
        return
    finite = bool(torch.isfinite(probs).all())
    in_range = bool(((probs >= 0) & (probs <= 1)).all()) if finite else True
    raise_on_stat_flags(name, (0 if finite else 1) | (0 if in_range else 2), False)


def raise_on_flags(name: str, flags: torch.Tensor) -> None:
    """raise_on_stat_flags on the (1,) int32 flags of a label pass over probabilities."""
    if value_checks_enabled(flags.device):
        raise_on_stat_flags(name, int(flags.item()), False)


def check_theta(theta: object, C: int, device: torch.device) -> torch.Tensor:
    """None (0.9 for every class) or a (C,) floating tensor on `device` with finite values, as float64."""
    if theta is None:
        return torch.full((C,), 0.9, dtype=torch.float64, device=device)
    if not isinstance(theta, torch.Tensor):
        raise TypeError(f"theta must be None or a float64 tensor of shape ({C},), got {type(theta).__name__}")
    if not theta.is_floating_point():
        raise TypeError(f"theta must be a floating-point tensor (float64), got {theta.dtype}")
    if tuple(theta.shape) != (C,):
        raise ValueError(f"theta must have shape ({C},) to match C = {C} classes, got {tuple(theta.shape)}")
    if theta.device != device:
        raise ValueError(f"theta is on {theta.device} but x is on {device}; keep them on one device")
    theta = theta.to(torch.float64)
    if value_checks_enabled(device) and not bool(torch.isfinite(theta).all()):
        raise ValueError("theta contains NaN or Inf values")
    return theta


def check_loss_args(logits, target, lambda_kld, lambda_ent, ignore_index, size, align_corners, return_parts=False):
    """Validate the arguments of region_loss (and of the losses that share its logits/target inputs);
    returns (lambda_kld, lambda_ent, ignore_index)."""
    logits = check_scores("logits", logits, layout="(B, C, h, w)")
    target = check_tensor("target", target, ndim=3, dtypes=LABEL_DTYPES, layout="(B, H, W)")
    if target.shape[1] == 0 or target.shape[2] == 0:
        raise ValueError(f"target: images must have at least one pixel, got shape {tuple(target.shape)}")
    if target.device != logits.device:
        raise ValueError(f"target is on {target.device} but logits are on {logits.device}; "
                         "put both on the same device")
    lambda_kld = check_real("lambda_kld", lambda_kld, low=0.0)
    lambda_ent = check_real("lambda_ent", lambda_ent, low=0.0)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int in [0, 255], got {type(ignore_index).__name__}")
    if not 0 <= ignore_index <= 255:
        raise ValueError(f"ignore_index must be an int in [0, 255], got {ignore_index}")
    size = check_size("size", size)
    if size is not None and size != tuple(target.shape[1:]):
        raise ValueError(f"size must equal the target's (H, W) = {tuple(target.shape[1:])}, got {size}")
    for name, flag in (("align_corners", align_corners), ("return_parts", return_parts)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    check_labels("target", target, num_classes=logits.shape[1], batch=logits.shape[0],
                 ignore_index=ignore_index, scores_name="logits")
    return lambda_kld, lambda_ent, ignore_index


def check_int(name: str, value: object, low: int) -> int:
    """An int (not a bool) >= low."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


def check_triton_device(op_name: str, device: torch.device, interpreted: bool) -> None:
    """A Triton op runs on CUDA tensors, or on CPU tensors under its interpreter (`interpreted`)."""
    if device.type != "cuda" and not interpreted:
        raise ValueError(f"{op_name} runs on CUDA tensors, or on CPU tensors only under Triton's "
                         "interpreter (set TRITON_INTERPRET=1 before importing triton)")
