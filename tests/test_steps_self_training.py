"""One training step of the self-training rounds against losses and gradients computed here.

IAST rounds (fastst.methods.iast): the label pass of each selector (ias, constant, cbst) gives the
labels the selector's rule gives on the model's float32 softmax, with the model in eval mode; one
step minimises the region loss of the pseudo-labelled target batch (plus ``source_weight`` times
the source CE). CBST / CRST rounds (fastst.methods.cbst): one step on a mixed source + target batch
minimises CE (CBST), CE + MRKLD on the target crops (CRST-MRKLD) or the soft-label CE of
CRST-LRENT, whose soft labels come from the pass's probabilities of the model the round started
from. Every step moves the prediction toward its target.

The expected values are written out here in float64 from the released code's formulas (cited by
file:line), never through fastst's losses, on the batch the stage's own stream yields; the
stage's ``step`` runs with plain SGD so that its update is known.
"""
import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from fastst.config import load_config
from fastst.data.pseudo_label import pseudo_label_path
from fastst.methods.cbst import CBSTRound
from fastst.methods.context import RunContext
from fastst.methods.datasets import build_role
from fastst.methods.iast import IASTRound
from fastst.models import deeplabv2
from fastst.ops.reference import ias_pseudo_label
from test_train import fixture_root, restore_threads, tiny_overrides  # noqa: F401

C = 19
IGNORE = 255
PSEUDO_SIZE = (16, 32)  # tiny_overrides' pseudo_size of every round
LR = 1e-3
RUNTIME = {"runtime.amp": "none", "runtime.device": "cpu", "runtime.progress": "false",
           "runtime.tensorboard": "false"}
# A head conv, a head bias, the last and the first backbone convs.
CHECKED = ("classifier.convs.0.weight", "classifier.convs.3.bias",
           "backbone.layer4.1.conv2.weight", "backbone.conv1.weight")


@pytest.fixture(scope="module")
def model():
    """A seeded tiny DeepLab-v2 whose head is sharpened, so that the passes label some pixels
    and leave others."""
    torch.manual_seed(0)
    net = deeplabv2(num_classes=C, backbone="resnet18_w16")
    with torch.no_grad():
        for conv in net.classifier.convs:
            conv.weight.mul_(30)
    return net


def make_stage(stage_class, preset, root, run_dir, name="round1", **extra):
    overrides = {**RUNTIME, **extra}
    if preset != "iast_gta5":
        overrides["pipeline"] = "[source_only, round1]"
    stages = ("source_only", "round1") if preset != "iast_gta5" else \
        ("source_only", "warmup", "round1", "round2", "round3")
    config = load_config(preset, tiny_overrides(root, stages=stages, **overrides))
    ctx = RunContext(config=config, run_dir=run_dir, seed=0, device=torch.device("cpu"))
    return stage_class(ctx, name)


def record_modes(net):
    """A list that gets, at every forward of ``net``, whether any of its modules was in train
    mode; and the hook's handle."""
    modes = []
    handle = net.register_forward_pre_hook(
        lambda module, args: modes.append(any(m.training for m in module.modules())))
    return modes, handle


def start_round(stage, model):
    """What Stage.run does before the first step, through its own ``_prepare_model``: the pass
    (model in train mode, as a fresh init_model gives it), BN affine frozen, train mode (BN in
    eval mode with bn_eval); then setup and plain SGD. Returns (student, modes of its forwards
    during the pass)."""
    student = copy.deepcopy(model).train()
    stage.init_model = lambda: copy.deepcopy(model)
    modes, handle = record_modes(student)
    label_pass = stage.before_training

    def before_training(net, resumed):
        label_pass(net, resumed)
        handle.remove()
        assert net.training, "the pass must give the model back in train mode"

    stage.before_training = before_training
    student = stage._prepare_model(None, lambda: student)
    if stage.settings.get("bn_eval"):
        assert not any(m.training for m in student.modules()
                       if isinstance(m, nn.modules.batchnorm._BatchNorm))
    stage.setup(student)
    stage.optimizers = [torch.optim.SGD(student.parameters(), lr=LR)]
    return student, modes


def upsampled_log_softmax(net, images, size):
    """log softmax of ``net``'s logits upsampled (bilinear, align_corners) to ``size``."""
    logits = net(images)
    return torch.log_softmax(F.interpolate(logits, size=tuple(size), mode="bilinear",
                                           align_corners=True), dim=1)


def ce_terms(logp, labels):
    """(sum over labelled pixels of -log p_label, their number, labelled mask)."""
    valid = labels != IGNORE
    picked = logp.gather(1, torch.where(valid, labels, 0).unsqueeze(1)).squeeze(1)
    return -(picked[valid]).sum(), valid.sum(), valid


def check_step(student, before, expected_grads, returned, expected_loss):
    """The step's loss, its gradients and its SGD update equal the expected ones."""
    torch.testing.assert_close(returned.double(), expected_loss.detach(), rtol=1e-5, atol=0)
    params = dict(student.named_parameters())
    for name in CHECKED:
        grad = params[name].grad
        assert grad is not None, f"{name} got no gradient"
        # float32 sums of a few thousand pixel terms: an element near 0 carries the rounding
        # of the largest ones, so the absolute tolerance follows the tensor's scale.
        atol = max(1e-6, 2e-5 * float(expected_grads[name].abs().max()))
        torch.testing.assert_close(grad.double(), expected_grads[name], rtol=1e-4, atol=atol,
                                   msg=lambda m, name=name: f"gradient of {name}: {m}")
        torch.testing.assert_close(params[name].detach(), before[name] - LR * grad,
                                   rtol=0, atol=1e-7)


def float64_grads(net, loss):
    loss.backward()
    params = dict(net.named_parameters())
    return {name: params[name].grad.detach().clone() for name in CHECKED}


# --- IAST rounds -------------------------------------------------------------------------------


def region_loss_float64(logp, labels, lambda_kld, lambda_ent):
    """IAST's target loss with the released normalisation (Raykoooo/IAST
    code/sseg/models/segmentors/uda_segmentor.py): CE over the labelled pixels (:132, mean with
    ignore 255), + lambda_kld * kldloss on the labelled pixels (:71-77 reg_weight_val, :143,
    :163-173: sum -(1/C) log p over them / (C * their number), the weight being N x C x H x W),
    + lambda_ent * entropyloss on the ignored pixels (:74-77 reg_weight_ignore, :137, :151-161:
    sum -p log p / (C * their number)). Returns (loss, ce)."""
    ce_sum, n_valid, valid = ce_terms(logp, labels)
    ignored = ~valid
    assert n_valid > 0 and ignored.any(), "the fixture must have labelled and ignored pixels"
    ce = ce_sum / n_valid
    kld = (-logp / C).sum(1)[valid].sum() / (C * n_valid)
    ent = (-(logp.exp() * logp)).sum(1)[ignored].sum() / (C * ignored.sum())
    return ce + lambda_kld * kld + lambda_ent * ent, ce


def target_prob_and_ce(net, images, labels):
    """(mean p of the label at labelled pixels, mean CE there) of ``net`` on a batch, float64."""
    with torch.no_grad():
        logp = upsampled_log_softmax(net, images, labels.shape[-2:])
    ce_sum, n_valid, valid = ce_terms(logp, labels)
    p = logp.exp().gather(1, torch.where(valid, labels, 0).unsqueeze(1)).squeeze(1)
    return float(p[valid].mean()), float(ce_sum / n_valid)


@pytest.mark.parametrize("source_weight, lambda_kld, lambda_ent, log_every", [
    (0.0, 0.1, 3.0, 1),    # the released recipe (docs/recipes.md §4), a logging step
    (0.6, 0.7, 0.4, 2),    # source CE added; other weights; a step without the parts
])
def test_iast_round_step_is_the_region_loss_of_the_pseudo_labelled_batch(
        fixture_root, model, tmp_path, source_weight, lambda_kld, lambda_ent, log_every):
    """One IAST round step: its loss is CE + lambda_kld * KLD (labelled) + lambda_ent * entropy
    (ignored) of the pseudo-labelled target batch, plus source_weight * source CE when > 0
    (Raykoooo/IAST uda_segmentor.py:125-126; with 0 no source image is read), its gradients those
    of that sum, and the step moves the prediction toward the pseudo labels."""
    stage = make_stage(IASTRound, "iast_gta5", fixture_root, tmp_path, **{
        "stages.round1.source_weight": source_weight, "stages.round1.lambda_kld": lambda_kld,
        "stages.round1.lambda_ent": lambda_ent, "runtime.log_every": log_every})
    student, _ = start_round(stage, model)
    assert (stage.source is None) == (source_weight == 0)
    target = next(stage.target.batches(start=0))
    source = next(stage.source.batches(start=0)) if stage.source is not None else None
    ref = copy.deepcopy(student).double()  # train mode: BN on the batch statistics, as the step
    before = {name: p.detach().clone() for name, p in student.named_parameters()}
    labels = target["label"]
    expected, _ = region_loss_float64(
        upsampled_log_softmax(ref, target["image"].double(), labels.shape[-2:]), labels,
        lambda_kld, lambda_ent)
    total = expected
    if source is not None:
        source_sum, source_n, _ = ce_terms(upsampled_log_softmax(
            ref, source["image"].double(), source["label"].shape[-2:]), source["label"])
        source_ce = source_sum / source_n
        total = expected + source_weight * source_ce
    grads = float64_grads(ref, total)
    prob_before, ce_before = target_prob_and_ce(ref, target["image"].double(), labels)

    parts = stage.step(student, 0)
    check_step(student, before, grads, parts["target_loss"], expected)
    if source is not None:
        torch.testing.assert_close(parts["source_ce"].double(), source_ce.detach(), rtol=1e-5,
                                   atol=0)
    else:
        assert "source_ce" not in parts
    assert ("target_ce" in parts) == (log_every == 1)

    # Direction: the target batch's pseudo labels become more probable, its CE falls.
    after = copy.deepcopy(student).double()
    prob_after, ce_after = target_prob_and_ce(after, target["image"].double(), labels)
    assert prob_after > prob_before and ce_after < ce_before, \
        (prob_before, prob_after, ce_before, ce_after)


def pass_images(stage):
    """The round's target set at the pass's size (what the pass reads)."""
    return build_role(stage.ctx.config, "target", resize=stage.settings["pseudo_size"])


def eval_logits(model, images, batches):
    """Float32 logits of ``model`` in eval mode on ``images`` in the given batches of indices,
    each image's logits (C, h, w) by index."""
    net = copy.deepcopy(model).eval()
    out = {}
    with torch.no_grad():
        for batch in batches:
            logits = net(torch.stack([images[i]["image"] for i in batch]))
            out.update(zip(batch, logits))
    return out


def softmax_at(logits, size):
    """float32 softmax of logits (B, C, h, w) upsampled to ``size`` (align_corners=True)."""
    return torch.softmax(F.interpolate(logits, size=tuple(size), mode="bilinear",
                                       align_corners=True), dim=1)


def read_pass_labels(stage, names):
    return torch.stack([torch.from_numpy(np.array(Image.open(pseudo_label_path(
        stage.pseudo_dir / "labels", name)))) for name in names])


def index_pairs(order, size=2):
    return [order[i:i + size] for i in range(0, len(order), size)]


def class_balanced(probs, portion, subsample):
    """Class-balanced thresholds (docs/ops.md §5; yzou2/CRST crst_seg.py:488-493 keeps every
    ``subsample``-th (ds_rate) pixel of each class per image in row-major order, :620-629
    kc_parameters): lambda_k = the floor(n_k * portion)-th largest max p of class k, 1 when
    that is 0. float32 (C,)."""
    values = [[] for _ in range(C)]
    for image in probs:
        m, a = image.max(0)
        m, a = m.reshape(-1), a.reshape(-1)
        for k in range(C):
            values[k].extend(m[a == k][::subsample].tolist())
    lambdas = torch.ones(C, dtype=torch.float32)
    for k in range(C):
        kept = math.floor(len(values[k]) * portion)
        if kept > 0:
            lambdas[k] = sorted(values[k], reverse=True)[kept - 1]
    return lambdas


@pytest.mark.parametrize("selector", ["ias", "constant", "cbst"])
def test_iast_round_label_pass_of_each_selector(fixture_root, model, tmp_path, selector):
    """The round's pass labels the target set at pseudo_size with the model in eval mode, by
    its selector's rule on the model's float32 softmax: IAS (docs/ops.md §1, the reference op in the
    pass order, with this round's alpha and the pseudo beta / gamma), a constant threshold
    (max p >= threshold) or class-balanced thresholds (docs/ops.md §5, this round's portion and
    subsample, argmax p / lambda where max >= 1). The PNG labels and the manifest say so."""
    probe = make_stage(IASTRound, "iast_gta5", fixture_root, tmp_path / "probe")
    images = pass_images(probe)
    n = len(images)
    names = [images[i]["name"] for i in range(n)]
    by_index = eval_logits(model, images, index_pairs(list(range(n))))
    probs = softmax_at(torch.stack([by_index[i] for i in range(n)]), PSEUDO_SIZE)
    m, a = probs.max(1)
    extra = {"stages.round1.selector": selector}
    if selector == "ias":
        extra.update({"stages.round1.alpha": 0.3, "pseudo.beta": 0.8, "pseudo.gamma": 6.0})
    elif selector == "constant":
        # A threshold that some pixel's max p equals exactly: labelled by >=, not by >.
        threshold = float(m.flatten().sort().values[int(0.6 * m.numel())])
        assert 0 < threshold < 1
        extra["stages.round1.threshold"] = repr(threshold)
    else:
        extra.update({"stages.round1.portion": 0.35, "stages.round1.subsample": 2})
    stage = make_stage(IASTRound, "iast_gta5", fixture_root, tmp_path / "run", **extra)
    student, modes = start_round(stage, model)
    assert modes and not any(modes), "the pass must run the model in eval mode"

    if selector == "ias":
        # Raykoooo/IAST code/sseg/workflow/sl_trainer.py:106-107 (a DistributedSampler, whose
        # order is torch.randperm(N) from seed 0, in PSEUDO_BATCH_SIZE pairs), :128 (eval mode),
        # :143 (theta from 0.9); the reference op in official mode is the IAS rule (docs/ops.md §1).
        order = torch.randperm(n, generator=torch.Generator().manual_seed(0)).tolist()
        pairs = index_pairs(order)
        pair_logits = eval_logits(model, images, pairs)
        theta, expected = None, torch.zeros(n, *PSEUDO_SIZE, dtype=torch.uint8)
        for pair in pairs:
            labels, theta, _ = ias_pseudo_label(
                torch.stack([pair_logits[i] for i in pair]), theta, alpha=0.3, beta=0.8,
                gamma=6.0, mode="official", from_logits=True, size=PSEUDO_SIZE, group=2)
            expected[pair] = labels
        torch.testing.assert_close(torch.tensor(stage.manifest["theta"], dtype=torch.float64),
                                   theta, rtol=0, atol=1e-6)
        assert [image["name"] for image in stage.manifest["images"]] == [names[i] for i in order]
    else:
        if selector == "constant":
            lambdas = torch.full((C,), threshold, dtype=torch.float32)
            assert (m == threshold).any()
        else:
            lambdas = class_balanced(probs, 0.35, 2)
            assert (lambdas < 1).sum() >= 2
        assert torch.equal(torch.tensor(stage.manifest["lambdas"], dtype=torch.float32), lambdas)
        q = probs / lambdas.view(1, C, 1, 1)  # float32 IEEE division
        best, arg = q.max(1)
        expected = torch.where(best >= 1, arg, IGNORE).to(torch.uint8)
        if selector == "constant":
            # max p >= threshold, written out: the constant selector of IAST Fig. 4.
            assert torch.equal(expected, torch.where(m >= threshold, a, IGNORE).to(torch.uint8))
    labelled = read_pass_labels(stage, names)
    assert (expected != IGNORE).any() and (expected == IGNORE).any()
    assert torch.equal(labelled, expected), f"{int((labelled != expected).sum())} pixels differ"
    assert stage.manifest["labelled_fraction"] == pytest.approx(
        float((expected != IGNORE).double().mean()), abs=1e-12)
    summary = stage.pseudo_summary()
    assert summary["selector"] == selector


# --- CBST / CRST rounds ------------------------------------------------------------------------


def pass_view_probs(teacher, image, scales=(0.9,), flip=True):
    """The class-balanced pass's probabilities of one image at the pass size (yzou2/CRST
    crst_seg.py:456-464: the image at each scale and its mirror, softmax of the logits upsampled
    to the label size, the flip's mirrored back, averaged). float32 (C, Hp, Wp)."""
    size = tuple(image.shape[-2:])
    total = 0
    with torch.no_grad():
        for scale in scales:
            scaled = F.interpolate(image[None], size=tuple(round(s * scale) for s in size),
                                   mode="bilinear", align_corners=True)
            total = total + softmax_at(teacher(scaled), size)[0]
            if flip:
                total = total + softmax_at(teacher(scaled.flip(-1)), size)[0].flip(-1)
    return total / (len(scales) * (2 if flip else 1))


def probs_on_crop(probs, box, image_size, flipped, out_size):
    """A map at the pass size seen through a training crop: the nearest rule that carries the
    pseudo label to crop pixel (i, j) (nearest upsample to the image, crop at box, resize to the
    crop size, mirror)."""
    top, left, height, width = (int(v) for v in box)
    image_h, image_w = (int(v) for v in image_size)
    map_h, map_w = probs.shape[-2:]
    out_h, out_w = out_size
    # Each nearest step takes the input pixel under the output pixel's centre:
    # floor((k + 1/2) * n_in / n_out) (docs/recipes.md §4.4).
    rows = [(2 * (top + (2 * i + 1) * height // (2 * out_h)) + 1) * map_h // (2 * image_h)
            for i in range(out_h)]
    cols = [(2 * (left + (2 * j + 1) * width // (2 * out_w)) + 1) * map_w // (2 * image_w)
            for j in range(out_w)]
    if flipped:
        cols = cols[::-1]
    return probs[:, rows][:, :, cols]


def lrent_targets(probs, lambdas, alpha):
    """CRST-LRENT soft labels and the pixels they are kept at (yzou2/CRST crst_seg.py:679-681:
    y = (p / lambda)^(1 / alpha) normalised over classes; :686-695: kept where
    sum -y log(p + 1e-32) + alpha sum y log(y + 1e-32) < sum -y log(lambda + 1e-32)), float64."""
    probs = probs.double()
    lam = lambdas.double().view(1, C, 1, 1)
    y = (probs / lam) ** (1.0 / alpha)
    y = y / y.sum(1, keepdim=True)
    regularised = (-y * torch.log(probs + 1e-32)).sum(1) + \
        alpha * (y * torch.log(y + 1e-32)).sum(1)
    selected = regularised < (-y * torch.log(lam + 1e-32)).sum(1)
    return y, selected


def cbst_expected_loss(logp, batch, loss, *, weight, alpha, teacher, stage):
    """The CBST / CRST loss of a mixed batch, float64.

    ce: yzou2/CRST crst_seg.py:824-865 reg_loss_calc with mr_weight_kld = 0: sum of -log p_y
    over every valid pixel of the batch / their number. mrkld: + w * sum over the valid pixels of
    the target crops of -(1/C) sum_c log p_c / their number (:855-861, the per-sample
    reg_weights being mr_weight_kld on target crops, :344-347, and 0 on source crops, MRSRC = 0
    at :83; docs/ops.md §5's w_eff). lrent: :867-907 reg_loss_calc_expand with mr_weight_kld = 0:
    sum -y log p / number of pixels with a target, y the one-hot source label on source crops
    and the soft label on the kept pixels of target crops (deeplab/datasets.py:948-953 zeroes
    the others)."""
    labels, is_target = batch["label"], batch["is_target"]
    ce_sum, n_valid, valid = ce_terms(logp, labels)
    if loss == "ce":
        return ce_sum / n_valid
    if loss == "mrkld":
        target_valid = valid & is_target.view(-1, 1, 1)
        assert target_valid.any() and (valid & ~target_valid).any()
        kld = (-logp / C).sum(1)[target_valid].sum()
        return ce_sum / n_valid + weight * kld / target_valid.sum()
    lambdas = torch.tensor(stage.manifest["lambdas"], dtype=torch.float32)
    images = pass_images(stage)
    total, count = 0, 0
    for b in range(labels.shape[0]):
        if not is_target[b]:
            one_sum, one_n, _ = ce_terms(logp[b:b + 1], labels[b:b + 1])
            total, count = total + one_sum, count + one_n
            continue
        full = pass_view_probs(teacher, images[int(batch["index"][b])]["image"])
        crop = probs_on_crop(full, batch["box"][b], batch["image_size"][b],
                             bool(batch["flipped"][b]), labels.shape[-2:])
        y, selected = lrent_targets(crop[None], lambdas, alpha)
        assert selected.any()
        total = total - (y * logp[b:b + 1] * selected.unsqueeze(1)).sum()
        count = count + selected.sum()
    return total / count


@pytest.mark.parametrize("loss", ["ce", "mrkld", "lrent"])
def test_class_balanced_round_step_on_a_mixed_batch(fixture_root, model, tmp_path, loss):
    """One CBST / CRST round step on a batch of source and target crops: the loss and the
    gradients of CE (CBST), CE + mrkld_weight * KLD over the target crops (CRST-MRKLD) or the
    LRENT soft-label CE (soft labels of temperature lrent_alpha from the pass's probabilities of
    the model the round started from, on the target crops), and the step moves the prediction
    toward the batch's targets. The teacher is still the starting model after the step."""
    weight, alpha = 0.3, 0.4  # not the defaults (0.01, 0.25): they must come from the settings
    stage = make_stage(CBSTRound, "crst_gta5", fixture_root, tmp_path, **{
        "stages.round1.loss": loss, "stages.round1.mrkld_weight": weight,
        "stages.round1.lrent_alpha": alpha, "stages.round1.source_portion": 0.5,
        "stages.round1.batch_size": 4})
    student, modes = start_round(stage, model)
    assert modes and not any(modes), "the pass must run the model in eval mode"
    # The model after some training: the teacher must stay the model the round started from.
    with torch.no_grad():
        generator = torch.Generator().manual_seed(1)
        for name in ("classifier.convs.1.weight", "backbone.layer4.0.conv1.weight"):
            param = dict(student.named_parameters())[name]
            param.add_(0.05 * param.std() * torch.randn(param.shape, generator=generator))
    # The first batch with source and target crops, with LRENT mirrored and unmirrored target
    # crops (its index, as the step reads it).
    for iteration, batch in enumerate(stage.mixed.batches(start=0, stop=8)):
        is_target = batch["is_target"]
        flips = set(batch["flipped"][is_target].tolist()) if loss == "lrent" else {False, True}
        if is_target.any() and not is_target.all() and flips == {False, True}:
            break
    else:
        pytest.fail("no such batch in the fixture's first 8 batches")
    # The flags say which crops are target crops (Cityscapes names), not the other way round.
    assert batch["is_target"].tolist() == [name.startswith("aachen") for name in batch["name"]]

    teacher = copy.deepcopy(model).eval()
    ref = copy.deepcopy(student).double()  # BN in eval mode (bn_eval), as the step's
    before = {name: p.detach().clone() for name, p in student.named_parameters()}
    logp = upsampled_log_softmax(ref, batch["image"].double(), batch["label"].shape[-2:])
    expected = cbst_expected_loss(logp, batch, loss, weight=weight, alpha=alpha,
                                  teacher=teacher, stage=stage)
    grads = float64_grads(ref, expected)

    parts = stage.step(student, iteration)
    check_step(student, before, grads, parts["loss"], expected)
    torch.testing.assert_close(parts["target_crops"], batch["is_target"].float().mean())

    # Direction: the batch's loss falls after the step (teacher targets held fixed).
    after = copy.deepcopy(student).double()
    with torch.no_grad():
        logp_after = upsampled_log_softmax(after, batch["image"].double(),
                                           batch["label"].shape[-2:])
        loss_after = cbst_expected_loss(logp_after, batch, loss, weight=weight, alpha=alpha,
                                        teacher=teacher, stage=stage)
    assert float(loss_after) < float(expected.detach())
    if loss != "lrent":  # hard labels: they become more probable, their CE falls
        images = batch["image"].double()
        prob_before, ce_before = target_prob_and_ce(ref, images, batch["label"])
        prob_after, ce_after = target_prob_and_ce(after, images, batch["label"])
        assert prob_after > prob_before and ce_after < ce_before, \
            (prob_before, prob_after, ce_before, ce_after)
    if stage.teacher_model is not None:
        assert stage.teacher_model is not student
        probe = batch["image"][:1]
        with torch.no_grad():
            torch.testing.assert_close(stage.teacher_model(probe), teacher(probe), rtol=0, atol=0)
