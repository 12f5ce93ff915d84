"""Semi-supervised mode: the seeded labelled/unlabelled split of the target train set
(data.*.subset), recorded in DIR/semi_split.json, reproducible by seed, and a pipeline that trains
CE on the labelled part and IAS rounds on the rest."""
import json
import math

import pytest
import torch

from fastst import train
from fastst.config import ConfigError, load_config
from fastst.methods.datasets import build_role, split_indices
from test_train import fixture_root, restore_threads, tiny_overrides  # noqa: F401


def test_split_is_a_seeded_partition():
    labelled, unlabelled = split_indices(100, 0.125, 0)
    assert len(labelled) == 12 and len(unlabelled) == 88
    assert sorted(labelled + unlabelled) == list(range(100))
    assert split_indices(100, 0.125, 0) == (labelled, unlabelled)
    assert split_indices(100, 0.125, 1)[0] != labelled
    # A larger fraction of the same seed keeps the smaller one's labelled images.
    assert set(labelled) <= set(split_indices(100, 0.25, 0)[0])


def semi_overrides(root, seed=0, fraction=0.5):
    cityscapes = root / "cityscapes"
    return tiny_overrides(root, stages=("source_only", "round1"), **{
        "pipeline": "[source_only, round1]", "runtime.tensorboard": "false",
        "data.source.dataset": "cityscapes", "data.source.root": cityscapes,
        "data.source.crop_height_range": "[24, 32]",
        "data.source.subset": f"{{fraction: {fraction}, seed: {seed}, part: labelled}}",
        "data.target.subset": f"{{fraction: {fraction}, seed: {seed}, part: unlabelled}}",
        "stages.round1.source_weight": 1.0})


def expected_split(root, fraction, seed):
    """The semi-supervised split of the fixture's Cityscapes train images by the seeded rule,
    written out: the first floor(fraction * N) of torch.randperm(N) (generator seeded with
    ``seed``) are labelled, the rest unlabelled, each part in ascending index order of the
    sorted file names. Returns (labelled stems, unlabelled stems)."""
    stems = sorted(path.stem for path in (root / "cityscapes" / "leftImg8bit" / "train")
                   .rglob("*_leftImg8bit.png"))
    order = torch.randperm(len(stems), generator=torch.Generator().manual_seed(seed))
    chosen = sorted(order[:math.floor(fraction * len(stems))].tolist())
    return ([stems[i] for i in chosen],
            [stems[i] for i in range(len(stems)) if i not in chosen])


def test_semi_pipeline_records_a_reproducible_split(fixture_root, tmp_path):
    config = load_config("iast_gta5", semi_overrides(fixture_root))
    summary = train.run_pipeline(config, tmp_path / "a")
    assert [s["name"] for s in summary["stages"]] == ["source_only", "round1"]
    split = json.loads((tmp_path / "a" / "semi_split.json").read_text())
    labelled, unlabelled = expected_split(fixture_root, 0.5, 0)
    assert len(labelled) == 3 and len(unlabelled) == 3
    # The source role trains on the labelled part, the target role labels the unlabelled one.
    assert split["source"]["names"] == labelled and split["source"]["part"] == "labelled"
    assert split["target"]["names"] == unlabelled and split["target"]["part"] == "unlabelled"
    assert [build_role(config, "source")[i]["name"] for i in range(3)] == labelled
    manifest = json.loads((tmp_path / "a" / "round1" / "pseudo" / "manifest.json").read_text())
    assert sorted(image["name"] for image in manifest["images"]) == unlabelled

    again = load_config("iast_gta5", semi_overrides(fixture_root))
    train.run_pipeline(again, tmp_path / "b", stages=["source_only"])
    assert json.loads((tmp_path / "b" / "semi_split.json").read_text()) == split
    other = load_config("iast_gta5", semi_overrides(fixture_root, seed=3))
    train.run_pipeline(other, tmp_path / "c", stages=["source_only"])
    names = json.loads((tmp_path / "c" / "semi_split.json").read_text())
    labelled_3, unlabelled_3 = expected_split(fixture_root, 0.5, 3)
    assert labelled_3 != labelled, "seed 3 must draw another split of the fixture"
    assert (names["source"]["names"], names["target"]["names"]) == (labelled_3, unlabelled_3)


def test_labelled_items_carry_their_labels(fixture_root):
    config = load_config("iast_gta5", semi_overrides(fixture_root))
    source = build_role(config, "source")
    assert all((source[i]["label"] != 255).any() for i in range(len(source)))


@pytest.mark.parametrize("value, message", [
    ("{fraction: 0, seed: 0, part: labelled}", "fraction must be a finite number > 0"),
    ("{fraction: 0.5, seed: 0, part: some}", "part must be one of labelled, unlabelled"),
    ("{fraction: 0.5}", "subset must be null or {fraction"),
])
def test_bad_subsets_are_rejected(value, message):
    with pytest.raises(ConfigError, match=message.replace("{", r"\{")):
        load_config("demo_semi", [f"data.source.subset={value}"])


def test_demo_semi_preset_splits_the_synthetic_target():
    config = load_config("demo_semi")
    assert config["data"]["source"]["domain"] == "target"
    assert config["data"]["source"]["subset"]["part"] == "labelled"
    assert all(config["stages"][s]["source_weight"] == 1.0 for s in ("round1", "round2",
                                                                      "round3"))
