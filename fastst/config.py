"""Training configurations: YAML presets in fastst/presets/, key=value overrides, validation.

A configuration is a nested dict. ``load_config(preset, overrides)`` reads
``fastst/presets/<preset>.yaml``, lays it over ``BASE_DEFAULTS`` (so every key exists and the
resolved file ``DIR/config.yaml`` shows them all), fills each stage from the DEFAULTS of its
method's Stage class (fastst/methods/, found through the registry ``fastst.methods``; together
``STAGE_DEFAULTS``), applies the overrides and validates the result::

    cfg = load_config("iast_gta5", ["stages.round1.alpha=0.25", "data.source.root=/data/GTA5"])

Overrides name an existing key by its dotted path (``model.backbone``, ``stages.warmup.lambda_adv``)
and give a YAML value (``0.25``, ``1e-4``, ``[512, 1024]``, ``null``, ``true``); an unknown key,
a value of the wrong type or an impossible value raises ``ConfigError`` naming the key and what
is valid (for an unknown key: up to three close keys; ``python -m fastst.train --print-config``
shows them all). Keys under ``runtime`` change how a run executes, never what it computes (on the CPU),
so they may differ between a run and its resumption.

Preset files (bases, schedules) are read by ``fastst.config_presets``, the resolved configuration
is checked by ``fastst.config_validate``; this module re-exports their public names.
"""
from __future__ import annotations

import copy
import difflib
import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import yaml

from .atomic import atomic_write
from .config_checks import (COMMON_STAGE_DEFAULTS, ConfigError, check_betas, check_bool,
                            check_choice, check_int, check_real, check_scales, check_size,
                            check_str, fail, get_key)
from .config_presets import PRESET_DIR, available_presets, load_preset
from .config_validate import CBST_THRESHOLD_STORES, COMPILE_MODES, validate_config
from .methods import METHOD_NAMES, stage_class

__all__ = ["ConfigError", "PRESET_DIR", "BASE_DEFAULTS", "COMMON_STAGE_DEFAULTS", "STAGE_DEFAULTS",
           "stage_defaults", "available_presets", "load_preset", "load_config", "apply_overrides",
           "unknown_key_message", "validate_config", "flat_keys", "config_yaml", "dump_config", "recipe_differences", "get_key", "fail",
           "check_int", "check_real", "check_choice", "check_size", "check_str", "check_bool",
           "check_betas", "check_scales", "CBST_THRESHOLD_STORES", "COMPILE_MODES"]


# Every key a configuration has, with the values used where a preset says nothing. Sizes are
# (height, width) in pixels. docs/recipes.md says what the keys mean.
BASE_DEFAULTS: Dict[str, Any] = {
    "name": "custom",
    "seed": 0,
    "seeds": 1,
    "num_classes": 19,
    "chain": "last",
    "model": {"backbone": "resnet101", "pretrained": None},
    "data": {
        # subset (semi-supervised mode): null, or {fraction, seed, part: labelled|unlabelled}
        # keeping one part of a seeded split of the images (fastst.methods.datasets); domain:
        # which synthetic domain a role reads (null: source for source, target otherwise).
        "source": {"dataset": "gta5", "root": "data/GTA5", "split": "train", "list_file": None,
                   "resize": None, "crop_height_range": [341, 950], "subset": None,
                   "domain": None},
        "target": {"dataset": "cityscapes", "root": "data/cityscapes", "split": "train",
                   "list_file": None, "resize": None, "crop_height_range": [341, 1000],
                   "subset": None, "domain": None},
        "val": {"dataset": "cityscapes", "root": "data/cityscapes", "split": "val",
                "list_file": None, "input_size": [512, 1024]},
        # The classes every role's labels are mapped to (fastst.data.ids.CLASS_SETS):
        # "cityscapes19" (the 19 Cityscapes classes) or "synthia16" (the 16 SYNTHIA shares with
        # Cityscapes, lane marking as road, as CRST/TPLD); num_classes must be its size.
        "class_set": "cityscapes19",
        "synthetic": None,
        "crop_size": [512, 1024],
        "aspect": 2.0,
        "flip_p": 0.5,
        "brightness": 0.2,
        "contrast": 0.2,
        "brightness_contrast_p": 0.3,
    },
    "optim": {"betas": [0.9, 0.999], "weight_decay": 5.0e-4, "eta_min_ratio": 0.001},
    "pseudo": {"mode": "official", "group": 2, "beta": 0.9, "gamma": 8.0, "batch_size": 2,
               "order_seed": 0, "colour": False},
    "eval": {"scales": [1.0], "flip": False, "batch_size": 2},
    "pipeline": ["source_only", "warmup", "round1", "round2", "round3"],
    "stages": {},
    "runtime": {
        "device": "auto",
        "amp": "bfloat16",
        # Pseudo-label passes (and the teachers of the class-balanced rounds) run the model in
        # float32, as the released code labels; true: under runtime.amp's autocast instead.
        "amp_pseudo": False,
        "channels_last": True,
        "workers": 4,
        "threads": None,
        "log_every": 50,
        "image_every": 1000,
        "checkpoint_every": 400,
        "pseudo_state_every": 50,
        "write_threads": 4,
        # A tqdm bar on a terminal; without one (or with progress: false) a log line every
        # progress_every iterations or images and at each stage's start and end (fastst.progress).
        "progress": True,
        "progress_every": 100,
        "tensorboard": True,
        "op_value_checks": False,
        "stop_after_iterations": None,
        "stop_after_pseudo_batches": None,
        # Skip an optimizer step whose loss is NaN/Inf; give up after this many in a row.
        "max_nonfinite_steps": 10,
        # Check the data files before the first stage trains (remembered in DIR/data_check.json).
        "check_data": True,
        # Score each round's pseudo labels against the target's own labels where it has them
        # (labelled proportion, P-mIoU per class; fastst.quality). Reporting only.
        "pseudo_quality": True,
        # An earlier run directory (or a list of them) whose finished stages this run copies
        # instead of training them again, where they were made with the same recipe
        # (fastst.methods.reuse).
        "reuse_from": None,
        # Multi-process runs (torchrun): BatchNorm statistics over the global batch (all ranks,
        # CUDA only) instead of each rank's share of it.
        "sync_bn": False,
        # Where class-balanced thresholds (CBST/CRST/TPLD, IAST's cbst selector) keep their data:
        # "values" (one pass, 5 bytes per kept pixel), "histogram" (a second pass over the
        # images, 20 MB whatever the data set, resumable), or "auto" (histogram above 1 GiB of
        # values). Both give the same thresholds.
        "cbst_thresholds": "auto",
        # torch.compile the module each training step calls: null (eager), "default",
        # "reduce-overhead" (CUDA graphs on a GPU), "max-autotune", "max-autotune-no-cudagraphs".
        # The first steps of each stage pay the compilation (about a minute).
        "compile": None,
    },
}

def stage_defaults(method: str) -> Dict[str, Any]:
    """A copy of the keys and default values of a stage of ``method`` (its Stage class's
    DEFAULTS, fastst/methods/); ConfigError listing the methods if there is none."""
    if method not in METHOD_NAMES:
        raise ConfigError(f"unknown method {method!r}; valid methods: {', '.join(METHOD_NAMES)}")
    return copy.deepcopy(stage_class(method).DEFAULTS)


def __getattr__(name: str) -> Any:
    # STAGE_DEFAULTS (method -> its stage keys and defaults) is read from the method registry
    # each time it is asked for: a fresh copy that callers may change.
    if name == "STAGE_DEFAULTS":
        return {method: stage_defaults(method) for method in METHOD_NAMES}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load_config(preset: str, overrides: Sequence[str] = ()) -> Dict[str, Any]:
    """The resolved, validated configuration of ``preset`` with ``overrides`` applied."""
    config = resolve(load_preset(preset), source=f"preset {preset!r}")
    config["name"] = preset if config["name"] == "custom" else config["name"]
    apply_overrides(config, overrides)
    validate_config(config)
    return config


def resolve(raw: Mapping[str, Any], *, source: str) -> Dict[str, Any]:
    """``raw`` (a preset's dict) merged over BASE_DEFAULTS, each stage over its method's
    defaults (``stage_defaults``). Keys that exist in neither raise ConfigError."""
    config = copy.deepcopy(BASE_DEFAULTS)
    stages = raw.get("stages", {})
    if not isinstance(stages, Mapping):
        raise ConfigError(f"{source}: 'stages' must map stage names to settings")
    _merge(config, {k: v for k, v in raw.items() if k != "stages"}, source=source, prefix="")
    for name, settings in stages.items():
        if not isinstance(settings, Mapping) or "method" not in settings:
            raise ConfigError(f"{source}: stage {name!r} must be a mapping with a 'method' (one "
                              f"of {', '.join(METHOD_NAMES)})")
        method = settings["method"]
        if method not in METHOD_NAMES:
            raise ConfigError(f"{source}: stage {name!r} has unknown method {method!r}; valid "
                              f"methods: {', '.join(METHOD_NAMES)}")
        stage = {"method": method, **stage_defaults(method)}
        _merge(stage, {k: v for k, v in settings.items() if k != "method"}, source=source,
               prefix=f"stages.{name}.")
        config["stages"][name] = stage
    return config


def _merge(base: Dict[str, Any], update: Mapping[str, Any], *, source: str, prefix: str) -> None:
    for key, value in update.items():
        dotted = prefix + str(key)
        if key not in base:
            raise ConfigError(f"{source}: {unknown_key_message(dotted, [prefix + k for k in base])}")
        if isinstance(base[key], dict) and isinstance(value, Mapping):
            _merge(base[key], value, source=source, prefix=dotted + ".")
        else:
            base[key] = copy.deepcopy(value)


def flat_keys(config: Mapping[str, Any], prefix: str = "") -> List[str]:
    """Dotted paths of every leaf of ``config`` (a dict value that is empty or None is a leaf)."""
    keys = []
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            keys.extend(flat_keys(value, dotted + "."))
        else:
            keys.append(dotted)
    return keys


def _parse_value(text: str, key: str) -> Any:
    try:
        return yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as error:
        raise ConfigError(f"override {key}={text!r}: not a YAML value ({error})") from error


def _coerce(value: Any, default: Any, key: str) -> Any:
    """``value`` converted to the kind of ``default`` (float keys accept ints and "1e-4")."""
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if isinstance(default, (int, float)):
        if isinstance(value, str):
            try:
                value = float(value) if any(c in value for c in ".eEn") else int(value)
            except ValueError:
                raise ConfigError(f"{key} must be a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value) if isinstance(default, float) else value
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    if isinstance(default, list):
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list like {default!r}, got {value!r}")
        if default and len(value) == len(default):
            return [_coerce(v, d, f"{key}[{i}]") for i, (v, d) in enumerate(zip(value, default))]
        return value
    if isinstance(default, dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} is a group of keys; set its leaves (e.g. {key}.<name>=...), "
                              f"got {value!r}")
        return value
    return value


def unknown_key_message(key: str, valid: Sequence[str]) -> str:
    """"unknown key 'KEY' (did you mean A, B or C?); ..." with at most 3 of ``valid`` close to
    ``key`` (difflib), and where the full list is, rather than the list itself."""
    close = difflib.get_close_matches(key, list(valid), n=3, cutoff=0.6)
    if not close:  # a short, misspelt last part under the right group: runtime.thread
        parent, _, leaf = key.rpartition(".")
        siblings = {k.rpartition(".")[2]: k for k in valid if k.rpartition(".")[0] == parent}
        close = [siblings[k] for k in difflib.get_close_matches(leaf, list(siblings), n=3)]
    hint = ""
    if close:
        hint = f" (did you mean {close[0]}?)" if len(close) == 1 else \
            f" (did you mean {', '.join(close[:-1])} or {close[-1]}?)"
    return (f"unknown key {key!r}{hint}; every key and its value: python -m fastst.train "
            "--preset NAME --print-config")


def apply_overrides(config: Dict[str, Any], overrides: Iterable[str]) -> Dict[str, Any]:
    """Apply ``key=value`` strings in place (and return ``config``). ``key`` must be a dotted
    path that exists in ``config``; ConfigError suggests the closest ones otherwise."""
    for item in overrides:
        if not isinstance(item, str) or "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value, e.g. "
                              "stages.round1.alpha=0.25")
        key, text = item.split("=", 1)
        key = key.strip()
        valid = flat_keys(config)
        parts = key.split(".")
        node: Any = config
        for part in parts[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
            if not isinstance(node, dict):
                break
        if not isinstance(node, dict) or parts[-1] not in node:
            raise ConfigError(unknown_key_message(key, valid))
        node[parts[-1]] = _coerce(_parse_value(text, key), node[parts[-1]], key)
    return config


# --- files -------------------------------------------------------------------------------------

def config_yaml(config: Mapping[str, Any]) -> str:
    """``config`` as the YAML text of DIR/config.yaml (keys in their order, short lists inline)."""
    return yaml.safe_dump(_plain(config), sort_keys=False, default_flow_style=None, width=100)


def dump_config(config: Mapping[str, Any], path: "os.PathLike[str] | str") -> Path:
    """Write ``config`` as YAML to ``path`` atomically (temporary file + os.replace)."""
    text = config_yaml(config)
    with atomic_write(path, "w") as handle:
        handle.write(text)
    return Path(path)


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def recipe_differences(saved: Mapping[str, Any], config: Mapping[str, Any]) -> List[Tuple[str, Any, Any]]:
    """(key, saved value, new value) for every key outside ``runtime`` whose value differs,
    i.e. the changes that make a run directory's checkpoints belong to another recipe."""
    def flat(cfg):
        return {k: get_key(cfg, k) for k in flat_keys(cfg) if not k.startswith("runtime.")}

    old, new = flat(saved), flat(config)
    return [(key, old.get(key), new.get(key)) for key in sorted(set(old) | set(new))
            if old.get(key) != new.get(key)]


def read_config_file(path: "os.PathLike[str] | str") -> Optional[Dict[str, Any]]:
    """The config dict stored at ``path``, or None if the file does not exist. Keys that this
    version has and the file lacks (it was written before they existed) get their defaults, so
    that an older run directory still resumes and its stages can be reused."""
    path = Path(path)
    if not path.is_file():
        return None
    with open(path) as handle:
        data = yaml.safe_load(handle)
    if not isinstance(data, dict):
        raise ConfigError(f"{path} does not hold a configuration mapping")
    try:
        return resolve(data, source=str(path))
    except ConfigError:  # keys this version does not know: compare the file as it is
        return data
