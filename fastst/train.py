"""Run a training pipeline from a preset: ``python -m fastst.train --preset NAME``.

    python -m fastst.train --preset NAME [--out DIR] [--stages a,b] [--init PATH] [key=value ...]
    python -m fastst.train --preset NAME --dry-run [--json] [key=value ...]

Presets are the YAML files in fastst/presets/ (``demo``, ``iast_gta5``, ``tpld_gta5``, ...); any
key can be overridden with ``key=value`` (dotted path, YAML value, e.g.
``stages.round1.alpha=0.25 data.source.root=/data/GTA5 seeds=3``). The stages of ``pipeline``
run in order in one command, each starting from the previous stage's last checkpoint (under
``chain: released``, from the snapshot ``fastst.methods.chain`` names); ``--stages`` runs a subset
(its first stage starts from ``--init PATH`` when given, else from the checkpoint of the stage
before it in DIR, else - for the first stage of the pipeline - from ``model.pretrained``).
``--dry-run`` prints the recipe (``fastst.recipe``) without reading data or training.

Outputs in DIR (default runs/<preset>; with ``seeds: n > 1``, one DIR/seed<s>/ per seed):
  config.yaml              the resolved configuration
  <stage>/last.pt          checkpoint (atomic; every runtime.checkpoint_every iterations and at
                           the end): model, optimizers, schedule, RNG states, iteration, extras
  <stage>/result.json      target mIoU of the stage's last checkpoint, times
  <round>/pseudo/          pseudo labels (labels/*.png) and manifest.json of an IAST round
  tensorboard/             losses by part, lr, theta and pseudo-label density per class,
                           target mIoU per stage, input / prediction / label images
  summary.json             {"stages": [{"name", "target_miou", "seconds", ...}, ...]}
Rerunning the same command after an interruption resumes where it stopped (also in the middle of
a pseudo-label pass); finished stages are not redone. On the CPU the result equals an
uninterrupted run.

Before the first stage trains, the source, target and val data are checked like
``python -m fastst.data check`` does (once: DIR/data_check.json remembers data that passed, by a
fingerprint of file names, sizes and mtimes; ``runtime.check_data=false`` skips it); faults stop
the run with a report naming the files. Exit status: 0 done, 2 bad input (preset, key, value,
data, checkpoint) or a full disk (rerun the same command once there is space), 1 training gave
up on non-finite losses, 3 a ``runtime.stop_after_*`` hook fired.

Several GPUs: ``torchrun --standalone --nproc_per_node N -m fastst.train --preset NAME ...``
runs the same pipeline in N processes (``fastst.distributed``: NCCL on GPUs, gloo on the CPU).
Each stage's batch is split evenly over the ranks (it must be divisible by N), gradients are
averaged by DistributedDataParallel, the pseudo-label passes and the evaluation split their
images over the ranks and give the labels, thresholds and mIoU of a one-process run, and rank 0
alone writes config.yaml, checkpoints, result.json, summary.json and TensorBoard events.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch

from fastst import distributed
from fastst.atomic import read_json
from fastst.checkpoint import (ClassCountMismatch, check_num_classes, load_checkpoint,
                               read_torch_file)
from fastst.config import (ConfigError, available_presets, dump_config, load_config,
                           read_config_file, recipe_differences)
from fastst.methods import stage_class
from fastst.faults import (DataCheckFailed, NonFiniteLossError, check_run_data, disk_full,
                           disk_full_message, remove_stale_temp_files)
from fastst.methods.context import (RunContext, StopRequested, colorize, denormalize,
                                    resolve_device, write_json_atomic)
from fastst.methods.datasets import build_role, split_names
from fastst.methods.reuse import reuse_stage
from fastst.methods.streams import derive_seed
from fastst.methods.trainer import CHECKPOINT_NAME

__all__ = ["run_pipeline", "select_stages", "main", "format_table"]

RESULT_NAME = "result.json"
SUMMARY_NAME = "summary.json"
SEMI_SPLIT_NAME = "semi_split.json"
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


def _configure_process(config: Mapping[str, Any], device: torch.device) -> None:
    runtime = config["runtime"]
    if runtime["threads"]:
        torch.set_num_threads(runtime["threads"])
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        # The ops' NaN/label-range checks cost a host sync per call on CUDA; the pipeline's own
        # data is valid by construction, so they are off in training unless asked for.
        if not runtime["op_value_checks"]:
            os.environ["FASTST_CHECK"] = "0"


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
        ctx.writer.add_scalar(f"{tag}/p_miou", 100 * _nan(quality["p_miou"]), 0)
        for name, value in quality["p_iou"].items():
            ctx.writer.add_scalar(f"{tag}/p_iou/{name}", 100 * _nan(value), 0)
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
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run_dir / "tensorboard"))
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
                writer.add_scalar("target_miou", 100 * _nan(result["miou"]),
                                  list(config["pipeline"]).index(name))
                writer.add_scalar(f"{name}/target_miou", 100 * _nan(result["miou"]), 0)
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


def _nan(value: Optional[float]) -> float:
    return math.nan if value is None else float(value)


def summarize(config: Mapping[str, Any], per_seed: Mapping[int, List[Dict[str, Any]]]
              ) -> Dict[str, Any]:
    """summary.json: per stage the target mIoU (a fraction; the mean over seeds, with the
    sample standard deviation and the per-seed values when there are several) and seconds."""
    seeds = list(per_seed)
    stages = []
    for name in config["pipeline"]:
        rows = [next((r for r in per_seed[s] if r["name"] == name), None) for s in seeds]
        if any(row is None for row in rows):
            continue
        values = [_nan(row["target_miou"]) for row in rows]
        entry = {"name": name, "method": rows[0]["method"],
                 "target_miou": statistics.fmean(values),
                 "seconds": statistics.fmean(row["seconds"] for row in rows),
                 "iterations": rows[0].get("iterations")}
        for key in ("labelled_proportion", "p_miou"):
            found = [_pseudo_quality_value(row, key) for row in rows]
            if all(value is not None for value in found):
                entry[key] = statistics.fmean(found)
        if len(seeds) > 1:
            entry["target_miou_std"] = statistics.stdev(values)
            entry["target_miou_per_seed"] = values
        else:
            for key in ("miou16", "miou13", "iou", "train_seconds", "eval_seconds", "pseudo",
                        "checkpoint"):
                if key in rows[0]:
                    entry[key] = rows[0][key]
        stages.append(entry)
    return {"preset": config["name"], "seeds": seeds, "stages": stages,
            "total_seconds": sum(s["seconds"] for s in stages)}


def _pseudo_quality_value(row: Mapping[str, Any], key: str) -> Optional[float]:
    quality = (row.get("pseudo") or {}).get("quality") or {}
    value = quality.get(key)
    return None if value is None else float(value)


def format_table(summary: Mapping[str, Any]) -> str:
    """The stages x target mIoU table printed at the end of a run (mIoU in percent), with the
    pseudo labels' labelled proportion and P-mIoU where the target has labels."""
    several = len(summary["seeds"]) > 1
    header = "target mIoU (mean ± std over seeds " + ", ".join(map(str, summary["seeds"])) + ")" \
        if several else "target mIoU"
    quality = any("labelled_proportion" in stage for stage in summary["stages"])
    width = max([len("stage")] + [len(s["name"]) for s in summary["stages"]]) + 2
    column = max(12, len(header))
    extra = f"{'labelled %':>12}{'P-mIoU':>9}" if quality else ""
    lines = [f"{'stage':<{width}}{header:>{column}}{extra}   time"]
    for stage in summary["stages"]:
        value = f"{100 * stage['target_miou']:.2f}"
        if several:
            value += f" ± {100 * stage['target_miou_std']:.2f}"
        extra = ""
        if quality:
            proportion = f"{100 * stage['labelled_proportion']:.1f}" \
                if "labelled_proportion" in stage else ""
            p_miou = f"{100 * stage['p_miou']:.2f}" if "p_miou" in stage else \
                ("-" if proportion else "")
            extra = f"{proportion:>12}{p_miou:>9}"
        lines.append(f"{stage['name']:<{width}}{value:>{column}}{extra}   "
                     f"{_duration(stage['seconds'])}")
    blank = f"{'':>21}" if quality else ""
    lines.append(f"{'total':<{width}}{'':>{column}}{blank}   "
                 f"{_duration(summary['total_seconds'])}")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def run_pipeline(config: Mapping[str, Any], out_dir, *, stages: Optional[Sequence[str]] = None,
                 init: Optional[str] = None) -> Dict[str, Any]:
    """Run (or resume) ``stages`` (default: the whole pipeline) for every seed, write
    DIR/config.yaml and DIR/summary.json, and return the summary. Raises StopRequested when a
    ``runtime.stop_after_*`` hook fires, DataCheckFailed when the data has faults (before any
    training), NonFiniteLossError when a stage gives up on non-finite losses, and OSError (with
    the file's name) when a write fails, e.g. on a full disk."""
    out_dir = Path(out_dir)
    device, dctx = _join_processes(config)
    saved = read_config_file(out_dir / "config.yaml")
    if saved is not None:
        differences = recipe_differences(saved, config)
        if differences:
            shown = "; ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in differences[:10])
            raise ConfigError(f"{out_dir} holds a run with another configuration ({shown}); "
                              "use another --out, or delete the directory to start over")
    dctx.barrier()  # every rank has read config.yaml before rank 0 replaces it
    semi_split = split_names(config)
    if dctx.is_main:
        dump_config(config, out_dir / "config.yaml")
        if semi_split is not None:  # the semi-supervised mode's seeded split, for the record
            write_json_atomic(semi_split, out_dir / SEMI_SPLIT_NAME)
    stages = list(config["pipeline"]) if stages is None else list(stages)
    if init is not None and not Path(init).is_file():
        raise FileNotFoundError(f"--init {init!r} does not exist")
    _configure_process(config, device)
    if dctx.is_main:
        # A process killed mid-write leaves its temporary file (never a partial file under the
        # final name); such leftovers can be as large as a checkpoint.
        remove_stale_temp_files(out_dir)
    if config["runtime"].get("check_data", True):
        _check_data(config, out_dir, dctx)
    dctx.barrier()
    seeds = [config["seed"] + k for k in range(config["seeds"])]
    per_seed = {}
    for seed in seeds:
        run_dir = out_dir if len(seeds) == 1 else out_dir / f"seed{seed}"
        per_seed[seed] = run_seed(config, run_dir, seed, stages, device, init)
    summary = summarize(config, per_seed)
    if dctx.is_main:
        write_json_atomic(summary, out_dir / SUMMARY_NAME)
    return summary


def _join_processes(config: Mapping[str, Any]):
    """(device, DistributedContext): under torchrun join the process group (a no-op for one
    process, or when the caller joined one already); each rank then runs on its own GPU."""
    device = resolve_device(config["runtime"]["device"])
    dctx = distributed.init_from_env(device)
    if not dctx.is_distributed:
        return device, dctx
    if config["runtime"]["sync_bn"] and dctx.device.type != "cuda":
        raise ConfigError("runtime.sync_bn=true needs CUDA devices (torch's SyncBatchNorm has "
                          "no CPU implementation); set runtime.sync_bn=false")
    for name in config["pipeline"]:
        batch_size = config["stages"][name]["batch_size"]
        if batch_size % dctx.world_size:
            raise ConfigError(f"stages.{name}.batch_size = {batch_size} is not divisible by the "
                              f"{dctx.world_size} processes: each rank takes batch_size / "
                              f"{dctx.world_size} items of every batch; choose a multiple of "
                              f"{dctx.world_size} or another torchrun --nproc_per_node")
    return dctx.device, dctx


def _check_data(config: Mapping[str, Any], out_dir: Path, dctx) -> None:
    """``check_run_data`` on rank 0 (it writes DIR/data_check.json); the other ranks raise
    what it raised, so that every rank stops on bad data."""
    if not dctx.is_distributed:
        check_run_data(config, out_dir)
        return
    failure = None
    if dctx.is_main:
        try:
            check_run_data(config, out_dir)
        except Exception as error:
            dctx.broadcast_object((type(error).__name__, str(error)))
            raise
    failure = dctx.broadcast_object(failure)
    if failure is not None:
        kinds = {"DataCheckFailed": DataCheckFailed, "FileNotFoundError": FileNotFoundError,
                 "ConfigError": ConfigError}
        raise kinds.get(failure[0], RuntimeError)(f"(rank 0) {failure[1]}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fastst.train",
        description="Train a self-training domain adaptation pipeline from a preset.",
        epilog="presets: " + ", ".join(available_presets()))
    parser.add_argument("--preset", required=True, help="preset name (fastst/presets/NAME.yaml)")
    parser.add_argument("--out", default=None, help="output directory (default: runs/<preset>)")
    parser.add_argument("--stages", default=None,
                        help="comma-separated subset of the pipeline's stages to run")
    parser.add_argument("--init", default=None,
                        help="checkpoint the first selected stage starts from")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the recipe (per stage: iterations, batch, crop, loss weights, "
                             "the lr of every parameter group at the first, middle and last "
                             "iteration, the checkpoints it starts from and labels with) and "
                             "exit without reading data or training")
    parser.add_argument("--json", action="store_true",
                        help="with --dry-run: print the recipe as JSON")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="configuration overrides, e.g. stages.round1.alpha=0.25 seeds=3")
    return parser


def _dry_run(parser: argparse.ArgumentParser, config: Mapping[str, Any], *, as_json: bool) -> int:
    """Print ``fastst.recipe.describe_recipe(config)`` as a table or JSON; exit 2 on a recipe
    that cannot run (e.g. a chain snapshot that cannot exist, a missing list file)."""
    from fastst.recipe import describe_recipe, format_recipe

    try:
        recipe = describe_recipe(config)
    except (ConfigError, FileNotFoundError, ValueError) as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    print(json.dumps(recipe, indent=1) if as_json else format_recipe(recipe))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        config = load_config(args.preset, args.overrides)
        stages = select_stages(config, args.stages)
    except ConfigError as error:
        parser.error(str(error))
    if args.json and not args.dry_run:
        parser.error("--json goes with --dry-run")
    if args.dry_run:
        return _dry_run(parser, config, as_json=args.json)
    out_dir = Path(args.out) if args.out else Path("runs") / config["name"]
    try:
        summary = run_pipeline(config, out_dir, stages=stages, init=args.init)
    except StopRequested as stop:
        print(f"{parser.prog}: {stop}", file=sys.stderr)
        return 3
    except (ConfigError, FileNotFoundError, DataCheckFailed, ClassCountMismatch) as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    except NonFiniteLossError as error:
        parser.exit(1, f"{parser.prog}: error: {error}\n")
    except Exception as error:  # a full disk can surface wrapped in another error type
        full = disk_full(error)
        if full is None:
            raise
        parser.exit(2, f"{parser.prog}: error: {disk_full_message(full, out_dir)}\n")
    finally:
        main_rank = distributed.current().is_main
        distributed.shutdown()
    if main_rank:
        print(format_table(summary))
        print(f"summary: {out_dir / SUMMARY_NAME}; TensorBoard: tensorboard --logdir {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
