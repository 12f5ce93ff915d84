"""The command line of the pseudo-label passes: label a preset's target train set with a
checkpoint, as a self-training stage of it does (docs/formats.md §3.1, docs/recipes.md §4-§6).

    python -m fastst.pseudo --checkpoint PATH --preset NAME --out DIR [--stage round1] \
        [key=value ...]
    python -m fastst.pseudo --run RUN --out DIR [--stage round2] [--checkpoint PATH] \
        [key=value ...]

writes DIR/labels/<image stem>_pseudo_label.png for every target train image and
DIR/manifest.json with the stage's own pass (``label_pass`` of its Stage class: the IAS or the
class-balanced pass of fastst.methods.labelling), and prints the thresholds and densities of the
classes. ``--run RUN`` takes the configuration a ``python -m fastst.train`` run saved
(RUN/config.yaml: its preset and overrides, ``fastst.run_dir``) instead of ``--preset`` and
overrides; ``--stage S`` then labels as round S of that run does, with the last checkpoint of
the stage before S, and without ``--stage`` the last finished stage's checkpoint labels with
the settings of the first self-training stage after it (else of the last one). The checkpoint
must be for the configuration's class count; the target data must exist (synthetic data is
never generated here: ``python -m fastst.data synth`` or ``fastst.train`` make it). Under
``torchrun`` the ranks share the pass. Exit status: 0, 1 if a threshold is not finite, 2 on bad
arguments, data or checkpoint, 3 when a ``runtime.stop_after_*`` hook stopped the pass
(``fastst.cli``; ``--debug`` shows tracebacks).
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from fastst import distributed
from fastst.checkpoint import check_num_classes, load_checkpoint
from fastst.cli import add_debug_option, check_output_dir, run_cli
from fastst.config import ConfigError, load_config
from fastst.data.synth import require_for_config
from fastst.methods import METHOD_NAMES, stage_class
from fastst.methods.context import RunContext, StopRequested, resolve_device
from fastst.methods.labelling import LABEL_DIR
from fastst.models import load_model
from fastst.run_dir import open_run

__all__ = ["main", "LABELLING_METHODS"]

# The stage methods whose rounds make pseudo labels (their Stage classes have ``label_pass``).
LABELLING_METHODS = tuple(method for method in METHOD_NAMES
                          if hasattr(stage_class(method), "label_pass"))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fastst.pseudo",
        description="Pseudo labels for the target train set of a preset, from a checkpoint, as "
                    "a\nself-training stage of it makes them (IAS, constant or class-balanced "
                    "selectors of\nIAST rounds; CBST/CRST rounds; TPLD phases with voting).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  python -m fastst.pseudo --run runs/demo --out labels/\n"
               "  python -m fastst.pseudo --checkpoint runs/iast_gta5/warmup/last.pt "
               "--preset iast_gta5 --out labels/\n"
               "  python -m fastst.pseudo --checkpoint CKPT --preset tpld_gta5 --stage phase1_1 "
               "--out voted/\n\n"
               "exit status: 0 done, 1 a threshold is not finite, 2 bad input (arguments, "
               "data,\ncheckpoint, output directory), 3 a runtime.stop_after_* hook fired")
    parser.add_argument("--checkpoint", default=None, metavar="PATH",
                        help="fastst checkpoint (.pt) to label with (required without --run; "
                             "with --run, default: the run's checkpoint, see --stage)")
    parser.add_argument("--preset", default=None, help="preset naming the target data set and "
                        "the pseudo-label settings (see python -m fastst.train --help)")
    parser.add_argument("--run", default=None, metavar="DIR",
                        help="the --out directory of a python -m fastst.train run: its saved "
                             "configuration (preset and overrides) replaces --preset, and its "
                             "checkpoints --checkpoint")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="output directory (labels/, manifest.json)")
    parser.add_argument("--stage", default=None, help="the self-training stage whose settings to "
                        "use (default: the first one of the pipeline; with --run, the first "
                        "one after the last finished stage)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="configuration overrides, as for python -m fastst.train")
    add_debug_option(parser)
    return parser


def _rounds(config) -> list:
    return [name for name in config["pipeline"]
            if config["stages"][name]["method"] in LABELLING_METHODS]


def _from_run(parser, args):
    """(config, stage, checkpoint path) of ``--run``: the round ``--stage`` labels with the
    last checkpoint of the stage before it; without ``--stage``, the last finished stage's
    checkpoint and the first self-training stage after it (else the last one)."""
    if args.preset is not None:
        parser.error("--run reads the preset and overrides from RUN/config.yaml; drop --preset "
                     "(key=value overrides still apply on top)")
    run = open_run(args.run, args.overrides)
    config, pipeline, rounds = run.config, list(run.config["pipeline"]), _rounds(run.config)
    stage = args.stage
    if stage is None:
        finished = run.finished()
        after = [name for name in rounds if not finished
                 or pipeline.index(name) > pipeline.index(finished[-1])]
        stage = after[0] if after else (rounds[-1] if rounds else None)
        checkpoint = args.checkpoint or (run.checkpoint() if finished else None)
    elif stage in rounds and pipeline.index(stage) > 0:
        checkpoint = args.checkpoint or run.checkpoint(pipeline[pipeline.index(stage) - 1])
    else:
        checkpoint = args.checkpoint
    if stage not in rounds:
        parser.error(f"--stage must name a self-training stage of the run in {args.run}: "
                     f"{', '.join(rounds) or 'it has none'}; got {stage!r}")
    if checkpoint is None:
        parser.error(f"{stage} is the run's first stage: no stage before it has a checkpoint to "
                     "label with; pass --checkpoint PATH")
    return config, stage, checkpoint


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command; errors end in one line and the exit status (``fastst.cli.run_cli``)."""
    return run_cli(_main, argv, prog="python -m fastst.pseudo")


def _main(argv: Sequence[str]) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.run is not None:
        config, stage, checkpoint = _from_run(parser, args)
    else:
        if args.preset is None or args.checkpoint is None:
            parser.error("give --preset NAME and --checkpoint PATH, or --run DIR (a "
                         "python -m fastst.train run)")
        try:
            config = load_config(args.preset, args.overrides)
        except ConfigError as error:
            parser.error(str(error))
        rounds = _rounds(config)
        stage, checkpoint = args.stage or (rounds[0] if rounds else None), args.checkpoint
        if stage not in rounds:
            parser.error(f"--stage must name a self-training stage of preset {args.preset!r}: "
                         f"{', '.join(rounds) or 'it has none'}; got {stage!r}")
    # Bad input is refused before any work: the device, the checkpoint (its class count
    # against the configuration's), the target data (never generated here), the output folder.
    device = resolve_device(config["runtime"]["device"])
    state = load_checkpoint(checkpoint, map_location="cpu")
    check_num_classes(state, config["num_classes"], source=f"--checkpoint {checkpoint}")
    model = load_model(state, source=str(checkpoint))
    require_for_config(config["data"], ("target",))
    check_output_dir(args.out)
    if config["runtime"]["threads"]:
        torch.set_num_threads(config["runtime"]["threads"])
    dctx = distributed.init_from_env(device)  # under torchrun: the ranks share the pass
    if dctx.is_distributed:
        device = dctx.device
    model.to(device, memory_format=torch.channels_last if device.type == "cuda"
             and config["runtime"]["channels_last"] else torch.contiguous_format)
    ctx = RunContext(config=config, run_dir=Path(args.out), seed=config["seed"], device=device)
    round_stage = stage_class(config["stages"][stage]["method"])(ctx, stage)
    try:
        round_stage.manifest = round_stage.label_pass(model, args.out)
        summary = round_stage.pseudo_summary()
    except StopRequested as stop:
        print(stop, file=sys.stderr)
        return 3
    finally:
        distributed.shutdown()
    if not dctx.is_main:
        return 0
    manifest = round_stage.manifest
    # IAS: the EMA thresholds theta; class-balanced selectors and rounds: their lambdas.
    thresholds = summary.get("theta") or summary["lambdas"]
    print(f"{manifest['settings']['num_images']} pseudo labels in {Path(args.out) / LABEL_DIR}; "
          f"{100 * manifest['labelled_fraction']:.1f}% of the pixels labelled")
    width = max(len(name) for name in manifest["class_names"]) + 2
    print(f"{'class':<{width}}{'threshold':>10}{'density %':>11}")
    for name, threshold, density in zip(manifest["class_names"], thresholds,
                                        manifest["density"]):
        print(f"{name:<{width}}{threshold:10.4f}{100 * density:11.2f}")
    return 0 if all(math.isfinite(t) for t in thresholds) else 1


if __name__ == "__main__":
    sys.exit(main())
