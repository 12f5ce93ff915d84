"""The synthetic domains: determinism, class coverage, a measurable domain shift, and the cached
Cityscapes-layout tree that the Cityscapes loader reads."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from fastst.data import build_dataset
from fastst.data.ids import CITYSCAPES_ID_TO_TRAIN_ID, lookup_table
from fastst.data.synthetic import (CITY_NAMES, MANIFEST_NAME, ensure_synthetic, generate_sample,
                                   image_stem, train_ids_to_label_ids)

H, W = 64, 128
TINY = dict(num_train=3, num_val=2, height=32, width=64)


@pytest.fixture(scope="module")
def samples():
    """12 scenes of each domain at 64x128: {domain: [(image, label), ...]}."""
    return {domain: [generate_sample(domain, i, height=H, width=W) for i in range(12)]
            for domain in ("source", "target")}


def test_same_seed_gives_identical_scenes_and_other_seeds_differ():
    image, label = generate_sample("target", 3, seed=5, height=H, width=W)
    again_image, again_label = generate_sample("target", 3, seed=5, height=H, width=W)
    assert image.dtype == np.uint8 and image.shape == (H, W, 3)
    assert label.dtype == np.uint8 and label.shape == (H, W)
    assert np.array_equal(image, again_image) and np.array_equal(label, again_label)
    for other in (dict(seed=6, index=3, split="train"), dict(seed=5, index=4, split="train"),
                  dict(seed=5, index=3, split="val")):
        index = other.pop("index")
        other_image, other_label = generate_sample("target", index, height=H, width=W, **other)
        assert not np.array_equal(label, other_label)
        assert not np.array_equal(image, other_image)


def test_many_classes_appear_with_street_like_frequencies(samples):
    for domain, scenes in samples.items():
        labels = np.stack([label for _, label in scenes])
        assert labels.max() < 19, "labels are train ids 0..18"
        images_with = np.array([[np.any(label == c) for c in range(19)] for label in labels])
        present = np.flatnonzero(images_with.any(0))
        assert len(present) >= 12, f"{domain}: only classes {present.tolist()} appear"
        # road, building, sky and pole in almost every scene; cars and persons in most
        for cls, least in ((0, 11), (2, 11), (10, 10), (5, 10), (13, 6), (11, 5)):
            assert images_with[:, cls].sum() >= least, (domain, cls, images_with[:, cls].sum())
        fractions = np.bincount(labels.ravel(), minlength=19) / labels.size
        assert 0.1 < fractions[0] < 0.45 and 0.05 < fractions[2] < 0.45  # road, building


def _class_means(scenes):
    total, count = np.zeros((19, 3)), np.zeros(19)
    for image, label in scenes:
        np.add.at(total, label.ravel(), image.reshape(-1, 3).astype(np.float64))
        count += np.bincount(label.ravel(), minlength=19)
    return total / np.maximum(count, 1)[:, None], count


def _interior_laplacian(image, label):
    """|discrete Laplacian| of the grey image at pixels whose 3x3 neighbourhood has one label."""
    grey = image.astype(np.float64).mean(-1)
    lap = 4 * grey[1:-1, 1:-1] - grey[:-2, 1:-1] - grey[2:, 1:-1] - grey[1:-1, :-2] - grey[1:-1, 2:]
    centre = label[1:-1, 1:-1]
    same = np.ones_like(centre, dtype=bool)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            same &= label[1 + dy:label.shape[0] - 1 + dy, 1 + dx:label.shape[1] - 1 + dx] == centre
    return np.abs(lap[same])


def test_domains_differ_in_colour_and_texture(samples):
    source_means, source_count = _class_means(samples["source"])
    target_means, target_count = _class_means(samples["target"])
    common = (source_count >= 100) & (target_count >= 100)
    assert common.sum() >= 10
    shift = np.linalg.norm(source_means - target_means, axis=1)[common]
    # The darkest class (traffic light) moves least under the multiplicative lighting changes.
    assert shift.min() > 10 and shift.mean() > 40, shift.round()
    # Source regions are flat colours (texture-free inside a class region), the target is
    # textured and noisy everywhere.
    source_texture = np.concatenate([_interior_laplacian(*s) for s in samples["source"]])
    target_texture = np.concatenate([_interior_laplacian(*s) for s in samples["target"]])
    assert np.median(source_texture) < 0.5 and np.median(target_texture) > 3.0
    # The target is darker overall (dusk lighting).
    source_brightness = np.mean([image.mean() for image, _ in samples["source"]])
    target_brightness = np.mean([image.mean() for image, _ in samples["target"]])
    assert target_brightness < source_brightness - 10


def test_class_colours_stay_apart_within_the_target(samples):
    """Learnability: the typical (median) colour of every frequent target class is far from
    that of every other class."""
    medians = {}
    for cls in range(19):
        pixels = np.concatenate([image[label == cls] for image, label in samples["target"]])
        if len(pixels) >= 300:
            medians[cls] = np.median(pixels.astype(np.float64), axis=0)
    assert len(medians) >= 10
    classes = sorted(medians)
    closest = min(np.linalg.norm(medians[a] - medians[b])
                  for i, a in enumerate(classes) for b in classes[i + 1:])
    assert closest > 12


def test_train_ids_to_label_ids_round_trips_and_maps_ignore_to_unlabeled():
    train_ids = np.array([[0, 5, 18], [255, 10, 13]], dtype=np.uint8)
    label_ids = train_ids_to_label_ids(train_ids)
    assert label_ids[1, 0] == 0
    back = lookup_table(CITYSCAPES_ID_TO_TRAIN_ID, 256)[label_ids]
    assert np.array_equal(back, train_ids)
    with pytest.raises(ValueError, match="train ids"):
        train_ids_to_label_ids(np.array([19], dtype=np.uint8))


def _files(root):
    return sorted(p for p in root.rglob("*") if p.is_file())


def _mtimes(root):
    return {p: p.stat().st_mtime_ns for p in _files(root)}


def test_ensure_synthetic_writes_the_cityscapes_layout_once(tmp_path):
    root = ensure_synthetic(tmp_path, "source", seed=1, **TINY)
    assert root == tmp_path / "source"
    city = CITY_NAMES["source"]
    for split, count in (("train", 3), ("val", 2)):
        images = sorted((root / "leftImg8bit" / split / city).iterdir())
        labels = sorted((root / "gtFine" / split / city).iterdir())
        assert [p.name for p in images] == [f"{image_stem('source', split, i)}_leftImg8bit.png"
                                            for i in range(count)]
        assert [p.name for p in labels] == [
            f"{image_stem('source', split, i)}_gtFine_labelIds.png" for i in range(count)]
        for index, (image_path, label_path) in enumerate(zip(images, labels)):
            image, label = generate_sample("source", index, seed=1, split=split, height=32,
                                           width=64)
            assert np.array_equal(np.asarray(Image.open(image_path).convert("RGB")), image)
            label_ids = np.asarray(Image.open(label_path))
            assert set(np.unique(label_ids)) <= set(CITYSCAPES_ID_TO_TRAIN_ID) | {0}
            assert np.array_equal(lookup_table(CITYSCAPES_ID_TO_TRAIN_ID, 256)[label_ids], label)
    manifest = json.loads((root / MANIFEST_NAME).read_text())
    assert manifest["seed"] == 1 and manifest["num_train"] == 3 and manifest["height"] == 32
    assert not [p for p in _files(tmp_path) if p.name.endswith(".tmp")]

    before = _mtimes(root)
    assert ensure_synthetic(tmp_path, "source", seed=1, **TINY) == root
    assert _mtimes(root) == before, "a second call with the same parameters must not rewrite"

    # Same parameters elsewhere: byte-identical files.
    other = ensure_synthetic(tmp_path / "again", "source", seed=1, **TINY)
    assert [p.relative_to(other) for p in _files(other)] == [p.relative_to(root) for p in
                                                             _files(root)]
    assert all(p.read_bytes() == (other / p.relative_to(root)).read_bytes() for p in _files(root))


def test_ensure_synthetic_regenerates_changed_or_partial_trees(tmp_path):
    root = ensure_synthetic(tmp_path, "target", **TINY)
    city = CITY_NAMES["target"]
    first_image = root / "leftImg8bit" / "train" / city / \
        f"{image_stem('target', 'train', 0)}_leftImg8bit.png"
    old_bytes = first_image.read_bytes()

    ensure_synthetic(tmp_path, "target", **{**TINY, "num_train": 2, "seed": 3})
    train_images = sorted((root / "leftImg8bit" / "train" / city).iterdir())
    assert len(train_images) == 2, "stale files of the old parameters must go"
    assert first_image.read_bytes() != old_bytes
    assert json.loads((root / MANIFEST_NAME).read_text())["seed"] == 3

    # A tree whose manifest is missing (interrupted run) or whose files are incomplete is redone.
    (root / MANIFEST_NAME).unlink()
    first_image.unlink()
    ensure_synthetic(tmp_path, "target", **{**TINY, "num_train": 2, "seed": 3})
    assert first_image.is_file() and (root / MANIFEST_NAME).is_file()
    first_image.unlink()
    ensure_synthetic(tmp_path, "target", **{**TINY, "num_train": 2, "seed": 3})
    assert first_image.is_file()


def test_loaders_read_the_tree_without_rewriting_it(tmp_path):
    root = ensure_synthetic(tmp_path, "target", **TINY)
    before = _mtimes(root)
    cityscapes = build_dataset("cityscapes", root, "val")
    synthetic = build_dataset("synthetic", tmp_path, "val", domain="target", synthetic=TINY)
    assert _mtimes(root) == before
    assert len(cityscapes) == len(synthetic) == 2
    for dataset in (cityscapes, synthetic):
        item = dataset[1]
        _, label = generate_sample("target", 1, split="val", height=32, width=64)
        assert item["image"].shape == (3, 32, 64)
        assert np.array_equal(item["label"].numpy(), label)
        assert item["name"] == f"{image_stem('target', 'val', 1)}_leftImg8bit"


def test_bad_arguments_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="domain"):
        ensure_synthetic(tmp_path, "gta5")
    with pytest.raises(ValueError, match="at least 16"):
        generate_sample("source", 0, height=8, width=64)
    with pytest.raises(ValueError, match="split"):
        generate_sample("source", 0, split="test")
    with pytest.raises(TypeError, match="num_train"):
        ensure_synthetic(tmp_path, "source", num_train=2.5)
    assert not os.listdir(tmp_path)


def _horizontal_runs(mask):
    """Lengths of the horizontal runs of True in a bool (H, W) array, one per run."""
    padded = np.pad(mask.astype(np.int8), ((0, 0), (1, 1)))
    steps = np.diff(padded, axis=1)
    return np.nonzero(steps == -1)[1] - np.nonzero(steps == 1)[1]


@pytest.mark.parametrize("train_id", [5, 6], ids=["pole", "traffic_light"])
def test_thin_classes_are_at_least_half_a_logit_cell_wide(train_id):
    # At the demo's size most pole and traffic-light pixels lie in horizontal runs of 4 pixels or
    # more (half of the model's 8-pixel logit cell); with real proportions (pole width 0.12
    # camera heights, 96x192) only 36 % of pole pixels did, and self-training erased the class
    # (docs/demo.md §4).
    runs = np.concatenate([_horizontal_runs(generate_sample("target", i)[1] == train_id)
                           for i in range(40)])
    assert runs.sum() > 500
    assert runs[runs >= 4].sum() / runs.sum() > 0.75


def test_demo_sizes_put_each_logit_cell_on_the_pixel_it_sees():
    # The demo's images, crops, pseudo labels and pass views are 8k+1 pixels on a side, so the
    # logits' align_corners=True upsampling puts cell (i, j) at pixel (8i, 8j); the backbone's
    # cell (i, j) sees a window centred on exactly that pixel (docs/demo.md §4).
    import torch
    from fastst.config import load_config
    from fastst.inference import scaled_size
    from fastst.models import deeplabv2

    config = load_config("demo")
    sizes = [tuple(config["data"]["crop_size"]),
             (config["data"]["synthetic"]["height"], config["data"]["synthetic"]["width"])]
    sizes += [tuple(config["stages"][f"round{k}"]["pseudo_size"]) for k in (1, 2, 3)]
    # demo_tpld's pass runs the model on its pseudo_size scaled by each pseudo_scale.
    tpld = load_config("demo_tpld")
    for stage in tpld["pipeline"][1:]:
        settings = tpld["stages"][stage]
        sizes += [scaled_size(settings["pseudo_size"], scale)
                  for scale in settings["pseudo_scales"]]
    assert all((side - 1) % 8 == 0 for size in sizes for side in size), sizes
    height, width = sizes[0]
    torch.manual_seed(0)
    backbone = deeplabv2(num_classes=19, backbone=config["model"]["backbone"]).eval().backbone
    assert backbone(torch.zeros(1, 3, height, width)).shape[-2:] == ((height - 1) // 8 + 1,
                                                                      (width - 1) // 8 + 1)
    # Where a cell looks: the window of input pixels its value depends on, on an image large
    # enough that the window of an inner cell meets no border.
    image = torch.randn(1, 3, 8 * 64 + 1, 8 * 64 + 1, requires_grad=True)
    features = backbone(image)
    for i, j in [(30, 34), (32, 32)]:
        (grad,) = torch.autograd.grad(features[0, :, i, j].sum(), image, retain_graph=True)
        seen = grad.abs().sum((0, 1)) > 0
        rows, cols = torch.nonzero(seen.any(1)).flatten(), torch.nonzero(seen.any(0)).flatten()
        assert 0 < rows.min() and rows.max() < image.shape[-2] - 1
        assert 0 < cols.min() and cols.max() < image.shape[-1] - 1
        assert (rows.min() + rows.max()) / 2 == 8 * i and (cols.min() + cols.max()) / 2 == 8 * j
