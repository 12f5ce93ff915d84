"""Validation of a resolved configuration: every key's type and range (``validate_config``);
each stage's own keys are checked by its method's ``validate`` (fastst/methods/)."""
from __future__ import annotations

from typing import Any, Mapping

from fastst.config_checks import (ConfigError, check_betas, check_bool, check_choice, check_int,
                                  check_real, check_scales, check_size, check_str, fail,
                                  get_key)
from fastst.methods import stage_class

__all__ = ["validate_config", "CBST_THRESHOLD_STORES", "COMPILE_MODES"]

_DEVICES = ("auto", "cpu", "cuda")
_AMP = ("bfloat16", "float16", "none")
_CHAINS = ("last", "released")
_IAS_MODES = ("official", "paper")


def validate_config(config: Mapping[str, Any]) -> None:
    """Check every key's type and range; ConfigError naming the first bad key."""
    from fastst.data import DATASET_NAMES
    from fastst.models.resnet import RESNET_SPECS

    check_int(config, "seed", 0)
    check_int(config, "seeds", 1)
    check_int(config, "num_classes", 2)
    if config["num_classes"] > 254:
        fail("num_classes", "at most 254 (labels are uint8 with 255 = ignore)",
              config["num_classes"])
    _validate_class_set(config)
    check_choice(config, "chain", _CHAINS)
    check_choice(config, "model.backbone", sorted(RESNET_SPECS))
    check_str(config, "model.pretrained", optional=True)
    for part in ("source", "target", "val"):
        check_choice(config, f"data.{part}.dataset", DATASET_NAMES)
        check_str(config, f"data.{part}.root")
        check_str(config, f"data.{part}.split")
        check_str(config, f"data.{part}.list_file", optional=True)
    for part in ("source", "target"):
        _validate_subset(config, f"data.{part}.subset")
        if config["data"][part]["domain"] not in (None, "source", "target"):
            fail(f"data.{part}.domain", "null, source or target", config["data"][part]["domain"])
        check_size(config, f"data.{part}.resize", optional=True)
        check_size(config, f"data.{part}.crop_height_range")
        low, high = config["data"][part]["crop_height_range"]
        if low > high:
            fail(f"data.{part}.crop_height_range", "[min, max] with min <= max", [low, high])
    check_size(config, "data.val.input_size", optional=True)
    synthetic = config["data"]["synthetic"]
    if synthetic is not None and not isinstance(synthetic, dict):
        fail("data.synthetic", "null or a mapping of ensure_synthetic arguments", synthetic)
    check_size(config, "data.crop_size")
    check_real(config, "data.aspect", 0, low_open=True)
    for key in ("flip_p", "brightness_contrast_p"):
        check_real(config, f"data.{key}", 0, 1)
    for key in ("brightness", "contrast"):
        check_real(config, f"data.{key}", 0)
    check_betas(config, "optim.betas")
    check_real(config, "optim.weight_decay", 0)
    check_real(config, "optim.eta_min_ratio", 0, 1)
    check_choice(config, "pseudo.mode", _IAS_MODES)
    check_int(config, "pseudo.group", 1)
    if config["pseudo"]["mode"] == "paper" and config["pseudo"]["group"] != 1:
        fail("pseudo.group", "1 with pseudo.mode=paper (instance = one image)",
              config["pseudo"]["group"])
    check_real(config, "pseudo.beta", 0, 1)
    check_real(config, "pseudo.gamma", 0)
    check_int(config, "pseudo.batch_size", 1)
    if config["pseudo"]["batch_size"] % config["pseudo"]["group"]:
        fail("pseudo.batch_size", f"a multiple of pseudo.group = {config['pseudo']['group']} "
              "(instances must not straddle batches)", config["pseudo"]["batch_size"])
    check_int(config, "pseudo.order_seed", 0)
    check_bool(config, "pseudo.colour")
    check_scales(config, "eval.scales")
    check_bool(config, "eval.flip")
    check_int(config, "eval.batch_size", 1)
    _validate_stages(config)
    _validate_runtime(config)


def _validate_class_set(config: Mapping[str, Any]) -> None:
    from fastst.data.ids import CLASS_SETS

    check_choice(config, "data.class_set", tuple(CLASS_SETS))
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
        fail(key, expected, subset)
    check_real(config, f"{key}.fraction", 0, 1, low_open=True)
    check_int(config, f"{key}.seed", 0)
    check_choice(config, f"{key}.part", ("labelled", "unlabelled"))


def _validate_stages(config: Mapping[str, Any]) -> None:
    stages, pipeline = config["stages"], config["pipeline"]
    if not isinstance(pipeline, list) or not pipeline or not all(isinstance(s, str)
                                                                  for s in pipeline):
        fail("pipeline", "a non-empty list of stage names", pipeline)
    unknown = [s for s in pipeline if s not in stages]
    if unknown:
        raise ConfigError(f"pipeline names stages {unknown} that are not under 'stages' "
                          f"(defined: {', '.join(stages) or 'none'})")
    if len(set(pipeline)) != len(pipeline):
        fail("pipeline", "a list without repeated stages", pipeline)
    for name in pipeline:
        prefix = f"stages.{name}"
        check_int(config, f"{prefix}.epochs", 1)
        check_real(config, f"{prefix}.t_max", 0, low_open=True)
        check_int(config, f"{prefix}.batch_size", 1)
        check_real(config, f"{prefix}.lr", 0, low_open=True)
        check_real(config, f"{prefix}.backbone_lr_mult", 0, low_open=True)
        check_real(config, f"{prefix}.head_lr_mult", 0, low_open=True)
        check_int(config, f"{prefix}.select_every", 1)
        protocol = stages[name]["eval_protocol"]
        if protocol is not None:
            from fastst.protocols import PROTOCOLS

            check_choice(config, f"{prefix}.eval_protocol", (None, *PROTOCOLS))
        check_int(config, f"{prefix}.iterations", 1, optional=True)
        check_int(config, f"{prefix}.iterations_per_epoch", 1, optional=True)
        check_bool(config, f"{prefix}.freeze_bn_affine")
        stage_class(stages[name]["method"]).validate(config, prefix)


CBST_THRESHOLD_STORES = ("auto", "values", "histogram")
COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _validate_runtime(config: Mapping[str, Any]) -> None:
    check_choice(config, "runtime.device", _DEVICES)
    check_choice(config, "runtime.amp", _AMP)
    check_choice(config, "runtime.cbst_thresholds", CBST_THRESHOLD_STORES)
    check_choice(config, "runtime.compile", COMPILE_MODES)
    for key in ("channels_last", "progress", "tensorboard", "op_value_checks", "check_data",
                "pseudo_quality", "sync_bn", "amp_pseudo"):
        if not isinstance(config["runtime"][key], bool):
            fail(f"runtime.{key}", "true or false", config["runtime"][key])
    check_int(config, "runtime.workers", 0)
    check_int(config, "runtime.threads", 1, optional=True)
    for key in ("log_every", "image_every", "checkpoint_every", "pseudo_state_every",
                "write_threads", "progress_every"):
        check_int(config, f"runtime.{key}", 1)
    check_int(config, "runtime.stop_after_iterations", 0, optional=True)
    check_int(config, "runtime.stop_after_pseudo_batches", 0, optional=True)
    reuse = config["runtime"]["reuse_from"]
    if reuse is not None and not (isinstance(reuse, str) and reuse) and not (
            isinstance(reuse, list) and all(isinstance(r, str) and r for r in reuse)):
        fail("runtime.reuse_from", "null, a run directory or a list of them", reuse)
    check_int(config, "runtime.max_nonfinite_steps", 1)
