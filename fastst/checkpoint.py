"""Checkpoint files: atomic saving, loading with clear errors and checking their contents (the
model is rebuilt from a checkpoint by ``fastst.models.load_model``).

A checkpoint is a dict saved with ``torch.save`` holding at least::

    {"format": "fastst-checkpoint-v1",
     "model": state_dict of a fastst.models.DeepLabV2,
     "model_config": {"num_classes": int, "backbone": str}}

Trainers add more keys (optimizer state, iteration, thresholds, ...). Files are read with
``torch.load(weights_only=True)`` (tensors, numbers, strings, lists, tuples and dicts only) and
fall back, with a warning, to full unpickling when a file holds other Python objects, since such
a file can run code when loaded; only load checkpoints you trust in that case.
"""
import os
import pickle
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Union

import torch
from torch import nn

from .atomic import atomic_write
from .faults import naming_file

__all__ = ["CHECKPOINT_FORMAT", "save_checkpoint", "load_checkpoint", "check_checkpoint",
           "check_model_config", "checkpoint_state", "read_torch_file", "load_state_dict_checked",
           "ClassCountMismatch", "CheckpointError", "NonFiniteWeights", "checkpoint_num_classes",
           "check_num_classes"]

CHECKPOINT_FORMAT = "fastst-checkpoint-v1"

PathLike = Union[str, "os.PathLike[str]"]
MapLocation = Union[str, torch.device, None, Dict[str, str]]

# How many key names an error message lists per category before summarising with a count.
_KEYS_SHOWN = 10
# The first ASPP branch of the classifier: its weight is (num_classes, channels, 3, 3).
_CLASSIFIER_WEIGHT = "classifier.convs.0.weight"
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


class ClassCountMismatch(ValueError):
    """A checkpoint made for another number of classes than the configuration's."""


class CheckpointError(RuntimeError, ValueError):
    """A checkpoint file that cannot be read (corrupt, truncated, empty). A RuntimeError as
    before, and a ValueError: bad input to the commands (exit status 2, fastst.cli)."""


class NonFiniteWeights(ValueError):
    """A state_dict holding NaN or Inf values."""


def save_checkpoint(path: PathLike, state: Mapping) -> Path:
    """Write ``state`` to ``path`` atomically and return the path.

    The dict is written to a temporary file in the same directory, flushed to disk and moved
    over ``path`` with ``os.replace``, so a crash never leaves a half-written checkpoint under
    the final name. Parent directories are created. ``state`` must hold ``"model"`` and
    ``"model_config"``; ``"format"`` is set to ``CHECKPOINT_FORMAT`` (a different value is an
    error).
    """
    if not isinstance(state, Mapping):
        raise TypeError(f"checkpoint state must be a dict, got {type(state).__name__}")
    fmt = state.get("format", CHECKPOINT_FORMAT)
    if fmt != CHECKPOINT_FORMAT:
        raise ValueError(f"checkpoint state has format {fmt!r}; save_checkpoint writes "
                         f"{CHECKPOINT_FORMAT!r} (drop the 'format' key or set it to that)")
    missing = [key for key in ("model", "model_config") if key not in state]
    if missing:
        raise ValueError(f"checkpoint state lacks {missing}; build it with "
                         "fastst.checkpoint.checkpoint_state(model, **extra)")
    check_model_config(state["model_config"], source="checkpoint state")
    payload = {"format": CHECKPOINT_FORMAT, **{k: v for k, v in state.items() if k != "format"}}

    path = Path(path)
    with naming_file(path), atomic_write(path) as handle:
        torch.save(payload, handle)
    return path


def checkpoint_state(model: nn.Module, /, **extra: Any) -> Dict[str, Any]:
    """A checkpoint dict for ``model`` (a DeepLabV2, possibly wrapped by DataParallel/DDP or
    ``torch.compile``) plus ``extra`` keys, ready for ``save_checkpoint``."""
    model = _unwrap(model)
    config = getattr(model, "model_config", None)
    if config is None:
        raise TypeError(f"{type(model).__name__} has no model_config; checkpoints hold "
                        "fastst.models.DeepLabV2 models")
    for key in ("format", "model", "model_config"):
        if key in extra:
            raise ValueError(f"extra key {key!r} is reserved for the checkpoint itself")
    return {"format": CHECKPOINT_FORMAT, "model": model.state_dict(),
            "model_config": dict(config), **extra}


def read_torch_file(path: PathLike, map_location: MapLocation = "cpu",
                    weights_only: Optional[bool] = None, *, what: str = "checkpoint") -> Any:
    """``torch.load`` with clear errors for missing and unreadable files.

    ``weights_only=None`` tries the safe loader first and falls back to full unpickling, with a
    warning, for files holding other Python objects; ``True``/``False`` force one of them.
    ``what`` names the kind of file in error messages.
    """
    path = Path(path)
    if not path.is_file():
        problem = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise FileNotFoundError(f"{what} file {str(path)!r} {problem}")
    try:
        return torch.load(path, map_location=map_location,
                          weights_only=True if weights_only is None else weights_only)
    except pickle.UnpicklingError as safe_error:
        if weights_only is not None:
            raise _corrupt(path, safe_error, what) from safe_error
        first_error = safe_error
    except Exception as error:
        raise _corrupt(path, error, what) from error
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as error:
        raise _corrupt(path, error, what) from first_error
    warnings.warn(f"{path} holds Python objects other than tensors, numbers, strings and "
                  "containers, so it was loaded with weights_only=False (full unpickling, which "
                  "can run code): load only files you trust", stacklevel=2)
    return state


def load_checkpoint(path: PathLike, map_location: MapLocation = "cpu",
                    weights_only: Optional[bool] = None) -> Dict[str, Any]:
    """Read a fastst checkpoint written by ``save_checkpoint``; tensors go to ``map_location``.

    Raises FileNotFoundError (missing file), CheckpointError (a RuntimeError: corrupt, truncated
    or empty file) or ValueError (a readable file that is not a fastst checkpoint), each naming
    the file.
    """
    state = read_torch_file(path, map_location, weights_only)
    check_checkpoint(state, source=str(path))
    return state


def checkpoint_num_classes(state: Mapping) -> Optional[int]:
    """The number of classes of the model in ``state``: a fastst checkpoint's
    ``model_config["num_classes"]``, else the output channels of a whole-model state_dict's
    classifier (``module.``/``_orig_mod.`` prefixes allowed); None for anything else (an
    ImageNet backbone has no classifier to disagree with)."""
    if not isinstance(state, Mapping):
        return None
    config = state.get("model_config")
    if isinstance(config, Mapping) and isinstance(config.get("num_classes"), int):
        return int(config["num_classes"])
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor) or value.dim() < 1:
            continue
        bare = key
        while bare.startswith(_WRAPPER_PREFIXES):
            bare = bare.split(".", 1)[1]
        if bare == _CLASSIFIER_WEIGHT:
            return int(value.shape[0])
    return None


def check_num_classes(state: Mapping, num_classes: int, *, source: str) -> None:
    """Raise ``ClassCountMismatch`` when the model in ``state`` (see ``checkpoint_num_classes``)
    has another number of classes than ``num_classes``; ``source`` names the file."""
    found = checkpoint_num_classes(state)
    if found is not None and found != num_classes:
        raise ClassCountMismatch(
            f"{source} holds a model for {found} classes, but the configuration has "
            f"num_classes = {num_classes}: use a checkpoint trained for {num_classes} classes, "
            f"or set num_classes={found} if its label space is the one you mean")


def load_state_dict_checked(module: nn.Module, state_dict: Mapping, *, source: str,
                            ignore_prefixes: Sequence[str] = ()) -> None:
    """Load ``state_dict`` into ``module`` after checking that its keys and shapes match.

    Keys starting with one of ``ignore_prefixes`` are dropped first (e.g. ``"fc."`` of an
    ImageNet classifier). Missing ``*.num_batches_tracked`` buffers are tolerated because
    torchvision's older ImageNet files predate them and BatchNorm with a fixed momentum never
    reads them. Anything else missing, any unexpected key or any shape mismatch raises a
    ValueError that lists them (the first few of each, with counts) and names ``source``; NaN or
    Inf in a floating tensor raises ``NonFiniteWeights`` (a ValueError) naming the tensors.
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"{source}: expected a state_dict (dict of tensors), "
                        f"got {type(state_dict).__name__}")
    non_tensors = [str(k) for k, v in state_dict.items()
                   if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if non_tensors:
        raise ValueError(f"{source}: not a state_dict, {len(non_tensors)} entries are not "
                         f"str -> tensor: {_first(non_tensors)}")
    state_dict = {k: v for k, v in state_dict.items()
                  if not any(k.startswith(p) for p in ignore_prefixes)}
    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
                  for k, v in expected.items()
                  if k in state_dict and state_dict[k].shape != v.shape]
    if missing or unexpected or mismatched:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing keys: {_first(missing)}")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected keys: {_first(unexpected)}")
        if mismatched:
            problems.append(f"{len(mismatched)} shape mismatches: {_first(mismatched)}")
        raise ValueError(f"{source} does not fit {type(module).__name__} (whose state_dict "
                         f"has {len(expected)} entries): " + "; ".join(problems))
    _check_finite(state_dict, source)
    module.load_state_dict(state_dict, strict=False)


def _check_finite(state_dict: Mapping, source: str) -> None:
    """``NonFiniteWeights`` naming ``source`` and the first tensors with NaN/Inf values: such
    weights would only surface later as non-finite losses or a constant prediction."""
    bad = [key for key, value in state_dict.items()
           if value.is_floating_point() and not bool(torch.isfinite(value).all())]
    if bad:
        raise NonFiniteWeights(f"{source} holds non-finite weights (NaN or Inf) in "
                               f"{len(bad)} tensors: {_first(bad)}; use another checkpoint")


def _first(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_KEYS_SHOWN])
    return shown + (f", ... ({len(items) - _KEYS_SHOWN} more)" if len(items) > _KEYS_SHOWN else "")


def _corrupt(path: Path, error: BaseException, what: str) -> CheckpointError:
    detail = str(error).splitlines()[0] if str(error) else "no detail"
    if path.stat().st_size == 0:
        return CheckpointError(f"{what} file {str(path)!r} is empty (0 bytes). Delete it and "
                               "use an earlier checkpoint, or re-create it")
    return CheckpointError(
        f"cannot read {what} file {str(path)!r}: it is corrupt or truncated "
        f"({type(error).__name__}: {detail}). Delete it and use an earlier checkpoint, "
        "or re-create it")


def check_checkpoint(state: Any, *, source: str) -> None:
    """ValueError naming ``source`` unless ``state`` is a fastst checkpoint dict (format, model,
    model_config)."""
    if not isinstance(state, Mapping):
        raise ValueError(f"{source} is not a fastst checkpoint: it holds a "
                         f"{type(state).__name__}, not a dict")
    fmt = state.get("format")
    if fmt != CHECKPOINT_FORMAT:
        hint = ("a plain state_dict or another program's file; pass it as "
                "deeplabv2(pretrained=...) instead" if fmt is None else f"format {fmt!r}")
        raise ValueError(f"{source} is not a fastst checkpoint (no 'format': "
                         f"{CHECKPOINT_FORMAT!r}; looks like {hint})")
    for key in ("model", "model_config"):
        if key not in state:
            raise ValueError(f"{source}: fastst checkpoint lacks the {key!r} entry")


def check_model_config(config: Any, *, source: str) -> Dict[str, Any]:
    """``config`` as a dict {"num_classes": int, "backbone": str}; ValueError naming ``source``
    otherwise."""
    if (not isinstance(config, Mapping) or set(config) != {"num_classes", "backbone"}
            or not isinstance(config["backbone"], str)
            or isinstance(config["num_classes"], bool)
            or not isinstance(config["num_classes"], int)):
        raise ValueError(f"{source}: model_config must be {{'num_classes': int, 'backbone': str}}, "
                         f"got {config!r}")
    return dict(config)


def _unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside ``torch.compile`` (``_orig_mod``) and DataParallel/DDP (``module``)
    wrappers, whose state_dict keys carry extra prefixes."""
    while True:
        if isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        elif isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        else:
            return model
