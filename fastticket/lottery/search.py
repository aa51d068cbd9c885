"""The IMP driver: iterative magnitude pruning with rewinding, controls and trials, resumable.

Per trial t (seed_t = config.seed + t) and level L = 0..config.levels:

- ticket: level 0 trains the dense (all-ones-mask) network from its init. With `rewind_iter` k > 0 the weights
  after k iterations of level 0 become the rewind point (Frankle et al. 2019, late rewinding); otherwise the
  init is. Level L >= 1 takes level L-1's trained ticket, prunes it (fastticket.lottery.prune) to get its mask, sets
  weights = rewind point * mask, builds a fresh optimizer and trains. Training at L >= 1 continues the clock of
  the rewind point: iterations k..iterations-1 with the lr schedule and the batches of those iterations, so
  every level has the same end point and the same schedule tail as level 0.
- A level's arms train together (`run_level`): prepared one by one (the ticket first: the controls read its
  mask), then trained as stacked groups of arms sharing a start (fastticket.lottery.train.train_arms,
  fastticket.lottery.batched); `parallel_arms` 1 trains them one at a time. `reinits` R > 1 adds reinit replicas.
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
arms (data mode, `_prepare`); see docs/architecture.md, "More than one process".
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from fastticket.lottery import platform as distributed
from fastticket.lottery.config import PAI_ARMS, RANDOM, REINIT, TICKET, SearchConfig, parse_refill
from fastticket.errors import ConfigError, DamagedFileError, RunDirError
from fastticket.sparse.nn import densities, install_masks, masks_in_state, model_masks
from fastticket.lottery.preflight import preflight
from fastticket.lottery.prune import (alive_count, check_refill_fits, layer_rates, prune_with_config, random_masks_like,
                              refill_masks)
from fastticket.lottery.rundir import MASK as MASK_FILE
from fastticket.lottery.rundir import RunDir, arm_dir  # noqa: F401  (arm_dir: the path of an arm, for callers)
from fastticket.sparse.rewind import rewind_to
from fastticket.lottery.train import ArmJob, ArmSpec, EvalHook, Progress, build_masked_model, cpu_state, train_arms

if TYPE_CHECKING:
    from fastticket.lottery.data import DeviceData

_REINIT_SEED_OFFSET = 10_000
_STREAM_PRUNE, _STREAM_RANDOM_MASK, _STREAM_REINIT = 1, 2, 3
Masks = Dict[str, torch.Tensor]


def _device_of(config: SearchConfig) -> torch.device:
    """The config's device, checked against this machine (the config itself checks only the spelling); under
    torchrun a GPU rank takes the GPU of its local rank."""
    if config.device == "auto":
        return distributed.local_device(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        device = torch.device(config.device)
    except (RuntimeError, ValueError):
        raise ConfigError(f"device must be 'auto', 'cpu' or 'cuda' (optionally 'cuda:N'), got {config.device!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was requested but no CUDA GPU is available here; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device {config.device!r} does not exist: {torch.cuda.device_count()} GPU(s) visible")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device must be 'cpu' or 'cuda', got {config.device!r}")
    return distributed.local_device(device) if device.index is None else device


def validate_config(config: SearchConfig) -> None:
    """Raise ConfigError for any setting the search cannot run with here: the config's own checks, then the
    device."""
    config.validate()
    _device_of(config)


def _generator(*parts: int) -> torch.Generator:
    seed = int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1, np.uint64)[0]
               & 0x7FFF_FFFF_FFFF_FFFF)
    return torch.Generator().manual_seed(seed)


@dataclasses.dataclass
class _Search:
    """What every arm of a search shares."""

    config: SearchConfig
    run: RunDir
    data: "DeviceData"
    device: torch.device
    prunable: Sequence[str]
    progress: Progress
    train_data: Any  # what the arms train and evaluate on: `data`, or in a data-parallel search this rank's share
    said_split: bool = False

    def model(self, seed: int) -> nn.Module:
        return build_masked_model(self.config, self.data.info, seed, self.device)


@dataclasses.dataclass
class ArmPlan:
    """How an arm starts: its init, its mask, the weights it is rewound to, the iteration it starts at."""

    init_seed: int
    make_masks: Callable[[nn.Module], Masks]  # called only while the arm has no mask.pt yet
    rewind_point: Optional[Dict[str, torch.Tensor]]  # weights = rewind_point * mask; None: the init * mask
    start_iter: int
    keep_rewind: bool = False               # ticket arms keep their rewind point in their directory
    capture_rewind_at: Optional[int] = None  # level 0 ticket with late rewinding: the rewind point is made at k
    lr_fixed_at: Optional[int] = None       # --rewind none: every step at the lr of this iteration (the last)
    result_extra: Dict[str, Any] = dataclasses.field(default_factory=dict)  # recorded in result.json


def reinit_seed(config: SearchConfig, level: int, trial: int, replica: int = 0) -> int:
    """The init seed of a reinit control: seed_t + 10000 + L for the first (as before replicas existed), a
    SeedSequence draw of (seed_t, stream, L, r) for the r-th extra one (r >= 1), which no other arm uses."""
    seed_t = config.seed + trial
    if replica == 0:
        return seed_t + _REINIT_SEED_OFFSET + level
    return int(np.random.SeedSequence([seed_t & 0xFFFFFFFF, _STREAM_REINIT, level, replica])
               .generate_state(1, np.uint32)[0] & 0x7FFFFFFF)


def plan_arm(s: _Search, level: int, arm: str, trial: int, replica: int = 0) -> ArmPlan:
    """The ticket and the controls, by arm kind (see the module docstring)."""
    config, k, seed_t = s.config, s.config.rewind_iter, s.config.seed + trial
    trial_rewind = s.run.arm(0, TICKET, trial)
    ticket = s.run.arm(level, TICKET, trial)
    if arm == TICKET and level == 0:
        return ArmPlan(seed_t, model_masks, None, 0, keep_rewind=k == 0, capture_rewind_at=k if k > 0 else None)
    if arm == TICKET:
        rewind_point = trial_rewind.load_rewind()
        extra: Dict[str, Any] = {"rewind": config.rewind}
        if config.refill is not None:
            extra.update(refill=config.refill, element_density=_element_density(s, level, trial, rewind_point))
        make = lambda model: _prune_previous(s, level, trial, rewind_point)  # noqa: E731
        if config.rewind == "weights":
            return ArmPlan(seed_t, make, rewind_point, k, keep_rewind=True, result_extra=extra)
        # lr rewinding / fine-tuning start from the previous level's trained weights (times the new mask), over
        # the same iterations k..end; fine-tuning keeps the schedule's final lr throughout.
        trained = _final_state(s, level - 1, trial)
        return ArmPlan(seed_t, make, trained, k, result_extra=extra,
                       lr_fixed_at=config.iterations - 1 if config.rewind == "none" else None)
    if arm == REINIT:
        # Same mask, a fresh init from a seed no ticket uses; trained from iteration 0.
        return ArmPlan(reinit_seed(config, level, trial, replica), ticket.load_mask, None, 0)
    if arm == RANDOM:
        # Random mask with the ticket's per-layer counts, from the trial's rewind point.
        def random_masks(model: nn.Module) -> Masks:
            masks = random_masks_like(ticket.load_mask(model), granularity=config.granularity,
                                      generator=_generator(seed_t, _STREAM_RANDOM_MASK, level))
            return {n: m.cpu() for n, m in masks.items()}
        return ArmPlan(seed_t, random_masks, trial_rewind.load_rewind(), k)
    if arm in PAI_ARMS:
        # The trial's init pruned at initialization by SNIP / GraSP / SynFlow to the ticket's count of alive
        # units over the pruned layers (the same total density), trained from iteration 0 like a fresh net.
        def pai_masks(model: nn.Module) -> Masks:
            from fastticket.lottery.pai import SCORE_BATCHES, prune_at_init, score_batches
            keep = alive_count(ticket.load_mask(model), s.prunable, config.granularity)
            batches = score_batches(s.data, SCORE_BATCHES, config.batch_size, seed_t)
            masks = prune_at_init(model, arm, keep, s.prunable, batches=batches, granularity=config.granularity)
            return {n: m.detach().to("cpu") for n, m in masks.items()}
        return ArmPlan(seed_t, pai_masks, None, 0)
    raise ValueError(f"unknown arm {arm!r}")


def _final_model(s: _Search, level: int, trial: int) -> nn.Module:
    """A model holding the level's ticket mask and final weights."""
    arm = s.run.arm(level, TICKET, trial)
    model = s.model(s.config.seed + trial)
    install_masks(model, arm.load_mask(model))
    arm.load_final_into(model)
    return model


def _final_state(s: _Search, level: int, trial: int) -> Dict[str, torch.Tensor]:
    return cpu_state(_final_model(s, level, trial))


def _draw_mask(s: _Search, level: int, trial: int, model: nn.Module,
               rewind_point: Optional[Dict[str, torch.Tensor]], apply: bool = True) -> Masks:
    """The element mask pruning `model` gives for level `level` (the IMP step; early-bird draws it too)."""
    return prune_with_config(model, s.config, initial=rewind_point, apply=apply,
                             generator=_generator(s.config.seed + trial, _STREAM_PRUNE, level))


def _prune_previous(s: _Search, level: int, trial: int, rewind_point: Dict[str, torch.Tensor],
                    refill: bool = True) -> Masks:
    """The level-`level` ticket mask: prune the level-1 ticket's final weights (then, with --refill, refill
    the element mask into whole tiles, scored by those weights)."""
    model = _final_model(s, level - 1, trial)
    masks = _draw_mask(s, level, trial, model, rewind_point)
    block = parse_refill(s.config.refill)
    if refill and block is not None:
        masks = refill_masks(model, masks, block, s.prunable)
    return {name: m.detach().to("cpu") for name, m in masks.items()}


def _element_density(s: _Search, level: int, trial: int, rewind_point: Dict[str, torch.Tensor]) -> float:
    """Total density (pruned layers) of the level's element-wise ticket before refilling."""
    model = _final_model(s, level - 1, trial)
    install_masks(model, _prune_previous(s, level, trial, rewind_point, refill=False))
    return densities(model, s.prunable)[0]


def _early_bird_hook(s: _Search, level: int, trial: int, min_iter: int) -> Optional[EvalHook]:
    """With --early-bird, the ticket's tracker: it draws the next level's (element) mask at each evaluation."""
    if s.config.early_bird is None:
        return None
    from fastticket.lottery.early_bird import EarlyBird
    rewind = s.run.arm(0, TICKET, trial)
    prunable = set(s.prunable)

    def draw(model: nn.Module) -> Masks:
        point = rewind.load_rewind() if rewind.has_rewind() else None
        masks = _draw_mask(s, level + 1, trial, model, point, apply=False)
        return {n: m for n, m in masks.items() if n in prunable}

    return EarlyBird(s.config.early_bird, draw, s.config.iterations, min_iter=min_iter)


def level_arms(config: SearchConfig, level: int) -> List[Tuple[str, int]]:
    """(arm kind, replica) of one trial at `level`, in run order: the ticket first (the controls read its
    mask), then each control (reinit x config.reinits)."""
    if level == 0:
        return [(TICKET, 0)]
    arms = [(TICKET, 0)]
    for control in config.controls:
        arms += [(control, r) for r in range(config.reinits if control == REINIT else 1)]
    return arms


def prepare_arm(s: _Search, level: int, arm: str, trial: int, replica: int = 0) -> Union[ArmJob, Dict[str, Any]]:
    """An arm's result.json when it is finished, else its ArmJob: mask and rewind point set up (and saved),
    the model built, masked and rewound."""
    directory = s.run.arm(level, arm, trial, replica).open()
    try:
        result = directory.read_result()
    except DamagedFileError as exc:
        # Never publish a number from a file that failed verification: train the arm again (same numbers).
        s.progress.message(f"fastticket: {exc}; this arm is trained again")
        directory.discard_result()
        result = None
    if result is not None:
        return result
    plan = plan_arm(s, level, arm, trial, replica)
    model = s.model(plan.init_seed)
    if directory.has_mask():
        try:
            directory.load_mask(model)
        except DamagedFileError as exc:  # recomputable: the mask is a function of the previous level
            s.progress.message(f"fastticket: {exc}; recomputing it, this arm restarts from its beginning")
            directory.discard(MASK_FILE)
            directory.drop_checkpoint()
    if not directory.has_mask():
        directory.save_mask(plan.make_masks(model))
    install_masks(model, directory.load_mask(model))
    if plan.rewind_point is not None:
        rewind_to(model, plan.rewind_point)
    if plan.keep_rewind and not directory.has_rewind():
        directory.save_rewind(plan.rewind_point if plan.rewind_point is not None else cpu_state(model))
    spec = ArmSpec(level, arm, trial, plan.start_iter, capture_rewind_at=plan.capture_rewind_at,
                   lr_fixed_at=plan.lr_fixed_at, result_extra=plan.result_extra, replica=replica)
    hook = _early_bird_hook(s, level, trial, plan.capture_rewind_at or 0) if arm == TICKET else None
    return ArmJob(spec, model, directory, s.config.seed + trial, hook)


def _prepare(s: _Search, level: int, arm: str, trial: int, replica: int = 0) -> Union[ArmJob, Dict[str, Any]]:
    """`prepare_arm`; in a data-parallel search rank 0 prepares the arm (computes its mask once, reads its
    files) and every other rank receives it: the result of a finished arm, or the prepared model's state."""
    context = distributed.current()
    if not context.data_parallel:
        return prepare_arm(s, level, arm, trial, replica)
    prepared = prepare_arm(s, level, arm, trial, replica) if context.main else None
    shared = context.broadcast(prepared if not isinstance(prepared, ArmJob) else
                               {"spec": prepared.spec, "state": cpu_state(prepared.model), "seed": prepared.seed})
    if context.main:
        return prepared  # type: ignore[return-value]
    if "spec" not in shared:  # a finished arm's result.json
        return shared
    spec, state = shared["spec"], shared["state"]
    model = s.model(shared["seed"])
    install_masks(model, masks_in_state(model, state))
    model.load_state_dict(state)
    hook = _early_bird_hook(s, level, trial, spec.capture_rewind_at or 0) if arm == TICKET else None
    return ArmJob(spec, model, s.run.arm(level, arm, trial, replica), shared["seed"], hook)


def run_arm(s: _Search, level: int, arm: str, trial: int, replica: int = 0) -> Dict[str, Any]:
    """One arm alone (the --parallel-arms 1 path): its result.json, trained first if unfinished."""
    job = _prepare(s, level, arm, trial, replica)
    if isinstance(job, ArmJob):
        s.progress.arm_started(level, s.config.levels, job.spec.label, trial)
        job = train_arms(s.config, [job], s.train_data, s.prunable, s.progress, stacked=False)[0]
    s.progress.arms_done(1)
    return job


def _group_limit(s: _Search, jobs: Sequence[ArmJob]) -> int:
    """Arms per stacked group: --parallel-arms (0: all), lowered to what fits in device memory (said once)."""
    from fastticket.lottery.batched import group_size
    limit = s.config.parallel_arms or len(jobs)
    if limit > 1 and len(jobs) > 1:
        x, _ = s.data.batch(0, s.config.batch_size, s.config.seed)
        fits = group_size(jobs[0].model, x, s.device)
        context = distributed.current()
        if context.data_parallel:  # every rank must split alike (their free memory may differ)
            fits = context.min_int(fits)
        if fits < min(limit, len(jobs)):
            if not s.said_split:
                s.progress.message(f"fastticket: {min(limit, len(jobs))} arms would not fit in {s.device} memory "
                                   f"at once; training groups of at most {fits}")
                s.said_split = True
            limit = fits
    return max(1, limit)


def run_level(s: _Search, level: int, trials: Sequence[int]) -> List[Dict[str, Any]]:
    """Every arm of `level` for `trials`: finished ones read, the others trained together (arms sharing a
    start iteration and lr rule as one stacked group, at most the group limit at once). Results in run
    order. In a trials-parallel search each rank trains its share of the arms (`_run_level_shared`)."""
    arms = [(arm, t, r) for t in trials for arm, r in level_arms(s.config, level)]
    if distributed.current().trials_parallel:
        return _run_level_shared(s, level, arms)
    if s.config.parallel_arms == 1 or s.config.compile:  # the compiled step is one arm's (fastticket.lottery.compiled)
        rows = [run_arm(s, level, arm, t, r) for arm, t, r in arms]
    else:
        slots = {i: _prepare(s, level, arm, t, r) for i, (arm, t, r) in enumerate(arms)}
        _train_prepared(s, level, slots)
        rows = [slots[i] for i in range(len(arms))]  # type: ignore[misc]
    distributed.current().barrier()  # data-parallel: rank 0 has written the level's files before anyone reads
    return rows


def _run_level_shared(s: _Search, level: int, arms: Sequence[Tuple[str, int, int]]) -> List[Dict[str, Any]]:
    """Trials-parallel: this rank prepares and trains its contiguous share of the level's arms and writes only
    their directories; then every rank reads every arm's result (the next level prunes other ranks'
    tickets)."""
    context = distributed.current()
    mine = context.mine(len(arms))
    slots: Dict[int, Union[ArmJob, Dict[str, Any]]] = {}
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
    return rows


def _train_prepared(s: _Search, level: int, slots: Dict[int, Union[ArmJob, Dict[str, Any]]]) -> None:
    """Train the prepared arms among `slots` (index -> ArmJob or a finished arm's result), replacing each by
    its result: one at a time with --parallel-arms 1 or --compile, else as stacked groups."""
    pending = [i for i, slot in sorted(slots.items()) if isinstance(slot, ArmJob)]
    s.progress.arms_done(len(slots) - len(pending))
    if s.config.parallel_arms == 1 or s.config.compile:
        for i in pending:
            job = slots[i]
            s.progress.arm_started(level, s.config.levels, job.spec.label, job.spec.trial)  # type: ignore[union-attr]
            slots[i] = train_arms(s.config, [job], s.train_data, s.prunable, s.progress, stacked=False)[0]  # type: ignore
            s.progress.arms_done(1)
        return
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
            # Stacked even for a lone arm, so an arm's numbers do not depend on how its level was split into
            # groups (a resumed level regroups); on the triton backend too, where the stacked step runs the
            # grouped kernels (fastticket.lottery.batched).
            for i, r in zip(chunk, train_arms(s.config, jobs, s.train_data, s.prunable, s.progress,  # type: ignore
                                              stacked=True)):
                slots[i] = r
            s.progress.arms_done(len(jobs))


def _ticket_finished(s: _Search, level: int, trial: int) -> bool:
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
    device = _device_of(config)
    with distributed.session(config.distributed, config.dist_backend, device) as context:
        # Every check that can fail on one rank only is agreed on (distributed.Context.agree): a bad set-up
        # is one line on every rank, never a rank waiting in a collective for one that gave up.
        distributed.check_same_settings(context, config.to_json(), _settings_differ)
        # config.json records the device actually used ("auto" resolved; under torchrun its type: each rank
        # uses its own GPU).
        config = config.replace(device=str(device) if not context.active else device.type)
        if not context.main:
            progress = _OtherRank(quiet=context.data_parallel)
        run = RunDir(out_dir, writes=context.main or not context.data_parallel)
        context.agree(lambda: _check_ranks(config, context))
        context.agree(lambda: run.prepare(config, resume, create=False))
        data = context.agree(lambda: load_dataset(config.dataset, config.data_dir, device, config.val_size,
                                                  config.seed, augment=config.augment))
        # Everything else that can fail early, before the first write.
        context.agree(lambda: (preflight(config, data, device), _check_refill(config, data, device)))
        context.agree(lambda: run.lock() if context.main else None)
        try:
            context.agree(lambda: run.prepare(config, resume) if context.main else None)
            context.agree(lambda: _check_shared(run, context))
            return _run_levels(config, run, data, device, progress)
        finally:
            run.unlock()


class _OtherRank(Progress):
    """Progress of a rank other than 0: no bars; its messages marked with its rank (a data-parallel rank,
    which repeats rank 0's work, stays silent)."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet

    def message(self, text: str) -> None:
        if not self.quiet:
            super().message(distributed.prefixed(text))


def _settings_differ(first: str, other: str) -> str:
    a, b = json.loads(first), json.loads(other)
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return "; ".join(f"{k}: {b.get(k)!r} vs rank 0's {a.get(k)!r}" for k in keys)


def _check_ranks(config: SearchConfig, context: distributed.Context) -> None:
    """What a multi-process search cannot run with (one line each, what to do instead)."""
    if context.data_parallel and config.batch_size % context.world:
        lower = config.batch_size // context.world * context.world
        raise ConfigError(f"--batch-size {config.batch_size} does not split evenly over {context.world} ranks in "
                          f"--distributed data (each rank takes an equal share of every batch): use a multiple "
                          f"of {context.world}, e.g. {lower or context.world} or {lower + context.world}")
    if context.data_parallel and config.compile:
        raise ConfigError("--compile is not supported with --distributed data; drop --compile or use "
                          "--distributed trials")


def _check_shared(run: RunDir, context: distributed.Context) -> None:
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
                progress: Progress) -> List[Dict[str, Any]]:

    # The layer structure (names, which are prunable) comes from one throwaway build.
    prunable = _prunable(config, build_masked_model(config, data.info, config.seed, device))
    context = distributed.current()
    if context.data_parallel:
        from fastticket.lottery.data import DataShard
        train_data: Any = DataShard(data, context.rank, context.world)
    else:
        train_data = data
    s = _Search(config, run, data, device, prunable, progress, train_data)

    arms_per_level = len(level_arms(config, 1))
    progress.search_started((1 + config.levels * arms_per_level) * config.trials)
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
