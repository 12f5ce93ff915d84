"""The IAS pseudo-label pass (fastst.methods.labelling.ias) and its command line (fastst.pseudo):
seeded order, labels and thresholds equal to the op applied batch by batch, the manifest,
resumption in the middle of the pass, and the CLI."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from fastst import pseudo
from fastst.config import load_config
from fastst.data import build_dataset
from fastst.data.pseudo_label import pseudo_label_path
from fastst.methods.context import RunContext, StopRequested
from fastst.methods.labelling import ias_pass
from fastst.models import deeplabv2
from fastst.ops import ias_pseudo_label

H, W = 32, 64
NUM_IMAGES = 8
SIZE = (16, 32)


def make_cityscapes(root):
    """8 train images of 32x64 in the Cityscapes layout (labels present but unused)."""
    rng = np.random.default_rng(3)
    images = root / "leftImg8bit" / "train" / "bonn"
    labels = root / "gtFine" / "train" / "bonn"
    images.mkdir(parents=True)
    labels.mkdir(parents=True)
    for i in range(NUM_IMAGES):
        stem = f"bonn_000000_{i:06d}"
        gradient = np.linspace(0, 255, W, dtype=np.float64)[None, :, None]
        image = np.clip(gradient * rng.uniform(0.3, 1.0, size=3) + rng.normal(0, 30, (H, W, 3)),
                        0, 255).astype(np.uint8)
        Image.fromarray(image).save(images / f"{stem}_leftImg8bit.png")
        Image.fromarray(np.full((H, W), 7, dtype=np.uint8)).save(labels / f"{stem}_gtFine_labelIds.png")
    return root


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    return make_cityscapes(tmp_path_factory.mktemp("cityscapes"))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    net = deeplabv2(num_classes=19, backbone="resnet18_w16")
    # Sharper, more varied logits than a fresh head gives, so that thresholds move.
    with torch.no_grad():
        for conv in net.classifier.convs:
            conv.weight.mul_(30)
    return net.eval()


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def context(tmp_path, **runtime):
    config = load_config("demo", ["runtime.progress=false", "runtime.workers=0",
                                  "runtime.write_threads=2"]
                         + [f"runtime.{k}={v}" for k, v in runtime.items()])
    return RunContext(config=config, run_dir=tmp_path, seed=0, device=torch.device("cpu"))


def run_pass(model, dataset, out, ctx, **kwargs):
    options = dict(alpha=0.2, size=SIZE, mode="official", group=2, batch_size=2)
    options.update(kwargs)
    return ias_pass(model, dataset, out, ctx, **options)


def read_labels(out, names):
    return np.stack([np.array(Image.open(pseudo_label_path(out / "labels", n))) for n in names])


class RecordsMode(torch.nn.Module):
    """``net`` itself, recording at every forward whether it and its BatchNorm layers were in
    training mode."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.model_config = net.model_config
        self.modes = []

    def forward(self, x):
        batch_norms = [m for m in self.net.modules()
                       if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        self.modes.append((self.training, any(m.training for m in batch_norms)))
        return self.net(x)


def test_pass_equals_the_op_in_seeded_order_and_writes_a_manifest(model, target, tmp_path):
    dataset = build_dataset("cityscapes", target, "train", labels=False)
    # Handed over in train mode: the pass labels in eval mode (Raykoooo/IAST
    # code/sseg/workflow/sl_trainer.py:128, net_pseudo.eval()) and gives the model back in the
    # mode it came in.
    recorder = RecordsMode(model).train()
    running_mean = model.backbone.bn1.running_mean.clone()
    try:
        manifest = run_pass(recorder, dataset, tmp_path / "out", context(tmp_path))
        assert recorder.training and model.training, "the caller's train mode must be restored"
    finally:
        model.eval()
    assert recorder.modes == [(False, False)] * (NUM_IMAGES // 2), "the pass must run in eval mode"
    assert torch.equal(model.backbone.bn1.running_mean, running_mean)

    order = torch.randperm(NUM_IMAGES, generator=torch.Generator().manual_seed(0))
    names = [dataset[int(i)]["name"] for i in order]
    assert [image["name"] for image in manifest["images"]] == names
    theta = None
    expected_labels, expected_thetas = [], []
    with torch.no_grad():
        for start in range(0, NUM_IMAGES, 2):
            images = torch.stack([dataset[int(i)]["image"] for i in order[start:start + 2]])
            labels, theta, per_instance = ias_pseudo_label(
                model(images), theta, alpha=0.2, mode="official", from_logits=True, size=SIZE,
                group=2)
            expected_labels.append(labels.numpy())
            expected_thetas += [per_instance[0].tolist()] * 2
    expected_labels = np.concatenate(expected_labels)
    np.testing.assert_array_equal(read_labels(tmp_path / "out", names), expected_labels)
    assert manifest["theta"] == theta.tolist()
    assert [image["theta"] for image in manifest["images"]] == expected_thetas
    assert manifest["theta"] != [0.9] * 19, "the fixture must move the thresholds"
    counts = np.bincount(expected_labels.ravel(), minlength=256)
    total = expected_labels.size
    assert manifest["density"] == pytest.approx([counts[c] / total for c in range(19)])
    assert manifest["labelled_fraction"] == pytest.approx(1 - counts[255] / total)
    assert 0 < manifest["labelled_fraction"] < 1
    assert manifest["settings"]["size"] == list(SIZE) and manifest["complete"]
    assert json.loads((tmp_path / "out" / "manifest.json").read_text()) == manifest
    assert not (tmp_path / "out" / "state.pt").exists()


def test_kill_in_the_middle_of_the_pass_then_resume(model, target, tmp_path):
    dataset = build_dataset("cityscapes", target, "train", labels=False)
    straight = run_pass(model, dataset, tmp_path / "straight", context(tmp_path))

    # State saved every 2 batches; the stop after batch 3 loses batch 3, redone on resume.
    killed = context(tmp_path, pseudo_state_every=2, stop_after_pseudo_batches=3)
    with pytest.raises(StopRequested):
        run_pass(model, dataset, tmp_path / "resumed", killed)
    state = torch.load(tmp_path / "resumed" / "state.pt", weights_only=True)
    assert state["done"] == 4 and len(state["names"]) == 4
    assert not (tmp_path / "resumed" / "manifest.json").exists()
    resumed = run_pass(model, dataset, tmp_path / "resumed", context(tmp_path))

    names = [image["name"] for image in straight["images"]]
    np.testing.assert_array_equal(read_labels(tmp_path / "resumed", names),
                                  read_labels(tmp_path / "straight", names))
    for key in ("theta", "density", "images", "labelled_fraction", "settings"):
        assert resumed[key] == straight[key], key


def test_finished_pass_is_reused_and_other_settings_redo_it(model, target, tmp_path):
    dataset = build_dataset("cityscapes", target, "train", labels=False)
    ctx = context(tmp_path)
    first = run_pass(model, dataset, tmp_path / "out", ctx)
    manifest_path = tmp_path / "out" / "manifest.json"
    stamp = manifest_path.stat().st_mtime_ns
    assert run_pass(model, dataset, tmp_path / "out", ctx) == first
    assert manifest_path.stat().st_mtime_ns == stamp
    paper = run_pass(model, dataset, tmp_path / "out", ctx, mode="paper", group=1, alpha=0.5)
    assert paper["settings"]["mode"] == "paper" and paper["theta"] != first["theta"]
    with pytest.raises(ValueError, match="multiple of group"):
        run_pass(model, dataset, tmp_path / "odd", ctx, batch_size=3)


def test_cli_labels_a_preset_target_set_from_a_checkpoint(model, target, tmp_path, capsys):
    checkpoint = tmp_path / "model.pt"
    torch.save({"format": "fastst-checkpoint-v1", "model": model.state_dict(),
                "model_config": model.model_config}, checkpoint)
    out = tmp_path / "labels"
    code = pseudo.main(["--checkpoint", str(checkpoint), "--preset", "iast_gta5", "--out",
                        str(out), "--stage", "round2", f"data.target.root={target}",
                        "stages.round2.pseudo_size=[16, 32]", "runtime.workers=0",
                        "runtime.progress=false", "runtime.threads=1"])
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["alpha"] == 0.25 and manifest["settings"]["size"] == [16, 32]
    assert len(list((out / "labels").glob("*_pseudo_label.png"))) == NUM_IMAGES
    assert "threshold" in capsys.readouterr().out

    # A TPLD phase-1 stage: its class-balanced pass with voting, as the round itself runs it.
    voted = tmp_path / "voted"
    code = pseudo.main(["--checkpoint", str(checkpoint), "--preset", "tpld_gta5", "--out",
                        str(voted), "--stage", "phase1_2", f"data.target.root={target}",
                        "stages.phase1_2.pseudo_size=[16, 32]", "runtime.workers=0",
                        "runtime.progress=false", "runtime.threads=1"])
    assert code == 0
    manifest = json.loads((voted / "manifest.json").read_text())
    assert manifest["format"] == "fastst-cbst-pseudo-v1" and manifest["settings"]["portion"] == 0.25
    assert manifest["settings"]["vote"] == {"window": 7, "weight": 0.7, "iterations": 3}
    assert len(list((voted / "labels").glob("*_pseudo_label.png"))) == NUM_IMAGES

    with pytest.raises(SystemExit):
        pseudo.main(["--checkpoint", str(checkpoint), "--preset", "iast_gta5", "--out",
                     str(out), "--stage", "warmup"])
    assert "round1, round2, round3" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        pseudo.main(["--checkpoint", str(tmp_path / "absent.pt"), "--preset", "iast_gta5",
                     "--out", str(out)])
    assert "absent.pt" in capsys.readouterr().err


def amp_on_the_cpu(monkeypatch):
    """runtime.amp's bf16 autocast on the CPU, as runtime.amp=bfloat16 gives it on CUDA."""
    monkeypatch.setattr(RunContext, "amp_dtype", property(lambda self: torch.bfloat16))


def record_output_dtypes(model):
    """(the list the model's output dtypes are appended to, the hook's handle)."""
    dtypes = []
    return dtypes, model.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))


def op_in_order(model, dataset, *, alpha, amp=False):
    """The op applied by hand in the pass's order and batches (group 2, batch 2): labels in
    visiting order and the final theta, the model in float32 or under CPU bf16 autocast."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))
    labels, theta = [], None
    with torch.no_grad():
        for start in range(0, len(dataset), 2):
            images = torch.stack([dataset[int(i)]["image"] for i in order[start:start + 2]])
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                logits = model(images)
            batch, theta, _ = ias_pseudo_label(logits, theta, alpha=alpha, mode="official",
                                               from_logits=True, size=SIZE, group=2)
            labels.append(batch.numpy())
    return [dataset[int(i)]["name"] for i in order], np.concatenate(labels), theta


def test_pass_runs_the_model_in_float32_unless_amp_pseudo(model, target, tmp_path, monkeypatch):
    # The released code labels in float32 (Raykoooo/IAST code/sseg/workflow/sl_trainer.py:155
    # runs net_pseudo before amp.initialize at :246), even where training uses autocast.
    amp_on_the_cpu(monkeypatch)
    dataset = build_dataset("cityscapes", target, "train", labels=False)
    manifests = {}
    for amp_pseudo in (False, True):
        dtypes, handle = record_output_dtypes(model)
        try:
            manifests[amp_pseudo] = run_pass(model, dataset, tmp_path / str(amp_pseudo),
                                             context(tmp_path, amp_pseudo=amp_pseudo))
        finally:
            handle.remove()
        assert dtypes and set(dtypes) == {torch.bfloat16 if amp_pseudo else torch.float32}
        names, labels, theta = op_in_order(model, dataset, alpha=0.2, amp=amp_pseudo)
        np.testing.assert_array_equal(read_labels(tmp_path / str(amp_pseudo), names), labels)
        assert manifests[amp_pseudo]["theta"] == theta.tolist()
    assert manifests[True]["theta"] != manifests[False]["theta"], \
        "the fixture must tell bf16 logits from float32 ones"


def test_labels_of_a_checkpoint_are_the_op_on_its_float32_logits(model, target, tmp_path,
                                                                 monkeypatch):
    """python -m fastst.pseudo under a training autocast: the labels and thresholds are what
    the op gives on the float32 logits of the checkpoint's model (the op is exact given its
    input, so nothing else stands between them and the released code)."""
    from fastst.models import load_model

    amp_on_the_cpu(monkeypatch)
    checkpoint = tmp_path / "model.pt"
    torch.save({"format": "fastst-checkpoint-v1", "model": model.state_dict(),
                "model_config": model.model_config}, checkpoint)
    overrides = ["--checkpoint", str(checkpoint), "--preset", "iast_gta5", "--stage", "round1",
                 f"data.target.root={target}", f"stages.round1.pseudo_size=[{SIZE[0]}, {SIZE[1]}]",
                 "runtime.workers=0", "runtime.progress=false", "runtime.threads=1"]
    assert pseudo.main(["--out", str(tmp_path / "fp32")] + overrides) == 0
    assert pseudo.main(["--out", str(tmp_path / "amp")] + overrides
                       + ["runtime.amp_pseudo=true"]) == 0

    loaded = load_model(checkpoint).eval()
    dataset = build_dataset("cityscapes", target, "train", labels=False, resize=list(SIZE))
    thetas = {}
    for out, amp in (("fp32", False), ("amp", True)):
        names, labels, theta = op_in_order(loaded, dataset, alpha=0.2, amp=amp)
        thetas[out] = json.loads((tmp_path / out / "manifest.json").read_text())["theta"]
        np.testing.assert_array_equal(read_labels(tmp_path / out, names), labels)
        assert thetas[out] == theta.tolist()
    assert thetas["fp32"] != thetas["amp"]


def test_amp_pseudo_is_off_by_default_and_must_be_a_bool():
    from fastst.config import ConfigError

    assert load_config("demo")["runtime"]["amp_pseudo"] is False
    assert load_config("demo", ["runtime.amp_pseudo=true"])["runtime"]["amp_pseudo"] is True
    with pytest.raises(ConfigError, match="runtime.amp_pseudo"):
        load_config("demo", ["runtime.amp_pseudo=bfloat16"])
