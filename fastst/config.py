"""Training configurations: YAML presets in fastst/presets/, key=value overrides, validation.

A configuration is a nested dict. ``load_config(preset, overrides)`` reads
``fastst/presets/<preset>.yaml``, lays it over ``BASE_DEFAULTS`` (so every key exists and the
resolved file ``DIR/config.yaml`` shows them all), fills each stage from ``STAGE_DEFAULTS`` of its
method, applies the overrides and validates the result::

    cfg = load_config("iast_gta5", ["stages.round1.alpha=0.25", "data.source.root=/data/GTA5"])

Overrides name an existing key by its dotted path (``model.backbone``, ``stages.warmup.lambda_adv``)
and give a YAML value (``0.25``, ``1e-4``, ``[512, 1024]``, ``null``, ``true``); an unknown key,
a value of the wrong type or an impossible value raises ``ConfigError`` naming the key and what
is valid. Keys under ``runtime`` change how a run executes, never what it computes (on the CPU),
so they may differ between a run and its resumption.
"""
from __future__ import annotations

import copy
import difflib
import math
import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import yaml

from .atomic import atomic_write

__all__ = ["ConfigError", "PRESET_DIR", "BASE_DEFAULTS", "STAGE_DEFAULTS", "available_presets",
           "load_preset", "load_config", "apply_overrides", "validate_config", "flat_keys",
           "dump_config", "recipe_differences", "get_key"]

PRESET_DIR = Path(__file__).resolve().parent / "presets"


class ConfigError(ValueError):
    """A preset, key or value that cannot be used; the message says what is valid."""


# Every key a configuration has, with the values used where a preset says nothing. Sizes are
# (height, width) in pixels. See fastst/presets/iast_gta5.yaml for what each key means.
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
        "progress": True,
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

# Keys of a stage, by method. Every stage names its method; the rest comes from here unless the
# preset sets it. epochs and t_max count epochs of floor(|source| / batch_size) iterations
# (README "Training"); iterations / iterations_per_epoch, when set, replace the computed numbers.
# lr is the recipe's LR: the backbone trains at backbone_lr_mult * lr and the head (ASPP and
# classifier) at head_lr_mult * lr. IAST's released build_optimizer gives 0.1 * LR and LR (the
# defaults of source_only, warmup and iast stages); CBST/CRST/TPLD give LR and 10 * LR (the
# class-balanced stages' defaults). The cosine schedule's floor is eta_min_ratio * lr for every
# group and the discriminator. select_every: under chain=released, the stage evaluates on the
# val split and keeps model snapshots every select_every iterations (the released ITER_VAL).
# eval_protocol: null (the run's eval settings) or a released evaluation by name
# (fastst.evaluate.PROTOCOLS, e.g. iast_round: IAST's 768x1536 validation of the rounds), used
# for the stage's result and for chain=released's selection.
_COMMON_STAGE = {"epochs": 1, "t_max": 1, "batch_size": 8, "lr": 1.0e-4,
                 "backbone_lr_mult": 0.1, "head_lr_mult": 1.0, "freeze_bn_affine": True,
                 "iterations": None, "iterations_per_epoch": None, "select_every": 400,
                 "eval_protocol": None}
STAGE_DEFAULTS: Dict[str, Dict[str, Any]] = {
    "source_only": {**_COMMON_STAGE, "freeze_bn_affine": False},
    # variant: "output" (IAST's output-space GAN), "multilevel" (AdaptSegNet: + an auxiliary
    # classifier on layer3 and its own discriminator, weights lambda_seg_aux / lambda_adv_aux)
    # or "advent" (GAN on self-information maps); gan: "lsgan", "bce" or "auto" (the variant's
    # own: lsgan for output, bce otherwise). See fastst/methods/warmup.py.
    "warmup": {**_COMMON_STAGE, "d_lr": 2.0e-5, "lambda_adv": 0.05, "d_ndf": 64,
               "d_first_kernel": 3, "variant": "output", "gan": "auto",
               "lambda_adv_aux": 0.0002, "lambda_seg_aux": 0.1},
    # selector: "ias" (instance-adaptive, pseudo.mode), "constant" (max p >= threshold) or
    # "cbst" (class-balanced thresholds at portion, with subsample). See fastst/methods/iast.py.
    "iast": {**_COMMON_STAGE, "alpha": 0.2, "pseudo_size": [640, 1280], "lambda_kld": 0.1,
             "lambda_ent": 3.0, "source_weight": 0.0, "selector": "ias", "threshold": 0.9,
             "portion": 0.2, "subsample": 4},
}
# The class-balanced rounds (docs/recipes.md §5-§6): SGD with a constant lr, BN in eval mode, pseudo labels
# from the 0.9-scale input and its flip at pseudo_size with class-balanced thresholds at
# `portion`. CBST/CRST and TPLD phase 1 train on a mixed list of every target image and
# floor(source_portion * |source|) source images (drawn with source_seed); TPLD phase 2 on easy
# and hard target crops.
_CLASS_BALANCED = {**_COMMON_STAGE, "epochs": 2, "t_max": 2, "batch_size": 2, "lr": 5.0e-5,
                   "backbone_lr_mult": 1.0, "head_lr_mult": 10.0,
                   "optimizer": "sgd", "momentum": 0.9, "lr_schedule": "constant",
                   "bn_eval": True, "portion": 0.2, "pseudo_size": [1024, 2048],
                   "pseudo_scales": [0.9], "pseudo_flip": True, "subsample": 4}
_MIXED = {"source_portion": 0.03, "source_seed": 4, "mine_p": 0.8, "mine_portion": 1.0e-3,
          "mrkld_weight": 0.01}
_VOTE = {"vote_window": 7, "vote_weight": 0.7, "vote_iterations": 3, "beta": 0.95}
STAGE_DEFAULTS.update({
    # loss: "ce" (CBST), "mrkld" (CRST-MRKLD), "lrent" (CRST-LRENT, soft labels of temperature
    # lrent_alpha from the round's teacher); in tpld_phase1 the base method TPLD is built on.
    "cbst": {**_CLASS_BALANCED, **_MIXED, "loss": "mrkld", "lrent_alpha": 0.25},
    "tpld_phase1": {**_CLASS_BALANCED, **_MIXED, **_VOTE, "loss": "mrkld", "lrent_alpha": 0.25},
    "tpld_phase2": {**_CLASS_BALANCED, "beta": 0.95, "easy_portion": 0.3, "gamma": 2.0,
                    "lambda_adv": 0.001, "d_lr": 1.0e-4, "d_betas": [0.9, 0.99], "d_ndf": 64,
                    "d_first_kernel": 4, "soft_targets": "crop"},
})
# tpld_phase2 soft_targets: where the easy crops' calibrated targets come from: "pass" (the
# pass's probabilities, which lambda came from, mapped onto each crop) or "crop" (the teacher
# on the augmented crop). See fastst/methods/tpld.py.
TPLD_SOFT_TARGETS = ("pass", "crop")

_DEVICES = ("auto", "cpu", "cuda")
_AMP = ("bfloat16", "float16", "none")
_CHAINS = ("last", "released")
_IAS_MODES = ("official", "paper")
_OPTIMIZERS = ("adam", "sgd")
_LR_SCHEDULES = ("cosine", "constant")
_CBST_LOSSES = ("ce", "mrkld", "lrent")
WARMUP_VARIANTS = ("output", "multilevel", "advent")
WARMUP_GANS = ("auto", "lsgan", "bce")
IAST_SELECTORS = ("ias", "constant", "cbst")


def available_presets() -> List[str]:
    """Names of the presets shipped in fastst/presets/ (file stems), sorted."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_preset(name: str) -> Dict[str, Any]:
    """The raw dict of preset ``name``; ConfigError listing the presets if there is none."""
    presets = available_presets()
    if not isinstance(name, str) or name not in presets:
        raise ConfigError(f"unknown preset {name!r}; available presets: {', '.join(presets)}")
    path = PRESET_DIR / f"{name}.yaml"
    with open(path) as handle:
        try:
            data = yaml.safe_load(handle)
        except yaml.YAMLError as error:
            raise ConfigError(f"preset file {path} is not valid YAML: {error}") from error
    if not isinstance(data, dict):
        raise ConfigError(f"preset file {path} must hold a mapping, got {type(data).__name__}")
    return data


def load_config(preset: str, overrides: Sequence[str] = ()) -> Dict[str, Any]:
    """The resolved, validated configuration of ``preset`` with ``overrides`` applied."""
    config = resolve(load_preset(preset), source=f"preset {preset!r}")
    config["name"] = preset if config["name"] == "custom" else config["name"]
    apply_overrides(config, overrides)
    validate_config(config)
    return config


def resolve(raw: Mapping[str, Any], *, source: str) -> Dict[str, Any]:
    """``raw`` (a preset's dict) merged over BASE_DEFAULTS, each stage over its method's
    STAGE_DEFAULTS. Keys that exist in neither raise ConfigError."""
    config = copy.deepcopy(BASE_DEFAULTS)
    stages = raw.get("stages", {})
    if not isinstance(stages, Mapping):
        raise ConfigError(f"{source}: 'stages' must map stage names to settings")
    _merge(config, {k: v for k, v in raw.items() if k != "stages"}, source=source, prefix="")
    for name, settings in stages.items():
        if not isinstance(settings, Mapping) or "method" not in settings:
            raise ConfigError(f"{source}: stage {name!r} must be a mapping with a 'method' (one "
                              f"of {', '.join(STAGE_DEFAULTS)})")
        method = settings["method"]
        if method not in STAGE_DEFAULTS:
            raise ConfigError(f"{source}: stage {name!r} has unknown method {method!r}; valid "
                              f"methods: {', '.join(STAGE_DEFAULTS)}")
        stage = {"method": method, **copy.deepcopy(STAGE_DEFAULTS[method])}
        _merge(stage, {k: v for k, v in settings.items() if k != "method"}, source=source,
               prefix=f"stages.{name}.")
        config["stages"][name] = stage
    return config


def _merge(base: Dict[str, Any], update: Mapping[str, Any], *, source: str, prefix: str) -> None:
    for key, value in update.items():
        dotted = prefix + str(key)
        if key not in base:
            raise ConfigError(f"{source}: unknown key {dotted!r}; valid keys here: "
                              f"{', '.join(prefix + k for k in base)}")
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


def get_key(config: Mapping[str, Any], dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        node = node[part]
    return node


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


def apply_overrides(config: Dict[str, Any], overrides: Iterable[str]) -> Dict[str, Any]:
    """Apply ``key=value`` strings in place (and return ``config``). ``key`` must be a dotted
    path that exists in ``config``; ConfigError lists the valid keys otherwise."""
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
            close = difflib.get_close_matches(key, valid, n=3)
            hint = f" (did you mean {' or '.join(close)}?)" if close else ""
            raise ConfigError(f"unknown key {key!r}{hint}; valid keys: {', '.join(valid)}")
        node[parts[-1]] = _coerce(_parse_value(text, key), node[parts[-1]], key)
    return config


# --- validation -------------------------------------------------------------------------------

def _fail(key: str, expected: str, value: Any) -> None:
    raise ConfigError(f"{key} must be {expected}, got {value!r}")


def _int(config, key, low=None, *, optional=False):
    value = get_key(config, key)
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or (low is not None and value < low):
        _fail(key, f"an integer >= {low}" if low is not None else "an integer", value)


def _real(config, key, low=None, high=None, *, low_open=False, optional=False):
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
        _fail(key, "a finite number " + " and ".join(p for p in (lo, hi) if p), value)


def _choice(config, key, choices):
    value = get_key(config, key)
    if value not in choices:
        _fail(key, f"one of {', '.join(map(str, choices))}", value)


def _size(config, key, *, optional=False):
    value = get_key(config, key)
    if optional and value is None:
        return
    if (not isinstance(value, list) or len(value) != 2
            or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in value)):
        _fail(key, "[height, width], two positive integers" + (" or null" if optional else ""),
              value)


def _str(config, key, *, optional=False):
    value = get_key(config, key)
    if not (isinstance(value, str) and value) and not (optional and value is None):
        _fail(key, "a non-empty string" + (" or null" if optional else ""), value)


def validate_config(config: Mapping[str, Any]) -> None:
    """Check every key's type and range; ConfigError naming the first bad key."""
    from fastst.data import DATASET_NAMES
    from fastst.models.resnet import RESNET_SPECS

    _int(config, "seed", 0)
    _int(config, "seeds", 1)
    _int(config, "num_classes", 2)
    if config["num_classes"] > 254:
        _fail("num_classes", "at most 254 (labels are uint8 with 255 = ignore)",
              config["num_classes"])
    _validate_class_set(config)
    _choice(config, "chain", _CHAINS)
    _choice(config, "model.backbone", sorted(RESNET_SPECS))
    _str(config, "model.pretrained", optional=True)
    for part in ("source", "target", "val"):
        _choice(config, f"data.{part}.dataset", DATASET_NAMES)
        _str(config, f"data.{part}.root")
        _str(config, f"data.{part}.split")
        _str(config, f"data.{part}.list_file", optional=True)
    for part in ("source", "target"):
        _validate_subset(config, f"data.{part}.subset")
        if config["data"][part]["domain"] not in (None, "source", "target"):
            _fail(f"data.{part}.domain", "null, source or target", config["data"][part]["domain"])
        _size(config, f"data.{part}.resize", optional=True)
        _size(config, f"data.{part}.crop_height_range")
        low, high = config["data"][part]["crop_height_range"]
        if low > high:
            _fail(f"data.{part}.crop_height_range", "[min, max] with min <= max", [low, high])
    _size(config, "data.val.input_size", optional=True)
    synthetic = config["data"]["synthetic"]
    if synthetic is not None and not isinstance(synthetic, dict):
        _fail("data.synthetic", "null or a mapping of ensure_synthetic arguments", synthetic)
    _size(config, "data.crop_size")
    _real(config, "data.aspect", 0, low_open=True)
    for key in ("flip_p", "brightness_contrast_p"):
        _real(config, f"data.{key}", 0, 1)
    for key in ("brightness", "contrast"):
        _real(config, f"data.{key}", 0)
    betas = config["optim"]["betas"]
    if (not isinstance(betas, list) or len(betas) != 2
            or any(isinstance(b, bool) or not isinstance(b, (int, float)) or not 0 <= b < 1
                   for b in betas)):
        _fail("optim.betas", "[beta1, beta2], each in [0, 1)", betas)
    _real(config, "optim.weight_decay", 0)
    _real(config, "optim.eta_min_ratio", 0, 1)
    _choice(config, "pseudo.mode", _IAS_MODES)
    _int(config, "pseudo.group", 1)
    if config["pseudo"]["mode"] == "paper" and config["pseudo"]["group"] != 1:
        _fail("pseudo.group", "1 with pseudo.mode=paper (instance = one image)",
              config["pseudo"]["group"])
    _real(config, "pseudo.beta", 0, 1)
    _real(config, "pseudo.gamma", 0)
    _int(config, "pseudo.batch_size", 1)
    if config["pseudo"]["batch_size"] % config["pseudo"]["group"]:
        _fail("pseudo.batch_size", f"a multiple of pseudo.group = {config['pseudo']['group']} "
              "(instances must not straddle batches)", config["pseudo"]["batch_size"])
    _int(config, "pseudo.order_seed", 0)
    if not isinstance(config["pseudo"]["colour"], bool):
        _fail("pseudo.colour", "true or false", config["pseudo"]["colour"])
    scales = config["eval"]["scales"]
    if (not isinstance(scales, list) or not scales
            or any(isinstance(s, bool) or not isinstance(s, (int, float)) or not s > 0
                   for s in scales)):
        _fail("eval.scales", "a non-empty list of positive numbers", scales)
    if not isinstance(config["eval"]["flip"], bool):
        _fail("eval.flip", "true or false", config["eval"]["flip"])
    _int(config, "eval.batch_size", 1)
    _validate_stages(config)
    _validate_runtime(config)


def _validate_class_set(config: Mapping[str, Any]) -> None:
    from fastst.data.ids import CLASS_SETS

    _choice(config, "data.class_set", tuple(CLASS_SETS))
    class_set = CLASS_SETS[config["data"]["class_set"]]
    if config["num_classes"] != class_set.num_classes:
        others = ", ".join(f"data.class_set={s.name} with num_classes={s.num_classes}"
                           for s in CLASS_SETS.values() if s is not class_set)
        raise ConfigError(f"num_classes = {config['num_classes']} does not match "
                          f"data.class_set={class_set.name}, which has {class_set.num_classes} "
                          f"classes; set num_classes={class_set.num_classes} (or {others})")


def _validate_subset(config: Mapping[str, Any], key: str) -> None:
    subset = get_key(config, key)
    if subset is None:
        return
    expected = "null or {fraction: (0, 1], seed: int >= 0, part: labelled or unlabelled}"
    if not isinstance(subset, dict) or set(subset) != {"fraction", "seed", "part"}:
        _fail(key, expected, subset)
    _real(config, f"{key}.fraction", 0, 1, low_open=True)
    _int(config, f"{key}.seed", 0)
    _choice(config, f"{key}.part", ("labelled", "unlabelled"))


def _validate_stages(config: Mapping[str, Any]) -> None:
    stages, pipeline = config["stages"], config["pipeline"]
    if not isinstance(pipeline, list) or not pipeline or not all(isinstance(s, str)
                                                                  for s in pipeline):
        _fail("pipeline", "a non-empty list of stage names", pipeline)
    unknown = [s for s in pipeline if s not in stages]
    if unknown:
        raise ConfigError(f"pipeline names stages {unknown} that are not under 'stages' "
                          f"(defined: {', '.join(stages) or 'none'})")
    if len(set(pipeline)) != len(pipeline):
        _fail("pipeline", "a list without repeated stages", pipeline)
    for name in pipeline:
        prefix = f"stages.{name}"
        _int(config, f"{prefix}.epochs", 1)
        _real(config, f"{prefix}.t_max", 0, low_open=True)
        _int(config, f"{prefix}.batch_size", 1)
        _real(config, f"{prefix}.lr", 0, low_open=True)
        _real(config, f"{prefix}.backbone_lr_mult", 0, low_open=True)
        _real(config, f"{prefix}.head_lr_mult", 0, low_open=True)
        _int(config, f"{prefix}.select_every", 1)
        protocol = stages[name]["eval_protocol"]
        if protocol is not None:
            from fastst.evaluate import PROTOCOLS

            _choice(config, f"{prefix}.eval_protocol", (None, *PROTOCOLS))
        _int(config, f"{prefix}.iterations", 1, optional=True)
        _int(config, f"{prefix}.iterations_per_epoch", 1, optional=True)
        if not isinstance(stages[name]["freeze_bn_affine"], bool):
            _fail(f"{prefix}.freeze_bn_affine", "true or false", stages[name]["freeze_bn_affine"])
        method = stages[name]["method"]
        if method == "warmup":
            _real(config, f"{prefix}.d_lr", 0, low_open=True)
            _real(config, f"{prefix}.lambda_adv", 0)
            _int(config, f"{prefix}.d_ndf", 1)
            _int(config, f"{prefix}.d_first_kernel", 1)
            _choice(config, f"{prefix}.variant", WARMUP_VARIANTS)
            _choice(config, f"{prefix}.gan", WARMUP_GANS)
            _real(config, f"{prefix}.lambda_adv_aux", 0)
            _real(config, f"{prefix}.lambda_seg_aux", 0)
        elif method == "iast":
            _real(config, f"{prefix}.alpha", 0, 1, low_open=True)
            _size(config, f"{prefix}.pseudo_size")
            _real(config, f"{prefix}.lambda_kld", 0)
            _real(config, f"{prefix}.lambda_ent", 0)
            _real(config, f"{prefix}.source_weight", 0)
            _choice(config, f"{prefix}.selector", IAST_SELECTORS)
            _real(config, f"{prefix}.threshold", 0, 1, low_open=True)
            _real(config, f"{prefix}.portion", 0, 1)
            _int(config, f"{prefix}.subsample", 1)
        elif method in ("cbst", "tpld_phase1", "tpld_phase2"):
            _validate_class_balanced(config, prefix, method)


def _validate_class_balanced(config: Mapping[str, Any], prefix: str, method: str) -> None:
    stage = get_key(config, prefix)
    _choice(config, f"{prefix}.optimizer", _OPTIMIZERS)
    _real(config, f"{prefix}.momentum", 0, 1)
    _choice(config, f"{prefix}.lr_schedule", _LR_SCHEDULES)
    if not isinstance(stage["bn_eval"], bool):
        _fail(f"{prefix}.bn_eval", "true or false", stage["bn_eval"])
    _real(config, f"{prefix}.portion", 0, 1)
    _size(config, f"{prefix}.pseudo_size")
    scales = stage["pseudo_scales"]
    if (not isinstance(scales, list) or not scales
            or any(isinstance(s, bool) or not isinstance(s, (int, float)) or not s > 0
                   for s in scales)):
        _fail(f"{prefix}.pseudo_scales", "a non-empty list of positive numbers", scales)
    if not isinstance(stage["pseudo_flip"], bool):
        _fail(f"{prefix}.pseudo_flip", "true or false", stage["pseudo_flip"])
    _int(config, f"{prefix}.subsample", 1)
    if method in ("cbst", "tpld_phase1"):
        _real(config, f"{prefix}.source_portion", 0, 1)
        _int(config, f"{prefix}.source_seed", 0)
        _real(config, f"{prefix}.mine_p", 0, 1)
        _real(config, f"{prefix}.mine_portion", 0, 1)
        _real(config, f"{prefix}.mrkld_weight", 0)
        _choice(config, f"{prefix}.loss", _CBST_LOSSES)
        _real(config, f"{prefix}.lrent_alpha", 0, low_open=True)
    if method == "tpld_phase1":
        _int(config, f"{prefix}.vote_window", 1)
        if stage["vote_window"] % 2 == 0:
            _fail(f"{prefix}.vote_window", "an odd integer (the window is centred on the pixel)",
                  stage["vote_window"])
        _real(config, f"{prefix}.vote_weight", 0, 1)
        _int(config, f"{prefix}.vote_iterations", 0)
    if method in ("tpld_phase1", "tpld_phase2"):
        _real(config, f"{prefix}.beta", 0, 1)
    if method == "tpld_phase2":
        _real(config, f"{prefix}.easy_portion", 0, 1, low_open=True)
        if stage["easy_portion"] >= 1:
            _fail(f"{prefix}.easy_portion", "in (0, 1) (some images must be hard)",
                  stage["easy_portion"])
        _real(config, f"{prefix}.gamma", 0)
        _real(config, f"{prefix}.lambda_adv", 0)
        _real(config, f"{prefix}.d_lr", 0, low_open=True)
        betas = stage["d_betas"]
        if (not isinstance(betas, list) or len(betas) != 2
                or any(isinstance(b, bool) or not isinstance(b, (int, float)) or not 0 <= b < 1
                       for b in betas)):
            _fail(f"{prefix}.d_betas", "[beta1, beta2], each in [0, 1)", betas)
        _int(config, f"{prefix}.d_ndf", 1)
        _int(config, f"{prefix}.d_first_kernel", 1)
        _choice(config, f"{prefix}.soft_targets", TPLD_SOFT_TARGETS)


CBST_THRESHOLD_STORES = ("auto", "values", "histogram")
COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _validate_runtime(config: Mapping[str, Any]) -> None:
    _choice(config, "runtime.device", _DEVICES)
    _choice(config, "runtime.amp", _AMP)
    _choice(config, "runtime.cbst_thresholds", CBST_THRESHOLD_STORES)
    _choice(config, "runtime.compile", COMPILE_MODES)
    for key in ("channels_last", "progress", "tensorboard", "op_value_checks", "check_data",
                "pseudo_quality", "sync_bn", "amp_pseudo"):
        if not isinstance(config["runtime"][key], bool):
            _fail(f"runtime.{key}", "true or false", config["runtime"][key])
    _int(config, "runtime.workers", 0)
    _int(config, "runtime.threads", 1, optional=True)
    for key in ("log_every", "image_every", "checkpoint_every", "pseudo_state_every",
                "write_threads"):
        _int(config, f"runtime.{key}", 1)
    _int(config, "runtime.stop_after_iterations", 0, optional=True)
    _int(config, "runtime.stop_after_pseudo_batches", 0, optional=True)
    reuse = config["runtime"]["reuse_from"]
    if reuse is not None and not (isinstance(reuse, str) and reuse) and not (
            isinstance(reuse, list) and all(isinstance(r, str) and r for r in reuse)):
        _fail("runtime.reuse_from", "null, a run directory or a list of them", reuse)
    _int(config, "runtime.max_nonfinite_steps", 1)


# --- files -------------------------------------------------------------------------------------

def dump_config(config: Mapping[str, Any], path: "os.PathLike[str] | str") -> Path:
    """Write ``config`` as YAML to ``path`` atomically (temporary file + os.replace)."""
    text = yaml.safe_dump(_plain(config), sort_keys=False, default_flow_style=None, width=100)
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
