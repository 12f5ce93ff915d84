"""Where a demo round's pseudo labels are wrong: the share of selected pixels whose label differs
from the target ground truth, how many of those lie near a class boundary, and which labelled
classes carry the errors (docs/demo.md §2).

    python bench/demo_label_errors.py runs/lr1/seed0/round1 runs/lr1/seed1/round1

A round directory holds ``pseudo/labels/<image stem>_pseudo_label.png`` (train ids, 255 =
not selected); the ground truth is read from ``--target-root`` (default data/synthetic/target).
"""
import argparse
from pathlib import Path

import numpy as np
import torch

from fastst.data.ids import IGNORE_INDEX, NUM_CLASSES, CLASS_NAMES
from fastst.data.io import read_label
from fastst.data.pseudo_label import LABEL_SUFFIX

from demo_label_oracle import ground_truth_index, read_truth


def boundary_band(truth, radius):
    """bool (H, W): pixels within ``radius`` pixels (Chebyshev) of a change of ``truth``'s class."""
    edges = np.zeros(truth.shape, dtype=bool)
    across = truth[:, 1:] != truth[:, :-1]            # between horizontal neighbours
    down = truth[1:, :] != truth[:-1, :]              # between vertical neighbours
    edges[:, 1:] |= across
    edges[:, :-1] |= across
    edges[1:, :] |= down
    edges[:-1, :] |= down
    if radius == 0:
        return edges
    grown = torch.nn.functional.max_pool2d(torch.from_numpy(edges).float()[None, None],
                                           2 * radius + 1, stride=1, padding=radius)
    return grown[0, 0].numpy() > 0


def label_errors(pairs, radius=4):
    """``pairs``: iterable of (pseudo uint8 (H, W), truth uint8 (H, W) train ids) -> dict with
    ``selected`` (pixels), ``wrong`` (share of selected pixels whose truth is a class and differs),
    ``near_boundary`` (share of the wrong ones within ``radius`` pixels of a class boundary) and
    ``by_class`` (float64 (NUM_CLASSES,): share of the wrong ones per *labelled* class)."""
    selected = wrong = near = 0
    by_class = np.zeros(NUM_CLASSES, dtype=np.float64)
    for pseudo, truth in pairs:
        chosen = pseudo != IGNORE_INDEX
        mistaken = chosen & (truth != IGNORE_INDEX) & (pseudo != truth)
        selected += int(chosen.sum())
        wrong += int(mistaken.sum())
        near += int((mistaken & boundary_band(truth, radius)).sum())
        np.add.at(by_class, pseudo[mistaken].astype(np.int64), 1)
    return {"selected": selected, "wrong": wrong / max(selected, 1),
            "near_boundary": near / max(wrong, 1), "by_class": by_class / max(wrong, 1)}


def round_pairs(round_dir, index):
    """(pseudo, truth) of every pseudo label of ``round_dir`` (``index``: ground_truth_index)."""
    paths = sorted((Path(round_dir) / "pseudo" / "labels").glob(f"*{LABEL_SUFFIX}"))
    if not paths:
        raise FileNotFoundError(f"no *{LABEL_SUFFIX} under {round_dir}/pseudo/labels")
    for path in paths:
        yield read_label(path), read_truth(index[path.name[:-len(LABEL_SUFFIX)]])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rounds", nargs="+", help="round directories (RUN[/seedS]/roundK)")
    parser.add_argument("--target-root", default="data/synthetic/target")
    parser.add_argument("--radius", type=int, default=4, help="boundary band, pixels")
    args = parser.parse_args(argv)
    index = ground_truth_index(args.target_root)
    for round_dir in args.rounds:
        errors = label_errors(round_pairs(round_dir, index), args.radius)
        top = np.argsort(errors["by_class"])[::-1][:4]
        classes = ", ".join(f"{CLASS_NAMES[c]} {100 * errors['by_class'][c]:.0f} %"
                            for c in top if errors["by_class"][c] > 0)
        print(f"{round_dir}: {errors['selected']} selected pixels, {100 * errors['wrong']:.1f} % "
              f"wrong, {100 * errors['near_boundary']:.0f} % of those within {args.radius} px of "
              f"a boundary; wrong labels by class: {classes}")


if __name__ == "__main__":
    main()
