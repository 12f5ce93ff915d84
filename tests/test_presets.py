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


def test_config_imports_no_method_module():
    # fastst.config reads the registry (fastst.methods: names -> classes); the method modules
    # (and torch) load when a configuration is resolved, so they can import fastst.config.
    code = ("import sys, fastst.config; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('fastst.methods.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
