"""python -m fastst.experiments: the variants of each table, and a table run end to end on the
tiny fixtures with shared stages reused across variants."""
import json

import pytest
import torch

from fastst import experiments, train
from fastst.checkpoint import load_checkpoint, save_checkpoint
from fastst.config import ConfigError, load_config, read_config_file
from fastst.data.ids import CLASS_NAMES
from fastst.metrics import RARE_CLASS_NAMES, rare_class_miou
from test_train import fixture_root, restore_threads, tiny_overrides  # noqa: F401


def test_each_table_lists_the_papers_rows():
    names = {table: [v.name for v in experiments.table_variants(table)]
             for table in experiments.TABLES}
    # IAST paper Table 2 (alpha, beta sensitivity, then Fig. 4 a and b).
    assert names["table2"] == ["alpha=0.2 beta=0.0", "alpha=0.2 beta=0.5", "alpha=0.2 beta=0.9",
                               "alpha=0.2 beta=0.99", "alpha=0.3 beta=0.9", "alpha=0.5 beta=0.9",
                               "constant", "class-balanced"]
    table2 = {v.name: v.overrides for v in experiments.table_variants("table2")}
    assert {"pseudo.beta=0.99", "pseudo.gamma=0.0", "stages.round3.alpha=0.2",
            "stages.round1.selector=ias"} <= set(table2["alpha=0.2 beta=0.99"])
    assert "stages.round2.selector=constant" in table2["constant"]
    assert {"stages.round1.selector=cbst", "stages.round3.portion=0.2"} <= \
        set(table2["class-balanced"])
    # TPLD paper Table 2: each base method alone, then with TPLD.
    assert names["tpld_table2"] == ["CBST", "CBST + TPLD", "CRST-LRENT", "CRST-LRENT + TPLD",
                                    "CRST-MRKLD", "CRST-MRKLD + TPLD"]
    tpld = {v.name: v.overrides for v in experiments.table_variants("tpld_table2")}
    assert tpld["CRST-LRENT + TPLD"] == ["stages.phase1_1.loss=lrent", "stages.phase1_2.loss=lrent"]
    assert tpld["CBST"][0] == "pipeline=[source_only, phase1_1, phase1_2]"
    assert {"stages.phase1_2.loss=ce", "stages.phase1_2.vote_iterations=0",
            "stages.phase1_2.beta=1.0"} <= set(tpld["CBST"])
    assert names["table9"] == ["output-space AT", "AdaptSegNet", "AdvEnt", "source (no warm-up)"]
    table9 = {v.name: v.overrides for v in experiments.table_variants("table9")}
    assert "stages.warmup.variant=advent" in table9["AdvEnt"]
    assert table9["source (no warm-up)"] == ["pipeline=[source_only, round1, round2, round3]"]
    assert len(names["table3"]) == 8 and names["table3"][3] == "lambda_i=3.0 lambda_c=0.1"
    assert names["table4"] == [f"gamma={g}" for g in (0.0, 1.0, 4.0, 8.0, 16.0)]
    # beta 0.9: with beta 1 the thresholds never move and every gamma row is the same run.
    assert all("pseudo.beta=0.9" in v.overrides for v in experiments.table_variants("table4"))
    assert names["table5"] == ["source", "warm-up", "+ constant ST", "+ IAS", "+ R_c", "+ R_i"]
    assert names["table8"] == ["1/8", "1/4", "1/2", "full"]
    table5 = {v.name: v.overrides for v in experiments.table_variants("table5")}
    assert "stages.round1.lambda_kld=0.0" in table5["+ IAS"]
    assert "stages.round1.lambda_ent=0.0" in table5["+ R_c"]
    assert "stages.round1.lambda_kld=0.1" in table5["+ R_c"]
    assert "stages.round2.selector=constant" in table5["+ constant ST"]


def test_unknown_table_is_rejected():
    with pytest.raises(ConfigError, match="valid tables: table2, table3, table4, table5, table8, "
                                          "table9, tpld_table2"):
        experiments.table_variants("table7")
    with pytest.raises(ConfigError, match="tpld_table2 needs a base preset with tpld_phase1"):
        experiments.table_variants("tpld_table2", "demo")


def _confident_source_only(preset, overrides, run_dir, scale=20.0):
    """A finished source-only run of ``preset`` in ``run_dir`` whose classifier is scaled by
    ``scale``: the 2-iteration model's softmax is nearly flat (max p ~0.2, below every IAS
    threshold), the scaled one spreads its max p over the thresholds' range."""
    train.run_pipeline(load_config(preset, list(overrides) + ["pipeline=[source_only]"]), run_dir)
    path = run_dir / "source_only" / "last.pt"
    state = load_checkpoint(path)
    state["model"] = {key: value * scale if key.startswith("classifier.") else value
                      for key, value in state["model"].items()}
    save_checkpoint(path, state)
    return run_dir


def test_table4_gamma_rows_differ_and_reuse_shared_stages(fixture_root, tmp_path):
    overrides = tiny_overrides(fixture_root, stages=("source_only", "warmup", "round1"), **{
        "pipeline": "[source_only, warmup, round1]", "runtime.tensorboard": "false"})
    base = _confident_source_only("iast_gta5", overrides, tmp_path / "base")
    # One string, as a preset's reuse_from: the table adds its variants' directories to it.
    overrides.append(f"runtime.reuse_from={base}")
    report = experiments.run_table("table4", tmp_path, preset="iast_gta5", overrides=overrides)
    rows = report["rows"]
    assert [row["variant"] for row in rows] == [f"gamma={g}" for g in (0.0, 1.0, 4.0, 8.0, 16.0)]
    # A larger gamma takes each class's quantile further up (at alpha * theta ** gamma of its
    # pixels): higher thresholds, fewer labels (IAST Table 4). With beta = 1 the thresholds
    # stay at 0.9 and every row is the same run: these fail.
    proportions = [row["proportion"] for row in rows]
    assert all(0.0 < p < 1.0 for p in proportions)
    assert all(a > b for a, b in zip(proportions, proportions[1:])), proportions
    runs = sorted((tmp_path / "table4").glob("*_gamma*"))
    assert len(runs) == 5
    results = [json.loads((run / "round1" / "result.json").read_text()) for run in runs]
    thetas = [result["pseudo"]["theta"] for result in results]
    assert len({tuple(theta) for theta in thetas}) == 5
    assert all(sum(a) < sum(b) for a, b in zip(thetas, thetas[1:]))
    assert all(0.0 <= row["R-mIoU"] <= 1.0 for row in rows)
    assert [row["mIoU"] for row in rows] == [result["target_miou"] for result in results]
    for run in runs:
        result = json.loads((run / "source_only" / "result.json").read_text())
        assert result["reused_from"] == str(base / "source_only")
    for run in runs[1:]:
        result = json.loads((run / "warmup" / "result.json").read_text())
        assert result["reused_from"] == str(runs[0] / "warmup")
        assert "reused_from" not in json.loads((run / "round1" / "result.json").read_text())
    on_disk = json.loads((tmp_path / "table4" / "results.json").read_text())
    assert on_disk["rows"] == json.loads(json.dumps(rows))
    assert "| gamma=8.0 |" in (tmp_path / "table4" / "results.md").read_text()


def test_tpld_table2_runs_each_base_method_with_and_without_tpld(fixture_root, tmp_path):
    stages = ("source_only", "phase1_1", "phase2_1")
    overrides = tiny_overrides(fixture_root, stages=stages, **{
        "pipeline": "[source_only, phase1_1, phase2_1]", "runtime.tensorboard": "false",
        # 3 of the 6 fixture source images join the mixed list (0.03 would give none).
        "stages.phase1_1.source_portion": 0.5, "stages.phase2_1.batch_size": 1,
        "stages.phase2_1.easy_portion": 0.34})
    report = experiments.run_table("tpld_table2", tmp_path, preset="tpld_gta5",
                                   overrides=overrides)
    rows = {row["variant"]: row for row in report["rows"]}
    runs = {path.name: path for path in (tmp_path / "tpld_table2").iterdir() if path.is_dir()}
    weights = {}
    for index, (name, loss) in enumerate((("CBST", "ce"), ("CRST-LRENT", "lrent"),
                                          ("CRST-MRKLD", "mrkld"))):
        base, tpld = runs[f"{2 * index}_{name}"], runs[f"{2 * index + 1}_{name}___TPLD"]
        assert not (base / "phase2_1").exists() and (tpld / "phase2_1" / "result.json").is_file()
        for run, vote in ((base, None), (tpld, {"window": 7, "weight": 0.7, "iterations": 3})):
            config = read_config_file(run / "config.yaml")
            assert config["stages"]["phase1_1"]["loss"] == loss
            manifest = json.loads((run / "phase1_1" / "pseudo" / "manifest.json").read_text())
            assert manifest["settings"]["vote"] == ({**vote} if vote else
                                                    {"window": 7, "weight": 0.7, "iterations": 0})
        # Voting labels more pixels than the confident map alone (TPLD's densification).
        assert rows[f"{name} + TPLD"]["proportion"] > rows[name]["proportion"] > 0
        for row in (rows[name], rows[f"{name} + TPLD"]):
            # R-mIoU is None where no rare class is in the fixtures or the predictions.
            assert 0.0 <= row["mIoU"] <= 1.0 and (row["R-mIoU"] is None
                                                  or 0.0 <= row["R-mIoU"] <= 1.0)
        weights[name] = load_checkpoint(base / "phase1_1" / "last.pt")["model"]
    # Same labels, same source-only model: the base rows differ by their loss alone.
    first = next(iter(weights.values()))
    for name in ("CRST-LRENT", "CRST-MRKLD"):
        assert any(not torch.equal(first[key], weights[name][key]) for key in first), name


def test_cli_takes_overrides_after_options_and_rejects_bad_tables(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        experiments.main(["table7", "--out", str(tmp_path), "runtime.progress=false"])
    assert exit_info.value.code == 2
    assert "valid tables" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        experiments.main(["table5", "--out", str(tmp_path), "no.such.key=1"])
    assert "unknown key 'no.such.key'" in capsys.readouterr().err


def test_rare_class_miou_averages_the_classes_tpld_calls_rare():
    # TPLD Table 1 (GTA5 -> Cityscapes, DeepLab-v2 R101, "CRST(MRKLD) + TPLD"): per-class IoU
    # and its R-mIoU 35.1 ("We highlight the rare classes [1] and compute Rare class mIoU").
    values = [94.2, 60.5, 82.8, 36.6, 16.6, 39.3, 29.0, 25.5, 85.6, 44.9, 84.4, 60.6, 27.4, 84.1,
              37.0, 47.0, 31.2, 36.1, 50.3]
    iou = {name: value / 100 for name, value in zip(CLASS_NAMES, values)}
    assert rare_class_miou(iou) == pytest.approx(0.351, abs=5e-4)
    assert len(RARE_CLASS_NAMES) == 12 and set(RARE_CLASS_NAMES) <= set(CLASS_NAMES)
    # Absent classes (None / NaN, as result.json holds them) are left out, like mIoU's.
    iou.update({"wall": None, "bus": float("nan")})
    rest = [v / 100 for n, v in zip(CLASS_NAMES, values) if n in RARE_CLASS_NAMES
            and n not in ("wall", "bus")]
    assert rare_class_miou(iou) == pytest.approx(sum(rest) / 10)
    # SYNTHIA's 16 classes lack terrain, truck and train: the other 9 rare classes count.
    assert rare_class_miou({"road": 0.9, "wall": 0.2, "bicycle": 0.4}) == pytest.approx(0.3)
    assert rare_class_miou({"road": 0.9, "sky": 0.8}) is None
    with pytest.raises(TypeError, match="iou must map class names"):
        rare_class_miou([0.5] * 19)
