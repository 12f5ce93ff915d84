"""The CBST/CRST and TPLD pipelines (fastst.methods.cbst, fastst.methods.tpld) on the tiny GTA5 +
Cityscapes fixtures of test_train: 2 iterations of every stage kind, their outputs, resume,
stage reuse from an earlier run, and the presets."""
import json

import pytest
import torch

from fastst import train
from fastst.checkpoint import load_checkpoint
from fastst.config import ConfigError, load_config
from fastst.methods.context import RunContext, StopRequested
from fastst.methods.st_losses import (lrent_soft_labels, tpld_phase1_loss,
                                      tpld_phase1_lrent_loss)
from fastst.methods.tpld import TPLDPhase1
from test_train import fixture_root, restore_threads, tiny_overrides  # noqa: F401

TPLD_STAGES = ("source_only", "phase1_1", "phase2_1")
CRST_STAGES = ("source_only", "round1")


def tpld_config(root, iterations=2, **extra):
    overrides = tiny_overrides(root, iterations, stages=TPLD_STAGES, **{
        "pipeline": "[" + ", ".join(TPLD_STAGES) + "]",
        # 3 of the 6 fixture source images join the mixed list (0.03 would give none).
        "stages.phase1_1.source_portion": 0.5, "stages.phase2_1.batch_size": 1,
        "stages.phase2_1.easy_portion": 0.34, **extra})
    return load_config("tpld_gta5", overrides)


def test_tpld_phases_run_and_write_their_outputs(fixture_root, tmp_path):
    config = tpld_config(fixture_root)
    out = tmp_path / "run"
    summary = train.run_pipeline(config, out)
    assert [s["name"] for s in summary["stages"]] == list(TPLD_STAGES)

    phase1 = json.loads((out / "phase1_1" / "pseudo" / "manifest.json").read_text())
    assert phase1["settings"]["vote"] == {"window": 7, "weight": 0.7, "iterations": 3}
    assert phase1["labelled_fraction"] >= phase1["labelled_fraction_confident"]
    assert len(phase1["lambdas"]) == 19 and len(phase1["images"]) == 6
    state = load_checkpoint(out / "phase1_1" / "last.pt")
    assert state["complete"] and state["iteration"] == 2 and state["method"] == "tpld_phase1"
    assert state["lambdas"].tolist() == pytest.approx(phase1["lambdas"])
    # SGD with momentum, constant lr (head 10x) and BN in eval mode, as the released recipe.
    groups = state["optimizers"][0]["param_groups"]
    assert [g["lr"] for g in groups] == pytest.approx([5e-5, 5e-4])
    assert all(g["momentum"] == 0.9 for g in groups)

    split = json.loads((out / "phase2_1" / "split.json").read_text())
    assert split["num_easy"] == 2 and split["num_hard"] == 4  # floor(0.34 * 6)
    assert split["easy_min_confidence"] >= split["hard_max_confidence"]
    assert set(split["easy"]).isdisjoint(split["hard"])
    phase2 = load_checkpoint(out / "phase2_1" / "last.pt")
    assert "discriminator" in phase2 and len(phase2["optimizers"]) == 2
    assert phase2["optimizers"][1]["param_groups"][0]["betas"] == (0.9, 0.99)

    results = {s["name"]: s for s in summary["stages"]}
    assert results["phase1_1"]["pseudo"]["labelled_fraction"] == phase1["labelled_fraction"]
    assert results["phase2_1"]["pseudo"]["split"]["num_easy"] == 2
    tags = _tensorboard_tags(out / "tensorboard")
    assert {"phase2_1/loss/d_accuracy", "phase1_1/labelled_fraction",
            "phase1_1/labelled_fraction_confident", "phase2_1/split/num_easy"} <= set(tags["scalars"])
    assert "phase2_1/image_confidence" in tags["histograms"]


def _tensorboard_tags(directory):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(directory))
    accumulator.Reload()
    return accumulator.Tags()


def test_bn_layers_stay_in_eval_mode_and_keep_their_statistics(fixture_root, tmp_path):
    config = tpld_config(fixture_root, **{"pipeline": "[source_only, phase1_1]",
                                         "runtime.tensorboard": "false"})
    train.run_pipeline(config, tmp_path / "run")
    before = load_checkpoint(tmp_path / "run" / "source_only" / "last.pt")["model"]
    after = load_checkpoint(tmp_path / "run" / "phase1_1" / "last.pt")["model"]
    stats = [k for k in before if k.endswith("running_mean") or k.endswith("running_var")]
    assert stats and all(torch.equal(before[k], after[k]) for k in stats)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.endswith("weight")
               and "bn" not in k)


@pytest.mark.parametrize("loss", ["ce", "mrkld", "lrent"])
def test_crst_rounds_run_with_each_loss(fixture_root, tmp_path, loss):
    overrides = tiny_overrides(fixture_root, stages=CRST_STAGES, **{
        "pipeline": "[source_only, round1]", "stages.round1.loss": loss,
        "stages.round1.source_portion": 0.5, "stages.round1.mine_p": 1.0,
        "runtime.tensorboard": "false"})
    config = load_config("crst_gta5", overrides)
    summary = train.run_pipeline(config, tmp_path / "run")
    assert [s["name"] for s in summary["stages"]] == ["source_only", "round1"]
    manifest = json.loads((tmp_path / "run" / "round1" / "pseudo" / "manifest.json").read_text())
    assert manifest["settings"]["vote"] is None
    assert manifest["labelled_fraction"] == manifest["labelled_fraction_confident"]
    state = load_checkpoint(tmp_path / "run" / "round1" / "last.pt")
    assert state["complete"] and state["method"] == "cbst"


def test_a_killed_tpld_run_resumes_to_the_same_weights(fixture_root, tmp_path):
    common = {"runtime.checkpoint_every": 2, "runtime.tensorboard": "false",
              "stages.source_only.iterations": 1}
    straight = tpld_config(fixture_root, iterations=3, **common)
    train.run_pipeline(straight, tmp_path / "straight")
    # Killed at the 3rd iteration of each process: phase 1's 2nd (after source-only's one),
    # then - resumed from phase 1's checkpoint at 2 - phase 2's 2nd.
    killed = tpld_config(fixture_root, iterations=3, **common,
                         **{"runtime.stop_after_iterations": 3})
    for stage, done in (("phase1_1", 2), ("phase2_1", 2)):
        with pytest.raises(StopRequested):
            train.run_pipeline(killed, tmp_path / "resumed")
        partial = load_checkpoint(tmp_path / "resumed" / stage / "last.pt")
        assert partial["iteration"] == done and not partial["complete"]
    train.run_pipeline(straight, tmp_path / "resumed")
    for stage in ("phase1_1", "phase2_1"):
        expected = load_checkpoint(tmp_path / "straight" / stage / "last.pt")
        actual = load_checkpoint(tmp_path / "resumed" / stage / "last.pt")
        for key in expected["model"]:
            assert torch.equal(expected["model"][key], actual["model"][key]), (stage, key)
    expected = load_checkpoint(tmp_path / "straight" / "phase2_1" / "last.pt")["discriminator"]
    actual = load_checkpoint(tmp_path / "resumed" / "phase2_1" / "last.pt")["discriminator"]
    assert all(torch.equal(expected[k], actual[k]) for k in expected)


def test_finished_stages_are_reused_from_an_earlier_run(fixture_root, tmp_path):
    earlier = tpld_config(fixture_root, **{"pipeline": "[source_only]",
                                          "runtime.tensorboard": "false"})
    train.run_pipeline(earlier, tmp_path / "earlier")
    config = tpld_config(fixture_root, **{"pipeline": "[source_only, phase1_1]",
                                         "runtime.tensorboard": "false",
                                         "runtime.reuse_from": str(tmp_path / "earlier")})
    summary = train.run_pipeline(config, tmp_path / "later")
    reused = json.loads((tmp_path / "later" / "source_only" / "result.json").read_text())
    assert reused["reused_from"] == str(tmp_path / "earlier" / "source_only")
    original = load_checkpoint(tmp_path / "earlier" / "source_only" / "last.pt")["model"]
    copied = load_checkpoint(tmp_path / "later" / "source_only" / "last.pt")["model"]
    assert all(torch.equal(original[k], copied[k]) for k in original)
    assert [s["name"] for s in summary["stages"]] == ["source_only", "phase1_1"]

    # Another source-only recipe is not reused: the stage trains.
    other = tpld_config(fixture_root, **{"pipeline": "[source_only]",
                                        "runtime.tensorboard": "false",
                                        "stages.source_only.lr": 2e-4,
                                        "runtime.reuse_from": str(tmp_path / "earlier")})
    train.run_pipeline(other, tmp_path / "other")
    assert "reused_from" not in json.loads(
        (tmp_path / "other" / "source_only" / "result.json").read_text())


@pytest.mark.parametrize("preset", ["cbst_gta5", "crst_gta5", "tpld_gta5", "tpld_synthia",
                                    "demo_tpld"])
def test_presets_load_with_the_released_schedules(preset):
    config = load_config(preset)
    stages = [config["stages"][name] for name in config["pipeline"][1:]]
    portions = [stage["portion"] for stage in stages]
    expected, p = [], 0.2
    for _ in portions:
        expected.append(p)
        p = min(p + 0.05, 0.5)
    assert portions == expected  # float64 steps of 0.05, exactly
    if preset != "demo_tpld":
        assert all(s["optimizer"] == "sgd" and s["lr"] == 5e-5 and s["bn_eval"] for s in stages)
        assert all(s["pseudo_scales"] == [0.9] and s["pseudo_flip"] for s in stages)


def test_demo_tpld_shares_the_demo_recipe_up_to_source_only():
    from fastst.methods.reuse import same_recipe_through

    assert same_recipe_through(load_config("demo"), load_config("demo_tpld"), "source_only")
    assert not same_recipe_through(load_config("demo"), load_config("demo_tpld"), "phase1_1")


def test_a_one_seed_run_reuses_its_seed_of_a_multi_seed_run(tmp_path):
    """A run of seed 1 may reuse DIR/seed1 of a ``seeds: 3`` run (the seed is matched by
    directory, not compared as a key); a seed DIR did not run is not reused."""
    from fastst.methods.reuse import _seed_dir, same_recipe_through

    saved = dict(load_config("demo"), seed=0, seeds=3)
    assert same_recipe_through(saved, dict(load_config("demo"), seed=1, seeds=1), "warmup")
    assert _seed_dir(tmp_path, saved, 1) == tmp_path / "seed1"
    assert _seed_dir(tmp_path, saved, 3) is None
    single = dict(saved, seeds=1)
    assert _seed_dir(tmp_path, single, 0) == tmp_path
    assert _seed_dir(tmp_path, single, 1) is None


@pytest.mark.parametrize("override, message", [
    ("stages.phase1_1.vote_window=4", "vote_window must be an odd integer"),
    ("stages.phase1_1.portion=1.5", "portion must be a finite number >= 0 and <= 1"),
    ("stages.phase2_1.easy_portion=1.0", "easy_portion must be in (0, 1)"),
    ("stages.phase1_1.optimizer=rmsprop", "optimizer must be one of adam, sgd"),
    ("stages.phase1_1.source_portion=-0.1", "source_portion must be a finite number >= 0"),
    ("stages.phase1_1.loss=kld", "phase1_1.loss must be one of ce, mrkld, lrent"),
    ("stages.phase1_1.lrent_alpha=0", "lrent_alpha must be a finite number > 0"),
])
def test_bad_tpld_values_are_rejected_by_name(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config("tpld_gta5", [override])


def test_phase1_trains_with_the_loss_of_its_base_method(tmp_path):
    """One step's loss of a tpld_phase1 round for each ``loss``: CBST's CE, CRST-MRKLD's or
    CRST-LRENT's (soft labels from the teacher's probabilities), each through the bootstrapping
    loss; three different values on the same batch."""
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 16, 32, generator=g)
    logits = torch.randn(2, 19, 4, 8, generator=g)
    labels = torch.randint(0, 19, (2, 16, 32), generator=g)
    labels[torch.rand(2, 16, 32, generator=g) < 0.3] = 255
    is_target = torch.tensor([True, False])
    lambdas = torch.rand(19, generator=g) * 0.3 + 0.05
    torch.manual_seed(0)
    teacher = torch.nn.Conv2d(3, 19, 1).eval().requires_grad_(False)
    teacher.weight.mul_(4.0)  # sharper than at init: LRENT selects some pixels
    soft, selected = lrent_soft_labels(torch.softmax(teacher(images), 1), lambdas, 0.25)
    expected = {
        "ce": tpld_phase1_loss(logits, labels, is_target, lambdas, beta=0.95, mrkld_weight=0.0),
        "mrkld": tpld_phase1_loss(logits, labels, is_target, lambdas, beta=0.95,
                                  mrkld_weight=0.01),
        "lrent": tpld_phase1_lrent_loss(logits, labels, is_target, lambdas, soft, selected,
                                        beta=0.95)}
    assert selected.any() and len({round(float(v), 5) for v in expected.values()}) == 3
    for loss, value in expected.items():
        config = load_config("tpld_gta5", [f"stages.phase1_1.loss={loss}",
                                           "stages.phase1_1.lrent_alpha=0.25"])
        ctx = RunContext(config=config, run_dir=tmp_path, seed=0, device=torch.device("cpu"))
        stage = TPLDPhase1(ctx, "phase1_1")
        stage.manifest = {"lambdas": lambdas.tolist()}
        # The teacher's probabilities on the batch's crops (where they come from:
        # test_tpld_targets.py).
        stage.teacher_probs = lambda batch: torch.softmax(teacher(batch["image"]), 1)
        got = stage.loss(logits, {"image": images}, labels, is_target)
        torch.testing.assert_close(got, value, rtol=1e-6, atol=1e-6, msg=loss)
