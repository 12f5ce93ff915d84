"""Faults and bad input (fastst.faults and its uses in fastst.train, fastst.methods.trainer,
fastst.pseudo, fastst.checkpoint): a kill in a round's pseudo-label pass or a real SIGKILL in the
middle of a write, then a rerun, equals an uninterrupted run; NaN losses skip steps and give up
with the last good checkpoint intact; damaged data stops the run before training (and a check
that passed is remembered); a full disk is reported with exit status 2 and leaves no partial
file; checkpoints of another class count and bad configuration values get their messages."""
import errno
import json
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastst import faults, train
from fastst.checkpoint import ClassCountMismatch, load_checkpoint
from fastst.config import ConfigError, available_presets, load_config
from fastst.data.pseudo_label import pseudo_label_path
from fastst.faults import DataCheckFailed, NonFiniteLossError
from fastst.methods import source_only, trainer
from fastst.methods.context import RunContext, StopRequested
from fastst.models import deeplabv2
from test_train import fixture_root, make_fixtures, restore_threads, tiny_overrides  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
# Source-only (1 iteration) then an IAST round (2 iterations) whose pseudo-label pass over the 6
# target images takes 3 batches, with its state saved after each.
ROUND_PIPELINE = {"pipeline": "[source_only, round1]", "stages.source_only.iterations": 1,
                  "runtime.checkpoint_every": 1, "runtime.pseudo_state_every": 1,
                  "runtime.tensorboard": "false"}




def round_overrides(root, **extra):
    return tiny_overrides(root, stages=("source_only", "round1"), **{**ROUND_PIPELINE, **extra})


@pytest.fixture(scope="module")
def straight_round(fixture_root, tmp_path_factory):
    """The uninterrupted [source_only, round1] run every kill test is compared with."""
    out = tmp_path_factory.mktemp("straight") / "run"
    threads = torch.get_num_threads()
    train.run_pipeline(load_config("iast_gta5", round_overrides(fixture_root)), out)
    torch.set_num_threads(threads)
    return out


def assert_same_round(expected_dir, actual_dir):
    """Same round1 weights, pseudo labels and thresholds in two run directories."""
    expected, actual = (load_checkpoint(d / "round1" / "last.pt")
                        for d in (expected_dir, actual_dir))
    assert actual["complete"] and actual["iteration"] == expected["iteration"]
    for key, value in expected["model"].items():
        assert torch.equal(value, actual["model"][key]), key
    manifests = [json.loads((d / "round1" / "pseudo" / "manifest.json").read_text())
                 for d in (expected_dir, actual_dir)]
    for key in ("theta", "density", "images"):
        assert manifests[0][key] == manifests[1][key], key
    for image in manifests[0]["images"]:
        labels = [np.array(Image.open(pseudo_label_path(d / "round1" / "pseudo" / "labels",
                                                        image["name"])))
                  for d in (expected_dir, actual_dir)]
        np.testing.assert_array_equal(labels[0], labels[1])


def temp_files(directory):
    return sorted(p for p in Path(directory).rglob("*.tmp"))


# --- kills -------------------------------------------------------------------------------------

@pytest.mark.parametrize("damage", [None, "state", "label"])
def test_kill_in_a_rounds_pseudo_label_pass_then_resume(fixture_root, straight_round, tmp_path,
                                                        damage):
    out = tmp_path / "run"
    killed = load_config("iast_gta5", round_overrides(
        fixture_root, **{"runtime.stop_after_pseudo_batches": 2}))
    with pytest.raises(StopRequested):
        train.run_pipeline(killed, out)
    pseudo_dir = out / "round1" / "pseudo"
    state = torch.load(pseudo_dir / "state.pt", weights_only=True)
    assert state["done"] == 4 and not (pseudo_dir / "manifest.json").exists()
    assert not (out / "round1" / "last.pt").exists()
    if damage == "state":  # as a failing disk could leave it; a kill cannot (atomic writes)
        data = (pseudo_dir / "state.pt").read_bytes()
        (pseudo_dir / "state.pt").write_bytes(data[:len(data) // 2])
    elif damage == "label":  # an unsynced PNG after a power cut
        label = pseudo_label_path(pseudo_dir / "labels", state["names"][1])
        label.write_bytes(label.read_bytes()[:40])

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train.run_pipeline(load_config("iast_gta5", round_overrides(fixture_root)), out)
    restarts = [str(w.message) for w in caught if "starting the pass over" in str(w.message)]
    if damage is None:
        assert restarts == []
    else:
        expected = "unreadable" if damage == "state" else "missing or damaged"
        assert len(restarts) == 1 and expected in restarts[0], restarts
    assert_same_round(straight_round, out)


_DYING_SCRIPT = r"""
import os, signal, sys
import torch
from fastst import train

real_save, calls, kill_at = torch.save, [0], int(sys.argv[1])

def save_then_die(obj, f, *args, **kwargs):
    calls[0] += 1
    if calls[0] == kill_at:
        f.write(b"PK\x03\x04 the first bytes of a checkpoint")
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *args, **kwargs)

torch.save = save_then_die
sys.exit(train.main(sys.argv[2:]))
"""


@pytest.mark.parametrize("kill_at, half_written", [
    (3, "round1/pseudo/.state.pt."),  # saves: source_only, pass state 1, 2 (killed), ...
    (5, "round1/.last.pt."),          # ..., pass state 3, round1 iteration 1 (killed)
])
def test_sigkill_in_the_middle_of_a_write_then_rerun(fixture_root, straight_round, tmp_path,
                                                     kill_at, half_written):
    out = tmp_path / "run"
    argv = ["--preset", "iast_gta5", "--out", str(out)] + round_overrides(fixture_root)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-c", _DYING_SCRIPT, str(kill_at)] + argv,
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == -signal.SIGKILL, result.stderr
    leftovers = temp_files(out)
    assert [p for p in leftovers if str(p.relative_to(out)).startswith(half_written)], leftovers
    # Every file under its final name is whole.
    assert load_checkpoint(out / "source_only" / "last.pt")["complete"]
    for state in out.rglob("state.pt"):
        torch.load(state, weights_only=True)

    train.run_pipeline(load_config("iast_gta5", round_overrides(fixture_root)), out)
    assert temp_files(out) == []
    assert_same_round(straight_round, out)


# --- non-finite losses -------------------------------------------------------------------------

def poison_source_ce(monkeypatch, nan_from, nan_to=None):
    """Make source-only's loss NaN on its calls nan_from..nan_to (1-based, inclusive)."""
    real, calls = source_only.cross_entropy, [0]

    def cross_entropy(logits, labels):
        calls[0] += 1
        loss = real(logits, labels)
        poisoned = calls[0] >= nan_from and (nan_to is None or calls[0] <= nan_to)
        return loss * float("nan") if poisoned else loss

    monkeypatch.setattr(source_only, "cross_entropy", cross_entropy)


def record_saves(monkeypatch):
    """The checkpoints the trainer writes, as {"iteration", "params", "adam_step", ...}."""
    saves, real = [], trainer.save_checkpoint
    names = {name for name, _ in deeplabv2(num_classes=19, backbone="resnet18_w16")
             .named_parameters()}

    def save_checkpoint(path, state):
        saves.append({"iteration": state["iteration"], "complete": state["complete"],
                      "skipped": state["skipped_steps"],
                      "params": {k: v.clone() for k, v in state["model"].items() if k in names},
                      "adam_step": float(state["optimizers"][0]["state"][0]["step"])})
        return real(path, state)

    monkeypatch.setattr(trainer, "save_checkpoint", save_checkpoint)
    return saves


def source_only_config(root, iterations, **extra):
    return load_config("iast_gta5", tiny_overrides(root, iterations=iterations, **{
        "pipeline": "[source_only]", "runtime.tensorboard": "false", **extra}))


def test_a_nan_loss_skips_the_step_with_a_warning(fixture_root, tmp_path, monkeypatch):
    poison_source_ce(monkeypatch, 2, 3)
    saves = record_saves(monkeypatch)
    with pytest.warns(RuntimeWarning) as caught:
        summary = train.run_pipeline(source_only_config(fixture_root, 3), tmp_path / "run")
    messages = [str(w.message) for w in caught if "optimizer step skipped" in str(w.message)]
    assert messages == [
        "stage source_only, iteration 2: source_ce = nan; optimizer step skipped "
        "(1 in a row, stopping at 10)",
        "stage source_only, iteration 3: source_ce = nan; optimizer step skipped "
        "(2 in a row, stopping at 10)"]
    # No periodic checkpoint inside the run of skips; the skipped steps moved no weight and
    # no optimizer state.
    assert [(s["iteration"], s["complete"], s["skipped"]) for s in saves] == \
        [(1, False, 0), (3, True, 2)]
    first, last = saves
    assert all(torch.equal(first["params"][k], last["params"][k]) for k in first["params"])
    assert first["adam_step"] == last["adam_step"] == 1.0
    assert all(bool(torch.isfinite(v).all()) for v in last["params"].values())
    assert summary["stages"][0]["iterations"] == 3


def test_nan_losses_in_a_row_stop_with_the_last_good_checkpoint_intact(fixture_root, tmp_path,
                                                                        monkeypatch):
    config = source_only_config(fixture_root, 6)
    config["runtime"]["max_nonfinite_steps"] = 3
    train.run_pipeline(config, tmp_path / "straight")

    poison_source_ce(monkeypatch, 3)
    out = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(NonFiniteLossError) as info:
            train.run_pipeline(config, out)
    checkpoint = out / "source_only" / "last.pt"
    message = str(info.value)
    assert "stage source_only: the loss was non-finite in 3 consecutive iterations (3 to 5; " \
           "last: source_ce = nan)" in message
    assert f"{checkpoint} (iteration 2) is the last good checkpoint, left as it was" in message
    state = load_checkpoint(checkpoint)
    assert state["iteration"] == 2 and not state["complete"]
    assert not (out / "source_only" / "result.json").exists()

    monkeypatch.undo()  # the cause is gone: the rerun resumes at iteration 2
    train.run_pipeline(config, out)
    expected = load_checkpoint(tmp_path / "straight" / "source_only" / "last.pt")["model"]
    actual = load_checkpoint(checkpoint)["model"]
    assert all(torch.equal(expected[k], actual[k]) for k in expected)


def test_a_nan_discriminator_loss_skips_both_warmup_updates(fixture_root, tmp_path, monkeypatch):
    from fastst.methods import warmup

    real, calls = warmup.discriminator_loss, [0]

    def discriminator_loss(*args):
        calls[0] += 1
        return real(*args) * (float("nan") if calls[0] == 2 else 1.0)

    monkeypatch.setattr(warmup, "discriminator_loss", discriminator_loss)
    saves = {}
    real_save = trainer.save_checkpoint

    def save_checkpoint(path, state):
        if state["stage"] == "warmup":
            saves[state["iteration"]] = {key: copy_state(state[key]) for key in
                                         ("model", "discriminator", "optimizers")}
        return real_save(path, state)

    monkeypatch.setattr(trainer, "save_checkpoint", save_checkpoint)
    config = load_config("iast_gta5", tiny_overrides(fixture_root, **{
        "pipeline": "[source_only, warmup]", "stages.source_only.iterations": 1,
        "runtime.tensorboard": "false"}))
    with pytest.warns(RuntimeWarning, match="stage warmup, iteration 2: discriminator = nan"):
        train.run_pipeline(config, tmp_path / "run")
    before, after = saves[1], saves[2]
    names = {n for n, _ in deeplabv2(num_classes=19, backbone="resnet18_w16").named_parameters()}
    assert all(torch.equal(before["model"][k], after["model"][k]) for k in names)
    assert all(torch.equal(before["discriminator"][k], after["discriminator"][k])
               for k in before["discriminator"])
    for optimizer in after["optimizers"]:
        assert {float(s["step"]) for s in optimizer["state"].values()} == {1.0}


def copy_state(value):
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {k: copy_state(v) for k, v in value.items()}
    if isinstance(value, list):
        return [copy_state(v) for v in value]
    return value


def test_a_nan_batch_that_poisons_batchnorm_stops_at_once(fixture_root, tmp_path, monkeypatch):
    real, calls = RunContext.images_to_device, [0]

    def images_to_device(self, images):
        calls[0] += 1
        return real(self, images) * (float("nan") if calls[0] == 2 else 1.0)

    monkeypatch.setattr(RunContext, "images_to_device", images_to_device)
    with pytest.raises(NonFiniteLossError, match="iteration 2: source_ce = nan, and the forward "
                                                 "pass made the model's BatchNorm running "
                                                 "statistics non-finite"):
        train.run_pipeline(source_only_config(fixture_root, 4), tmp_path / "run")
    assert load_checkpoint(tmp_path / "run" / "source_only" / "last.pt")["iteration"] == 1


def test_check_finite_names_the_bad_losses():
    faults.check_finite({"a": torch.tensor(1.0), "b": torch.tensor([2.0], dtype=torch.bfloat16)})
    with pytest.raises(faults.NonFiniteLoss) as info:
        faults.check_finite({"a": torch.tensor(1.0), "b": torch.tensor(float("inf")),
                             "c": torch.tensor(float("nan"), dtype=torch.float16)})
    assert set(info.value.losses) == {"b", "c"} and info.value.losses["b"] == float("inf")


# --- data checked before training --------------------------------------------------------------

def test_damaged_data_stops_the_run_before_training(tmp_path, capsys):
    make_fixtures(tmp_path)
    image = tmp_path / "cityscapes/leftImg8bit/train/aachen/aachen_000000_000003_leftImg8bit.png"
    image.write_bytes(image.read_bytes()[:len(image.read_bytes()) * 2 // 3])
    (tmp_path / "GTA5" / "images" / "00004.png").unlink()
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as info:
        train.main(["--preset", "iast_gta5", "--out", str(out)]
                   + tiny_overrides(tmp_path, pipeline="[source_only]"))
    assert info.value.code == 2
    message = capsys.readouterr().err
    assert "the source data (data.source: gta5 at " in message
    assert "stopped before training" in message
    assert "labels without an image: 1" in message and "labels/00004.png" in message
    assert not (out / "source_only").exists() and not (out / "data_check.json").exists()

    (tmp_path / "GTA5" / "labels" / "00004.png").unlink()
    with pytest.raises(DataCheckFailed) as failed:
        train.run_pipeline(load_config("iast_gta5", tiny_overrides(tmp_path)), tmp_path / "run2")
    assert "the target data (data.target: cityscapes at " in str(failed.value)
    assert "unreadable files: 1" in str(failed.value) and str(image) in str(failed.value)
    assert not (tmp_path / "run2" / "source_only").exists()


def test_a_missing_fixture_root_is_named_with_the_expected_layout(tmp_path):
    make_fixtures(tmp_path)
    config = load_config("iast_gta5", tiny_overrides(tmp_path, **{
        "data.source.root": tmp_path / "GTA"}))
    with pytest.raises(DataCheckFailed) as info:
        faults.check_run_data(config, tmp_path / "run")
    message = str(info.value)
    assert f"root {tmp_path / 'GTA'} does not exist: expected {tmp_path / 'GTA'}/images/*.png" \
        in message and "to try fastst without data use --preset demo" in message
    config["data"]["source"].update(root=str(tmp_path / "GTA5"), split="val")
    with pytest.raises(DataCheckFailed, match=r"data.source: unknown GTA5 split 'val'; valid "
                                              r"splits: train, all"):
        faults.check_run_data(config, tmp_path / "run")


def test_a_passed_check_is_remembered_until_the_files_change(tmp_path, monkeypatch):
    make_fixtures(tmp_path)
    # The target's labels are never used: a broken one is no reason to stop.
    label = tmp_path / "cityscapes/gtFine/train/aachen/aachen_000000_000001_gtFine_labelIds.png"
    label.write_bytes(b"not a png")
    config = load_config("iast_gta5", tiny_overrides(tmp_path))
    first = faults.check_run_data(config, tmp_path / "run")
    assert [(r["dataset"], r["split"], r["labels"], r["cached"]) for r in first] == [
        ("gta5", "train", True, False), ("cityscapes", "train", False, False),
        ("cityscapes", "val", True, False)]
    assert [r["num_images"] for r in first] == [6, 6, 2]

    from fastst.data import check

    real, checked = check.check_dataset, []
    monkeypatch.setattr(check, "check_dataset",
                        lambda *args, **kw: checked.append(args[0]) or real(*args, **kw))
    again = faults.check_run_data(config, tmp_path / "run")
    assert [r["cached"] for r in again] == [True, True, True] and checked == []
    image = tmp_path / "GTA5" / "images" / "00002.png"
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))
    third = faults.check_run_data(config, tmp_path / "run")
    assert [r["cached"] for r in third] == [False, True, True] and checked == ["gta5"]


def test_runtime_check_data_false_skips_the_check(fixture_root, tmp_path, monkeypatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError("the data check ran although runtime.check_data is false")

    monkeypatch.setattr(train, "check_run_data", must_not_run)
    config = source_only_config(fixture_root, 1)
    config["runtime"]["check_data"] = False
    assert train.run_pipeline(config, tmp_path / "run")["stages"][0]["name"] == "source_only"


# --- full disk ---------------------------------------------------------------------------------

def test_a_full_disk_is_reported_and_a_rerun_resumes(fixture_root, tmp_path, monkeypatch, capsys):
    overrides = tiny_overrides(fixture_root, iterations=3, pipeline="[source_only]", **{
        "runtime.tensorboard": "false"})
    straight = tmp_path / "straight"
    assert train.main(["--preset", "iast_gta5", "--out", str(straight)] + overrides) == 0

    real, calls = torch.save, [0]

    def save_on_a_full_disk(obj, f, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 2:
            f.write(b"PK\x03\x04 as much as fitted")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_on_a_full_disk)
    out = tmp_path / "run"
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        train.main(["--preset", "iast_gta5", "--out", str(out)] + overrides)
    assert info.value.code == 2
    checkpoint = out / "source_only" / "last.pt"
    assert capsys.readouterr().err.endswith(
        f"error: disk full while writing {checkpoint}; free space and rerun the same command "
        "to resume\n")
    assert temp_files(out) == []
    assert load_checkpoint(checkpoint)["iteration"] == 1  # the previous checkpoint, whole

    monkeypatch.undo()
    assert train.main(["--preset", "iast_gta5", "--out", str(out)] + overrides) == 0
    expected = load_checkpoint(straight / "source_only" / "last.pt")["model"]
    actual = load_checkpoint(checkpoint)["model"]
    assert all(torch.equal(expected[k], actual[k]) for k in expected)


def test_disk_full_is_found_in_an_exception_chain():
    quota = OSError(errno.EDQUOT, "Disk quota exceeded", "/runs/x/last.pt")
    try:
        try:
            raise quota
        except OSError as error:
            raise RuntimeError("writer failed") from error
    except RuntimeError as wrapped:
        assert faults.disk_full(wrapped) is quota
    assert faults.disk_full(OSError(errno.EACCES, "Permission denied")) is None
    assert faults.disk_full_message(quota) == ("disk quota exceeded while writing /runs/x/last.pt;"
                                               " free space and rerun the same command to resume")
    assert "while writing /runs/x;" in faults.disk_full_message(
        OSError(errno.ENOSPC, "No space left on device"), "/runs/x")


# --- bad input ---------------------------------------------------------------------------------

def save_model(path, num_classes, plain=False):
    model = deeplabv2(num_classes=num_classes, backbone="resnet18_w16")
    state = model.state_dict() if plain else {"format": "fastst-checkpoint-v1",
                                              "model": model.state_dict(),
                                              "model_config": model.model_config}
    torch.save(state, path)
    return path


@pytest.mark.parametrize("plain", [False, True])
def test_init_checkpoint_of_another_class_count(fixture_root, tmp_path, capsys, plain):
    init = save_model(tmp_path / "seven.pt", 7, plain)
    with pytest.raises(SystemExit) as info:
        train.main(["--preset", "iast_gta5", "--out", str(tmp_path / "run"), "--stages", "round1",
                    "--init", str(init)] + tiny_overrides(fixture_root))
    assert info.value.code == 2
    assert (f"error: --init {init} holds a model for 7 classes, but the configuration has "
            "num_classes = 19") in capsys.readouterr().err


def test_stage_checkpoint_of_another_class_count(fixture_root, tmp_path):
    out = tmp_path / "run"
    (out / "source_only").mkdir(parents=True)
    previous = save_model(out / "source_only" / "last.pt", 5)
    config = load_config("iast_gta5", tiny_overrides(fixture_root, **{"runtime.tensorboard": "false"}))
    with pytest.raises(ClassCountMismatch, match=f"checkpoint of source_only {previous} holds a "
                                                 "model for 5 classes, but the configuration has "
                                                 "num_classes = 19"):
        train.run_pipeline(config, out, stages=["warmup"])


@pytest.mark.parametrize("preset, override, message", [
    ("iast_gta5", "stages.round1.alpha=abc", "stages.round1.alpha must be a number, got 'abc'"),
    ("iast_gta5", "stages.round1.alpha=0",
     "stages.round1.alpha must be a finite number > 0 and <= 1, got 0.0"),
    ("iast_gta5", "stages.round1.alpha=-0.2",
     "stages.round1.alpha must be a finite number > 0 and <= 1, got -0.2"),
    ("iast_gta5", "stages.round1.alpha=.nan",
     "stages.round1.alpha must be a finite number > 0 and <= 1, got nan"),
    ("iast_gta5", "pseudo.beta=1.5", "pseudo.beta must be a finite number >= 0 and <= 1, got 1.5"),
    ("iast_gta5", "pseudo.gamma=-1", "pseudo.gamma must be a finite number >= 0, got -1.0"),
    ("iast_gta5", "stages.round1.lr=0", "stages.round1.lr must be a finite number > 0, got 0.0"),
    ("cbst_gta5", "stages.round1.portion=1.5",
     "stages.round1.portion must be a finite number >= 0 and <= 1, got 1.5"),
    ("tpld_gta5", "stages.phase1_1.vote_window=6",
     "stages.phase1_1.vote_window must be an odd integer (the window is centred on the pixel), "
     "got 6"),
    ("tpld_gta5", "stages.phase2_1.easy_portion=1",
     "stages.phase2_1.easy_portion must be in (0, 1) (some images must be hard), got 1.0"),
    ("iast_gta5", "seeds=two", "seeds must be a number, got 'two'"),
    ("iast_gta5", "seeds=1.5", "seeds must be an integer >= 1, got 1.5"),
    ("iast_gta5", "runtime.progress=maybe", "runtime.progress must be true or false, got 'maybe'"),
    ("iast_gta5", "data.crop_size=512", "data.crop_size must be a list like [512, 1024], got 512"),
    ("iast_gta5", "stages.round1.pseudo_size=[640]",
     "stages.round1.pseudo_size must be [height, width], two positive integers, got [640]"),
    ("iast_gta5", "num_classes=255",
     "num_classes must be at most 254 (labels are uint8 with 255 = ignore), got 255"),
    ("cbst_gta5", "stages.round1.alpha=0.2", "unknown key 'stages.round1.alpha' (did you mean "
     "stages.round1.lrent_alpha"),
])
def test_bad_values_give_their_message(preset, override, message):
    with pytest.raises(ConfigError) as info:
        load_config(preset, [override])
    assert message in str(info.value)


def test_unknown_names_list_the_valid_ones(capsys):
    with pytest.raises(ConfigError) as info:
        load_config("iast_gta")
    assert str(info.value) == ("unknown preset 'iast_gta'; available presets: "
                               + ", ".join(available_presets()))
    with pytest.raises(ConfigError) as info:
        load_config("cbst_gta5", ["stages.round1.alpha=0.2"])
    message = str(info.value)
    assert "stages.round1.lrent_alpha" in message and "--print-config" in message
    assert "stages.round1.source_portion" not in message  # not every key: the close ones
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--preset", "demo", "stages.warmup.lambda_adv=strong"])
    assert exit_info.value.code == 2
    assert "stages.warmup.lambda_adv must be a number, got 'strong'" in capsys.readouterr().err
