"""Segmentation models: DeepLab-v2 on output-stride-8 ResNets, and the FC discriminator.

``deeplabv2(num_classes=19, backbone="resnet101", pretrained=None)`` -> ``DeepLabV2`` whose
forward maps images (B, 3, H, W) to logits (B, C, ceil(H/8), ceil(W/8));
``FCDiscriminator(num_classes, ndf=64, first_kernel=3)`` maps (B, C, H, W) to (B, 1, h, w).
``load_model(path_or_checkpoint)`` rebuilds the ``DeepLabV2`` a fastst checkpoint holds.
"""
from fastst.models.deeplabv2 import DeepLabV2, deeplabv2, load_model
from fastst.models.discriminator import FCDiscriminator

__all__ = ["DeepLabV2", "FCDiscriminator", "deeplabv2", "load_model"]
