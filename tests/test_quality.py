"""Pseudo-label quality (fastst.quality): labelled proportion and P-mIoU against hand counts, and
their place in a pipeline's result.json, summary.json and final table."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from fastst import train
from fastst.config import load_config
from fastst.data.pseudo_label import pseudo_label_path
from fastst.quality import pseudo_label_quality
from test_train import fixture_root, restore_threads, tiny_overrides  # noqa: F401


class Truth:
    """A labelled data set of two 2x4 images."""

    def __init__(self, labels):
        self.labels = labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return {"label": self.labels[index], "name": f"img{index}"}


def _write(label_dir, name, array):
    label_dir.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(pseudo_label_path(label_dir, name))


def test_p_miou_and_proportion_match_hand_counts(tmp_path):
    truth = [torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]]), torch.tensor([[0, 1, 1, 1],
                                                                      [2, 2, 2, 0]])]
    _write(tmp_path, "img0", [[0, 1, 1, 255], [2, 255, 0, 255]])
    _write(tmp_path, "img1", [[0, 1, 255, 255], [2, 2, 2, 0]])
    quality = pseudo_label_quality(tmp_path, Truth(truth), 3, ["a", "b", "c"])
    # Labelled pixels (pseudo != 255): 5 + 6 of 16 (classes 0/1/2: 4, 3, 4). Pairs (pseudo,
    # truth) where both are valid: img0: (0,0) (1,0) (1,1) (2,2); img1: (0,0) (1,1) (2,2) x3
    # (0,0); img0's last 0 lies on truth 255 and is not scored.
    # class 0: tp 3, fp 0, fn 1 -> 3/4; class 1: tp 2, fp 1 -> 2/3; class 2: tp 4 -> 1.
    assert quality["labelled_proportion"] == pytest.approx(11 / 16)
    assert quality["p_iou"] == pytest.approx({"a": 3 / 4, "b": 2 / 3, "c": 1.0})
    assert quality["p_miou"] == pytest.approx((3 / 4 + 2 / 3 + 1) / 3)
    assert quality["labelled_proportion_per_class"] == pytest.approx([4 / 16, 3 / 16, 4 / 16])


def test_no_labels_gives_none(tmp_path):
    _write(tmp_path, "img0", [[0, 1], [1, 0]])
    assert pseudo_label_quality(tmp_path, Truth([torch.full((2, 2), 255)]), 2) is None


def test_rounds_report_quality_in_results_summary_and_table(fixture_root, tmp_path):
    overrides = tiny_overrides(fixture_root, stages=("source_only", "round1"), **{
        "pipeline": "[source_only, round1]", "runtime.tensorboard": "false"})
    config = load_config("iast_gta5", overrides)
    summary = train.run_pipeline(config, tmp_path / "run")
    result = json.loads((tmp_path / "run" / "round1" / "result.json").read_text())
    quality = result["pseudo"]["quality"]
    # Both count labelled pixels over all pixels at the pseudo-label size.
    assert quality["labelled_proportion"] == pytest.approx(result["pseudo"]["labelled_fraction"])
    assert quality["p_miou"] is None or 0.0 <= quality["p_miou"] <= 1.0
    round1 = next(s for s in summary["stages"] if s["name"] == "round1")
    assert round1["labelled_proportion"] == pytest.approx(quality["labelled_proportion"])
    table = train.format_table(summary)
    assert "P-mIoU" in table and "labelled %" in table
    source = next(s for s in summary["stages"] if s["name"] == "source_only")
    assert "p_miou" not in source
