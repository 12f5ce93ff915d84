"""Adversarial warm-up (docs/recipes.md §4, second stage; IAST's phase (a), Table 9): a non-self-training
domain-adaptation method that gives the first pseudo-label generator.

The stage key ``variant`` picks the method:

* ``output`` (default, IAST's released warm-up): one discriminator on the softmax maps;
* ``multilevel`` (AdaptSegNet, Tsai et al. 2018): the model gets an auxiliary ASPP classifier on
  layer3 (``fastst.models.deeplabv2.MultiLevelDeepLabV2``) and each level its own
  discriminator; the segmentation loss is ``ce(main) + lambda_seg_aux * ce(aux)`` and the
  adversarial one ``lambda_adv * adv(main) + lambda_adv_aux * adv(aux)`` (AdaptSegNet: 0.1,
  0.001, 0.0002);
* ``advent`` (ADVENT, Vu et al. 2019): one discriminator on the weighted self-information maps
  ``fastst.ops.self_information(p) = -p log2 p / log2 C`` (ADVENT: lambda_adv 0.001).

The GAN loss (``gan``) is ``lsgan`` (mean squared error to the labels) or ``bce`` (BCE with
logits); ``auto`` takes the variant's own: lsgan for ``output`` (IAST), bce for ``multilevel``
and ``advent``. Running self-training straight from source-only (Table 9's *Source* row) is a
pipeline without a warm-up stage.

Each iteration takes a labelled source batch and an unlabelled target batch (``batch_size``
each) and makes two updates:

1. segmenter, discriminators frozen: the segmentation CE on the source batch plus
   ``lambda * GAN(D(map_t), 0)`` per level, i.e. the target maps are pushed to look like source
   ones (source label 0, target label 1);
2. discriminators, on detached maps: ``(GAN(D(map_s), 0) + GAN(D(map_t), 1)) / 2`` per level.

``p`` is the softmax of the logits bilinearly upsampled (align_corners=True) to the crop size;
each D is ``FCDiscriminator(C, d_ndf, d_first_kernel)``. One Adam over the discriminators uses
``d_lr`` and follows the same cosine schedule as the segmenter. The checkpoint's model is the
plain DeepLab-v2 (what the next stage loads); the discriminators and the auxiliary classifier
are extras of the checkpoint (``discriminator``, ``discriminator_aux``, ``aux_classifier``),
used only to resume the warm-up itself.
"""
import itertools
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fastst.config_checks import COMMON_STAGE_DEFAULTS, check_choice, check_int, check_real
from fastst.methods.source_only import cross_entropy
from fastst.methods.trainer import Stage
from fastst.models import FCDiscriminator
from fastst.models.deeplabv2 import MultiLevelDeepLabV2
from fastst.ops import self_information

__all__ = ["Warmup", "SOURCE_LABEL", "TARGET_LABEL", "VARIANTS", "GAN_LOSSES", "resolve_gan",
           "gan_loss", "discriminator_loss", "adversarial_loss", "class_probabilities",
           "discriminator_input"]

SOURCE_LABEL = 0.0
TARGET_LABEL = 1.0
VARIANTS = ("output", "multilevel", "advent")
GAN_LOSSES = ("lsgan", "bce")
# The GAN loss each method was published with, taken when the stage says ``gan: auto``.
_VARIANT_GAN = {"output": "lsgan", "multilevel": "bce", "advent": "bce"}


def resolve_gan(variant: str, gan: str) -> str:
    """The GAN loss of a warm-up: ``gan`` itself, or the variant's own for ``"auto"``."""
    if variant not in _VARIANT_GAN:
        raise ValueError(f"unknown warm-up variant {variant!r}; valid: {', '.join(VARIANTS)}")
    if gan == "auto":
        return _VARIANT_GAN[variant]
    if gan not in GAN_LOSSES:
        raise ValueError(f"unknown GAN loss {gan!r}; valid: auto, {', '.join(GAN_LOSSES)}")
    return gan


def class_probabilities(logits: torch.Tensor, size) -> torch.Tensor:
    """softmax over classes of ``logits`` (B, C, h, w) upsampled to ``size``, in float32."""
    upsampled = F.interpolate(logits.float(), size=tuple(size), mode="bilinear",
                              align_corners=True)
    return torch.softmax(upsampled, dim=1)


def discriminator_input(logits: torch.Tensor, size, variant: str) -> torch.Tensor:
    """What the discriminator of ``variant`` sees: float32 (B, C, *size) softmax maps
    (``output``, ``multilevel``) or their weighted self-information (``advent``)."""
    probs = class_probabilities(logits, size)
    return self_information(probs) if variant == "advent" else probs


def gan_loss(outputs: torch.Tensor, label: float, gan: str) -> torch.Tensor:
    """Mean loss of discriminator ``outputs`` against the constant ``label``: BCE with logits in
    float32 (``bce``) or the squared error (``lsgan``)."""
    if gan == "bce":
        outputs = outputs.float()
        return F.binary_cross_entropy_with_logits(outputs, torch.full_like(outputs, label))
    return F.mse_loss(outputs, torch.full_like(outputs, label))


def discriminator_loss(discriminator: nn.Module, source_maps: torch.Tensor,
                       target_maps: torch.Tensor, gan: str = "lsgan") -> torch.Tensor:
    """D's loss on detached maps: ``(GAN(D(source), 0) + GAN(D(target), 1)) / 2``, GAN being the
    mean squared error (``lsgan``) or BCE with logits (``bce``)."""
    return (gan_loss(discriminator(source_maps.detach()), SOURCE_LABEL, gan)
            + gan_loss(discriminator(target_maps.detach()), TARGET_LABEL, gan)) / 2


def adversarial_loss(discriminator: nn.Module, target_maps: torch.Tensor,
                     gan: str = "lsgan") -> torch.Tensor:
    """The segmenter's loss ``GAN(D(target), 0)``: target maps made to pass as source."""
    return gan_loss(discriminator(target_maps), SOURCE_LABEL, gan)


class Warmup(Stage):
    method = "warmup"
    # variant: "output" (IAST's output-space GAN), "multilevel" (AdaptSegNet: + an auxiliary
    # classifier on layer3 and its own discriminator, weights lambda_seg_aux / lambda_adv_aux)
    # or "advent" (GAN on self-information maps); gan: "lsgan", "bce" or "auto" (the variant's
    # own: lsgan for output, bce otherwise).
    DEFAULTS = {**COMMON_STAGE_DEFAULTS, "d_lr": 2.0e-5, "lambda_adv": 0.05, "d_ndf": 64,
                "d_first_kernel": 3, "variant": "output", "gan": "auto",
                "lambda_adv_aux": 0.0002, "lambda_seg_aux": 0.1}

    @classmethod
    def validate(cls, config, prefix: str) -> None:
        """ConfigError naming the first warm-up key of stage ``prefix`` that is invalid."""
        check_real(config, f"{prefix}.d_lr", 0, low_open=True)
        check_real(config, f"{prefix}.lambda_adv", 0)
        check_int(config, f"{prefix}.d_ndf", 1)
        check_int(config, f"{prefix}.d_first_kernel", 1)
        check_choice(config, f"{prefix}.variant", VARIANTS)
        check_choice(config, f"{prefix}.gan", ("auto", *GAN_LOSSES))
        check_real(config, f"{prefix}.lambda_adv_aux", 0)
        check_real(config, f"{prefix}.lambda_seg_aux", 0)

    def setup(self, model: nn.Module) -> None:
        settings, ctx = self.settings, self.ctx
        batch_size = settings["batch_size"]
        self.variant = settings["variant"]
        self.gan = resolve_gan(self.variant, settings["gan"])
        self.source = self.stream("source", batch_size)
        self.target = self.stream("target", batch_size)
        self.set_iterations(len(self.source.dataset))
        self.source_batches = self.target_batches = None
        self.discriminator = self._discriminator(model, "discriminator")
        self.discriminators = [self.discriminator]
        # (segmentation, adversarial) loss weights per level, the main output first.
        self.weights = [(1.0, settings["lambda_adv"])]
        self.net: Optional[MultiLevelDeepLabV2] = None
        if self.variant == "multilevel":
            torch.manual_seed(self.seed_of("aux_classifier") % 2**63)
            self.net = MultiLevelDeepLabV2(model)
            self.net.aux_classifier.to(ctx.device, memory_format=ctx.memory_format).train()
            self.discriminator_aux = self._discriminator(model, "discriminator_aux")
            self.discriminators.append(self.discriminator_aux)
            self.weights.append((settings["lambda_seg_aux"], settings["lambda_adv_aux"]))
        optim = ctx.config["optim"]
        d_optimizer = torch.optim.Adam(
            itertools.chain.from_iterable(d.parameters() for d in self.discriminators),
            lr=settings["d_lr"], betas=tuple(optim["betas"]))
        self.optimizers = [self.model_optimizer(model if self.net is None else self.net),
                           d_optimizer]

    def _discriminator(self, model: nn.Module, name: str) -> FCDiscriminator:
        torch.manual_seed(self.seed_of(name) % 2**63)
        discriminator = FCDiscriminator(model.model_config["num_classes"],
                                        ndf=self.settings["d_ndf"],
                                        first_kernel=self.settings["d_first_kernel"])
        return discriminator.to(self.ctx.device, memory_format=self.ctx.memory_format).train()

    def parallel_model(self, model: nn.Module) -> nn.Module:
        """Multi-level: ``step`` calls the wrapper (model + auxiliary classifier), so that in a
        distributed run DDP averages the gradients of both; else the model, as every stage."""
        return super().parallel_model(model if self.net is None else self.net)

    def _logits(self, model: nn.Module, images: torch.Tensor) -> List[torch.Tensor]:
        """Logits per level, the main output first: [main] or [main, aux]. ``model`` is the
        module ``step`` gets (``parallel_model``'s: the multi-level wrapper for that variant)."""
        if self.net is None:
            return [model(images)]
        aux, main = model(images)
        return [main, aux]

    def step(self, model: nn.Module, iteration: int) -> Dict[str, torch.Tensor]:
        if self.source_batches is None:
            self.source_batches = self.source.batches(start=iteration)
            self.target_batches = self.target.batches(start=iteration)
        source, target = next(self.source_batches), next(self.target_batches)
        ctx, variant, gan = self.ctx, self.variant, self.gan
        source_images = ctx.images_to_device(source["image"])
        source_labels = source["label"].to(ctx.device, non_blocking=True)
        target_images = ctx.images_to_device(target["image"])
        optimizer, d_optimizer = self.optimizers
        discriminators = self.discriminators

        optimizer.zero_grad(set_to_none=True)
        for discriminator in discriminators:
            discriminator.requires_grad_(False)
        with ctx.autocast():
            source_logits = self._logits(model, source_images)
        ces = [cross_entropy(logits, source_labels) for logits in source_logits]
        _weighted(ces, [seg for seg, _ in self.weights]).backward()
        with ctx.autocast():
            target_logits = self._logits(model, target_images)
            target_maps = [discriminator_input(logits, target_images.shape[-2:], variant)
                           for logits in target_logits]
            advs = [adversarial_loss(d, maps, gan)
                    for d, maps in zip(discriminators, target_maps)]
        _weighted(advs, [adv for _, adv in self.weights]).backward()

        # D's loss reads detached maps of this iteration's forward passes, which the segmenter's
        # update does not change: computed before that update, it is the same, and one check
        # can then skip both updates when a loss is not finite.
        for discriminator in discriminators:
            discriminator.requires_grad_(True)
        d_optimizer.zero_grad(set_to_none=True)
        source_maps = [discriminator_input(logits.detach(), source_images.shape[-2:], variant)
                       for logits in source_logits]
        with ctx.autocast():
            d_losses = [discriminator_loss(d, source_map, target_map, gan)
                        for d, source_map, target_map in zip(discriminators, source_maps,
                                                              target_maps)]
        _weighted(d_losses, [1.0] * len(d_losses)).backward()
        losses = _by_level({"source_ce": ces, "adv": advs, "discriminator": d_losses})
        self.finite_guard(**losses)
        optimizer.step()
        d_optimizer.step()
        if self.log_images_now:
            self.visual = {"image": source_images, "logits": source_logits[0],
                           "label": source_labels}
        return {name: loss.detach() for name, loss in losses.items()}

    def extra_state(self) -> Dict[str, Any]:
        state = {"discriminator": self.discriminator.state_dict()}
        if self.net is not None:
            state["discriminator_aux"] = self.discriminator_aux.state_dict()
            state["aux_classifier"] = self.net.aux_classifier.state_dict()
        return state

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        self.discriminator.load_state_dict(state["discriminator"])
        if self.net is None:
            return
        missing = [key for key in ("discriminator_aux", "aux_classifier") if key not in state]
        if missing:
            raise ValueError(f"{self.checkpoint_path} lacks {missing}: it was not written by a "
                             f"multilevel warm-up; delete it to train stage {self.name} anew")
        self.discriminator_aux.load_state_dict(state["discriminator_aux"])
        self.net.aux_classifier.load_state_dict(state["aux_classifier"])


def _weighted(losses: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """``losses[0] * weights[0] + ...``; a weight of 1 multiplies nothing."""
    total = None
    for loss, weight in zip(losses, weights):
        term = loss if weight == 1.0 else weight * loss
        total = term if total is None else total + term
    return total


def _by_level(losses: Mapping[str, Sequence[torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """{"source_ce": main, "source_ce_aux": aux, ...}: the logged names of each level's loss."""
    named = {}
    for name, values in losses.items():
        for level, value in zip(("", "_aux"), values):
            named[name + level] = value
    return named
