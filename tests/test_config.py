"""Presets, key=value overrides and validation (fastst.config), and the released numbers of the
iast_* presets (docs/recipes.md §4)."""
import pytest
import yaml

from fastst.config import (ConfigError, available_presets, dump_config, flat_keys, load_config,
                           read_config_file, recipe_differences)
from fastst.methods.schedule import stage_iterations


def test_shipped_presets_load_and_validate():
    assert {"demo", "iast_gta5", "iast_synthia"} <= set(available_presets())
    for name in ("demo", "iast_gta5", "iast_synthia"):
        config = load_config(name)
        assert config["name"] == name
        assert config["pipeline"] == ["source_only", "warmup", "round1", "round2", "round3"]
        assert [config["stages"][s]["method"] for s in config["pipeline"]] == \
            ["source_only", "warmup", "iast", "iast", "iast"]


def test_iast_presets_hold_the_released_recipe():
    gta = load_config("iast_gta5")
    stages = gta["stages"]
    assert gta["seed"] == 888 and gta["runtime"]["checkpoint_every"] == 400
    assert gta["model"]["backbone"] == "resnet101"
    assert [(stages[s]["epochs"], stages[s]["t_max"], stages[s]["batch_size"], stages[s]["lr"])
            for s in gta["pipeline"]] == [(8, 8, 8, 1e-4), (4, 4, 4, 2e-5), (2, 3, 8, 3e-5),
                                          (2, 3, 8, 2.5e-5), (2, 3, 8, 2e-5)]
    assert [stages[f"round{k}"]["alpha"] for k in (1, 2, 3)] == [0.2, 0.25, 0.3]
    assert [stages[f"round{k}"]["pseudo_size"] for k in (1, 2, 3)] == \
        [[640, 1280], [768, 1536], [768, 1536]]
    for k in (1, 2, 3):
        round_ = stages[f"round{k}"]
        assert (round_["lambda_kld"], round_["lambda_ent"], round_["source_weight"]) == (0.1, 3.0, 0.0)
    assert (stages["warmup"]["d_lr"], stages["warmup"]["lambda_adv"]) == (2e-5, 0.05)
    assert not stages["source_only"]["freeze_bn_affine"]
    assert all(stages[s]["freeze_bn_affine"] for s in gta["pipeline"][1:])
    assert gta["pseudo"] == {"mode": "official", "group": 2, "beta": 0.9, "gamma": 8.0,
                             "batch_size": 2, "order_seed": 0, "colour": False}
    assert gta["data"]["source"]["crop_height_range"] == [341, 950]
    assert gta["data"]["target"]["crop_height_range"] == [341, 1000]
    assert gta["data"]["crop_size"] == [512, 1024]
    assert gta["optim"] == {"betas": [0.9, 0.999], "weight_decay": 5e-4, "eta_min_ratio": 0.001}

    synthia = load_config("iast_synthia")
    assert synthia["stages"]["warmup"]["lambda_adv"] == 0.001
    assert synthia["data"]["source"]["dataset"] == "synthia"
    assert synthia["data"]["source"]["crop_height_range"] == [341, 640]


def test_iteration_counts_follow_source_epochs():
    # docs/recipes.md §4: GTA5's 24,941 images give 8 x 3117, 4 x 6235 and 2 x 3117 iterations.
    gta = load_config("iast_gta5")["stages"]
    assert stage_iterations(gta["source_only"], 24941) == \
        {"per_epoch": 3117, "total": 24936, "period": 24936}
    assert stage_iterations(gta["warmup"], 24941)["total"] == 24940
    round1 = stage_iterations(gta["round1"], 24941)
    assert round1["total"] == 6234 and round1["period"] == 3 * 3117
    assert round1["total"] == pytest.approx(2 * round1["period"] / 3)
    synthia = load_config("iast_synthia")["stages"]
    assert [stage_iterations(synthia[s], 9400)["total"] for s in
            ("source_only", "warmup", "round1")] == [9400, 9400, 2350]
    assert stage_iterations({**gta["round1"], "iterations": 7}, 24941)["total"] == 7


def test_unknown_preset_lists_the_available_ones():
    with pytest.raises(ConfigError) as info:
        load_config("iast_gta6")
    message = str(info.value)
    assert "iast_gta6" in message
    for name in available_presets():
        assert name in message


def test_unknown_key_suggests_the_closest_and_points_to_print_config():
    with pytest.raises(ConfigError) as info:
        load_config("demo", ["stages.round1.alhpa=0.3"])
    message = str(info.value)
    assert "stages.round1.alhpa" in message and "did you mean stages.round1.alpha" in message
    assert "--print-config" in message and "runtime.checkpoint_every" not in message
    with pytest.raises(ConfigError, match="must look like key=value"):
        load_config("demo", ["seeds"])


def test_overrides_are_yaml_typed_and_coerced():
    config = load_config("iast_gta5", [
        "stages.round1.alpha=0.25", "stages.source_only.lr=1e-4", "stages.warmup.lr=3",
        "data.crop_size=[256, 512]", "model.pretrained=null", "seeds=3",
        "data.source.root=/data/GTA5 v2", "pseudo.mode=paper", "pseudo.group=1",
        "runtime.progress=false"])
    assert config["stages"]["round1"]["alpha"] == 0.25
    assert config["stages"]["source_only"]["lr"] == 1e-4
    assert isinstance(config["stages"]["warmup"]["lr"], float)
    assert config["data"]["crop_size"] == [256, 512]
    assert config["model"]["pretrained"] is None
    assert config["seeds"] == 3 and config["data"]["source"]["root"] == "/data/GTA5 v2"
    assert config["pseudo"]["mode"] == "paper" and config["runtime"]["progress"] is False


@pytest.mark.parametrize("override, key", [
    ("stages.round1.alpha=0", "stages.round1.alpha"),
    ("stages.round1.alpha=1.5", "stages.round1.alpha"),
    ("stages.round1.alpha=abc", "stages.round1.alpha"),
    ("pseudo.beta=-0.1", "pseudo.beta"),
    ("pseudo.batch_size=3", "pseudo.batch_size"),
    ("pseudo.mode=greedy", "pseudo.mode"),
    ("pseudo.group=2", None),
    ("model.backbone=resnet152", "model.backbone"),
    ("data.crop_size=[512]", "data.crop_size"),
    ("stages.source_only.epochs=0", "stages.source_only.epochs"),
    ("runtime.device=tpu", "runtime.device"),
    ("runtime.progress=yes please", "runtime.progress"),
    ("data.source=gta5", "data.source"),
    ("pipeline=[source_only, round7]", "round7"),
])
def test_bad_values_name_the_key(override, key):
    overrides = [override] if key is not None else ["pseudo.mode=paper", override]
    with pytest.raises(ConfigError) as info:
        load_config("iast_gta5", overrides)
    assert (key or "pseudo.group") in str(info.value)


def test_config_file_round_trip_and_recipe_differences(tmp_path):
    config = load_config("demo", ["stages.round2.alpha=0.3"])
    path = dump_config(config, tmp_path / "run" / "config.yaml")
    assert read_config_file(path) == config
    assert [p.name for p in path.parent.iterdir()] == ["config.yaml"]  # no temp file left
    assert yaml.safe_load(path.read_text())["stages"]["round2"]["alpha"] == 0.3
    assert read_config_file(tmp_path / "absent.yaml") is None
    assert recipe_differences(config, config) == []
    other = load_config("demo", ["stages.round2.alpha=0.3", "runtime.workers=3",
                                 "runtime.stop_after_iterations=5"])
    assert recipe_differences(config, other) == []
    changed = load_config("demo", ["stages.round2.alpha=0.35"])
    assert recipe_differences(config, changed) == [("stages.round2.alpha", 0.3, 0.35)]


def test_every_leaf_key_is_overridable():
    config = load_config("demo")
    keys = flat_keys(config)
    assert "stages.warmup.lambda_adv" in keys and "data.synthetic.num_train" in keys
    assert not any(key.startswith("stages.") and key.count(".") < 2 for key in keys)
