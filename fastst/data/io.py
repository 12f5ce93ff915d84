"""Reading images and label maps from disk, writing PNGs atomically, mapping label ids to train
ids, and finding data files (shipped image lists, PNG files, subdirectories). The data set base
classes built on them are in ``fastst.data.base``.

`read_image` gives uint8 (3,H,W) RGB tensors, `read_label` integer (H,W) arrays of label ids: the
palette index for palette-mode PNGs (GTA5), the value for grayscale ones and the first channel for
multi-channel ones (SYNTHIA's 16-bit RGB/RGBA ground truth, which Pillow would cut to 8 bits; we
inflate those ourselves, see `_read_png16_first_channel`). Every read failure raises an error that
names the file.
"""
from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch
from PIL import Image

from ..atomic import atomic_write

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Pillow raises any of these for a damaged file, depending on where the damage is.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, zlib.error, struct.error,
                  Image.DecompressionBombError)


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
