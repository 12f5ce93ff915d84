"""One step of source-only and of each warm-up variant, checked against the losses and gradients
computed here from the papers' and the released code's formulas (plain float64 torch, none of
fastst's losses), and the direction each update moves its loss.

The stages' real ``setup`` runs on a stream of one fixed batch (no data files); their optimizers
are then replaced by plain SGD over the same parameters so that ``p_new = p - lr * grad``.

Released formulas used (file:line):
* segmentation loss: CE with ignore 255 on logits bilinearly upsampled to the label size
  (Raykoooo/IAST code/sseg/models/losses/bce_loss.py:23-28, code/sseg/models/predictor/
  base_predictor.py:51 align_corners=True);
* ``output`` warm-up, LS-GAN: D on the target softmax, segmenter loss
  ``WEIGHT * MSE(D(softmax(t)), 0)``, D loss ``(MSE(D(s), 0) + MSE(D(t), 1)) / 2`` on detached
  softmax maps (Raykoooo/IAST code/sseg/models/segmentors/uda_segmentor.py:83-122,
  code/sseg/models/losses/mse_loss.py:7-9, code/config/gtav2cityscapes_v100_1/run_task/
  warmup_at.yaml:13-16);
* ``multilevel``: ``ce(main) + lambda_seg * ce(aux)``, ``lambda_adv_target1 * adv(aux) +
  lambda_adv_target2 * adv(main)``, BCE with logits, D frozen during the segmenter's update
  (wasidennis/AdaptSegNet train_gta2cityscapes_multi.py:252-253, 261-262, 285-291, 305, 334,
  342-385; aux classifier on layer3: model/deeplab_multi.py:136-137, 169-181);
* ``advent``: D on the weighted self-information ``-p log2(p + 1e-30) / log2(C)``, BCE
  (valeoai/ADVENT advent/utils/func.py:8-12, 48-52; advent/domain_adaptation/train_UDA.py:
  115-165).
"""
import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from fastst.config import load_config
from fastst.methods.context import RunContext
from fastst.methods.source_only import SourceOnly
from fastst.methods.warmup import Warmup
from fastst.models import deeplabv2

C = 4                       # classes of the tiny model
B, H, W = 2, 32, 64         # batch and crop: the discriminator needs >= 32 rows (5 stride-2 convs)
IGNORE = 255
N_SOURCE, N_TARGET = 10, 7  # dataset sizes the fake streams report (an epoch counts the source)
# Non-default weights, so that a weight not passed through, or two swapped, changes the result.
LAMBDA_ADV, LAMBDA_SEG_AUX, LAMBDA_ADV_AUX = 0.4, 0.3, 0.15
# Each published method's own GAN loss (what gan=auto must give): IAST's warm-up MSE
# (warmup_at.yaml:16 LOSS: "MSELoss"), AdaptSegNet's GAN='Vanilla' = BCEWithLogitsLoss
# (train_gta2cityscapes_multi.py:54, 252-253), ADVENT's bce_loss (advent/utils/func.py:8-12).
OWN_GAN = {"output": "lsgan", "multilevel": "bce", "advent": "bce"}
MODEL_PARAMS = ("classifier.convs.0.weight", "classifier.convs.3.bias", "backbone.conv1.weight",
                "backbone.layer3.0.conv1.weight", "backbone.layer4.1.conv2.weight")
AUX_PARAMS = ("convs.0.weight", "convs.2.bias")
D_PARAMS = ("conv1.weight", "conv3.weight", "classifier.weight", "classifier.bias")


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class _OneBatch:
    """Stands in for a BatchStream: ``dataset`` of ``size`` items, every batch the same."""

    def __init__(self, batch, size):
        self.batch, self.dataset = batch, range(size)

    def batches(self, start=0):
        return itertools.repeat(self.batch)


def _batches(all_ignored=False):
    g = torch.Generator().manual_seed(5)
    source = torch.randn(B, 3, H, W, generator=g)
    target = torch.randn(B, 3, H, W, generator=g) * 0.8 + 0.3
    labels = torch.randint(0, C, (B, H, W), generator=g)
    labels[:, :5] = IGNORE                       # ignored pixels in the labels
    labels[0, 10:20, 5:30] = IGNORE
    if all_ignored:
        labels[:] = IGNORE
    return {"image": source, "label": labels}, {"image": target}


def _model():
    torch.manual_seed(0)
    model = deeplabv2(num_classes=C, backbone="resnet18_w16")
    with torch.no_grad():  # a less flat head than N(0, 0.01), so the maps are not uniform
        for conv in model.classifier.convs:
            conv.weight.mul_(10.0)
    return model


def _stage(cls, name, overrides, tmp_path, source_batch, target_batch=None):
    """``cls`` for stage ``name`` of iast_gta5 with its real ``setup`` on one-batch streams and
    the model prepared as ``Stage.run`` does; optimizers replaced by SGD(lr=1) over the same
    parameters (an update is then minus the gradient). Returns (stage, model, the module
    ``step`` gets)."""
    config = load_config("iast_gta5", [
        "runtime.amp=none", "runtime.device=cpu", "runtime.progress=false",
        "runtime.tensorboard=false", "model.backbone=resnet18_w16", "model.pretrained=null",
        f"stages.{name}.batch_size={B}", *overrides])
    ctx = RunContext(config=config, run_dir=tmp_path, seed=config["seed"],
                     device=torch.device("cpu"))
    stage = cls(ctx, name)
    streams = {"source": _OneBatch(source_batch, N_SOURCE),
               "target": _OneBatch(target_batch, N_TARGET)}
    stage.stream = lambda role, batch_size, **_: streams[role]
    model = _model()
    model.freeze_bn_affine(stage.settings["freeze_bn_affine"])
    model.train()
    stage.setup(model)
    assert stage.per_epoch == N_SOURCE // B  # an epoch is counted on the source set
    stage.optimizers = [torch.optim.SGD([{"params": group["params"]}
                                         for group in optimizer.param_groups], lr=1.0)
                        for optimizer in stage.optimizers]
    return stage, model, stage.parallel_model(model)


# --- the formulas, written out ----------------------------------------------------------------

def _up(logits):
    return F.interpolate(logits, size=(H, W), mode="bilinear", align_corners=True)


def _ce(logits, labels):
    """Mean -log softmax(up(logits))_y over the pixels whose label is not 255 (0 if none)."""
    log_p = torch.log_softmax(_up(logits), dim=1)
    valid = labels != IGNORE
    picked = log_p.gather(1, labels.masked_fill(~valid, 0).unsqueeze(1)).squeeze(1)
    return -(picked * valid).sum() / valid.sum().clamp(min=1)


def _d_input(logits, variant):
    p = torch.softmax(_up(logits), dim=1)
    if variant == "advent":  # ADVENT advent/utils/func.py:48-52
        return -p * torch.log2(p + 1e-30) / math.log2(C)
    return p


def _gan(outputs, label, gan):
    if gan == "lsgan":  # nn.MSELoss (mse_loss.py:7-9)
        return ((outputs - label) ** 2).mean()
    # BCE with logits: -(y log s(x) + (1 - y) log(1 - s(x))) = softplus(x) - y x
    return (F.softplus(outputs) - label * outputs).mean()


def _levels(model, aux, images):
    """[main logits] or [main, aux logits]: AdaptSegNet's layer5 on layer3, layer6 on layer4."""
    net = model.backbone
    layer3 = net.layer3(net.layer2(net.layer1(net.maxpool(net.relu(net.bn1(net.conv1(images)))))))
    main = model.classifier(net.layer4(layer3))
    return [main] if aux is None else [main, aux(layer3)]


def _snapshot(stage, model):
    """float64 copies of the model, the auxiliary classifier and the discriminators."""
    aux = None if stage.net is None else copy.deepcopy(stage.net.aux_classifier).double()
    return (copy.deepcopy(model).double(), aux,
            [copy.deepcopy(d).double() for d in stage.discriminators])


def _segmenter_objective(model, aux, discriminators, source, target, variant, gan):
    """(ces, advs, weighted CE, weighted adversarial loss, source logits, target maps)."""
    seg_w = [1.0, LAMBDA_SEG_AUX][:len(discriminators)]
    adv_w = [LAMBDA_ADV, LAMBDA_ADV_AUX][:len(discriminators)]
    source_logits = _levels(model, aux, source["image"].double())
    ces = [_ce(logits, source["label"]) for logits in source_logits]
    target_maps = [_d_input(logits, variant)
                   for logits in _levels(model, aux, target["image"].double())]
    # The segmenter wants D to call its target maps source (label 0).
    advs = [_gan(d(maps), 0.0, gan) for d, maps in zip(discriminators, target_maps)]
    return (ces, advs, sum(w * ce for w, ce in zip(seg_w, ces)),
            sum(w * adv for w, adv in zip(adv_w, advs)), source_logits, target_maps)


def _d_objective(discriminators, source_maps, target_maps, gan):
    """Per level (GAN(D(source), 0) + GAN(D(target), 1)) / 2 on detached maps."""
    return [(_gan(d(s.detach()), 0.0, gan) + _gan(d(t.detach()), 1.0, gan)) / 2
            for d, s, t in zip(discriminators, source_maps, target_maps)]


def _close(actual, expected, what, rtol=1e-4, atol=2e-5):
    """float32 ``actual`` against float64 ``expected``: each element within rtol of itself or
    within atol times the tensor's largest magnitude (float32 rounding in a deep backbone is
    relative to the whole gradient, not to its near-zero elements)."""
    expected = expected.detach().double()
    scale = max(float(expected.abs().max()), 1e-30)
    torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=atol * scale,
                               msg=lambda m: f"{what}: {m}")


def _params(module, names):
    found = dict(module.named_parameters())
    return [found[name] for name in names]


def _stale_gradients(stage):
    """Leave gradients in every optimized parameter, as a previous iteration would: ``step``
    must clear them (the released trainer's zero_grad, code/sseg/workflow/trainer.py:230, 238)."""
    for optimizer in stage.optimizers:
        for group in optimizer.param_groups:
            for param in group["params"]:
                param.grad = torch.full_like(param, 7.0)


# --- source-only ------------------------------------------------------------------------------

def test_source_only_step_is_ce_on_upsampled_logits(tmp_path):
    source, _ = _batches()
    stage, model, train_model = _stage(SourceOnly, "source_only", [], tmp_path, source)
    reference = copy.deepcopy(model).double()
    before = [p.detach().clone() for p in _params(model, MODEL_PARAMS)]

    loss = _ce(reference(source["image"].double()), source["label"])
    expected = torch.autograd.grad(loss, _params(reference, MODEL_PARAMS))
    _stale_gradients(stage)
    parts = stage.step(train_model, 0)

    assert set(parts) == {"source_ce"}
    _close(parts["source_ce"], loss, "source_ce", rtol=1e-5, atol=0)
    for name, param, grad, old in zip(MODEL_PARAMS, _params(model, MODEL_PARAMS), expected,
                                      before):
        _close(param.grad, grad, f"grad of {name}")
        _close(param.detach() - old, -grad, f"SGD(lr=1) update of {name}")


# --- warm-up ----------------------------------------------------------------------------------

CASES = [("output", "auto"), ("output", "bce"), ("multilevel", "auto"), ("advent", "auto"),
         ("advent", "lsgan")]


def _warmup(tmp_path, variant, gan, *, all_ignored=False):
    source, target = _batches(all_ignored)
    overrides = [f"stages.warmup.variant={variant}", f"stages.warmup.gan={gan}",
                 f"stages.warmup.lambda_adv={LAMBDA_ADV}",
                 f"stages.warmup.lambda_seg_aux={LAMBDA_SEG_AUX}",
                 f"stages.warmup.lambda_adv_aux={LAMBDA_ADV_AUX}", "stages.warmup.d_ndf=8"]
    stage, model, train_model = _stage(Warmup, "warmup", overrides, tmp_path, source, target)
    with torch.no_grad():  # a steeper D, so its gradient is a sizeable part of the segmenter's
        for discriminator in stage.discriminators:
            for name in ("conv1", "conv2", "conv3", "conv4", "classifier"):
                getattr(discriminator, name).weight.mul_(4.0)
    return stage, model, train_model, source, target


@pytest.mark.parametrize("variant,gan", CASES)
def test_warmup_step_matches_the_released_losses_and_gradients(tmp_path, variant, gan):
    stage, model, train_model, source, target = _warmup(tmp_path, variant, gan)
    kind = OWN_GAN[variant] if gan == "auto" else gan
    levels = 2 if variant == "multilevel" else 1
    assert len(stage.discriminators) == levels
    ref_model, ref_aux, ref_ds = _snapshot(stage, model)

    # The modules and parameters whose gradients are compared, here and in the stage.
    seg_modules = [(model, ref_model, MODEL_PARAMS)]
    if levels == 2:
        seg_modules.append((stage.net.aux_classifier, ref_aux, AUX_PARAMS))
    seg_actual = [p for live, _, names in seg_modules for p in _params(live, names)]
    seg_ref = [p for _, ref, names in seg_modules for p in _params(ref, names)]
    seg_names = [n for _, _, names in seg_modules for n in names]
    d_actual = [p for d in stage.discriminators for p in _params(d, D_PARAMS)]
    d_ref = [p for d in ref_ds for p in _params(d, D_PARAMS)]
    seg_before = [p.detach().clone() for p in seg_actual]
    d_before = [p.detach().clone() for p in d_actual]

    # Expected: the segmenter's loss with D fixed, then D's on the detached maps.
    ces, advs, ce_total, adv_total, source_logits, target_maps = _segmenter_objective(
        ref_model, ref_aux, ref_ds, source, target, variant, kind)
    adv_grads = torch.autograd.grad(adv_total, seg_ref, retain_graph=True)
    seg_grads = torch.autograd.grad(ce_total + adv_total, seg_ref)
    source_maps = [_d_input(logits.detach(), variant) for logits in source_logits]
    d_losses = _d_objective(ref_ds, source_maps, target_maps, kind)
    d_grads = torch.autograd.grad(sum(d_losses), d_ref)
    # The adversarial part is a sizeable share of the segmenter's gradient on every compared
    # parameter, so a wrong sign or weight of it cannot hide in the tolerance.
    for name, adv, total in zip(seg_names, adv_grads, seg_grads):
        assert adv.abs().max() > 0.02 * total.abs().max(), name

    # D's parameters must get gradients from D's loss only: D is frozen while the segmenter's
    # adversarial loss back-propagates through it (train_gta2cityscapes_multi.py:285-291).
    d_calls = {id(p): 0 for d in stage.discriminators for p in d.parameters()}
    hooks = [p.register_hook(lambda g, key=id(p): d_calls.__setitem__(key, d_calls[key] + 1))
             for d in stage.discriminators for p in d.parameters()]
    _stale_gradients(stage)
    parts = stage.step(train_model, 0)
    for hook in hooks:
        hook.remove()
    assert set(d_calls.values()) == {1}, "a discriminator got gradients outside its own loss"

    suffixes = ["", "_aux"][:levels]
    assert set(parts) == {f"{key}{s}" for key in ("source_ce", "adv", "discriminator")
                          for s in suffixes}
    for level, s in enumerate(suffixes):
        _close(parts[f"source_ce{s}"], ces[level], f"source_ce{s}", rtol=1e-5, atol=0)
        _close(parts[f"adv{s}"], advs[level], f"adv{s}", rtol=1e-5, atol=0)
        _close(parts[f"discriminator{s}"], d_losses[level], f"discriminator{s}", rtol=1e-5,
               atol=0)
    # The model's gradient is the segmenter's alone (D's loss does not reach it), and SGD(lr=1)
    # moved every parameter by exactly that; the same for the discriminators.
    for name, param, grad, old in zip(seg_names, seg_actual, seg_grads, seg_before):
        _close(param.grad, grad, f"grad of {name}")
        _close(param.detach() - old, -grad, f"update of {name}")
    d_names = [f"D{level}.{name}" for level in range(levels) for name in D_PARAMS]
    for name, param, grad, old in zip(d_names, d_actual, d_grads, d_before):
        _close(param.grad, grad, f"grad of {name}")
        _close(param.detach() - old, -grad, f"update of {name}")


@pytest.mark.parametrize("variant", ["output", "multilevel", "advent"])
def test_warmup_updates_move_their_losses_down(tmp_path, variant):
    """With the source CE off (every label 255), one segmenter step against the fixed D lowers
    the adversarial loss on the batch; one D step lowers D's loss on the batch's maps. The
    rates are set for a 1 % first-order drop, and both drops are close to that prediction
    lr * |grad|^2."""
    stage, model, train_model, source, target = _warmup(tmp_path, variant, "auto",
                                                        all_ignored=True)
    kind = OWN_GAN[variant]
    ref_model, ref_aux, ref_ds = _snapshot(stage, model)
    ces, _, _, adv_before, source_logits, target_maps = _segmenter_objective(
        ref_model, ref_aux, ref_ds, source, target, variant, kind)
    source_maps = [_d_input(logits.detach(), variant) for logits in source_logits]
    d_before = sum(_d_objective(ref_ds, source_maps, target_maps, kind))
    assert all(float(ce.detach()) == 0.0 for ce in ces)
    trained = [p for module in (ref_model, ref_aux) if module is not None
               for p in module.parameters() if p.requires_grad]
    rates = []
    for loss, params in ((adv_before, trained), (d_before, [p for d in ref_ds
                                                            for p in d.parameters()])):
        squared = sum(float((g ** 2).sum())
                      for g in torch.autograd.grad(loss, params, retain_graph=True))
        rates.append(0.01 * float(loss.detach()) / squared)
    for optimizer, rate in zip(stage.optimizers, rates):
        for group in optimizer.param_groups:
            group["lr"] = rate

    stage.step(train_model, 0)
    predicted = [rate * sum(float((p.grad.double() ** 2).sum()) for group in optimizer.param_groups
                            for p in group["params"] if p.grad is not None)
                 for optimizer, rate in zip(stage.optimizers, rates)]
    new_model, new_aux, new_ds = _snapshot(stage, model)
    with torch.no_grad():
        adv_after = _segmenter_objective(new_model, new_aux, ref_ds, source, target, variant,
                                         kind)[3]
        d_after = sum(_d_objective(new_ds, source_maps, target_maps, kind))

    drops = [float((adv_before - adv_after).detach()), float((d_before - d_after).detach())]
    for what, drop, first_order in zip(("adversarial", "discriminator"), drops, predicted):
        assert 0.8 * first_order < drop < 1.2 * first_order, (what, drop, first_order)
