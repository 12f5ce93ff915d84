"""predict_probs (scales, flips, upsampling convention, modes) and evaluate / the evaluation CLI
end to end on a tiny synthetic set with a tiny DeepLab-v2 ResNet-18 checkpoint."""
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastst.checkpoint import checkpoint_state, load_model, save_checkpoint
from fastst.data import build_dataset
from fastst.data.ids import CLASS_NAMES
from fastst.data.synthetic import ensure_synthetic
from fastst.evaluate import evaluate, main
from fastst.inference import predict_probs
from fastst.models import deeplabv2

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
