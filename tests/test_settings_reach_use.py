"""Every stage setting and every ``pseudo`` setting reaches the place where it is used.

Table-driven: for every preset, the last stage of each method in its pipeline gets every key of
``STAGE_DEFAULTS[method]`` (and the run every key of ``BASE_DEFAULTS["pseudo"]``) overridden to a
value that differs from the preset's and from the default (``CANDIDATES``), on tiny fixtures
(32x64 images: 10 GTA5 or SYNTHIA source, 6 Cityscapes target, 12 synthetic). The stage then runs
for real (``Stage.run``: its pseudo-label pass, ``setup`` and 3 iterations) with recorders on the
functions it calls, and each key is read back where it acts:

* the optimizer's groups (backbone ``lr * backbone_lr_mult``, head ``lr * head_lr_mult``,
  discriminator ``d_lr``/``d_betas``, SGD's momentum), the schedule in the checkpoint (period
  ``t_max * iterations_per_epoch``, the cosine floor or none), the iterations run (``epochs``),
  the batches the model sees (``batch_size``), the BN layers' mode and affine parameters, the
  snapshots taken every ``select_every`` iterations;
* the manifest of the pass (IAS: alpha, size and every ``pseudo`` key; class-balanced: portion,
  size, scales, flip, subsample, mine portion, vote; the constant and class-balanced selectors of
  an IAST round), the colour PNGs, the visiting order;
* the arguments of the loss calls (region loss weights, the adversarial and auxiliary weights
  as the gradient that reaches each loss, the bootstrapping beta, LRENT's alpha, the MRKLD
  weight, TPLD's gamma), the discriminators' shape, the mixed list's source sample, the
  easy/hard split, the rare-class mining probability, the evaluation protocol;
* ``iterations`` through the dry run (``fastst.methods.schedule.stage_lengths``, the trainer's own
  arithmetic; tests/test_stage_lengths.py checks that the real run agrees with it).

A key that is validated but read nowhere has no observation equal to its override, and fails.
"""
import json
import math
from collections import defaultdict
from pathlib import Path

import pytest
import torch

import fastst.evaluate
from fastst import pipeline, train
from fastst.checkpoint import load_checkpoint
from fastst.config import BASE_DEFAULTS, STAGE_DEFAULTS, available_presets, load_config
from fastst.methods import cbst as cbst_module
from fastst.methods import iast as iast_module
from fastst.methods import stage_class
from fastst.methods import tpld as tpld_module
from fastst.methods import warmup as warmup_module
from fastst.methods.context import RunContext
from fastst.methods.datasets import build_role
from fastst.models import deeplabv2
from fastst.methods.schedule import stage_lengths
from fastst.recipe import set_sizes
from test_class_sets import make_synthia_scenes
from test_pseudo import one_thread  # noqa: F401
from test_train import make_fixtures, restore_threads  # noqa: F401

PRESETS = ("cbst_gta5", "crst_gta5", "demo", "demo_semi", "demo_tpld", "iast_gta5",
           "iast_semi_cityscapes", "iast_synthia", "tpld_gta5", "tpld_synthia")
SYNTHETIC = "{num_train: 12, num_val: 2, height: 32, width: 64}"

# Non-default values of every stage key: the first candidate that differs from the preset's value
# and from the method's default is used (the first that differs from the preset's where none
# differs from both). All fit the 32x64 fixtures: batch 3, easy portion 0.5 (3 easy, 3 hard).
CANDIDATES = {
    # every method
    "epochs": (3, 4), "t_max": (2.5, 3.5), "batch_size": (3,), "lr": (3e-4, 4e-4),
    "backbone_lr_mult": (0.3, 0.4), "head_lr_mult": (4.0, 5.0),
    "freeze_bn_affine": (True, False), "iterations": (5, 6), "iterations_per_epoch": (1, 2),
    "select_every": (2, 3), "eval_protocol": ("crst", "iast_ms"),
    # warmup (and tpld_phase2: lambda_adv, d_lr, d_ndf, d_first_kernel)
    "d_lr": (3e-5, 4e-5), "lambda_adv": (0.02, 0.03), "d_ndf": (8, 12), "d_first_kernel": (2, 1),
    "variant": ("multilevel",), "gan": ("lsgan", "bce"), "lambda_adv_aux": (0.003, 0.004),
    "lambda_seg_aux": (0.2, 0.3),
    # iast (and the class-balanced methods: portion, pseudo_size, subsample)
    "alpha": (0.35, 0.4), "pseudo_size": ([16, 32], [24, 48]), "lambda_kld": (0.15, 0.2),
    "lambda_ent": (2.5, 2.0), "source_weight": (0.5, 0.6), "selector": ("constant",),
    "threshold": (0.8, 0.7), "portion": (0.6, 0.65), "subsample": (2, 3),
    # cbst, tpld_phase1, tpld_phase2
    "optimizer": ("adam", "sgd"), "momentum": (0.7, 0.8), "lr_schedule": ("cosine", "constant"),
    "bn_eval": (False, True), "pseudo_scales": ([1.0], [0.75]), "pseudo_flip": (False, True),
    "source_portion": (0.45, 0.4), "source_seed": (11, 12), "mine_p": (0.5, 0.6),
    "mine_portion": (0.05, 0.06), "mrkld_weight": (0.07, 0.08), "loss": ("lrent",),
    "lrent_alpha": (0.4, 0.5), "vote_window": (5, 3), "vote_weight": (0.55, 0.6),
    "vote_iterations": (2, 1), "beta": (0.85, 0.8), "easy_portion": (0.5, 0.6),
    "gamma": (1.5, 3.0), "d_betas": ([0.8, 0.95], [0.7, 0.9]), "soft_targets": ("pass",),
}
PSEUDO_CANDIDATES = {"mode": ("paper",), "group": (1,), "beta": (0.8, 0.85), "gamma": (5.0, 6.0),
                     "batch_size": (3,), "order_seed": (3, 4), "colour": (True, False)}
# pseudo keys only the IAS pass reads (IAST rounds); the class-balanced passes take batch_size
# and colour alone (fastst.methods.labelling.cbst_pass has no EMA, order or instance).
IAS_ONLY = ("mode", "group", "beta", "gamma", "order_seed")
# pseudo.group of a second IAS pass in the official mode (3 images a batch: one group).
OFFICIAL_GROUP = 3


def test_the_table_names_every_setting():
    assert available_presets() == sorted(PRESETS), "a new preset needs its row here"
    stage_keys = {key for defaults in STAGE_DEFAULTS.values() for key in defaults}
    assert set(CANDIDATES) == stage_keys
    assert set(PSEUDO_CANDIDATES) == set(BASE_DEFAULTS["pseudo"])
    assert set(OBSERVERS) == set(STAGE_DEFAULTS)


def _text(value):
    """A value as an override's YAML text."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return json.dumps(value)


def _pick(candidates, current, default):
    """The first candidate unlike the preset's value and the default (else unlike the first)."""
    for value in candidates:
        if value != current and value != default:
            return value
    return next(value for value in candidates if value != current)


def data_overrides(preset, root):
    """The preset's data on the fixtures of its data sets, and a quiet CPU run."""
    raw = load_config(preset)
    places = {"synthetic": root / "synthetic", "gta5": root / "GTA5",
              "synthia": root / "SYNTHIA", "cityscapes": root / "cityscapes"}
    overrides = {"model.backbone": "resnet18_w16", "model.pretrained": "null",
                 "data.crop_size": "[32, 64]", "data.val.input_size": "null",
                 "runtime.device": "cpu", "runtime.amp": "none", "runtime.progress": "false",
                 "runtime.tensorboard": "false", "runtime.workers": 0, "runtime.threads": 1,
                 "runtime.write_threads": 2, "runtime.log_every": 1,
                 "runtime.checkpoint_every": 1000, "runtime.image_every": 1000}
    for role in ("source", "target", "val"):
        spec = raw["data"][role]
        overrides[f"data.{role}.root"] = places[spec["dataset"]]
        overrides[f"data.{role}.list_file"] = "null"
        if role != "val":
            overrides[f"data.{role}.crop_height_range"] = "[24, 32]"
            if spec["subset"] is not None:  # half of 6 (Cityscapes) or 12 (synthetic) images
                subset = {**spec["subset"], "fraction": 0.5}
                overrides[f"data.{role}.subset"] = _text(subset)
    if "synthetic" in {raw["data"][role]["dataset"] for role in ("source", "target", "val")}:
        overrides["data.synthetic"] = SYNTHETIC
    return [f"{key}={value}" for key, value in overrides.items()]


def new_values(config, name):
    """{key: its override} for every key of stage ``name``."""
    settings = config["stages"][name]
    defaults = STAGE_DEFAULTS[settings["method"]]
    return {key: _pick(CANDIDATES[key], settings[key], defaults[key]) for key in defaults}


def new_pseudo(config):
    """{key: its override} for every pseudo key."""
    return {key: _pick(values, config["pseudo"][key], BASE_DEFAULTS["pseudo"][key])
            for key, values in PSEUDO_CANDIDATES.items()}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("presets")
    make_fixtures(root, n_source=10, n_target=6, n_val=2)
    make_synthia_scenes(root / "SYNTHIA", n=10)
    return root


# --- running a stage with recorders -------------------------------------------------------

class Run:
    """Stage ``name`` of ``load_config(preset, overrides)`` run for real (``Stage.run``, ``go``)
    from a fixed tiny model, with the functions named by ``tap`` recorded (arguments, and the
    gradient that reaches their output: the weight the step's total loss gives them), the batch
    sizes and BN modes the model sees in ``step`` and the iterations of its snapshots."""

    def __init__(self, preset, overrides, name, run_dir, monkeypatch):
        self.preset, self.overrides = preset, list(overrides)
        self.config = load_config(preset, overrides)
        self.name, self.run_dir = name, Path(run_dir)
        self.monkeypatch = monkeypatch
        self.calls = defaultdict(list)
        self.in_step = False
        self.batch_sizes, self.bn_training, self.snapshots = set(), set(), []
        self.steps = 0

    def tap(self, module, attr):
        real = getattr(module, attr)
        calls = self.calls[attr]

        def recorder(*args, **kwargs):
            out = real(*args, **kwargs)
            entry = {"args": args, "kwargs": kwargs, "grad": None}
            calls.append(entry)
            loss = out[0] if isinstance(out, tuple) else out
            if isinstance(loss, torch.Tensor) and loss.requires_grad and loss.dim() == 0:
                loss.register_hook(lambda grad: entry.__setitem__("grad", float(grad)))
            return out

        self.monkeypatch.setattr(module, attr, recorder)

    def fresh_model(self):
        torch.manual_seed(0)
        return deeplabv2(num_classes=self.config["num_classes"], backbone="resnet18_w16")

    def go(self):
        ctx = RunContext(config=self.config, run_dir=self.run_dir, seed=0,
                         device=torch.device("cpu"))
        self.ctx = ctx
        stage = stage_class(self.config["stages"][self.name]["method"])(ctx, self.name)
        built = []

        def init_model():  # the first model is the one trained; later ones are teachers
            model = self.fresh_model()
            if not built:
                model.backbone.bn1.register_forward_pre_hook(self._bn_hook)
            built.append(model)
            return model

        real_step, real_snapshot = stage.step, stage._snapshot

        def step(model, iteration):
            self.in_step, self.steps = True, self.steps + 1
            try:
                return real_step(model, iteration)
            finally:
                self.in_step = False

        def snapshot(model, done):
            self.snapshots.append(done)
            return real_snapshot(model, done)

        stage.step, stage._snapshot = step, snapshot
        stage.snapshots, stage.select_metric = {"best"}, lambda model: 0.5
        self.model = stage.run(init_model)
        self.stage = stage
        self.state = load_checkpoint(stage.checkpoint_path)
        return self

    def _bn_hook(self, module, inputs):
        if self.in_step:
            self.batch_sizes.add(int(inputs[0].shape[0]))
            self.bn_training.add(module.training)

    def groups(self, index=0):
        return {group.get("name", "discriminator"): group
                for group in self.stage.optimizers[index].param_groups}

    def stage_with(self, pseudo=(), **changes):
        """A stage object of a config that differs from the run's by ``changes`` of the stage
        (and the ``pseudo`` items)."""
        overrides = [f"stages.{self.name}.{key}={_text(value)}" for key, value in changes.items()]
        overrides += [f"pseudo.{key}={_text(value)}" for key, value in dict(pseudo).items()]
        config = load_config(self.preset, self.overrides + overrides)
        ctx = RunContext(config=config, run_dir=self.run_dir / "variant", seed=0,
                         device=torch.device("cpu"))
        return stage_class(config["stages"][self.name]["method"])(ctx, self.name)


def common_observations(run, new):
    """(observed, expected) of the keys every method has."""
    state = run.state
    groups = run.groups()
    total = new["epochs"] * new["iterations_per_epoch"]
    period = new["t_max"] * new["iterations_per_epoch"]
    floor = None if new.get("lr_schedule") == "constant" else \
        run.config["optim"]["eta_min_ratio"] * new["lr"]
    protocols = []

    class Confusion:
        def miou(self):
            return 0.5

    def fake_evaluate(model, dataset, **kwargs):
        protocols.append(kwargs.get("protocol"))
        return Confusion()

    run.monkeypatch.setattr(fastst.evaluate, "evaluate", fake_evaluate)
    pipeline.evaluate_miou(run.ctx, run.model, None, run.name)
    dry = run.stage_with(iterations=new["iterations"])
    dry_total = stage_lengths(dry.ctx.config, run.name, set_sizes(dry.ctx.config))["total"]
    return {
        "epochs": ((run.steps, state["iteration"]), (total, total)),
        "iterations_per_epoch": (state["scheduler"]["period"], period),
        "t_max": (state["scheduler"]["period"], period),
        "batch_size": (run.batch_sizes, {new["batch_size"]}),
        # The head's base rate, and the cosine floor eta_min_ratio * lr of every group.
        "lr": ((groups["head"]["initial_lr"] / new["head_lr_mult"], state["scheduler"]["floor"]),
               (new["lr"], floor)),
        "backbone_lr_mult": (groups["backbone"]["initial_lr"],
                             new["lr"] * new["backbone_lr_mult"]),
        "head_lr_mult": (groups["head"]["initial_lr"], new["lr"] * new["head_lr_mult"]),
        "freeze_bn_affine": (not run.model.backbone.bn1.weight.requires_grad,
                             new["freeze_bn_affine"]),
        "select_every": (run.snapshots, [k for k in range(1, total + 1)
                                         if k % new["select_every"] == 0]),
        "eval_protocol": (protocols, [new["eval_protocol"]]),
        "iterations": (dry_total, new["iterations"]),
    }


def _discriminator_shape(discriminator):
    return discriminator.conv1.out_channels, discriminator.conv1.kernel_size[0]


def observe_source_only(run, new):
    run.go()
    return common_observations(run, new)


def observe_warmup(run, new):
    for attr in ("cross_entropy", "adversarial_loss", "discriminator_loss",
                 "discriminator_input"):
        run.tap(warmup_module, attr)
    run.go()
    stage, calls = run.stage, run.calls
    # Per step: the CE of each level (main, aux), then the adversarial loss of each level.
    ce = [c["grad"] for c in calls["cross_entropy"]]
    adv = [c["grad"] for c in calls["adversarial_loss"]]
    gans = {c["args"][2] for c in calls["adversarial_loss"]} | \
        {c["args"][3] for c in calls["discriminator_loss"]}
    d_group = run.groups(1)["discriminator"]
    shapes = {_discriminator_shape(d) for d in stage.discriminators}
    return {**common_observations(run, new),
            "d_lr": (d_group["initial_lr"], new["d_lr"]),
            "lambda_adv": (set(adv[0::2]), {new["lambda_adv"]}),
            "lambda_adv_aux": (set(adv[1::2]), {new["lambda_adv_aux"]}),
            "lambda_seg_aux": ((set(ce[0::2]), set(ce[1::2])), ({1.0}, {new["lambda_seg_aux"]})),
            "d_ndf": ({shape[0] for shape in shapes}, {new["d_ndf"]}),
            "d_first_kernel": ({shape[1] for shape in shapes}, {new["d_first_kernel"]}),
            "variant": (({c["args"][2] for c in calls["discriminator_input"]},
                         len(stage.discriminators)), ({"multilevel"}, 2)),
            "gan": (gans, {new["gan"]})}


def observe_iast(run, new):
    run.tap(iast_module, "region_loss")
    run.tap(iast_module, "cross_entropy")
    run.go()
    manifest = run.stage.manifest
    settings = manifest["settings"]
    kwargs = [c["kwargs"] for c in run.calls["region_loss"]]
    # The other selectors' passes (IAST Table 5) with this round's settings, and IAS's official
    # mode with groups of OFFICIAL_GROUP images (pseudo.mode=paper needs pseudo.group=1).
    passes = {}
    for selector in ("constant", "cbst"):
        stage = run.stage_with(selector=selector)
        passes[selector] = stage.label_pass(run.fresh_model(), run.run_dir / selector)
    stage = run.stage_with(pseudo={"mode": "official", "group": OFFICIAL_GROUP})
    run.official_pass = stage.label_pass(run.fresh_model(), run.run_dir / "official")

    def kind(pass_manifest):
        if pass_manifest["format"] != "fastst-cbst-pseudo-v1":
            return "ias"
        return "constant" if pass_manifest["settings"]["threshold"] is not None else "cbst"

    return {**common_observations(run, new),
            "alpha": (settings["alpha"], new["alpha"]),
            "pseudo_size": (settings["size"], new["pseudo_size"]),
            "lambda_kld": ({k["lambda_kld"] for k in kwargs}, {new["lambda_kld"]}),
            "lambda_ent": ({k["lambda_ent"] for k in kwargs}, {new["lambda_ent"]}),
            "source_weight": ({c["grad"] for c in run.calls["cross_entropy"]},
                              {new["source_weight"]}),
            "selector": ((kind(manifest), kind(passes["constant"]), kind(passes["cbst"])),
                         ("ias", "constant", "cbst")),
            "threshold": (passes["constant"]["settings"]["threshold"], new["threshold"]),
            "portion": (passes["cbst"]["settings"]["portion"], new["portion"]),
            "subsample": (passes["cbst"]["settings"]["subsample"], new["subsample"])}


def _class_balanced(run, new):
    """(observed, expected) of the keys the class-balanced methods share."""
    settings = run.stage.manifest["settings"]
    optimizer = type(run.stage.optimizers[0]).__name__.lower()
    if optimizer == "sgd":
        momentum = {g["momentum"] for g in run.groups().values()}
    else:  # the run trains with Adam: the momentum of the same stage under SGD
        sgd = run.stage_with(optimizer="sgd").model_optimizer(run.fresh_model())
        momentum = {group["momentum"] for group in sgd.param_groups}
    floor = run.state["scheduler"]["floor"]
    return {**common_observations(run, new),
            "optimizer": (optimizer, new["optimizer"]),
            "momentum": (momentum, {new["momentum"]}),
            "lr_schedule": ("constant" if floor is None else "cosine", new["lr_schedule"]),
            "bn_eval": (run.bn_training == {False}, new["bn_eval"]),
            "portion": (settings["portion"], new["portion"]),
            "pseudo_size": (settings["size"], new["pseudo_size"]),
            "pseudo_scales": (list(settings["scales"]), new["pseudo_scales"]),
            "pseudo_flip": (settings["flip"], new["pseudo_flip"]),
            "subsample": (settings["subsample"], new["subsample"])}


def _mixed(run, new, module, mrkld_loss):
    """The keys of the mixed-list rounds (CBST/CRST, TPLD phase 1); the run trains LRENT."""
    stage = run.stage
    manifest = stage.manifest
    num_source = len(build_role(run.config, "source"))
    order = torch.randperm(num_source, generator=torch.Generator().manual_seed(new["source_seed"]))
    sample = sorted(order[:math.floor(new["source_portion"] * num_source)].tolist())
    mining = [c["kwargs"]["mine_p"] for c in run.calls["mining_train_transform"]]
    alphas = {c["args"][2] for c in run.calls["lrent_soft_labels"]}
    # The same stage with the MRKLD loss: the weight reaches its loss call.
    other = run.stage_with(loss="mrkld")
    other.manifest = manifest
    run.tap(module, mrkld_loss)
    generator = torch.Generator().manual_seed(0)
    classes = run.config["num_classes"]
    other.loss(torch.randn(2, classes, 4, 8, generator=generator), {},
               torch.randint(0, classes, (2, 32, 64), generator=generator),
               torch.tensor([False, True]))
    (call,) = run.calls[mrkld_loss]
    return {**_class_balanced(run, new),
            "source_portion": (stage.mixed.dataset.source_indices, sample),
            "source_seed": (stage.mixed.dataset.source_indices, sample),
            "mine_p": (set(mining), {new["mine_p"]}),
            "mine_portion": (manifest["settings"]["mine_portion"], new["mine_portion"]),
            "loss": ("lrent" if run.calls["lrent_soft_labels"] else "not lrent", new["loss"]),
            "lrent_alpha": (alphas, {new["lrent_alpha"]}),
            "mrkld_weight": (call["kwargs"]["mrkld_weight"], new["mrkld_weight"])}, call


def observe_cbst(run, new):
    run.tap(cbst_module, "mining_train_transform")
    run.tap(cbst_module, "lrent_soft_labels")
    run.go()
    observed, _ = _mixed(run, new, cbst_module, "cbst_loss")
    return observed


def observe_tpld_phase1(run, new):
    run.tap(cbst_module, "mining_train_transform")
    run.tap(tpld_module, "lrent_soft_labels")
    run.tap(tpld_module, "tpld_phase1_lrent_loss")
    run.go()
    observed, mrkld_call = _mixed(run, new, tpld_module, "tpld_phase1_loss")
    betas = {c["kwargs"]["beta"] for c in run.calls["tpld_phase1_lrent_loss"]}
    vote = run.stage.manifest["settings"]["vote"]
    return {**observed,
            "vote_window": (vote["window"], new["vote_window"]),
            "vote_weight": (vote["weight"], new["vote_weight"]),
            "vote_iterations": (vote["iterations"], new["vote_iterations"]),
            "beta": ((betas, mrkld_call["kwargs"]["beta"]), ({new["beta"]}, new["beta"]))}


def observe_tpld_phase2(run, new):
    for attr in ("bootstrap_loss", "tpld_soft_targets", "gan_loss"):
        run.tap(tpld_module, attr)
    run.go()
    stage = run.stage
    images = stage.manifest["images"]
    # split_easy_hard by hand: the floor(easy_portion * N) most confident images (ties: index).
    ranked = sorted(range(len(images)), key=lambda i: (-images[i]["confidence"], i))
    easy = [images[i]["name"] for i in sorted(ranked[:math.floor(new["easy_portion"]
                                                                 * len(images))])]
    split = json.loads((stage.dir / "split.json").read_text())
    # Per step: the adversarial loss of the hard crops, then D's losses on easy and hard.
    adv = [c["grad"] for c in run.calls["gan_loss"][0::3]]
    d_group = run.groups(1)["discriminator"]
    return {**_class_balanced(run, new),
            "beta": ({c["kwargs"]["beta"] for c in run.calls["bootstrap_loss"]}, {new["beta"]}),
            "easy_portion": ((split["easy_portion"], split["easy"]), (new["easy_portion"], easy)),
            "gamma": ({c["kwargs"]["gamma"] for c in run.calls["tpld_soft_targets"]},
                      {new["gamma"]}),
            "soft_targets": ({"pass" if "soft_target" in c["kwargs"] else "crop"
                              for c in run.calls["bootstrap_loss"]}, {new["soft_targets"]}),
            "lambda_adv": (set(adv), {new["lambda_adv"]}),
            "d_lr": (d_group["initial_lr"], new["d_lr"]),
            "d_betas": (list(d_group["betas"]), new["d_betas"]),
            "d_ndf": (_discriminator_shape(stage.discriminator)[0], new["d_ndf"]),
            "d_first_kernel": (_discriminator_shape(stage.discriminator)[1],
                               new["d_first_kernel"])}


OBSERVERS = {"source_only": observe_source_only, "warmup": observe_warmup, "iast": observe_iast,
             "cbst": observe_cbst, "tpld_phase1": observe_tpld_phase1,
             "tpld_phase2": observe_tpld_phase2}


def pseudo_observations(runs, new):
    """(observed, expected) of the pseudo keys, from the passes of the runs (IAS or
    class-balanced); the IAS-only keys where the preset has an IAST round."""
    observed = {}
    ias = [run for run in runs if run.config["stages"][run.name]["method"] == "iast"]
    for run in runs:
        if run.config["stages"][run.name]["method"] in ("source_only", "warmup"):
            continue
        settings = run.stage.manifest["settings"]
        labels = run.stage.pseudo_dir / "labels"
        colour = len(list(labels.glob("*_pseudo_color.png"))) == len(run.stage.manifest["images"])
        observed[("batch_size", run.name)] = (settings["batch_size"], new["batch_size"])
        observed[("colour", run.name)] = (colour, new["colour"])
    for run in ias:
        manifest = run.stage.manifest
        settings = manifest["settings"]
        for key in IAS_ONLY:
            observed[(key, run.name)] = (settings[key], new[key])
        official = run.official_pass["settings"]
        observed[("group", run.name + " official")] = ((official["mode"], official["group"]),
                                                      ("official", OFFICIAL_GROUP))
        # The pass visits the target set in the order of its order_seed.
        target = build_role(run.config, "target")
        names = [target[i]["name"] for i in torch.randperm(
            len(target), generator=torch.Generator().manual_seed(new["order_seed"])).tolist()]
        observed[("order_seed", run.name + " order")] = (
            [image["name"] for image in manifest["images"]], names)
    return observed


def _same(observed, expected):
    """Equal, numbers to 1e-6 (a weight read back as a float32 gradient), inside sets, lists
    and tuples too."""
    if isinstance(observed, (set, frozenset)) and isinstance(expected, (set, frozenset)):
        return len(observed) == len(expected) and all(
            any(_same(a, b) for b in expected) for a in observed)
    if isinstance(observed, (list, tuple)) and isinstance(expected, (list, tuple)):
        return len(observed) == len(expected) and all(
            _same(a, b) for a, b in zip(observed, expected))
    numbers = (int, float)
    if isinstance(observed, numbers) and isinstance(expected, numbers) \
            and not isinstance(observed, bool) and not isinstance(expected, bool):
        return math.isclose(observed, expected, rel_tol=1e-6)
    return observed == expected


@pytest.mark.parametrize("preset", PRESETS)
def test_every_stage_and_pseudo_setting_reaches_its_use(preset, root, tmp_path, monkeypatch):
    base = load_config(preset, data_overrides(preset, root))
    chosen = {}  # method -> the last stage of that method in the pipeline
    for name in base["pipeline"]:
        chosen[base["stages"][name]["method"]] = name
    pseudo = new_pseudo(base)
    stage_values = {name: new_values(base, name) for name in chosen.values()}
    overrides = data_overrides(preset, root) + \
        [f"pseudo.{key}={_text(value)}" for key, value in pseudo.items()]
    for method, name in chosen.items():
        # The run trains an IAS round (the other selectors label in observe_iast) and lengths
        # from epochs (iterations is read through the dry run).
        run_values = {**stage_values[name], "iterations": None}
        if method == "iast":
            run_values["selector"] = "ias"
        overrides += [f"stages.{name}.{key}={_text(value)}" for key, value in run_values.items()]
    failures, runs = [], []
    for method, name in chosen.items():
        run = Run(preset, overrides, name, tmp_path / name, monkeypatch)
        observed = OBSERVERS[method](run, stage_values[name])
        runs.append(run)
        missing = set(STAGE_DEFAULTS[method]) - set(observed)
        failures += [f"stages.{name}.{key}: not observed" for key in sorted(missing)]
        for key, (seen, expected) in sorted(observed.items()):
            if not _same(seen, expected):
                failures.append(f"stages.{name}.{key}={_text(stage_values[name].get(key))}: "
                                f"observed {seen!r}, expected {expected!r}")
    observed = pseudo_observations(runs, pseudo)
    labelling = [run.name for run in runs
                 if run.config["stages"][run.name]["method"] not in ("source_only", "warmup")]
    has_ias = any(method == "iast" for method in chosen)
    for key in PSEUDO_CANDIDATES:
        if key in IAS_ONLY and not has_ias:
            continue  # no IAS pass in this preset: nothing reads it (see IAS_ONLY)
        if not any(k == key for k, _ in observed):
            failures.append(f"pseudo.{key}: not observed (stages {labelling})")
    for (key, where), (seen, expected) in sorted(observed.items()):
        if not _same(seen, expected):
            failures.append(f"pseudo.{key}={_text(pseudo[key])} in {where}: observed {seen!r}, "
                            f"expected {expected!r}")
    assert not failures, f"{preset}:\n" + "\n".join(failures)
