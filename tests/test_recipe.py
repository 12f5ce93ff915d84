"""The recipe a preset trains (``python -m fastst.train --dry-run``) against numbers transcribed
from the released code, each with its source file and line.

IAST = Raykoooo/IAST (configs under code/config/<task>/run_task/, trainers under
code/sseg/workflow/); CRST = yzou2/CRST (crst_seg.py, dataset/list/).
"""
import json
import math

import pytest
import torch

from fastst import pipeline, train
from fastst.config import ConfigError, load_config
from fastst.methods.chain import chain_plan, snapshots_needed
from fastst.recipe import describe_recipe, set_sizes

# --- the released IAST recipe ---------------------------------------------------------------
# Images: data/gtav_train.json has 24,941 entries, data/SYNTHIA_train.json 9,400.
IAST_SOURCE = {"gta5": 24941, "synthia": 9400}
# Per stage: (EPOCHES, BATCHSIZE, LR, T_MAX) of gtav2cityscapes_v100_1/run_task/*.yaml
# (source_only.yaml:13,16,15,20; warmup_at.yaml:19,22,21,26; sl_1.yaml:17,20,19,25;
# sl_2.yaml:17,20,19,25; sl_3.yaml:17,20,19,25); syn2cityscapes_v100_1 has the same lines.
IAST_STAGES = {"source_only": (8, 8, 1e-4, 8), "warmup": (4, 4, 2e-5, 4),
               "round1": (2, 8, 3e-5, 3), "round2": (2, 8, 2.5e-5, 3),
               "round3": (2, 8, 2e-5, 3)}
# Discriminator LR: warmup_at.yaml:15 (MODEL.DISCRIMINATOR.LR [0.00002]).
IAST_D_LR = 2e-5
# Adversarial weight: warmup_at.yaml:14 (WEIGHT [0.05,] GTA5, [0.001,] SYNTHIA).
IAST_LAMBDA_ADV = {"gta5": 0.05, "synthia": 0.001}
# sl_k.yaml:13-14 (LAMBDA_KLDREG_WEIGHT 0.1, LAMBDA_ENTROPY_WEIGHT 3.0), :43 (PSEUDO_PL_ALPHA
# 0.2 / 0.25 / 0.3), :46 (SOURCE_LOSS_WEIGHT 0).
IAST_ALPHA = {"round1": 0.2, "round2": 0.25, "round3": 0.3}


def released_iast_lrs(epochs, batch, lr, t_max, num_source, base):
    """The rate of a group with base rate ``base`` at the first, middle and last iteration, as
    the released code computes it: expect_iter = n_train * EPOCHES // BATCHSIZE with n_train =
    len(train_data) * BATCHSIZE (drop_last) (sl_trainer.py:117-118), T = T_MAX * expect_iter //
    EPOCHES and eta_min = TRAIN.LR * 0.001 for every scheduler (sl_trainer.py:206-219), the
    cosine of cos_annealing_with_restart.py:41-43, one scheduler step per iteration after the
    constructor's (sl_trainer.py:326-328)."""
    expect_iter = (num_source // batch) * batch * epochs // batch
    period = t_max * expect_iter // epochs
    floor = lr * 0.001
    points = (0, expect_iter // 2, expect_iter - 1)
    return expect_iter, [floor + (base - floor) * (1 + math.cos(math.pi * i / period)) / 2
                         for i in points]


@pytest.mark.parametrize("preset,source", [("iast_gta5", "gta5"), ("iast_synthia", "synthia")])
def test_iast_presets_train_the_released_recipe(preset, source):
    recipe = describe_recipe(load_config(preset))
    assert recipe["set_sizes"]["source"] == IAST_SOURCE[source]
    stages = {stage["name"]: stage for stage in recipe["stages"]}
    assert list(stages) == list(IAST_STAGES)
    for name, (epochs, batch, lr, t_max) in IAST_STAGES.items():
        stage = stages[name]
        # build_optimizer: backbone 0.1 * LR, decoder and predictor LR (trainer.py:334-338).
        iterations, backbone = released_iast_lrs(epochs, batch, lr, t_max,
                                                 IAST_SOURCE[source], 0.1 * lr)
        _, head = released_iast_lrs(epochs, batch, lr, t_max, IAST_SOURCE[source], lr)
        assert stage["iterations"] == iterations, name
        assert stage["batch_size"] == batch
        assert stage["crop"] == [512, 1024]
        assert stage["lr"]["backbone"] == pytest.approx(backbone, rel=1e-12), name
        assert stage["lr"]["head"] == pytest.approx(head, rel=1e-12), name
        if name == "warmup":
            _, d_rates = released_iast_lrs(epochs, batch, lr, t_max, IAST_SOURCE[source],
                                           IAST_D_LR)
            assert stage["lr"]["discriminator"] == pytest.approx(d_rates, rel=1e-12)
            assert stage["loss"]["lambda_adv"] == IAST_LAMBDA_ADV[source]
        else:
            assert "discriminator" not in stage["lr"]
        if name in IAST_ALPHA:
            assert stage["loss"] == {"selector": "ias", "alpha": IAST_ALPHA[name],
                                     "lambda_kld": 0.1, "lambda_ent": 3.0, "source_weight": 0.0}
    # The numbers docs/recipes.md §4 gives: round 1's backbone starts at 3e-6, not 3e-5.
    assert stages["round1"]["lr"]["backbone"][0] == pytest.approx(3e-6)
    if source == "gta5":
        assert [stages[n]["iterations"] for n in IAST_STAGES] == [24936, 24940, 6234, 6234, 6234]


# --- the released CRST recipe (the base of CBST, CRST and TPLD phase 1) ---------------------
CRST_SOURCE = 19984      # dataset/list/gta5/train.lst: 19,984 lines
CITYSCAPES_TRAIN = 2975  # dataset/list/cityscapes/train.lst: 2,975 lines
CRST_LR = 5e-5           # crst_seg.py:66 LEARNING_RATE, :67 POWER 0.0 (constant)
CRST_BATCH = 2           # crst_seg.py:62
CRST_EPR = 2             # crst_seg.py:71 epochs per round
CRST_SRC_PORT = (0.03, 0.0025)  # crst_seg.py:44 INIT_SRC_PORT, :80 SRC_PORT_STEP
CRST_TGT_PORT = (0.2, 0.05)     # crst_seg.py:75 INIT_TGT_PORT, :77 TGT_PORT_STEP


def released_crst_round(k):
    """Iterations and portions of round k (0-based): src_num_sel = floor(src_num * src_portion)
    (crst_seg.py:729), tot_iter = ceil((src_num_sel + tgt_num) / batch) per epoch (:372), EPR
    epochs; SGD groups LR and 10 * LR (:373-374)."""
    source_portion = CRST_SRC_PORT[0]
    target_portion = CRST_TGT_PORT[0]
    for _ in range(k):  # crst_seg.py:330 and :339, in float64
        source_portion = min(source_portion + CRST_SRC_PORT[1], 0.06)
        target_portion = min(target_portion + CRST_TGT_PORT[1], 0.5)
    per_epoch = math.ceil((math.floor(CRST_SOURCE * source_portion) + CITYSCAPES_TRAIN)
                          / CRST_BATCH)
    return per_epoch * CRST_EPR, source_portion, target_portion


@pytest.mark.parametrize("preset,loss", [("cbst_gta5", "ce"), ("crst_gta5", "mrkld")])
def test_class_balanced_presets_train_the_released_recipe(preset, loss):
    recipe = describe_recipe(load_config(preset))
    assert recipe["set_sizes"] == {"source": CRST_SOURCE, "target": CITYSCAPES_TRAIN, "val": 500}
    rounds = [stage for stage in recipe["stages"] if stage["method"] == "cbst"]
    assert len(rounds) == 3  # NUM_ROUNDS = 4, the last only tests (crst_seg.py:70, :324)
    for k, stage in enumerate(rounds):
        iterations, source_portion, target_portion = released_crst_round(k)
        assert stage["iterations"] == iterations
        assert stage["batch_size"] == CRST_BATCH
        assert stage["optimizer"] == "sgd" and stage["schedule"] == "constant"
        assert stage["lr"] == {"backbone": [CRST_LR] * 3, "head": [10 * CRST_LR] * 3}
        assert stage["loss"]["loss"] == loss
        assert stage["loss"]["source_portion"] == pytest.approx(source_portion, rel=1e-12)
        assert stage["loss"]["portion"] == pytest.approx(target_portion, rel=1e-12)
    # mrkld.sh:14-15 passes --mr-weight-kld 0.1, applied twice (0.01 effective; README).
    if loss == "mrkld":
        assert all(stage["loss"]["mrkld_weight"] == 0.01 for stage in rounds)


@pytest.mark.parametrize("preset,source", [("tpld_gta5", CRST_SOURCE), ("tpld_synthia", 9400)])
def test_tpld_presets_phase1_on_the_crst_recipe(preset, source):
    recipe = describe_recipe(load_config(preset))
    assert recipe["set_sizes"]["source"] == source
    phase1 = [stage for stage in recipe["stages"] if stage["method"] == "tpld_phase1"]
    phase2 = [stage for stage in recipe["stages"] if stage["method"] == "tpld_phase2"]
    assert len(phase1) == 6 and len(phase2) == 3  # TPLD's figure: six phase-1 rounds
    portion = 0.2
    for k, stage in enumerate(phase1):
        source_portion = 0.03
        for _ in range(k):
            source_portion = min(source_portion + 0.0025, 0.06)
        per_epoch = (math.floor(source * source_portion) + CITYSCAPES_TRAIN) // 2
        assert stage["iterations"] == 2 * per_epoch
        assert stage["lr"] == {"backbone": [CRST_LR] * 3, "head": [10 * CRST_LR] * 3}
        assert stage["loss"]["portion"] == pytest.approx(portion, rel=1e-12)
        assert stage["loss"]["beta"] == 0.95  # TPLD paper, bootstrapping beta
        portion = min(portion + 0.05, 0.5)
    for stage in phase2:
        # One easy and one hard crop a step: an epoch reads every target image once.
        assert stage["iterations"] == 2 * (CITYSCAPES_TRAIN // 2)
        assert stage["lr"]["discriminator"] == [1e-4] * 3  # ADVENT's D Adam 1e-4
        assert stage["loss"]["lambda_adv"] == 0.001


def test_source_only_of_class_balanced_presets_follows_iast():
    """The CRST release starts from a trained source model; fastst's source-only stage of the
    class-balanced presets is IAST's (source_only.yaml) over the CRST source list."""
    stage = describe_recipe(load_config("crst_gta5"))["stages"][0]
    iterations, backbone = released_iast_lrs(8, 8, 1e-4, 8, CRST_SOURCE, 1e-5)
    assert stage["iterations"] == iterations == 8 * (CRST_SOURCE // 8)
    assert stage["lr"]["backbone"] == pytest.approx(backbone, rel=1e-12)


# --- chaining ------------------------------------------------------------------------------

def test_released_chain_of_the_iast_scripts():
    """run_self_traing_3rounds.sh (gtav2cityscapes_v100_1): warmup --resume_from
    source_only/best_iter.pth (line 7); round 1 --resume_from warmup_at/last_iter.pth
    --pseudo_resume_from warmup_at/best_iter.pth (line 10); round k+1 --resume_from
    sl_k/epoch_2.pth --pseudo_resume_from sl_k/epoch_1.pth (lines 13, 16). The trainers save
    last_iter.pth and epoch_<epoch+1>.pth every ITER_VAL iterations (sl_trainer.py:341, :391-392),
    best_iter.pth when val mIoU >= the best (:376-378, :393-394); epoch counts passes over the
    source loader (:274-279)."""
    config = load_config("iast_gta5", ["chain=released"])
    plan = chain_plan(config, set_sizes(config))
    assert plan["source_only"]["starts_from"] == {"stage": None, "checkpoint": "init"}
    assert plan["warmup"]["starts_from"] == {"stage": "source_only", "checkpoint": "best"}
    # warm-up: 24,940 iterations, saves every 400: the last at 24,800.
    assert plan["round1"] == {"starts_from": {"stage": "warmup", "checkpoint": 24800},
                              "labels_with": {"stage": "warmup", "checkpoint": "best"}}
    # Round: 3117 iterations an epoch, saves every 400: epoch 1 ends with 2800, epoch 2 with 6000.
    for previous, name in (("round1", "round2"), ("round2", "round3")):
        assert plan[name] == {"starts_from": {"stage": previous, "checkpoint": 6000},
                              "labels_with": {"stage": previous, "checkpoint": 2800}}
    assert snapshots_needed(config, set_sizes(config)) == {
        "source_only": {"best"}, "warmup": {"best", 24800}, "round1": {2800, 6000},
        "round2": {2800, 6000}, "round3": set()}
    # SYNTHIA: 1175 iterations an epoch: 800 and 2000.
    synthia = load_config("iast_synthia", ["chain=released"])
    assert chain_plan(synthia, set_sizes(synthia))["round2"]["labels_with"]["checkpoint"] == 800
    assert chain_plan(synthia, set_sizes(synthia))["round2"]["starts_from"]["checkpoint"] == 2000


def test_last_chain_selects_nothing():
    config = load_config("iast_gta5")
    plan = chain_plan(config, set_sizes(config))
    assert all(entry["starts_from"]["checkpoint"] in ("init", "last") for entry in plan.values())
    assert plan["round1"]["labels_with"] == {"stage": "warmup", "checkpoint": "last"}
    assert not any(snapshots_needed(config, set_sizes(config)).values())


def test_each_round_starts_from_the_last_checkpoint_of_the_stage_before(tmp_path):
    """Under the default chain (``last``) the demo's round k starts from the last checkpoint of
    the stage run before it (warm-up for round 1), not from another stage's or a fresh model."""
    from fastst.checkpoint import checkpoint_state, save_checkpoint
    from fastst.models import deeplabv2

    config = load_config("demo")
    stages = list(config["pipeline"])
    plan = chain_plan(config, set_sizes(config))
    saved = {}
    for number, stage in enumerate(stages):
        torch.manual_seed(number)
        model = deeplabv2(num_classes=config["num_classes"], backbone=config["model"]["backbone"])
        save_checkpoint(tmp_path / stage / "last.pt", checkpoint_state(model, complete=True))
        saved[stage] = model.state_dict()
    for index in range(2, len(stages)):
        start = pipeline._initial_model(config, tmp_path, stages, index, config["seed"], None, plan)()
        expected = saved[stages[index - 1]]
        assert all(torch.equal(v, expected[k]) for k, v in start.state_dict().items()), stages[index]
        other = saved[stages[index - 2]]
        assert not all(torch.equal(v, other[k]) for k, v in start.state_dict().items())


def test_released_chain_needs_a_snapshot_that_can_exist():
    config = load_config("demo", ["chain=released"])  # 62 iterations an epoch, select_every 400
    with pytest.raises(ConfigError, match=r"stages.warmup.select_every"):
        chain_plan(config, set_sizes(config))
    with pytest.raises(SystemExit) as stop:
        train.main(["--preset", "demo", "--dry-run", "chain=released"])
    assert stop.value.code == 2
    with pytest.raises(ConfigError, match="chain must be one of last, released"):
        load_config("demo", ["chain=best"])


# --- the command ----------------------------------------------------------------------------

def test_dry_run_prints_json_and_table_without_data(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no data/ here: nothing may be read
    assert train.main(["--preset", "iast_gta5", "--dry-run", "--json",
                       "stages.round1.lr=6e-5"]) == 0
    recipe = json.loads(capsys.readouterr().out)
    round1 = recipe["stages"][2]
    assert set(round1) >= {"name", "iterations", "batch_size", "lr"}
    assert round1["name"] == "round1" and round1["lr"]["backbone"][0] == pytest.approx(6e-6)
    assert set(round1["lr"]) == {"backbone", "head"}
    assert set(recipe["stages"][1]["lr"]) == {"backbone", "head", "discriminator"}
    assert train.main(["--preset", "tpld_gta5", "--dry-run"]) == 0
    table = capsys.readouterr().out
    assert "phase2_3" in table and "lr backbone" in table and "lr D" in table
    assert not (tmp_path / "runs").exists()
    with pytest.raises(SystemExit):
        train.main(["--preset", "demo", "--json"])
    assert "--json goes with --dry-run" in capsys.readouterr().err


# --- chain: released in a run ----------------------------------------------------------------

def test_released_chain_trains_and_labels_from_the_selected_snapshots(tmp_path, monkeypatch):
    from fastst.checkpoint import load_checkpoint
    from fastst.models import load_model
    from fastst.methods.context import RunContext
    from fastst.methods.iast import IASTRound
    from test_train import make_fixtures, tiny_overrides

    make_fixtures(tmp_path / "data")
    stages = ("source_only", "warmup", "round1", "round2")
    overrides = tiny_overrides(tmp_path / "data", stages=stages, **{
        "chain": "released", "pipeline": "[source_only, warmup, round1, round2]",
        "stages.source_only.iterations": 3, "stages.warmup.iterations": 3,
        "stages.round1.iterations": 5, "stages.round1.iterations_per_epoch": 3,
        "stages.round2.iterations": 1, "stages.source_only.select_every": 1,
        "stages.warmup.select_every": 1, "stages.round1.select_every": 2,
        "runtime.tensorboard": "false"})
    config = load_config("iast_gta5", overrides)
    # Scripted val mIoUs: source-only ties at 2 and 3 (the later wins, as the released >=),
    # the warm-up is best after its first iteration.
    scores = iter([0.5, 0.7, 0.7, 0.9, 0.1, 0.2])
    monkeypatch.setattr(pipeline, "evaluate_miou", lambda ctx, model, val_set, stage: next(scores))
    out = tmp_path / "run"
    train.run_pipeline(config, out)
    assert next(scores, None) is None, "best is scored only where a later stage needs it"

    snapshot = lambda stage, name: load_checkpoint(out / stage / name)  # noqa: E731
    assert snapshot("source_only", "best.pt")["iteration"] == 3
    assert load_checkpoint(out / "source_only" / "last.pt")["best"] == {"iteration": 3,
                                                                         "miou": 0.7}
    assert snapshot("warmup", "best.pt")["iteration"] == 1
    assert snapshot("warmup", "iter_3.pt")["iteration"] == 3
    assert {p.name for p in (out / "round1").glob("*.pt")} == {"last.pt", "iter_2.pt",
                                                               "iter_4.pt"}
    assert not list((out / "round2").glob("iter_*.pt"))

    # Round 1 labelled with the warm-up's best snapshot, round 2 with round 1 at iteration 2.
    ctx = RunContext(config=config, run_dir=tmp_path / "check", seed=config["seed"],
                     device=torch.device("cpu"))
    for stage, labeller in (("round1", out / "warmup" / "best.pt"),
                            ("round2", out / "round1" / "iter_2.pt")):
        manifest = IASTRound(ctx, stage).label_pass(load_model(labeller).eval(),
                                                    tmp_path / "check" / stage)
        used = json.loads((out / stage / "pseudo" / "manifest.json").read_text())
        assert used["theta"] == manifest["theta"], stage
    best, last = snapshot("warmup", "best.pt")["model"], snapshot("warmup", "last.pt")["model"]
    assert any(not torch.equal(best[k], last[k]) for k in best)

    # Round 2 starts from round 1's iteration-4 snapshot, not from its last checkpoint.
    from fastst.methods.chain import chain_plan
    from fastst.recipe import set_sizes

    plan = chain_plan(config, {"source": 6, "target": 6, "val": 2})
    assert plan["round2"]["starts_from"] == {"stage": "round1", "checkpoint": 4}
    start = pipeline._initial_model(config, out, list(config["pipeline"]), 3, config["seed"],
                                 None, plan)()
    expected = snapshot("round1", "iter_4.pt")["model"]
    assert all(torch.equal(v, expected[k]) for k, v in start.state_dict().items())
    assert set_sizes(config)["source"] == 24966  # the dry run's standard size, no data read

    # A run reusing these stages gets their snapshots too (and scores nothing again).
    again = load_config("iast_gta5", overrides + [f"runtime.reuse_from={out}"])
    train.run_pipeline(again, tmp_path / "again")
    for stage, name in (("source_only", "best.pt"), ("warmup", "best.pt"),
                        ("warmup", "iter_3.pt"), ("round1", "iter_4.pt")):
        copied = tmp_path / "again" / stage / name
        assert copied.read_bytes() == (out / stage / name).read_bytes(), (stage, name)


def test_stage_eval_protocol_reaches_the_evaluation(tmp_path, monkeypatch):
    """iast_gta5 validates each stage as the released trainer does: source-only at 512x1024
    (source_only.yaml:32 VAL.RESIZE_SIZE [1024, 512]), warm-up at 640x1280 (warmup_at.yaml:38),
    rounds at 768x1536 (sl_1.yaml:36)."""
    import fastst.evaluate
    from test_train import make_fixtures, tiny_overrides

    config = load_config("iast_gta5")
    assert [config["stages"][s]["eval_protocol"] for s in config["pipeline"]] == [
        "iast_source_only", "iast_warmup", "iast_round", "iast_round", "iast_round"]
    make_fixtures(tmp_path / "data")
    seen = []
    real = fastst.evaluate.evaluate

    def spy(*args, **kwargs):
        seen.append({key: kwargs.get(key) for key in ("protocol", "scales", "input_size")})
        return real(*args, **kwargs)

    monkeypatch.setattr(fastst.evaluate, "evaluate", spy)
    overrides = tiny_overrides(tmp_path / "data", stages=("source_only", "warmup"), **{
        "pipeline": "[source_only, warmup]", "stages.warmup.eval_protocol": "null",
        "eval.scales": "[1.0, 0.5]", "runtime.tensorboard": "false"})
    train.run_pipeline(load_config("iast_gta5", overrides), tmp_path / "run")
    assert seen == [{"protocol": "iast_source_only", "scales": None, "input_size": None},
                    {"protocol": None, "scales": (1.0, 0.5), "input_size": None}]


def test_chain_knows_every_labelling_method():
    """chain.py's list of labelling methods is the registry's methods with a label pass."""
    from fastst.methods import _METHODS
    from fastst.methods.chain import LABELLING_METHODS

    assert set(LABELLING_METHODS) == {m for m, cls in _METHODS.items() if hasattr(cls, "label_pass")}
