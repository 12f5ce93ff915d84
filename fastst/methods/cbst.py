"""A CBST / CRST self-training round (docs/recipes.md §5; Zou et al., released code), the base of TPLD.

Before its first iteration the round labels the whole target train set with the model it starts
from (its teacher: the previous stage's last checkpoint), in eval mode, through
``fastst.methods.labelling.cbst_pass``: probabilities of the ``pseudo_scales`` inputs and their
flips at ``pseudo_size``, class-balanced thresholds at this round's ``portion`` (streamed, with
``subsample``), labels ``argmax p / lambda`` where ``max >= 1``. Labels land in
DIR/<round>/pseudo/labels/, thresholds, densities and per-image confidences in
DIR/<round>/pseudo/manifest.json.

Training then reads a mixed list, shuffled: every target image with its pseudo label, cropped
with rare-class mining (``mine_p``: a crop centred on a class that covers less than
``mine_portion`` of the predicted pixels), and ``floor(source_portion * |source|)`` source images
drawn with ``source_seed``. One epoch is ``floor(|mixed| / batch_size)`` iterations; SGD with
momentum at a constant lr (head 10x), BN layers in eval mode, as the released recipe. The loss
(``loss`` key): "ce" (CBST), "mrkld" (CRST-MRKLD, ``mrkld_weight``) or "lrent" (CRST-LRENT: soft
labels of temperature ``lrent_alpha``, from the teacher's probabilities described next).

Teacher targets (LRENT here, also as TPLD phase 1's base; TPLD phase 2's easy crops with
``soft_targets: pass``, fastst.methods.tpld) are calibrated by the pass's thresholds lambda, so
they come from the pass's
own probabilities, as in the released CRST code (``val`` stores the 0.9-scale + flip mean softmax
of every image, ``label_selection`` makes LRENT's soft labels from it, and its data set scales,
crops and flips them with the image) and in TPLD (Eq. 3: the easy images' full pseudo labels are
made, like Eq. 1's, from the predictions the thresholds came from). Instead of storing 19 maps per
image (160 MB at 1024x2048), the teacher (the model that labelled, frozen) reruns the pass's
protocol on the image of each target item of a batch (``pass_probabilities`` at ``pseudo_size``,
``pseudo_scales`` and flips, in the pass's precision), and ``pass_map_on_crop`` gives every crop
pixel the pixel of that map its pseudo label came from (``CropRecorder`` records each crop's box
and flip). A target is then the pass's target for that pixel: the confident part of phase 2's
targets is the pass's label map, and q >= 1 selects the round's ``portion`` of each class as on
the full images.
Running the teacher on the augmented crop instead (random scale, flip, brightness/contrast, less
context) is not the same: on the demo's target train set (``bench/tpld_teacher_targets.py``, a
demo_tpld phase-1 model, portion 0.3, two epochs of crops) it made 35.9 % of the crop pixels
confident against 28.1 % for the pass's map on the same crops (30.0 % on the full images), 32-49 %
per class, and its confident set overlapped the pass's with IoU 0.55; averaging the crop with its
mirror image (32.1 %, IoU 0.59) or running the pass's protocol on the crop's region (21.9 %, IoU
0.59: less context) does not close the gap. The cost: the teacher sees the whole image at the
pass's scales for each target item (two views at 0.9 of 1024x2048: about 6.5 times a 512x1024
crop).
"""
from __future__ import annotations

import copy
from typing import Any, Dict, Mapping, Optional, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from fastst.config_checks import (COMMON_STAGE_DEFAULTS, check_bool, check_choice, check_int,
                                  check_real, check_scales, check_size)
from fastst.data.mining import MiningSizedCrop, mining_train_transform
from fastst.data.mixed import ITEM_KEYS, MixedDomainDataset, sample_source_indices
from fastst.data.pseudo_label import PseudoLabelDataset
from fastst.data.transforms import (BrightnessContrast, Compose, HorizontalFlip, RandomSizedCrop,
                                   nearest_indices)
from fastst.methods.datasets import build_role, crop_arguments, crop_transform
from fastst.methods.labelling import (LABEL_DIR, cbst_pass, pass_probabilities, read_cbst_manifest,
                                      require_finished_pass)
from fastst.methods.st_losses import cbst_loss, lrent_loss, lrent_soft_labels
from fastst.methods.trainer import Stage

__all__ = ["ClassBalancedRound", "CBSTRound", "PSEUDO_DIR", "CropRecorder", "CropGeometry",
           "GEOMETRY_KEYS", "pass_map_on_crop"]

PSEUDO_DIR = "pseudo"
GEOMETRY_KEYS = ("index", "box", "image_size", "flipped")


class _RecordsBox:
    """Mixin of a RandomSizedCrop: remembers the box and the image size of its last crop."""

    box: Optional[Sequence[int]] = None
    image_size: Optional[Sequence[int]] = None

    def corner(self, label, crop_h: int, crop_w: int, generator):
        top, left = super().corner(label, crop_h, crop_w, generator)
        self.box, self.image_size = (top, left, crop_h, crop_w), tuple(label.shape[-2:])
        return top, left


class _RecordingRandomSizedCrop(_RecordsBox, RandomSizedCrop):
    pass


class _RecordingMiningSizedCrop(_RecordsBox, MiningSizedCrop):
    pass


class _RecordingFlip(HorizontalFlip):
    """HorizontalFlip that remembers whether it mirrored its last image."""

    flipped = False

    def __call__(self, image, label, generator):
        out = super().__call__(image, label, generator)
        self.flipped = out[0] is not image
        return out


_RECORDING = {RandomSizedCrop: _RecordingRandomSizedCrop,
              MiningSizedCrop: _RecordingMiningSizedCrop, HorizontalFlip: _RecordingFlip}


class CropRecorder(Compose):
    """A training transform (a ``Compose`` of a ``RandomSizedCrop`` or ``MiningSizedCrop``, then
    only ``HorizontalFlip`` and ``BrightnessContrast``, as ``train_transform`` makes it) that also
    records where its last crop came from: same images and labels from the same generator. A
    member that would move pixels otherwise is refused (TypeError). ``geometry()`` ->
    {"box": int64 (4,) (top, left, height, width) in the image it was given, "image_size": int64
    (2,) that image's (H, W), "flipped": bool 0-dim}."""

    def __init__(self, transform: Compose) -> None:
        members = []
        for member in getattr(transform, "transforms", ()):
            if type(member) in _RECORDING:
                member = copy.copy(member)
                member.__class__ = _RECORDING[type(member)]
            members.append(member)
        if not members or not isinstance(members[0], _RecordsBox) or not all(
                isinstance(m, (HorizontalFlip, BrightnessContrast)) for m in members[1:]):
            raise TypeError(f"CropRecorder needs a Compose of a RandomSizedCrop or "
                            f"MiningSizedCrop, then only HorizontalFlip and BrightnessContrast "
                            f"(the training transforms); got {transform!r}")
        super().__init__(members)
        self.crop = members[0]
        self.flips = [m for m in members if isinstance(m, _RecordingFlip)]

    def geometry(self) -> Dict[str, torch.Tensor]:
        flipped = sum(flip.flipped for flip in self.flips) % 2 == 1
        return {"box": torch.tensor(self.crop.box),
                "image_size": torch.tensor(self.crop.image_size), "flipped": torch.tensor(flipped)}


class CropGeometry(Dataset):
    """The items of ``dataset`` (a fastst data set whose transform is a ``CropRecorder``) with
    where each crop came from: the keys of ``CropRecorder.geometry`` and "index" (int64 0-dim,
    the item's index in ``dataset``). ``set_epoch`` is passed on."""

    def __init__(self, dataset) -> None:
        if not isinstance(getattr(dataset, "transform", None), CropRecorder):
            raise TypeError("CropGeometry needs a fastst data set whose transform is a "
                            "CropRecorder")
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        item = self.dataset[index]  # runs the transform: its geometry is this item's
        return {**item, "index": torch.tensor(index % len(self)),
                **self.dataset.transform.geometry()}

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)


def pass_map_on_crop(probs: torch.Tensor, box: Sequence[int], image_size: Sequence[int],
                     flipped: bool, out_size: Sequence[int]) -> torch.Tensor:
    """A pass's map (C, Hp, Wp) (at the pseudo-label size) seen through a training crop of
    ``out_size`` (Hc, Wc) taken at ``box`` = (top, left, h, w) of an image of ``image_size``
    (H, W), mirrored when ``flipped``: crop pixel (i, j) takes map pixel (n(top + n(i; Hc, h);
    H, Hp), n(left + n(j; Wc, w); W, Wp)) with n(i; out, in) = floor((i + 0.5) in / out) (column
    Wc - 1 - j when flipped), the nearest rule by which the pseudo label reaches it
    (PseudoLabelDataset, then the crop's resize: ``resize_label``). Returns (C, Hc, Wc), probs'
    dtype and device."""
    top, left, height, width = (int(v) for v in box)
    image_h, image_w = (int(v) for v in image_size)
    out_h, out_w = (int(v) for v in out_size)
    map_h, map_w = probs.shape[-2:]
    device = probs.device
    rows = nearest_indices(image_h, map_h, device)[top + nearest_indices(out_h, height, device)]
    cols = nearest_indices(image_w, map_w, device)[left + nearest_indices(out_w, width, device)]
    if flipped:
        cols = cols.flip(0)
    return probs.index_select(-2, rows).index_select(-1, cols)


OPTIMIZERS = ("adam", "sgd")
LR_SCHEDULES = ("cosine", "constant")
LOSSES = ("ce", "mrkld", "lrent")
# The keys of the rounds that train on the mixed source + target list (CBST/CRST, TPLD phase 1):
# floor(source_portion * |source|) source images drawn with source_seed, rare-class mining.
MIXED_DEFAULTS = {"source_portion": 0.03, "source_seed": 4, "mine_p": 0.8,
                  "mine_portion": 1.0e-3, "mrkld_weight": 0.01}
# loss: "ce" (CBST), "mrkld" (CRST-MRKLD), "lrent" (CRST-LRENT, soft labels of temperature
# lrent_alpha from the round's teacher); in tpld_phase1 the base method TPLD is built on.
LOSS_DEFAULTS = {"loss": "mrkld", "lrent_alpha": 0.25}


def validate_mixed(config, prefix: str) -> None:
    """ConfigError naming the first invalid key of MIXED_DEFAULTS or LOSS_DEFAULTS."""
    check_real(config, f"{prefix}.source_portion", 0, 1)
    check_int(config, f"{prefix}.source_seed", 0)
    check_real(config, f"{prefix}.mine_p", 0, 1)
    check_real(config, f"{prefix}.mine_portion", 0, 1)
    check_real(config, f"{prefix}.mrkld_weight", 0)
    check_choice(config, f"{prefix}.loss", LOSSES)
    check_real(config, f"{prefix}.lrent_alpha", 0, low_open=True)


class ClassBalancedRound(Stage):
    """What the CBST/CRST rounds and both TPLD phases share: the class-balanced pseudo-label
    pass before training, the class thresholds on the device, and the teacher model."""

    # docs/recipes.md §5-§6: SGD with a constant lr, BN in eval mode, pseudo labels from the
    # 0.9-scale input and its flip at pseudo_size with class-balanced thresholds at `portion`.
    DEFAULTS = {**COMMON_STAGE_DEFAULTS, "epochs": 2, "t_max": 2, "batch_size": 2,
                "lr": 5.0e-5, "backbone_lr_mult": 1.0, "head_lr_mult": 10.0,
                "optimizer": "sgd", "momentum": 0.9, "lr_schedule": "constant",
                "bn_eval": True, "portion": 0.2, "pseudo_size": [1024, 2048],
                "pseudo_scales": [0.9], "pseudo_flip": True, "subsample": 4}

    @classmethod
    def validate(cls, config, prefix: str) -> None:
        """ConfigError naming the first invalid class-balanced key of stage ``prefix``."""
        check_choice(config, f"{prefix}.optimizer", OPTIMIZERS)
        check_real(config, f"{prefix}.momentum", 0, 1)
        check_choice(config, f"{prefix}.lr_schedule", LR_SCHEDULES)
        check_bool(config, f"{prefix}.bn_eval")
        check_real(config, f"{prefix}.portion", 0, 1)
        check_size(config, f"{prefix}.pseudo_size")
        check_scales(config, f"{prefix}.pseudo_scales")
        check_bool(config, f"{prefix}.pseudo_flip")
        check_int(config, f"{prefix}.subsample", 1)

    manifest: Optional[Dict[str, Any]] = None
    teacher_model: Optional[nn.Module] = None
    teacher_images: Optional[Dataset] = None
    device_lambdas: Optional[torch.Tensor] = None

    @property
    def pseudo_dir(self):
        return self.dir / PSEUDO_DIR

    def vote(self) -> Optional[Dict[str, Any]]:
        """The ``tpld_vote`` arguments of the pass (None: confident labels only)."""
        return None

    def before_training(self, model: nn.Module, resumed: bool) -> None:
        if resumed:
            self.manifest = require_finished_pass(read_cbst_manifest(self.pseudo_dir),
                                                  self.pseudo_dir, self.checkpoint_path)
            return
        self.manifest = self.label_pass(model, self.pseudo_dir)

    def pass_images(self):
        """The target train set as the pass sees it: resized to ``pseudo_size``, no transform."""
        return build_role(self.ctx.config, "target", resize=self.settings["pseudo_size"])

    def label_pass(self, model: nn.Module, out_dir) -> Dict[str, Any]:
        """The round's class-balanced pass with ``model`` into ``out_dir`` (labels/ and
        manifest.json); also what ``python -m fastst.pseudo`` runs for this stage."""
        settings, pseudo = self.settings, self.ctx.config["pseudo"]
        images = self.pass_images()
        return cbst_pass(model, images, out_dir, self.ctx, portion=settings["portion"],
                         scales=tuple(settings["pseudo_scales"]), flip=settings["pseudo_flip"],
                         subsample=settings["subsample"], vote=self.vote(),
                         batch_size=pseudo["batch_size"], colour=pseudo["colour"],
                         mine_portion=settings.get("mine_portion", 1e-3), tag=self.name)

    def restore_finished(self, state) -> None:
        self.manifest = read_cbst_manifest(self.pseudo_dir)

    def lambdas(self) -> torch.Tensor:
        """The round's class thresholds, float32 (C,) on the device (made once, on the first
        training step, not copied to the device every step)."""
        if self.device_lambdas is None:
            self.device_lambdas = torch.tensor(self.manifest["lambdas"], dtype=torch.float32,
                                               device=self.ctx.device)
        return self.device_lambdas

    def teacher(self) -> nn.Module:
        """The model the round started from and labelled with, frozen, in eval mode, on the
        device (rebuilt from the previous checkpoint, so that a resumed round has the same
        teacher); also keeps the pass's view of the target set for ``teacher_probs``."""
        teacher = self.init_model()
        teacher.to(self.ctx.device, memory_format=self.ctx.memory_format)
        self.teacher_images = self.pass_images()
        return teacher.eval().requires_grad_(False)

    def teacher_probs(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """The pass's probabilities on the crops of ``batch`` (a ``CropGeometry`` batch; items
        with ``is_target`` false, if the key is there, are skipped): for each target item the
        teacher's ``pass_probabilities`` on its image as the pass saw it, through
        ``pass_map_on_crop``. float32 (B, C, Hc, Wc) on the device, zero for skipped items."""
        ctx, settings = self.ctx, self.settings
        size = tuple(batch["image"].shape[-2:])
        count = batch["image"].shape[0]
        wanted = batch["is_target"].tolist() if "is_target" in batch else [True] * count
        rows = [b for b in range(count) if wanted[b]]
        probs = torch.zeros(count, self.ctx.config["num_classes"], *size, device=ctx.device)
        if not rows:
            return probs
        images = torch.stack([self.teacher_images[int(batch["index"][b])]["image"] for b in rows])
        full = pass_probabilities(self.teacher_model, ctx.images_to_device(images), ctx,
                                  scales=settings["pseudo_scales"], flip=settings["pseudo_flip"])
        for row, b in enumerate(rows):
            probs[b] = pass_map_on_crop(full[row], batch["box"][b], batch["image_size"][b],
                                        bool(batch["flipped"][b]), size)
        return probs

    def pseudo_summary(self) -> Optional[Dict[str, Any]]:
        manifest = self.manifest
        if manifest is None:
            return None
        keys = ("labelled_fraction", "labelled_fraction_confident", "density",
                "density_confident", "lambdas", "mine_classes", "seconds")
        return {key: manifest[key] for key in keys}

    def extra_state(self) -> Dict[str, Any]:
        return {"lambdas": torch.tensor(self.manifest["lambdas"], dtype=torch.float32)}


class CBSTRound(ClassBalancedRound):
    method = "cbst"
    DEFAULTS = {**ClassBalancedRound.DEFAULTS, **MIXED_DEFAULTS, **LOSS_DEFAULTS}

    @classmethod
    def validate(cls, config, prefix: str) -> None:
        super().validate(config, prefix)
        validate_mixed(config, prefix)

    @property
    def uses_teacher(self) -> bool:
        """Whether the loss takes the teacher's soft labels (LRENT)."""
        return self.settings.get("loss") == "lrent"

    def mixed_stream(self):
        """The stream of mixed source + target batches (items carry ``is_target``, and with a
        teacher the ``CropGeometry`` keys)."""
        config, settings = self.ctx.config, self.settings
        target_images = build_role(config, "target")
        transform = mining_train_transform(mine_classes=self.manifest["mine_classes"],
                                           mine_p=settings["mine_p"],
                                           **crop_arguments(config, "target"))
        source_transform = crop_transform(config, "source")
        if self.uses_teacher:
            transform, source_transform = CropRecorder(transform), CropRecorder(source_transform)
        labelled = PseudoLabelDataset(target_images, self.pseudo_dir / LABEL_DIR,
                                      transform=transform, seed=self.seed_of("target", "augment"))
        source = build_role(config, "source", transform=source_transform,
                            seed=self.seed_of("source", "augment"))
        indices = sample_source_indices(len(source), settings["source_portion"],
                                        settings["source_seed"])
        keys = ITEM_KEYS
        if self.uses_teacher:
            source, labelled, keys = CropGeometry(source), CropGeometry(labelled), \
                ITEM_KEYS + GEOMETRY_KEYS
        mixed = MixedDomainDataset(source, labelled, indices, keys=keys)
        self.set_iterations(len(mixed))
        return self.stream("mixed", settings["batch_size"], dataset=mixed)

    def setup(self, model: nn.Module) -> None:
        self.mixed = self.mixed_stream()
        self.batches = None
        self.optimizers = [self.model_optimizer(model)]
        self.teacher_model = self.teacher() if self.uses_teacher else None

    def loss(self, logits: torch.Tensor, batch: Mapping[str, Any], labels: torch.Tensor,
             is_target: torch.Tensor) -> torch.Tensor:
        """The round's loss on the batch's ``logits``; ``batch`` as the stream gives it."""
        settings = self.settings
        if settings["loss"] == "lrent":
            soft, selected = lrent_soft_labels(self.teacher_probs(batch), self.lambdas(),
                                               settings["lrent_alpha"])
            return lrent_loss(logits, labels, is_target, soft, selected)
        weight = settings["mrkld_weight"] if settings["loss"] == "mrkld" else 0.0
        return cbst_loss(logits, labels, is_target, mrkld_weight=weight)

    def step(self, model: nn.Module, iteration: int) -> Dict[str, torch.Tensor]:
        ctx = self.ctx
        if self.batches is None:
            self.batches = self.mixed.batches(start=iteration)
        batch = next(self.batches)
        images = ctx.images_to_device(batch["image"])
        labels = batch["label"].to(ctx.device, non_blocking=True)
        is_target = batch["is_target"].to(ctx.device, non_blocking=True)
        optimizer = self.optimizers[0]
        optimizer.zero_grad(set_to_none=True)
        with ctx.autocast():
            logits = model(images)
        loss = self.loss(logits, batch, labels, is_target)
        loss.backward()
        self.finite_guard(loss=loss)
        optimizer.step()
        if self.log_images_now:
            self.visual = {"image": images, "logits": logits, "label": labels}
        return {"loss": loss.detach(), "target_crops": is_target.float().mean()}
