"""ResNet backbones at output stride 8, with torchvision's module and parameter names.

The module tree (``conv1``, ``bn1``, ``relu``, ``maxpool``, ``layer1`` .. ``layer4``; blocks with
``conv1``/``bn1``/``conv2``/``bn2``[/``conv3``/``bn3``] and ``downsample.0``/``downsample.1``)
matches torchvision's ``ResNet`` exactly, so a torchvision ImageNet ``state_dict`` loads key for
key (its ``fc.*`` entries are dropped by the loader in ``deeplabv2.py``; there is no ``fc`` here).

Dilation follows torchvision's ``replace_stride_with_dilation=[False, True, True]``: layer3 and
layer4 keep stride 1 and dilate instead, and the *first* block of each dilated layer still uses
the previous layer's dilation (layer3: 1 then 2, 2, ...; layer4: 2 then 4, 4). This is what the
released IAST checkpoints were trained with; a Caffe-style net dilating every block gives
different outputs from the same weights. The stride sits in the 3x3 conv (torchvision v1.5).
torchvision refuses dilation in ``BasicBlock``; ours supports it so ResNet-18/34 work at output
stride 8 too (both 3x3 convs of a block use the block's dilation, padding = dilation).

Shapes: input float (B, 3, H, W) -> features (B, out_channels, ceil(H/8), ceil(W/8)), e.g.
321x321 -> 41x41; out_channels is 8 * width * expansion: 2048 for Bottleneck nets and 512 for
BasicBlock nets at torchvision's width 64 (128 for the demo's "resnet18_w16").
"""
from typing import Dict, List, Optional, Sequence, Tuple, Type, Union

import torch
from torch import nn

__all__ = ["BasicBlock", "Bottleneck", "ResNet", "RESNET_SPECS", "build_resnet"]


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=dilation,
                     dilation=dilation, bias=False)


def _conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual; both convs dilated by ``dilation`` (torchvision has none)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None, dilation: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride, dilation)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes, 1, dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride and dilation here, torchvision v1.5) -> 1x1 (x4 channels), residual."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None, dilation: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride, dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


Block = Union[Type[BasicBlock], Type[Bottleneck]]

# name -> (block type, blocks per layer, channels of conv1 and layer1). The first four are
# torchvision's resnet18/34/50/101 (width 64). "resnet18_w16" is ResNet-18 at a quarter of the
# width (16/32/64/128 channels, 0.7 M parameters): not a published net and never pretrained, it
# exists so that the CPU demo (fastst/presets/demo.yaml) trains all its stages in minutes.
RESNET_SPECS: Dict[str, Tuple[Block, Tuple[int, int, int, int], int]] = {
    "resnet18": (BasicBlock, (2, 2, 2, 2), 64),
    "resnet34": (BasicBlock, (3, 4, 6, 3), 64),
    "resnet50": (Bottleneck, (3, 4, 6, 3), 64),
    "resnet101": (Bottleneck, (3, 4, 23, 3), 64),
    "resnet18_w16": (BasicBlock, (2, 2, 2, 2), 16),
}


class ResNet(nn.Module):
    """ResNet feature extractor without the classifier (no avgpool, no fc).

    Args:
        block: ``BasicBlock`` or ``Bottleneck``.
        layers: number of blocks in layer1..layer4.
        replace_stride_with_dilation: for layer2..layer4, whether to dilate instead of striding
            (torchvision's argument); the default gives output stride 8.
        width: channels of conv1 and layer1; layer2..layer4 have 2, 4 and 8 times as many
            (times the block's expansion). torchvision's nets have 64.

    Attributes:
        out_channels: channels of the returned feature map (8 * width * block.expansion).
    """

    def __init__(self, block: Block, layers: Sequence[int],
                 replace_stride_with_dilation: Sequence[bool] = (False, True, True),
                 width: int = 64) -> None:
        super().__init__()
        if len(layers) != 4:
            raise ValueError(f"layers must give 4 block counts, got {list(layers)}")
        if len(replace_stride_with_dilation) != 3:
            raise ValueError("replace_stride_with_dilation must have 3 entries (layer2..layer4), "
                             f"got {list(replace_stride_with_dilation)}")
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ValueError(f"width must be a positive int, got {width!r}")
        self.inplanes = width
        self.dilation = 1
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, 2 * width, layers[1], 2,
                                       replace_stride_with_dilation[0])
        self.layer3 = self._make_layer(block, 4 * width, layers[2], 2,
                                       replace_stride_with_dilation[1])
        self.layer4 = self._make_layer(block, 8 * width, layers[3], 2,
                                       replace_stride_with_dilation[2])
        self.out_channels = 8 * width * block.expansion
        # torchvision's initialisation, so an un-pretrained net starts from the same distribution.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def _make_layer(self, block: Block, planes: int, blocks: int, stride: int = 1,
                    dilate: bool = False) -> nn.Sequential:
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                _conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers: List[nn.Module] = [
            block(self.inplanes, planes, stride, downsample, dilation=previous_dilation)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes, dilation=self.dilation))
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: float (B, 3, H, W) -> features (B, out_channels, ceil(H/8), ceil(W/8)) at the
        default output stride 8, in x's dtype (or the autocast dtype)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)


def build_resnet(name: str) -> ResNet:
    """The output-stride-8 ResNet called ``name`` (one of ``RESNET_SPECS``), randomly
    initialised as torchvision does."""
    if name not in RESNET_SPECS:
        raise ValueError(f"unknown backbone {name!r}; valid backbones: {sorted(RESNET_SPECS)}")
    block, layers, width = RESNET_SPECS[name]
    return ResNet(block, layers, width=width)
