"""One dataclass holds every knob of a ticket search (OpenLTH's hparams idea, without its ceremony).

Presets are instances of it; CLI flags override fields; `config.json` in a run directory is its `asdict`.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class SearchConfig:
    # what to train
    model: str = "lenet300"            # a name in fastticket.models' registry, or "torchvision:<name>"
    dataset: str = "mnist5k"           # "mnist5k" (embedded, offline), "mnist", "cifar10"
    data_dir: Optional[str] = None     # where torchvision datasets live (or are downloaded to)
    val_size: int = 500                # validation images held out of the training split

    # how to train one level
    iterations: int = 2000
    batch_size: int = 60
    optimizer: str = "adam"            # "adam" | "adamw" | "sgd"
    lr: float = 1.2e-3
    momentum: float = 0.9              # SGD only
    weight_decay: float = 0.0
    lr_milestones: list = field(default_factory=list)  # iterations where lr *= lr_gamma
    lr_gamma: float = 0.1
    warmup_iters: int = 0              # linear lr warmup from 0 over this many iterations
    augment: bool = False              # GPU-side random flip + crop (CIFAR)
    eval_every: int = 100              # validation/test evaluation period in iterations

    # how to prune
    levels: int = 10                   # pruning levels after the dense level 0 (levels 0..L are trained)
    scope: str = "layerwise"           # "layerwise" | "global"
    rate: float = 0.2                  # fraction of surviving weights removed per level (fc layers / global)
    conv_rate: Optional[float] = None  # layerwise rate for conv layers (None: same as `rate`)
    output_rate: Optional[float] = None  # layerwise rate for the output layer (None: same as `rate`)
    exclude: list = field(default_factory=list)  # layer names never pruned ("output" means the output layer)
    granularity: str = "element"       # "element" | "block:RxC"
    criterion: str = "magnitude"       # "magnitude" | "movement" | "random"
    rewind_iter: int = 0               # 0: rewind to init; k > 0: late rewinding to iteration k

    # experiment design
    controls: list = field(default_factory=lambda: ["reinit"])  # subset of ["reinit", "random"]
    trials: int = 1
    seed: int = 0
    device: str = "cpu"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SearchConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; known keys are {sorted(known)}")
        return cls(**data)

    def replace(self, **changes: Any) -> "SearchConfig":
        return dataclasses.replace(self, **changes)
