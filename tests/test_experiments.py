"""python -m fastst.experiments: the variants of each table, and a table run end to end on the
tiny fixtures with shared stages reused across variants."""
import json

import pytest

from fastst import experiments
from fastst.config import ConfigError
from test_train import fixture_root, restore_threads, tiny_overrides  # noqa: F401


def test_each_table_lists_the_papers_rows():
    names = {table: [v.name for v in experiments.table_variants(table)]
             for table in ("table3", "table4", "table5", "table8", "table9")}
    assert names["table9"] == ["output-space AT", "AdaptSegNet", "AdvEnt", "source (no warm-up)"]
    table9 = {v.name: v.overrides for v in experiments.table_variants("table9")}
    assert "stages.warmup.variant=advent" in table9["AdvEnt"]
    assert table9["source (no warm-up)"] == ["pipeline=[source_only, round1, round2, round3]"]
    assert len(names["table3"]) == 8 and names["table3"][3] == "lambda_i=3.0 lambda_c=0.1"
    assert names["table4"] == [f"gamma={g}" for g in (0.0, 1.0, 4.0, 8.0, 16.0)]
    assert names["table5"] == ["source", "warm-up", "+ constant ST", "+ IAS", "+ R_c", "+ R_i"]
    assert names["table8"] == ["1/8", "1/4", "1/2", "full"]
    table5 = {v.name: v.overrides for v in experiments.table_variants("table5")}
    assert "stages.round1.lambda_kld=0.0" in table5["+ IAS"]
    assert "stages.round1.lambda_ent=0.0" in table5["+ R_c"]
    assert "stages.round1.lambda_kld=0.1" in table5["+ R_c"]
    assert "stages.round2.selector=constant" in table5["+ constant ST"]


def test_unknown_table_is_rejected():
    with pytest.raises(ConfigError, match="valid tables: table3, table4, table5, table8, table9"):
        experiments.table_variants("table7")


def test_table4_runs_on_fixtures_and_reuses_shared_stages(fixture_root, tmp_path):
    overrides = tiny_overrides(fixture_root, stages=("source_only", "warmup", "round1"), **{
        "pipeline": "[source_only, warmup, round1]", "runtime.tensorboard": "false"})
    report = experiments.run_table("table4", tmp_path, preset="iast_gta5", overrides=overrides)
    rows = report["rows"]
    assert [row["variant"] for row in rows] == [f"gamma={g}" for g in (0.0, 1.0, 4.0, 8.0, 16.0)]
    proportions = [row["proportion"] for row in rows]
    assert all(0.0 <= p <= 1.0 for p in proportions)
    # A larger gamma raises the thresholds of low-confidence classes: fewer labels (Table 4).
    assert proportions[0] >= proportions[-1]
    runs = sorted((tmp_path / "table4").glob("*_gamma*"))
    assert len(runs) == 5
    for run in runs[1:]:
        for stage in ("source_only", "warmup"):
            result = json.loads((run / stage / "result.json").read_text())
            assert result["reused_from"] == str(runs[0] / stage)
        assert "reused_from" not in json.loads((run / "round1" / "result.json").read_text())
    on_disk = json.loads((tmp_path / "table4" / "results.json").read_text())
    assert on_disk["rows"] == json.loads(json.dumps(rows))
    assert "| gamma=8.0 |" in (tmp_path / "table4" / "results.md").read_text()


def test_cli_takes_overrides_after_options_and_rejects_bad_tables(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        experiments.main(["table7", "--out", str(tmp_path), "runtime.progress=false"])
    assert exit_info.value.code == 2
    assert "valid tables" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        experiments.main(["table5", "--out", str(tmp_path), "no.such.key=1"])
    assert "unknown key 'no.such.key'" in capsys.readouterr().err
