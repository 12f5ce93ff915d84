"""Class sets (fastst.data.ids.ClassSet, config key data.class_set): the 16-class SYNTHIA set
of CRST/TPLD against CRST's label tables, SYNTHIA/Cityscapes/GTA5 labels read with 16 classes,
mIoU-16/-13 of a 16-class confusion matrix, the palette, config validation and a 16-class
TPLD run end to end (data maps, model head, pseudo labels, evaluation, the evaluate CLI)."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from fastst import train
from fastst.checkpoint import load_checkpoint
from fastst.config import ConfigError, load_config
from fastst.data import build_dataset, save_pseudo_labels
from fastst.data.ids import (CLASS_NAMES, CLASS_SETS, PALETTE, SYNTHIA_ID_TO_TRAIN_ID,
                             class_set_for, get_class_set)
from fastst.evaluate import main as evaluate_main
from fastst.evaluate import results_dict
from fastst.methods.context import colorize
from fastst.methods.datasets import build_role
from fastst.metrics import ConfusionMatrix
from test_data import random_image, save_png, write_png
from test_train import _scene, fixture_root, restore_threads, tiny_overrides  # noqa: F401

# yzou2/CRST dataset/helpers/labels_synthia.py:63-85, (SYNTHIA id, trainId) of every Label row
# whose trainId is not 255 (void 0, parking-slot 13, road-work 14, terrain 16, truck 18 and
# train 20 are 255). Lane marking (id 22) has trainId 0, road's.
CRST_SYNTHIA_16 = {1: 9, 2: 2, 3: 0, 4: 1, 5: 4, 6: 8, 7: 5, 8: 12, 9: 7, 10: 10, 11: 15, 12: 14,
                   15: 6, 17: 11, 19: 13, 21: 3, 22: 0}
# yzou2/CRST dataset/helpers/labels_cityscapes_synthia.py:63-97, (Cityscapes id, trainId) of the
# rows whose trainId is not 255 (terrain 22, truck 27, train 31 are 255 there); crst_seg.py:292-302
# maps the Cityscapes ground truth with it when --data-src synthia.
CRST_CITYSCAPES_16 = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 23: 9, 24: 10,
                      25: 11, 26: 12, 28: 13, 32: 14, 33: 15}
# The names of CRST's trainIds 0..15 in labels_cityscapes_synthia.py.
CRST_NAMES_16 = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
                 "traffic sign", "vegetation", "sky", "person", "rider", "car", "bus",
                 "motorcycle", "bicycle")
# Raykoooo/IAST code/sseg/datasets/loader/synthia_dataset.py:22-24: the 19-class SYNTHIA map of
# the released IAST loader (no lane marking), with NUM_CLASSES: 19 in
# code/config/syn2cityscapes_v100_1/run_task/source_only.yaml:9-10.
IAST_SYNTHIA_19 = {3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 16: 9, 1: 10, 10: 11,
                   17: 12, 8: 13, 18: 14, 19: 15, 20: 16, 12: 17, 11: 18}

SYNTHIA16 = CLASS_SETS["synthia16"]


def test_synthia16_is_crsts_label_space():
    assert SYNTHIA16.num_classes == 16
    assert SYNTHIA16.names == CRST_NAMES_16
    assert SYNTHIA16.synthia_ids == CRST_SYNTHIA_16
    assert SYNTHIA16.cityscapes_ids == CRST_CITYSCAPES_16
    assert SYNTHIA16.palette == tuple(PALETTE[CLASS_NAMES.index(n)] for n in CRST_NAMES_16)
    nineteen = get_class_set(None)
    assert nineteen.name == "cityscapes19" and nineteen.names == CLASS_NAMES
    assert nineteen.synthia_ids == IAST_SYNTHIA_19 == SYNTHIA_ID_TO_TRAIN_ID
    assert class_set_for(16) is SYNTHIA16 and class_set_for(19) is nineteen
    assert class_set_for(5) is None
    with pytest.raises(ValueError, match="valid class sets: cityscapes19, synthia16"):
        get_class_set("synthia13")


def test_miou_subsets_of_each_class_set():
    wall_fence_pole = {CRST_NAMES_16.index(n) for n in ("wall", "fence", "pole")}
    assert dict((k, ids) for k, _, ids in SYNTHIA16.miou_subsets()) == {
        "miou16": tuple(range(16)),
        "miou13": tuple(c for c in range(16) if c not in wall_fence_pole)}
    nineteen = dict((k, ids) for k, _, ids in CLASS_SETS["cityscapes19"].miou_subsets())
    terrain_truck_train = {CLASS_NAMES.index(n) for n in ("terrain", "truck", "train")}
    assert nineteen["miou16"] == tuple(c for c in range(19) if c not in terrain_truck_train)
    assert nineteen["miou13"] == tuple(c for c in nineteen["miou16"] if c not in (3, 4, 5))


# One row of SYNTHIA ids: the 19 of IAST's map, lane marking 22, void 0, parking-slot 13,
# road-work 14 and a 16-bit id whose low byte is road's (259 = 256 + 3).
SYNTHIA_ROW = [3, 22, 4, 2, 21, 5, 7, 15, 9, 6, 16, 1, 10, 17, 8, 18, 19, 20, 12, 11, 0, 13, 14, 259]
SYNTHIA_ROW_16 = [0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 255, 9, 10, 11, 12, 255, 13, 255, 14, 15, 255, 255,
                  255, 255]
SYNTHIA_ROW_19 = [0, 255, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 255, 255,
                  255, 255]


def make_synthia_row_tree(root):
    """A SYNTHIA tree of one 2 x 24 image whose label (16-bit RGBA, id in channel 0) holds
    SYNTHIA_ROW and its reverse."""
    ids = np.array([SYNTHIA_ROW, SYNTHIA_ROW[::-1]], dtype=np.uint16)
    other = np.full(ids.shape, 65535, dtype=np.uint16)
    write_png(root / "GT" / "LABELS" / "0000000.png", np.stack([ids, other, other, other], -1), 6)
    save_png(root / "RGB" / "0000000.png", random_image(np.random.default_rng(0), *ids.shape))


def test_synthia_tree_read_with_16_and_19_classes(tmp_path):
    make_synthia_row_tree(tmp_path)
    label16 = build_dataset("synthia", tmp_path, "all", class_set="synthia16")[0]["label"]
    assert label16.tolist() == [SYNTHIA_ROW_16, SYNTHIA_ROW_16[::-1]]
    label19 = build_dataset("synthia", tmp_path, "all")[0]["label"]
    assert label19.tolist() == [SYNTHIA_ROW_19, SYNTHIA_ROW_19[::-1]]


# Cityscapes label ids 0..33 in order, and their train ids in the 16-class set.
CITYSCAPES_ROW_16 = [255] * 7 + [0, 1, 255, 255, 2, 3, 4, 255, 255, 255, 5, 255, 6, 7, 8, 255, 9,
                                 10, 11, 12, 255, 13, 255, 255, 255, 14, 15]
# Cityscapes train ids 0..18 and 255 (a *_labelTrainIds.png) in the 16-class set.
TRAIN_IDS_ROW_16 = [0, 1, 2, 3, 4, 5, 6, 7, 8, 255, 9, 10, 11, 12, 255, 13, 255, 14, 15, 255]


def test_cityscapes_and_gta5_labels_mapped_to_16_classes(tmp_path):
    rng = np.random.default_rng(1)
    city = tmp_path / "cs"
    for base, label in (("aachen_000000_000019", "gtFine_labelIds"),
                        ("aachen_000001_000019", "gtFine_labelTrainIds")):
        row = list(range(34)) if label == "gtFine_labelIds" else list(range(19)) + [255]
        save_png(city / "leftImg8bit" / "val" / "aachen" / f"{base}_leftImg8bit.png",
                 random_image(rng, 1, len(row)))
        save_png(city / "gtFine" / "val" / "aachen" / f"{base}_{label}.png",
                 np.array([row], dtype=np.uint8))
    cityscapes = build_dataset("cityscapes", city, "val", class_set="synthia16")
    assert cityscapes[0]["label"].tolist() == [CITYSCAPES_ROW_16]
    assert cityscapes[1]["label"].tolist() == [TRAIN_IDS_ROW_16]
    gta = tmp_path / "gta"
    save_png(gta / "images" / "00001.png", random_image(rng, 1, 34))
    save_png(gta / "labels" / "00001.png", np.arange(34, dtype=np.uint8)[None])
    assert build_dataset("gta5", gta, "all", class_set="synthia16")[0]["label"].tolist() == \
        [CITYSCAPES_ROW_16]


def test_16_class_confusion_matrix_reports_miou16_and_miou13():
    # Two pixels of every class; both wall pixels predicted road, one car pixel predicted bus.
    target = torch.arange(16).repeat_interleave(2)
    pred = target.clone()
    pred[6:8] = 0                 # wall (3) -> road (0)
    pred[24] = 13                 # car (12) -> bus (13)
    cm = ConfusionMatrix(16).update(pred, target)
    iou = cm.iou().tolist()
    # road: 2 / (2 + 4 - 2); wall: 0 / 2; car: 1 / (2 + 1 - 1); bus: 2 / (2 + 3 - 2)
    assert iou[0] == pytest.approx(1 / 2) and iou[3] == 0.0
    assert iou[12] == pytest.approx(1 / 2) and iou[13] == pytest.approx(2 / 3)
    miou16 = (1 / 2 + 0 + 1 / 2 + 2 / 3 + 12) / 16
    miou13 = (1 / 2 + 1 / 2 + 2 / 3 + 10) / 13       # no wall, fence, pole
    summary = cm.summary()
    assert set(summary) == {"miou", "miou16", "miou13", "iou"}
    assert summary["miou"] == summary["miou16"] == pytest.approx(miou16)
    assert summary["miou13"] == pytest.approx(miou13)
    lines = cm.table().splitlines()
    assert lines[1].split() == ["road", "50.00"] and lines[10].split() == ["sky", "100.00"]
    assert lines[17:] == [f"mIoU-16        {100 * miou16:5.2f}", f"mIoU-13        {100 * miou13:5.2f}"]
    result = results_dict(cm, [])
    assert list(result["iou"]) == list(CRST_NAMES_16)
    assert result["miou16"] == pytest.approx(miou16) and result["miou13"] == pytest.approx(miou13)
    with pytest.raises(ValueError, match="class set 'cityscapes19' has 19 classes, the confusion "
                                         "matrix 16"):
        cm.summary("cityscapes19")
    assert set(ConfusionMatrix(5).summary()) == {"miou", "iou"}
    assert ConfusionMatrix(5).table().splitlines()[-1].startswith("mIoU ")


def test_16_class_palette_for_pseudo_labels_and_images(tmp_path):
    sky = CRST_NAMES_16.index("sky")
    labels = torch.tensor([[[0, sky, 255]]], dtype=torch.uint8)
    save_pseudo_labels(tmp_path, ["a"], labels, colour=True, num_classes=16)
    with Image.open(tmp_path / "a_pseudo_color.png") as im:
        assert im.convert("RGB").getpixel((1, 0)) == (70, 130, 180)       # sky, not terrain
        assert im.convert("RGB").getpixel((2, 0)) == (0, 0, 0)
    assert colorize(labels, 16)[0, :, 0, 1].tolist() == [70, 130, 180]
    assert colorize(labels)[0, :, 0, 1].tolist() == list(PALETTE[9])      # 19 classes: terrain


def test_presets_and_config_validation():
    tpld = load_config("tpld_synthia")
    assert tpld["num_classes"] == 16 and tpld["data"]["class_set"] == "synthia16"
    iast = load_config("iast_synthia")
    assert iast["num_classes"] == 19 and iast["data"]["class_set"] == "cityscapes19"
    with pytest.raises(ConfigError) as info:
        load_config("tpld_synthia", ["num_classes=19"])
    assert str(info.value) == ("num_classes = 19 does not match data.class_set=synthia16, which "
                               "has 16 classes; set num_classes=16 (or data.class_set="
                               "cityscapes19 with num_classes=19)")
    with pytest.raises(ConfigError, match="num_classes = 16 does not match data.class_set="
                                          "cityscapes19, which has 19 classes"):
        load_config("iast_synthia", ["num_classes=16"])
    with pytest.raises(ConfigError, match="data.class_set must be one of cityscapes19, synthia16, "
                                          "got 'synthia13'"):
        load_config("tpld_synthia", ["data.class_set=synthia13"])
    assert load_config("iast_gta5", ["num_classes=16", "data.class_set=synthia16"])[
        "data"]["class_set"] == "synthia16"


# Cityscapes label ids of the test_train scenes (road, sidewalk, building, vegetation, sky, car)
# as SYNTHIA ids (CRST labels_synthia.py:64-71).
SYNTHIA_OF_CITYSCAPES = {7: 3, 8: 4, 11: 2, 21: 6, 23: 1, 26: 8}


def make_synthia_scenes(root, n=6):
    """test_train's source scenes in the SYNTHIA layout (16-bit RGB labels), the road of every
    fourth row lane marking. Returns the first label's SYNTHIA ids."""
    rng = np.random.default_rng(0)
    first = None
    for i in range(n):
        image, cityscapes_ids = _scene(rng, 0)
        ids = np.vectorize(SYNTHIA_OF_CITYSCAPES.get)(cityscapes_ids).astype(np.uint16)
        rows = ids[::4]
        rows[rows == 3] = 22
        save_png(root / "RGB" / f"{i:07d}.png", image)
        write_png(root / "GT" / "LABELS" / f"{i:07d}.png", np.stack([ids, ids, ids], -1), 2)
        first = ids if first is None else first
    return first


def test_16_class_tpld_run_end_to_end(fixture_root, tmp_path, capsys):
    synthia = tmp_path / "SYNTHIA"
    ids = make_synthia_scenes(synthia)
    stages = ("source_only", "phase1_1")
    config = load_config("tpld_synthia", tiny_overrides(fixture_root, stages=stages, **{
        "pipeline": "[source_only, phase1_1]", "data.source.root": synthia,
        "stages.phase1_1.source_portion": 0.5, "runtime.tensorboard": "false"}))
    source, val = build_role(config, "source"), build_role(config, "val")
    assert (ids == 22).any()
    expected = np.vectorize(lambda v: CRST_SYNTHIA_16.get(int(v), 255))(ids)
    assert source[0]["label"].tolist() == expected.tolist()     # lane marking (22) is road (0)
    # val: road 0, sidewalk 1, building 2, vegetation 8, sky 9, car 12 (19 classes: 10 and 13)
    assert set(torch.unique(val[0]["label"]).tolist()) <= {0, 1, 2, 8, 9, 12}
    assert 9 in torch.unique(torch.cat([val[i]["label"].flatten() for i in range(len(val))]))

    out = tmp_path / "run"
    summary = train.run_pipeline(config, out)
    state = load_checkpoint(out / "phase1_1" / "last.pt")
    assert state["model_config"]["num_classes"] == 16
    manifest = json.loads((out / "phase1_1" / "pseudo" / "manifest.json").read_text())
    assert len(manifest["lambdas"]) == 16 and manifest["class_names"] == list(CRST_NAMES_16)
    pseudo = [np.asarray(Image.open(p)) for p in (out / "phase1_1" / "pseudo").rglob(
        "*_pseudo_label.png")]
    assert len(pseudo) == 6 and all(((p < 16) | (p == 255)).all() for p in pseudo)
    result = json.loads((out / "phase1_1" / "result.json").read_text())
    assert list(result["iou"]) == list(CRST_NAMES_16)
    assert result["miou16"] == result["miou"] and result["miou13"] is not None
    assert list(result["pseudo"]["quality"]["p_iou"]) == list(CRST_NAMES_16)
    assert summary["stages"][-1]["miou13"] == result["miou13"]

    capsys.readouterr()
    report = tmp_path / "eval.json"
    assert evaluate_main(["--checkpoint", str(out / "phase1_1" / "last.pt"), "--dataset",
                          "cityscapes", "--root", str(fixture_root / "cityscapes"), "--device",
                          "cpu", "--workers", "0", "--no-progress", "--json", str(report)]) == 0
    table = capsys.readouterr().out
    assert "mIoU-16" in table and "mIoU-13" in table and "mIoU-19" not in table
    evaluated = json.loads(report.read_text())
    assert evaluated["miou"] == pytest.approx(result["miou"], abs=1e-12)
    assert evaluated["miou13"] == pytest.approx(result["miou13"], abs=1e-12)
    with pytest.raises(SystemExit):
        evaluate_main(["--checkpoint", str(out / "phase1_1" / "last.pt"), "--dataset",
                       "cityscapes", "--root", str(fixture_root / "cityscapes"), "--device",
                       "cpu", "--class-set", "cityscapes19"])
    assert "--class-set cityscapes19 has 19 classes but the model predicts 16" in \
        capsys.readouterr().err
