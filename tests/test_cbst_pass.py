"""The class-balanced pseudo-label pass (fastst.methods.labelling.class_balanced): thresholds, labels, voting and
confidences equal to the ops applied by hand, the manifest, TensorBoard logging, resumption after
a stop in either pass, reuse of a finished pass, and argument checks."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from fastst.methods.labelling import cbst_pass, mine_classes, read_cbst_manifest
from fastst.methods.labelling import class_balanced as cbst_pass_module
from fastst.config import load_config
from fastst.data.pseudo_label import pseudo_label_path
from fastst.inference import predict_probs
from fastst.methods.context import RunContext, StopRequested
from fastst.ops import ClassBalancedThresholds, cbst_pseudo_label, image_confidence, tpld_vote
from test_pseudo import one_thread  # noqa: F401

C = 5
H, W = 16, 32
NUM_IMAGES = 8
VOTE = {"window": 3, "weight": 0.5, "iterations": 2}
OPTIONS = dict(portion=0.3, scales=(0.9, 1.0), flip=True, subsample=2, batch_size=2,
               mine_portion=0.2)


class TinyNet(nn.Module):
    """A (B, 3, H, W) -> (B, C, H/2, W/2) logits net; BN so that eval and train modes differ."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, C, 3, padding=1)
        self.model_config = {"num_classes": C, "backbone": "tiny"}

    def forward(self, x):
        return 4 * self.head(torch.relu(self.bn(self.conv(x))))


class Images(torch.utils.data.Dataset):
    """Fixed random normalised images with smooth structure, named img_0..img_{n-1}."""

    def __init__(self, count=NUM_IMAGES, seed=1):
        generator = torch.Generator().manual_seed(seed)
        coarse = torch.randn(count, 3, H // 4, W // 4, generator=generator)
        self.images = nn.functional.interpolate(coarse, size=(H, W), mode="bilinear",
                                                align_corners=True) \
            + 0.3 * torch.randn(count, 3, H, W, generator=generator)

    def __len__(self):
        return self.images.shape[0]

    def __getitem__(self, index):
        return {"image": self.images[index].clone(), "name": f"img_{index}"}


class Recorder:
    """Stands in for a TensorBoard SummaryWriter."""

    def __init__(self):
        self.scalars, self.histograms, self.images = {}, {}, {}

    def add_scalar(self, name, value, step):
        self.scalars[name] = float(value)

    def add_histogram(self, name, values, step):
        self.histograms[name] = torch.as_tensor(values).clone()

    def add_images(self, name, images, step):
        self.images[name] = images.clone()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    net = TinyNet()
    with torch.no_grad():  # running statistics unlike the batch ones, so train mode would show
        net.bn.running_mean.uniform_(-0.5, 0.5)
        net.bn.running_var.uniform_(0.5, 2.0)
    return net.eval()


@pytest.fixture(scope="module")
def dataset():
    return Images()




def context(tmp_path, writer=None, **runtime):
    config = load_config("demo", ["runtime.progress=false", "runtime.workers=0",
                                  "runtime.write_threads=2"]
                         + [f"runtime.{k}={v}" for k, v in runtime.items()])
    return RunContext(config=config, run_dir=tmp_path, seed=0, device=torch.device("cpu"),
                      writer=writer)


def run(model, dataset, out, ctx, **kwargs):
    return cbst_pass(model, dataset, out, ctx, **{**OPTIONS, **kwargs})


def read_labels(out, names):
    return np.stack([np.array(Image.open(pseudo_label_path(out / "labels", n))) for n in names])


def by_hand(model, dataset, *, portion, scales, flip, subsample, batch_size, **_):
    """Probabilities per batch in index order and the accumulator fed with them."""
    views = len(scales) * (2 if flip else 1)
    batches = []
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            images = torch.stack([dataset[i]["image"]
                                  for i in range(start, min(start + batch_size, len(dataset)))])
            batches.append(predict_probs(model, images, scales=scales, flip=flip) / views)
    accumulator = ClassBalancedThresholds(C, subsample=subsample)
    for probs in batches:
        accumulator.update(probs)
    return batches, accumulator.thresholds(portion), accumulator.class_counts()


def test_pass_equals_the_ops_by_hand_and_writes_a_manifest(model, dataset, tmp_path):
    writer = Recorder()
    model.train()
    running_mean = model.bn.running_mean.clone()
    try:
        manifest = run(model, dataset, tmp_path / "out", context(tmp_path, writer), vote=VOTE)
        assert model.training, "the caller's train mode must be restored"
    finally:
        model.eval()
    assert torch.equal(model.bn.running_mean, running_mean), "the pass must run in eval mode"

    batches, lambdas, counts = by_hand(model, dataset, **OPTIONS)
    assert manifest["lambdas"] == lambdas.tolist()
    assert len(set(manifest["lambdas"])) >= 3 and min(manifest["lambdas"]) < 1
    assert manifest["class_counts"] == counts.tolist()
    total = NUM_IMAGES * H * W
    assert sum(manifest["class_counts"]) == total
    assert manifest["class_fraction"] == pytest.approx([n / total for n in counts.tolist()])
    names = [f"img_{i}" for i in range(NUM_IMAGES)]
    assert [image["name"] for image in manifest["images"]] == names

    confident = torch.cat([cbst_pseudo_label(p, lambdas) for p in batches]).numpy()
    voted = torch.cat([tpld_vote(p, lambdas, **VOTE) for p in batches]).numpy()
    conf = torch.cat([image_confidence(p, lambdas) for p in batches])
    np.testing.assert_array_equal(read_labels(tmp_path / "out", names), voted)
    assert [image["confidence"] for image in manifest["images"]] == conf.tolist()
    assert len(set(conf.tolist())) > 1

    def density(labels):
        return [int((labels == c).sum()) / labels.size for c in range(C)]

    assert manifest["density_confident"] == pytest.approx(density(confident))
    assert manifest["density"] == pytest.approx(density(voted))
    assert all(after >= before for after, before in zip(manifest["density"],
                                                        manifest["density_confident"]))
    assert manifest["labelled_fraction"] > manifest["labelled_fraction_confident"] > 0
    assert manifest["labelled_fraction"] < 1
    assert manifest["labelled_fraction"] == pytest.approx(float((voted != 255).mean()))

    order = sorted(range(C), key=lambda c: (counts[c].item(), c))
    expected_mined = [c for c in order if counts[c].item() / total < OPTIONS["mine_portion"]]
    assert manifest["mine_classes"] == expected_mined and 0 < len(expected_mined) < C

    assert manifest["settings"] == {**{k: v for k, v in OPTIONS.items() if k != "scales"},
                                    "scales": [0.9, 1.0], "vote": VOTE,
                                    "num_images": NUM_IMAGES, "num_classes": C, "size": [H, W],
                                    "threshold": None}
    assert manifest["format"] == "fastst-cbst-pseudo-v1" and manifest["complete"]
    assert json.loads((tmp_path / "out" / "manifest.json").read_text()) == manifest
    assert read_cbst_manifest(tmp_path / "out") == manifest
    assert not (tmp_path / "out" / "state.pt").exists()

    for c, name in enumerate(manifest["class_names"]):
        assert writer.scalars[f"pseudo/lambda/{name}"] == pytest.approx(manifest["lambdas"][c])
        assert writer.scalars[f"pseudo/density/{name}"] == pytest.approx(manifest["density"][c])
        assert writer.scalars[f"pseudo/density_confident/{name}"] == \
            pytest.approx(manifest["density_confident"][c])
    assert writer.scalars["pseudo/labelled_fraction"] == pytest.approx(
        manifest["labelled_fraction"])
    assert writer.scalars["pseudo/labelled_fraction_confident"] == pytest.approx(
        manifest["labelled_fraction_confident"])
    assert torch.equal(writer.histograms["pseudo/image_confidence"], conf)
    assert writer.images["pseudo/pseudo_label"].shape == (2, 3, H, W)


def test_without_vote_the_labels_are_the_confident_map(model, dataset, tmp_path):
    options = {**OPTIONS, "scales": (1.0,), "flip": False, "subsample": 1, "batch_size": 3}
    manifest = cbst_pass(model, dataset, tmp_path / "out", context(tmp_path), **options)
    batches, lambdas, _ = by_hand(model, dataset, **options)
    assert manifest["lambdas"] == lambdas.tolist()
    confident = torch.cat([cbst_pseudo_label(p, lambdas) for p in batches]).numpy()
    names = [image["name"] for image in manifest["images"]]
    np.testing.assert_array_equal(read_labels(tmp_path / "out", names), confident)
    assert manifest["settings"]["vote"] is None
    assert manifest["density"] == manifest["density_confident"]
    assert manifest["labelled_fraction"] == manifest["labelled_fraction_confident"]


def test_a_fixed_threshold_labels_every_class_alike_without_pass_one(model, dataset, tmp_path,
                                                                     monkeypatch):
    """IAST's constant-threshold selector: every lambda is the threshold, pass 1 never runs."""
    def no_pass_one(*args, **kwargs):
        raise AssertionError("pass 1 must not run with a fixed threshold")

    monkeypatch.setattr(cbst_pass_module.ClassBalancedPass, "thresholds", no_pass_one)
    manifest = run(model, dataset, tmp_path / "out", context(tmp_path), threshold=0.5)
    batches, _, _ = by_hand(model, dataset, **OPTIONS)
    lambdas = torch.full((C,), 0.5)
    names = [f"img_{i}" for i in range(NUM_IMAGES)]
    expected = torch.cat([cbst_pseudo_label(p, lambdas) for p in batches]).numpy()
    np.testing.assert_array_equal(read_labels(tmp_path / "out", names), expected)
    direct = torch.cat([torch.where(p.max(1).values >= 0.5, p.argmax(1), 255) for p in batches])
    np.testing.assert_array_equal(expected, direct.numpy())
    assert 0 < manifest["labelled_fraction"] < 1
    assert manifest["lambdas"] == [0.5] * C and manifest["settings"]["threshold"] == 0.5
    assert manifest["class_counts"] == [] and manifest["mine_classes"] == []
    for bad in (0.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match="threshold"):
            run(model, dataset, tmp_path / "bad", context(tmp_path), threshold=bad)


def test_pass_runs_the_model_in_float32_unless_amp_pseudo(model, dataset, tmp_path,
                                                          monkeypatch):
    # CRST labels with the float32 model (yzou2/CRST crst_seg.py:459-464; it has no autocast).
    # runtime.amp's bf16 autocast on the CPU, as runtime.amp=bfloat16 gives it on CUDA:
    monkeypatch.setattr(RunContext, "amp_dtype", property(lambda self: torch.bfloat16))
    manifests = {}
    for amp_pseudo in (False, True):
        dtypes = []
        handle = model.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
        try:
            manifests[amp_pseudo] = run(model, dataset, tmp_path / str(amp_pseudo),
                                        context(tmp_path, amp_pseudo=amp_pseudo))
        finally:
            handle.remove()
        assert dtypes and set(dtypes) == {torch.bfloat16 if amp_pseudo else torch.float32}
    batches, lambdas, _ = by_hand(model, dataset, **OPTIONS)
    assert manifests[False]["lambdas"] == lambdas.tolist()
    assert manifests[True]["lambdas"] != lambdas.tolist()
    confident = torch.cat([cbst_pseudo_label(p, lambdas) for p in batches]).numpy()
    np.testing.assert_array_equal(read_labels(tmp_path / "False", [f"img_{i}" for i in
                                                                   range(NUM_IMAGES)]), confident)


def test_mine_classes_rule():
    counts = [5, 0, 5, 100, 1, 0]  # fractions 5/111, 0, 5/111, 100/111, 1/111, 0
    assert mine_classes(counts, 0.06) == [1, 5, 4, 0, 2]
    assert mine_classes(counts, 0.04) == [1, 5, 4]
    assert mine_classes(counts, 0.0) == []
    assert mine_classes(counts, 1.0) == [1, 5, 4, 0, 2, 3]


def test_stop_in_pass_two_then_resume_without_redoing_pass_one(model, dataset, tmp_path,
                                                               monkeypatch):
    straight = run(model, dataset, tmp_path / "straight", context(tmp_path), vote=VOTE)

    # 4 batches a pass; pass-2 state every 2 batches; the stop after the 7th batch in all (the
    # 3rd of pass 2) loses that batch, which the rerun redoes.
    killed = context(tmp_path, pseudo_state_every=2, stop_after_pseudo_batches=7)
    with pytest.raises(StopRequested):
        run(model, dataset, tmp_path / "resumed", killed, vote=VOTE)
    state = torch.load(tmp_path / "resumed" / "state.pt", weights_only=True)
    assert state["done"] == 4 and state["names"] == [f"img_{i}" for i in range(4)]
    assert state["lambdas"].tolist() == straight["lambdas"]
    assert not (tmp_path / "resumed" / "manifest.json").exists()

    class NoPassOne:
        def __init__(self, *args, **kwargs):
            raise AssertionError("pass 1 must not run again after its state was saved")

    monkeypatch.setattr(cbst_pass_module, "ClassBalancedThresholds", NoPassOne)
    resumed = run(model, dataset, tmp_path / "resumed", context(tmp_path), vote=VOTE)

    names = [image["name"] for image in straight["images"]]
    np.testing.assert_array_equal(read_labels(tmp_path / "resumed", names),
                                  read_labels(tmp_path / "straight", names))
    assert {k: v for k, v in resumed.items() if k != "seconds"} == \
        {k: v for k, v in straight.items() if k != "seconds"}
    assert not (tmp_path / "resumed" / "state.pt").exists()


def test_stop_in_pass_one_redoes_it(model, dataset, tmp_path):
    straight = run(model, dataset, tmp_path / "straight", context(tmp_path))
    with pytest.raises(StopRequested):
        run(model, dataset, tmp_path / "resumed", context(tmp_path, stop_after_pseudo_batches=2))
    assert not (tmp_path / "resumed" / "state.pt").exists()
    resumed = run(model, dataset, tmp_path / "resumed", context(tmp_path))
    names = [image["name"] for image in straight["images"]]
    np.testing.assert_array_equal(read_labels(tmp_path / "resumed", names),
                                  read_labels(tmp_path / "straight", names))
    assert {k: v for k, v in resumed.items() if k != "seconds"} == \
        {k: v for k, v in straight.items() if k != "seconds"}


def test_finished_pass_is_reused_and_other_settings_redo_it(model, dataset, tmp_path,
                                                            monkeypatch):
    out = tmp_path / "out"
    first = run(model, dataset, out, context(tmp_path))
    stamp = (out / "manifest.json").stat().st_mtime_ns

    def no_model(*args, **kwargs):
        raise AssertionError("a finished pass must not run the model again")

    with monkeypatch.context() as patch:
        patch.setattr(cbst_pass_module, "predict_probs", no_model)
        assert run(model, dataset, out, context(tmp_path)) == first
    assert (out / "manifest.json").stat().st_mtime_ns == stamp

    pseudo_label_path(out / "labels", "img_3").unlink()
    assert run(model, dataset, out, context(tmp_path))["lambdas"] == first["lambdas"]
    assert pseudo_label_path(out / "labels", "img_3").is_file()

    other = run(model, dataset, out, context(tmp_path), portion=0.6)
    assert other["settings"]["portion"] == 0.6 and other["lambdas"] != first["lambdas"]
    assert other["labelled_fraction"] > first["labelled_fraction"]

    # A stopped pass with other settings leaves no manifest describing labels it overwrote.
    with pytest.raises(StopRequested):
        run(model, dataset, out, context(tmp_path, stop_after_pseudo_batches=1))
    assert read_cbst_manifest(out) is None


def test_read_cbst_manifest_rejects_missing_corrupt_and_foreign_files(tmp_path):
    assert read_cbst_manifest(tmp_path / "absent") is None
    (tmp_path / "manifest.json").write_text("{not json")
    assert read_cbst_manifest(tmp_path) is None
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "fastst-pseudo-v1"}))
    assert read_cbst_manifest(tmp_path) is None


class NoConfig(nn.Module):
    def forward(self, x):
        return x[:, :2]


@pytest.mark.parametrize("kwargs, error, pattern", [
    ({"portion": 1.5}, ValueError, "portion"),
    ({"portion": True}, TypeError, "portion"),
    ({"scales": ()}, ValueError, "scales"),
    ({"scales": (0.9, -1.0)}, ValueError, "scales"),
    ({"scales": 0.9}, ValueError, "scales"),
    ({"flip": 1}, TypeError, "flip"),
    ({"subsample": 0}, ValueError, "subsample"),
    ({"vote": {"window": 7, "weight": 0.7}}, ValueError, r"vote.*missing \['iterations'\]"),
    ({"vote": {**VOTE, "size": 3}}, ValueError, r"vote.*unknown \['size'\]"),
    ({"vote": {**VOTE, "window": 4}}, ValueError, r"vote\['window'\] must be odd"),
    ({"vote": {**VOTE, "weight": 2.0}}, ValueError, r"vote\['weight'\]"),
    ({"vote": {**VOTE, "iterations": -1}}, ValueError, r"vote\['iterations'\]"),
    ({"vote": [7, 0.7, 3]}, TypeError, "vote"),
    ({"batch_size": 0}, ValueError, "batch_size"),
    ({"mine_portion": -0.1}, ValueError, "mine_portion"),
])
def test_bad_arguments_raise_naming_the_argument(model, dataset, tmp_path, kwargs, error,
                                                 pattern):
    with pytest.raises(error, match=pattern):
        run(model, dataset, tmp_path / "out", context(tmp_path), **kwargs)
    assert not (tmp_path / "out").exists()


def test_bad_data_set_or_model_raise(model, dataset, tmp_path):
    with pytest.raises(ValueError, match="dataset is empty"):
        run(model, Images(count=0), tmp_path / "out", context(tmp_path))
    with pytest.raises(TypeError, match="model_config"):
        run(NoConfig(), dataset, tmp_path / "out", context(tmp_path))
    assert not (tmp_path / "out").exists()
