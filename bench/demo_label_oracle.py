"""A control for the demo's self-training rounds: the same pipeline with each round's pseudo
labels replaced by the target ground truth, either at the pixels the selector labelled
(``--mode selected``: right labels, the selector's choice of pixels) or everywhere
(``--mode full``). Comparing with the real rounds separates what the selector's *choice* of pixels
is worth from what its *wrong labels* cost (docs/demo.md §2).

    python bench/demo_label_oracle.py --mode selected -- --preset demo --out runs/oracle_sel \\
        seeds=3 runtime.reuse_from=runs/demo3

Everything after ``--`` goes to ``python -m fastst.train``. The ground truth is read from
``--target-root`` (default data/synthetic/target, the demo's target domain), one
``<stem>_gtFine_labelIds.png`` per image stem. The selector, its thresholds and the model that
labels are the real ones; what is written and trained on is the oracle's, so the summary's
labelled share and P-mIoU describe the oracle labels (P-mIoU 100). Self-training stages are never
reused from ``runtime.reuse_from``. A diagnostic, not a method: never report a result that used
the target domain's ground truth.
"""
import argparse
import sys
from pathlib import Path

import numpy as np

import fastst.methods.labelling.base as labelling_base
import fastst.pipeline as pipeline
from fastst.data.ids import CITYSCAPES_ID_TO_TRAIN_ID, IGNORE_INDEX
from fastst.data.io import read_label
from fastst.train import main as train_main

MODES = ("selected", "full")
SELF_TRAINING_METHODS = ("iast", "cbst", "tpld_phase1", "tpld_phase2")


def label_id_to_train_id_table():
    """uint8 (256,) lookup: Cityscapes label id -> train id, everything else -> 255."""
    table = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for label_id, train_id in CITYSCAPES_ID_TO_TRAIN_ID.items():
        table[label_id] = train_id
    return table


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
    """{image stem: ground-truth path} of every ``*_gtFine_labelIds.png`` under ``target_root``."""
    paths = sorted(Path(target_root).glob("gtFine/*/*/*_gtFine_labelIds.png"))
    if not paths:
        raise FileNotFoundError(f"no *_gtFine_labelIds.png under {target_root}/gtFine; generate "
                                "the demo data first (make demo)")
    return {p.name[:-len("_gtFine_labelIds.png")]: p for p in paths}


def install(mode, target_root):
    """Route every pseudo-label write of the labelling passes through ``oracle_labels``, and
    never reuse a self-training stage from ``runtime.reuse_from`` (its recipe matches, its
    labels were not the oracle's); source-only and warm-up stages are still reused."""
    index, table = ground_truth_index(target_root), label_id_to_train_id_table()
    write = labelling_base.save_pseudo_labels

    def save_oracle_labels(out_dir, names, labels, *args, **kwargs):
        names = list(names)
        labels = np.stack([
            oracle_labels(np.asarray(label), table[read_label(index[name.replace("_leftImg8bit", "")])],
                          mode)
            for name, label in zip(names, labels.detach().cpu().numpy())])
        return write(out_dir, names, labels, *args, **kwargs)

    reuse = pipeline.reuse_stage

    def reuse_unless_labelled(config, run_dir, seed, stage, *args, **kwargs):
        if config["stages"][stage]["method"] in SELF_TRAINING_METHODS:
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
