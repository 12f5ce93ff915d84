"""DeepLab-v2: an output-stride-8 ResNet and an ASPP classifier of four summed dilated convs.

``deeplabv2(num_classes=19, backbone="resnet101", pretrained=None)`` builds the model used by
IAST, AdaptSegNet and CBST/CRST/TPLD (docs/recipes.md §4). Its forward returns logits at 1/8 of the
input resolution (321 -> 41); callers upsample (the fastst ops fuse that into the loss or the
pseudo-labelling). With ResNet-101 and 19 classes it has 43,901,068 parameters.

``MultiLevelDeepLabV2(model)`` adds AdaptSegNet's auxiliary ASPP classifier on layer3 for
multi-level adversarial training, around an unchanged ``DeepLabV2``: the plain model's
parameters, state_dict keys and checkpoints are those of ``model`` itself, and the auxiliary
head is a separate module (the warm-up saves it next to the model, never inside it).
"""
import math
import os
from collections.abc import Mapping
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from fastst.checkpoint import (CHECKPOINT_FORMAT, MapLocation, check_checkpoint, check_model_config,
                               load_checkpoint, load_state_dict_checked, read_torch_file)
from fastst.models.resnet import RESNET_SPECS, build_resnet

__all__ = ["ASPPClassifier", "DeepLabV2", "MultiLevelDeepLabV2", "deeplabv2", "load_model"]

ASPP_DILATIONS = (6, 12, 18, 24)

# Prefixes that DataParallel/DDP ("module.") and torch.compile ("_orig_mod.") put in front of
# every key of a wrapped model's state_dict.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


class ASPPClassifier(nn.Module):
    """Four 3x3 convs with dilation = padding = 6, 12, 18, 24 on the same features, summed.

    Weights are drawn from N(0, 0.01) and biases are 0 (DeepLab-v2 / AdaptSegNet).
    Shapes: (B, in_channels, h, w) -> (B, num_classes, h, w).
    """

    def __init__(self, in_channels: int, num_classes: int,
                 dilations: Sequence[int] = ASPP_DILATIONS) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv2d(in_channels, num_classes, kernel_size=3, padding=d, dilation=d, bias=True)
            for d in dilations)
        for conv in self.convs:
            nn.init.normal_(conv.weight, mean=0.0, std=0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        logits = self.convs[0](features)
        for conv in self.convs[1:]:
            logits = logits + conv(features)
        return logits


class DeepLabV2(nn.Module):
    """Backbone + ASPP classifier.

    Attributes:
        backbone: the output-stride-8 ``ResNet`` (torchvision parameter names).
        classifier: the ``ASPPClassifier`` head.
        model_config: ``{"num_classes": int, "backbone": str}``, the arguments that rebuild this
            model (stored in checkpoints).
    """

    def __init__(self, num_classes: int = 19, backbone: str = "resnet101") -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if backbone not in RESNET_SPECS:
            raise ValueError(f"unknown backbone {backbone!r}; valid backbones: "
                             f"{sorted(RESNET_SPECS)}")
        self.backbone = build_resnet(backbone)
        self.classifier = ASPPClassifier(self.backbone.out_channels, num_classes)
        self.model_config: Dict[str, Any] = {"num_classes": num_classes, "backbone": backbone}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: float (B, 3, H, W), ImageNet-normalised RGB, any memory format ->
        logits (B, num_classes, ceil(H/8), ceil(W/8)) in x's dtype (the autocast dtype under
        autocast)."""
        _check_images(x)
        return self.classifier(self.backbone(x))

    def param_groups(self, backbone_lr: float, head_lr: float) -> List[Dict[str, Any]]:
        """Optimizer parameter groups ``[{"name": "backbone", ...}, {"name": "head", ...}]``:
        the ResNet at ``backbone_lr``, the ASPP classifier at ``head_lr`` (IAST's released
        recipe: 0.1 * LR and LR; CRST/AdaptSegNet: LR and 10 * LR). Every parameter appears
        exactly once, frozen ones included (optimizers skip parameters without gradients)."""
        for name, lr in (("backbone_lr", backbone_lr), ("head_lr", head_lr)):
            if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < math.inf:
                raise ValueError(f"{name} must be a positive finite number, got {lr!r}")
        return [{"name": "backbone", "params": list(self.backbone.parameters()),
                 "lr": backbone_lr},
                {"name": "head", "params": list(self.classifier.parameters()), "lr": head_lr}]

    def freeze_bn_affine(self, frozen: bool = True) -> "DeepLabV2":
        """Set ``requires_grad = not frozen`` on every BatchNorm weight and bias. Running
        statistics are buffers and still update in train mode (IAST after source-only)."""
        for module in self.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                for param in (module.weight, module.bias):
                    if param is not None:
                        param.requires_grad_(not frozen)
        return self


def _check_images(x: torch.Tensor) -> None:
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"DeepLabV2 expects images of shape (B, 3, H, W), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"DeepLabV2 expects floating-point images, got {x.dtype}; convert "
                        "and normalise them first (ImageNet mean/std)")


class MultiLevelDeepLabV2(nn.Module):
    """A ``DeepLabV2`` plus AdaptSegNet's auxiliary classifier on the layer3 features.

    AdaptSegNet's multi-level model (Tsai et al., CVPR 2018) predicts twice: an ASPP classifier
    on layer3 (``aux_classifier``, same dilations and N(0, 0.01) init as the main one, on
    ``backbone.out_channels // 2`` channels: 1024 for ResNet-101) and the model's own on layer4.
    The wrapped model is used as it is, so it can be checkpointed alone with
    ``fastst.checkpoint.checkpoint_state(wrapper.model)`` and loaded into a plain
    ``DeepLabV2``; the auxiliary classifier is drawn from the global torch RNG when built.

    Attributes:
        model: the wrapped ``DeepLabV2`` (its forward still returns the main logits only).
        aux_classifier: the ``ASPPClassifier`` on layer3.
        model_config: ``model.model_config``.
    """

    def __init__(self, model: DeepLabV2) -> None:
        super().__init__()
        if not isinstance(model, DeepLabV2):
            raise TypeError(f"MultiLevelDeepLabV2 wraps a fastst DeepLabV2, got "
                            f"{type(model).__name__}")
        self.model = model
        # layer4 doubles layer3's channels in every ResNet (planes 4w -> 8w, same expansion).
        self.aux_classifier = ASPPClassifier(model.backbone.out_channels // 2,
                                             model.model_config["num_classes"])

    @property
    def model_config(self) -> Dict[str, Any]:
        return self.model.model_config

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """x: float (B, 3, H, W), ImageNet-normalised -> (aux_logits, logits), both
        (B, num_classes, ceil(H/8), ceil(W/8)) in x's dtype (or the autocast dtype); ``logits``
        equals ``model(x)``."""
        _check_images(x)
        net = self.model.backbone
        features = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        layer3 = net.layer3(net.layer2(net.layer1(features)))
        return self.aux_classifier(layer3), self.model.classifier(net.layer4(layer3))

    def param_groups(self, backbone_lr: float, head_lr: float) -> List[Dict[str, Any]]:
        """The model's groups with the auxiliary classifier in the head group, as AdaptSegNet's
        ``optim_parameters`` (layer5 and layer6 at the head's rate)."""
        backbone, head = self.model.param_groups(backbone_lr, head_lr)
        aux = list(self.aux_classifier.parameters())
        return [backbone, {**head, "params": head["params"] + aux}]

    def freeze_bn_affine(self, frozen: bool = True) -> "MultiLevelDeepLabV2":
        """``model.freeze_bn_affine(frozen)`` (the auxiliary classifier has no BatchNorm)."""
        self.model.freeze_bn_affine(frozen)
        return self


def deeplabv2(num_classes: int = 19, backbone: str = "resnet101",
              pretrained: Union[str, "os.PathLike[str]", Mapping, None] = None) -> DeepLabV2:
    """Build a DeepLab-v2 and optionally load weights.

    Args:
        num_classes: output channels of the logits.
        backbone: one of "resnet101", "resnet50", "resnet34", "resnet18".
        pretrained: ``None`` (random init: torchvision's for the backbone, N(0, 0.01) for the
            head), or a local file path (or an already loaded dict) holding one of
            - a torchvision-format ImageNet state_dict (``conv1.weight``, ``layer1.0.conv1.weight``,
              ..., ``fc.*`` ignored), loaded into the backbone;
            - a fastst checkpoint (``"format": "fastst-checkpoint-v1"``), whose ``"model"`` is
              loaded into the whole model (its ``model_config`` must match);
            - a plain state_dict of the whole model (keys ``backbone.*``, ``classifier.*``).
            Wrapper prefixes ``module.`` and ``_orig_mod.`` are stripped.

    Raises:
        ValueError: unknown backbone; keys or shapes that do not fit (listed in the message).
        FileNotFoundError: ``pretrained`` names a missing file.
    """
    model = DeepLabV2(num_classes, backbone)
    if pretrained is not None:
        _load_pretrained(model, pretrained)
    return model


def load_model(path_or_state: Union[str, "os.PathLike[str]", Mapping],
               map_location: MapLocation = "cpu", *, source: Optional[str] = None
               ) -> "DeepLabV2":
    """Rebuild the DeepLabV2 of a fastst checkpoint (a path or an already loaded dict).

    The model is built from ``state["model_config"]`` and ``state["model"]`` is loaded strictly
    (every key present, none extra, equal shapes). When ``map_location`` is a device (string or
    ``torch.device``) the model is moved there; it is returned in training mode like any new
    module, so call ``.eval()`` for inference. Errors as ``fastst.checkpoint.load_checkpoint``;
    they name ``source`` (default: the path, or "checkpoint dict" for a dict).
    """
    if isinstance(path_or_state, Mapping):
        state, source = path_or_state, source or "checkpoint dict"
        check_checkpoint(state, source=source)
    else:
        state = load_checkpoint(path_or_state, map_location)
        source = source or str(path_or_state)
    config = check_model_config(state["model_config"], source=source)
    model = deeplabv2(**config)
    load_state_dict_checked(model, state["model"], source=source)
    if isinstance(map_location, (str, torch.device)):
        model.to(torch.device(map_location))
    return model


def _load_pretrained(model: DeepLabV2, pretrained: Union[str, "os.PathLike[str]", Mapping]) -> None:
    if isinstance(pretrained, Mapping):
        state, source = pretrained, "pretrained state dict"
    elif isinstance(pretrained, (str, os.PathLike)):
        state = read_torch_file(pretrained, what="pretrained weights")
        source = f"pretrained weights {str(pretrained)!r}"
    else:
        raise TypeError("pretrained must be None, a file path or a state dict, got "
                        f"{type(pretrained).__name__}")
    if not isinstance(state, Mapping):
        raise ValueError(f"{source} holds a {type(state).__name__}, not a state_dict or a "
                         "fastst checkpoint")

    if "format" in state:
        if state["format"] != CHECKPOINT_FORMAT:
            raise ValueError(f"{source} has format {state['format']!r}; expected "
                             f"{CHECKPOINT_FORMAT!r} or a plain state_dict")
        config = state.get("model_config")
        if isinstance(config, Mapping) and config.get("backbone") != model.model_config[
                "backbone"] and config.get("num_classes") == model.model_config["num_classes"]:
            raise ValueError(f"{source} holds a {config.get('backbone')} model, not the "
                             f"{model.model_config['backbone']} asked for: set "
                             f"model.backbone={config.get('backbone')}, or use a "
                             f"{model.model_config['backbone']} checkpoint")
        if config != model.model_config:
            raise ValueError(f"{source} is a checkpoint of a model with {config}, not "
                             f"{model.model_config}; use fastst.models.load_model to rebuild "
                             "it as saved, or build the model with that configuration")
        if "model" not in state:
            raise ValueError(f"{source}: fastst checkpoint lacks the 'model' entry")
        load_state_dict_checked(model, _strip_wrapper_prefixes(state["model"]), source=source)
        return

    state = _strip_wrapper_prefixes(state)
    if any(isinstance(key, str) and key.startswith(("backbone.", "classifier."))
           for key in state):
        load_state_dict_checked(model, state, source=source)
    else:
        load_state_dict_checked(model.backbone, state, source=f"{source} (as an ImageNet backbone)",
                                ignore_prefixes=("fc.",))


def _strip_wrapper_prefixes(state: Mapping) -> Mapping:
    for prefix in _WRAPPER_PREFIXES:
        if state and all(isinstance(k, str) and k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state
