"""A researcher's own training recipe: an optimizer, an lr scheduler and a loss given as functions.

The config names them like a user model (`PKG.MODULE:FUNCTION`, or a name the Python API serves for the
callable it was handed; fastticket.lottery.sources), so config.json records each one's source hash and a resume
with a changed function is refused:
- `optimizer`: `params -> torch.optim.Optimizer` (any torch optimizer, called once per arm per level, so
  rewinding starts it fresh). The masked layers mask the weight gradient, and after every step
  `mask_optimizer_state_` zeroes pruned weights and their optimizer state, so no optimizer can revive them.
- `lr_scheduler`: `optimizer -> torch.optim.lr_scheduler.LRScheduler`, stepped once per iteration (an arm that
  starts at iteration k finds it stepped k times; fine-tuning, --rewind none, holds it at the last iteration).
  It replaces the config's lr, lr_milestones, lr_gamma and warmup_iters.
- `loss`: `(outputs, labels) -> the batch's mean loss` (default cross-entropy). Labels may then be any tensor;
  accuracy is reported only where it means something: outputs [B, C] and integer labels [B].

Arms with a recipe function train one at a time (the stacked engine steps only its own masked optimizers).
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from fastticket.errors import ConfigError
from fastticket.lottery.sources import is_user, resolve

RECIPE_FIELDS: Tuple[str, ...] = ("optimizer", "lr_scheduler", "loss")

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def user_functions(config: Any) -> Tuple[str, ...]:
    """The recipe fields of `config` that name a user function."""
    return tuple(f for f in RECIPE_FIELDS if getattr(config, f) is not None and is_user(getattr(config, f)))


def user_optimizer(config: Any) -> bool:
    return is_user(config.optimizer)


def build_optimizer(config: Any, model: nn.Module) -> torch.optim.Optimizer:
    fn, _ = resolve(config.optimizer)
    optimizer = fn(model.parameters())
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ConfigError(f"optimizer function {config.optimizer} returned {type(optimizer).__name__}, not a "
                          f"torch.optim.Optimizer; it takes the model's parameters and returns one")
    return optimizer


def build_scheduler(config: Any, optimizer: torch.optim.Optimizer) -> Optional[Any]:
    """The arm's scheduler over its fresh optimizer, or None without one."""
    if config.lr_scheduler is None:
        return None
    fn, _ = resolve(config.lr_scheduler)
    scheduler = fn(optimizer)
    if not isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler):
        raise ConfigError(f"lr_scheduler function {config.lr_scheduler} returned {type(scheduler).__name__}, not a "
                          f"torch.optim.lr_scheduler.LRScheduler stepped once per iteration (ReduceLROnPlateau, "
                          f"which needs a metric, is not supported)")
    return scheduler


def advance_scheduler(scheduler: Any, position: int) -> None:
    """Step `scheduler` until it stands at iteration `position` (its last_epoch counts the steps taken)."""
    with warnings.catch_warnings():  # an arm starting at k steps it k times before its first optimizer step
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)`")
        while scheduler.last_epoch < position:
            scheduler.step()


def loss_function(config: Any) -> LossFn:
    return F.cross_entropy if config.loss is None else resolve(config.loss)[0]


def accuracy_counts(outputs: torch.Tensor, labels: torch.Tensor) -> bool:
    """Does accuracy mean something for these outputs and labels (classification)?"""
    return outputs.dim() == 2 and labels.dim() == 1 and not labels.is_floating_point()
