"""What fastst.config and each method's own validation (fastst/methods/<method>.py) share, below
both: ``ConfigError``, the keys every stage has (``COMMON_STAGE_DEFAULTS``) and the key checks
(``check_int(config, "stages.round1.alpha", ...)`` and the like: ConfigError naming the key, what
it must be and the value found)."""
from __future__ import annotations

import math
from typing import Any, Dict, Mapping

__all__ = ["ConfigError", "COMMON_STAGE_DEFAULTS", "get_key", "fail", "check_int", "check_real",
           "check_choice", "check_size", "check_str", "check_bool", "check_betas", "check_scales"]


class ConfigError(ValueError):
    """A preset, key or value that cannot be used; the message says what is valid."""


# Keys every stage has, whatever its method; each method's Stage class (fastst/methods/) owns
# the rest: its DEFAULTS (these plus its own keys) and its validate(config, prefix). The preset
# fills each stage from its method's DEFAULTS unless it sets a key. epochs and t_max count epochs
# of floor(|source| / batch_size) iterations (README "Training"); iterations /
# iterations_per_epoch, when set, replace the computed numbers. lr is the recipe's LR: the
# backbone trains at backbone_lr_mult * lr and the head (ASPP and classifier) at head_lr_mult *
# lr. IAST's released build_optimizer gives 0.1 * LR and LR (these defaults); CBST/CRST/TPLD
# give LR and 10 * LR (the class-balanced stages' defaults). The cosine schedule's floor is
# eta_min_ratio * lr for every group and the discriminator. select_every: under chain=released,
# the stage evaluates on the val split and keeps model snapshots every select_every iterations
# (the released ITER_VAL). eval_protocol: null (the run's eval settings) or a released
# evaluation by name (fastst.evaluate.PROTOCOLS, e.g. iast_round: IAST's 768x1536 validation of
# the rounds), used for the stage's result and for chain=released's selection.
COMMON_STAGE_DEFAULTS: Dict[str, Any] = {
    "epochs": 1, "t_max": 1, "batch_size": 8, "lr": 1.0e-4, "backbone_lr_mult": 0.1,
    "head_lr_mult": 1.0, "freeze_bn_affine": True, "iterations": None,
    "iterations_per_epoch": None, "select_every": 400, "eval_protocol": None}


def get_key(config: Mapping[str, Any], dotted: str) -> Any:
    """The value at the dotted key ``dotted`` ("stages.round1.alpha") of ``config``."""
    node: Any = config
    for part in dotted.split("."):
        node = node[part]
    return node


def fail(key: str, expected: str, value: Any) -> None:
    raise ConfigError(f"{key} must be {expected}, got {value!r}")


def check_int(config, key, low=None, *, optional=False):
    value = get_key(config, key)
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or (low is not None and value < low):
        fail(key, f"an integer >= {low}" if low is not None else "an integer", value)


def check_real(config, key, low=None, high=None, *, low_open=False, optional=False):
    value = get_key(config, key)
    if optional and value is None:
        return
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
        hi = "" if high is None else f"<= {high}"
        fail(key, "a finite number " + " and ".join(p for p in (lo, hi) if p), value)


def check_choice(config, key, choices):
    value = get_key(config, key)
    if value not in choices:
        fail(key, f"one of {', '.join(map(str, choices))}", value)


def check_size(config, key, *, optional=False):
    value = get_key(config, key)
    if optional and value is None:
        return
    if (not isinstance(value, list) or len(value) != 2
            or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in value)):
        fail(key, "[height, width], two positive integers" + (" or null" if optional else ""),
              value)


def check_str(config, key, *, optional=False):
    value = get_key(config, key)
    if not (isinstance(value, str) and value) and not (optional and value is None):
        fail(key, "a non-empty string" + (" or null" if optional else ""), value)


def check_bool(config, key):
    value = get_key(config, key)
    if not isinstance(value, bool):
        fail(key, "true or false", value)


def check_betas(config, key):
    """[beta1, beta2] of an Adam optimizer, each in [0, 1)."""
    betas = get_key(config, key)
    if (not isinstance(betas, list) or len(betas) != 2
            or any(isinstance(b, bool) or not isinstance(b, (int, float)) or not 0 <= b < 1
                   for b in betas)):
        fail(key, "[beta1, beta2], each in [0, 1)", betas)


def check_scales(config, key):
    """A non-empty list of positive numbers (input scales)."""
    scales = get_key(config, key)
    if (not isinstance(scales, list) or not scales
            or any(isinstance(s, bool) or not isinstance(s, (int, float)) or not s > 0
                   for s in scales)):
        fail(key, "a non-empty list of positive numbers", scales)
