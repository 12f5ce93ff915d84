"""fastst.data: the GTA5, SYNTHIA and Cityscapes loaders on tiny fixtures written in each real
layout, the PNG readers (palette, 16-bit multi-channel, corrupt files), the seeded transforms,
pseudo labels on disk and the errors for missing data."""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastst.data import (IMAGENET_MEAN, IMAGENET_STD, PseudoLabelDataset, build_dataset,
                         read_image, read_label, save_pseudo_labels, train_transform,
                         write_png_atomic)
from fastst.data.ids import CITYSCAPES_ID_TO_TRAIN_ID, SYNTHIA_ID_TO_TRAIN_ID, palette_bytes
from fastst.data.transforms import (BrightnessContrast, HorizontalFlip, RandomSizedCrop,
                                    resize_label)

H, W = 8, 16
# Mapped ids, ids that are valid but ignored (0 unlabeled, 1 ego vehicle, 4 static, 9 parking)
# and one outside the Cityscapes ids (200): all but the first kind become 255.
CITYSCAPES_IDS = np.array([7, 8, 11, 26, 33, 0, 1, 4, 9, 200], dtype=np.uint8)
# SYNTHIA: mapped ids, void 0, lane marking 22, and 16-bit ids whose low byte is a mapped id
# (259 = 256 + 3, 1034 = 1024 + 10) or whose high byte is one (0x0300): a reader that keeps only
# one byte of the 16 would map them to classes.
SYNTHIA_IDS = np.array([3, 4, 2, 21, 10, 8, 12, 0, 22, 259, 1034, 0x0300, 65535], dtype=np.uint16)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def to_train_ids(ids, id_map):
    """The expected train ids, straight from the dict (independent of the lookup tables)."""
    return np.vectorize(lambda v: id_map.get(int(v), 255), otypes=[np.int64])(ids)


def random_image(rng, height=H, width=W):
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def random_ids(rng, ids, height=H, width=W):
    return ids[rng.integers(0, len(ids), (height, width))]


def normalised(rgb):
    mean, std = np.array(IMAGENET_MEAN), np.array(IMAGENET_STD)
    return ((rgb / 255.0 - mean) / std).transpose(2, 0, 1)


def paeth(a, b, c):
    p = a + b - c
    pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
    return np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))


def write_png(path, array, colour_type):
    """A PNG encoder of our own for the formats Pillow cannot write: 16-bit (H,W) grayscale
    (colour type 0), (H,W,3) RGB (2) or (H,W,4) RGBA (6). Row y uses filter y % 5, so every PNG
    filter (none, sub, up, average, Paeth) appears."""
    array = np.asarray(array, dtype=np.uint16)
    height, width = array.shape[:2]
    channels = 1 if array.ndim == 2 else array.shape[2]
    bpp = 2 * channels
    rows = array.astype(">u2").reshape(height, width * channels).view(np.uint8).astype(np.int64)
    prior = np.zeros(width * bpp, dtype=np.int64)
    stream = bytearray()
    for y, row in enumerate(rows):
        left = np.concatenate([np.zeros(bpp, np.int64), row[:-bpp]])
        up_left = np.concatenate([np.zeros(bpp, np.int64), prior[:-bpp]])
        predictor = [0, left, prior, (left + prior) // 2, paeth(left, prior, up_left)][y % 5]
        stream += bytes([y % 5]) + ((row - predictor) % 256).astype(np.uint8).tobytes()
        prior = row

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                           + chunk(b"IDAT", zlib.compress(bytes(stream))) + chunk(b"IEND", b""))


def save_palette_png(path, indices):
    """8-bit palette PNG whose colours differ from the indices (as GTA5's labels)."""
    im = Image.frombytes("P", (indices.shape[1], indices.shape[0]), indices.astype(np.uint8).tobytes())
    im.putpalette(bytes((7 * i + 50) % 256 for i in range(768)))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    im.save(path)


def save_png(path, array):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def make_gta5(root, rng, n=2):
    """GTA5 layout; label 0 palette mode, the others grayscale. Returns {stem: (rgb, ids)}."""
    files = {}
    for i in range(n):
        stem = f"{i + 1:05d}"
        rgb, ids = random_image(rng), random_ids(rng, CITYSCAPES_IDS)
        save_png(root / "images" / f"{stem}.png", rgb)
        if i == 0:
            save_palette_png(root / "labels" / f"{stem}.png", ids)
        else:
            save_png(root / "labels" / f"{stem}.png", ids)
        files[stem] = (rgb, ids)
    return files


def test_gta5_items_have_mapped_train_ids_and_normalised_images(tmp_path):
    files = make_gta5(tmp_path, np.random.default_rng(0))
    ds = build_dataset("gta5", tmp_path, "train")
    assert len(ds) == 2
    for i, stem in enumerate(sorted(files)):
        rgb, ids = files[stem]
        item = ds[i]
        assert item["name"] == stem
        assert item["image"].dtype == torch.float32 and item["image"].shape == (3, H, W)
        assert item["label"].dtype == torch.int64 and item["label"].shape == (H, W)
        np.testing.assert_array_equal(item["label"].numpy(), to_train_ids(ids, CITYSCAPES_ID_TO_TRAIN_ID))
        np.testing.assert_allclose(item["image"].numpy(), normalised(rgb), rtol=0, atol=1e-5)
    assert set(np.unique(ds[0]["label"].numpy())) > {255}


def test_palette_label_is_read_as_indices(tmp_path):
    ids = random_ids(np.random.default_rng(1), CITYSCAPES_IDS)
    save_palette_png(tmp_path / "p.png", ids)
    assert Image.open(tmp_path / "p.png").mode == "P"
    label = read_label(tmp_path / "p.png")
    assert label.dtype == np.uint8
    np.testing.assert_array_equal(label, ids)


@pytest.mark.parametrize("colour_type", [0, 2, 6], ids=["gray16", "rgb16", "rgba16"])
def test_synthia_16bit_labels_first_channel(tmp_path, colour_type):
    rng = np.random.default_rng(2)
    expected = {}
    for i in range(2):
        stem = f"{i:07d}"
        ids = random_ids(rng, SYNTHIA_IDS)
        channels = {0: 1, 2: 3, 6: 4}[colour_type]
        stack = [ids] + [rng.integers(0, 65536, (H, W)).astype(np.uint16) for _ in range(channels - 1)]
        write_png(tmp_path / "GT" / "LABELS" / f"{stem}.png", ids if channels == 1 else np.stack(stack, -1),
                  colour_type)
        save_png(tmp_path / "RGB" / f"{stem}.png", random_image(rng))
        expected[stem] = ids
        label = read_label(tmp_path / "GT" / "LABELS" / f"{stem}.png")
        assert label.dtype == np.uint16
        np.testing.assert_array_equal(label, ids)
    ds = build_dataset("synthia", tmp_path, "all")
    for i, stem in enumerate(sorted(expected)):
        got = ds[i]["label"].numpy()
        np.testing.assert_array_equal(got, to_train_ids(expected[stem], SYNTHIA_ID_TO_TRAIN_ID))
        wide = np.isin(expected[stem], [259, 1034, 0x0300, 65535])
        assert wide.any() and (got[wide] == 255).all()


def test_png16_decoder_matches_pillow_on_gray16(tmp_path):
    """Our encoder's 16-bit grayscale output, read by Pillow itself, validates the fixture
    writer that the RGB/RGBA cases rely on."""
    values = np.random.default_rng(3).integers(0, 65536, (7, 13)).astype(np.uint16)
    write_png(tmp_path / "g.png", values, 0)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "g.png")).astype(np.uint16), values)


def make_cityscapes(root, rng, split="train"):
    """Two cities, one image each; aachen also has a labelTrainIds file that differs from its
    mapped labelIds. Returns {image stem: (rgb, expected train ids)}."""
    expected = {}
    for city in ("aachen", "bochum"):
        base = f"{city}_000000_000019"
        rgb, ids = random_image(rng), random_ids(rng, CITYSCAPES_IDS)
        save_png(root / "leftImg8bit" / split / city / f"{base}_leftImg8bit.png", rgb)
        save_png(root / "gtFine" / split / city / f"{base}_gtFine_labelIds.png", ids)
        train_ids = to_train_ids(ids, CITYSCAPES_ID_TO_TRAIN_ID)
        if city == "aachen":
            train_ids = rng.choice(np.array([0, 5, 18, 255]), (H, W))
            save_png(root / "gtFine" / split / city / f"{base}_gtFine_labelTrainIds.png",
                     train_ids.astype(np.uint8))
        expected[f"{base}_leftImg8bit"] = (rgb, train_ids)
    return expected


def test_cityscapes_label_ids_mapped_and_train_ids_preferred(tmp_path):
    expected = make_cityscapes(tmp_path, np.random.default_rng(4))
    ds = build_dataset("cityscapes", tmp_path, "train")
    assert [ds[i]["name"] for i in range(len(ds))] == sorted(expected)
    for i in range(len(ds)):
        rgb, train_ids = expected[ds[i]["name"]]
        np.testing.assert_array_equal(ds[i]["label"].numpy(), train_ids)
        np.testing.assert_allclose(ds[i]["image"].numpy(), normalised(rgb), rtol=0, atol=1e-5)


def test_cityscapes_unlabelled_splits_give_ignore_labels(tmp_path):
    rng = np.random.default_rng(5)
    make_cityscapes(tmp_path, rng, "train")
    save_png(tmp_path / "leftImg8bit" / "test" / "berlin" / "berlin_000000_000019_leftImg8bit.png",
             random_image(rng))
    test = build_dataset("cityscapes", tmp_path, "test")
    assert len(test) == 1 and (test[0]["label"] == 255).all()
    unlabelled = build_dataset("cityscapes", tmp_path, "train", labels=False)
    assert len(unlabelled) == 2 and all((unlabelled[i]["label"] == 255).all() for i in range(2))


def test_list_file_selects_and_orders(tmp_path):
    make_cityscapes(tmp_path, np.random.default_rng(6))
    listing = tmp_path / "list.txt"
    listing.write_text("bochum/bochum_000000_000019_leftImg8bit.png\n\naachen_000000_000019\n")
    ds = build_dataset("cityscapes", tmp_path, "train", list_file=listing)
    assert [ds[i]["name"] for i in range(2)] == ["bochum_000000_000019_leftImg8bit",
                                                  "aachen_000000_000019_leftImg8bit"]
    listing.write_text("aachen_000000_000019_leftImg8bit.png\nnowhere_000000_000001_leftImg8bit.png\n")
    with pytest.raises(FileNotFoundError, match="nowhere_000000_000001"):
        build_dataset("cityscapes", tmp_path, "train", list_file=listing)


def test_corrupt_files_raise_errors_naming_them(tmp_path):
    rng = np.random.default_rng(7)
    make_gta5(tmp_path, rng)
    image = tmp_path / "images" / "00002.png"
    image.write_bytes(image.read_bytes()[:60])
    ds = build_dataset("gta5", tmp_path, "train")
    ds[0]
    with pytest.raises(OSError, match=f"cannot read image {image}.*re-download or remove it"):
        ds[1]
    label = tmp_path / "bad16.png"
    write_png(label, np.stack([random_ids(rng, SYNTHIA_IDS)] * 3, -1), 2)
    data = bytearray(label.read_bytes())
    data[45] ^= 0xFF  # inside the IDAT chunk: its CRC no longer matches
    label.write_bytes(bytes(data))
    with pytest.raises(OSError, match=f"cannot read label {label}: bad CRC"):
        read_label(label)


def test_missing_or_empty_root_and_bad_names(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"expected .*/images/\*\.png and .*/labels/\*\.png.*"
                                                 r"to try fastst without data use --preset demo"):
        build_dataset("gta5", tmp_path / "absent", "train")
    with pytest.raises(FileNotFoundError, match=r"RGB/\*\.png and .*GT/LABELS/\*\.png.*--preset demo"):
        build_dataset("synthia", tmp_path, "train")
    with pytest.raises(FileNotFoundError, match=r"leftImg8bit/val/<city>.*--preset demo"):
        build_dataset("cityscapes", tmp_path, "val")
    with pytest.raises(ValueError, match="valid names: gta5, synthia, cityscapes, synthetic"):
        build_dataset("kitti", tmp_path, "train")
    with pytest.raises(ValueError, match="valid splits: train, all"):
        build_dataset("gta5", tmp_path, "val")
    with pytest.raises(ValueError, match="domain= one of source, target"):
        build_dataset("synthetic", tmp_path, "train", domain="sideways")


def test_image_without_label_is_an_error_unless_unlabelled(tmp_path):
    make_gta5(tmp_path, np.random.default_rng(8))
    (tmp_path / "labels" / "00002.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 of 2 GTA5 images have no label file, e.g. .*00002\.png"):
        build_dataset("gta5", tmp_path, "train")
    assert len(build_dataset("gta5", tmp_path, "train", labels=False)) == 2


def test_write_png_atomic_round_trips_and_leaves_no_temp_files(tmp_path):
    rng = np.random.default_rng(9)
    for name, array in [("a.png", rng.integers(0, 256, (5, 7), dtype=np.uint8)),
                        ("b.png", rng.integers(0, 65536, (5, 7)).astype(np.uint16)),
                        ("c.png", rng.integers(0, 256, (5, 7, 3), dtype=np.uint8))]:
        write_png_atomic(tmp_path / "out" / name, array)
        write_png_atomic(tmp_path / "out" / name, array)  # overwriting is fine
        read = read_image if array.ndim == 3 else read_label
        got = read(tmp_path / "out" / name)
        got = got.permute(1, 2, 0).numpy() if array.ndim == 3 else got
        np.testing.assert_array_equal(got, array)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png", "b.png", "c.png"]
    with pytest.raises(ValueError, match="expected uint8"):
        write_png_atomic(tmp_path / "d.png", np.zeros((2, 2), np.float32))


# ---------------------------------------------------------------------------------- transforms

def coordinate_image(height, width):
    """uint8 (3,H,W): channel 0 = column, channel 1 = row, so crops and flips can be read off."""
    cols = torch.arange(width).expand(height, width)
    rows = torch.arange(height)[:, None].expand(height, width)
    return torch.stack([cols, rows, (cols + rows) % 256]).to(torch.uint8)


def test_transforms_are_deterministic_for_a_generator():
    image = torch.randint(0, 256, (3, 60, 100), dtype=torch.uint8, generator=gen(0))
    label = torch.randint(0, 19, (60, 100), dtype=torch.uint8, generator=gen(1))
    transform = train_transform(crop_height_range=(20, 50), crop_size=(16, 32), brightness_contrast_p=0.5)
    outputs = [transform(image, label, gen(seed)) for seed in (5, 5, 6, 7, 8)]
    assert torch.equal(outputs[0][0], outputs[1][0]) and torch.equal(outputs[0][1], outputs[1][1])
    assert any(not torch.equal(outputs[0][0], other[0]) for other in outputs[2:])
    assert all(out[0].shape == (3, 16, 32) and out[0].dtype == torch.uint8 for out in outputs)


def test_random_sized_crop_sizes_and_positions():
    image, label = coordinate_image(40, 70), torch.zeros(40, 70, dtype=torch.uint8)
    crop = RandomSizedCrop(height_range=(10, 50), aspect=2.0, out_size=None)
    heights = set()
    for seed in range(60):
        out, out_label = crop(image, label, gen(seed))
        h, w = out.shape[-2:]
        assert 10 <= h <= 40 and w == min(2 * h, 70) and out_label.shape == (h, w), (seed, h, w)
        left, top = int(out[0, 0, 0]), int(out[1, 0, 0])
        expected = coordinate_image(40, 70)[:, top:top + h, left:left + w]
        assert torch.equal(out, expected)
        heights.add(h)
    assert len(heights) > 10 and 40 in heights  # heights above 40 are clipped to the image


def test_flip_moves_image_and_label_together():
    image = coordinate_image(4, 9)
    label = (torch.arange(9, dtype=torch.uint8) * 3).expand(4, 9).contiguous()
    flipped, flipped_label = HorizontalFlip(p=1.0)(image, label, gen(0))
    assert torch.equal(flipped[0, 0], torch.arange(8, -1, -1, dtype=torch.uint8))
    assert torch.equal(flipped_label, label.flip(-1))
    same = HorizontalFlip(p=0.0)(image, label, gen(0))
    assert torch.equal(same[0], image) and torch.equal(same[1], label)
    flips = [not torch.equal(HorizontalFlip(0.5)(image, label, gen(s))[0], image) for s in range(40)]
    assert 5 < sum(flips) < 35


def test_resized_labels_only_hold_input_values():
    label = torch.from_numpy(np.random.default_rng(10).choice(np.array([1, 7, 13, 255], np.uint8), (37, 81)))
    image = torch.randint(0, 256, (3, 37, 81), dtype=torch.uint8, generator=gen(2))
    for seed in range(5):
        _, out = RandomSizedCrop((10, 30), 2.0, (23, 45))(image, label, gen(seed))
        assert out.shape == (23, 45) and set(out.unique().tolist()) <= {1, 7, 13, 255}
    up = resize_label(label[:4, :5], (8, 10))
    assert torch.equal(up, label[:4, :5].repeat_interleave(2, 0).repeat_interleave(2, 1))


@pytest.mark.parametrize("in_size,out_size", [(64, 97), (97, 64), (341, 512), (950, 512), (5, 3)])
def test_resized_labels_sit_where_the_image_is_sampled(in_size, out_size):
    # Output pixel y shows the image at input position (y + 0.5) * in / out (bilinear, half-pixel
    # centres); its label is the input pixel containing that position, never one above it, so
    # on average the label's pixel centre sits on the sample (the floor(y * in / out) rule of
    # OpenCV's INTER_NEAREST lags by half an output pixel: docs/recipes.md §4.4).
    label = torch.arange(in_size, dtype=torch.int64)[:, None].expand(in_size, 3)
    rows = resize_label(label, (out_size, 3))[:, 0].double()
    sample = (torch.arange(out_size, dtype=torch.float64) + 0.5) * in_size / out_size
    assert torch.all((rows <= sample) & (sample < rows + 1))
    assert abs(float((rows + 0.5 - sample).mean())) < 0.1 * in_size / out_size + 0.05


def test_brightness_contrast_formula():
    image = torch.arange(256, dtype=torch.uint8).reshape(1, 16, 16).expand(3, 16, 16)
    label = torch.zeros(16, 16, dtype=torch.uint8)
    out, _ = BrightnessContrast(0.2, 0.2, p=1.0)(image, label, gen(11))
    g = gen(11)
    torch.rand((), generator=g, dtype=torch.float64)  # the coin
    alpha = 1 + (-0.2 + 0.4 * float(torch.rand((), generator=g, dtype=torch.float64)))
    beta = (-0.2 + 0.4 * float(torch.rand((), generator=g, dtype=torch.float64))) * 255
    lut = np.arange(256, dtype=np.float32) * np.float32(alpha) + np.float32(beta)
    lut = np.clip(lut, 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(out.numpy(), lut[image.numpy()])
    assert not torch.equal(out, image)
    untouched, _ = BrightnessContrast(0.2, 0.2, p=0.0)(image, label, gen(11))
    assert torch.equal(untouched, image)


def test_items_are_seeded_by_seed_epoch_and_index(tmp_path):
    make_gta5(tmp_path, np.random.default_rng(12), n=3)
    transform = train_transform(crop_height_range=(4, 8), crop_size=(4, 8), brightness_contrast_p=0.5)

    def items(ds):
        return [ds[i]["image"] for i in range(len(ds))]

    a = build_dataset("gta5", tmp_path, "train", transform=transform, seed=1)
    b = build_dataset("gta5", tmp_path, "train", transform=transform, seed=1)
    epoch0 = items(a)
    assert all(torch.equal(x, y) for x, y in zip(epoch0, items(b)))
    a.set_epoch(1)
    epoch1 = items(a)
    assert any(not torch.equal(x, y) for x, y in zip(epoch0, epoch1))
    b.set_epoch(1)
    assert all(torch.equal(x, y) for x, y in zip(epoch1, items(b)))
    # Persistent workers see set_epoch too (the epoch is in shared memory).
    loader = torch.utils.data.DataLoader(b, batch_size=1, num_workers=2, persistent_workers=True)
    b.set_epoch(0)
    assert all(torch.equal(batch["image"][0], x) for batch, x in zip(loader, epoch0))
    b.set_epoch(1)
    assert all(torch.equal(batch["image"][0], x) for batch, x in zip(loader, epoch1))


def test_fixed_resize(tmp_path):
    make_gta5(tmp_path, np.random.default_rng(13))
    ds = build_dataset("gta5", tmp_path, "train", resize=(4, 6))
    item, raw_label = ds[0], ds.load_raw(0)[1]
    assert item["image"].shape == (3, 4, 6)
    assert set(item["label"].unique().tolist()) <= set(raw_label.unique().tolist())


# ------------------------------------------------------------------------------- pseudo labels

def test_pseudo_labels_round_trip_with_nearest_upsampling(tmp_path):
    make_gta5(tmp_path / "gta5", np.random.default_rng(14))
    images = build_dataset("gta5", tmp_path / "gta5", "train", labels=False)
    names = [images[i]["name"] for i in range(2)]
    values = np.array([0, 3, 18, 255], np.uint8)
    pseudo = torch.from_numpy(np.random.default_rng(15).choice(values, (2, H // 2, W // 2)))
    paths = save_pseudo_labels(tmp_path / "pl", names, pseudo, colour=True)
    assert [p.name for p in paths] == [f"{n}_pseudo_label.png" for n in names]
    for name, expected in zip(names, pseudo):
        label = read_label(tmp_path / "pl" / f"{name}_pseudo_label.png")
        np.testing.assert_array_equal(label, expected.numpy())
        colour = Image.open(tmp_path / "pl" / f"{name}_pseudo_color.png")
        palette = bytes(colour.getpalette())
        assert colour.mode == "P" and palette == palette_bytes()[:len(palette)]
    ds = PseudoLabelDataset(images, tmp_path / "pl")
    for i in range(2):
        item = ds[i]
        upsampled = pseudo[i].repeat_interleave(2, 0).repeat_interleave(2, 1).long()
        assert torch.equal(item["label"], upsampled)
        assert torch.equal(item["image"], images[i]["image"]) and item["name"] == names[i]
    (tmp_path / "pl" / f"{names[1]}_pseudo_label.png").unlink()
    with pytest.raises(FileNotFoundError, match=f"{names[1]}_pseudo_label.png.*run the pseudo-label pass"):
        ds[1]
    with pytest.raises(ValueError, match="uint8"):
        save_pseudo_labels(tmp_path / "pl", names, pseudo.long())
