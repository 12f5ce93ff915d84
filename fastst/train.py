"""Run a training pipeline from a preset: ``python -m fastst.train --preset NAME``.

    python -m fastst.train --preset NAME [--out DIR] [--stages a,b] [--init PATH] [key=value ...]
    python -m fastst.train --preset NAME --dry-run [--json] [key=value ...]
    python -m fastst.train --preset NAME --print-config [key=value ...]

Presets are the YAML files in fastst/presets/ (``demo``, ``iast_gta5``, ``tpld_gta5``, ...); any
key can be overridden with ``key=value`` (dotted path, YAML value, e.g.
``stages.round1.alpha=0.25 data.source.root=/data/GTA5 seeds=3``). The stages of ``pipeline``
run in order in one command, each starting from the previous stage's last checkpoint (under
``chain: released``, from the snapshot ``fastst.methods.chain`` names); ``--stages`` runs a subset
(its first stage starts from ``--init PATH`` when given, else from the checkpoint of the stage
before it in DIR, else - for the first stage of the pipeline - from ``model.pretrained``).
``--dry-run`` prints the recipe (``fastst.recipe``) without reading data or training;
``--print-config`` prints the resolved configuration (every key with its value, as DIR/config.yaml
will hold it) and exits, also without reading data.

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
import os
import sys
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence

import torch

from fastst import distributed
from fastst.checkpoint import ClassCountMismatch
from fastst.cli import add_debug_option, check_output_dir, run_cli
from fastst.config import (ConfigError, available_presets, config_yaml, dump_config, load_config,
                           read_config_file, recipe_differences)
from fastst.faults import (DataCheckFailed, NonFiniteLossError, check_run_data, disk_full,
                           disk_full_message, remove_stale_temp_files)
from fastst.data.synth import ensure_for_config
from fastst.methods.context import StopRequested, resolve_device, write_json_atomic
from fastst.methods.datasets import split_names
from fastst.methods.trainer import CHECKPOINT_NAME
from fastst.pipeline import RESULT_NAME, run_seed, select_stages
from fastst.summary import SUMMARY_NAME, format_table, summarize

__all__ = ["run_pipeline", "select_stages", "main", "format_table", "RESULT_NAME",
           "SUMMARY_NAME"]

SEMI_SPLIT_NAME = "semi_split.json"


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


def run_pipeline(config: Mapping[str, Any], out_dir, *, stages: Optional[Sequence[str]] = None,
                 init: Optional[str] = None) -> Dict[str, Any]:
    """Run (or resume) ``stages`` (default: the whole pipeline) for every seed, write
    DIR/config.yaml and DIR/summary.json, and return the summary. Raises StopRequested when a
    ``runtime.stop_after_*`` hook fires, DataCheckFailed when the data has faults (before any
    training), NonFiniteLossError when a stage gives up on non-finite losses, and OSError (with
    the file's name) when a write fails, e.g. on a full disk."""
    out_dir = Path(out_dir)
    device, dctx = _join_processes(config)
    if dctx.is_main:
        check_output_dir(out_dir)
    saved = read_config_file(out_dir / "config.yaml")
    if saved is not None and _has_trained(out_dir):
        differences = recipe_differences(saved, config)
        if differences:
            shown = "; ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in differences[:10])
            raise ConfigError(f"{out_dir} holds a run with another configuration ({shown}); "
                              "use another --out, or delete the directory to start over")
    dctx.barrier()  # every rank has read config.yaml before rank 0 replaces it
    # The synthetic demo domains are generated here, before the data check, and nowhere else
    # but by `python -m fastst.data synth` (fastst.data.synth).
    ensure_for_config(config["data"], progress=bool(config["runtime"]["progress"]))
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


def _has_trained(out_dir: Path) -> bool:
    """Whether a stage of the run in ``out_dir`` has a checkpoint or a result (any seed): until
    then its config.yaml binds nothing, and a rerun with other settings starts over (a first try
    that stopped on bad data, a bad --init, ...)."""
    patterns = (f"*/{CHECKPOINT_NAME}", f"*/{RESULT_NAME}", f"seed*/*/{CHECKPOINT_NAME}",
                f"seed*/*/{RESULT_NAME}")
    return any(next(out_dir.glob(pattern), None) is not None for pattern in patterns)


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
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a self-training domain adaptation pipeline (source-only, warm-up,\n"
                    "self-training rounds) from a preset, evaluate every stage on the target's\n"
                    "val split and write checkpoints, results and a summary to --out.\n"
                    "Rerunning the same command resumes an interrupted run.",
        epilog="presets: " + ", ".join(available_presets()) + "\n\nexamples:\n"
               "  python -m fastst.train --preset demo\n"
               "  python -m fastst.train --preset demo --print-config\n"
               "  python -m fastst.train --preset demo --out runs/tiny \\\n"
               "      stages.source_only.iterations=20 data.synthetic.num_train=40\n"
               "  python -m fastst.train --preset iast_gta5 --dry-run "
               "data.source.root=/data/GTA5\n\n"
               "exit status: 0 done, 2 bad input (preset, key, value, data, checkpoint) or a\n"
               "full disk, 1 non-finite losses, 3 a runtime.stop_after_* hook fired")
    parser.add_argument("--preset", required=True,
                        help="preset name (fastst/presets/NAME.yaml; listed below)")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="output directory (default: runs/<preset>); rerun with the same DIR "
                             "to resume")
    parser.add_argument("--stages", default=None, metavar="A,B",
                        help="comma-separated subset of the pipeline's stages to run, e.g. "
                             "warmup,round1 (default: all, in pipeline order)")
    parser.add_argument("--init", default=None, metavar="PATH",
                        help="checkpoint (last.pt) the first selected stage starts from "
                             "(default: the previous stage's checkpoint in DIR)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved configuration (every key and its value, YAML, "
                             "with the overrides applied) and exit without reading data")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the recipe (per stage: iterations, batch, crop, loss weights, "
                             "the lr of every parameter group at the first, middle and last "
                             "iteration, the checkpoints it starts from and labels with) and "
                             "exit without reading data or training")
    parser.add_argument("--json", action="store_true",
                        help="with --dry-run: print the recipe as JSON")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="configuration overrides, e.g. stages.round1.alpha=0.25 seeds=3")
    add_debug_option(parser)
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


def _print(text: str) -> int:
    """Write ``text`` to stdout; a reader that stops early (``| head``) is no error."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command; errors end in one line and the exit status (``fastst.cli.run_cli``)."""
    return run_cli(_main, argv, prog="python -m fastst.train")


def _main(argv: Sequence[str]) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        config = load_config(args.preset, args.overrides)
        stages = select_stages(config, args.stages)
    except ConfigError as error:
        parser.error(str(error))
    if args.json and not args.dry_run:
        parser.error("--json goes with --dry-run")
    if args.print_config:
        return _print(config_yaml(config))
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
        logs = [out_dir / "tensorboard", *out_dir.glob("seed*/tensorboard")]
        hint = f"; TensorBoard: tensorboard --logdir {out_dir}" if any(
            path.is_dir() for path in logs) else ""
        print(f"summary: {out_dir / SUMMARY_NAME}{hint}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
