"""Stage lengths follow the recipe: iterations per epoch, total iterations, the schedule period T
and the stop point of every stage method, on fixtures whose source and target sets differ in size
(10 source, 6 target images), so that an epoch counted on the wrong set shows; the dry run
(``fastst.recipe``) gives the numbers of the real run, and the real presets' dry runs stop the
rounds where the released recipes do.

The expected numbers are written out here from the released code:

* IAST (Raykoooo/IAST code/sseg/workflow/sl_trainer.py): every stage, the self-training rounds
  included, counts its epochs on the *source* loader: ``train_data`` is the source set with
  drop_last (:96), ``n_train = len(train_data) * BATCHSIZE`` and ``expect_iter = n_train * EPOCHES
  // BATCHSIZE`` (:117-118); the cosine period is ``T_MAX * expect_iter // EPOCHES`` (:208), so a
  round (EPOCHES 2, T_MAX 3, run_task/sl_*.yaml) stops at 2T/3; the rate of iteration i is
  ``eta_min + (base - eta_min) * (1 + cos(pi * i / T)) / 2`` (code/sseg/models/losses/
  cos_annealing_with_restart.py:41-43) with eta_min = LR * 0.001 (sl_trainer.py:206-219);
* CRST (yzou2/CRST crst_seg.py): a round's epoch is the mixed list of the sampled source images
  and every target image (:372; fastst uses floor where the released code takes ceil, README
  "Training"), two epochs a round (:71, :391);
* TPLD phase 2 reads one easy and one hard target crop per item of a batch: an epoch is
  floor(N_target / 2 / batch_size) iterations (README "Training").
"""
import json
import math

import pytest
import torch

from fastst import train
from fastst.checkpoint import load_checkpoint
from fastst.config import load_config
from fastst.models import deeplabv2
from fastst.methods.schedule import stage_lengths
from fastst.recipe import describe_recipe, set_sizes
from test_train import make_fixtures, restore_threads, tiny_overrides  # noqa: F401

N_SOURCE, N_TARGET, N_VAL = 10, 6, 2
SIZES = {"source": N_SOURCE, "target": N_TARGET, "val": N_VAL}


@pytest.fixture(scope="module")
def unequal_root(tmp_path_factory):
    """GTA5 and Cityscapes fixtures with 10 source and 6 target train images."""
    root = tmp_path_factory.mktemp("unequal")
    make_fixtures(root, n_source=N_SOURCE, n_target=N_TARGET, n_val=N_VAL)
    return root


def _overrides(root, stages, **extra):
    """tiny_overrides without its fixed iteration counts: lengths come from epochs."""
    overrides = tiny_overrides(root, stages=(), **{"runtime.tensorboard": "false",
                                                   "runtime.checkpoint_every": 1000,
                                                   "runtime.pseudo_quality": "false"})
    for stage in stages:
        overrides.append(f"stages.{stage}.batch_size=2")
        overrides.append(f"stages.{stage}.iterations=null")
        if stage not in ("source_only", "warmup"):
            overrides.append(f"stages.{stage}.pseudo_size=[16, 32]")
    return overrides + [f"{key}={value}" for key, value in extra.items()]


def _cosine(iteration, base, period, floor):
    return floor + (base - floor) * (1 + math.cos(math.pi * iteration / period)) / 2


def _init_checkpoint(path, num_classes=19):
    torch.manual_seed(0)
    model = deeplabv2(num_classes=num_classes, backbone="resnet18_w16")
    torch.save({"format": "fastst-checkpoint-v1", "model": model.state_dict(),
                "model_config": model.model_config}, path)
    return str(path)


def _check_run(config, out, summary, expected):
    """Every stage of ``expected`` ({name: (per_epoch, total, period)}) ran ``total`` iterations
    (result.json and checkpoint), with schedule period ``period``; its rates at the last
    iteration are the cosine's (or the base rates under a constant schedule); the dry run says
    the same."""
    results = {stage["name"]: stage for stage in summary["stages"]}
    recipe = {stage["name"]: stage for stage in describe_recipe(config, SIZES)["stages"]}
    for name, (per_epoch, total, period) in expected.items():
        settings = config["stages"][name]
        assert results[name]["iterations"] == total, name
        on_disk = json.loads((out / name / "result.json").read_text())
        assert on_disk["iterations"] == total, name
        state = load_checkpoint(out / name / "last.pt")
        assert state["complete"] and state["iteration"] == total, name
        assert state["total_iterations"] == total, name
        assert state["scheduler"]["period"] == pytest.approx(period, rel=1e-12), name
        assert state["scheduler"]["iteration"] == total - 1, name
        constant = settings.get("lr_schedule", "cosine") == "constant"
        floor = None if constant else 0.001 * settings["lr"]
        assert state["scheduler"]["floor"] == (None if constant else pytest.approx(floor)), name
        bases = {"backbone": settings["backbone_lr_mult"] * settings["lr"],
                 "head": settings["head_lr_mult"] * settings["lr"]}
        groups = state["optimizers"][0]["param_groups"]
        for group in groups:
            base = bases[group["name"]]
            last = base if constant else _cosine(total - 1, base, period, floor)
            assert group["lr"] == pytest.approx(last, rel=1e-9), (name, group["name"])
        if "d_lr" in settings:
            d_group = state["optimizers"][1]["param_groups"][0]
            last = settings["d_lr"] if constant else \
                _cosine(total - 1, settings["d_lr"], period, floor)
            assert d_group["lr"] == pytest.approx(last, rel=1e-9), name
        # The dry run (python -m fastst.train --dry-run) reports the same lengths and rates.
        assert stage_lengths(config, name, SIZES) == {"per_epoch": per_epoch, "total": total,
                                                      "period": period}, name
        dry = recipe[name]
        assert (dry["iterations"], dry["iterations_per_epoch"], dry["period"]) == \
            (total, per_epoch, period), name
        for group in groups:
            assert dry["lr"][group["name"]][2] == pytest.approx(group["lr"], rel=1e-12), name


def test_iast_stages_count_epochs_on_the_source_set(unequal_root, tmp_path):
    stages = ("source_only", "warmup", "round1")
    # round1 keeps the preset's epochs 2 and t_max 3 (released sl_1.yaml).
    config = load_config("iast_gta5", _overrides(unequal_root, stages, **{
        "pipeline": "[source_only, warmup, round1]",
        "stages.source_only.epochs": 1, "stages.source_only.t_max": 2,
        "stages.warmup.epochs": 1, "stages.warmup.t_max": 1}))
    assert (config["stages"]["round1"]["epochs"], config["stages"]["round1"]["t_max"]) == (2, 3)
    out = tmp_path / "run"
    summary = train.run_pipeline(config, out)
    per_epoch = N_SOURCE // 2  # 5; counted on the target set it would be 3
    expected = {"source_only": (per_epoch, per_epoch, 2 * per_epoch),
                "warmup": (per_epoch, per_epoch, per_epoch),
                "round1": (per_epoch, 2 * per_epoch, 3 * per_epoch)}
    _check_run(config, out, summary, expected)
    # The round stops at 2T/3 (10 of T = 15), three quarters of the way down the cosine:
    # lr = floor + (base - floor) / 4 there.
    total, period = expected["round1"][1:]
    assert 3 * total == 2 * period
    state = load_checkpoint(out / "round1" / "last.pt")
    lr = config["stages"]["round1"]["lr"]
    head = [g for g in state["optimizers"][0]["param_groups"] if g["name"] == "head"][0]
    assert _cosine(total, lr, period, 0.001 * lr) == \
        pytest.approx(0.001 * lr + (lr - 0.001 * lr) / 4)
    assert head["lr"] == pytest.approx(_cosine(total - 1, lr, period, 0.001 * lr), rel=1e-9)


def test_class_balanced_stages_count_the_mixed_list_and_half_the_target_set(unequal_root,
                                                                           tmp_path):
    init = _init_checkpoint(tmp_path / "init.pt")
    # CBST (cbst_gta5 round1, loss ce): 3 of the 10 source images join the 6 target images.
    cbst = load_config("cbst_gta5", _overrides(unequal_root, ("round1",), **{
        "stages.round1.source_portion": 0.3, "stages.round1.t_max": 3}))
    out = tmp_path / "cbst"
    summary = train.run_pipeline(cbst, out, stages=["round1"], init=init)
    mixed = N_TARGET + math.floor(N_SOURCE * 0.3)        # 9 items: 4 a batch-2 epoch
    per_epoch = mixed // 2
    _check_run(cbst, out, summary, {"round1": (per_epoch, 2 * per_epoch, 3 * per_epoch)})

    # TPLD phase 1 (the same mixed list) and phase 2 (batch 1 of easy + 1 of hard crops).
    tpld = load_config("tpld_gta5", _overrides(unequal_root, ("phase1_1", "phase2_1"), **{
        "pipeline": "[phase1_1, phase2_1]", "stages.phase1_1.source_portion": 0.3,
        "stages.phase2_1.batch_size": 1}))
    out = tmp_path / "tpld"
    summary = train.run_pipeline(tpld, out, init=init)
    phase2 = N_TARGET // 2 // 1                          # 3 (10 on the source set, 6 unhalved)
    assert tpld["stages"]["phase2_1"]["t_max"] == 2 and tpld["stages"]["phase2_1"]["epochs"] == 2
    _check_run(tpld, out, summary, {"phase1_1": (per_epoch, 2 * per_epoch, 2 * per_epoch),
                                    "phase2_1": (phase2, 2 * phase2, 2 * phase2)})


# --- the real presets, dry run -------------------------------------------------------------
# Images each role reads: GTA5 lists shipped in fastst/data/lists (IAST 24,941, CRST 19,984),
# SYNTHIA RAND_CITYSCAPES 9,400, Cityscapes train 2,975, the demo's synthetic 500 (semi: the
# labelled 1/8 of it, 62, and of Cityscapes, 371).
PRESET_SIZES = {"iast_gta5": (24941, 2975), "iast_synthia": (9400, 2975),
                "iast_semi_cityscapes": (371, 2604), "cbst_gta5": (19984, 2975),
                "crst_gta5": (19984, 2975), "tpld_gta5": (19984, 2975),
                "tpld_synthia": (9400, 2975), "demo": (500, 500), "demo_tpld": (500, 500),
                "demo_semi": (62, 438)}


@pytest.mark.parametrize("preset", sorted(PRESET_SIZES))
def test_dry_run_of_every_preset_counts_the_recipes_sets(preset):
    config = load_config(preset)
    source, target = PRESET_SIZES[preset]
    assert set_sizes(config)["source"] == source and set_sizes(config)["target"] == target
    recipe = {stage["name"]: stage for stage in describe_recipe(config)["stages"]}
    for name in config["pipeline"]:
        settings = config["stages"][name]
        method, batch = settings["method"], settings["batch_size"]
        if method in ("cbst", "tpld_phase1"):
            items = target + math.floor(source * settings["source_portion"])
        elif method == "tpld_phase2":
            items = target // 2
        else:  # source-only, warm-up and IAST rounds: epochs of the source set
            items = source
        per_epoch = settings["iterations_per_epoch"] or items // batch
        total = settings["iterations"] or settings["epochs"] * per_epoch
        stage = recipe[name]
        assert (stage["iterations_per_epoch"], stage["iterations"]) == (per_epoch, total), name
        assert stage["period"] == pytest.approx(settings["t_max"] * per_epoch), name
        if method == "iast":  # every preset's rounds stop at 2T/3
            assert 3 * stage["iterations"] == pytest.approx(2 * stage["period"]), name
    if preset in ("iast_gta5", "iast_synthia"):
        per_epoch = source // 8
        assert [recipe[r]["iterations"] for r in ("round1", "round2", "round3")] == \
            [2 * per_epoch] * 3
        assert recipe["round1"]["period"] == 3 * per_epoch
    if preset == "iast_gta5":  # not 742 = 2 * (2975 // 8), the target set's epochs
        assert recipe["round1"]["iterations"] == 6234 and recipe["round1"]["period"] == 9351
