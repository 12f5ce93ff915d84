"""IAST as a framework (IAST Tables 5 and 9): the warm-up variants (output-space GAN,
AdaptSegNet multi-level, AdvEnt, none) and the round selectors (ias, constant, cbst) with the
region regularisers switched on and off, on the tiny GTA5 + Cityscapes fixtures of test_train
(2 iterations a stage), plus the multi-level model and the configuration keys."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fastst import train
from fastst.checkpoint import checkpoint_state, load_checkpoint
from fastst.config import ConfigError, load_config
from fastst.data.pseudo_label import pseudo_label_path
from fastst.methods import iast, warmup
from fastst.methods.context import StopRequested
from fastst.methods.datasets import build_role
from fastst.methods.warmup import (adversarial_loss, class_probabilities, discriminator_input,
                                   discriminator_loss, resolve_gan)
from fastst.models import FCDiscriminator, deeplabv2, load_model
from fastst.models.deeplabv2 import MultiLevelDeepLabV2
from fastst.ops import ClassBalancedThresholds, cbst_pseudo_label, self_information
from test_train import fixture_root, restore_threads, tiny_overrides  # noqa: F401

PSEUDO_SIZE = (16, 32)
NUM_CLASSES = 19


def _config(root, stages, iterations=2, **extra):
    """iast_gta5 shrunk to the fixtures, running ``stages`` (a pipeline of its stage names)."""
    overrides = tiny_overrides(root, iterations, stages=stages, **{
        "pipeline": "[" + ", ".join(stages) + "]", "runtime.tensorboard": "false", **extra})
    return load_config("iast_gta5", overrides)


def _plain_keys():
    return set(deeplabv2(num_classes=NUM_CLASSES, backbone="resnet18_w16").state_dict())


def _read_labels(label_dir, names):
    return torch.stack([torch.from_numpy(np.array(Image.open(pseudo_label_path(label_dir, n))))
                        for n in names])


def _probabilities(checkpoint, config):
    """(names, float32 (N, C, 16, 32) softmax of the checkpoint's model on the target images
    resized to the pseudo-label size, logits upsampled with align_corners=True), computed in
    pairs in data-set order as the passes batch them."""
    model = load_model(checkpoint).eval()
    images = build_role(config, "target", resize=list(PSEUDO_SIZE))
    names, probs = [], []
    with torch.no_grad():
        for start in range(0, len(images), 2):
            items = [images[i] for i in range(start, min(start + 2, len(images)))]
            logits = model(torch.stack([item["image"] for item in items]))
            upsampled = F.interpolate(logits, size=PSEUDO_SIZE, mode="bilinear",
                                      align_corners=True)
            probs.append(torch.softmax(upsampled, dim=1))
            names.extend(item["name"] for item in items)
    return names, torch.cat(probs)


# --- the multi-level model ------------------------------------------------------------------

def test_multilevel_model_leaves_the_plain_model_unchanged():
    torch.manual_seed(0)
    plain = deeplabv2(num_classes=5, backbone="resnet18_w16")
    torch.manual_seed(0)
    model = deeplabv2(num_classes=5, backbone="resnet18_w16")
    keys, count = list(model.state_dict()), sum(p.numel() for p in model.parameters())
    net = MultiLevelDeepLabV2(model)
    assert list(model.state_dict()) == keys == list(plain.state_dict())
    assert sum(p.numel() for p in model.parameters()) == count
    assert model.model_config == net.model_config == {"num_classes": 5,
                                                      "backbone": "resnet18_w16"}
    # layer3 of resnet18_w16 has 4 * 16 channels; four 3x3 convs to 5 classes.
    assert sum(p.numel() for p in net.aux_classifier.parameters()) == 4 * (64 * 5 * 9 + 5)
    assert {k for k in net.state_dict() if not k.startswith("model.")} == \
        {f"aux_classifier.convs.{i}.{p}" for i in range(4) for p in ("weight", "bias")}

    x = torch.randn(2, 3, 33, 47, generator=torch.Generator().manual_seed(1))
    model.eval()
    with torch.no_grad():
        aux, main = net(x)
        assert torch.equal(main, model(x)) and torch.equal(model(x), plain.eval()(x))
    assert aux.shape == main.shape == (2, 5, 5, 6)

    backbone, head = net.param_groups(1e-5, 1e-4)
    assert (backbone["lr"], head["lr"]) == (1e-5, 1e-4)
    ids = [id(p) for group in (backbone, head) for p in group["params"]]
    assert sorted(ids) == sorted(id(p) for p in net.parameters()), "every parameter once"
    assert {id(p) for p in net.aux_classifier.parameters()} <= {id(p) for p in head["params"]}

    # What a multilevel warm-up saves loads into a plain model.
    restored = load_model(checkpoint_state(net.model))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in restored.state_dict().items())
    with pytest.raises(TypeError, match="wraps a fastst DeepLabV2"):
        MultiLevelDeepLabV2(torch.nn.Conv2d(3, 5, 1))


def test_multilevel_aux_classifier_sits_on_1024_channels_for_resnet101():
    with torch.device("meta"):
        net = MultiLevelDeepLabV2(deeplabv2(num_classes=19, backbone="resnet101"))
        aux, main = net(torch.empty(1, 3, 321, 321))
    assert net.aux_classifier.convs[0].in_channels == 1024
    assert aux.shape == main.shape == (1, 19, 41, 41)


# --- the warm-up's losses -------------------------------------------------------------------

class _ConstantD(torch.nn.Module):
    """A 'discriminator' answering the mean of its input map as a logit."""

    def forward(self, x):
        return x.mean(dim=(1, 2, 3), keepdim=True)


def test_bce_gan_labels_and_the_variants_default_losses():
    zeros, ones = torch.zeros(2, 3, 4, 4), torch.ones(2, 3, 4, 4)
    d = _ConstantD()
    log2 = float(np.log(2.0))
    # Logit 0 is a coin toss against either label: BCE ln 2.
    assert discriminator_loss(d, zeros, zeros, "bce").item() == pytest.approx(log2)
    big = 20 * ones
    # D(source) = -20 and D(target) = +20: almost perfect, so almost 0; swapped, almost 20.
    assert discriminator_loss(d, -big, big, "bce").item() == pytest.approx(0.0, abs=1e-8)
    assert discriminator_loss(d, big, -big, "bce").item() == pytest.approx(20.0, abs=1e-6)
    assert adversarial_loss(d, -big, "bce").item() == pytest.approx(0.0, abs=1e-8)
    probs = zeros.clone().requires_grad_()
    adversarial_loss(d, probs, "bce").backward()
    assert bool((probs.grad > 0).all()), "descending the loss moves D(target) towards source"
    assert discriminator_loss(d, zeros, 0.5 * ones, "lsgan").item() == pytest.approx(0.125)
    assert [resolve_gan(v, "auto") for v in ("output", "multilevel", "advent")] == \
        ["lsgan", "bce", "bce"]
    assert resolve_gan("output", "bce") == "bce"
    with pytest.raises(ValueError, match="unknown warm-up variant 'adaptseg'"):
        resolve_gan("adaptseg", "auto")


def test_advent_discriminator_sees_weighted_self_information():
    logits = torch.randn(2, 19, 3, 5, generator=torch.Generator().manual_seed(0)) * 3
    probs = class_probabilities(logits, (12, 20))
    info = discriminator_input(logits, (12, 20), "advent")
    expected = -probs * torch.log2(probs + 1e-30) / np.log2(19)
    assert torch.allclose(info, expected, rtol=1e-5, atol=1e-7)
    assert torch.equal(info, self_information(probs))
    assert torch.equal(discriminator_input(logits, (12, 20), "output"), probs)
    assert torch.equal(discriminator_input(logits, (12, 20), "multilevel"), probs)


# --- warm-up variants in the pipeline -------------------------------------------------------

def _spy_warmup(monkeypatch):
    """Record the GAN loss of each discriminator_loss call and count self_information calls."""
    calls = {"gan": [], "self_information": 0}
    real_loss, real_info = warmup.discriminator_loss, warmup.self_information

    def discriminator_loss(*args):
        calls["gan"].append(args[3])
        return real_loss(*args)

    def self_information(probs):
        calls["self_information"] += 1
        return real_info(probs)

    monkeypatch.setattr(warmup, "discriminator_loss", discriminator_loss)
    monkeypatch.setattr(warmup, "self_information", self_information)
    return calls


@pytest.mark.parametrize("variant, gan, levels, information", [
    ("output", "lsgan", 1, 0), ("multilevel", "bce", 2, 0), ("advent", "bce", 1, 4)])
def test_warmup_variants_run_and_the_round_loads_their_checkpoint(
        fixture_root, tmp_path, monkeypatch, variant, gan, levels, information):
    calls = _spy_warmup(monkeypatch)
    stages = ("source_only", "warmup", "round1")
    config = _config(fixture_root, stages, **{"stages.warmup.variant": variant})
    out = tmp_path / "run"
    if variant == "advent":  # through the command line, as a user would
        assert train.main(["--preset", "iast_gta5", "--out", str(out)] + tiny_overrides(
            fixture_root, stages=stages, **{"pipeline": "[" + ", ".join(stages) + "]",
                                            "runtime.tensorboard": "false",
                                            "stages.warmup.variant": "advent"})) == 0
    else:
        train.run_pipeline(config, out)
    # Two iterations, one discriminator loss per level each; ADVENT turns the target and the
    # source maps into self-information (2 per iteration).
    assert calls["gan"] == [gan] * (2 * levels)
    assert calls["self_information"] == information

    state = load_checkpoint(out / "warmup" / "last.pt")
    assert state["complete"] and state["iteration"] == 2
    assert set(state["model"]) == _plain_keys()
    assert state["model_config"] == {"num_classes": 19, "backbone": "resnet18_w16"}
    d_params = len(list(FCDiscriminator(19).parameters()))
    model_optimizer, d_optimizer = state["optimizers"]
    # Adam keeps state for every parameter that got a gradient: both discriminators, and the
    # auxiliary classifier (4 convs, weight and bias) in the model's head group.
    assert len(d_optimizer["state"]) == levels * d_params
    head = model_optimizer["param_groups"][1]["params"]
    assert len(head) == 8 * levels
    extras = {"discriminator", "discriminator_aux", "aux_classifier"} & set(state)
    assert extras == ({"discriminator"} if levels == 1 else
                      {"discriminator", "discriminator_aux", "aux_classifier"})

    round1 = load_checkpoint(out / "round1" / "last.pt")
    assert round1["complete"] and set(round1["model"]) == _plain_keys()
    summary = json.loads((out / "summary.json").read_text())
    assert [s["name"] for s in summary["stages"]] == list(stages)


def test_a_killed_multilevel_warmup_resumes_to_the_same_state(fixture_root, tmp_path):
    stages = ("source_only", "warmup")
    common = {"stages.warmup.variant": "multilevel", "stages.source_only.iterations": 1,
              "runtime.checkpoint_every": 2}
    straight = _config(fixture_root, stages, iterations=3, **common)
    train.run_pipeline(straight, tmp_path / "straight")
    killed = _config(fixture_root, stages, iterations=3, **common,
                     **{"runtime.stop_after_iterations": 3})
    with pytest.raises(StopRequested):
        train.run_pipeline(killed, tmp_path / "resumed")
    partial = load_checkpoint(tmp_path / "resumed" / "warmup" / "last.pt")
    assert partial["iteration"] == 2 and not partial["complete"]
    train.run_pipeline(straight, tmp_path / "resumed")
    expected = load_checkpoint(tmp_path / "straight" / "warmup" / "last.pt")
    actual = load_checkpoint(tmp_path / "resumed" / "warmup" / "last.pt")
    for part in ("model", "aux_classifier", "discriminator", "discriminator_aux"):
        assert all(torch.equal(expected[part][k], actual[part][k]) for k in expected[part]), part
    assert not all(torch.equal(partial["aux_classifier"][k], actual["aux_classifier"][k])
                   for k in actual["aux_classifier"]), "the auxiliary classifier trains"


# --- selectors ------------------------------------------------------------------------------

def test_constant_selector_straight_after_source_only(fixture_root, tmp_path):
    """No warm-up (Table 9's Source row): the round labels with source-only's model; its labels
    are argmax p where max p >= threshold, computed here directly."""
    train.run_pipeline(_config(fixture_root, ("source_only",)), tmp_path / "source")
    checkpoint = tmp_path / "source" / "source_only" / "last.pt"
    base = _config(fixture_root, ("source_only", "round1"))
    names, probs = _probabilities(checkpoint, base)
    confidence = probs.max(dim=1).values
    # The lower median: about half of the pixels pass, and one sits exactly on the threshold.
    threshold = float(confidence.flatten().median())
    config = _config(fixture_root, ("source_only", "round1"), **{
        "stages.round1.selector": "constant", "stages.round1.threshold": repr(threshold),
        "runtime.reuse_from": str(tmp_path / "source")})
    summary = train.run_pipeline(config, tmp_path / "run")
    out = tmp_path / "run" / "round1"

    manifest = json.loads((out / "pseudo" / "manifest.json").read_text())
    assert manifest["format"] == "fastst-cbst-pseudo-v1" and manifest["complete"]
    assert manifest["settings"]["threshold"] == threshold
    assert [image["name"] for image in manifest["images"]] == names
    labels = _read_labels(out / "pseudo" / "labels", names)
    expected = torch.where(confidence.double() >= threshold, probs.argmax(dim=1),
                           torch.full_like(probs.argmax(dim=1), 255)).to(torch.uint8)
    assert torch.equal(labels, expected)
    assert torch.equal(cbst_pseudo_label(probs, torch.full((NUM_CLASSES,), threshold)), expected)
    labelled = (expected != 255).double().mean().item()
    assert 0.3 < labelled < 0.7
    assert manifest["labelled_fraction"] == pytest.approx(labelled)

    result = {s["name"]: s for s in summary["stages"]}["round1"]["pseudo"]
    assert result["selector"] == "constant" and result["threshold"] == threshold
    assert result["theta"] == [threshold] * NUM_CLASSES
    assert result["labelled_fraction"] == pytest.approx(labelled)
    state = load_checkpoint(out / "last.pt")
    assert state["complete"] and state["theta"].tolist() == [threshold] * NUM_CLASSES


def test_cbst_selector_labels_with_class_balanced_thresholds(fixture_root, tmp_path):
    train.run_pipeline(_config(fixture_root, ("source_only",)), tmp_path / "source")
    config = _config(fixture_root, ("source_only", "round1"), **{
        "stages.round1.selector": "cbst", "stages.round1.portion": 0.5,
        "stages.round1.subsample": 1, "runtime.reuse_from": str(tmp_path / "source")})
    summary = train.run_pipeline(config, tmp_path / "run")
    out = tmp_path / "run" / "round1"

    manifest = json.loads((out / "pseudo" / "manifest.json").read_text())
    settings = manifest["settings"]
    assert (settings["portion"], settings["scales"], settings["flip"], settings["vote"],
            settings["subsample"], settings["size"]) == (0.5, [1.0], False, None, 1, [16, 32])
    names, probs = _probabilities(tmp_path / "source" / "source_only" / "last.pt", config)
    lambdas = torch.tensor(manifest["lambdas"], dtype=torch.float32)
    accumulator = ClassBalancedThresholds(NUM_CLASSES, subsample=1)
    accumulator.update(probs)
    assert torch.equal(accumulator.thresholds(0.5), lambdas)
    expected = cbst_pseudo_label(probs, lambdas)
    assert torch.equal(_read_labels(out / "pseudo" / "labels", names), expected)
    labelled = (expected != 255).double().mean().item()
    assert 0.2 < labelled < 0.8

    result = {s["name"]: s for s in summary["stages"]}["round1"]["pseudo"]
    assert result["selector"] == "cbst" and result["portion"] == 0.5
    assert result["theta"] == manifest["lambdas"]
    assert result["labelled_fraction"] == pytest.approx(labelled)
    state = load_checkpoint(out / "last.pt")
    assert state["theta"].tolist() == pytest.approx(manifest["lambdas"])


@pytest.mark.parametrize("selector, lambda_kld, lambda_ent", [
    ("constant", 0.0, 0.0),   # Table 5: + constant self-training
    ("ias", 0.0, 0.0),        # + instance adaptive selector
    ("ias", 0.1, 0.0),        # + confident-region KLD
    ("cbst", 0.0, 3.0),       # a class-balanced round with the ignored-region entropy only
])
def test_ablation_rounds_switch_selector_and_regularisers(fixture_root, tmp_path, monkeypatch,
                                                          selector, lambda_kld, lambda_ent):
    seen = []
    real = iast.region_loss

    def region_loss(*args, **kwargs):
        loss, ce, kld, ent = real(*args, **kwargs)
        seen.append((kwargs["lambda_kld"], kwargs["lambda_ent"], loss.item(), ce.item(),
                     kld.item(), ent.item()))
        return loss, ce, kld, ent

    monkeypatch.setattr(iast, "region_loss", region_loss)
    stages = ("source_only", "round1", "round2")
    config = _config(fixture_root, stages, **{
        f"stages.{name}.{key}": value for name in stages[1:] for key, value in (
            ("selector", selector), ("lambda_kld", lambda_kld), ("lambda_ent", lambda_ent),
            ("threshold", 0.06), ("portion", 0.5))})
    summary = train.run_pipeline(config, tmp_path / "run")
    assert [s["name"] for s in summary["stages"]] == list(stages)
    assert len(seen) == 4
    for kld_weight, ent_weight, loss, ce, kld, ent in seen:
        assert (kld_weight, ent_weight) == (lambda_kld, lambda_ent)
        assert loss == pytest.approx(ce + lambda_kld * kld + lambda_ent * ent, rel=1e-6)
        if lambda_kld == lambda_ent == 0:
            assert loss == ce
    formats = {"ias": "fastst-pseudo-v1", "constant": "fastst-cbst-pseudo-v1",
               "cbst": "fastst-cbst-pseudo-v1"}
    for name in stages[1:]:
        result = {s["name"]: s for s in summary["stages"]}[name]["pseudo"]
        assert result["selector"] == selector and len(result["theta"]) == NUM_CLASSES
        assert 0.0 <= result["labelled_fraction"] <= 1.0
        assert result["labelled_fraction"] == pytest.approx(sum(result["density"]))
        manifest = json.loads((tmp_path / "run" / name / "pseudo" / "manifest.json").read_text())
        assert manifest["format"] == formats[selector]
        labels = sorted((tmp_path / "run" / name / "pseudo" / "labels").glob("*.png"))
        assert len(labels) == 6 and Image.open(labels[0]).size == (32, 16)


# --- configuration --------------------------------------------------------------------------

def test_new_keys_have_the_published_defaults():
    config = load_config("iast_gta5", ["stages.warmup.variant=advent",
                                       "stages.round1.selector=constant"])
    stage = config["stages"]["warmup"]
    assert (stage["variant"], stage["gan"], stage["lambda_adv_aux"], stage["lambda_seg_aux"]) \
        == ("advent", "auto", 0.0002, 0.1)
    round1 = config["stages"]["round1"]
    assert (round1["selector"], round1["threshold"], round1["portion"], round1["subsample"]) \
        == ("constant", 0.9, 0.2, 4)
    default = load_config("iast_gta5")["stages"]
    assert default["warmup"]["variant"] == "output" and default["round2"]["selector"] == "ias"


@pytest.mark.parametrize("override, message", [
    ("stages.warmup.variant=adaptsegnet", "stages.warmup.variant must be one of output, "
                                          "multilevel, advent"),
    ("stages.warmup.gan=wgan", "stages.warmup.gan must be one of auto, lsgan, bce"),
    ("stages.warmup.lambda_adv_aux=-0.1", "stages.warmup.lambda_adv_aux must be a finite number"),
    ("stages.warmup.lambda_seg_aux=.inf", "stages.warmup.lambda_seg_aux must be a finite number"),
    ("stages.round1.selector=cb", "stages.round1.selector must be one of ias, constant, cbst"),
    ("stages.round1.threshold=0", r"stages.round1.threshold must be a finite number > 0 and <= 1"),
    ("stages.round2.threshold=1.01", r"stages.round2.threshold must be a finite number > 0"),
    ("stages.round3.portion=1.5", r"stages.round3.portion must be a finite number >= 0 and <= 1"),
    ("stages.round1.subsample=0", "stages.round1.subsample must be an integer >= 1"),
])
def test_bad_variant_and_selector_values_are_rejected_by_name(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("iast_gta5", [override])
