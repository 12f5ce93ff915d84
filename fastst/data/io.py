"""Reading images and label maps from disk, writing PNGs atomically, and the data set base class
that turns decoded files into training items.

`read_image` gives uint8 (3,H,W) RGB tensors, `read_label` integer (H,W) arrays of label ids: the
palette index for palette-mode PNGs (GTA5), the value for grayscale ones and the first channel for
multi-channel ones (SYNTHIA's 16-bit RGB/RGBA ground truth, which Pillow would cut to 8 bits; we
inflate those ourselves, see `_read_png16_first_channel`). Every read failure raises an error that
names the file.
"""
from __future__ import annotations

import functools
import hashlib
import io
import os
import struct
import zlib
from pathlib import Path
from typing import Callable, Hashable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from ..atomic import atomic_write
from .ids import IGNORE_INDEX, get_class_set, lookup_table
from .transforms import check_size, normalize, resize_image, resize_label

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Pillow raises any of these for a damaged file, depending on where the damage is.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, zlib.error, struct.error,
                  Image.DecompressionBombError)

Transform = Callable[[torch.Tensor, torch.Tensor, torch.Generator], Tuple[torch.Tensor, torch.Tensor]]


def _unreadable(kind: str, path: Path, exc: BaseException) -> OSError:
    return OSError(f"cannot read {kind} {path}: {exc}; re-download or remove it")


def read_image(path) -> torch.Tensor:
    """The RGB image at `path` as a uint8 (3,H,W) tensor (alpha dropped, gray and palette
    images expanded). Raises FileNotFoundError or OSError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as im:
            rgb = np.asarray(im.convert("RGB"))
    except _DECODE_ERRORS as exc:
        raise _unreadable("image", path, exc) from exc
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).contiguous()


def read_label(path) -> np.ndarray:
    """The label map at `path` as an (H,W) integer array: uint8 for 8-bit files, uint16 for
    16-bit ones (int32 only if Pillow hands back 32-bit values). Palette PNGs give their indices,
    multi-channel files their first channel. Raises FileNotFoundError or OSError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"label file not found: {path}")
    try:
        with open(path, "rb") as f:
            head = f.read(33)
        if _is_png16_colour(head):
            return _read_png16_first_channel(path.read_bytes())
        with Image.open(path) as im:
            array = np.array(im)
    except _DECODE_ERRORS as exc:
        raise _unreadable("label", path, exc) from exc
    if array.ndim == 3:
        array = array[:, :, 0]
    if array.ndim != 2:
        raise OSError(f"cannot read label {path}: expected a single- or multi-channel image, got "
                      f"an array of shape {array.shape}; re-download or remove it")
    if array.dtype == np.bool_:
        return array.astype(np.uint8)
    if array.dtype.kind == "u" and array.dtype.itemsize <= 2:
        return array.astype(array.dtype.newbyteorder("="), copy=False)
    if array.dtype.kind in "iu" and array.size and 0 <= array.min() and array.max() <= 65535:
        return array.astype(np.uint16)
    return array.astype(np.int32)


def _is_png16_colour(head: bytes) -> bool:
    """True for a 16-bit PNG with more than one channel (colour types 2, 4, 6)."""
    if len(head) < 33 or not head.startswith(_PNG_SIGNATURE) or head[12:16] != b"IHDR":
        return False
    bit_depth, colour_type = head[24], head[25]
    return bit_depth == 16 and colour_type in (2, 4, 6)


def _read_png16_first_channel(data: bytes) -> np.ndarray:
    """Channel 0 of a non-interlaced 16-bit grayscale+alpha, RGB or RGBA PNG, as uint16 (H,W).

    PNG filters predict each byte from the byte one pixel to the left, the one above and the one
    above-left, so each byte lane of a pixel is unfiltered independently of the others. We take
    the two bytes of channel 0 (with the row filter bytes) out of the inflated stream; they form
    a valid filtered 16-bit grayscale image, which Pillow unfilters in C."""
    pos, ihdr, idat = len(_PNG_SIGNATURE), None, []
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        crc = data[pos + 8 + length:pos + 12 + length]
        if len(body) != length or len(crc) != 4:
            raise OSError("file is truncated")
        if zlib.crc32(kind + body) & 0xFFFFFFFF != struct.unpack(">I", crc)[0]:
            raise OSError(f"bad CRC in chunk {kind.decode('latin-1')!r}")
        if kind == b"IHDR":
            ihdr = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
        pos += 12 + length
    else:
        raise OSError("file is truncated (no IEND chunk)")
    if ihdr is None or not idat:
        raise OSError("missing IHDR or IDAT chunk")
    width, height, _, colour_type, _, _, interlace = ihdr
    if interlace:
        raise OSError("Adam7-interlaced 16-bit colour PNGs are not supported; re-encode the file "
                      "without interlacing")
    channels = {2: 3, 4: 2, 6: 4}[colour_type]
    row_bytes = 1 + 2 * channels * width
    raw = zlib.decompress(b"".join(idat))
    if len(raw) != height * row_bytes:
        raise OSError(f"image data has {len(raw)} bytes, expected {height * row_bytes}")
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(height, row_bytes)
    filter_types = rows[:, :1]
    if filter_types.max(initial=0) > 4:
        raise OSError(f"unknown PNG row filter type {int(filter_types.max())}")
    lanes = rows[:, 1:].reshape(height, width, 2 * channels)[:, :, :2].reshape(height, 2 * width)
    gray = np.concatenate([filter_types, lanes], axis=1).tobytes()
    header = struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0)
    png = (_PNG_SIGNATURE + _png_chunk(b"IHDR", header)
           + _png_chunk(b"IDAT", zlib.compress(gray, 0)) + _png_chunk(b"IEND", b""))
    with Image.open(io.BytesIO(png)) as im:
        values = np.asarray(im)
    return values.astype(np.uint16)


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    crc = zlib.crc32(kind + body) & 0xFFFFFFFF
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)


def write_png_atomic(path, array, palette: Optional[bytes] = None) -> Path:
    """Write `array` as a PNG at `path` via a temporary file in the same directory and
    os.replace, so readers never see a partial file. `array`: uint8 (H,W) (grayscale, or palette
    mode with `palette`, 768 bytes as from ids.palette_bytes()), uint16 (H,W) (16-bit grayscale)
    or uint8 (H,W,3) RGB; a numpy array or a tensor on any device. Creates missing directories."""
    path = Path(path)
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    array = np.ascontiguousarray(array)
    if array.dtype == np.uint8 and array.ndim == 2 and palette is not None:
        if len(palette) != 768:
            raise ValueError(f"palette must have 768 bytes (256 RGB entries), got {len(palette)}")
        im = Image.frombytes("P", (array.shape[1], array.shape[0]), array.tobytes())
        im.putpalette(palette)
    elif palette is None and (array.dtype == np.uint8 and array.ndim == 2
                              or array.dtype == np.uint8 and array.ndim == 3 and array.shape[2] == 3
                              or array.dtype == np.uint16 and array.ndim == 2):
        im = Image.fromarray(array)
    else:
        raise ValueError(f"cannot write {path}: expected uint8 (H,W), uint16 (H,W) or uint8 (H,W,3) "
                         f"(palette only with uint8 (H,W)), got {array.dtype} {array.shape}")
    with atomic_write(path, durable=False) as handle:  # many small files; a manifest vouches for them
        im.save(handle, format="PNG")
    return path


def map_label_ids(label: np.ndarray, table: np.ndarray, path) -> torch.Tensor:
    """Label ids -> train ids through a 65536-entry uint8 lookup table (ids.lookup_table);
    uint8 (H,W) tensor. Values outside 0..65535 raise ValueError naming the file."""
    if label.dtype not in (np.uint8, np.uint16):
        low, high = int(label.min(initial=0)), int(label.max(initial=0))
        if low < 0 or high >= len(table):
            raise ValueError(f"label {path} has ids in [{low}, {high}], outside 0..{len(table) - 1}")
        label = label.astype(np.uint16)
    return torch.from_numpy(table[label])


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


NO_DATA_HINT = "to try fastst without data use --preset demo"
# Image lists shipped with fastst (the released recipes' lists): a ``list_file`` that names one
# of these files by its bare name and does not exist as a path reads the shipped one.
SHIPPED_LISTS = Path(__file__).resolve().parent / "lists"


def list_path(list_file) -> Path:
    """The path of ``list_file``: itself when it exists (or has a directory part), else the
    shipped list of that name (fastst/data/lists/, e.g. ``gta5_iast_train.txt``)."""
    path = Path(list_file)
    if path.exists() or path.parent != Path("."):
        return path
    shipped = SHIPPED_LISTS / path.name
    return shipped if shipped.is_file() else path


def png_files(directory: Path, suffix: str = ".png") -> List[Path]:
    """The files in `directory` whose names end with `suffix` (no hidden files), sorted by name;
    empty if the directory does not exist."""
    if not directory.is_dir():
        return []
    with os.scandir(directory) as entries:
        names = [e.name for e in entries if e.name.endswith(suffix) and not e.name.startswith(".")
                 and e.is_file()]
    return [directory / name for name in sorted(names)]


def subdirectories(directory: Path) -> List[Path]:
    if not directory.is_dir():
        return []
    with os.scandir(directory) as entries:
        return [directory / e.name for e in sorted(entries, key=lambda e: e.name) if e.is_dir()]


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
