"""Training one arm of a search: the loop, evaluation, early-stopping bookkeeping and the rolling checkpoint.

`train_arm` trains a prepared model (masks installed, weights rewound) from `ArmSpec.start_iter` to
`config.iterations`, evaluating every `eval_every` iterations, and writes the arm's files through its ArmDir.
Batches are a pure function of the iteration, and `ArmState` (model, optimizer, iteration, train-loss
accumulator, metrics, RNG) is what the checkpoint holds, so a resumed arm gives bit-identical numbers to an
uninterrupted one on CPU.
"""
from __future__ import annotations

import dataclasses
import math
import sys
import time
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from fastticket.config import SearchConfig
from fastticket.errors import DamagedFileError
from fastticket.nn import densities, masked_modules, sparsify
from fastticket.rundir import ArmDir

if TYPE_CHECKING:  # data/models import torchvision-adjacent code; only the annotations need them here
    from fastticket.data import DatasetInfo, DeviceData

EVAL_CHUNK = 1000  # evaluation batch: bounds activation memory for big models / big test sets


class Progress:
    """What a search reports while it runs. This base draws nothing and writes messages to stderr; the CLI
    passes a subclass with progress bars."""

    def search_started(self, total_arms: int) -> None:
        pass

    def arm_started(self, level: int, levels: int, arm: str, trial: int) -> None:
        """An arm starts training (finished arms of a resumed run are not announced)."""

    def arms_done(self, count: int = 1) -> None:
        """`count` arms are finished or skipped."""

    def search_finished(self) -> None:
        pass

    def training_started(self, label: str, total: int, initial: int) -> None:
        pass

    def step(self, iteration: int, loss: float) -> None:
        """A training step finished; `iteration` counts the steps taken."""

    def evaluated(self, iteration: int, loss: float, val_acc: float) -> None:
        pass

    def training_finished(self) -> None:
        pass

    def message(self, text: str) -> None:
        print(text, file=sys.stderr)


# ------------------------------------------------------------------------------------------ building blocks

def build_masked_model(config: SearchConfig, info: "DatasetInfo", seed: int, device: torch.device) -> nn.Module:
    """A freshly initialised model (init drawn from `seed`) with every Linear / Conv2d masked (all ones)."""
    from fastticket.models import build_model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(config.model, info)
    # Every layer is masked, excluded ones too: they simply keep an all-ones mask, so the optimizer and the
    # kernels treat all layers alike.
    sparsify(model)
    return model.to(device)


def make_optimizer(config: SearchConfig, model: nn.Module) -> torch.optim.Optimizer:
    from fastticket.optim import MaskedAdam, MaskedAdamW, MaskedSGD
    params = list(model.parameters())
    if config.optimizer == "sgd":
        return MaskedSGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    if config.optimizer == "adamw":
        return MaskedAdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    return MaskedAdam(params, lr=config.lr, weight_decay=config.weight_decay)


def lr_at(config: SearchConfig, iteration: int) -> float:
    """The lr of the step taken at `iteration` (0-based): linear warmup, then x gamma at each milestone passed."""
    lr = config.lr
    if config.warmup_iters > 0:
        lr *= min(1.0, (iteration + 1) / config.warmup_iters)
    passed = sum(1 for m in config.lr_milestones if iteration >= m)
    return lr * (config.lr_gamma ** passed)


def cpu_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Tuple[float, float]:
    """(mean cross-entropy, accuracy) over a whole split."""
    was_training = model.training
    model.eval()
    loss_sum, correct = 0.0, 0
    for i in range(0, x.shape[0], EVAL_CHUNK):
        out = model(x[i:i + EVAL_CHUNK])
        yy = y[i:i + EVAL_CHUNK]
        loss_sum += float(F.cross_entropy(out.float(), yy, reduction="sum"))
        correct += int((out.argmax(dim=1) == yy).sum())
    model.train(was_training)
    n = max(1, x.shape[0])
    return loss_sum / n, correct / n


def early_stopping(metrics: List[Dict[str, float]]) -> Dict[str, Any]:
    """The early-stopping point: the first minimum of the validation loss (a NaN loss never counts)."""
    if not metrics:
        return {"early_stop_iter": None, "early_stop_val_loss": None, "test_acc_at_early_stop": None}
    best = min(range(len(metrics)),
               key=lambda i: (metrics[i]["val_loss"] if math.isfinite(metrics[i]["val_loss"]) else math.inf, i))
    return {"early_stop_iter": metrics[best]["iteration"], "early_stop_val_loss": metrics[best]["val_loss"],
            "test_acc_at_early_stop": metrics[best]["test_acc"]}


# ------------------------------------------------------------------------------------------------ one arm

@dataclasses.dataclass
class ArmSpec:
    level: int
    arm: str
    trial: int
    start_iter: int              # the first iteration this arm trains (k for rewound arms at L >= 1)
    capture_rewind_at: Optional[int] = None  # level 0 ticket with late rewinding: save the state at k
    lr_fixed_at: Optional[int] = None  # every step takes the lr of this iteration (--rewind none: the final lr)
    result_extra: Dict[str, Any] = dataclasses.field(default_factory=dict)  # more result.json fields


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

    def state_dict(self, session_s: float) -> Dict[str, Any]:
        """The checkpoint (with the global torch RNG state), `session_s` seconds into this session."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "iteration": self.iteration, "metrics": self.metrics, "loss_sum": self.loss_sum,
                "loss_count": self.loss_count, "wall_time_s": self.wall_time_s + session_s,
                "rng": torch.get_rng_state()}

    def load_state_dict(self, ckpt: Dict[str, Any]) -> None:
        """Restore a checkpoint; a RuntimeError/KeyError/ValueError means it does not fit the model."""
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.iteration, self.metrics = int(ckpt["iteration"]), list(ckpt["metrics"])
        self.loss_sum, self.loss_count = float(ckpt["loss_sum"]), int(ckpt["loss_count"])
        self.wall_time_s = float(ckpt["wall_time_s"])
        torch.set_rng_state(ckpt["rng"])

    def record_step(self, loss: float) -> None:
        self.iteration += 1
        self.loss_sum += loss
        self.loss_count += 1

    def record_evaluation(self, val_loss: float, val_acc: float, test_acc: float) -> None:
        self.metrics.append({"iteration": self.iteration, "train_loss": self.loss_sum / max(1, self.loss_count),
                             "val_loss": val_loss, "val_acc": val_acc, "test_acc": test_acc})
        self.loss_sum, self.loss_count = 0.0, 0


def _restore(state: ArmState, directory: ArmDir, progress: Progress, hook: Optional[EvalHook] = None) -> bool:
    """Continue from the arm's checkpoint. One that fails verification (checksum, arm, mask: ArmDir) or does
    not fit is discarded, the model left as it was (its start state), and False returned: the arm restarts
    from its beginning, which gives the same numbers, only later. `hook`'s state comes back with it."""
    before = {k: v.detach().clone() for k, v in state.model.state_dict().items()}
    hook_before = hook.state_dict() if hook is not None else None
    try:
        ckpt = directory.load_checkpoint(masks={n: m.weight_mask for n, m in masked_modules(state.model)})
        state.load_state_dict(ckpt)
        if hook is not None and "hook" in ckpt:
            hook.load_state_dict(ckpt["hook"])
        return True
    except (RuntimeError, KeyError, ValueError, TypeError) as exc:
        error = exc if isinstance(exc, DamagedFileError) else directory.checkpoint_error(exc)
        state.model.load_state_dict(before)
        if hook is not None:
            hook.load_state_dict(hook_before)
        directory.drop_checkpoint()
        progress.message(f"fastticket: {error}; discarded it, this arm restarts from its beginning")
        return False


def train_arm(config: SearchConfig, spec: ArmSpec, model: nn.Module, data: "DeviceData", directory: ArmDir,
              seed: int, prunable: Sequence[str], progress: Progress,
              hook: Optional[EvalHook] = None) -> Dict[str, Any]:
    """Train one arm from `model`'s current state (or its checkpoint), write its files, return result.json.
    `hook` (e.g. fastticket.early_bird.EarlyBird) runs at every evaluation and may stop the training."""
    state = ArmState(model, make_optimizer(config, model), spec.start_iter)
    if directory.has_checkpoint():
        if not _restore(state, directory, progress, hook):
            state = ArmState(model, make_optimizer(config, model), spec.start_iter)
        # metrics.jsonl may hold evaluations after the checkpoint (killed in between): the checkpoint wins.
        directory.write_metrics(state.metrics)
    t0 = time.perf_counter()

    def checkpoint() -> Dict[str, Any]:
        ckpt = state.state_dict(time.perf_counter() - t0)
        if hook is not None:
            ckpt["hook"] = hook.state_dict()
        return ckpt

    def finish(status: str, message: Optional[str] = None) -> Dict[str, Any]:
        directory.save_final(model.state_dict())
        total, per_layer = densities(model, prunable)
        result = {"level": spec.level, "arm": spec.arm, "trial": spec.trial, "density": total,
                  "layer_density": per_layer, **early_stopping(state.metrics),
                  "final_test_acc": state.metrics[-1]["test_acc"] if status == "ok" and state.metrics else None,
                  "final_iter": state.iteration, "wall_time_s": state.wall_time_s + (time.perf_counter() - t0),
                  "status": status, **spec.result_extra, **(hook.result_fields() if hook is not None else {})}
        if message:
            result["message"] = message
        directory.write_result(result)
        directory.drop_checkpoint()  # final.pt + result.json are what a finished arm keeps
        return result

    model.train()
    optimizer = state.optimizer
    progress.training_started(f"L{spec.level} {spec.arm} t{spec.trial}", config.iterations, state.iteration)
    try:
        while state.iteration < config.iterations and not (hook is not None and hook.stopped):
            lr = arm_lr(config, spec, state.iteration)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x, y = data.batch(state.iteration, config.batch_size, seed)
            loss = F.cross_entropy(model(x), y)
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                # Stop before a NaN/inf gradient reaches the weights: the saved state is the one that diverged.
                message = (f"level {spec.level} {spec.arm} trial {spec.trial}: loss became {loss_value} at "
                           f"iteration {state.iteration} (lr {lr:g}); arm stopped, state saved in {directory.path}")
                directory.write_metrics(state.metrics)
                progress.message(f"fastticket: diverged: {message}")
                return finish("diverged", message)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            state.record_step(loss_value)
            progress.step(state.iteration, loss_value)
            if spec.capture_rewind_at is not None and state.iteration == spec.capture_rewind_at:
                directory.save_rewind(cpu_state(model))
            if state.iteration % config.eval_every == 0 or state.iteration == config.iterations:
                val_loss, val_acc = evaluate(model, data.val.x, data.val.y)
                _, test_acc = evaluate(model, data.test.x, data.test.y)
                state.record_evaluation(val_loss, val_acc, test_acc)
                if hook is not None:
                    hook(model, state.iteration)  # may stop the loop (hook.stopped), after this checkpoint
                directory.save_checkpoint(checkpoint())
                directory.write_metrics(state.metrics)
                progress.evaluated(state.iteration, loss_value, val_acc)
    finally:
        progress.training_finished()
    directory.write_metrics(state.metrics)
    return finish("ok")
