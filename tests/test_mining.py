"""fastst.data.mining (rare-class mining crops) and fastst.data.mixed (the mixed source + target
list of the CBST/CRST rounds and the source sampling)."""
from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import DataLoader

from fastst.data.mining import MiningSizedCrop, mining_train_transform
from fastst.data.mixed import MixedDomainDataset, sample_source_indices
from fastst.data.transforms import RandomSizedCrop, _coin, _randint, train_transform
from fastst.methods.streams import BatchStream

H, W = 24, 40


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def coordinate_image(height=H, width=W):
    """uint8 (3,H,W) whose channel 0 holds the row and channel 1 the column of each pixel, so an
    un-resized crop tells where it was taken."""
    rows = torch.arange(height).view(-1, 1).expand(height, width)
    cols = torch.arange(width).view(1, -1).expand(height, width)
    return torch.stack([rows, cols, rows * 0]).to(torch.uint8)


def corner(crop):
    """(top, left) of an un-resized crop of coordinate_image."""
    return int(crop[0, 0, 0]), int(crop[1, 0, 0])


def label_with(pixels, fill=0, height=H, width=W):
    """uint8 (H,W) filled with `fill`, with pixels[(y, x)] = class."""
    label = torch.full((height, width), fill, dtype=torch.uint8)
    for (y, x), value in pixels.items():
        label[y, x] = value
    return label


def next_draw(generator):
    return torch.rand((), generator=generator, dtype=torch.float64).item()


# ---------------------------------------------------------------- MiningSizedCrop

@pytest.mark.parametrize("pixel", [(0, 0), (H - 1, W - 1), (0, W - 1), (H - 1, 0), (11, 19), (5, 2)])
def test_mined_crop_always_contains_the_rare_pixel_and_stays_in_bounds(pixel):
    crop = MiningSizedCrop((4, 30), aspect=1.5, out_size=None, mine_classes=[7], mine_p=1.0)
    image, label = coordinate_image(), label_with({pixel: 7})
    for seed in range(60):
        out_image, out_label = crop(image, label, gen(seed))
        top, left = corner(out_image)
        crop_h, crop_w = out_label.shape
        assert 0 <= top <= H - crop_h and 0 <= left <= W - crop_w
        assert top <= pixel[0] < top + crop_h and left <= pixel[1] < left + crop_w
        assert int((out_label == 7).sum()) == 1
        assert torch.equal(out_label, label[top:top + crop_h, left:left + crop_w])


def test_crop_size_rule_matches_random_sized_crop_including_clipping():
    # heights up to 40 > H, widths int(h * 2.5) up to 100 > W: both get clipped to the image.
    mining = MiningSizedCrop((3, 40), aspect=2.5, out_size=None, mine_classes=[1], mine_p=1.0)
    plain = RandomSizedCrop((3, 40), aspect=2.5, out_size=None)
    image, label = coordinate_image(), label_with({(3, 3): 1})
    for seed in range(40):
        mined, _ = mining(image, label, gen(seed))
        random, _ = plain(image, label, gen(seed))
        assert mined.shape == random.shape
    assert {mining(image, label, gen(s))[1].shape for s in range(40)} >= {(H, W)}


def test_mined_crop_follows_the_documented_draws():
    """h, coin, present class (in mine_classes order), pixel (row-major), centred and shifted."""
    pixels = {(2, 3): 4, (20, 35): 9, (21, 1): 9, (10, 30): 9}
    image, label = coordinate_image(), label_with(pixels)
    crop = MiningSizedCrop((5, 12), aspect=2.0, out_size=None, mine_classes=[13, 9, 4], mine_p=0.7)
    mined = 0
    for seed in range(80):
        out_image, out_label = crop(image, label, gen(seed))
        g = gen(seed)
        crop_h = _randint(g, 5, 12)
        crop_w = min(int(crop_h * 2.0), W)
        if _coin(g, 0.7):
            mined += 1
            chosen = [9, 4][_randint(g, 0, 1)]
            where = sorted(yx for yx, c in pixels.items() if c == chosen)  # row-major order
            y, x = where[_randint(g, 0, len(where) - 1)]
            expected = (min(max(y - crop_h // 2, 0), H - crop_h),
                        min(max(x - crop_w // 2, 0), W - crop_w))
        else:
            expected = (_randint(g, 0, H - crop_h), _randint(g, 0, W - crop_w))
        assert corner(out_image) == expected, seed
        assert out_label.shape == (crop_h, crop_w)
    assert 30 < mined < 80


def test_present_classes_are_chosen_uniformly():
    # One class in each far corner; a crop of height 4 cannot hold both.
    image, label = coordinate_image(), label_with({(0, 0): 3, (H - 1, W - 1): 5})
    crop = MiningSizedCrop((4, 4), aspect=1.0, out_size=None, mine_classes=[3, 5], mine_p=1.0)
    picks = []
    for seed in range(200):
        _, out_label = crop(image, label, gen(seed))
        has3, has5 = bool((out_label == 3).any()), bool((out_label == 5).any())
        assert has3 != has5
        picks.append(3 if has3 else 5)
    assert 70 <= picks.count(3) <= 130


@pytest.mark.parametrize("mine_classes, mine_p", [([2, 5], 0.0), ([], 0.8), ([], 1.0)])
def test_without_mining_it_equals_random_sized_crop(mine_classes, mine_p):
    image = torch.randint(0, 256, (3, H, W), dtype=torch.uint8, generator=gen(1))
    label = torch.randint(0, 6, (H, W), dtype=torch.uint8, generator=gen(2))
    mining = MiningSizedCrop((6, 30), aspect=1.7, out_size=(10, 16), mine_classes=mine_classes,
                             mine_p=mine_p)
    plain = RandomSizedCrop((6, 30), aspect=1.7, out_size=(10, 16))
    for seed in range(20):
        g_mining, g_plain = gen(seed), gen(seed)
        mined = mining(image, label, g_mining)
        random = plain(image, label, g_plain)
        assert torch.equal(mined[0], random[0]) and torch.equal(mined[1], random[1])
        assert next_draw(g_mining) == next_draw(g_plain)  # same number of draws taken


def test_mining_train_transform_with_mine_p_zero_equals_train_transform():
    image = torch.randint(0, 256, (3, H, W), dtype=torch.uint8, generator=gen(3))
    label = torch.randint(0, 4, (H, W), dtype=torch.uint8, generator=gen(4))
    kw = dict(crop_height_range=(8, 20), crop_size=(12, 24), aspect=2.0, flip_p=0.5,
              brightness=0.2, contrast=0.2, brightness_contrast_p=0.5)
    mining, plain = mining_train_transform([1, 2], 0.0, **kw), train_transform(**kw)
    for seed in range(20):
        g_mining, g_plain = gen(seed), gen(seed)
        mined, random = mining(image, label, g_mining), plain(image, label, g_plain)
        assert torch.equal(mined[0], random[0]) and torch.equal(mined[1], random[1])
        assert next_draw(g_mining) == next_draw(g_plain)


def test_mining_train_transform_mines_then_flips_and_resizes():
    image, label = coordinate_image(), label_with({(H - 1, 0): 6}, fill=255)
    transform = mining_train_transform([6], 1.0, crop_height_range=(4, 8), crop_size=(8, 16),
                                       aspect=2.0, flip_p=0.5, brightness=0.2, contrast=0.2,
                                       brightness_contrast_p=0.3)
    flipped = 0
    for seed in range(30):
        out_image, out_label = transform(image, label, gen(seed))
        assert out_image.shape == (3, 8, 16) and out_label.shape == (8, 16)
        assert out_image.dtype == torch.uint8 and out_label.dtype == torch.uint8
        # The crop's bottom-left pixel is the mined one (nearest resize keeps the corner pixel);
        # a flip moves it to the bottom right.
        at_left, at_right = int(out_label[-1, 0]) == 6, int(out_label[-1, -1]) == 6
        assert at_left != at_right
        flipped += at_right
    assert 0 < flipped < 30


def test_absent_mine_classes_fall_back_to_a_random_crop():
    # The label holds only class 0 and ignore; the mine classes 3 and 4 are absent.
    label = label_with({(y, x): 255 for y in range(H) for x in range(0, W, 3)})
    image = coordinate_image()
    crop = MiningSizedCrop((5, 10), aspect=2.0, out_size=None, mine_classes=[3, 4], mine_p=1.0)
    corners = set()
    for seed in range(40):
        out_image, _ = crop(image, label, gen(seed))
        g = gen(seed)
        crop_h = _randint(g, 5, 10)
        crop_w = min(int(crop_h * 2.0), W)
        assert _coin(g, 1.0)  # the coin is drawn (and lands) before the label is looked at
        expected = (_randint(g, 0, H - crop_h), _randint(g, 0, W - crop_w))
        assert corner(out_image) == expected
        corners.add(expected)
    assert len(corners) > 10


def test_ignore_is_never_mined():
    with pytest.raises(ValueError, match="255"):
        MiningSizedCrop((4, 8), mine_classes=[3, 255], mine_p=0.5)
    # An almost all-ignore pseudo label: the single class-3 pixel is what gets mined.
    label = label_with({(H - 2, 1): 3}, fill=255)
    crop = MiningSizedCrop((4, 6), aspect=1.0, out_size=None, mine_classes=[3], mine_p=1.0)
    for seed in range(20):
        _, out_label = crop(coordinate_image(), label, gen(seed))
        assert int((out_label == 3).sum()) == 1


@pytest.mark.parametrize("mine_p", [-0.1, 1.5, float("nan")])
def test_bad_mine_p_raises(mine_p):
    with pytest.raises(ValueError, match="mine_p"):
        MiningSizedCrop((4, 8), mine_classes=[1], mine_p=mine_p)
    with pytest.raises(ValueError, match="mine_p"):
        mining_train_transform([1], mine_p)


@pytest.mark.parametrize("mine_classes, error", [([-1], ValueError), ([2.5], TypeError),
                                                 ([True], TypeError), ("12", TypeError),
                                                 (5, TypeError)])
def test_bad_mine_classes_raise(mine_classes, error):
    with pytest.raises(error, match="mine_classes"):
        MiningSizedCrop((4, 8), mine_classes=mine_classes, mine_p=0.5)


def test_label_of_another_size_raises():
    crop = MiningSizedCrop((4, 8), mine_classes=[1], mine_p=0.5)
    with pytest.raises(ValueError, match="same size"):
        crop(coordinate_image(), torch.zeros(H, W + 1, dtype=torch.uint8), gen())


def test_duplicate_mine_classes_count_once():
    crop = MiningSizedCrop((4, 8), mine_classes=[5, 2, 5, 2], mine_p=0.5)
    assert crop.mine_classes == (5, 2)


# ---------------------------------------------------------------- MixedDomainDataset

class Items(torch.utils.data.Dataset):
    """Tiny in-memory data set of fastst-style items, without set_epoch."""

    def __init__(self, prefix, n, keys=("image", "label", "name")):
        self.prefix, self.n, self.keys, self.epochs = prefix, n, keys, []

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        item = {"image": torch.full((3, 2, 3), float(i)),
                "label": torch.full((2, 3), i, dtype=torch.int64),
                "name": f"{self.prefix}{i}", "extra": 0}
        return {key: item[key] for key in self.keys}


class ItemList(Items):
    """Items that record their set_epoch calls."""

    def set_epoch(self, epoch):
        self.epochs.append(epoch)


def test_mixed_dataset_order_lengths_and_flags():
    source, target = ItemList("s", 10), ItemList("t", 4)
    mixed = MixedDomainDataset(source, target, [7, 2, 9])
    assert len(mixed) == 7 and mixed.num_source == 3
    names = [mixed[i]["name"] for i in range(len(mixed))]
    assert names == ["s7", "s2", "s9", "t0", "t1", "t2", "t3"]
    flags = [mixed[i]["is_target"] for i in range(len(mixed))]
    assert all(f.dtype == torch.bool and f.shape == () for f in flags)
    assert [bool(f) for f in flags] == [False] * 3 + [True] * 4
    assert set(mixed[0]) == {"image", "label", "name", "is_target"}
    assert torch.equal(mixed[1]["label"], source[2]["label"])
    with pytest.raises(IndexError):
        mixed[7]
    assert len(MixedDomainDataset(source, target, [])) == 4


def test_mixed_dataset_forwards_set_epoch():
    source, target = ItemList("s", 5), ItemList("t", 3)
    mixed = MixedDomainDataset(source, target, [0, 1])
    mixed.set_epoch(3)
    assert source.epochs == [3] and target.epochs == [3]
    plain = Items("t", 3)
    MixedDomainDataset(source, plain, [4]).set_epoch(5)
    assert source.epochs == [3, 5]


def test_mixed_dataset_collates_to_a_bool_vector():
    mixed = MixedDomainDataset(ItemList("s", 6), ItemList("t", 3), [1, 4])
    batches = list(DataLoader(mixed, batch_size=5, shuffle=False))
    assert [b["is_target"].tolist() for b in batches] == [[False, False, True, True, True]]
    batch = batches[0]
    assert batch["is_target"].dtype == torch.bool and batch["is_target"].shape == (5,)
    assert batch["image"].shape == (5, 3, 2, 3) and batch["name"] == ["s1", "s4", "t0", "t1", "t2"]


def test_mixed_dataset_in_a_batch_stream():
    source, target = ItemList("s", 8), ItemList("t", 4)
    mixed = MixedDomainDataset(source, target, [0, 5])
    stream = BatchStream(mixed, batch_size=2, seed=0)
    batches = list(stream.batches(0, 6))  # 3 batches an epoch: epochs 0 and 1
    assert source.epochs == [0, 1] and target.epochs == [0, 1]
    names = sorted(n for b in batches[:3] for n in b["name"])
    assert names == ["s0", "s5", "t0", "t1", "t2", "t3"]
    for b in batches:
        assert b["is_target"].tolist() == [n.startswith("t") for n in b["name"]]


def test_mixed_dataset_rejects_bad_indices_and_mismatched_items():
    source, target = ItemList("s", 5), ItemList("t", 3)
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        MixedDomainDataset(source, target, [1, 5])
    with pytest.raises(ValueError, match="source_indices"):
        MixedDomainDataset(source, target, [-1])
    with pytest.raises(TypeError, match="source_indices"):
        MixedDomainDataset(source, target, [1.0])
    odd = MixedDomainDataset(source, ItemList("t", 3, keys=("image", "label", "name", "extra")), [0])
    assert odd[0]["name"] == "s0"
    with pytest.raises(ValueError, match="target"):
        odd[1]


# ---------------------------------------------------------------- sample_source_indices

@pytest.mark.parametrize("num_source, portion", [(1000, 0.03), (19984, 0.0325), (7, 0.5), (10, 1.0),
                                                 (10, 0.0), (0, 0.4)])
def test_sample_source_indices_size_and_distinctness(num_source, portion):
    indices = sample_source_indices(num_source, portion, seed=4)
    assert len(indices) == math.floor(num_source * portion)
    assert len(set(indices)) == len(indices)
    assert indices == sorted(indices)
    assert all(isinstance(i, int) and 0 <= i < num_source for i in indices)
    order = torch.randperm(num_source, generator=torch.Generator().manual_seed(4))
    assert indices == sorted(order[:len(indices)].tolist())


def test_sample_source_indices_is_deterministic_per_seed():
    first = sample_source_indices(500, 0.1, seed=5)
    assert first == sample_source_indices(500, 0.1, seed=5)
    assert first != sample_source_indices(500, 0.1, seed=6)
    assert sample_source_indices(10, 1.0, seed=3) == list(range(10))


@pytest.mark.parametrize("args, error", [((10, -0.1, 0), ValueError), ((10, 1.01, 0), ValueError),
                                         ((10, float("nan"), 0), ValueError),
                                         ((-1, 0.5, 0), ValueError), ((10.0, 0.5, 0), TypeError),
                                         ((10, "0.5", 0), TypeError), ((10, 0.5, 1.5), TypeError)])
def test_sample_source_indices_errors(args, error):
    with pytest.raises(error):
        sample_source_indices(*args)
