"""Where the teacher targets of the class-balanced rounds come from (fastst.methods.cbst): the
pass's own probabilities, mapped onto each training crop by the rule that carries its pseudo label
there, for TPLD phase 2's easy crops and CRST-LRENT's target crops (crop geometry recorded by
CropRecorder / CropGeometry, pass_map_on_crop).

The released CRST code makes LRENT's soft labels from the pass's stored probabilities
(yzou2/CRST crst_seg.py:461-478 saves the 0.9-scale + flip softmax, :679-683 makes the soft labels
from it, deeplab/datasets.py SoftGTA5StMineDataSet crops them with the image), and TPLD's easy
targets (Eq. 3) are pseudo labels made with the class thresholds from those probabilities."""
import copy

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import default_collate

from fastst.methods.labelling import pass_probabilities
from fastst.config import load_config
from fastst.data.pseudo_label import PseudoLabelDataset, pseudo_label_path
from fastst.methods import tpld as tpld_module
from fastst.methods import cbst as cbst_module
from fastst.methods.cbst import CBSTRound, CropGeometry, CropRecorder, pass_map_on_crop
from fastst.methods.context import RunContext
from fastst.methods.datasets import build_role, crop_transform
from fastst.methods.tpld import TPLDPhase2
from fastst.models import deeplabv2
from fastst.ops import cbst_pseudo_label, tpld_soft_targets
from test_train import fixture_root, restore_threads, tiny_overrides  # noqa: F401

STAGES = ("source_only", "phase1_1", "phase2_1")
PSEUDO_SIZE = (16, 32)  # the fixture images are 32x64: the label map is upsampled to them


def make_config(root, *, preset="tpld_gta5", stages=STAGES, **extra):
    overrides = tiny_overrides(root, stages=stages, **{
        "runtime.tensorboard": "false", "data.target.crop_height_range": "[12, 32]", **extra})
    return load_config(preset, overrides)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    net = deeplabv2(num_classes=19, backbone="resnet18_w16")
    with torch.no_grad():  # sharper logits than a fresh head: lambdas < 1, confident pixels
        for conv in net.classifier.convs:
            conv.weight.mul_(30)
    return net.eval()


def labelled_stage(stage_class, config, name, model, tmp_path):
    """A stage of ``config`` whose pass has labelled the target set with ``model``."""
    stage = stage_class(RunContext(config=config, run_dir=tmp_path, seed=0,
                                   device=torch.device("cpu")), name)
    stage.init_model = lambda: copy.deepcopy(model)
    stage.manifest = stage.label_pass(model, stage.pseudo_dir)
    return stage


def pass_labels(stage, name):
    """The pass's label map of image ``name``: uint8 (Hp, Wp)."""
    return torch.from_numpy(np.array(Image.open(pseudo_label_path(
        stage.pseudo_dir / "labels", name))))


def test_crop_recorder_keeps_the_items_and_maps_the_pass_labels_onto_each_crop(
        fixture_root, model, tmp_path):
    """CropRecorder gives the transform's own crops, and pass_map_on_crop applied to a pass's
    label map gives exactly the pseudo label PseudoLabelDataset puts on the same crop."""
    config = make_config(fixture_root)
    stage = labelled_stage(TPLDPhase2, config, "phase2_1", model, tmp_path)
    transform = crop_transform(config, "target")
    plain = build_role(config, "target", transform=transform, seed=5)
    recorded = CropGeometry(build_role(config, "target", transform=CropRecorder(transform), seed=5))
    labelled = PseudoLabelDataset(build_role(config, "target"), stage.pseudo_dir / "labels",
                                  transform=transform, seed=5)
    flips, heights = set(), set()
    for epoch in range(3):
        for dataset in (plain, recorded, labelled):
            dataset.set_epoch(epoch)
        for index in range(len(plain)):
            item, expected = recorded[index], plain[index]
            assert torch.equal(item["image"], expected["image"])
            assert item["name"] == expected["name"]
            assert int(item["index"]) == index and item["image_size"].tolist() == [32, 64]
            label = pass_labels(stage, item["name"])[None]
            crop = pass_map_on_crop(label, item["box"], item["image_size"], bool(item["flipped"]),
                                    item["image"].shape[-2:])[0]
            assert torch.equal(crop.long(), labelled[index]["label"])
            flips.add(bool(item["flipped"]))
            heights.add(int(item["box"][2]))
    assert flips == {False, True} and len(heights) > 3, "the fixture must flip and rescale"
    with pytest.raises(TypeError, match="RandomSizedCrop"):
        CropRecorder(transform.transforms[1])


def test_easy_targets_are_the_pass_probabilities_and_labels_on_each_crop(fixture_root, model,
                                                                        tmp_path):
    """TPLD phase 2: teacher_probs of an easy batch is the pass's mean softmax (pseudo_size,
    0.9 scale + flip) mapped onto each crop, so its confident map is the pass's pseudo label on
    the crop and q >= 1 selects what the pass selected; the teacher run on the crop itself does
    not."""
    config = make_config(fixture_root)
    stage = labelled_stage(TPLDPhase2, config, "phase2_1", model, tmp_path)
    stage.teacher_model = stage.teacher()
    lambdas = torch.tensor(stage.manifest["lambdas"])
    assert stage.manifest["settings"]["vote"] is None and min(lambdas) < 1
    pass_set = build_role(config, "target", resize=PSEUDO_SIZE)
    crops = CropGeometry(build_role(config, "target", transform=CropRecorder(
        crop_transform(config, "target")), seed=3))
    agree_on_crop = []
    for epoch in range(2):
        crops.set_epoch(epoch)
        batch = default_collate([crops[i] for i in range(len(crops))])
        probs = stage.teacher_probs(batch)
        confident = cbst_pseudo_label(probs, lambdas)
        for b, name in enumerate(batch["name"]):
            geometry = (batch["box"][b], batch["image_size"][b], bool(batch["flipped"][b]),
                        probs.shape[-2:])
            image = pass_set[int(batch["index"][b])]["image"][None]
            full = pass_probabilities(model, image, stage.ctx, scales=(0.9,), flip=True)[0]
            torch.testing.assert_close(probs[b], pass_map_on_crop(full, *geometry),
                                       rtol=1e-5, atol=1e-6)
            expected = pass_map_on_crop(pass_labels(stage, name)[None], *geometry)[0]
            assert torch.equal(confident[b], expected)
        on_crop = cbst_pseudo_label(torch.softmax(torch.nn.functional.interpolate(
            model(batch["image"]), size=probs.shape[-2:], mode="bilinear", align_corners=True),
            1), lambdas)
        agree_on_crop.append(bool(torch.equal(on_crop, confident)))
    assert (confident != 255).any() and (confident == 255).any()
    assert not all(agree_on_crop), "the fixture must tell the crop's teacher from the pass's"


def test_phase2_step_trains_easy_crops_on_the_pass_targets(fixture_root, model, tmp_path,
                                                           monkeypatch):
    """One phase-2 step: the bootstrapping loss of the easy crops gets the pass's label on each
    crop as its confident map and tpld_soft_targets of the pass's probabilities elsewhere."""
    config = make_config(fixture_root, **{"stages.phase2_1.easy_portion": 0.34,
                                          "stages.phase2_1.batch_size": 2,
                                          "stages.phase2_1.soft_targets": "pass"})
    stage = labelled_stage(TPLDPhase2, config, "phase2_1", model, tmp_path)
    calls = {}
    original = stage.teacher_probs
    monkeypatch.setattr(stage, "teacher_probs",
                        lambda batch: calls.setdefault("probs", (batch, original(batch)))[1])

    def spy(logits, target, lambdas, **kwargs):
        calls["loss"] = (target, kwargs)
        return real(logits, target, lambdas, **kwargs)

    real = tpld_module.bootstrap_loss
    monkeypatch.setattr(tpld_module, "bootstrap_loss", spy)
    student = copy.deepcopy(model)
    stage.setup(student)
    stage.step(student, 0)
    batch, probs = calls["probs"]
    target, kwargs = calls["loss"]
    assert set(batch["index"].tolist()) <= set(stage.division["easy_indices"])
    for b, name in enumerate(batch["name"]):
        expected = pass_map_on_crop(pass_labels(stage, name)[None], batch["box"][b],
                                    batch["image_size"][b], bool(batch["flipped"][b]),
                                    probs.shape[-2:])[0]
        assert torch.equal(target[b], expected)
    lambdas = torch.tensor(stage.manifest["lambdas"])
    assert torch.equal(kwargs["soft_target"], tpld_soft_targets(probs, lambdas, gamma=2.0))
    assert "teacher_logits" not in kwargs


def test_lrent_soft_labels_come_from_the_pass_on_target_crops_only(fixture_root, model, tmp_path,
                                                                   monkeypatch):
    """CRST-LRENT: the soft labels of a mixed batch are made from the pass's probabilities on
    its target crops (zero on source crops, whose soft labels the loss does not read)."""
    config = make_config(fixture_root, preset="crst_gta5", stages=("source_only", "round1"),
                         **{"pipeline": "[source_only, round1]", "stages.round1.loss": "lrent",
                            "stages.round1.source_portion": 0.5, "stages.round1.batch_size": 4})
    stage = labelled_stage(CBSTRound, config, "round1", model, tmp_path)
    seen = []
    real = cbst_module.lrent_soft_labels
    monkeypatch.setattr(cbst_module, "lrent_soft_labels",
                        lambda probs, *args: seen.append(probs) or real(probs, *args))
    student = copy.deepcopy(model)
    stage.setup(student)
    batches = stage.mixed.batches(start=0)
    pass_set = build_role(config, "target", resize=PSEUDO_SIZE)
    targets = sources = 0
    for iteration in range(3):
        batch = next(batches)
        stage.loss(student(batch["image"]), batch, batch["label"], batch["is_target"])
        for b in range(len(batch["name"])):
            if not batch["is_target"][b]:
                assert not seen[-1][b].any()
                sources += 1
                continue
            full = pass_probabilities(model, pass_set[int(batch["index"][b])]["image"][None],
                                      stage.ctx, scales=(0.9,), flip=True)[0]
            torch.testing.assert_close(seen[-1][b], pass_map_on_crop(
                full, batch["box"][b], batch["image_size"][b], bool(batch["flipped"][b]),
                batch["image"].shape[-2:]), rtol=1e-5, atol=1e-6)
            targets += 1
    assert targets and sources
