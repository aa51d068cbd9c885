"""Named SearchConfigs: the paper's settings (Frankle & Carbin 2019, Figure 2 and appendices)
and `lenet-mnist5k`, the default that runs anywhere in a few minutes.

Paper presets train with reinit controls only (add `--controls reinit,random` for the random-pruning control)
and take enough levels to reach the sparsities the paper plots.
"""
from __future__ import annotations

from typing import Dict, List

from fastticket.lottery.arms import REINIT
from fastticket.lottery.config import SearchConfig

DEFAULT_PRESET = "lenet-mnist5k"

_VAL_SIZE = 5000
# VGG-19's lr drops at epochs 80 and 120 of the 45,000 training images left after validation, batch 64.
_VGG_ITERS_PER_EPOCH = (50_000 - _VAL_SIZE) / 64

PRESETS: Dict[str, SearchConfig] = {
    # 1,000 iterations: ~17 epochs of the 3,500 training images, past the dense net's early-stopping point
    # (~600 iterations) and the reinit controls' (600-900); with each level's ticket and reinit trained as one
    # stacked model the whole search took 59 s on 2 CPU cores (1,500 iterations: 87 s, same conclusions).
    "lenet-mnist5k": SearchConfig(
        model="lenet300", dataset="mnist5k", val_size=500, iterations=1000, batch_size=60, optimizer="adam",
        lr=1.2e-3, eval_every=100, levels=10, scope="layerwise", rate=0.2, output_rate=0.1, controls=(REINIT,)),
    # 15 levels: down to 3.6% of weights, where the paper's LeNet tickets still match dense accuracy.
    "lenet-mnist": SearchConfig(
        model="lenet300", dataset="mnist", val_size=_VAL_SIZE, iterations=50_000, batch_size=60,
        optimizer="adam", lr=1.2e-3, eval_every=100, levels=15, scope="layerwise", rate=0.2, output_rate=0.1,
        controls=(REINIT,)),
    "conv2-cifar10": SearchConfig(
        model="conv2", dataset="cifar10", val_size=_VAL_SIZE, iterations=20_000, batch_size=60,
        optimizer="adam", lr=2e-4, eval_every=100, levels=15, scope="layerwise", rate=0.2, conv_rate=0.1,
        output_rate=0.1, controls=(REINIT,)),
    "conv4-cifar10": SearchConfig(
        model="conv4", dataset="cifar10", val_size=_VAL_SIZE, iterations=25_000, batch_size=60,
        optimizer="adam", lr=3e-4, eval_every=100, levels=15, scope="layerwise", rate=0.2, conv_rate=0.1,
        output_rate=0.1, controls=(REINIT,)),
    "conv6-cifar10": SearchConfig(
        model="conv6", dataset="cifar10", val_size=_VAL_SIZE, iterations=30_000, batch_size=60,
        optimizer="adam", lr=3e-4, eval_every=100, levels=15, scope="layerwise", rate=0.2, conv_rate=0.15,
        output_rate=0.1, controls=(REINIT,)),
    # The paper's ResNet-18 (CIFAR ResNet-20) with late rewinding to iteration 500 instead of lr warmup.
    "resnet20-cifar10": SearchConfig(
        model="resnet20", dataset="cifar10", val_size=_VAL_SIZE, iterations=30_000, batch_size=128,
        optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=1e-4, lr_milestones=(20_000, 25_000), lr_gamma=0.1,
        augment=True, eval_every=100, levels=20, scope="global", rate=0.2, exclude=("output", "*shortcut*"),
        rewind_iter=500, controls=(REINIT,)),
    # VGG-19 with late rewinding to iteration 100 instead of lr warmup.
    "vgg19-cifar10": SearchConfig(
        model="vgg19", dataset="cifar10", val_size=_VAL_SIZE, iterations=112_000, batch_size=64,
        optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=1e-4,
        lr_milestones=(round(80 * _VGG_ITERS_PER_EPOCH), round(120 * _VGG_ITERS_PER_EPOCH)), lr_gamma=0.1,
        augment=True, eval_every=100, levels=20, scope="global", rate=0.2, exclude=("output",), rewind_iter=100,
        controls=(REINIT,)),
}


def list_presets() -> List[str]:
    return list(PRESETS)


def get_preset(name: str) -> SearchConfig:
    """A copy of preset `name`, safe to modify (its sequences are tuples)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets are {', '.join(PRESETS)}")
    return PRESETS[name].replace()
