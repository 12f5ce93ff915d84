"""TPLD (Shin et al., ECCV 2020): two-phase pseudo-label densification on top of CRST (docs/recipes.md §6).

Phase 1 (``tpld_phase1``) is a class-balanced round (fastst.methods.cbst) whose pseudo labels are
densified by sliding-window voting (``vote_window``, ``vote_weight``, ``vote_iterations``) and
whose target term goes through the bootstrapping loss (``beta``) with the round's thresholds.
Its base method is the ``loss`` key: "mrkld" (CRST-MRKLD, the paper's main setting), "ce"
(CBST) or "lrent" (CRST-LRENT: the soft labels of temperature ``lrent_alpha`` from the teacher
where LRENT selects a pixel, the voted label elsewhere; ``tpld_phase1_lrent_loss``). With
``vote_iterations: 0`` and ``beta: 1`` a round trains as its base method does (same labels, same
gradients). The manifest records the label density before and after voting.

Phase 2 (``tpld_phase2``) ranks the target images by their confidence ``conf_t`` under the
round's thresholds; the top ``easy_portion`` are easy, the rest hard (DIR/<stage>/split.json).
Each iteration takes ``batch_size`` easy and ``batch_size`` hard target crops and no source crop:

* easy crops: the bootstrapping loss against full calibrated targets (TPLD Eq. 3): the one-hot
  confident class where ``p / lambda >= 1`` and ``(p / lambda) ** gamma`` elsewhere, ``p`` the
  teacher's (the model the round started from and labelled with) probabilities. The stage key
  ``soft_targets`` says on what view: ``crop`` (default) the teacher on the augmented crop the
  student sees, its targets made inside the fused loss from the teacher's 1/8-resolution logits
  (``teacher_logits=``); ``pass`` the pass's probabilities, those lambda and conf_t came from,
  mapped onto each crop (``ClassBalancedRound.teacher_probs``: the teacher reruns the pass's
  protocol on the whole image, and each crop pixel takes the pixel its pseudo label comes from).
  ``pass`` is consistent with lambda (on the crop the teacher finds 35.9 % of pixels confident
  where the pass's map has 28.1 %, fastst.methods.cbst), yet on the demo's target *dev* split
  (val generated with another seed; 3 seeds) two phase-2 rounds with ``pass`` targets lost
  4.3 points against ``crop`` (33.5 against 37.8 mIoU, phase 1 ended at 37.7): the targets made
  on the student's own view of the image train it better, and cost no second forward pass over
  the whole image;
* hard crops: intra-domain adversarial training on the weighted self-information maps
  ``I = -p log2 p / log2 C`` (ADVENT): ``FCDiscriminator(C)`` tells easy (1) from hard (0) with
  BCE-with-logits on ``I.detach()``; the segmenter gets ``lambda_adv`` times the BCE of its hard
  maps against the easy label. The discriminator's accuracy (outputs > 0 on easy, < 0 on hard,
  per patch) is logged.

One phase-2 epoch is ``floor(N_target / (2 * batch_size))`` iterations (each reads
``2 * batch_size`` target images).
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

import torch
from torch import nn

from fastst.atomic import read_json, write_json_atomic
from fastst.config_checks import (check_betas, check_choice, check_int, check_real, fail,
                                  get_key)
from fastst.methods.cbst import (LOSS_DEFAULTS, MIXED_DEFAULTS, CBSTRound, ClassBalancedRound,
                                 CropGeometry, CropRecorder)
from fastst.methods.datasets import IndexedSubset, build_role, crop_transform
from fastst.methods.st_losses import (lrent_soft_labels, tpld_phase1_loss,
                                      tpld_phase1_lrent_loss)
from fastst.methods.warmup import discriminator_input, gan_loss
from fastst.models import FCDiscriminator
from fastst.ops import bootstrap_loss, cbst_pseudo_label, split_easy_hard, tpld_soft_targets

__all__ = ["TPLDPhase1", "TPLDPhase2", "EASY_LABEL", "HARD_LABEL", "SPLIT_NAME"]

EASY_LABEL = 1.0
HARD_LABEL = 0.0
SPLIT_NAME = "split.json"


# tpld_phase2 soft_targets: where the easy crops' calibrated targets come from: "pass" (the
# pass's probabilities, which lambda came from, mapped onto each crop) or "crop" (the teacher on
# the augmented crop).
SOFT_TARGETS = ("pass", "crop")


class TPLDPhase1(CBSTRound):
    method = "tpld_phase1"
    # The sliding-window vote densifying the pass's labels, and the bootstrapping loss's beta.
    DEFAULTS = {**ClassBalancedRound.DEFAULTS, **MIXED_DEFAULTS, "vote_window": 7,
                "vote_weight": 0.7, "vote_iterations": 3, "beta": 0.95, **LOSS_DEFAULTS}

    @classmethod
    def validate(cls, config, prefix: str) -> None:
        super().validate(config, prefix)
        check_int(config, f"{prefix}.vote_window", 1)
        if get_key(config, f"{prefix}.vote_window") % 2 == 0:
            fail(f"{prefix}.vote_window", "an odd integer (the window is centred on the pixel)",
                 get_key(config, f"{prefix}.vote_window"))
        check_real(config, f"{prefix}.vote_weight", 0, 1)
        check_int(config, f"{prefix}.vote_iterations", 0)
        check_real(config, f"{prefix}.beta", 0, 1)

    def vote(self) -> Dict[str, Any]:
        settings = self.settings
        return {"window": settings["vote_window"], "weight": settings["vote_weight"],
                "iterations": settings["vote_iterations"]}

    def loss(self, logits, batch, labels, is_target) -> torch.Tensor:
        settings = self.settings
        if settings["loss"] == "lrent":
            soft, selected = lrent_soft_labels(self.teacher_probs(batch), self.lambdas(),
                                               settings["lrent_alpha"])
            return tpld_phase1_lrent_loss(logits, labels, is_target, self.lambdas(), soft,
                                          selected, beta=settings["beta"])
        weight = settings["mrkld_weight"] if settings["loss"] == "mrkld" else 0.0
        return tpld_phase1_loss(logits, labels, is_target, self.lambdas(),
                                beta=settings["beta"], mrkld_weight=weight)


class TPLDPhase2(ClassBalancedRound):
    method = "tpld_phase2"
    # Easy/hard split at easy_portion, calibrated targets of exponent gamma, and the
    # intra-domain discriminator of the hard crops.
    DEFAULTS = {**ClassBalancedRound.DEFAULTS, "beta": 0.95, "easy_portion": 0.3, "gamma": 2.0,
                "lambda_adv": 0.001, "d_lr": 1.0e-4, "d_betas": [0.9, 0.99], "d_ndf": 64,
                "d_first_kernel": 4, "soft_targets": "crop"}

    @classmethod
    def validate(cls, config, prefix: str) -> None:
        super().validate(config, prefix)
        check_real(config, f"{prefix}.beta", 0, 1)
        check_real(config, f"{prefix}.easy_portion", 0, 1, low_open=True)
        if get_key(config, f"{prefix}.easy_portion") >= 1:
            fail(f"{prefix}.easy_portion", "in (0, 1) (some images must be hard)",
                 get_key(config, f"{prefix}.easy_portion"))
        check_real(config, f"{prefix}.gamma", 0)
        check_real(config, f"{prefix}.lambda_adv", 0)
        check_real(config, f"{prefix}.d_lr", 0, low_open=True)
        check_betas(config, f"{prefix}.d_betas")
        check_int(config, f"{prefix}.d_ndf", 1)
        check_int(config, f"{prefix}.d_first_kernel", 1)
        check_choice(config, f"{prefix}.soft_targets", SOFT_TARGETS)

    def split(self) -> Dict[str, Any]:
        """The easy/hard split of the target set by conf_t (written to DIR/<stage>/split.json)."""
        images = self.manifest["images"]
        conf = torch.tensor([image["confidence"] for image in images], dtype=torch.float64)
        easy = split_easy_hard(conf, self.settings["easy_portion"])
        easy_indices = easy.nonzero().flatten().tolist()
        hard_indices = (~easy).nonzero().flatten().tolist()
        if not easy_indices or len(hard_indices) < self.settings["batch_size"] \
                or len(easy_indices) < self.settings["batch_size"]:
            raise ValueError(f"stage {self.name}: easy_portion {self.settings['easy_portion']} of "
                             f"{len(images)} target images gives {len(easy_indices)} easy and "
                             f"{len(hard_indices)} hard images; each needs at least batch_size = "
                             f"{self.settings['batch_size']}")
        split = {"easy_portion": self.settings["easy_portion"],
                 "num_easy": len(easy_indices), "num_hard": len(hard_indices),
                 "easy_min_confidence": float(conf[easy].min()),
                 "hard_max_confidence": float(conf[~easy].max()),
                 "easy_mean_confidence": float(conf[easy].mean()),
                 "hard_mean_confidence": float(conf[~easy].mean()),
                 "easy": [images[i]["name"] for i in easy_indices],
                 "hard": [images[i]["name"] for i in hard_indices],
                 "easy_indices": easy_indices, "hard_indices": hard_indices}
        write_json_atomic(split, self.dir / SPLIT_NAME)
        writer = self.ctx.writer
        if writer is not None:
            writer.add_scalar(f"{self.name}/split/num_easy", split["num_easy"], 0)
            writer.add_scalar(f"{self.name}/split/num_hard", split["num_hard"], 0)
            writer.add_scalar(f"{self.name}/split/easy_min_confidence",
                              split["easy_min_confidence"], 0)
            writer.add_histogram(f"{self.name}/split/easy_confidence", conf[easy], 0)
            writer.add_histogram(f"{self.name}/split/hard_confidence", conf[~easy], 0)
        return split

    def setup(self, model: nn.Module) -> None:
        config, settings, ctx = self.ctx.config, self.settings, self.ctx
        self.division = self.split()
        batch_size = settings["batch_size"]
        for part in ("easy", "hard"):
            # One data set object per stream: each stream sets its own epoch on it (the seeded
            # augmentation), so a shared one would depend on the order the streams advance.
            # Easy crops record their geometry, for the teacher's targets (teacher_probs).
            transform = crop_transform(config, "target")
            recorded = part == "easy" and settings["soft_targets"] == "pass"
            target = build_role(config, "target", seed=self.seed_of(part, "augment"),
                                transform=CropRecorder(transform) if recorded else transform)
            setattr(self, part, self.stream(part, batch_size, dataset=IndexedSubset(
                CropGeometry(target) if recorded else target,
                self.division[f"{part}_indices"])))
        self.set_iterations(len(target) // 2)  # an epoch reads every target image once
        self.easy_batches = self.hard_batches = None
        self.teacher_model = self.teacher()
        torch.manual_seed(self.seed_of("discriminator") % 2**63)
        self.discriminator = FCDiscriminator(model.model_config["num_classes"],
                                             ndf=settings["d_ndf"],
                                             first_kernel=settings["d_first_kernel"])
        self.discriminator.to(ctx.device, memory_format=ctx.memory_format).train()
        d_optimizer = torch.optim.Adam(self.discriminator.parameters(), lr=settings["d_lr"],
                                       betas=tuple(settings["d_betas"]))
        self.optimizers = [self.model_optimizer(model), d_optimizer]

    def step(self, model: nn.Module, iteration: int) -> Dict[str, torch.Tensor]:
        ctx, settings = self.ctx, self.settings
        if self.easy_batches is None:
            self.easy_batches = self.easy.batches(start=iteration)
            self.hard_batches = self.hard.batches(start=iteration)
        easy = next(self.easy_batches)
        easy_images = ctx.images_to_device(easy["image"])
        hard_images = ctx.images_to_device(next(self.hard_batches)["image"])
        size = tuple(easy_images.shape[-2:])
        lambdas = self.lambdas()
        target_kwargs, confident = self.easy_targets(easy, easy_images, lambdas)
        optimizer, d_optimizer = self.optimizers
        discriminator = self.discriminator

        optimizer.zero_grad(set_to_none=True)
        discriminator.requires_grad_(False)
        with ctx.autocast():
            easy_logits = model(easy_images)
        easy_loss = bootstrap_loss(easy_logits, confident, lambdas, beta=settings["beta"],
                                   size=size, **target_kwargs)
        easy_loss.backward()
        with ctx.autocast():
            hard_logits = model(hard_images)
        hard_info = discriminator_input(hard_logits, size, "advent")
        with ctx.autocast():
            adv = gan_loss(discriminator(hard_info), EASY_LABEL, "bce")
        (settings["lambda_adv"] * adv).backward()

        discriminator.requires_grad_(True)
        d_optimizer.zero_grad(set_to_none=True)
        easy_info = discriminator_input(easy_logits.detach(), size, "advent")
        with ctx.autocast():
            easy_out = discriminator(easy_info)
            hard_out = discriminator(hard_info.detach())
        d_loss = (gan_loss(easy_out, EASY_LABEL, "bce") + gan_loss(hard_out, HARD_LABEL, "bce")) / 2
        d_loss.backward()
        # Both updates after both backward passes, so that one guard can skip them together
        # (the discriminator's loss reads only detached maps: the order changes nothing).
        self.finite_guard(easy_loss=easy_loss, adv=adv, discriminator=d_loss)
        optimizer.step()
        d_optimizer.step()
        accuracy = ((easy_out > 0).float().mean() + (hard_out < 0).float().mean()) / 2
        if self.log_images_now:  # the confident part of the easy crops' targets
            if confident is None:  # made inside the fused loss: at full size for viewing only
                confident = cbst_pseudo_label(torch.softmax(torch.nn.functional.interpolate(
                    target_kwargs["teacher_logits"].float(), size=size, mode="bilinear",
                    align_corners=True), dim=1), lambdas)
            self.visual = {"image": easy_images, "logits": easy_logits, "label": confident}
        return {"easy_loss": easy_loss.detach(), "adv": adv.detach(),
                "discriminator": d_loss.detach(), "d_accuracy": accuracy.detach()}

    def easy_targets(self, easy: Dict[str, Any], easy_images: torch.Tensor, lambdas):
        """The easy crops' full calibrated targets as ``bootstrap_loss`` arguments, and their
        confident map (None when the fused loss makes it). ``soft_targets: pass``: from the
        pass's probabilities on the crops (``teacher_probs``); ``crop``: from the teacher's
        logits on the augmented crop, made inside the fused loss (no (B, C, H, W) tensor)."""
        gamma = self.settings["gamma"]
        if self.settings["soft_targets"] == "crop":
            with torch.no_grad(), self.ctx.autocast(pseudo=True):
                teacher_logits = self.teacher_model(easy_images)
            return {"teacher_logits": teacher_logits, "gamma": gamma}, None
        pass_probs = self.teacher_probs(easy)
        confident = cbst_pseudo_label(pass_probs, lambdas)
        return {"soft_target": tpld_soft_targets(pass_probs, lambdas, gamma=gamma)}, confident

    def pseudo_summary(self) -> Optional[Dict[str, Any]]:
        summary = super().pseudo_summary()
        division = getattr(self, "division", None)
        if summary is not None and division is not None:
            summary["split"] = {key: division[key] for key in (
                "num_easy", "num_hard", "easy_min_confidence", "easy_mean_confidence",
                "hard_mean_confidence")}
        return summary

    def restore_finished(self, state) -> None:
        super().restore_finished(state)
        division = read_json(self.dir / SPLIT_NAME)
        if division is not None:
            self.division = division

    def extra_state(self) -> Dict[str, Any]:
        return {**super().extra_state(), "discriminator": self.discriminator.state_dict()}

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        self.discriminator.load_state_dict(state["discriminator"])
