"""One seed of a training pipeline: the model each stage starts from, the stage's training
(``Stage.run``), its evaluation on the target val split, and its ``result.json``.

``python -m fastst.train`` (``fastst.train.run_pipeline``) calls ``run_seed`` once per seed;
rerunning resumes: a stage with a result.json and a checkpoint is not redone."""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch

from fastst import distributed
from fastst.atomic import read_json
from fastst.checkpoint import check_num_classes, load_checkpoint, read_torch_file
from fastst.config import ConfigError
from fastst.methods import stage_class
from fastst.methods.context import RunContext, colorize, denormalize, write_json_atomic
from fastst.methods.datasets import build_role
from fastst.methods.logs import open_writer
from fastst.methods.reuse import reuse_stage
from fastst.methods.streams import derive_seed
from fastst.methods.trainer import CHECKPOINT_NAME
from fastst.summary import nan_if_none

__all__ = ["RESULT_NAME", "select_stages", "run_seed", "evaluate_miou"]

RESULT_NAME = "result.json"
_VAL_IMAGES_LOGGED = 4


def select_stages(config: Mapping[str, Any], stages: Optional[str]) -> List[str]:
    """The stages to run: all of ``pipeline``, or those named in the comma list ``stages``
    (in pipeline order). ConfigError lists the pipeline for an unknown name."""
    pipeline = list(config["pipeline"])
    if not stages:
        return pipeline
    chosen = [s.strip() for s in stages.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in pipeline]
    if unknown or not chosen:
        raise ConfigError(f"--stages names {unknown or stages!r}, not stages of the pipeline; "
                          f"valid stages: {', '.join(pipeline)}")
    return [s for s in pipeline if s in chosen]


def _fresh_model(config: Mapping[str, Any], seed: int):
    from fastst.models import deeplabv2

    torch.manual_seed(derive_seed(seed, "model") % 2**63)
    pretrained = config["model"]["pretrained"]
    if pretrained is not None and not Path(pretrained).is_file():
        raise FileNotFoundError(
            f"model.pretrained = {pretrained!r} does not exist: download torchvision's ImageNet "
            f"weights for {config['model']['backbone']} there (e.g. resnet101-63fe2227.pth from "
            "download.pytorch.org/models/), or set model.pretrained=null to start from a "
            "random initialisation")
    return deeplabv2(num_classes=config["num_classes"], backbone=config["model"]["backbone"],
                     pretrained=pretrained)


def _model_from_file(config: Mapping[str, Any], path: Path, what: str):
    from fastst.models import deeplabv2

    state = load_checkpoint(path)
    check_num_classes(state, config["num_classes"], source=f"{what} {path}")
    if "complete" in state and not state["complete"]:
        raise RuntimeError(f"{what} {path} is the checkpoint of an unfinished stage; finish that "
                           "stage first (rerun with --stages including it)")
    return deeplabv2(num_classes=config["num_classes"], backbone=config["model"]["backbone"],
                     pretrained=state)


def _init_model(config: Mapping[str, Any], path: str):
    """The model of ``--init``: a fastst checkpoint or a plain state_dict of the whole model
    (e.g. converted released weights), which must fit the preset's backbone and classes."""
    from fastst.models import deeplabv2

    state = read_torch_file(path, what="--init checkpoint")
    if not isinstance(state, Mapping):
        raise ValueError(f"--init {path} holds a {type(state).__name__}, not a fastst checkpoint "
                         "or a state_dict of the model")
    check_num_classes(state, config["num_classes"], source=f"--init {path}")
    try:
        return deeplabv2(num_classes=config["num_classes"],
                         backbone=config["model"]["backbone"], pretrained=state)
    except ValueError as error:
        raise ValueError(f"--init {path}: {error}") from error


def _model_from_ref(config: Mapping[str, Any], run_dir: Path, ref: Mapping[str, Any]):
    """A zero-argument function building the model of a chain reference
    (``fastst.methods.chain``): a stage's last checkpoint or one of its snapshots."""
    from fastst.methods.chain import snapshot_name

    last = ref["checkpoint"] == "last"
    path = run_dir / ref["stage"] / (CHECKPOINT_NAME if last else snapshot_name(ref["checkpoint"]))
    what = f"checkpoint of {ref['stage']}" if last else \
        f"chain=released snapshot ({ref['checkpoint']}) of {ref['stage']}"
    if not last and not path.is_file() and (run_dir / ref["stage"] / CHECKPOINT_NAME).is_file():
        raise FileNotFoundError(f"{what}: {path} does not exist; {ref['stage']} finished without "
                                "it. Rerun that stage under chain=released (delete its "
                                "directory) or set chain=last")
    return lambda: _model_from_file(config, path, what)


def _initial_model(config, run_dir: Path, stages: Sequence[str], index: int, seed: int,
                   init: Optional[str], plan: Optional[Mapping[str, Any]] = None):
    """A zero-argument function building the model that stage ``stages[index]`` starts from:
    under ``chain: released`` the reference of ``plan`` (``fastst.methods.chain``), else the
    last checkpoint of the stage run before it."""
    if plan is not None and plan[stages[index]]["starts_from"]["stage"] is not None \
            and not (index == 0 and init is not None):
        return _model_from_ref(config, run_dir, plan[stages[index]]["starts_from"])
    if index > 0:
        previous = run_dir / stages[index - 1] / CHECKPOINT_NAME
        return lambda: _model_from_file(config, previous, f"checkpoint of {stages[index - 1]}")
    if init is not None:
        return lambda: _init_model(config, init)
    pipeline = list(config["pipeline"])
    position = pipeline.index(stages[0])
    if position == 0:
        return lambda: _fresh_model(config, seed)
    previous_name = pipeline[position - 1]
    previous = run_dir / previous_name / CHECKPOINT_NAME
    if not previous.is_file():
        raise FileNotFoundError(
            f"stage {stages[0]} starts from the last checkpoint of {previous_name}, and "
            f"{previous} does not exist; run {previous_name} first or pass --init PATH")
    return lambda: _model_from_file(config, previous, f"checkpoint of {previous_name}")


def _val_confusion(ctx: RunContext, model, val_set, stage: str, *, progress: bool):
    """The confusion matrix of ``model`` on the val split: under the stage's ``eval_protocol``
    (a released evaluation of ``fastst.evaluate.PROTOCOLS``) or the run's ``eval`` settings."""
    from fastst.evaluate import evaluate

    config = ctx.config
    protocol = config["stages"][stage]["eval_protocol"]
    views = {"protocol": protocol} if protocol is not None else {
        "scales": tuple(config["eval"]["scales"]), "flip": config["eval"]["flip"],
        "input_size": config["data"]["val"]["input_size"]}
    return evaluate(model, val_set, batch_size=config["eval"]["batch_size"], device=ctx.device,
                    num_classes=config["num_classes"], progress=progress,
                    autocast_dtype=ctx.amp_dtype, num_workers=ctx.runtime["workers"], **views)


def _evaluate(ctx: RunContext, model, val_set, stage: str) -> Dict[str, Any]:
    from fastst.evaluate import results_dict

    started = time.perf_counter()
    confusion = _val_confusion(ctx, model, val_set, stage, progress=ctx.runtime["progress"])
    result = results_dict(confusion)
    result["eval_seconds"] = time.perf_counter() - started
    if ctx.writer is not None:
        _log_val_images(ctx, model, val_set, stage)
    return result


def _chain_released(ctx: RunContext, stage, entry: Mapping[str, Any], snapshots: set, val_set,
                    run_dir: Path) -> None:
    """Give ``stage`` what ``chain: released`` asks of it: the snapshots to keep (scored on
    ``val_set`` for "best") and the model its pseudo labels come from."""
    stage.snapshots = set(snapshots)
    stage.select_metric = lambda model: evaluate_miou(ctx, model, val_set, stage.name)
    label = entry["labels_with"]
    if label is not None and label != entry["starts_from"]:
        stage.label_model = _model_from_ref(ctx.config, run_dir, label)


def evaluate_miou(ctx: RunContext, model, val_set, stage: str) -> float:
    """The val mIoU of ``stage``'s model (a fraction; NaN counts as 0) that ``chain: released``
    selects on."""
    miou = _val_confusion(ctx, model, val_set, stage, progress=False).miou()
    return 0.0 if math.isnan(miou) else float(miou)


def _log_val_images(ctx: RunContext, model, val_set, stage: str) -> None:
    from fastst.inference import predict_probs

    count = min(_VAL_IMAGES_LOGGED, len(val_set))
    items = [val_set[i] for i in range(count)]
    sizes = {tuple(item["image"].shape) for item in items}
    if len(sizes) != 1:
        return
    images = torch.stack([item["image"] for item in items]).to(ctx.device)
    labels = torch.stack([item["label"] for item in items])
    was_training = model.training
    model.eval()
    try:
        probs = predict_probs(model, images, input_size=ctx.config["data"]["val"]["input_size"],
                              autocast_dtype=ctx.amp_dtype)
    finally:
        model.train(was_training)
    ctx.writer.add_images(f"{stage}/val_input", denormalize(images).cpu(), 0)
    num_classes = probs.shape[1]
    ctx.writer.add_images(f"{stage}/val_prediction", colorize(probs.argmax(1), num_classes).cpu(),
                          0)
    ctx.writer.add_images(f"{stage}/val_label", colorize(labels, num_classes).cpu(), 0)


def _pseudo_quality(ctx: RunContext, stage) -> Optional[Dict[str, Any]]:
    """Labelled proportion and P-mIoU of the stage's pseudo labels against the target's own
    labels (fastst.quality), logged to TensorBoard; None when the target has no labels."""
    from fastst.data.ids import CLASS_NAMES
    from fastst.methods.labelling import LABEL_DIR
    from fastst.quality import pseudo_label_quality

    config = ctx.config
    try:
        truth = build_role(config, "target", resize=stage.settings["pseudo_size"], labels=True)
        quality = pseudo_label_quality(stage.pseudo_dir / LABEL_DIR, truth,
                                       config["num_classes"], CLASS_NAMES)
    except (FileNotFoundError, ValueError):  # a target without label files
        return None
    if quality is not None and ctx.writer is not None:
        tag = f"{stage.name}/pseudo_quality"
        ctx.writer.add_scalar(f"{tag}/labelled_proportion", quality["labelled_proportion"], 0)
        ctx.writer.add_scalar(f"{tag}/p_miou", 100 * nan_if_none(quality["p_miou"]), 0)
        for name, value in quality["p_iou"].items():
            ctx.writer.add_scalar(f"{tag}/p_iou/{name}", 100 * nan_if_none(value), 0)
    return quality


def _read_result(path: Path) -> Optional[Dict[str, Any]]:
    result = read_json(path)
    return result if isinstance(result, dict) and "target_miou" in result else None


def run_seed(config: Mapping[str, Any], run_dir: Path, seed: int, stages: Sequence[str],
             device: torch.device, init: Optional[str] = None) -> List[Dict[str, Any]]:
    """Run ``stages`` for one seed in ``run_dir``; returns the results of every pipeline stage
    that has one in ``run_dir`` (finished now or before), in pipeline order."""
    run_dir.mkdir(parents=True, exist_ok=True)
    dctx = distributed.current()
    writer = None
    if config["runtime"]["tensorboard"] and dctx.is_main:
        writer = open_writer(run_dir / "tensorboard")  # None, with a note, without tensorboard
    ctx = RunContext(config=dict(config), run_dir=run_dir, seed=seed, device=device,
                     writer=writer)
    try:
        val_set = None
        plan = needed = None
        if config["chain"] == "released":
            from fastst.methods.chain import chain_plan, snapshots_needed

            sizes = {role: len(build_role(config, role)) for role in ("source", "target", "val")}
            plan, needed = chain_plan(config, sizes), snapshots_needed(config, sizes)
        for index, name in enumerate(stages):
            # Every rank decides from the same files: none is being written past this point.
            dctx.barrier()
            stage = stage_class(config["stages"][name]["method"])(ctx, name)
            result_path = stage.dir / RESULT_NAME
            if _read_result(result_path) is not None and stage.checkpoint_path.is_file():
                continue
            if not stage.checkpoint_path.is_file() and dctx.broadcast_object(
                    dctx.is_main and reuse_stage(config, run_dir, seed, name, CHECKPOINT_NAME,
                                                 RESULT_NAME)):
                if dctx.is_main:
                    reused = _read_result(result_path) or {}
                    print(f"{name}: reused from {reused.get('reused_from')}", file=sys.stderr)
                continue
            if val_set is None:
                val_set = build_role(config, "val")
            if plan is not None:
                _chain_released(ctx, stage, plan[name], needed[name], val_set, run_dir)
            model = stage.run(_initial_model(config, run_dir, stages, index, seed, init, plan))
            result = {"name": name, "method": stage.method}
            result.update(_evaluate(ctx, model, val_set, name))
            result["target_miou"] = result["miou"]
            result["train_seconds"] = stage.seconds
            result["seconds"] = stage.seconds + result["eval_seconds"]
            result["iterations"] = stage.total
            result["checkpoint"] = str(stage.checkpoint_path)
            pseudo = stage.pseudo_summary()
            if pseudo is not None:
                result["pseudo"] = pseudo
                quality = _pseudo_quality(ctx, stage) if config["runtime"]["pseudo_quality"] \
                    and dctx.is_main else None
                if quality is not None:
                    pseudo["quality"] = quality
            if dctx.is_main:
                write_json_atomic(result, result_path)
            if writer is not None:
                writer.add_scalar("target_miou", 100 * nan_if_none(result["miou"]),
                                  list(config["pipeline"]).index(name))
                writer.add_scalar(f"{name}/target_miou", 100 * nan_if_none(result["miou"]), 0)
                writer.flush()
            del model
    finally:
        if writer is not None:
            writer.close()
    dctx.barrier()  # the result.json files below are rank 0's
    results = []
    for name in config["pipeline"]:
        result = _read_result(run_dir / name / RESULT_NAME)
        if result is not None:
            results.append(result)
    return results
