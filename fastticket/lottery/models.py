"""The paper's networks (LeNet-300-100, Conv-2/4/6, VGG-19, ResNet-20 for CIFAR) and any torchvision model.

`build_model` returns DENSE models (plain nn.Linear / nn.Conv2d): the search calls `sparsify` on them, so the
same constructors also serve users who want an ordinary network.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Sequence, Union

import torch
from torch import nn

from fastticket.lottery.data import DatasetInfo

TORCHVISION_PREFIX = "torchvision:"


def _glorot_(model: nn.Module) -> nn.Module:
    # Frankle & Carbin (2019) initialise every network with Gaussian Glorot and zero biases; BatchNorm starts
    # as the identity.
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.xavier_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return model


class LeNet300(nn.Module):
    """LeNet-300-100: fully connected 300, 100, then the classifier."""

    def __init__(self, info: DatasetInfo, hidden: Sequence[int] = (300, 100)) -> None:
        super().__init__()
        sizes = [math.prod(info.in_shape), *hidden]
        self.fc = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.output = nn.Linear(sizes[-1], info.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for layer in self.fc:
            x = torch.relu(layer(x))
        return self.output(x)


class ConvNet(nn.Module):
    """Conv-2/4/6: stages of two 3x3 convs (padding 1) + 2x2 max-pool, then fc 256, 256 and the classifier."""

    def __init__(self, info: DatasetInfo, stages: Sequence[int], hidden: Sequence[int] = (256, 256)) -> None:
        super().__init__()
        layers: List[nn.Module] = []
        channels, (c_in, h, w) = info.in_shape[0], info.in_shape
        for width in stages:
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(inplace=True),
                       nn.Conv2d(width, width, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            channels, h, w = width, h // 2, w // 2
        self.features = nn.Sequential(*layers)
        sizes = [channels * h * w, *hidden]
        self.fc = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.output = nn.Linear(sizes[-1], info.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x).flatten(1)
        for layer in self.fc:
            x = torch.relu(layer(x))
        return self.output(x)


_VGG19_PLAN: Sequence[Union[int, str]] = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
                                          512, 512, 512, 512, "M", 512, 512, 512, 512)


class VGG(nn.Module):
    """CIFAR VGG (as in OpenLTH): conv-BN-ReLU stages, global average pool, one fc classifier."""

    def __init__(self, info: DatasetInfo, plan: Sequence[Union[int, str]] = _VGG19_PLAN) -> None:
        super().__init__()
        layers: List[nn.Module] = []
        channels = info.in_shape[0]
        for spec in plan:
            if spec == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                # No conv bias: the BatchNorm that follows has its own shift.
                layers += [nn.Conv2d(channels, int(spec), 3, padding=1, bias=False), nn.BatchNorm2d(int(spec)),
                           nn.ReLU(inplace=True)]
                channels = int(spec)
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.output = nn.Linear(channels, info.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.pool(self.features(x)).flatten(1))


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        # Projection shortcut (1x1 conv + BN) where the shape changes; the name "shortcut" is what presets'
        # exclude patterns ("*shortcut*") match to leave these layers unpruned, as the paper does.
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """CIFAR ResNet-6n+2 (He et al. 2016); n=3 is ResNet-20, the paper's "ResNet-18"."""

    def __init__(self, info: DatasetInfo, blocks_per_stage: int = 3, widths: Sequence[int] = (16, 32, 64)) -> None:
        super().__init__()
        self.conv = nn.Conv2d(info.in_shape[0], widths[0], 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(widths[0])
        blocks: List[nn.Module] = []
        c_in = widths[0]
        for stage, width in enumerate(widths):
            for i in range(blocks_per_stage):
                blocks.append(BasicBlock(c_in, width, 2 if stage > 0 and i == 0 else 1))
                c_in = width
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.output = nn.Linear(c_in, info.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(x)))
        return self.output(self.pool(self.blocks(x)).flatten(1))


MODELS: Dict[str, Callable[[DatasetInfo], nn.Module]] = {
    "lenet300": lambda info: LeNet300(info),
    "conv2": lambda info: ConvNet(info, (64,)),
    "conv4": lambda info: ConvNet(info, (64, 128)),
    "conv6": lambda info: ConvNet(info, (64, 128, 256)),
    "vgg19": lambda info: VGG(info),
    "resnet20": lambda info: CifarResNet(info, 3),
}


def list_models() -> List[str]:
    return sorted(MODELS) + [f"{TORCHVISION_PREFIX}<name>"]


def build_model(name: str, info: DatasetInfo) -> nn.Module:
    """A freshly initialised dense model `name` for inputs `info.in_shape` and `info.num_classes` outputs."""
    if name.startswith(TORCHVISION_PREFIX):
        import torchvision

        tv_name = name[len(TORCHVISION_PREFIX):]
        try:
            builder = torchvision.models.get_model_builder(tv_name)
        except ValueError:
            raise ValueError(f"unknown torchvision model {tv_name!r}; see torchvision.models.list_models()") from None
        # torchvision models keep their own initialisation: it is part of their recipe.
        return builder(weights=None, num_classes=info.num_classes)
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models are {', '.join(list_models())}")
    return _glorot_(MODELS[name](info))


def output_layer_name(model: nn.Module) -> str:
    """Qualified name of the classifier: the last nn.Linear (masked or not) in registration order."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ValueError(f"{type(model).__name__} has no Linear layer to serve as the output layer")
    return names[-1]


def layer_kind(module: nn.Module) -> str:
    """'conv' or 'fc' (MaskedConv2d / MaskedLinear are subclasses, so they count too)."""
    if isinstance(module, nn.Conv2d):
        return "conv"
    if isinstance(module, nn.Linear):
        return "fc"
    raise ValueError(f"layer_kind: {type(module).__name__} is neither a Conv2d nor a Linear layer")
