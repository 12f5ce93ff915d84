"""Procedural street scenes in two domains: the data set of the CPU demo.

A scene is a perspective street: sky, a far skyline on the horizon, a road between sidewalks,
terrain beyond them, building / vegetation / wall / fence facades along both sides (with a second
row further out, seen through gaps), poles carrying traffic lights and signs, trees, and road users
(cars, trucks, buses, persons, riders on bicycles and motorcycles, now and then a tram) whose pixel
sizes follow from their distance. Labels are the 19 Cityscapes train ids (`fastst.data.ids`).

Geometry: with the horizon at row `y_h` and the vanishing point at column `v`, a ground point at
lateral offset `u` (in camera heights) seen `r` pixels below the horizon lies at column `v + u * r`,
and an object of height `h` camera heights standing there spans rows `y_h + r - h * r .. y_h + r`.
`r / H` is the inverse depth; every layer is painted far to near.

The two domains share this layout model and differ in statistics and appearance:

* "source": flat rendered colours per class (small per-instance jitter, small per-image brightness
  change), sharp edges; more cars and buildings, taller buildings, higher horizon.
* "target": another palette (colder, desaturated, each class moved differently), darker lighting
  with a vertical gradient and a colour cast per image, depth fog, low-frequency texture, blur and
  sensor noise; more persons, riders and vegetation, larger road users, lower horizon.

Class colours stay distinct in both palettes (at least 37 RGB levels apart), so the target is
learnable and the gap can be bridged by self-training.

`ensure_synthetic(root, domain)` writes a Cityscapes-layout tree (labels as Cityscapes label ids,
so the Cityscapes loader reads it); `generate_sample(domain, index)` makes one image in memory.
Everything is deterministic in (seed, domain, split, index).
"""
import contextlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from ..atomic import atomic_write, write_json_atomic
from .ids import CITYSCAPES_ID_TO_TRAIN_ID, IGNORE_INDEX, NUM_CLASSES
from .synthetic_scene import Canvas, Painter
from .synthetic_style import STYLES, render_source, render_target

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; concurrent first calls must be avoided there.
    fcntl = None

__all__ = ["DOMAINS", "SPLITS", "CITY_NAMES", "DEFAULT_HEIGHT", "DEFAULT_WIDTH",
           "DEFAULT_NUM_TRAIN", "DEFAULT_NUM_VAL", "GENERATOR_VERSION", "generate_sample",
           "ensure_synthetic", "image_stem", "train_ids_to_label_ids"]

# Bump when the generator's output changes, so cached trees are regenerated.
GENERATOR_VERSION = 2
DOMAINS = ("source", "target")
SPLITS = ("train", "val")
CITY_NAMES = {"source": "synsource", "target": "syntarget"}
# Sized for a 2-core CPU demo: a quarter-width DeepLab-v2 ResNet-18 trains at several images per
# second on 97x193, so source-only, warm-up and three self-training rounds fit in a few minutes;
# 500 train images per domain let every class appear in many images, 100 val images keep an
# evaluation under half a minute. 97 = 8 * 12 + 1 and 193 = 8 * 24 + 1, DeepLab's 8k+1 sizes
# (321, 513): the 13x25 logits' cell (i, j) looks at pixel (8i, 8j), exactly where the
# align_corners=True upsampling of the losses, pseudo labels and evaluation puts it. At 96x192 the
# 12x24 cells land up to 7 pixels right of and below what they see, a shift that self-training
# on random crops feeds back into the labels round after round (docs/demo.md §4).
DEFAULT_HEIGHT = 97
DEFAULT_WIDTH = 193
DEFAULT_NUM_TRAIN = 500
DEFAULT_NUM_VAL = 100
# Val frames are numbered from here so that stems are unique across splits, as in Cityscapes.
VAL_FRAME_OFFSET = 100000
MANIFEST_NAME = "synthetic.json"

_DOMAIN_KEYS = {"source": 1, "target": 2}
_SPLIT_KEYS = {"train": 1, "val": 2}


def generate_sample(domain, index, *, seed=0, split="train", height=DEFAULT_HEIGHT,
                    width=DEFAULT_WIDTH):
    """One scene of `domain` ("source" or "target"): returns (image uint8 (H, W, 3) RGB,
    label uint8 (H, W) train ids). Deterministic in (seed, domain, split, index)."""
    _check_domain(domain)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    _check_positive_int("seed", seed, allow_zero=True)
    _check_positive_int("index", index, allow_zero=True)
    _check_size(height, width)
    entropy = [int(seed), _DOMAIN_KEYS[domain], _SPLIT_KEYS[split], int(index)]
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy)))
    canvas = Canvas(height, width)
    Painter(canvas, rng, STYLES[domain]).scene()
    render = render_source if domain == "source" else render_target
    image = np.clip(np.rint(render(canvas, rng)), 0, 255).astype(np.uint8)
    return image, canvas.label.copy()


# Files -----------------------------------------------------------------------------------------
def _label_id_table():
    table = np.zeros(256, dtype=np.uint8)     # ignore (255) -> 0 'unlabeled'
    for label_id, train_id in CITYSCAPES_ID_TO_TRAIN_ID.items():
        table[train_id] = label_id
    return table


_TRAIN_ID_TO_LABEL_ID = _label_id_table()


def train_ids_to_label_ids(label):
    """uint8 (H, W) train ids (255 = ignore) -> uint8 (H, W) Cityscapes label ids (ignore -> 0)."""
    label = np.asarray(label)
    if label.dtype != np.uint8:
        raise TypeError(f"label must be uint8 train ids, got {label.dtype}")
    bad = (label >= NUM_CLASSES) & (label != IGNORE_INDEX)
    if bad.any():
        raise ValueError(f"label holds values {np.unique(label[bad]).tolist()} that are neither "
                         f"train ids 0..{NUM_CLASSES - 1} nor {IGNORE_INDEX}")
    return _TRAIN_ID_TO_LABEL_ID[label]


def image_stem(domain, split, index):
    """Cityscapes-style stem `<city>_000000_<frame:06d>` of image `index` of a split."""
    frame = index + (VAL_FRAME_OFFSET if split == "val" else 0)
    return f"{CITY_NAMES[domain]}_000000_{frame:06d}"


def _save_png_atomic(array, path):
    with atomic_write(path, durable=False) as handle:  # synthetic.json, written last, vouches for them
        Image.fromarray(array).save(handle, format="PNG")


def _read_manifest(path):
    try:
        with open(path) as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def _tree_complete(domain_root, domain, manifest):
    """True if every file the manifest promises is there (cheap: names only)."""
    city = CITY_NAMES[domain]
    for split, count in (("train", manifest["num_train"]), ("val", manifest["num_val"])):
        for kind, suffix in (("leftImg8bit", "_leftImg8bit.png"), ("gtFine",
                                                                    "_gtFine_labelIds.png")):
            folder = domain_root / kind / split / city
            if not folder.is_dir():
                return False
            names = set(os.listdir(folder))
            if any(image_stem(domain, split, i) + suffix not in names for i in range(count)):
                return False
    return True


@contextlib.contextmanager
def _locked(domain_root):
    """Hold an exclusive lock on domain_root while (re)generating, so that processes started
    together (DDP ranks) do not write the same tree at once."""
    if fcntl is None:
        yield
        return
    with open(domain_root / ".synthetic.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_synthetic(root, domain, *, seed=0, num_train=DEFAULT_NUM_TRAIN,
                     num_val=DEFAULT_NUM_VAL, height=DEFAULT_HEIGHT, width=DEFAULT_WIDTH,
                     progress=False):
    """Write the synthetic `domain` as a Cityscapes-layout tree under root/<domain>/ unless an
    identical one is there, and return root/<domain> (pathlib.Path).

    Layout: leftImg8bit/{train,val}/<city>/<city>_000000_<frame:06d>_leftImg8bit.png (RGB) and
    gtFine/{train,val}/<city>/<city>_000000_<frame:06d>_gtFine_labelIds.png (Cityscapes label ids),
    city "synsource" or "syntarget", train frames 0.., val frames 100000... Every file is written
    atomically; the manifest root/<domain>/synthetic.json (the generation parameters) is written
    last, so a tree left half-written by an interrupted run, or one made with other parameters, is
    removed and generated again. Only this generator's city folders are ever deleted."""
    _check_domain(domain)
    _check_positive_int("seed", seed, allow_zero=True)
    _check_positive_int("num_train", num_train, allow_zero=True)
    _check_positive_int("num_val", num_val, allow_zero=True)
    _check_size(height, width)
    if max(num_train, num_val) > VAL_FRAME_OFFSET:
        raise ValueError(f"num_train and num_val must be at most {VAL_FRAME_OFFSET}, got "
                         f"{num_train} and {num_val}")
    domain_root = Path(root) / domain
    manifest = {"generator": "fastst.data.synthetic", "version": GENERATOR_VERSION,
                "domain": domain, "seed": int(seed), "num_train": int(num_train),
                "num_val": int(num_val), "height": int(height), "width": int(width)}
    manifest_path = domain_root / MANIFEST_NAME
    if _read_manifest(manifest_path) == manifest and _tree_complete(domain_root, domain, manifest):
        return domain_root
    domain_root.mkdir(parents=True, exist_ok=True)
    with _locked(domain_root):
        # Another process may have finished the tree while this one waited for the lock.
        if _read_manifest(manifest_path) == manifest and _tree_complete(domain_root, domain,
                                                                        manifest):
            return domain_root
        with contextlib.suppress(FileNotFoundError):
            manifest_path.unlink()
        city = CITY_NAMES[domain]
        jobs = []
        for split, count in (("train", num_train), ("val", num_val)):
            image_dir = domain_root / "leftImg8bit" / split / city
            label_dir = domain_root / "gtFine" / split / city
            for folder in (image_dir, label_dir):
                shutil.rmtree(folder, ignore_errors=True)
                folder.mkdir(parents=True)
            jobs += [(split, i, image_dir, label_dir) for i in range(count)]
        from ..progress import progress_bar  # a bar on a terminal, else log lines

        with progress_bar(len(jobs), desc=f"synthetic {domain}", unit="img", show=progress,
                          every=max(100, len(jobs) // 5)) as bar:
            for split, index, image_dir, label_dir in jobs:
                image, label = generate_sample(domain, index, seed=seed, split=split,
                                               height=height, width=width)
                stem = image_stem(domain, split, index)
                _save_png_atomic(image, image_dir / f"{stem}_leftImg8bit.png")
                _save_png_atomic(train_ids_to_label_ids(label),
                                 label_dir / f"{stem}_gtFine_labelIds.png")
                bar.update(1)
        write_json_atomic(manifest, manifest_path, indent=2, sort_keys=True)
    return domain_root


# Argument checks -------------------------------------------------------------------------------
def _check_domain(domain):
    if domain not in DOMAINS:
        raise ValueError(f"domain must be one of {DOMAINS}, got {domain!r}")


def _check_positive_int(name, value, *, allow_zero=False):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def _check_size(height, width):
    _check_positive_int("height", height)
    _check_positive_int("width", width)
    if height < 16 or width < 16:
        raise ValueError(f"height and width must be at least 16 pixels, got {height}x{width}")
