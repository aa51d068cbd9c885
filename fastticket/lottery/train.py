"""Training the arms of a search: the loop, evaluation, early-stopping bookkeeping and the rolling checkpoint.

`train_arms` trains prepared models (masks installed, weights rewound) from `ArmSpec.start_iter` to
`config.iterations`, evaluating every `eval_every` iterations, and writes each arm's files through its ArmDir.
Batches are a pure function of the iteration, and `ArmState` (model, optimizer, iteration, train-loss
accumulator, metrics, RNG) is what the checkpoint holds, so a resumed arm gives bit-identical numbers to an
uninterrupted one on CPU.

The arms (`ArmJob`: spec, prepared model, directory, batch seed) that stand at one point train as a group:
one loop over one engine of K arms (fastticket.lottery.engine, which decides whether to stack them). The loop
does no device-to-host transfer per step: each arm's train loss is summed on the device and read at
evaluation points, where finiteness is checked too (a diverged arm is reported at the first evaluation whose
loss is not finite, its state saved, and the others carry on). An arm's `EvalHook` runs after each of its evaluations and may stop it.
"""
from __future__ import annotations

import math
import time
import zlib
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from fastticket.errors import DamagedFileError
from fastticket.lottery import dst, stop
from fastticket.lottery.config import SearchConfig
from fastticket.lottery.engine import Engine, arms_per_engine, has_statistics, make_optimizer
from fastticket.lottery.platform import SOLO, Context
from fastticket.lottery.progress import Progress
from fastticket.lottery.recipe import LossFn, accuracy_counts, advance_scheduler, build_scheduler, loss_function
from fastticket.lottery.armdir import ArmDir
from fastticket.lottery.arm_state import ArmJob, ArmState, EvalHook, arm_lr
from fastticket.sparse.nn import densities, install_masks, masked_modules, masks_in_state, sparsify

if TYPE_CHECKING:  # data/models import torchvision-adjacent code; only the annotations need them here
    from fastticket.lottery.data import DatasetInfo, DeviceData

EVAL_CHUNK = 1000  # evaluation batch: bounds activation memory for big models / big test sets


# ------------------------------------------------------------------------------------------ building blocks

def build_masked_model(config: SearchConfig, info: "DatasetInfo", seed: int, device: torch.device) -> nn.Module:
    """A freshly initialised model (init drawn from `seed`) with every Linear / Conv2d masked (all ones)."""
    from fastticket.lottery.models import build_model
    from fastticket.lottery.sources import build_user_model, is_user
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_user_model(config.model) if is_user(config.model) else build_model(config.model, info)
    # Every layer is masked, excluded ones too: they simply keep an all-ones mask, so the optimizer and the
    # kernels treat all layers alike.
    sparsify(model)
    return model.to(device)


def cpu_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, context: Context = SOLO,
             loss_fn: Optional[LossFn] = None) -> Tuple[float, float]:
    """(mean loss, accuracy) over a whole split: cross-entropy, or a user's `loss_fn` (the batch mean) with
    accuracy NaN where it means nothing (fastticket.lottery.recipe.accuracy_counts). In a data-parallel search
    `x, y` are this rank's share of it and the sums are added over the ranks (every rank gets the whole split's
    numbers). An empty split (a user's data without validation) gives NaN for both."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=x.device)  # loss sum, correct, count
    for i in range(0, x.shape[0], EVAL_CHUNK):
        out = model(x[i:i + EVAL_CHUNK])
        yy = y[i:i + EVAL_CHUNK]
        if loss_fn is None:
            totals[0] += F.cross_entropy(out.float(), yy, reduction="sum").double()
            totals[1] += (out.argmax(dim=1) == yy).sum()
            continue
        totals[0] += loss_fn(out, yy).double() * yy.shape[0]
        totals[1] += (out.argmax(dim=1) == yy).sum() if accuracy_counts(out, yy) else math.nan
    totals[2] = x.shape[0]
    model.train(was_training)
    context.shard_sum_(totals)
    loss_sum, correct, n = totals.tolist()
    return (loss_sum / n, correct / n) if n else (math.nan, math.nan)


def early_stopping(metrics: List[Dict[str, float]]) -> Dict[str, Any]:
    """The early-stopping point: the first minimum of the validation loss (a NaN loss never counts); the last
    evaluation when no loss counts (e.g. no validation split)."""
    if not metrics:
        return {"early_stop_iter": None, "early_stop_val_loss": None, "test_acc_at_early_stop": None}
    best = min(range(len(metrics)), key=lambda i: (metrics[i]["val_loss"], i) if math.isfinite(metrics[i]["val_loss"])
               else (math.inf, -i))
    return {"early_stop_iter": metrics[best]["iteration"], "early_stop_val_loss": metrics[best]["val_loss"],
            "test_acc_at_early_stop": metrics[best]["test_acc"]}


def _restore(state: ArmState, directory: ArmDir, progress: Progress, hook: Optional[EvalHook] = None,
             job_dst: Optional[str] = None) -> bool:
    """Continue from the arm's checkpoint. One that fails verification (checksum, arm, mask: ArmDir) or does
    not fit is discarded, the model left as it was (its start state), and False returned: the arm restarts
    from its beginning, which gives the same numbers, only later. `hook`'s state comes back with it."""
    before = {k: v.detach().clone() for k, v in state.model.state_dict().items()}
    hook_before = hook.state_dict() if hook is not None else None
    try:
        # A dynamic arm's mask moves during training: its checkpoint holds the current one, not mask.pt's.
        ckpt = directory.load_checkpoint(masks=None if job_dst else
                                         {n: m.weight_mask for n, m in masked_modules(state.model)})
        if job_dst:  # its moved mask first, so loading the weights revives nothing
            install_masks(state.model, masks_in_state(state.model, ckpt["model"]))
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


_PROGRESS_INTERVAL_S = 0.25


def train_arms(config: SearchConfig, jobs: Sequence[ArmJob], data: "DeviceData", prunable: Sequence[str],
               progress: Progress, stacked: Optional[bool] = None, context: Context = SOLO) -> List[Dict[str, Any]]:
    """Train `jobs` (each from its model's current state, or its checkpoint) and write their files; returns
    their result.json dicts in order. `stacked`: how the engine steps them (fastticket.lottery.engine: None
    lets it decide per device and model; True: one stacked model; False: arm by arm).

    Arms that stand at different points (iteration, start iteration, fixed lr) after their checkpoints are
    read train as separate groups one after the other, so each group shares its lr and step count.
    """
    def fresh_state(job: ArmJob) -> ArmState:
        optimizer = make_optimizer(config, job.model)
        return ArmState(job.model, optimizer, job.spec.start_iter, scheduler=build_scheduler(config, optimizer))

    states, restored = [], []
    for job in jobs:
        state = fresh_state(job)
        # Data-parallel: rank 0 alone reads checkpoints (and may discard a damaged one); the others get its state.
        if job.directory.writes and job.directory.has_checkpoint():
            if not _restore(state, job.directory, progress, job.hook, job.spec.dst):
                state = fresh_state(job)
            # metrics.jsonl may hold evaluations after the checkpoint (killed in between): the checkpoint wins.
            job.directory.write_metrics(state.metrics)
        restored.append(state.iteration != job.spec.start_iter or bool(state.metrics))
        states.append(state)
    if context.data_parallel:
        _share_restored(jobs, states, restored if context.main else None, context)
    groups: Dict[Tuple[Any, ...], List[int]] = {}
    for i, (job, state) in enumerate(zip(jobs, states)):
        groups.setdefault((state.iteration, job.spec.start_iter, job.spec.lr_fixed_at), []).append(i)
    limit = arms_per_engine(config) or len(jobs)
    results: List[Optional[Dict[str, Any]]] = [None] * len(jobs)
    for members in groups.values():
        for g in range(0, len(members), limit):
            idx = members[g:g + limit]
            group = _Group(config, [jobs[i] for i in idx], [states[i] for i in idx], data, prunable, progress,
                           stacked, context)
            for i, r in zip(idx, group.train()):
                results[i] = r
    return results  # type: ignore[return-value]


def _share_restored(jobs: Sequence[ArmJob], states: Sequence[ArmState], restored: Optional[List[bool]],
                    context: Context) -> None:
    """Data-parallel: every rank continues from what rank 0 restored (`restored` given on rank 0 only): the
    checkpointed arms' model, optimizer, counters, hook state and RNG, broadcast from rank 0."""
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
    if spec.dst:  # the mask it trained with at the end (mask.pt holds the one it started from)
        job.directory.save_final_mask({n: m.weight_mask.detach().cpu() for n, m in masked_modules(job.model)})
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


class _Group:
    """Arms at one (iteration, start iteration, fixed lr): one loop, one engine over the arms still live."""

    def __init__(self, config: SearchConfig, jobs: List[ArmJob], states: List[ArmState], data: "DeviceData",
                 prunable: Sequence[str], progress: Progress, stacked: Optional[bool], context: Context) -> None:
        self.config, self.jobs, self.states, self.data = config, jobs, states, data
        self.prunable, self.progress, self.stacked, self.context = prunable, progress, stacked, context
        self.results: Dict[int, Dict[str, Any]] = {}
        self.live = list(range(len(jobs)))
        self.t0 = time.perf_counter()
        self.iteration = states[0].iteration
        self.loss_sums = torch.tensor([s.loss_sum for s in states], dtype=torch.float64, device=data.device)
        self.loss_count = states[0].loss_count
        self.last_loss = math.nan
        self.lr: Optional[float] = None  # set by the first step (the lr is asked for once per step, never more)
        self.loss_fn = None if config.loss is None else loss_function(config)
        self.engine: Optional[Engine] = None  # the latest one: an arm's result says which step path it ran

    def _engine(self) -> Engine:
        engine = Engine(self.config, [self.jobs[i] for i in self.live], [self.states[i] for i in self.live],
                        self.data, self.context, self.stacked)
        if self.lr is not None:
            engine.set_lr(self.lr)
        self.engine = engine
        return engine

    def _end(self, i: int, status: str, message: Optional[str] = None) -> None:
        if self.config.cuda_graph and self.engine is not None:  # which path ran (cuda_graph.py)
            self.jobs[i].spec.result_extra["step_mode"] = self.engine.step_mode
        self.results[i] = _finish(self.jobs[i], self.states[i], self.prunable, time.perf_counter() - self.t0,
                                  status, message)

    def train(self) -> List[Dict[str, Any]]:
        jobs, config, first = self.jobs, self.config, self.jobs[0].spec
        for job in jobs:
            job.model.train()
        # A resumed arm whose hook had already stopped it (e.g. early-bird) is finished as it stands.
        for i in [i for i in self.live if jobs[i].hook is not None and jobs[i].hook.stopped]:
            self.results[i] = _finish(jobs[i], self.states[i], self.prunable, 0.0, "ok")
            self.live.remove(i)
        # What draws from torch's global RNG while training (a user's dropout or noisy optimizer) draws the
        # same numbers in every run and after a resume: the group starts from its checkpoint's RNG state, or
        # from a seed of what the group is.
        start = self.states[0]
        if start.rng is not None:
            torch.set_rng_state(start.rng)
        else:
            torch.manual_seed(zlib.crc32(f"{first.level} {first.label} {first.trial} {jobs[0].seed} "
                                         f"{self.iteration}".encode()))
        engine = self._engine() if self.live else None
        label = (f"L{first.level} {first.label} t{first.trial}" if len(jobs) == 1
                 else f"L{first.level} {len(jobs)} arms from it {first.start_iter}")
        self.progress.training_started(label, config.iterations, self.iteration)
        next_report = self.t0 + _PROGRESS_INTERVAL_S
        try:
            while self.iteration < config.iterations and self.live:
                engine = self._step(engine)
                now = time.perf_counter()
                if now >= next_report:
                    self.progress.step(self.iteration, self.last_loss)
                    next_report = now + _PROGRESS_INTERVAL_S
                if self.iteration % config.eval_every == 0 or self.iteration == config.iterations:
                    engine.sync_out()
                    if self._evaluate() and self.live:  # the others carry on: a new engine from their synced state
                        engine = self._engine()
                    stop.check(f"after the checkpoint at iteration {self.iteration} of level {first.level}")
        finally:
            self.progress.training_finished()
        for i in self.live:
            jobs[i].directory.write_metrics(self.states[i].metrics)
            self._end(i, "ok")
        return [self.results[i] for i in range(len(jobs))]

    def _step(self, engine: Engine) -> Engine:
        spec = self.jobs[0].spec
        if self.config.lr_scheduler is not None:  # the user's schedulers, each arm's at this iteration
            for i in self.live:
                advance_scheduler(self.states[i].scheduler,
                                  self.iteration if spec.lr_fixed_at is None else spec.lr_fixed_at)
        else:
            new_lr = arm_lr(self.config, spec, self.iteration)
            if new_lr != self.lr:  # written into the param groups only when the schedule moves
                self.lr = new_lr
                engine.set_lr(new_lr)
        losses = engine.step(self.iteration)
        if len(self.live) == len(self.jobs):
            self.loss_sums += losses
        else:
            self.loss_sums[self.live] += losses.to(torch.float64)
        self.iteration += 1
        self.loss_count += 1
        captures = [i for i in self.live if self.jobs[i].spec.capture_rewind_at == self.iteration]
        if captures:
            engine.sync_out()
            for i in captures:
                self.jobs[i].directory.save_rewind(cpu_state(self.jobs[i].model))
        return self._dst_updates(engine)

    def _dst_updates(self, engine: Engine) -> Engine:
        """Dynamic arms due a drop/regrow (fastticket.lottery.dst) are synced out, updated in their own model and
        optimizer, and the engine rebuilt from the arms' state (a stacked one re-stacks masks and tile maps)."""
        due = [i for i in self.live if self.jobs[i].spec.dst and dst.due(self.config, self.iteration)]
        if due:
            engine.sync_out()
            for i in due:
                dst.arm_update_(self.config, self.jobs[i], self.states[i].optimizer, self.data, self.iteration,
                                self.prunable, self.context)
        return self._engine() if due else engine

    def _evaluate(self) -> bool:
        """Evaluate and checkpoint every live arm; finish the diverged and the stopped ones. Returns whether
        any arm left the group."""
        context, iteration = self.context, self.iteration
        # The one device-to-host read of the train losses, per evaluation (data-parallel: the mean of the
        # ranks' shard means, the global batch's mean loss).
        sums = context.shard_mean(self.loss_sums).tolist()
        session_s = time.perf_counter() - self.t0
        diverged, stopped = [], []
        for i in self.live:
            job, state = self.jobs[i], self.states[i]
            state.iteration, state.loss_sum, state.loss_count = iteration, sums[i], self.loss_count
            if not math.isfinite(sums[i]):
                spec = job.spec
                message = (f"level {spec.level} {spec.label} trial {spec.trial}: loss became {sums[i]} between "
                           f"iterations {iteration - self.loss_count} and {iteration} (lr {self.lr:g}); arm "
                           f"stopped, state saved in {job.directory.path}")
                job.directory.write_metrics(state.metrics)
                self.progress.message(f"fastticket: diverged: {message}")
                self.results[i] = _finish(job, state, self.prunable, session_s, "diverged", message)
                diverged.append(i)
                continue
            if has_statistics(job.model):  # data-parallel: evaluate with rank 0's statistics
                context.share_buffers_(job.model)
            val_loss, val_acc = evaluate(job.model, self.data.val.x, self.data.val.y, context, self.loss_fn)
            _, test_acc = evaluate(job.model, self.data.test.x, self.data.test.y, context, self.loss_fn)
            state.record_evaluation(val_loss, val_acc, test_acc)
            ckpt = state.state_dict(session_s)
            if job.hook is not None:
                job.hook(job.model, iteration)  # may stop this arm (hook.stopped), after this checkpoint
                ckpt["hook"] = job.hook.state_dict()
                if job.hook.stopped:
                    stopped.append(i)
            job.directory.save_checkpoint(ckpt)
            job.directory.write_metrics(state.metrics)
            self.last_loss = state.metrics[-1]["train_loss"]
            self.progress.evaluated(iteration, self.last_loss, val_acc, val_loss,
                                    f"{job.spec.label} trial {job.spec.trial}")
        self.loss_sums.zero_()
        self.loss_count = 0
        for i in stopped:
            self._end(i, "ok")
        self.live = [i for i in self.live if i not in diverged and i not in stopped]
        return bool(diverged or stopped)
