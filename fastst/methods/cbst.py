"""A CBST / CRST self-training round (SPEC 5; Zou et al., released code), the base of TPLD.

Before its first iteration the round labels the whole target train set with the model it starts
from (its teacher: the previous stage's last checkpoint), in eval mode, through
``fastst.cbst_pass.cbst_pass``: probabilities of the ``pseudo_scales`` inputs and their flips at
``pseudo_size``, class-balanced thresholds at this round's ``portion`` (streamed, with
``subsample``), labels ``argmax p / lambda`` where ``max >= 1``. Labels land in
DIR/<round>/pseudo/labels/, thresholds, densities and per-image confidences in
DIR/<round>/pseudo/manifest.json.

Training then reads a mixed list, shuffled: every target image with its pseudo label, cropped
with rare-class mining (``mine_p``: a crop centred on a class that covers less than
``mine_portion`` of the predicted pixels), and ``floor(source_portion * |source|)`` source images
drawn with ``source_seed``. One epoch is ``floor(|mixed| / batch_size)`` iterations; SGD with
momentum at a constant lr (head 10x), BN layers in eval mode, as the released recipe. The loss
(``loss`` key): "ce" (CBST), "mrkld" (CRST-MRKLD, ``mrkld_weight``) or "lrent" (CRST-LRENT: soft
labels of temperature ``lrent_alpha`` from the teacher run on each target crop, instead of the
released code's stored 19-channel maps, 160 MB per Cityscapes image).
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import nn

from fastst.cbst_pass import cbst_pass, read_cbst_manifest
from fastst.data.mining import mining_train_transform
from fastst.data.mixed import MixedDomainDataset, sample_source_indices
from fastst.data.pseudo_label import PseudoLabelDataset
from fastst.inference import predict_probs
from fastst.methods.datasets import build_role, crop_arguments, crop_transform
from fastst.methods.st_losses import cbst_loss, lrent_loss, lrent_soft_labels
from fastst.methods.trainer import Stage
from fastst.pseudo import LABEL_DIR, require_finished_pass

__all__ = ["ClassBalancedRound", "CBSTRound", "PSEUDO_DIR"]

PSEUDO_DIR = "pseudo"


class ClassBalancedRound(Stage):
    """What the CBST/CRST rounds and both TPLD phases share: the class-balanced pseudo-label
    pass before training, the class thresholds on the device, and the teacher model."""

    manifest: Optional[Dict[str, Any]] = None
    teacher_model: Optional[nn.Module] = None
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

    def label_pass(self, model: nn.Module, out_dir) -> Dict[str, Any]:
        """The round's class-balanced pass with ``model`` into ``out_dir`` (labels/ and
        manifest.json); also what ``python -m fastst.pseudo`` runs for this stage."""
        settings, pseudo = self.settings, self.ctx.config["pseudo"]
        images = build_role(self.ctx.config, "target", resize=settings["pseudo_size"])
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
        """The model the round started from, frozen, in eval mode, on the device (rebuilt from
        the previous checkpoint, so that a resumed round has the same teacher)."""
        teacher = self.init_model()
        teacher.to(self.ctx.device, memory_format=self.ctx.memory_format)
        return teacher.eval().requires_grad_(False)

    def teacher_probs(self, images: torch.Tensor) -> torch.Tensor:
        """Softmax of the teacher on ``images`` (B, 3, H, W) at their size: float32 (B, C, H, W)."""
        return predict_probs(self.teacher_model, images, autocast_dtype=self.ctx.amp_dtype)

    def teacher_logits(self, images: torch.Tensor) -> torch.Tensor:
        """The teacher's logits on ``images`` (B, 3, H, W), at its output stride (B, C, h, w), no
        gradient (the fused losses upsample them on the fly)."""
        with torch.no_grad(), self.ctx.autocast():
            return self.teacher_model(images)

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

    def mixed_stream(self):
        """The stream of mixed source + target batches (items carry ``is_target``)."""
        config, settings = self.ctx.config, self.settings
        target_images = build_role(config, "target")
        transform = mining_train_transform(mine_classes=self.manifest["mine_classes"],
                                           mine_p=settings["mine_p"],
                                           **crop_arguments(config, "target"))
        labelled = PseudoLabelDataset(target_images, self.pseudo_dir / LABEL_DIR,
                                      transform=transform, seed=self.seed_of("target", "augment"))
        source = build_role(config, "source", transform=crop_transform(config, "source"),
                            seed=self.seed_of("source", "augment"))
        indices = sample_source_indices(len(source), settings["source_portion"],
                                        settings["source_seed"])
        mixed = MixedDomainDataset(source, labelled, indices)
        self.set_iterations(len(mixed))
        return self.stream("mixed", settings["batch_size"], dataset=mixed)

    def setup(self, model: nn.Module) -> None:
        self.mixed = self.mixed_stream()
        self.batches = None
        self.optimizers = [self.model_optimizer(model)]
        self.teacher_model = self.teacher() if self.settings.get("loss") == "lrent" else None

    def loss(self, logits: torch.Tensor, images: torch.Tensor, labels: torch.Tensor,
             is_target: torch.Tensor) -> torch.Tensor:
        settings = self.settings
        if settings["loss"] == "lrent":
            soft, selected = lrent_soft_labels(self.teacher_probs(images), self.lambdas(),
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
        loss = self.loss(logits, images, labels, is_target)
        loss.backward()
        self.finite_guard(loss=loss)
        optimizer.step()
        if self.log_images_now:
            self.visual = {"image": images, "logits": logits, "label": labels}
        return {"loss": loss.detach(), "target_crops": is_target.float().mean()}
