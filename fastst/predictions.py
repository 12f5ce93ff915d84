"""Predictions as Cityscapes benchmark files, and scoring such files (README "Evaluation").

For the image `<city>/<base>_leftImg8bit.png` of a Cityscapes-layout data set,
`save_prediction` writes

    <out>/labelIds/<city>/<base>_labelIds.png   8-bit Cityscapes label ids (7 road, 8 sidewalk, ...)
    <out>/color/<city>/<base>_color.png         palette PNG in the Cityscapes colours

`<out>/labelIds` is what the benchmark server takes (zipped) and what cityscapesScripts'
evalPixelLevelSemanticLabeling reads as its results folder (CITYSCAPES_RESULTS): it looks for one
`<city>_<seq>_<frame>*.png` per ground-truth image anywhere below it, so the colour files live in
a folder of their own. Classes a model does not predict, and anything outside its classes, are
written as label id 0 ("unlabeled").

`score_predictions` scores such a folder (or any with one `<base>*.png` of label ids per image)
against the data set's ground truth, as the official script does: a label id outside the scored
classes at a labelled pixel is a miss of the true class.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np
import torch

from .data.ids import (CITYSCAPES_ID_TO_TRAIN_ID, IGNORE_INDEX, NUM_CLASSES, PALETTE,
                       lookup_table)
from .data.io import map_label_ids, read_label, write_png_atomic
from .metrics import ConfusionMatrix

__all__ = ["LABEL_IDS_DIR", "COLOUR_DIR", "prediction_paths", "save_prediction",
           "label_id_table", "train_id_table", "dataset_classes", "image_cities",
           "score_predictions"]

LABEL_IDS_DIR = "labelIds"
COLOUR_DIR = "color"
IMAGE_SUFFIX = "_leftImg8bit"
UNLABELED_ID = 0                        # Cityscapes "unlabeled"
NUM_LABEL_IDS = 34                      # Cityscapes label ids are 0..33
ALL_CLASSES = tuple(range(NUM_CLASSES))


def label_id_table(classes: Sequence[int] = ALL_CLASSES) -> np.ndarray:
    """uint8 (256,) table: train id k -> the Cityscapes label id of `classes[k]` (the Cityscapes
    train id of class k, e.g. `range(19)`); every other value (255 included) -> 0, "unlabeled"."""
    to_label_id = {train_id: label_id for label_id, train_id in CITYSCAPES_ID_TO_TRAIN_ID.items()}
    table = np.full(256, UNLABELED_ID, dtype=np.uint8)
    table[:len(classes)] = [to_label_id[int(c)] for c in classes]
    return table


def train_id_table(classes: Sequence[int] = ALL_CLASSES) -> np.ndarray:
    """uint8 (256,) table: Cityscapes label id -> train id k of the class `classes[k]`; the label
    ids of other classes (and non-ids) -> 255. The inverse of `label_id_table` on 0..C-1."""
    position = {int(c): k for k, c in enumerate(classes)}
    return lookup_table({label_id: position[train_id]
                         for label_id, train_id in CITYSCAPES_ID_TO_TRAIN_ID.items()
                         if train_id in position}, size=256)


def _base(name: str) -> str:
    return name[:-len(IMAGE_SUFFIX)] if name.endswith(IMAGE_SUFFIX) else name


def prediction_paths(out_dir, city: str, name: str):
    """(labelIds path, colour path) of the image with stem `name` (e.g.
    "frankfurt_000000_000294_leftImg8bit") in `city`."""
    out_dir, base = Path(out_dir), _base(name)
    return (out_dir / LABEL_IDS_DIR / city / f"{base}_labelIds.png",
            out_dir / COLOUR_DIR / city / f"{base}_color.png")


def save_prediction(out_dir, city: str, name: str, pred, classes: Sequence[int] = ALL_CLASSES):
    """Write the train-id map `pred` (integer (H, W) tensor or array, any device) of image `name`
    in `city` as its labelIds and colour PNGs (`prediction_paths`), each atomically. `classes`:
    the Cityscapes train ids of train ids 0..C-1. Returns the labelIds path."""
    if isinstance(pred, torch.Tensor):
        pred = pred.detach().cpu().numpy()
    pred = np.asarray(pred)
    if pred.ndim != 2 or pred.dtype.kind not in "iu":
        raise ValueError(f"pred must be an integer (H, W) map of train ids, got {pred.dtype} "
                         f"{pred.shape}")
    train_ids = np.where((pred >= 0) & (pred < len(classes)), pred, IGNORE_INDEX).astype(np.uint8)
    colours = [value for c in classes for value in PALETTE[int(c)]]
    palette = bytes(colours + [0] * (768 - len(colours)))
    label_path, colour_path = prediction_paths(out_dir, city, name)
    write_png_atomic(label_path, label_id_table(classes)[train_ids])
    write_png_atomic(colour_path, train_ids, palette=palette)
    return label_path


def dataset_classes(dataset) -> tuple:
    """The Cityscapes train ids of a Cityscapes-layout data set's train ids 0..C-1: those of its
    class set when it has one, else all 19."""
    class_set = getattr(getattr(dataset, "layout", None), "class_set", None)
    return tuple(class_set.classes) if class_set is not None else ALL_CLASSES


def image_cities(dataset) -> Dict[str, str]:
    """{image stem: city} of a Cityscapes-layout data set (`fastst.data.Cityscapes`, also what
    the synthetic domains are read with). ValueError for any other data set."""
    _check_cityscapes(dataset)
    return {image.stem: image.parent.name for image, _, _ in dataset.samples}


def _check_cityscapes(dataset) -> None:
    from .data.cityscapes import Cityscapes

    if not isinstance(dataset, Cityscapes):
        raise ValueError(f"Cityscapes benchmark files need a Cityscapes-layout data set "
                         f"(--dataset cityscapes or synthetic), got {type(dataset).__name__}")


def _index_predictions(root: Path) -> Dict[str, List[Path]]:
    """Every PNG below `root` by its first three '_'-separated name fields (<city>_<seq>_<frame>),
    the part cityscapesScripts matches a prediction to its ground truth by."""
    found: Dict[str, List[Path]] = {}
    for folder, _, files in os.walk(root):
        for file in files:
            if file.lower().endswith(".png"):
                key = "_".join(file[:-4].split("_")[:3])
                found.setdefault(key, []).append(Path(folder) / file)
    return found


def score_predictions(dataset, predictions_dir, num_classes=None) -> ConfusionMatrix:
    """Score the label-id PNGs below `predictions_dir` (one `<base>*.png` per image, e.g. the
    `labelIds` folder `save_prediction` writes) against the labels of `dataset`, a
    Cityscapes-layout data set without a fixed resize. Label ids are mapped to the data set's
    train ids; ids of classes it does not score (0 "unlabeled", 9 "parking", ...) count as misses
    (`ConfusionMatrix.missed`). Returns the filled ConfusionMatrix (CPU) with `num_classes`
    (default: the data set's). Errors name the file: a missing or doubled prediction, a size
    other than the label's, a value that is no Cityscapes label id."""
    _check_cityscapes(dataset)
    classes = dataset_classes(dataset)
    num_classes = len(classes) if num_classes is None else num_classes
    if num_classes != len(classes):
        raise ValueError(f"num_classes={num_classes} but the data set has {len(classes)} classes")
    if getattr(dataset, "resize", None) is not None:
        raise ValueError("score predictions against a data set without a fixed resize (the "
                         "benchmark files are at the label's full size)")
    root = Path(predictions_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"predictions folder {root} does not exist")
    found = _index_predictions(root)
    table = torch.from_numpy(train_id_table(classes))
    confusion = ConfusionMatrix(num_classes)
    for index in range(len(dataset)):
        image_path, label_path, label_table = dataset.samples[index]
        base = _base(image_path.stem)
        if label_path is None:
            raise ValueError(f"{image_path} has no ground truth; score a labelled split")
        paths = found.get(base, [])
        if len(paths) != 1:
            raise FileNotFoundError(
                f"expected one prediction {base}*.png below {root}, found "
                f"{', '.join(map(str, paths)) or 'none'} (the labelIds folder of "
                f"--save-predictions holds one per image; its colour files are beside it)")
        label = map_label_ids(read_label(label_path), label_table, label_path)
        pred = read_label(paths[0])
        if tuple(pred.shape) != tuple(label.shape):
            raise ValueError(f"prediction {paths[0]} is {pred.shape[1]}x{pred.shape[0]}, the label "
                             f"{label_path} {label.shape[1]}x{label.shape[0]}")
        if int(pred.max(initial=0)) >= NUM_LABEL_IDS:
            raise ValueError(f"prediction {paths[0]} holds {int(pred.max())}, not a Cityscapes "
                             f"label id (0..{NUM_LABEL_IDS - 1}); write label ids, not train ids")
        confusion.update(table[torch.from_numpy(pred.astype(np.int64))], label)
    return confusion
