"""The argument checks of the class-balanced pass (``ClassBalancedPass``): each bad argument is
a ValueError or TypeError naming it and what it must be."""
from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Optional

import torch

from fastst.ops._checks import check_real

__all__ = ["class_balanced_settings", "VOTE_KEYS"]

VOTE_KEYS = ("window", "weight", "iterations")


def _check_int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


def _check_vote(vote: object) -> Optional[Dict[str, Any]]:
    """None, or the tpld_vote arguments as {"window": odd int, "weight": float,
    "iterations": int}."""
    if vote is None:
        return None
    if not isinstance(vote, Mapping):
        raise TypeError(f"vote must be None or a dict with keys {list(VOTE_KEYS)} (the tpld_vote "
                        f"arguments), got {type(vote).__name__}")
    missing = [key for key in VOTE_KEYS if key not in vote]
    unknown = sorted(str(key) for key in vote if key not in VOTE_KEYS)
    if missing or unknown:
        raise ValueError(f"vote must have exactly the keys {list(VOTE_KEYS)}; missing {missing}, "
                         f"unknown {unknown}")
    window = _check_int("vote['window']", vote["window"], 1)
    if window % 2 == 0:
        raise ValueError(f"vote['window'] must be odd (the window is centred on the pixel), "
                         f"got {window}")
    return {"window": window,
            "weight": check_real("vote['weight']", vote["weight"], low=0.0, high=1.0),
            "iterations": _check_int("vote['iterations']", vote["iterations"], 0)}


def _check_scales(scales: object) -> List[float]:
    try:
        values = [float(s) for s in scales]
    except (TypeError, ValueError):
        raise ValueError(f"scales must be a sequence of positive numbers (e.g. (0.9,)), "
                         f"got {scales!r}") from None
    if not values or any(isinstance(s, bool) for s in scales) \
            or any(not math.isfinite(s) or s <= 0 for s in values):
        raise ValueError(f"scales must be a non-empty sequence of positive numbers (e.g. (0.9,)), "
                         f"got {scales!r}")
    return values


def class_balanced_settings(model, dataset, *, portion, scales, flip, subsample, vote,
                            batch_size, mine_portion, threshold) -> Dict[str, Any]:
    """The validated settings, as they are stored in the state and the manifest."""
    portion = check_real("portion", portion, low=0.0, high=1.0)
    if threshold is not None:
        threshold = check_real("threshold", threshold, low=0.0, high=1.0)
        if threshold <= 0:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    scales = _check_scales(scales)
    if not isinstance(flip, bool):
        raise TypeError(f"flip must be a bool, got {flip!r}")
    subsample = _check_int("subsample", subsample, 1)
    vote = _check_vote(vote)
    batch_size = _check_int("batch_size", batch_size, 1)
    mine_portion = check_real("mine_portion", mine_portion, low=0.0, high=1.0)
    config = getattr(model, "model_config", None)
    if not isinstance(config, Mapping) or "num_classes" not in config:
        raise TypeError("model must carry model_config = {'num_classes': C, ...} (as "
                        "fastst.models.deeplabv2 and fastst.checkpoint.load_model give it)")
    num_classes = int(config["num_classes"])
    num_images = len(dataset)
    if num_images == 0:
        raise ValueError("dataset is empty: the class-balanced pass needs at least one target "
                         "image (check the target data set's root and split)")
    image = dataset[0]["image"]
    if not isinstance(image, torch.Tensor) or image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"dataset items must hold 'image' as a float (3, H, W) tensor, got "
                         f"{getattr(image, 'shape', type(image).__name__)}")
    return {"portion": portion, "scales": scales, "flip": flip, "subsample": subsample,
            "vote": vote, "batch_size": batch_size, "num_images": num_images,
            "num_classes": num_classes, "mine_portion": mine_portion,
            "size": [int(image.shape[1]), int(image.shape[2])], "threshold": threshold}
