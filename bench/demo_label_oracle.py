"""A control for the demo's self-training rounds: the same pipeline with each round's pseudo
labels replaced by the target ground truth, either at the pixels the selector labelled
(``--mode selected``: right labels, the selector's choice of pixels) or everywhere
(``--mode full``). Comparing with the real rounds separates what the selector's *choice* of pixels
is worth from what its *wrong labels* cost (docs/demo.md §2).

    python bench/demo_label_oracle.py --mode selected -- --preset demo --out runs/oracle_sel \\
        seeds=3 runtime.reuse_from=runs/demo3

Everything after ``--`` goes to ``python -m fastst.train``. The ground truth is read from
``--target-root`` (default data/synthetic/target, the demo's target domain; its train split,
paired with the images as the Cityscapes loader pairs them). The selector, its thresholds and the model that
labels are the real ones; what is written and trained on is the oracle's, so the summary's
labelled share and P-mIoU describe the oracle labels (P-mIoU 100). Self-training stages are never
reused from ``runtime.reuse_from``. A diagnostic, not a method: never report a result that used
the target domain's ground truth.
"""
import argparse
import sys

import numpy as np

import fastst.methods.labelling.base as labelling_base
import fastst.pipeline as pipeline
from fastst.data.cityscapes import CityscapesLayout
from fastst.data.ids import IGNORE_INDEX
from fastst.data.io import map_label_ids, read_label
from fastst.pseudo import LABELLING_METHODS
from fastst.train import main as train_main

MODES = ("selected", "full")


def oracle_labels(pseudo, truth, mode):
    """pseudo: uint8 (H, W) pseudo label (255 = not selected); truth: uint8 (H, W) ground-truth
    train ids -> uint8 (H, W): ``truth`` where ``pseudo`` is selected (``selected``) or everywhere
    (``full``)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if pseudo.shape != truth.shape:
        raise ValueError(f"pseudo label {pseudo.shape} and ground truth {truth.shape} differ in "
                         "size; the demo writes pseudo labels at the image size (pseudo_size)")
    if mode == "full":
        return truth.astype(np.uint8)
    return np.where(pseudo == IGNORE_INDEX, IGNORE_INDEX, truth).astype(np.uint8)


def ground_truth_index(target_root):
    """{image stem (``<base>_leftImg8bit``): (label file, id table)} of the target domain's train
    split under ``target_root`` (a Cityscapes layout; FileNotFoundError naming what is missing)."""
    return {image.stem: (label, table)
            for image, label, table in CityscapesLayout(target_root).samples("train")}


def read_truth(entry):
    """uint8 (H, W) train ids of a ``ground_truth_index`` entry."""
    label, table = entry
    return map_label_ids(read_label(label), table, label).numpy()


def install(mode, target_root):
    """Route every pseudo-label write of the labelling passes through ``oracle_labels``, and
    never reuse a self-training stage from ``runtime.reuse_from`` (its recipe matches, its
    labels were not the oracle's); source-only and warm-up stages are still reused."""
    index = ground_truth_index(target_root)
    write = labelling_base.save_pseudo_labels

    def save_oracle_labels(out_dir, names, labels, *args, **kwargs):
        names = list(names)
        labels = np.stack([oracle_labels(label, read_truth(index[name]), mode)
                           for name, label in zip(names, labels.detach().cpu().numpy())])
        return write(out_dir, names, labels, *args, **kwargs)

    reuse = pipeline.reuse_stage

    def reuse_unless_labelled(config, run_dir, seed, stage, *args, **kwargs):
        if config["stages"][stage]["method"] in LABELLING_METHODS:
            return False
        return reuse(config, run_dir, seed, stage, *args, **kwargs)

    labelling_base.save_pseudo_labels = save_oracle_labels
    pipeline.reuse_stage = reuse_unless_labelled


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=MODES, required=True)
    parser.add_argument("--target-root", default="data/synthetic/target")
    args = parser.parse_args(argv[:split])
    install(args.mode, args.target_root)
    return train_main(argv[split + 1:])


if __name__ == "__main__":
    sys.exit(main())
