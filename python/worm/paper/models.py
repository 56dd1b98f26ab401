"""CNNs for 32x32 images: CIFAR-style ResNet-18, VGG-11-BN and a tiny CNN for CPU runs.

Every conv is followed by a BatchNorm (the representative set of the Early-Bird
search is the BN gammas) and has no bias (the BN's beta plays that role).
:func:`build` also gives torchvision's classification models by name, with random
weights. :func:`worm.prune.prune_channels` prunes any of them (no per-model code).

Heads
-----
* ResNet-18: global average pool, then ``Linear(512*width, num_classes)``.
* VGG-11-BN: five 2x2 max-pools take 32x32 down to 1x1, so the flattened feature
  vector is the last conv's channels and the head is one
  ``Linear(512*width, num_classes)`` (the usual CIFAR VGG head, not ImageNet's
  three 4096-wide layers, which would be most of the parameters and none of the
  prunable channels).
* "cnn": the same plain-stack class as VGG with cfg ``[16, M, 32, M, 32, M]``
  (32 -> 4 pixels), then a global average pool and ``Linear(32*width, num_classes)``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn
import torch.nn.functional as F

__all__ = ["MODELS", "build", "scaled", "BasicBlock", "ResNet", "PlainCNN",
           "VGG11_CFG", "TINY_CFG", "RepeatChannels", "torchvision_model"]

VGG11_CFG = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")
TINY_CFG = (16, "M", 32, "M", 32, "M")
RESNET18_BLOCKS = (2, 2, 2, 2)
RESNET_WIDTHS = (64, 128, 256, 512)

MODELS = ("resnet18", "vgg11_bn", "cnn")


def scaled(channels: int, width: float) -> int:
    """``channels * width`` rounded, never below 1 (a 0-wide layer cannot carry a signal)."""
    return max(1, int(round(channels * width)))


class BasicBlock(nn.Module):
    """ResNet basic block. ``mid`` is the inner width (conv1's outputs); structured
    pruning shrinks only it, so the residual sum keeps its ``planes`` channels."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1, mid: Optional[int] = None):
        super().__init__()
        mid = planes if mid is None else mid
        self.conv1 = nn.Conv2d(in_planes, mid, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR ResNet: 3x3 stride-1 stem, no max-pool, four stages of BasicBlocks.

    ``mids`` optionally gives every block's inner width (stage-major order); the
    pruner passes it, users normally leave it None.
    """

    def __init__(self, num_blocks: Sequence[int] = RESNET18_BLOCKS, in_channels: int = 3,
                 num_classes: int = 10, width: float = 1.0,
                 mids: Optional[Sequence[int]] = None):
        super().__init__()
        widths = [scaled(w, width) for w in RESNET_WIDTHS]
        nblocks = sum(num_blocks)
        if mids is not None and len(mids) != nblocks:
            raise ValueError(f"mids has {len(mids)} entries; the network has {nblocks} blocks")
        mids = list(mids) if mids is not None else [None] * nblocks
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        in_planes, b = widths[0], 0
        for stage, (planes, n) in enumerate(zip(widths, num_blocks)):
            blocks = []
            for i in range(n):
                stride = 2 if (stage > 0 and i == 0) else 1
                blocks.append(BasicBlock(in_planes, planes, stride, mids[b]))
                in_planes, b = planes, b + 1
            setattr(self, f"layer{stage + 1}", nn.Sequential(*blocks))
        self.num_stages = len(num_blocks)
        self.linear = nn.Linear(in_planes, num_classes)

    def blocks(self):
        for s in range(self.num_stages):
            yield from getattr(self, f"layer{s + 1}")

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        for s in range(self.num_stages):
            out = getattr(self, f"layer{s + 1}")(out)
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


class PlainCNN(nn.Module):
    """A plain stack of conv3x3-BN-ReLU and 2x2 max-pools ("M"), global average pool,
    one linear head. VGG-11-BN and the tiny "cnn" are instances.

    The average pool is the identity for VGG (1x1 maps after five pools) and lets
    shallower stacks use the same head. ``cfg`` holds final channel counts.
    """

    def __init__(self, cfg: Sequence, in_channels: int = 3, num_classes: int = 10):
        super().__init__()
        layers, c = [], in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                v = int(v)
                if v < 1:
                    raise ValueError(f"PlainCNN cfg has a layer with {v} channels; need >= 1")
                layers += [nn.Conv2d(c, v, 3, 1, 1, bias=False), nn.BatchNorm2d(v),
                           nn.ReLU(inplace=True)]
                c = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c, num_classes)

    @property
    def cfg(self) -> tuple:
        """Channel counts and "M"s as the layers are now (pruning shrinks them)."""
        return tuple("M" if isinstance(m, nn.MaxPool2d) else m.out_channels
                     for m in self.features if isinstance(m, (nn.MaxPool2d, nn.Conv2d)))

    def forward(self, x):
        out = self.features(x)
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.classifier(out)


def _scaled_cfg(cfg, width):
    return tuple(v if v == "M" else scaled(v, width) for v in cfg)


class RepeatChannels(nn.Module):
    """Repeats a ``c``-channel image to ``to`` channels (grey images into an RGB
    network); no parameters, so it changes nothing the search or the pruner sees."""

    def __init__(self, to: int = 3):
        super().__init__()
        self.to = to

    def forward(self, x):
        return x.repeat_interleave(self.to // x.shape[1], dim=1) if x.shape[1] != self.to else x


def torchvision_model(name: str, in_channels: int = 3, num_classes: int = 10) -> nn.Module:
    """``torchvision.models.get_model(name, weights=None, num_classes=...)``: random
    weights, never a download. Inputs with other than 3 channels go through
    :class:`RepeatChannels` first (``in_channels`` must divide 3)."""
    try:
        import torchvision
    except ImportError as e:
        raise ValueError(f"unknown model {name!r}: not built in ({', '.join(MODELS)}), and "
                         "torchvision is not installed (pip install 'worm[cnn]')") from e
    names = set(torchvision.models.list_models(module=torchvision.models))
    if name not in names:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)} or a "
                         "torchvision classification model (e.g. mobilenet_v3_small, efficientnet_b0, "
                         "regnet_x_400mf, densenet121)")
    if 3 % in_channels:
        raise ValueError(f"torchvision models take 3-channel images; {in_channels} channels "
                         "cannot be repeated to 3")
    net = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    return net if in_channels == 3 else nn.Sequential(RepeatChannels(3), net)


def build(name: str, in_channels: int = 3, num_classes: int = 10, width: float = 1.0) -> nn.Module:
    """A fresh model by name: one of :data:`MODELS` (32x32 inputs, ``width`` scales
    the channels), else a torchvision classification model with random weights
    (``width`` must be 1; see :func:`torchvision_model`)."""
    if not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if not (float(width) > 0):
        raise ValueError(f"width must be > 0, got {width!r}")
    key = name.lower().replace("-", "_")
    if key.startswith("torchvision."):  # torchvision's own, even where a built-in shares the name
        if float(width) != 1.0:
            raise ValueError(f"width={width!r} scales only the built-in models; {name!r} takes width 1")
        return torchvision_model(name.split(".", 1)[1], in_channels, num_classes)
    if key == "resnet18":
        return ResNet(RESNET18_BLOCKS, in_channels, num_classes, width)
    if key == "vgg11_bn":
        return PlainCNN(_scaled_cfg(VGG11_CFG, width), in_channels, num_classes)
    if key == "cnn":
        return PlainCNN(_scaled_cfg(TINY_CFG, width), in_channels, num_classes)
    if float(width) != 1.0:
        raise ValueError(f"width={width!r} scales only the built-in models ({', '.join(MODELS)}); "
                         f"torchvision's {name!r} takes width 1")
    return torchvision_model(name, in_channels, num_classes)
