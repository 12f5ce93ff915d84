"""The training pipeline (fastst.train, fastst.methods) on tiny fixtures in the GTA5 and
Cityscapes layouts: every stage runs, outputs are written, kill-and-resume equals an
uninterrupted run, bad presets/keys/stages are rejected, the schedule and the LS-GAN labels."""
import json
import math
import statistics

import numpy as np
import pytest
import torch
from PIL import Image

from fastst import train
from fastst.checkpoint import load_checkpoint
from fastst.config import load_config, read_config_file
from fastst.methods.context import StopRequested
from fastst.methods.schedule import CosineSchedule, cosine_lr
from fastst.methods.streams import BatchStream
from fastst.methods.warmup import adversarial_loss, discriminator_loss
from fastst.models import deeplabv2

H, W = 32, 64
# Cityscapes label ids of road, sidewalk, building, vegetation, sky, car (train ids 0 2 8 10 13 ...).
LABEL_IDS = (7, 8, 11, 21, 23, 26)
COLOURS = np.array([(128, 64, 128), (244, 35, 232), (70, 70, 70), (107, 142, 35),
                    (70, 130, 180), (0, 0, 142)], dtype=np.int16)


def _scene(rng, shift):
    """A label map of horizontal bands plus a box, and an image that colours it (+ noise)."""
    index = np.zeros((H, W), dtype=np.int64)
    cuts = np.sort(rng.integers(4, H - 4, size=3))
    for k, cut in enumerate(cuts):
        index[cut:] = [4, 2, 0, 1][k + 1]
    index[:cuts[0]] = 4
    top, left = rng.integers(8, H - 10), rng.integers(0, W - 16)
    index[top:top + 8, left:left + 16] = 5
    image = COLOURS[index] + shift + rng.integers(-12, 13, size=(H, W, 3))
    return np.clip(image, 0, 255).astype(np.uint8), np.array(LABEL_IDS, dtype=np.uint8)[index]


def make_fixtures(root, n_source=6, n_target=6, n_val=2):
    """GTA5 (images/, labels/) and Cityscapes (leftImg8bit/, gtFine/ train + val) trees of
    32x64 scenes; the target is the source with a colour shift."""
    rng = np.random.default_rng(0)
    gta, cityscapes = root / "GTA5", root / "cityscapes"
    for folder in ("images", "labels"):
        (gta / folder).mkdir(parents=True)
    for i in range(n_source):
        image, label = _scene(rng, 0)
        Image.fromarray(image).save(gta / "images" / f"{i:05d}.png")
        Image.fromarray(label).save(gta / "labels" / f"{i:05d}.png")
    for split, count in (("train", n_target), ("val", n_val)):
        images = cityscapes / "leftImg8bit" / split / "aachen"
        labels = cityscapes / "gtFine" / split / "aachen"
        images.mkdir(parents=True)
        labels.mkdir(parents=True)
        for i in range(count):
            image, label = _scene(rng, -40)
            stem = f"aachen_000000_{i:06d}"
            Image.fromarray(image).save(images / f"{stem}_leftImg8bit.png")
            Image.fromarray(label).save(labels / f"{stem}_gtFine_labelIds.png")
    return gta, cityscapes


IAST_STAGES = ("source_only", "warmup", "round1", "round2", "round3")


def tiny_overrides(root, iterations=2, stages=IAST_STAGES, **extra):
    """A preset (iast_gta5 by default: its ``stages``) shrunk to the fixtures: 2 iterations a
    stage, batch 2, 32x64 crops, 16x32 pseudo labels."""
    gta, cityscapes = root / "GTA5", root / "cityscapes"
    overrides = {
        "model.backbone": "resnet18_w16", "model.pretrained": "null",
        "data.source.root": gta, "data.target.root": cityscapes, "data.val.root": cityscapes,
        "data.source.list_file": "null",
        "data.source.crop_height_range": "[24, 32]", "data.target.crop_height_range": "[24, 32]",
        "data.crop_size": "[32, 64]", "data.val.input_size": "null",
        "runtime.workers": 0, "runtime.progress": "false", "runtime.checkpoint_every": 1,
        "runtime.log_every": 1, "runtime.image_every": 2, "runtime.write_threads": 2,
        "pseudo.batch_size": 2, "eval.batch_size": 2,
        # One thread: tiny convolutions gain nothing from two, and lose a lot on a busy machine.
        "runtime.threads": 1,
    }
    for stage in stages:
        overrides[f"stages.{stage}.iterations"] = iterations
        overrides[f"stages.{stage}.batch_size"] = 2
        if stage not in ("source_only", "warmup"):
            overrides[f"stages.{stage}.pseudo_size"] = "[16, 32]"
    overrides.update(extra)
    return [f"{key}={value}" for key, value in overrides.items()]


@pytest.fixture(autouse=True)
def restore_threads():
    """runtime.threads sets torch's process-wide thread count; give the next test its own."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def fixture_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_fixtures(root)
    return root


def test_every_stage_runs_and_writes_its_outputs(fixture_root, tmp_path):
    config = load_config("iast_gta5", tiny_overrides(fixture_root))
    out = tmp_path / "run"
    summary = train.run_pipeline(config, out)

    assert [s["name"] for s in summary["stages"]] == config["pipeline"]
    for stage in summary["stages"]:
        assert 0.0 <= stage["target_miou"] <= 1.0 and stage["seconds"] > 0
        assert stage["iterations"] == 2
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["stages"] == json.loads(json.dumps(summary["stages"]))
    assert read_config_file(out / "config.yaml") == config

    for name in config["pipeline"]:
        state = load_checkpoint(out / name / "last.pt")
        assert state["complete"] and state["iteration"] == 2 and state["stage"] == name
        assert state["model_config"] == {"num_classes": 19, "backbone": "resnet18_w16"}
        assert set(state["rng"]) >= {"torch", "numpy", "python"}
    warmup = load_checkpoint(out / "warmup" / "last.pt")
    assert "discriminator" in warmup and len(warmup["optimizers"]) == 2
    for name in ("round1", "round2", "round3"):
        manifest = json.loads((out / name / "pseudo" / "manifest.json").read_text())
        assert manifest["complete"] and len(manifest["images"]) == 6
        assert manifest["settings"]["size"] == [16, 32] and len(manifest["theta"]) == 19
        labels = sorted((out / name / "pseudo" / "labels").glob("*_pseudo_label.png"))
        assert len(labels) == 6 and Image.open(labels[0]).size == (32, 16)
        state = load_checkpoint(out / name / "last.pt")
        assert state["theta"].dtype == torch.float64
        assert state["theta"].tolist() == pytest.approx(manifest["theta"])
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert "source_only" in train.format_table(summary)

    # A rerun finds every stage finished and recomputes nothing.
    before = (out / "round3" / "last.pt").stat().st_mtime_ns
    again = train.run_pipeline(config, out)
    assert (out / "round3" / "last.pt").stat().st_mtime_ns == before
    assert [s["target_miou"] for s in again["stages"]] == [s["target_miou"] for s in summary["stages"]]


def _weights(path):
    state = load_checkpoint(path)
    return state["model"], state


def test_kill_and_resume_equals_an_uninterrupted_run(fixture_root, tmp_path):
    common = tiny_overrides(fixture_root, iterations=4, **{
        "pipeline": "[source_only, warmup]", "runtime.checkpoint_every": 2,
        "runtime.tensorboard": "false", "stages.source_only.iterations": 2})
    straight = load_config("iast_gta5", common)
    train.run_pipeline(straight, tmp_path / "straight")

    # The 5th iteration of the process is warm-up's 3rd: its last checkpoint is at 2.
    killed = load_config("iast_gta5", common + ["runtime.stop_after_iterations=5"])
    with pytest.raises(StopRequested):
        train.run_pipeline(killed, tmp_path / "resumed")
    partial = load_checkpoint(tmp_path / "resumed" / "warmup" / "last.pt")
    assert partial["iteration"] == 2 and not partial["complete"]
    train.run_pipeline(straight, tmp_path / "resumed")

    expected, expected_state = _weights(tmp_path / "straight" / "warmup" / "last.pt")
    actual, actual_state = _weights(tmp_path / "resumed" / "warmup" / "last.pt")
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key
    for key in expected_state["discriminator"]:
        assert torch.equal(expected_state["discriminator"][key],
                           actual_state["discriminator"][key]), key
    assert expected_state["optimizers"][0]["state"][0]["step"] == \
        actual_state["optimizers"][0]["state"][0]["step"]


def test_a_resumed_round_continues_from_its_checkpoint(fixture_root, tmp_path):
    common = tiny_overrides(fixture_root, iterations=3, **{
        "pipeline": "[source_only, round1]", "runtime.checkpoint_every": 2,
        "runtime.tensorboard": "false", "stages.source_only.iterations": 1})
    straight = load_config("iast_gta5", common)
    train.run_pipeline(straight, tmp_path / "straight")
    killed = load_config("iast_gta5", common + ["runtime.stop_after_iterations=4"])
    with pytest.raises(StopRequested):
        train.run_pipeline(killed, tmp_path / "resumed")
    train.run_pipeline(straight, tmp_path / "resumed")
    expected, _ = _weights(tmp_path / "straight" / "round1" / "last.pt")
    actual, _ = _weights(tmp_path / "resumed" / "round1" / "last.pt")
    assert all(torch.equal(expected[k], actual[k]) for k in expected)


def test_stages_subset_and_init(fixture_root, tmp_path):
    config = load_config("iast_gta5", tiny_overrides(fixture_root, **{
        "runtime.tensorboard": "false"}))
    with pytest.raises(FileNotFoundError, match="run source_only first or pass --init"):
        train.run_pipeline(config, tmp_path / "a", stages=["warmup"])
    model = deeplabv2(num_classes=19, backbone="resnet18_w16")
    init = tmp_path / "init.pt"
    torch.save({"format": "fastst-checkpoint-v1", "model": model.state_dict(),
                "model_config": model.model_config}, init)
    summary = train.run_pipeline(config, tmp_path / "a", stages=["round1"], init=str(init))
    assert [s["name"] for s in summary["stages"]] == ["round1"]
    wrong = deeplabv2(num_classes=19, backbone="resnet18")
    torch.save({"format": "fastst-checkpoint-v1", "model": wrong.state_dict(),
                "model_config": wrong.model_config}, tmp_path / "wrong.pt")
    with pytest.raises(ValueError, match="resnet18"):
        train.run_pipeline(config, tmp_path / "b", stages=["round1"],
                           init=str(tmp_path / "wrong.pt"))


def test_seeds_run_one_directory_each_and_report_mean_and_std(fixture_root, tmp_path):
    config = load_config("iast_gta5", tiny_overrides(fixture_root, seeds=2, **{
        "runtime.tensorboard": "false"}))
    summary = train.run_pipeline(config, tmp_path / "run", stages=["source_only"])
    assert summary["seeds"] == [config["seed"], config["seed"] + 1]
    per_seed = []
    for seed in summary["seeds"]:
        assert (tmp_path / "run" / f"seed{seed}" / "source_only" / "last.pt").is_file()
        per_seed.append(json.loads((tmp_path / "run" / f"seed{seed}" / "source_only" / "result.json")
                                   .read_text())["target_miou"])
    (stage,) = summary["stages"]
    assert stage["target_miou_per_seed"] == pytest.approx(per_seed)
    assert stage["target_miou"] == pytest.approx(statistics.fmean(per_seed))
    assert stage["target_miou_std"] == pytest.approx(statistics.stdev(per_seed))
    assert json.loads((tmp_path / "run" / "summary.json").read_text()) == summary
    assert "mean ± std over seeds" in train.format_table(summary)


def test_cli_rejects_bad_presets_keys_and_stages(capsys, tmp_path):
    with pytest.raises(SystemExit) as info:
        train.main(["--preset", "nope"])
    assert info.value.code == 2
    message = capsys.readouterr().err
    assert "unknown preset 'nope'" in message and "iast_gta5" in message and "demo" in message

    with pytest.raises(SystemExit):
        train.main(["--preset", "demo", "stages.round1.alhpa=0.3"])
    message = capsys.readouterr().err
    assert "did you mean stages.round1.alpha" in message and "--print-config" in message

    with pytest.raises(SystemExit):
        train.main(["--preset", "demo", "--stages", "warmup,round9"])
    message = capsys.readouterr().err
    assert "round9" in message and "valid stages: source_only, warmup, round1" in message


def test_a_run_directory_refuses_another_recipe(fixture_root, tmp_path):
    config = load_config("iast_gta5", tiny_overrides(fixture_root))
    (tmp_path / "run").mkdir()
    from fastst.config import ConfigError, dump_config

    dump_config(load_config("iast_gta5", tiny_overrides(fixture_root, **{
        "stages.round1.alpha": 0.3})), tmp_path / "run" / "config.yaml")
    # The configuration binds once a stage has trained (before that a rerun may change it).
    (tmp_path / "run" / "source_only").mkdir()
    (tmp_path / "run" / "source_only" / "last.pt").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"stages.round1.alpha: 0.3 -> 0.2"):
        train.run_pipeline(config, tmp_path / "run")


def test_cosine_schedule_values():
    # Released IAST: CosineAnnealingLR_with_Restart (code/sseg/models/losses/
    # cos_annealing_with_restart.py:41-45) with eta_min = cfg.TRAIN.LR * 0.001 for the model's
    # and every discriminator's scheduler (code/sseg/workflow/sl_trainer.py:206-219), over
    # build_optimizer's groups backbone 0.1 * LR, decoder and predictor LR (trainer.py:334-338).
    lr, period = 3e-5, 9351.0
    floor = 0.001 * lr
    assert cosine_lr(0, lr, period, floor) == lr
    assert cosine_lr(int(period), lr, period, floor) == pytest.approx(floor, rel=1e-12)
    assert cosine_lr(2 * 3117, lr, period, floor) == \
        pytest.approx(floor + (lr - floor) / 4, rel=1e-12)
    assert cosine_lr(period / 2, lr, period, floor) == pytest.approx((lr + floor) / 2, rel=1e-12)
    assert cosine_lr(2 * period, lr, period, floor) == pytest.approx(floor)

    model = deeplabv2(num_classes=3, backbone="resnet18_w16")
    optimizer = torch.optim.Adam(model.param_groups(0.1 * lr, lr))
    discriminator = torch.optim.Adam(torch.nn.Linear(2, 1).parameters(), lr=2e-5)
    schedule = CosineSchedule([optimizer, discriminator], period, floor)
    for iteration in (0, 100, 6234):
        schedule.step(iteration)
        backbone, head = (g["lr"] for g in optimizer.param_groups)
        c = (1 + math.cos(math.pi * iteration / period)) / 2
        # One floor for every group: the backbone's rate is not 0.1 x the head's after i = 0.
        assert backbone == pytest.approx(floor + (0.1 * lr - floor) * c, rel=1e-12)
        assert head == pytest.approx(floor + (lr - floor) * c, rel=1e-12)
        assert discriminator.param_groups[0]["lr"] == pytest.approx(floor + (2e-5 - floor) * c,
                                                                    rel=1e-12)
    assert optimizer.param_groups[0]["lr"] != pytest.approx(0.1 * optimizer.param_groups[1]["lr"])
    constant = CosineSchedule([optimizer], period, None)
    constant.step(5000)
    assert [g["lr"] for g in optimizer.param_groups] == [0.1 * lr, lr]


class _ConstantD(torch.nn.Module):
    """A 'discriminator' answering the mean of its input map, to check the LS-GAN labels."""

    def forward(self, x):
        return x.mean(dim=(1, 2, 3), keepdim=True)


def test_ls_gan_labels_source_zero_target_one():
    zeros, ones = torch.zeros(2, 3, 4, 4), torch.ones(2, 3, 4, 4)
    d = _ConstantD()
    # D outputs 0 on source and 1 on target: perfect, loss 0; swapped: (1 + 1) / 2 = 1.
    assert discriminator_loss(d, zeros, ones).item() == 0.0
    assert discriminator_loss(d, ones, zeros).item() == 1.0
    assert discriminator_loss(d, zeros, 0.5 * ones).item() == pytest.approx(0.125)
    # The segmenter wants its target maps taken for source (label 0).
    assert adversarial_loss(d, zeros).item() == 0.0
    assert adversarial_loss(d, 0.5 * ones).item() == pytest.approx(0.25)
    probs = (0.5 * ones).requires_grad_()
    adversarial_loss(d, probs).backward()
    assert bool((probs.grad > 0).all()), "descending the loss moves D(target) towards 0"


def test_batch_stream_resumes_at_any_batch(fixture_root):
    from fastst.data import build_dataset

    dataset = build_dataset("gta5", fixture_root / "GTA5", "train")
    stream = BatchStream(dataset, 4, seed=7)
    assert stream.batches_per_epoch == 1
    names = [batch["name"] for batch in stream.batches(0, 3)]
    assert [batch["name"] for batch in stream.batches(2, 3)] == names[2:]
    assert names[0] != names[1], "each epoch has its own order"
    with pytest.raises(ValueError, match="fewer than one batch"):
        BatchStream(dataset, 7, seed=0)


def test_demo_backbone_is_a_quarter_width_output_stride_8_resnet18():
    model = deeplabv2(num_classes=19, backbone="resnet18_w16")
    assert model.backbone.out_channels == 128
    assert model.backbone.layer1[0].conv1.out_channels == 16
    assert sum(p.numel() for p in model.parameters()) < 0.07 * sum(
        p.numel() for p in deeplabv2(num_classes=19, backbone="resnet18").parameters())
    with torch.no_grad():
        assert model.eval()(torch.zeros(1, 3, 96, 192)).shape == (1, 19, 12, 24)
