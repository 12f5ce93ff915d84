"""Presets and the method registry (fastst.config): every shipped preset resolves to the
configuration it resolved to before presets could build on a base (tests/fixtures/
presets_resolved.json, values, types and key order); each method's stage keys, defaults and
validation live on its Stage class and reach load_config through the registry."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

import fastst.config as config_module
import fastst.config_presets as config_presets
from fastst.config import (COMMON_STAGE_DEFAULTS, STAGE_DEFAULTS, ConfigError, available_presets,
                           load_config)
from fastst.methods import METHOD_NAMES, stage_class

FIXTURE = Path(__file__).parent / "fixtures" / "presets_resolved.json"


def test_every_preset_resolves_to_its_snapshot():
    expected = json.loads(FIXTURE.read_text())
    assert available_presets() == sorted(expected)
    for name in available_presets():
        # json.dumps keeps key order and tells 1 from 1.0, so order and types are compared too.
        assert json.dumps(load_config(name)) == json.dumps(expected[name]), name


def test_stage_defaults_are_the_method_classes_defaults():
    assert list(STAGE_DEFAULTS) == list(METHOD_NAMES)
    for method in METHOD_NAMES:
        defaults = stage_class(method).DEFAULTS
        assert STAGE_DEFAULTS[method] == defaults
        assert set(COMMON_STAGE_DEFAULTS) <= set(defaults), method
    # A copy: changing it leaves the classes' defaults (and the next load_config) alone.
    STAGE_DEFAULTS["iast"]["alpha"] = 0.5
    assert stage_class("iast").DEFAULTS["alpha"] == 0.2
    assert config_module.STAGE_DEFAULTS["iast"]["alpha"] == 0.2


def test_each_pipeline_stage_is_validated_by_its_method_class(monkeypatch):
    calls = []
    for method in ("source_only", "warmup", "iast"):
        cls = stage_class(method)
        monkeypatch.setattr(cls, "validate",
                            classmethod(lambda cls, config, prefix: calls.append((cls, prefix))))
    load_config("demo")
    assert calls == [(stage_class("source_only"), "stages.source_only"),
                     (stage_class("warmup"), "stages.warmup"),
                     (stage_class("iast"), "stages.round1"), (stage_class("iast"), "stages.round2"),
                     (stage_class("iast"), "stages.round3")]


@pytest.mark.parametrize("override, message", [
    ("stages.warmup.variant=dense", "stages.warmup.variant must be one of output, multilevel, advent"),
    ("stages.round2.selector=top", "stages.round2.selector must be one of ias, constant, cbst"),
    ("stages.source_only.freeze_bn_affine=1", "stages.source_only.freeze_bn_affine must be true or false"),
])
def test_method_checks_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("demo", [override])


@pytest.mark.parametrize("override, message", [
    ("stages.phase1_1.vote_window=4", "stages.phase1_1.vote_window must be an odd integer"),
    ("stages.phase1_2.loss=l2", "stages.phase1_2.loss must be one of ce, mrkld, lrent"),
    ("stages.phase2_1.d_betas=[0.9, 1.0]", r"stages.phase2_1.d_betas must be \[beta1, beta2\]"),
    ("stages.phase2_2.soft_targets=teacher", "stages.phase2_2.soft_targets must be one of pass, crop"),
    ("stages.phase2_2.pseudo_scales=[]", "stages.phase2_2.pseudo_scales must be a non-empty list"),
])
def test_class_balanced_checks_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("demo_tpld", [override])


def test_the_checks_the_methods_share_with_config_import_no_other_fastst_module():
    # fastst.config imports the registry (fastst.methods) and the method modules import
    # fastst.config_checks: it stays below both (tests/test_import_graph.py: no cycle).
    code = ("import sys, fastst.config_checks; "
            "print(sorted(m for m in sys.modules if m.startswith('fastst')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['fastst', 'fastst.config_checks']"


def _write_presets(directory, files):
    for name, text in files.items():
        (directory / f"{name}.yaml").write_text(text)


BASES = {
    "_model": "model: {backbone: resnet18_w16, pretrained: null}\nseed: 3\n",
    "_data": ("seed: 5\n"
              "data:\n  source: {dataset: synthetic, root: a, split: train, list_file: s.txt}\n"
              "  synthetic: {num_train: 10}\n"
              "pipeline: [source_only]\n"
              "stages:\n  source_only: {method: source_only, epochs: 4, lr: 0.5}\n"),
    "child": ("name: child\nbase: [_model, _data]\n"
              "data:\n  source: {root: b}\n"
              "pipeline: [source_only, warmup]\n"
              "stages:\n  source_only: {epochs: 2}\n  warmup: {method: warmup}\n"),
    "grandchild": "name: grandchild\nbase: child\nseed: 9\n",
}


def test_presets_build_on_bases(tmp_path, monkeypatch):
    monkeypatch.setattr(config_presets, "PRESET_DIR", tmp_path)
    _write_presets(tmp_path, BASES)
    assert available_presets() == ["child", "grandchild"]  # files starting with _ are bases
    config = load_config("child")
    # Mappings merge key by key, later bases over earlier ones, the file over its bases; other
    # values (lists included) replace the base's.
    assert config["model"]["backbone"] == "resnet18_w16" and config["seed"] == 5
    assert config["data"]["source"]["root"] == "b"
    assert config["data"]["source"]["list_file"] == "s.txt"
    assert config["data"]["synthetic"] == {"num_train": 10}
    assert config["pipeline"] == ["source_only", "warmup"]
    assert (config["stages"]["source_only"]["epochs"], config["stages"]["source_only"]["lr"]) == (2, 0.5)
    assert list(config["stages"]) == ["source_only", "warmup"]
    grandchild = load_config("grandchild")
    assert grandchild["seed"] == 9 and grandchild["name"] == "grandchild"
    assert grandchild["stages"] == config["stages"]
    with pytest.raises(ConfigError, match="unknown preset '_data'"):
        load_config("_data")


@pytest.mark.parametrize("files, message", [
    ({"p": "base: _nothere\n"}, r"p.yaml: unknown base '_nothere'; preset files: p"),
    ({"p": "base: _a\n", "_a": "base: _b\n", "_b": "base: _a\n"}, r"bases loop \(p -> _a -> _b -> _a\)"),
    ({"p": "base: {a: 1}\n"}, "base must be a preset file name or a list of them"),
])
def test_bad_bases_are_named(tmp_path, monkeypatch, files, message):
    monkeypatch.setattr(config_presets, "PRESET_DIR", tmp_path)
    _write_presets(tmp_path, files)
    with pytest.raises(ConfigError, match=message):
        load_config("p")


def test_tpld_schedule_is_the_released_float64_sum():
    # CRST's round loop, which TPLD runs on (yzou2/CRST crst_seg.py:330 tgt_portion =
    # min(tgt_portion + tgt_port_step, max_tgt_port), :339 the same for src_portion, max 0.06),
    # summed in float64 in order.
    for name, phases in (("tpld_gta5", 9), ("tpld_synthia", 9), ("demo_tpld", 4)):
        config = load_config(name)
        stages = [config["stages"][s] for s in config["pipeline"][1:]]
        assert len(stages) == phases
        portion, source_portion = 0.2, 0.03
        for k, stage in enumerate(stages):
            assert stage["portion"] == portion  # exactly, not approximately
            if stage["method"] == "tpld_phase1":
                assert (stage["source_portion"], stage["source_seed"]) == (source_portion, 4 + k)
                source_portion = min(source_portion + 0.0025, 0.06)
            portion = min(portion + 0.05, 0.5)
    fifth = load_config("tpld_gta5")["stages"]["phase1_5"]["portion"]
    assert fifth == 0.39999999999999997 and fifth != 0.4


def test_schedule_writes_stage_keys(tmp_path, monkeypatch):
    monkeypatch.setattr(config_presets, "PRESET_DIR", tmp_path)
    rounds = "\n".join(f"  r{k}: {{method: cbst}}" for k in (1, 2, 3, 4))
    _write_presets(tmp_path, {"p": (
        "pipeline: [r1, r2, r3, r4]\n"
        "schedule:\n  portion: {stages: [r1, r2, r3, r4], start: 0.4, step: 0.05, max: 0.5}\n"
        "  source_seed: {stages: [r3, r1], start: 7, step: 2}\n"
        f"stages:\n{rounds}\n")})
    stages = load_config("p")["stages"]
    assert [stages[f"r{k}"]["portion"] for k in (1, 2, 3, 4)] == [0.4, 0.45, 0.5, 0.5]
    assert [stages[f"r{k}"]["source_seed"] for k in (1, 2, 3, 4)] == [9, 4, 7, 4]  # r2, r4: default


@pytest.mark.parametrize("schedule, stage, message", [
    ("portion: {stages: [r1], start: 0.2, step: 0.05}", "{method: cbst, portion: 0.3}",
     "stages.r1.portion is set both in the stage and by schedule.portion; keep one"),
    ("portion: {stages: [r9], start: 0.2, step: 0.05}", "{method: cbst}",
     r"schedule.portion.stages must list stages defined under 'stages', got \['r9'\]"),
    ("portion: {stages: [r1], start: 0.2}", "{method: cbst}", r"schedule.portion must be \{stages"),
    ("portion: {stages: [r1], start: 0.2, step: true}", "{method: cbst}", "schedule.portion must be"),
    ("[portion]", "{method: cbst}", "schedule must map stage keys to rules"),
])
def test_bad_schedules_are_named(tmp_path, monkeypatch, schedule, stage, message):
    monkeypatch.setattr(config_presets, "PRESET_DIR", tmp_path)
    _write_presets(tmp_path, {"p": f"pipeline: [r1]\nschedule:\n  {schedule}\nstages:\n  r1: {stage}\n"})
    with pytest.raises(ConfigError, match=message):
        load_config("p")
