"""The data set base classes: ``SegmentationDataset`` (decoded files -> training items: fixed
resize, seeded transform, normalisation), ``Layout`` (where a data set keeps its images and
labels, how they pair, which ids the labels hold) and ``FileDataset`` (a data set read through a
Layout). Files are read with ``fastst.data.io``."""
from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Callable, Hashable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .ids import IGNORE_INDEX, get_class_set, lookup_table
from .io import NO_DATA_HINT, SHIPPED_LISTS, list_path, map_label_ids, read_image, read_label
from .transforms import check_size, normalize, resize_image, resize_label

__all__ = ["Transform", "item_seed", "SegmentationDataset", "Layout", "FileDataset"]

Transform = Callable[[torch.Tensor, torch.Tensor, torch.Generator], Tuple[torch.Tensor, torch.Tensor]]


def item_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for item `index` at `epoch`: the same in every process and every run."""
    digest = hashlib.blake2b(f"{seed},{epoch},{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class SegmentationDataset(torch.utils.data.Dataset):
    """Base of every data set: subclasses implement `__len__` and `load_raw(i)`; this class adds
    the fixed resize, the seeded transform and normalisation.

    `ds[i]` -> {"image": float32 (3,H,W) ImageNet-normalised, "label": int64 (H,W) train ids with
    255 = ignore, "name": str (image file stem)}.
    `transform(image uint8 (3,H,W), label uint8 (H,W), generator) -> (image, label)` gets
    `torch.Generator().manual_seed(item_seed(seed, epoch, i))`, so item i at epoch e is the same
    in any DataLoader worker and after a resume. `set_epoch(e)` is seen by running workers too
    (the epoch lives in shared memory); call it before iterating over epoch e."""

    def __init__(self, *, transform: Optional[Transform] = None,
                 resize: Optional[Sequence[int]] = None, seed: int = 0):
        if transform is not None and not callable(transform):
            raise TypeError(f"transform must be callable (image, label, generator) -> (image, label), "
                            f"got {type(transform).__name__}")
        self.transform = transform
        self.resize = None if resize is None else check_size(resize, "resize")
        self.seed = int(seed)
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    def __len__(self) -> int:
        raise NotImplementedError

    def load_raw(self, index: int) -> Tuple[torch.Tensor, torch.Tensor, str]:
        """(image uint8 (3,H,W), label uint8 (H,W) train ids/255, name) before any resize."""
        raise NotImplementedError

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(int(epoch))

    def generator(self, index: int) -> torch.Generator:
        """The generator that item `index` gets at the current epoch."""
        return torch.Generator().manual_seed(item_seed(self.seed, self.epoch, index))

    def load_resized(self, index: int) -> Tuple[torch.Tensor, torch.Tensor, str]:
        """`load_raw(index)` with the data set's fixed `resize` applied (image bilinear with
        antialias, label nearest): uint8 image and label, before the transform."""
        image, label, name = self.load_raw(index)
        if self.resize is not None:
            image, label = resize_image(image, self.resize), resize_label(label, self.resize)
        return image, label, name

    def __getitem__(self, index: int) -> dict:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for a data set of {len(self)} items")
        index %= len(self)
        image, label, name = self.load_resized(index)
        if self.transform is not None:
            image, label = self.transform(image, label, self.generator(index))
        return {"image": normalize(image), "label": label.long(), "name": name}


@functools.lru_cache(maxsize=None)
def _cached_table(id_map_items: tuple) -> np.ndarray:
    table = lookup_table(dict(id_map_items), 65536)
    table.setflags(write=False)
    return table


class Layout:
    """Where a data set keeps its files. Subclasses say where images and labels are
    (`image_files`, `label_files`), how an image is matched with its label (`image_key`,
    `label_key`) and which ids a label file holds (`id_map`, `valid_ids`); this class pairs them,
    applies list files and raises the errors that say what layout was expected. `class_set`
    (a name or `ids.ClassSet`; None: "cityscapes19") decides the train ids the ids map to."""

    name = "data set"
    splits: Tuple[str, ...] = ()

    def __init__(self, root, class_set=None):
        self.root = Path(root).expanduser()
        self.class_set = get_class_set(class_set)

    def describe(self, split: str) -> str:
        """The expected layout in words, e.g. "<root>/images/*.png and <root>/labels/*.png"."""
        raise NotImplementedError

    def image_files(self, split: str) -> List[Path]:
        raise NotImplementedError

    def label_files(self, split: str) -> List[Path]:
        """The label file of every key present (one per key: the preferred one)."""
        raise NotImplementedError

    def image_key(self, image: Path) -> Hashable:
        return image.stem

    def label_key(self, label: Path) -> Hashable:
        return label.stem

    def list_keys(self, image: Path) -> Tuple[str, ...]:
        """The names by which a list-file line may refer to `image` (basename without extension)."""
        return (image.stem,)

    def has_labels(self, split: str) -> bool:
        """False where the split ships no labels at all (then items get all-255 labels)."""
        return True

    def id_map(self, label: Path) -> dict:
        """label id -> train id for the label file `label`."""
        raise NotImplementedError

    def valid_ids(self, label: Path) -> frozenset:
        """The ids that may appear in `label` (mapped ones and those that mean "ignore")."""
        raise NotImplementedError

    def table(self, label: Path) -> np.ndarray:
        """65536-entry uint8 id -> train id table for `label` (ids.lookup_table)."""
        return _cached_table(tuple(sorted(self.id_map(label).items())))

    def check_split(self, split: str) -> str:
        if split not in self.splits:
            raise ValueError(f"unknown {self.name} split {split!r}; valid splits: {', '.join(self.splits)}")
        return split

    def missing(self, split: str) -> FileNotFoundError:
        return FileNotFoundError(f"no {self.name} images found under {self.root}: expected "
                                 f"{self.describe(split)}; {NO_DATA_HINT}")

    def pairs(self, split: str) -> Tuple[List[Tuple[Path, Optional[Path]]], List[Path]]:
        """([(image, its label file or None)], [label files without an image]), images sorted."""
        images = self.image_files(split)
        labels = {self.label_key(p): p for p in self.label_files(split)}
        image_keys = {self.image_key(p) for p in images}
        orphans = [p for key, p in labels.items() if key not in image_keys]
        return [(p, labels.get(self.image_key(p))) for p in images], orphans

    def samples(self, split: str, *, list_file=None, labels: bool = True):
        """(image, label file or None, id table or None) for every image of `split` (in
        `list_file` order if given). Raises FileNotFoundError for a missing or empty root and for
        images without a label file (unless `labels` is False or the split has no labels)."""
        self.check_split(split)
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.name} root {self.root} does not exist: expected "
                                    f"{self.describe(split)}; {NO_DATA_HINT}")
        pairs, _ = self.pairs(split)
        if not pairs:
            raise self.missing(split)
        if list_file is not None:
            pairs = self.select_listed(pairs, list_path(list_file))
        if not labels or not self.has_labels(split):
            return [(image, None, None) for image, _ in pairs]
        unlabelled = [image for image, label in pairs if label is None]
        if unlabelled:
            raise FileNotFoundError(
                f"{len(unlabelled)} of {len(pairs)} {self.name} images have no label file, e.g. "
                f"{unlabelled[0]} (expected {self.describe(split)}); run `python -m fastst.data "
                f"check --dataset {self.name.lower()} --root {self.root} --split {split}` to list "
                f"them, or pass labels=False to use the images unlabelled")
        return [(image, label, self.table(label)) for image, label in pairs]

    def select_listed(self, pairs, list_file: Path):
        """The pairs named by `list_file`, one relative image path or stem a line, in its order."""
        if not list_file.is_file():
            raise FileNotFoundError(
                f"list file {list_file} not found (lists shipped with fastst, named without a "
                f"directory: {', '.join(sorted(p.name for p in SHIPPED_LISTS.glob('*.txt')))})")
        by_key = {}
        for pair in pairs:
            for key in self.list_keys(pair[0]):
                by_key.setdefault(key, pair)
        selected, unknown = [], []
        for line in list_file.read_text().splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            key = Path(line.split()[0]).name
            key = key[:-4] if key.lower().endswith(".png") else key
            if key in by_key:
                selected.append(by_key[key])
            else:
                unknown.append(line)
        if unknown:
            raise FileNotFoundError(f"{len(unknown)} entries of list file {list_file} match no "
                                    f"{self.name} image under {self.root}, e.g. {unknown[:3]}")
        if not selected:
            raise ValueError(f"list file {list_file} names no images")
        return selected


class FileDataset(SegmentationDataset):
    """Image files paired with label files (or unlabelled), ids mapped through lookup tables.
    Subclasses set `layout_class`; items are in sorted file order, or in the list file's order.

    root: the data set's directory; split: one of `layout_class.splits`; list_file: optional
    text file naming the images to use (one relative image path or stem a line, as the released
    IAST/AdaptSegNet lists); labels=False: every label is all 255 (an unlabelled target set);
    class_set: the classes labels are mapped to ("cityscapes19", the default, or "synthia16";
    see `ids.ClassSet`); transform, resize, seed: see `SegmentationDataset`."""

    layout_class = Layout

    def __init__(self, root, split: str, *, list_file=None, labels: bool = True,
                 transform: Optional[Transform] = None, resize: Optional[Sequence[int]] = None,
                 seed: int = 0, class_set=None):
        super().__init__(transform=transform, resize=resize, seed=seed)
        self.layout = self.layout_class(root, class_set)
        self.split = split
        self.samples = self.layout.samples(split, list_file=list_file, labels=labels)

    def __len__(self) -> int:
        return len(self.samples)

    def load_raw(self, index: int) -> Tuple[torch.Tensor, torch.Tensor, str]:
        image_path, label_path, table = self.samples[index]
        image = read_image(image_path)
        height, width = image.shape[-2:]
        if label_path is None:
            return image, torch.full((height, width), IGNORE_INDEX, dtype=torch.uint8), image_path.stem
        label = map_label_ids(read_label(label_path), table, label_path)
        if tuple(label.shape) != (height, width):
            # A few GTA5 frames ship a label of another size than the image; the released
            # pipelines crop both with the image's coordinates, we rescale the label instead.
            label = resize_label(label, (height, width))
        return image, label, image_path.stem
