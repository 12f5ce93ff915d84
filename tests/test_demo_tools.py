"""The demo analysis scripts of bench/ (docs/demo.md): the BN re-estimation of
bench/demo_bn_adaptation.py, the per-class table of bench/demo_rounds_report.py, the
ground-truth control of bench/demo_label_oracle.py and the error counts of
bench/demo_label_errors.py."""
import importlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture
def bench_import(monkeypatch):
    """Import a bench/ script by name (the demo scripts import their sibling demo_dev_split)."""
    monkeypatch.syspath_prepend(str(BENCH))
    return importlib.import_module


def test_bn_statistics_are_the_target_images_average_and_weights_stay(bench_import):
    bn_adaptation = bench_import("demo_bn_adaptation")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4))
    model[1].running_mean.fill_(5.0)
    model[1].running_var.fill_(9.0)
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k
               and "num_batches" not in k}
    images = [{"image": torch.randn(3, 5, 7) * 2 + 1} for _ in range(16)]  # two batches of 8

    bn_adaptation.reestimate_bn_statistics(model, images, batch_size=8)

    features = model[0](torch.stack([item["image"] for item in images])).detach()
    per_batch = features.view(2, 8, 4, 5, 7)
    expected_var = torch.stack([b.transpose(0, 1).reshape(4, -1).var(dim=1) for b in per_batch]).mean(0)
    assert torch.allclose(model[1].running_mean, features.mean(dim=(0, 2, 3)), atol=1e-5)
    assert torch.allclose(model[1].running_var, expected_var, atol=1e-4)
    assert not model.training
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())


def test_rounds_report_shares_and_means_over_seeds(tmp_path, capsys, bench_import):
    report = bench_import("demo_rounds_report")
    for seed, (share_road, theta) in enumerate([(0.3, 0.9), (0.1, 0.7)]):
        for stage in ("warmup", "round1"):
            result = {"miou": 0.4 + 0.1 * seed, "iou": {"road": 0.8, "pole": 0.1 * seed}}
            if stage == "round1":
                result["pseudo"] = {"labelled_fraction": 0.4,
                                    "density": [share_road, 0.4 - share_road],
                                    "theta": [theta, 0.5],
                                    "quality": {"labelled_proportion": 0.4, "p_miou": 0.6,
                                                "p_iou": {"road": 0.9, "pole": 0.2}}}
            path = tmp_path / f"seed{seed}" / stage / "result.json"
            path.parent.mkdir(parents=True)
            path.write_text(json.dumps(result))
    report.main([str(tmp_path), "--stages", "warmup,round1"])
    out = capsys.readouterr().out
    assert "| round1 | 45.0 | 40.0 | 60.0 |" in out
    # road: share (0.3 / 0.4 + 0.1 / 0.4) / 2 = 50 %, theta (0.9 + 0.7) / 2; warm-up IoU 80.
    assert "| road | 80.0 | 50.0 | 90.0 | 0.800 | 80.0 |" in out
    assert "| pole | 5.0 | 50.0 | 20.0 | 0.500 | 5.0 |" in out


def test_oracle_labels_take_the_truth_where_selected_or_everywhere(bench_import):
    oracle = bench_import("demo_label_oracle")
    pseudo = np.array([[3, 255], [255, 7]], dtype=np.uint8)
    truth = np.array([[4, 5], [6, 7]], dtype=np.uint8)
    assert oracle.oracle_labels(pseudo, truth, "selected").tolist() == [[4, 255], [255, 7]]
    assert oracle.oracle_labels(pseudo, truth, "full").tolist() == [[4, 5], [6, 7]]
    with pytest.raises(ValueError, match="differ in size"):
        oracle.oracle_labels(pseudo, truth[:1], "selected")
    with pytest.raises(ValueError, match="mode"):
        oracle.oracle_labels(pseudo, truth, "both")


def test_oracle_writes_ground_truth_train_ids_and_never_reuses_a_round(bench_import, tmp_path,
                                                                        monkeypatch):
    oracle = bench_import("demo_label_oracle")
    import fastst.methods.labelling.base as labelling_base
    import fastst.pipeline as pipeline
    from fastst.data.io import read_label
    from fastst.data.synthetic import train_ids_to_label_ids

    stem = "syntarget_000000_000003"
    truth_dir = tmp_path / "target" / "gtFine" / "train" / "syntarget"
    truth_dir.mkdir(parents=True)
    truth = np.array([[0, 13], [10, 255]], dtype=np.uint8)      # road, car, sky, ignore
    Image.fromarray(train_ids_to_label_ids(truth)).save(truth_dir / f"{stem}_gtFine_labelIds.png")
    image_dir = tmp_path / "target" / "leftImg8bit" / "train" / "syntarget"
    image_dir.mkdir(parents=True)
    Image.fromarray(np.zeros((2, 2, 3), dtype=np.uint8)).save(image_dir / f"{stem}_leftImg8bit.png")
    monkeypatch.setattr(labelling_base, "save_pseudo_labels", labelling_base.save_pseudo_labels)
    reused = []
    monkeypatch.setattr(pipeline, "reuse_stage", lambda config, run_dir, seed, stage, *a:
                        reused.append(stage) or True)

    oracle.install("selected", tmp_path / "target")
    pseudo = torch.tensor([[[1, 1], [255, 1]]], dtype=torch.uint8)
    labelling_base.save_pseudo_labels(tmp_path / "out", [f"{stem}_leftImg8bit"], pseudo)
    written = read_label(tmp_path / "out" / f"{stem}_leftImg8bit_pseudo_label.png")
    assert written.tolist() == [[0, 13], [255, 255]]

    config = {"stages": {"warmup": {"method": "warmup"}, "round1": {"method": "iast"}}}
    assert pipeline.reuse_stage(config, tmp_path, 0, "warmup", "last.pt", "result.json")
    assert not pipeline.reuse_stage(config, tmp_path, 0, "round1", "last.pt", "result.json")
    assert reused == ["warmup"]


def test_label_errors_count_wrong_selected_pixels_near_boundaries_and_by_class(bench_import):
    errors_tool = bench_import("demo_label_errors")
    truth = np.zeros((6, 12), dtype=np.uint8)
    truth[:, 6:] = 13                                    # road | car, boundary between columns 5, 6
    pseudo = np.full((6, 12), 255, dtype=np.uint8)
    pseudo[:, 0:2] = 0                                   # right, far from the boundary
    pseudo[:, 5] = 13                                    # wrong, on the boundary
    pseudo[5, 11] = 15                                   # wrong (bus for car), far from it
    truth_ignored = truth.copy()
    truth_ignored[0, 11] = 255
    pseudo[0, 11] = 15                                   # no truth there: not counted wrong

    errors = errors_tool.label_errors([(pseudo, truth_ignored)], radius=1)

    assert errors["selected"] == 12 + 6 + 2
    assert errors["wrong"] == pytest.approx(7 / 20)
    assert errors["near_boundary"] == pytest.approx(6 / 7)
    assert errors["by_class"][13] == pytest.approx(6 / 7)
    assert errors["by_class"][15] == pytest.approx(1 / 7)
    band = errors_tool.boundary_band(truth, 0)
    assert band[:, 5].all() and band[:, 6].all() and not band[:, 4].any()
