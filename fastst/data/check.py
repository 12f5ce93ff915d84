"""Validate a data set's files before training: pair every image with its label, read every
label and report ids outside the data set's id space, and report files that cannot be read.

`check_dataset(...)` returns a `CheckReport`; `python -m fastst.data check` prints its summary
and exits 1 if it found any fault. Labels whose size differs from their image's are reported as
warnings (the loaders rescale them), not faults. `dataset_fingerprint(...)` summarises the file
list (names, sizes, mtimes) without reading any file, so that a check that passed need not be
repeated while the files stay the same (`python -m fastst.train` does this before training)."""
from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
from PIL import Image

from .cityscapes import CityscapesLayout
from .gta5 import GTA5Layout
from .io import list_path, read_image, read_label
from .synthia import SynthiaLayout

LAYOUTS = {"gta5": GTA5Layout, "synthia": SynthiaLayout, "cityscapes": CityscapesLayout}
# Every data set `python -m fastst.data check` takes: the layouts, and the generated synthetic
# trees (fastst.data.check_synthetic: Cityscapes-layout trees with a manifest, one per domain).
CHECKABLE = (*LAYOUTS, "synthetic")
# The splits checked when none is given.
DEFAULT_SPLITS = {"gta5": ("all",), "synthia": ("all",), "cityscapes": ("train", "val")}


@dataclass
class UnknownId:
    """An id found in label files that is not in the data set's id space."""
    pixels: int = 0
    files: int = 0
    example: Optional[Path] = None


@dataclass
class CheckReport:
    """What `check_dataset` found. Faults: `errors` (layout-level: missing root, no images, bad
    list file), `images_without_label`, `labels_without_image`, `unknown_ids` (id -> UnknownId)
    and `unreadable` ((path, reason)); `size_mismatches` ((image, label, image (H,W),
    label (H,W))) are warnings."""
    dataset: str
    root: Path
    splits: List[str]
    num_images: int = 0
    num_labels: int = 0
    errors: List[str] = field(default_factory=list)
    images_without_label: List[Path] = field(default_factory=list)
    labels_without_image: List[Path] = field(default_factory=list)
    unknown_ids: Dict[int, UnknownId] = field(default_factory=dict)
    unreadable: List[Tuple[Path, str]] = field(default_factory=list)
    size_mismatches: List[Tuple[Path, Path, Tuple[int, int], Tuple[int, int]]] = field(default_factory=list)
    unlabelled_splits: List[str] = field(default_factory=list)

    @property
    def num_faults(self) -> int:
        return (len(self.errors) + len(self.images_without_label) + len(self.labels_without_image)
                + len(self.unknown_ids) + len(self.unreadable))

    @property
    def ok(self) -> bool:
        return self.num_faults == 0

    def summary(self, max_listed: int = 20) -> str:
        """Human-readable report; lists at most `max_listed` paths per kind of fault."""
        lines = [f"{self.dataset} at {self.root} (split {', '.join(self.splits)}): "
                 f"{self.num_images} images, {self.num_labels} labels"]

        def listing(title, items):
            if not items:
                return
            lines.append(f"  {title}: {len(items)}")
            lines.extend(f"    {item}" for item in items[:max_listed])
            if len(items) > max_listed:
                lines.append(f"    ... and {len(items) - max_listed} more")

        listing("errors", self.errors)
        listing("images without a label", self.images_without_label)
        listing("labels without an image", self.labels_without_image)
        listing("unreadable files", [f"{path}: {reason}" for path, reason in self.unreadable])
        listing("ids outside the id space", [
            f"id {label_id}: {u.pixels} pixel(s) in {u.files} file(s), e.g. {u.example}"
            for label_id, u in sorted(self.unknown_ids.items())])
        listing("warning: label size differs from the image's (the loaders rescale the label)", [
            f"{label} {label_size[0]}x{label_size[1]} vs {image} {image_size[0]}x{image_size[1]}"
            for image, label, image_size, label_size in self.size_mismatches])
        for split in self.unlabelled_splits:
            lines.append(f"  note: split {split} has no labels (its items get all-255 labels)")
        lines.append("OK: no faults" if self.ok else f"FAULTS: {self.num_faults}")
        return "\n".join(lines)


def _image_size(path: Path, decode: bool) -> Tuple[int, int]:
    """(H, W) of the image at `path`; checks chunk integrity (or decodes it fully with `decode`)."""
    if decode:
        return tuple(read_image(path).shape[-2:])
    try:
        with Image.open(path) as im:
            width, height = im.size
            im.verify()
    except Exception as exc:  # Pillow raises many types for damaged files; report them all
        raise OSError(str(exc) or type(exc).__name__) from exc
    return height, width


def _reason(exc: BaseException) -> str:
    """Why a file could not be read, without the path (the report prints it beside)."""
    return str(exc.__cause__ or exc)


def _inspect(layout, image: Path, label: Optional[Path], decode_images: bool):
    """(image size or None, label size or None, {id: pixels} or None, [(path, reason)])."""
    failures, image_size, label_size, counts = [], None, None, None
    try:
        image_size = _image_size(image, decode_images)
    except OSError as exc:
        failures.append((image, _reason(exc)))
    if label is not None:
        try:
            values = read_label(label)
        except (OSError, ValueError) as exc:
            failures.append((label, _reason(exc)))
        else:
            label_size = values.shape
            if values.dtype in (np.uint8, np.uint16):
                bins = np.bincount(values.ravel(), minlength=1)
                counts = {int(i): int(bins[i]) for i in np.flatnonzero(bins)}
            else:
                ids, pixels = np.unique(values, return_counts=True)
                counts = dict(zip(ids.tolist(), pixels.tolist()))
            valid = layout.valid_ids(label)
            counts = {i: n for i, n in counts.items() if i not in valid}
    return image_size, label_size, counts, failures


def _layout_and_splits(name: str, root, split: Optional[str]):
    if name not in LAYOUTS:
        raise ValueError(f"unknown data set {name!r}; valid names: {', '.join(LAYOUTS)}")
    layout = LAYOUTS[name](root)
    splits = list(DEFAULT_SPLITS[name] if split is None else (split,))
    for s in splits:
        layout.check_split(s)
    return layout, splits


def dataset_fingerprint(name: str, root, split: Optional[str] = None, *, list_file=None,
                        labels: bool = True) -> Dict[str, object]:
    """{"digest": hex str, "num_images": int (of the split(s), before any list file)} of the
    files `check_dataset` with the same arguments would read: a SHA-256 over the path, size and
    modification time of every image (and, with `labels`, label file) and of the list file. Only
    lists directories and stats files, so it is cheap next to reading them. Raises ValueError
    for an unknown name or split (the synthetic trees: fastst.data.check_synthetic)."""
    layout, splits = _layout_and_splits(name, root, split)
    digest = hashlib.sha256(f"{name}|{layout.root}|{','.join(splits)}|{labels}".encode())
    num_images = 0

    def add(path: Path) -> None:
        try:
            stat = path.stat()
            entry = f"{path}|{stat.st_size}|{stat.st_mtime_ns}\n"
        except OSError:
            entry = f"{path}|missing\n"
        digest.update(entry.encode())

    if list_file is not None:
        add(list_path(list_file))
    if layout.root.is_dir():
        for s in splits:
            pairs, orphans = layout.pairs(s)
            num_images += len(pairs)
            for image, label in pairs:
                add(image)
                if labels and label is not None:
                    add(label)
            if labels:
                for orphan in orphans:
                    add(orphan)
    else:
        digest.update(b"no root")
    return {"digest": digest.hexdigest(), "num_images": num_images}


def check_dataset(name: str, root, split: Optional[str] = None, *, list_file=None,
                  decode_images: bool = False, workers: Optional[int] = None,
                  labels: bool = True) -> CheckReport:
    """Check the `name` data set ("gta5", "synthia" or "cityscapes") under `root`, for `split`
    (default: GTA5/SYNTHIA "all", Cityscapes "train" and "val"), restricted to `list_file` if
    given (the generated synthetic trees: fastst.data.check_synthetic.check_synthetic). Every label is read in full; images are checked for integrity (chunk CRCs, size) or,
    with `decode_images`, decoded in full. `labels=False` checks the images only (a set used
    unlabelled, such as the target train set: its label files are neither paired nor read).
    `workers` threads read files (default: CPU count, 8 at most). Raises ValueError for an
    unknown name or split."""
    layout, splits = _layout_and_splits(name, root, split)
    report = CheckReport(dataset=layout.name, root=layout.root, splits=splits)
    if not layout.root.is_dir():
        report.errors.append(f"root {layout.root} does not exist: expected {layout.describe(splits[0])}")
        return report
    pairs = []
    for s in splits:
        split_pairs, orphans = layout.pairs(s)
        if list_file is not None and split_pairs:
            try:
                split_pairs = layout.select_listed(split_pairs, list_path(list_file))
            except (OSError, ValueError) as exc:
                report.errors.append(str(exc))
        if not split_pairs:
            report.errors.append(f"no images: expected {layout.describe(s)}")
        if not labels:
            split_pairs = [(image, None) for image, _ in split_pairs]
        elif not layout.has_labels(s):
            report.unlabelled_splits.append(s)
            split_pairs = [(image, None) for image, _ in split_pairs]
        else:
            report.images_without_label.extend(image for image, label in split_pairs if label is None)
            report.labels_without_image.extend(orphans)
        pairs.extend(split_pairs)
    report.num_images = len(pairs)
    report.num_labels = sum(label is not None for _, label in pairs)
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(lambda pair: _inspect(layout, pair[0], pair[1], decode_images), pairs)
        for (image, label), (image_size, label_size, unknown, failures) in zip(pairs, results):
            report.unreadable.extend(failures)
            if image_size is not None and label_size is not None and tuple(image_size) != tuple(label_size):
                report.size_mismatches.append((image, label, tuple(image_size), tuple(label_size)))
            for label_id, pixels in (unknown or {}).items():
                entry = report.unknown_ids.setdefault(label_id, UnknownId(example=label))
                entry.pixels += pixels
                entry.files += 1
    return report
