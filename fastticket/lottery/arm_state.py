"""What an arm is while it trains: its spec (which arm, where it starts), its job (the prepared model, its
directory and batch stream), its state (everything a checkpoint holds), the per-evaluation hook, and the lr
it steps at. fastticket.lottery.train runs them; this module only describes them."""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from fastticket.lottery.arms import arm_name
from fastticket.lottery.armdir import ArmDir
from fastticket.lottery.config import SearchConfig


def lr_at(config: SearchConfig, iteration: int) -> float:
    """The lr of the step taken at `iteration` (0-based): linear warmup, then x gamma at each milestone passed."""
    lr = config.lr
    if config.warmup_iters > 0:
        lr *= min(1.0, (iteration + 1) / config.warmup_iters)
    passed = sum(1 for m in config.lr_milestones if iteration >= m)
    return lr * (config.lr_gamma ** passed)



@dataclasses.dataclass
class ArmSpec:
    level: int
    arm: str
    trial: int
    start_iter: int              # the first iteration this arm trains (k for rewound arms at L >= 1)
    capture_rewind_at: Optional[int] = None  # level 0 ticket with late rewinding: save the state at k
    lr_fixed_at: Optional[int] = None  # every step takes the lr of this iteration (--rewind none: the final lr)
    result_extra: Dict[str, Any] = dataclasses.field(default_factory=dict)  # more result.json fields
    replica: int = 0             # r-th control of its kind for this trial (reinit x R); 0 is the first
    dst: Optional[str] = None    # dynamic sparse training (rigl / set): the mask moves (fastticket.lottery.dst)

    @property
    def label(self) -> str:
        return arm_name(self.arm, self.replica)


def arm_lr(config: SearchConfig, spec: ArmSpec, iteration: int) -> float:
    """The lr of the arm's step at `iteration`: the schedule's, or a fixed one (fine-tuning)."""
    return lr_at(config, iteration if spec.lr_fixed_at is None else spec.lr_fixed_at)


class EvalHook:
    """Called after each evaluation (and before its checkpoint) with the model and the iteration; returning
    True stops the arm's training there (status ok). Its state_dict travels in the checkpoint."""

    def __call__(self, model: nn.Module, iteration: int) -> bool:
        return False

    stopped: bool = False

    def result_fields(self) -> Dict[str, Any]:
        return {}

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        pass


@dataclasses.dataclass
class ArmState:
    """Everything a resumed arm needs to continue exactly where it stopped: the checkpoint's contents."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    iteration: int
    metrics: List[Dict[str, float]] = dataclasses.field(default_factory=list)
    loss_sum: float = 0.0          # train loss accumulated since the last evaluation
    loss_count: int = 0
    wall_time_s: float = 0.0       # training time of earlier sessions (before a resume)
    scheduler: Optional[Any] = None  # a user's lr scheduler (fastticket.lottery.recipe), stepped per iteration
    rng: Optional[torch.Tensor] = None  # the global RNG state its checkpoint saved (None: it starts fresh)

    def state_dict(self, session_s: float) -> Dict[str, Any]:
        """The checkpoint (with the global torch RNG state), `session_s` seconds into this session."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "iteration": self.iteration, "metrics": self.metrics, "loss_sum": self.loss_sum,
                "loss_count": self.loss_count, "wall_time_s": self.wall_time_s + session_s,
                "rng": torch.get_rng_state(),
                **({"scheduler": self.scheduler.state_dict()} if self.scheduler is not None else {})}

    def load_state_dict(self, ckpt: Dict[str, Any]) -> None:
        """Restore a checkpoint; a RuntimeError/KeyError/ValueError means it does not fit the model."""
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(ckpt["scheduler"])
        self.iteration, self.metrics = int(ckpt["iteration"]), list(ckpt["metrics"])
        self.loss_sum, self.loss_count = float(ckpt["loss_sum"]), int(ckpt["loss_count"])
        self.wall_time_s = float(ckpt["wall_time_s"])
        self.rng = ckpt["rng"]
        torch.set_rng_state(self.rng)

    def record_evaluation(self, val_loss: float, val_acc: float, test_acc: float) -> None:
        self.metrics.append({"iteration": self.iteration, "train_loss": self.loss_sum / max(1, self.loss_count),
                             "val_loss": val_loss, "val_acc": val_acc, "test_acc": test_acc})
        self.loss_sum, self.loss_count = 0.0, 0


@dataclasses.dataclass
class ArmJob:
    """An arm as data: what it is (spec), its prepared model (masks installed, weights rewound), where its
    files go, its batch stream (the trial's seed: arms of one trial see the same batches) and its
    per-evaluation hook (e.g. fastticket.lottery.early_bird.EarlyBird), if any."""

    spec: ArmSpec
    model: nn.Module
    directory: ArmDir
    seed: int
    hook: Optional[EvalHook] = None
