"""What a configuration trains, computed without reading any data: ``python -m fastst.train
--preset NAME --dry-run [--json]``.

Per stage: iterations (and per epoch, the schedule period T), batch size, crop, loss weights,
optimizer, and the learning rate of every parameter group (backbone, head, discriminator) at the
first, middle (``total // 2``) and last iteration, from the same functions the trainer uses
(``fastst.methods.schedule``), plus the checkpoints the stage starts from and labels with
(``fastst.methods.chain``).

Set sizes come from the configuration alone: a ``list_file`` counts its lines; the synthetic
domains have ``data.synthetic``'s ``num_train`` / ``num_val``; otherwise the standard sizes of
the data sets (GTA5 24,966 images, SYNTHIA RAND_CITYSCAPES 9,400, Cityscapes train 2,975 and
val 500); a semi-supervised ``subset`` keeps its part of that count.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional

from fastst.data.io import list_path
from fastst.methods.chain import chain_plan
from fastst.methods.schedule import CosineSchedule, base_lrs, eta_min, stage_lengths

__all__ = ["STANDARD_SIZES", "set_sizes", "describe_recipe", "format_recipe"]

# Images per (data set, split) when no list file narrows them.
STANDARD_SIZES = {("gta5", "train"): 24966, ("gta5", "all"): 24966,
                  ("synthia", "train"): 9400, ("synthia", "all"): 9400,
                  ("cityscapes", "train"): 2975, ("cityscapes", "val"): 500}
# The loss weights and selection settings a stage of each method reports.
_LOSS_KEYS = {
    "source_only": (),
    "warmup": ("variant", "gan", "lambda_adv", "lambda_adv_aux", "lambda_seg_aux"),
    "iast": ("selector", "alpha", "lambda_kld", "lambda_ent", "source_weight"),
    "cbst": ("loss", "portion", "source_portion", "mrkld_weight", "lrent_alpha"),
    "tpld_phase1": ("loss", "portion", "source_portion", "mrkld_weight", "lrent_alpha", "beta",
                    "vote_window", "vote_weight", "vote_iterations"),
    "tpld_phase2": ("portion", "beta", "easy_portion", "gamma", "lambda_adv"),
}


def _loss_settings(settings: Mapping[str, Any]) -> Dict[str, Any]:
    keys = _LOSS_KEYS[settings["method"]]
    if settings["method"] == "warmup" and settings["variant"] != "multilevel":
        keys = tuple(k for k in keys if not k.endswith("_aux"))
    return {key: settings[key] for key in keys}


def _count_list(list_file) -> int:
    path = list_path(list_file)
    if not path.is_file():
        raise FileNotFoundError(f"list file {list_file} not found")
    lines = path.read_text().splitlines()
    return sum(1 for line in lines if line.strip() and not line.strip().startswith("#"))


def _role_size(config: Mapping[str, Any], role: str) -> int:
    spec = config["data"][role]
    if spec.get("list_file"):
        count = _count_list(spec["list_file"])
    elif spec["dataset"] == "synthetic":
        from fastst.data.synthetic import DEFAULT_NUM_TRAIN, DEFAULT_NUM_VAL

        synthetic = config["data"]["synthetic"] or {}
        count = synthetic.get("num_val", DEFAULT_NUM_VAL) if spec["split"] == "val" else \
            synthetic.get("num_train", DEFAULT_NUM_TRAIN)
    else:
        key = (spec["dataset"], spec["split"])
        if key not in STANDARD_SIZES:
            raise ValueError(f"data.{role}: no standard size for {spec['dataset']} split "
                             f"{spec['split']!r}; set data.{role}.list_file")
        count = STANDARD_SIZES[key]
    subset = spec.get("subset")
    if subset is not None:
        from fastst.methods.datasets import split_indices

        labelled, unlabelled = split_indices(count, subset["fraction"], subset["seed"])
        count = len(labelled if subset["part"] == "labelled" else unlabelled)
    return count


def set_sizes(config: Mapping[str, Any]) -> Dict[str, int]:
    """{"source", "target", "val"}: the number of images each role reads (no data is read)."""
    return {role: _role_size(config, role) for role in ("source", "target", "val")}


class _Group:
    """A stand-in parameter group for ``CosineSchedule`` (the dry run builds no model)."""

    def __init__(self, lrs: Mapping[str, float]) -> None:
        self.param_groups = [{"name": name, "lr": lr} for name, lr in lrs.items()]


def _lr_points(settings: Mapping[str, Any], optim: Mapping[str, Any], period: float,
               total: int) -> Dict[str, List[float]]:
    schedule = CosineSchedule([_Group(base_lrs(settings))], period, eta_min(settings, optim))
    points = (0, total // 2, total - 1)
    rates: Dict[str, List[float]] = {}
    for iteration in points:
        schedule.step(iteration)
        for group in schedule.optimizers[0].param_groups:
            rates.setdefault(group["name"], []).append(group["lr"])
    return rates


def describe_recipe(config: Mapping[str, Any],
                    sizes: Optional[Mapping[str, int]] = None) -> Dict[str, Any]:
    """The recipe of ``config`` as a JSON-ready dict: ``{"preset", "chain", "set_sizes",
    "stages": [{"name", "method", "iterations", "iterations_per_epoch", "period",
    "batch_size", "crop", "optimizer", "schedule", "loss", "lr": {"backbone": [first, mid,
    last], "head": [...], "discriminator": [...]}, "eval_protocol", "starts_from",
    "labels_with"}]}``.
    ``sizes`` overrides ``set_sizes(config)``."""
    sizes = dict(set_sizes(config) if sizes is None else sizes)
    plan = chain_plan(config, sizes)
    stages = []
    for name in config["pipeline"]:
        settings = config["stages"][name]
        lengths = stage_lengths(config, name, sizes)
        method = settings["method"]
        stages.append({
            "name": name, "method": method, "iterations": lengths["total"],
            "iterations_per_epoch": lengths["per_epoch"], "period": lengths["period"],
            "batch_size": settings["batch_size"], "crop": list(config["data"]["crop_size"]),
            "optimizer": settings.get("optimizer", "adam"),
            "schedule": settings.get("lr_schedule", "cosine"),
            "loss": _loss_settings(settings),
            "lr": _lr_points(settings, config["optim"], lengths["period"], lengths["total"]),
            "eval_protocol": settings["eval_protocol"] or "fastst",
            "starts_from": plan[name]["starts_from"], "labels_with": plan[name]["labels_with"]})
    return {"preset": config["name"], "chain": config["chain"], "set_sizes": sizes,
            "stages": stages}


def _ref(ref: Mapping[str, Any]) -> str:
    if ref["stage"] is None:
        return "model.pretrained or --init"
    checkpoint = ref["checkpoint"]
    what = {"last": "last checkpoint", "best": "best val mIoU"}.get(checkpoint,
                                                                  f"iteration {checkpoint}")
    return f"{ref['stage']} ({what})"


def _rates(values: Optional[List[float]]) -> str:
    return " ".join(f"{v:.3g}" for v in values) if values else "-"


def format_recipe(recipe: Mapping[str, Any]) -> str:
    """The recipe as a text table: one block of lines a stage."""
    sizes = recipe["set_sizes"]
    lines = [f"preset {recipe['preset']}: chain {recipe['chain']}; images: source "
             f"{sizes['source']}, target {sizes['target']}, val {sizes['val']}",
             "lr columns: first / middle / last iteration"]
    header = (f"{'stage':<12}{'method':<13}{'iters':>7}{'/epoch':>7}{'T':>8}{'batch':>6}  "
              f"{'crop':<10}{'optim':<7}{'lr backbone':<27}{'lr head':<27}{'lr D':<27}")
    lines.append(header)
    for stage in recipe["stages"]:
        lr = stage["lr"]
        crop = "x".join(map(str, stage["crop"]))
        lines.append(
            f"{stage['name']:<12}{stage['method']:<13}{stage['iterations']:>7}"
            f"{stage['iterations_per_epoch']:>7}{stage['period']:>8g}{stage['batch_size']:>6}  "
            f"{crop:<10}{stage['optimizer']:<7}{_rates(lr.get('backbone')):<27}"
            f"{_rates(lr.get('head')):<27}{_rates(lr.get('discriminator')):<27}")
        loss = ", ".join(f"{k} {v}" for k, v in stage["loss"].items())
        chain = f"starts from {_ref(stage['starts_from'])}"
        if stage["labels_with"] is not None:
            chain += f", labels with {_ref(stage['labels_with'])}"
        lines.append(f"{'':<12}{chain}; eval {stage['eval_protocol']}" +
                     (f"; {loss}" if loss else ""))
    return "\n".join(line.rstrip() for line in lines)
