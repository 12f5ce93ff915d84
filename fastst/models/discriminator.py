"""The fully-convolutional discriminator of AdaptSegNet / IAST warm-up / ADVENT (docs/recipes.md §4 and §6).

Five convs, all stride 2 and padding 1: conv1 (``first_kernel`` x ``first_kernel``, 3 in IAST's
code, 4 in AdaptSegNet's) to ``ndf`` channels, then 4x4 convs to 2, 4 and 8 times ``ndf`` and a
4x4 classifier to one channel; LeakyReLU(0.2) after every conv except the classifier. Module names
follow AdaptSegNet (conv1..conv4, classifier), so its checkpoints load.
"""
import torch
from torch import nn

__all__ = ["FCDiscriminator"]


class FCDiscriminator(nn.Module):
    """Patch discriminator on class maps.

    Args:
        num_classes: input channels (C); the input is a softmax or self-information map.
        ndf: channels of the first conv (64 in the papers).
        first_kernel: kernel size of conv1 (3 in IAST's code, 4 in AdaptSegNet's).

    Shapes: (B, C, H, W) float -> (B, 1, h, w) logits, each conv mapping a side n to
    floor((n + 2 - k) / 2) + 1 (k = kernel size): 64x96 -> 2x3.
    """

    def __init__(self, num_classes: int, ndf: int = 64, first_kernel: int = 3) -> None:
        super().__init__()
        for name, value in (("num_classes", num_classes), ("ndf", ndf),
                            ("first_kernel", first_kernel)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.num_classes = num_classes
        self.conv1 = nn.Conv2d(num_classes, ndf, kernel_size=first_kernel, stride=2, padding=1)
        self.conv2 = nn.Conv2d(ndf, ndf * 2, kernel_size=4, stride=2, padding=1)
        self.conv3 = nn.Conv2d(ndf * 2, ndf * 4, kernel_size=4, stride=2, padding=1)
        self.conv4 = nn.Conv2d(ndf * 4, ndf * 8, kernel_size=4, stride=2, padding=1)
        self.classifier = nn.Conv2d(ndf * 8, 1, kernel_size=4, stride=2, padding=1)
        self.leaky_relu = nn.LeakyReLU(negative_slope=0.2, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: float (B, num_classes, H, W) -> logits (B, 1, h, w), no final activation."""
        if x.dim() != 4 or x.shape[1] != self.num_classes:
            raise ValueError(f"FCDiscriminator({self.num_classes}) expects input of shape "
                             f"(B, {self.num_classes}, H, W), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"FCDiscriminator expects a floating-point map, got {x.dtype}")
        x = self.leaky_relu(self.conv1(x))
        x = self.leaky_relu(self.conv2(x))
        x = self.leaky_relu(self.conv3(x))
        x = self.leaky_relu(self.conv4(x))
        return self.classifier(x)
