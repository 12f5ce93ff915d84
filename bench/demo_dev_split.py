"""Target mIoU of demo checkpoints on a *dev* split, for choosing demo settings without looking at
the val split the README reports.

The dev split is the synthetic target domain's val split generated with another seed (1; the demo
domains use seed 0), at the demo's size, under DIR/target (default runs/devdata):

    python bench/demo_dev_split.py runs/demo_tpld3 runs/demo_tpld3_crop [--stages phase2_2]

prints one line a checkpoint (RUN/seed<s>/<stage>/last.pt, or RUN/<stage>/last.pt) and the mean
over seeds per run and stage.
"""
import argparse
import statistics
from collections import defaultdict
from pathlib import Path

import torch

from fastst.models import load_model
from fastst.data import build_dataset
from fastst.data.synthetic import DEFAULT_HEIGHT, DEFAULT_WIDTH
from fastst.evaluate import evaluate

DEV_SEED = 1


def dev_split(root, num_val=100, height=DEFAULT_HEIGHT, width=DEFAULT_WIDTH):
    """The dev split: the target domain's val images of seed ``DEV_SEED`` (no train images)."""
    return build_dataset("synthetic", root, "val", domain="target",
                         synthetic={"seed": DEV_SEED, "num_train": 0, "num_val": num_val,
                                    "height": height, "width": width})


def last_checkpoints(runs, stages=None):
    """(run, stage, path) of every RUN/seed<s>/<stage>/last.pt (or RUN/<stage>/last.pt) of
    ``runs``, sorted, of the comma-separated ``stages`` only when given."""
    wanted = None if stages is None else set(stages.split(","))
    for run in runs:
        for checkpoint in sorted(Path(run).glob("**/last.pt")):
            if wanted is None or checkpoint.parent.name in wanted:
                yield run, checkpoint.parent.name, checkpoint


def dev_miou(model, dev):
    """Target mIoU (a float in [0, 1]) of ``model`` on the dev split ``dev``."""
    return evaluate(model, dev, batch_size=10, num_classes=model.model_config["num_classes"],
                    progress=False).miou()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run directories (fastst.train --out)")
    parser.add_argument("--stages", default=None, help="comma-separated stages (default: all)")
    parser.add_argument("--root", default="runs/devdata", help="where the dev split is written")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    dev = dev_split(args.root)
    means = defaultdict(list)
    for run, stage, checkpoint in last_checkpoints(args.runs, args.stages):
        miou = dev_miou(load_model(checkpoint), dev)
        means[(run, stage)].append(miou)
        print(f"{checkpoint}: {100 * miou:.2f}", flush=True)
    for (run, stage), values in means.items():
        print(f"{run} {stage}: mean {100 * statistics.fmean(values):.2f} over {len(values)}")


if __name__ == "__main__":
    main()
