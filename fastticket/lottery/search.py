"""The IMP driver: iterative magnitude pruning with rewinding, controls and trials, resumable.

Per trial t (seed_t = config.seed + t) and level L = 0..config.levels:

- ticket: level 0 trains the dense (all-ones-mask) network from its init. With `rewind_iter` k > 0 the weights
  after k iterations of level 0 become the rewind point (Frankle et al. 2019, late rewinding); otherwise the
  init is. Level L >= 1 takes level L-1's trained ticket, prunes it (fastticket.lottery.prune) to get its mask, sets
  weights = rewind point * mask, builds a fresh optimizer and trains. Training at L >= 1 continues the clock of
  the rewind point: iterations k..iterations-1 with the lr schedule and the batches of those iterations, so
  every level has the same end point and the same schedule tail as level 0.
- A level's arms train together (`run_level`): prepared one by one (the ticket first: the controls read its
  mask; fastticket.lottery.plans, after the arm registry fastticket.lottery.arms), then trained as groups of
  arms sharing a start (fastticket.lottery.train.train_arms; the engine decides whether a group is stacked,
  fastticket.lottery.engine); `parallel_arms` 1 trains them one at a time. `reinits` R > 1 adds reinit replicas.
- controls (L >= 1 only): "reinit" keeps the ticket's mask and draws a fresh init (seed_t + 10_000 + L),
  trained from iteration 0 to the end (a fresh init has no rewind point to continue from); "random" draws a
  random mask with the ticket's per-layer counts (`prune.random_masks_like`) and trains from the trial's
  rewind point * that mask, over the same iterations as the ticket.
- Pruning uses the ticket's *final* weights (not the early-stopping ones), as in the paper. If a trial's
  ticket diverges, its later levels are skipped (there are no trained weights to prune).

Files live in a RunDir (fastticket.lottery.rundir); one arm trains in fastticket.lottery.train. Resume skips arms whose
result.json exists and continues an unfinished arm from its checkpoint, with the same numbers.

Under torchrun (fastticket.lottery.platform) a level's arms are spread over the ranks (trials mode,
`_run_level_shared`), or every rank trains every arm on its share of each batch with rank 0 preparing the
arms (data mode, `plans.prepare_shared`); see docs/architecture.md, "The experiment (fastticket/lottery)". The search
receives its platform Context from `platform.session` and hands it down.
"""
from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from fastticket.errors import ConfigError, RunDirError
from fastticket.lottery import platform, stop
from fastticket.lottery.arms import TICKET, level_arms, with_twins
from fastticket.lottery.batched import group_size
from fastticket.lottery.config import SearchConfig, parse_refill
from fastticket.lottery.engine import arms_per_engine, stack_failure, stacks
from fastticket.lottery.platform import Context, resolve_device
from fastticket.lottery.plans import Prepared, SearchState, prepare_arm, prepare_shared
from fastticket.lottery.preflight import preflight
from fastticket.lottery.progress import Progress
from fastticket.lottery.prune import check_refill_fits, layer_rates
from fastticket.lottery.rundir import RunDir
from fastticket.lottery.recipe import user_functions
from fastticket.lottery.sources import is_user, recorded, to_device_data
from fastticket.lottery.arm_state import ArmJob
from fastticket.lottery.train import build_masked_model, train_arms
from fastticket.sparse.backend import use_backend

if TYPE_CHECKING:
    from fastticket.lottery.data import DeviceData

def validate_config(config: SearchConfig) -> None:
    """Raise ConfigError for any setting the search cannot run with here: the config's own checks, then the
    device."""
    config.validate()
    resolve_device(config.device)


def _group_limit(s: SearchState, jobs: Sequence[ArmJob]) -> int:
    """Arms per group: --parallel-arms (0: all), lowered to what fits in device memory (said once)."""
    limit = s.config.parallel_arms or len(jobs)
    if limit > 1 and len(jobs) > 1:
        x, _ = s.data.batch(0, s.config.batch_size, s.config.seed)
        # Every rank must split alike (their free memory may differ).
        fits = s.context.min_int(group_size(jobs[0].model, x, s.device))
        if fits < min(limit, len(jobs)):
            if not s.said_split:
                s.progress.message(f"fastticket: {min(limit, len(jobs))} arms would not fit in {s.device} memory "
                                   f"at once; training groups of at most {fits}")
                s.said_split = True
            limit = fits
    return max(1, limit)


def run_level(s: SearchState, level: int, trials: Sequence[int]) -> List[Dict[str, Any]]:
    """Every arm of `level` for `trials`: finished ones read, the others trained together (arms sharing a
    start iteration and lr rule as one group, at most the group limit at once). Results in run order. In a
    trials-parallel search each rank trains its share of the arms (`_run_level_shared`)."""
    arms = [(arm, t, r) for t in trials
            for arm, r in with_twins(level_arms(s.config.controls, s.config.reinits, level), s.config.stability)]
    if s.context.trials_parallel:
        return _run_level_shared(s, level, arms)
    if arms_per_engine(s.config) == 1:  # prepared and trained one by one: one arm's model in memory at a time
        rows = []
        for arm, t, r in arms:
            slots = {0: prepare_shared(s, level, arm, t, r)}
            _train_prepared(s, level, slots)
            rows.append(slots[0])
    else:
        slots = {i: prepare_shared(s, level, arm, t, r) for i, (arm, t, r) in enumerate(arms)}
        _train_prepared(s, level, slots)
        rows = [slots[i] for i in range(len(arms))]
    s.context.barrier()  # data-parallel: rank 0 has written the level's files before anyone reads
    return _stability(s, level, rows)  # type: ignore[arg-type]


def _stability(s: SearchState, level: int, rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """--stability: each arm's instability against its twin, written into its result.json."""
    if not s.config.stability:
        return rows
    from fastticket.lottery.stability import record_stability
    rows = record_stability(s, level, rows)
    s.context.barrier()
    return rows


def _run_level_shared(s: SearchState, level: int, arms: Sequence[Tuple[str, int, int]]) -> List[Dict[str, Any]]:
    """Trials-parallel: this rank prepares and trains its contiguous share of the level's arms and writes only
    their directories; then every rank reads every arm's result (the next level prunes other ranks'
    tickets)."""
    context = s.context
    mine = context.mine(len(arms))
    slots: Dict[int, Prepared] = {}
    # Tickets first, on every rank: a control reads its trial's ticket mask, which another rank may write.
    for i in mine:
        if arms[i][0] == TICKET:
            slots[i] = prepare_arm(s, level, *arms[i])
    context.barrier()
    for i in mine:
        if arms[i][0] != TICKET:
            slots[i] = prepare_arm(s, level, *arms[i])
    _train_prepared(s, level, slots)
    context.barrier()
    s.progress.arms_done(len(arms) - len(mine))
    rows = []
    for i, (arm, trial, replica) in enumerate(arms):
        row = slots[i] if i in slots else s.run.arm(level, arm, trial, replica).read_result()
        if row is None:
            raise RuntimeError(f"level {level} {arm} trial {trial}: rank {context.owner(i, len(arms))} finished "
                               f"without its result.json")
        rows.append(row)
    return _stability(s, level, rows)


def _train_prepared(s: SearchState, level: int, slots: Dict[int, Prepared]) -> None:
    """Train the prepared arms among `slots` (index -> ArmJob or a finished arm's result), replacing each by
    its result: arms sharing a start as groups of at most the group limit (the engine decides how to step
    them, fastticket.lottery.engine)."""
    pending = [i for i, slot in sorted(slots.items()) if isinstance(slot, ArmJob)]
    s.progress.arms_done(len(slots) - len(pending))
    by_start: Dict[Tuple[int, Optional[int]], List[int]] = {}
    for i in pending:
        spec = slots[i].spec  # type: ignore[union-attr]
        by_start.setdefault((spec.start_iter, spec.lr_fixed_at), []).append(i)
    for idx in by_start.values():
        limit = _group_limit(s, [slots[i] for i in idx])  # type: ignore[misc]
        for g in range(0, len(idx), limit):
            chunk = idx[g:g + limit]
            jobs = [slots[i] for i in chunk]
            first = jobs[0].spec  # type: ignore[union-attr]
            s.progress.arm_started(level, s.config.levels, f"{len(jobs)} arms" if len(jobs) > 1 else first.label,
                                   first.trial)
            for i, r in zip(chunk, train_arms(s.config, jobs, s.train_data, s.prunable, s.progress,  # type: ignore
                                              context=s.context)):
                slots[i] = r
            s.progress.arms_done(len(jobs))


def _ticket_finished(s: SearchState, level: int, trial: int) -> bool:
    """Did the level's ticket train cleanly (so the next level has weights to prune and a rewind point)?"""
    prev = s.run.arm(level, TICKET, trial).read_result()
    return prev is not None and prev.get("status") == "ok" and s.run.arm(0, TICKET, trial).has_rewind()


def run_search(config: SearchConfig, out_dir: str, resume: bool = False,
               progress: Union[Progress, bool, None] = None) -> List[Dict[str, Any]]:
    """Run (or resume) a whole IMP search into `out_dir`; returns every arm's result.json, in run order.

    `progress`: a Progress that receives the search's progress and messages (the CLI's draws bars); anything
    else (None, False) writes only messages, to stderr.
    """
    from fastticket.lottery.data import load_dataset

    progress = progress if isinstance(progress, Progress) else Progress()
    validate_config(config)
    config = recorded(config)  # a user model / data function's source hash, checked on resume
    device = resolve_device(config.device)
    backend, thresholds = platform.dispatch_settings(config.backend, config.dense_thresholds, device)
    with stop.on_sigterm(), platform.session(config.distributed, config.dist_backend, device,
                                             config.dist_timeout) as context, use_backend(backend):
        # Every check that can fail on one rank only is agreed on (platform.Context.agree): a bad set-up
        # is one line on every rank, never a rank waiting in a collective for one that gave up.
        platform.check_same_settings(context, config.to_json(), _settings_differ)
        # config.json records the device actually used ("auto" resolved; under torchrun its type: each rank
        # uses its own GPU), and the backend and dispatch-threshold overrides the masked layers run with.
        config = config.replace(device=str(device) if not context.active else device.type, backend=backend,
                                dense_thresholds=thresholds)
        if not context.main:
            progress = _OtherRank(context)
        run = RunDir(out_dir, writes=context.main or not context.data_parallel)
        context.agree(lambda: _check_ranks(config, context))
        context.agree(lambda: run.prepare(config, resume, create=False))
        data = context.agree(lambda: to_device_data(config.dataset, device, config.loss is None)
                             if is_user(config.dataset) else load_dataset(config.dataset, config.data_dir, device, config.val_size, config.seed,
                                          augment=config.augment))
        # Everything else that can fail early, before the first write.
        context.agree(lambda: (preflight(config, data, device), _check_refill(config, data, device)))
        context.agree(lambda: run.lock() if context.main else None)
        try:
            context.agree(lambda: run.prepare(config, resume) if context.main else None)
            context.agree(lambda: _check_shared(run, context))
            return _run_levels(config, run, data, device, progress, context)
        finally:
            run.unlock()


class _OtherRank(Progress):
    """Progress of a rank other than 0: no bars; its messages marked with its rank (a data-parallel rank,
    which repeats rank 0's work, stays silent)."""

    def __init__(self, context: Context) -> None:
        self.context = context

    def message(self, text: str) -> None:
        if not self.context.data_parallel:
            super().message(platform.prefixed(text, self.context))


def _settings_differ(first: str, other: str) -> str:
    a, b = json.loads(first), json.loads(other)
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return "; ".join(f"{k}: {b.get(k)!r} vs rank 0's {a.get(k)!r}" for k in keys)


def _check_ranks(config: SearchConfig, context: Context) -> None:
    """What a multi-process search cannot run with (one line each, what to do instead)."""
    if context.data_parallel and config.batch_size % context.world:
        lower = config.batch_size // context.world * context.world
        raise ConfigError(f"--batch-size {config.batch_size} does not split evenly over {context.world} ranks in "
                          f"--distributed data (each rank takes an equal share of every batch): use a multiple "
                          f"of {context.world}, e.g. {lower or context.world} or {lower + context.world}")
    if context.data_parallel and config.compile:
        raise ConfigError("--compile is not supported with --distributed data; drop --compile or use "
                          "--distributed trials")


def _check_shared(run: RunDir, context: Context) -> None:
    """Every rank must see the run directory rank 0 prepared (one directory on a shared filesystem)."""
    if context.main:
        return
    where = os.path.abspath(run.root)
    if not os.path.isfile(run.config_path):
        raise RunDirError(f"cannot see the run directory {where} that rank 0 prepared (no config.json there): "
                          f"--out must be on a filesystem every rank shares, with the same path on every node")
    if not context.data_parallel and not os.access(where, os.W_OK):
        raise RunDirError(f"cannot write to the run directory {where}: every rank writes its own arms there")


def _prunable(config: SearchConfig, model: nn.Module) -> List[str]:
    rates = layer_rates(model, config.rate, scope=config.scope, conv_rate=config.conv_rate,
                        output_rate=config.output_rate, exclude=config.exclude)
    return [n for n, r in rates.items() if r is not None]


def _check_refill(config: SearchConfig, data: "DeviceData", device: torch.device) -> None:
    """--refill's tile must leave every pruned layer more than one tile (checked before the first write)."""
    refill = parse_refill(config.refill)
    if refill is not None:
        model = build_masked_model(config, data.info, config.seed, device)
        check_refill_fits(model, refill, _prunable(config, model))


def _run_levels(config: SearchConfig, run: RunDir, data: "DeviceData", device: torch.device,
                progress: Progress, context: Context) -> List[Dict[str, Any]]:
    # The layer structure (names, which are prunable) comes from one throwaway build.
    model = build_masked_model(config, data.info, config.seed, device)
    prunable = _prunable(config, model)
    arm_fields: Dict[str, Any] = {}
    failure = stacks(config, model, device) and is_user(config.model) and stack_failure(model, data.train.x[:2])
    if failure:
        progress.message(f"fastticket: the model {config.model} cannot be stacked ({failure}); its arms train one "
                         f"at a time")
        config, arm_fields = config.replace(parallel_arms=1), {"arms_stacked": False, "why_not_stacked": failure}
    elif user_functions(config) and arms_per_engine(config) != 1:
        functions = ", ".join(f"{f} {getattr(config, f)}" for f in user_functions(config))
        arm_fields = {"arms_stacked": False, "why_not_stacked": f"trained with your {functions} (fastticket's "
                      f"stacked step runs its own optimizers and cross-entropy)"}
        progress.message(f"fastticket: {arm_fields['why_not_stacked']}: the arms train one at a time")
    if context.data_parallel:
        from fastticket.lottery.data import DataShard
        train_data: Any = DataShard(data, context.rank, context.world)
    else:
        train_data = data
    s = SearchState(config, run, data, device, prunable, progress, train_data, context, arm_fields=arm_fields)
    arms_per_level = len(with_twins(level_arms(config.controls, config.reinits, 1), config.stability))
    dense_arms = len(with_twins(level_arms(config.controls, config.reinits, 0), config.stability))
    progress.search_started((dense_arms + config.levels * arms_per_level) * config.trials)
    rows: List[Dict[str, Any]] = []
    stopped = set()  # trials whose ticket diverged: no later levels
    try:
        for level in range(config.levels + 1):
            trials = []
            for trial in range(config.trials):
                if trial in stopped:
                    continue
                if level > 0 and not _ticket_finished(s, level - 1, trial):
                    stopped.add(trial)
                    progress.message(f"fastticket: trial {trial}: the level {level - 1} ticket did not finish "
                                     f"cleanly; levels {level}..{config.levels} of this trial are skipped")
                    progress.arms_done((config.levels - level + 1) * arms_per_level)
                    continue
                trials.append(trial)
            rows += run_level(s, level, trials)
    finally:
        progress.search_finished()
    return rows
