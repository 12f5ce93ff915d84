"""predict_probs / predict_scores (scales, flips, upsampling conventions, modes), the released
evaluation protocols, evaluate / the evaluation CLI end to end on a tiny synthetic set with a tiny
DeepLab-v2 ResNet-18 checkpoint, and the Cityscapes benchmark files (writing, scoring, misses)."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import Subset

from fastst.checkpoint import checkpoint_state, save_checkpoint
from fastst.data import build_dataset
from fastst.data.ids import (CITYSCAPES_ID_TO_TRAIN_ID, CLASS_NAMES, CLASSES_16, PALETTE,
                             lookup_table)
from fastst.data.io import read_label, write_png_atomic
from fastst.data.synthetic import ensure_synthetic
from fastst.evaluate import PROTOCOLS, evaluate, main
from fastst.inference import predict_probs, predict_scores
from fastst.models import deeplabv2, load_model
from fastst.predictions import label_id_table, score_predictions, train_id_table

from helpers import mismatch

TINY = dict(num_train=1, num_val=2, height=32, width=64)
ONE_IMAGE = dict(num_train=1, num_val=1, height=32, width=64)


class HalfResolution(nn.Module):
    """3x3 conv (stride 1) then 2x2 average pooling: logits at half resolution. With a kernel
    symmetric under a horizontal flip the model commutes with flipping (for even widths)."""

    def __init__(self, num_classes=5, symmetric=False, batch_norm=False):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, num_classes, 3, padding=1)
        if symmetric:
            with torch.no_grad():
                self.conv.weight.copy_(0.5 * (self.conv.weight + self.conv.weight.flip(-1)))
        self.norm = nn.BatchNorm2d(num_classes) if batch_norm else nn.Identity()

    def forward(self, x):
        return F.avg_pool2d(self.norm(self.conv(x)), 2) * 3.0


def _images(seed=0, shape=(2, 3, 12, 20)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_single_scale_is_the_softmax_of_the_upsampled_logits():
    model = HalfResolution().eval()
    images = _images()
    probs = predict_probs(model, images, out_size=(15, 26))
    expected = torch.softmax(F.interpolate(model(images), size=(15, 26), mode="bilinear",
                                           align_corners=True), dim=1)
    assert probs.dtype == torch.float32 and probs.shape == (2, 5, 15, 26)
    assert torch.allclose(probs, expected, atol=1e-6), mismatch(expected, probs)
    assert not probs.requires_grad
    default_size = predict_probs(model, images)
    assert default_size.shape == (2, 5, 12, 20)


def test_multi_scale_and_flip_sum_softmax_maps():
    model = HalfResolution().eval()
    images = _images(1)
    probs = predict_probs(model, images, scales=(0.5, 1.5), flip=True)
    expected = 0
    for scale in (0.5, 1.5):
        size = (round(12 * scale), round(20 * scale))
        scaled = F.interpolate(images, size=size, mode="bilinear", align_corners=True)
        for flip in (False, True):
            logits = model(scaled.flip(-1) if flip else scaled)
            p = torch.softmax(F.interpolate(logits, size=(12, 20), mode="bilinear",
                                            align_corners=True), dim=1)
            expected = expected + (p.flip(-1) if flip else p)
    assert torch.allclose(probs, expected, atol=1e-5), mismatch(expected, probs)
    assert torch.allclose(probs.sum(1), torch.full((2, 12, 20), 4.0), atol=1e-5)
    # input_size sets the size seen at scale 1.0, whatever the image size
    resized = predict_probs(model, images, input_size=(6, 10))
    small = F.interpolate(images, size=(6, 10), mode="bilinear", align_corners=True)
    expected = torch.softmax(F.interpolate(model(small), size=(12, 20), mode="bilinear",
                                           align_corners=True), dim=1)
    assert torch.allclose(resized, expected, atol=1e-6), mismatch(expected, resized)


def test_flip_symmetric_model_is_flip_equivariant():
    model = HalfResolution(symmetric=True).eval()
    images = _images(2)
    plain = predict_probs(model, images, scales=(0.5, 1.0))
    flipped_input = predict_probs(model, images.flip(-1), scales=(0.5, 1.0))
    assert torch.allclose(flipped_input, plain.flip(-1), atol=1e-5), \
        mismatch(plain.flip(-1), flipped_input)
    with_flip = predict_probs(model, images, scales=(0.5, 1.0), flip=True)
    assert torch.allclose(with_flip, 2 * plain, atol=1e-5), mismatch(2 * plain, with_flip)
    # ... while a generic model is not, so the flip branch really mirrors back
    generic = HalfResolution().eval()
    assert not torch.allclose(predict_probs(generic, images, flip=True),
                              2 * predict_probs(generic, images), atol=1e-3)


def test_mode_is_left_to_the_caller_and_autocast_gives_float32():
    model = HalfResolution(batch_norm=True).train()
    images = _images(3)
    predict_probs(model, images)
    assert model.training and model.norm.training
    model.eval()
    reference = predict_probs(model, images)
    low = predict_probs(model, images, autocast_dtype=torch.bfloat16)
    assert not model.training
    assert low.dtype == torch.float32
    assert torch.allclose(low, reference, atol=0.05), mismatch(reference, low)


def test_bad_arguments_are_rejected():
    model = HalfResolution().eval()
    with pytest.raises(ValueError, match="B, 3, H, W"):
        predict_probs(model, torch.zeros(3, 8, 8))
    with pytest.raises(TypeError, match="float"):
        predict_probs(model, torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="scales"):
        predict_probs(model, torch.zeros(1, 3, 8, 8), scales=())
    with pytest.raises(ValueError, match="scales"):
        predict_probs(model, torch.zeros(1, 3, 8, 8), scales=(1.0, -0.5))
    with pytest.raises(ValueError, match="out_size"):
        predict_probs(model, torch.zeros(1, 3, 8, 8), out_size=(8,))


class ConstantClass(nn.Module):
    """Predicts class `cls` everywhere at output stride 8; has a BatchNorm to check modes."""

    def __init__(self, cls, num_classes=19):
        super().__init__()
        self.cls, self.num_classes = cls, num_classes
        self.norm = nn.BatchNorm2d(3)

    def forward(self, x):
        logits = torch.zeros(x.shape[0], self.num_classes, -(-x.shape[2] // 8),
                             -(-x.shape[3] // 8))
        logits[:, self.cls] = 10.0
        return logits + 0 * self.norm(x).mean()


def test_evaluate_counts_every_labelled_pixel_and_restores_modes(tmp_path):
    dataset = build_dataset("synthetic", tmp_path, "val", domain="source", synthetic=TINY)
    model = ConstantClass(cls=2).train()
    cm = evaluate(model, dataset, batch_size=2, progress=False)
    labels = torch.stack([dataset[i]["label"] for i in range(len(dataset))])
    histogram = torch.bincount(labels[labels != 255], minlength=19)
    assert torch.equal(cm.matrix[:, 2], histogram)
    assert cm.matrix.sum() == histogram.sum()
    assert model.training and model.norm.training
    assert cm.iou()[2] == pytest.approx(histogram[2].item() / histogram.sum().item())


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("checkpoint") / "tiny.pt"
    save_checkpoint(path, checkpoint_state(deeplabv2(num_classes=19, backbone="resnet18")))
    return path


def test_cli_writes_the_table_and_json(tmp_path, tiny_checkpoint, capsys):
    data_root = tmp_path / "data"
    domain_root = ensure_synthetic(data_root, "target", **ONE_IMAGE)
    mtimes = {p: p.stat().st_mtime_ns for p in domain_root.rglob("*") if p.is_file()}
    out = tmp_path / "results" / "eval.json"
    assert main(["--checkpoint", str(tiny_checkpoint), "--dataset", "synthetic", "--root",
                 str(data_root), "--domain", "target", "--scales", "0.75", "1.0", "--flip",
                 "--device", "cpu", "--workers", "0", "--no-progress", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "mIoU-19" in printed and "mIoU-16" in printed and "mIoU-13" in printed
    result = json.loads(out.read_text())
    assert {"miou", "miou16", "miou13", "iou", "scales", "flip", "checkpoint"} <= set(result)
    assert result["scales"] == [0.75, 1.0] and result["flip"] is True
    assert result["checkpoint"] == str(tiny_checkpoint)
    assert list(result["iou"]) == list(CLASS_NAMES)

    dataset = build_dataset("synthetic", data_root, "val", domain="target", synthetic=ONE_IMAGE)
    model = load_model(tiny_checkpoint).eval()
    cm = evaluate(model, dataset, scales=(0.75, 1.0), flip=True, progress=False)
    assert result["miou"] == pytest.approx(cm.miou())
    for name, value in zip(CLASS_NAMES, cm.iou().tolist()):
        assert result["iou"][name] == (None if value != value else pytest.approx(value))
    after = {p: p.stat().st_mtime_ns for p in domain_root.rglob("*") if p.is_file()}
    assert after == mtimes, "evaluating must reuse the existing synthetic tree"


def test_cli_reports_a_missing_checkpoint(tmp_path, capsys):
    missing = tmp_path / "nope.pt"
    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", str(missing), "--dataset", "synthetic", "--root", str(tmp_path),
              "--device", "cpu"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert str(missing) in error and "does not exist" in error
    with pytest.raises(SystemExit):
        main(["--checkpoint", str(missing), "--dataset", "cityscapes", "--root", str(tmp_path),
              "--domain", "target"])
    assert "--domain applies to --dataset synthetic only" in capsys.readouterr().err


# ----- the released evaluation protocols -----------------------------------------------------

def test_predict_scores_gives_the_released_orders_of_resize_softmax_and_flip():
    model = HalfResolution().eval()
    images = _images(4)
    up = lambda x, size: F.interpolate(x, size=size, mode="bilinear", align_corners=True)
    sizes = [(9, 15), (12, 20)]
    # CRST: logits upsampled to the output, flips and scales summed (crst_seg.py:585-595)
    logits = predict_scores(model, images, sizes, flip=True, out_size=(16, 24), combine="logits")
    expected = 0
    for size in sizes:
        scaled = up(images, size)
        expected = expected + up(model(scaled), (16, 24)) \
            + up(model(scaled.flip(-1)), (16, 24)).flip(-1)
    assert torch.allclose(logits, expected, atol=1e-5), mismatch(expected, logits)
    # IAST eval.py:81-91: softmax at the input size, the flip pair summed there, then resized
    iast = predict_scores(model, images, sizes, flip=True, out_size=(16, 24), at_input_size=True)
    expected = 0
    for size in sizes:
        scaled = up(images, size)
        pair = torch.softmax(up(model(scaled), size), 1) \
            + torch.softmax(up(model(scaled.flip(-1)), size), 1).flip(-1)
        expected = expected + up(pair, (16, 24))
    assert torch.allclose(iast, expected, atol=1e-5), mismatch(expected, iast)
    # IAST trainer.py:274-276: logits to the input size, then to the label
    single = predict_scores(model, images, [(9, 15)], out_size=(16, 24), combine="logits",
                            at_input_size=True)
    expected = up(up(model(up(images, (9, 15))), (9, 15)), (16, 24))
    assert torch.allclose(single, expected, atol=1e-5), mismatch(expected, single)
    # fastst's own order is predict_probs
    assert torch.allclose(predict_scores(model, images, sizes, flip=True),
                          predict_probs(model, images, scales=(0.75, 1.0), flip=True), atol=1e-6)
    with pytest.raises(ValueError, match="combine"):
        predict_scores(model, images, sizes, combine="mean")
    with pytest.raises(ValueError, match="sizes"):
        predict_scores(model, images, [])


def test_protocols_give_the_released_input_sizes():
    cityscapes = (1024, 2048)
    assert PROTOCOLS["iast_source_only"].sizes(cityscapes) == [(512, 1024)]
    assert PROTOCOLS["iast_warmup"].sizes(cityscapes) == [(640, 1280)]
    assert PROTOCOLS["iast_round"].sizes(cityscapes) == [(768, 1536)]
    # TEST.RESIZE_SIZE of Raykoooo/IAST code/config/*/run_task/sl_1.yaml:48 (W, H there)
    assert PROTOCOLS["iast_ms"].sizes(cityscapes) == [(512, 1024), (640, 1280), (768, 1536),
                                                      (900, 1800), (1024, 2048)]
    # yzou2/CRST crst_seg.py:580: F.interpolate(scale_factor=s) floors 921.6 and 2457.6
    assert PROTOCOLS["crst"].sizes(cityscapes) == [(921, 1843), (1024, 2048), (1228, 2457)]
    assert [(p.flip, p.combine, p.at_input_size) for p in
            (PROTOCOLS["iast_round"], PROTOCOLS["iast_ms"], PROTOCOLS["crst"])] == \
        [(False, "logits", True), (False, "softmax", True), (True, "logits", False)]


class SizeRecorder(ConstantClass):
    def __init__(self, cls):
        super().__init__(cls)
        self.sizes = []

    def forward(self, x):
        self.sizes.append(tuple(x.shape[-2:]))
        return super().forward(x)


def test_evaluate_runs_the_protocol_and_rejects_settings_it_fixes(tmp_path):
    dataset = build_dataset("synthetic", tmp_path, "val", domain="source", synthetic=ONE_IMAGE)
    model = SizeRecorder(cls=0)
    cm = evaluate(model, dataset, protocol="crst", progress=False)
    # 32x64 images: floor(0.9 * (32, 64)), the image size, floor(1.2 * (32, 64)), each flipped
    assert model.sizes == [(28, 57), (28, 57), (32, 64), (32, 64), (38, 76), (38, 76)]
    label = dataset[0]["label"]
    assert torch.equal(cm.matrix[:, 0], torch.bincount(label[label != 255], minlength=19))
    model.sizes.clear()
    evaluate(model, dataset, protocol="iast_ms", progress=False)
    assert model.sizes == [(16, 32), (20, 40), (24, 48), (28, 56), (32, 64)]
    with pytest.raises(ValueError, match="fixes the input sizes"):
        evaluate(model, dataset, protocol="crst", flip=True, progress=False)
    with pytest.raises(ValueError, match="unknown evaluation protocol 'iast'.*iast_ms"):
        evaluate(model, dataset, protocol="iast", progress=False)


# ----- Cityscapes benchmark files ------------------------------------------------------------

def _fake_cityscapes(root):
    """Two val images of 2x4 pixels in two cities, labelIds ground truth (7 road, 8 sidewalk,
    26 car, 0 unlabeled)."""
    gt = {"aachen": np.array([[7, 7, 7, 8], [8, 26, 26, 0]], np.uint8),
          "bremen": np.array([[26, 26, 8, 8], [7, 7, 7, 7]], np.uint8)}
    for city, ids in gt.items():
        base = f"{city}_000000_000019"
        write_png_atomic(root / "leftImg8bit" / "val" / city / f"{base}_leftImg8bit.png",
                         np.zeros((2, 4, 3), np.uint8))
        write_png_atomic(root / "gtFine" / "val" / city / f"{base}_gtFine_labelIds.png", ids)
    return gt


def test_predictions_outside_the_classes_are_misses(tmp_path, capsys):
    _fake_cityscapes(tmp_path / "cityscapes")
    results = tmp_path / "results"
    # label ids 0 (unlabeled) and 9 (parking) are no scored class: misses of the true class
    write_png_atomic(results / "aachen" / "aachen_000000_000019_pred.png",
                     np.array([[7, 0, 8, 8], [9, 26, 7, 26]], np.uint8))
    write_png_atomic(results / "bremen" / "bremen_000000_000019_pred.png",
                     np.array([[26, 26, 8, 8], [7, 7, 7, 7]], np.uint8))
    out = tmp_path / "eval.json"
    assert main(["--predictions", str(results), "--dataset", "cityscapes", "--root",
                 str(tmp_path / "cityscapes"), "--json", str(out)]) == 0
    iou = json.loads(out.read_text())["iou"]
    # road: TP 1 + 4, FN 1 (sidewalk) + miss 1 (id 0), FP 1 (a car pixel) -> 5 / 8
    # sidewalk: TP 1 + 2, miss 1 (id 9), FP 1 (a road pixel) -> 3 / 5
    # car: TP 1 + 2, FN 1 (road); the car predicted on the unlabeled pixel is ignored -> 3 / 4
    assert (iou["road"], iou["sidewalk"], iou["car"]) == pytest.approx((5 / 8, 3 / 5, 3 / 4))
    assert iou["building"] is None
    assert json.loads(out.read_text())["miou"] == pytest.approx((5 / 8 + 3 / 5 + 3 / 4) / 3)
    assert "predictions" in json.loads(out.read_text())

    write_png_atomic(results / "bremen" / "bremen_000000_000019_color.png",
                     np.zeros((2, 4), np.uint8))
    with pytest.raises(SystemExit):
        main(["--predictions", str(results), "--dataset", "cityscapes", "--root",
              str(tmp_path / "cityscapes")])
    assert "expected one prediction bremen_000000_000019*.png" in capsys.readouterr().err
    (results / "bremen" / "bremen_000000_000019_color.png").unlink()
    write_png_atomic(results / "aachen" / "aachen_000000_000019_pred.png",
                     np.full((2, 4), 255, np.uint8))
    with pytest.raises(SystemExit):
        main(["--predictions", str(results), "--dataset", "cityscapes", "--root",
              str(tmp_path / "cityscapes")])
    assert "not a Cityscapes label id" in capsys.readouterr().err


def test_saved_predictions_round_trip_through_the_label_table(tmp_path, tiny_checkpoint):
    data_root = tmp_path / "data"
    ensure_synthetic(data_root, "target", **TINY)
    out = tmp_path / "benchmark"
    assert main(["--checkpoint", str(tiny_checkpoint), "--dataset", "synthetic", "--root",
                 str(data_root), "--device", "cpu", "--workers", "0", "--no-progress",
                 "--save-predictions", str(out)]) == 0
    dataset = build_dataset("synthetic", data_root, "val", domain="target", synthetic=TINY)
    model = load_model(tiny_checkpoint).eval()
    to_train_ids = lookup_table(CITYSCAPES_ID_TO_TRAIN_ID, 256)
    for index in range(len(dataset)):
        item = dataset[index]
        pred = predict_probs(model, item["image"][None]).argmax(1)[0].numpy()
        base = item["name"][:-len("_leftImg8bit")]
        city = base.split("_")[0]
        label_ids = read_label(out / "labelIds" / city / f"{base}_labelIds.png")
        assert np.array_equal(to_train_ids[label_ids], pred)
        colour = np.asarray(Image.open(out / "color" / city / f"{base}_color.png").convert("RGB"))
        assert np.array_equal(colour, np.array(PALETTE, np.uint8)[pred])
    # scoring the files gives the model's matrix
    cm = evaluate(model, dataset, progress=False)
    scored = score_predictions(dataset, out / "labelIds")
    assert torch.equal(scored.matrix, cm.matrix) and scored.missed.sum() == 0


def test_label_id_tables_invert_each_other():
    for classes in (tuple(range(19)), CLASSES_16):
        to_ids, to_train = label_id_table(classes), train_id_table(classes)
        k = np.arange(len(classes))
        assert np.array_equal(to_train[to_ids[k]], k)
        assert to_ids[255] == 0 and to_train[0] == 255    # ignore -> unlabeled -> ignore
    assert label_id_table()[:3].tolist() == [7, 8, 11]
    assert label_id_table(CLASSES_16)[9] == 23             # 16-class id 9 is sky


def test_benchmark_files_need_a_cityscapes_layout(tmp_path, tiny_checkpoint, capsys):
    with pytest.raises(SystemExit):
        main(["--checkpoint", str(tiny_checkpoint), "--dataset", "gta5", "--root",
              str(tmp_path), "--save-predictions", str(tmp_path / "out")])
    assert "--save-predictions needs Cityscapes benchmark files" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--checkpoint", str(tiny_checkpoint), "--dataset", "synthetic", "--root",
              str(tmp_path), "--protocol", "crst", "--scales", "1.0"])
    assert "--protocol crst fixes the input sizes and flips; drop --scales" in \
        capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--checkpoint", str(tiny_checkpoint), "--dataset", "synthetic", "--root",
              str(tmp_path), "--protocol", "iast"])
    assert "invalid choice: 'iast'" in capsys.readouterr().err
    dataset = build_dataset("synthetic", tmp_path, "val", domain="source", synthetic=ONE_IMAGE)
    with pytest.raises(ValueError, match="Cityscapes-layout"):
        evaluate(ConstantClass(0), Subset(dataset, [0]), save_predictions=tmp_path / "out",
                 progress=False)
