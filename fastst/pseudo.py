"""The command line of the pseudo-label passes: label a preset's target train set with a
checkpoint, as a self-training stage of it does (docs/formats.md §3.1, docs/recipes.md §4-§6).

    python -m fastst.pseudo --checkpoint PATH --preset NAME --out DIR [--stage round1] \
        [key=value ...]

writes DIR/labels/<image stem>_pseudo_label.png for every target train image and
DIR/manifest.json with the stage's own pass (``label_pass`` of its Stage class: the IAS or the
class-balanced pass of fastst.methods.labelling), and prints the thresholds and densities of the
classes. Under ``torchrun`` the ranks share the pass. Exit status: 0, 1 if a threshold is not
finite, 2 on bad arguments or an unreadable checkpoint, 3 when a ``runtime.stop_after_*`` hook
stopped the pass.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from fastst import distributed
from fastst.config import ConfigError, load_config
from fastst.methods import METHOD_NAMES, stage_class
from fastst.methods.context import RunContext, StopRequested, resolve_device
from fastst.methods.labelling import LABEL_DIR
from fastst.models import load_model

__all__ = ["main", "LABELLING_METHODS"]

# The stage methods whose rounds make pseudo labels (their Stage classes have ``label_pass``).
LABELLING_METHODS = tuple(method for method in METHOD_NAMES
                          if hasattr(stage_class(method), "label_pass"))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fastst.pseudo",
        description="Pseudo labels for the target train set of a preset, from a checkpoint, as a "
                    "self-training stage of it makes them (IAS, constant or class-balanced "
                    "selectors of IAST rounds; CBST/CRST rounds; TPLD phases with voting).")
    parser.add_argument("--checkpoint", required=True, help="fastst checkpoint (.pt) to label with")
    parser.add_argument("--preset", required=True, help="preset naming the target data set and "
                        "the pseudo-label settings (see python -m fastst.train --help)")
    parser.add_argument("--out", required=True, help="output directory (labels/, manifest.json)")
    parser.add_argument("--stage", default=None, help="the self-training stage whose settings to "
                        "use (default: the first one of the pipeline)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="configuration overrides, as for python -m fastst.train")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        config = load_config(args.preset, args.overrides)
    except ConfigError as error:
        parser.error(str(error))
    rounds = [name for name in config["pipeline"]
              if config["stages"][name]["method"] in LABELLING_METHODS]
    stage = args.stage or (rounds[0] if rounds else None)
    if stage not in rounds:
        parser.error(f"--stage must name a self-training stage of preset {args.preset!r}: "
                     f"{', '.join(rounds) or 'it has none'}; got {stage!r}")
    try:
        device = resolve_device(config["runtime"]["device"])
        model = load_model(args.checkpoint, map_location="cpu")
    except (FileNotFoundError, RuntimeError, ValueError, TypeError) as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
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
