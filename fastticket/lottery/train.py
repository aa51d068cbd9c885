"""Training one arm of a search: the loop, evaluation, early-stopping bookkeeping and the rolling checkpoint.

`train_arm` trains a prepared model (masks installed, weights rewound) from `ArmSpec.start_iter` to
`config.iterations`, evaluating every `eval_every` iterations, and writes the arm's files through its ArmDir.
Batches are a pure function of the iteration, and `ArmState` (model, optimizer, iteration, train-loss
accumulator, metrics, RNG) is what the checkpoint holds, so a resumed arm gives bit-identical numbers to an
uninterrupted one on CPU.

`train_arms` trains a list of arms (`ArmJob`: spec, prepared model, directory, batch seed) that share a start:
one at a time through the plain model (`SingleEngine`, the K = 1 path) or all at once as one stacked model
(`fastticket.lottery.batched.StackedEngine`). The loop is the same for both and does no device-to-host transfer per
step: each arm's train loss is summed on the device and read at evaluation points, where finiteness is
checked too (a diverged arm is reported at the first evaluation whose loss is not finite, its state saved,
and the others carry on). An arm's `EvalHook` runs after each of its evaluations and may stop it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import time
import warnings
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from fastticket.lottery import platform as distributed
from fastticket.lottery.compiled import make_train_step
from fastticket.lottery.config import SearchConfig
from fastticket.errors import DamagedFileError
from fastticket.sparse.functional import gradient_masked_by_optimizer
from fastticket.sparse.nn import densities, masked_modules, sparsify
from fastticket.lottery.rundir import ArmDir

if TYPE_CHECKING:  # data/models import torchvision-adjacent code; only the annotations need them here
    from fastticket.lottery.data import DatasetInfo, DeviceData

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
        """Training has reached `iteration` (steps taken, counted from 0). Called a few times per second,
        not per step; `loss` is the last evaluated train loss (NaN before the first evaluation)."""

    def evaluated(self, iteration: int, loss: float, val_acc: float) -> None:
        pass

    def training_finished(self) -> None:
        pass

    def message(self, text: str) -> None:
        print(text, file=sys.stderr)


# ------------------------------------------------------------------------------------------ building blocks

def build_masked_model(config: SearchConfig, info: "DatasetInfo", seed: int, device: torch.device) -> nn.Module:
    """A freshly initialised model (init drawn from `seed`) with every Linear / Conv2d masked (all ones)."""
    from fastticket.lottery.models import build_model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(config.model, info)
    # Every layer is masked, excluded ones too: they simply keep an all-ones mask, so the optimizer and the
    # kernels treat all layers alike.
    sparsify(model)
    return model.to(device)


def make_optimizer(config: SearchConfig, model: Union[nn.Module, Sequence[torch.Tensor]],
                   masks: Optional[Sequence[Optional[torch.Tensor]]] = None) -> torch.optim.Optimizer:
    """The config's masked optimizer over a model's parameters, or over given tensors with explicit `masks`
    (the stacked parameters of a group of arms, fastticket.lottery.batched)."""
    from fastticket.sparse.optim import MaskedAdam, MaskedAdamW, MaskedSGD
    params = list(model.parameters()) if isinstance(model, nn.Module) else list(model)
    if config.optimizer == "sgd":
        return MaskedSGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay,
                         masks=masks)
    if config.optimizer == "adamw":
        return MaskedAdamW(params, lr=config.lr, weight_decay=config.weight_decay, masks=masks)
    return MaskedAdam(params, lr=config.lr, weight_decay=config.weight_decay, masks=masks)


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
    """(mean cross-entropy, accuracy) over a whole split; in a data-parallel search `x, y` are this rank's
    share of it and the sums are added over the ranks (every rank gets the whole split's numbers)."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=x.device)  # loss sum, correct, count
    for i in range(0, x.shape[0], EVAL_CHUNK):
        out = model(x[i:i + EVAL_CHUNK])
        yy = y[i:i + EVAL_CHUNK]
        totals[0] += F.cross_entropy(out.float(), yy, reduction="sum").double()
        totals[1] += (out.argmax(dim=1) == yy).sum()
    totals[2] = x.shape[0]
    model.train(was_training)
    context = distributed.current()
    if context.data_parallel:
        context.sum_(totals)
    loss_sum, correct, n = totals.tolist()
    return loss_sum / max(1.0, n), correct / max(1.0, n)


def early_stopping(metrics: List[Dict[str, float]]) -> Dict[str, Any]:
    """The early-stopping point: the first minimum of the validation loss (a NaN loss never counts)."""
    if not metrics:
        return {"early_stop_iter": None, "early_stop_val_loss": None, "test_acc_at_early_stop": None}
    best = min(range(len(metrics)),
               key=lambda i: (metrics[i]["val_loss"] if math.isfinite(metrics[i]["val_loss"]) else math.inf, i))
    return {"early_stop_iter": metrics[best]["iteration"], "early_stop_val_loss": metrics[best]["val_loss"],
            "test_acc_at_early_stop": metrics[best]["test_acc"]}


# ------------------------------------------------------------------------------------------------ arms

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

    @property
    def label(self) -> str:
        return f"{self.arm}{self.replica + 1 if self.replica else ''}"


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


class SingleEngine:
    """One arm through its own model and optimizer: the plain PyTorch step, nothing stacked; with
    `config.compile` the step is torch.compile'd (fastticket.lottery.compiled)."""

    def __init__(self, config: SearchConfig, jobs: Sequence[ArmJob], states: Sequence[ArmState],
                 data: "DeviceData") -> None:
        (self.job,), (self.state,) = jobs, states
        self.config, self.data = config, data
        self.train_step = make_train_step(data_parallel(self.job.model, has_statistics(self.job.model)),
                                          self.state.optimizer,
                                          compiled=config.compile)

    def set_lr(self, lr: float) -> None:
        self.train_step.set_lr(lr)

    def step(self, iteration: int) -> torch.Tensor:
        """One training step of every arm; returns the arms' losses [K] on the device (no sync)."""
        x, y = self.data.batch(iteration, self.config.batch_size, self.job.seed)
        # The arm's optimizer is a masked one (make_optimizer): its step leaves pruned weights and state exactly
        # zero whatever the gradient holds there, so the layers' gradient mask (an autograd Function per layer
        # and step) is skipped. The gradient is deliberately not masked: Adam's sqrt over a second moment full
        # of exact zeros runs several times slower on CPU than over dense values (measured: 1.25 vs 0.16 ms for
        # 470k floats), so zeroing after the step is the faster order.
        with gradient_masked_by_optimizer() if not self.config.compile else contextlib.nullcontext():
            loss = self.train_step.loss(x, y)
        self.train_step.update(loss)
        return loss.detach().reshape(1)

    def sync_out(self) -> None:
        """Make each arm's model and optimizer hold the arm's current state (nothing to do here)."""


def has_statistics(model: nn.Module) -> bool:
    """Does `model` hold buffers besides its masks (BatchNorm running statistics)?"""
    return any(not name.endswith("weight_mask") for name, _ in model.named_buffers())


def data_parallel(module: nn.Module, statistics: bool) -> nn.Module:
    """`module` as this process trains it: wrapped in DistributedDataParallel in a data-parallel search (its
    gradients averaged over the ranks during backward), else itself. DDP broadcasts rank 0's parameters and
    buffers when it is built, so every rank starts an engine from one state; it broadcasts buffers before
    each forward only where the model has `statistics` (BatchNorm: every rank then evaluates with rank 0's
    running statistics, DDP's default), since masks never change while an arm trains."""
    if not distributed.current().data_parallel:
        return module
    from torch.nn.parallel import DistributedDataParallel
    device = next(module.parameters()).device
    with warnings.catch_warnings():  # torch >= 2.12 renames the argument; the old name still means the same
        warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
        return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None,
                                       broadcast_buffers=statistics)


def _engine(config: SearchConfig, jobs: Sequence[ArmJob], states: Sequence[ArmState], data: "DeviceData",
            stacked: bool, lr: Optional[float]):
    if stacked:
        from fastticket.lottery.batched import StackedEngine
        engine = StackedEngine(config, jobs, states, data)
    else:
        engine = SingleEngine(config, jobs, states, data)
    if lr is not None:
        engine.set_lr(lr)
    return engine


_PROGRESS_INTERVAL_S = 0.25


def train_arms(config: SearchConfig, jobs: Sequence[ArmJob], data: "DeviceData", prunable: Sequence[str],
               progress: Progress, stacked: Optional[bool] = None) -> List[Dict[str, Any]]:
    """Train `jobs` (each from its model's current state, or its checkpoint) and write their files; returns
    their result.json dicts in order. stacked=None: one stacked model when there is more than one arm;
    stacked=False: each arm alone, one after the other.

    Arms that stand at different points (iteration, start iteration, fixed lr) after their checkpoints are
    read train as separate groups one after the other, so each group shares its lr and step count.
    """
    context = distributed.current()
    states, restored = [], []
    for job in jobs:
        state = ArmState(job.model, make_optimizer(config, job.model), job.spec.start_iter)
        # Data-parallel: rank 0 alone reads checkpoints (and may discard a damaged one); the others get its state.
        if job.directory.writes and job.directory.has_checkpoint():
            if not _restore(state, job.directory, progress, job.hook):
                state = ArmState(job.model, make_optimizer(config, job.model), job.spec.start_iter)
            # metrics.jsonl may hold evaluations after the checkpoint (killed in between): the checkpoint wins.
            job.directory.write_metrics(state.metrics)
        restored.append(state.iteration != job.spec.start_iter or bool(state.metrics))
        states.append(state)
    if context.data_parallel:
        _share_restored(jobs, states, restored if context.main else None)
    stacked = stacked if stacked is not None else len(jobs) > 1
    groups: Dict[Tuple[Any, ...], List[int]] = {}
    for i, (job, state) in enumerate(zip(jobs, states)):
        key = (state.iteration, job.spec.start_iter, job.spec.lr_fixed_at, 0 if stacked else i)
        groups.setdefault(key, []).append(i)
    results: List[Optional[Dict[str, Any]]] = [None] * len(jobs)
    for idx in groups.values():
        out = _train_group(config, [jobs[i] for i in idx], [states[i] for i in idx], data, prunable, progress,
                           stacked)
        for i, r in zip(idx, out):
            results[i] = r
    return results  # type: ignore[return-value]


def _share_restored(jobs: Sequence[ArmJob], states: Sequence[ArmState], restored: Optional[List[bool]]) -> None:
    """Data-parallel: every rank continues from what rank 0 restored (`restored` given on rank 0 only): the
    checkpointed arms' model, optimizer, counters, hook state and RNG, broadcast from rank 0."""
    context = distributed.current()
    payload = None
    if context.main:
        payload = [{**states[i].state_dict(0.0), **({"hook": jobs[i].hook.state_dict()} if jobs[i].hook else {})}
                   if again else None for i, again in enumerate(restored or [])]
    payload = context.broadcast(payload)
    if context.main:
        return
    for job, state, ckpt in zip(jobs, states, payload):
        if ckpt is not None:
            state.load_state_dict(ckpt)
            if job.hook is not None and "hook" in ckpt:
                job.hook.load_state_dict(ckpt["hook"])


def _finish(job: ArmJob, state: ArmState, prunable: Sequence[str], session_s: float, status: str,
            message: Optional[str] = None) -> Dict[str, Any]:
    spec = job.spec
    job.directory.save_final(job.model.state_dict())
    total, per_layer = densities(job.model, prunable)
    result = {"level": spec.level, "arm": spec.arm, "trial": spec.trial}
    if spec.replica:
        result["replica"] = spec.replica
    result.update({"density": total, "layer_density": per_layer, **early_stopping(state.metrics),
                   "final_test_acc": state.metrics[-1]["test_acc"] if status == "ok" and state.metrics else None,
                   "final_iter": state.iteration, "wall_time_s": state.wall_time_s + session_s, "status": status,
                   **spec.result_extra, **(job.hook.result_fields() if job.hook is not None else {})})
    if message:
        result["message"] = message
    job.directory.write_result(result)
    job.directory.drop_checkpoint()  # final.pt + result.json are what a finished arm keeps
    return result


def _train_group(config: SearchConfig, jobs: List[ArmJob], states: List[ArmState], data: "DeviceData",
                 prunable: Sequence[str], progress: Progress, stacked: bool) -> List[Dict[str, Any]]:
    """Arms at one (iteration, start iteration, fixed lr): one loop, one engine."""
    context = distributed.current()
    results: Dict[int, Dict[str, Any]] = {}
    live = list(range(len(jobs)))
    t0 = time.perf_counter()
    iteration = states[0].iteration
    device = data.device
    loss_sums = torch.tensor([s.loss_sum for s in states], dtype=torch.float64, device=device)
    loss_count = states[0].loss_count
    for job in jobs:
        job.model.train()
    session_s = 0.0
    # A resumed arm whose hook had already stopped it (e.g. early-bird) is finished as it stands.
    for i in [i for i in live if jobs[i].hook is not None and jobs[i].hook.stopped]:
        results[i] = _finish(jobs[i], states[i], prunable, session_s, "ok")
        live.remove(i)
    first = jobs[0].spec
    lr: Optional[float] = None  # set by the first step (the lr is asked for once per step, never more)
    engine = (_engine(config, [jobs[i] for i in live], [states[i] for i in live], data, stacked, lr)
              if live else None)
    label = (f"L{first.level} {first.label} t{first.trial}" if len(jobs) == 1
             else f"L{first.level} {len(jobs)} arms from it {first.start_iter}")
    progress.training_started(label, config.iterations, iteration)
    next_report, last_loss = t0 + _PROGRESS_INTERVAL_S, math.nan
    try:
        while iteration < config.iterations and live:
            new_lr = arm_lr(config, first, iteration)
            if new_lr != lr:  # written into the param groups only when the schedule moves
                lr = new_lr
                engine.set_lr(lr)
            losses = engine.step(iteration)
            if len(live) == len(jobs):
                loss_sums += losses
            else:
                loss_sums[live] += losses.to(torch.float64)
            iteration += 1
            loss_count += 1
            captures = [i for i in live if jobs[i].spec.capture_rewind_at == iteration]
            if captures:
                engine.sync_out()
                for i in captures:
                    jobs[i].directory.save_rewind(cpu_state(jobs[i].model))
            now = time.perf_counter()
            if now >= next_report:
                progress.step(iteration, last_loss)
                next_report = now + _PROGRESS_INTERVAL_S
            if iteration % config.eval_every != 0 and iteration != config.iterations:
                continue
            engine.sync_out()
            # The one device-to-host read of the train losses, per evaluation (data-parallel: the mean of the
            # ranks' shard means, the global batch's mean loss).
            sums = (context.sum_(loss_sums.clone()) / context.world if context.data_parallel else loss_sums).tolist()
            session_s = time.perf_counter() - t0
            diverged, stopped = [], []
            for i in live:
                job, state = jobs[i], states[i]
                state.iteration, state.loss_sum, state.loss_count = iteration, sums[i], loss_count
                if not math.isfinite(sums[i]):
                    spec = job.spec
                    message = (f"level {spec.level} {spec.label} trial {spec.trial}: loss became {sums[i]} between "
                               f"iterations {iteration - loss_count} and {iteration} (lr {lr:g}); arm stopped, "
                               f"state saved in {job.directory.path}")
                    job.directory.write_metrics(state.metrics)
                    progress.message(f"fastticket: diverged: {message}")
                    results[i] = _finish(job, state, prunable, session_s, "diverged", message)
                    diverged.append(i)
                    continue
                if context.data_parallel and has_statistics(job.model):  # evaluate with rank 0's statistics
                    context.broadcast_tensors_(list(job.model.buffers()))
                val_loss, val_acc = evaluate(job.model, data.val.x, data.val.y)
                _, test_acc = evaluate(job.model, data.test.x, data.test.y)
                state.record_evaluation(val_loss, val_acc, test_acc)
                ckpt = state.state_dict(session_s)
                if job.hook is not None:
                    job.hook(job.model, iteration)  # may stop this arm (hook.stopped), after this checkpoint
                    ckpt["hook"] = job.hook.state_dict()
                    if job.hook.stopped:
                        stopped.append(i)
                job.directory.save_checkpoint(ckpt)
                job.directory.write_metrics(state.metrics)
                last_loss = state.metrics[-1]["train_loss"]
                progress.evaluated(iteration, last_loss, val_acc)
            loss_sums.zero_()
            loss_count = 0
            for i in stopped:
                results[i] = _finish(jobs[i], states[i], prunable, time.perf_counter() - t0, "ok")
            if diverged or stopped:
                live = [i for i in live if i not in diverged and i not in stopped]
                if live:  # the others carry on: a new engine over the arms left, from their synced state
                    engine = _engine(config, [jobs[i] for i in live], [states[i] for i in live], data,
                                     stacked, lr)
    finally:
        progress.training_finished()
    session_s = time.perf_counter() - t0
    for i in live:
        jobs[i].directory.write_metrics(states[i].metrics)
        results[i] = _finish(jobs[i], states[i], prunable, session_s, "ok")
    return [results[i] for i in range(len(jobs))]


def train_arm(config: SearchConfig, spec: ArmSpec, model: nn.Module, data: "DeviceData", directory: ArmDir,
              seed: int, prunable: Sequence[str], progress: Progress,
              hook: Optional[EvalHook] = None) -> Dict[str, Any]:
    """Train one arm from `model`'s current state (or its checkpoint), write its files, return result.json.
    `hook` (e.g. fastticket.lottery.early_bird.EarlyBird) runs at every evaluation and may stop the training."""
    return train_arms(config, [ArmJob(spec, model, directory, seed, hook)], data, prunable, progress,
                      stacked=False)[0]
