"""How a search's arms start: the state every arm of a search shares, and the preparation of one arm.

`SearchState` is the search's shared state (config, run directory, data, device, platform context) and the
`Planner` the arm registry's plans read (fastticket.lottery.arms): rewind points and masks from the run
directory, the IMP pruning step, random masks, pruning at initialization, the reinit seeds. `prepare_arm`
turns an arm into an ArmJob (mask and rewind point made and saved, model built, masked and rewound) or,
when it is finished, its result.json; in a data-parallel search rank 0 prepares it and every rank receives it.

Seeds: trial t uses seed_t = config.seed + t for its init and batches; each stochastic step draws from a
generator seeded by (seed_t, stream, level), so no two steps share a stream.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from fastticket.errors import DamagedFileError
from fastticket.lottery import arms
from fastticket.lottery.arms import TICKET, Masks
from fastticket.lottery.config import SearchConfig, parse_refill
from fastticket.lottery.platform import Context
from fastticket.lottery.progress import Progress
from fastticket.lottery.nm import nm_refill_masks, parse_nm
from fastticket.lottery.prune import alive_count, prune_with_config, random_masks_like, refill_masks
from fastticket.lottery.armdir import MASK as MASK_FILE
from fastticket.lottery.rundir import RunDir
from fastticket.lottery.arm_state import ArmJob, ArmSpec, EvalHook
from fastticket.lottery.train import build_masked_model, cpu_state
from fastticket.sparse.nn import densities, install_masks, masks_in_state
from fastticket.sparse.rewind import rewind_to

if TYPE_CHECKING:
    from fastticket.lottery.data import DeviceData

_REINIT_SEED_OFFSET = 10_000
_STREAM_PRUNE, _STREAM_RANDOM_MASK, _STREAM_REINIT, _STREAM_TWIN = 1, 2, 3, 4


def _generator(*parts: int) -> torch.Generator:
    seed = int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1, np.uint64)[0]
               & 0x7FFF_FFFF_FFFF_FFFF)
    return torch.Generator().manual_seed(seed)


@dataclasses.dataclass
class SearchState:
    """What every arm of a search shares; the Planner of the arm registry's plans."""

    config: SearchConfig
    run: RunDir
    data: "DeviceData"
    device: torch.device
    prunable: Sequence[str]
    progress: Progress
    train_data: Any  # what the arms train and evaluate on: `data`, or in a data-parallel search this rank's share
    context: Context
    said_split: bool = False
    arm_fields: Dict[str, Any] = dataclasses.field(default_factory=dict)  # added to every result.json

    def model(self, seed: int) -> nn.Module:
        return build_masked_model(self.config, self.data.info, seed, self.device)

    # ------------------------------------------------------------------------------------- the Planner
    def seed(self, trial: int) -> int:
        return self.config.seed + trial

    def reinit_seed(self, level: int, trial: int, replica: int = 0) -> int:
        """The init seed of a reinit control: seed_t + 10000 + L for the first (as before replicas existed), a
        SeedSequence draw of (seed_t, stream, L, r) for the r-th extra one (r >= 1), which no other arm uses."""
        seed_t = self.seed(trial)
        if replica == 0:
            return seed_t + _REINIT_SEED_OFFSET + level
        return int(np.random.SeedSequence([seed_t & 0xFFFFFFFF, _STREAM_REINIT, level, replica])
                   .generate_state(1, np.uint32)[0] & 0x7FFFFFFF)

    def twin_seed(self, trial: int) -> int:
        """The batch-stream seed of --stability's twins (fastticket.lottery.stability): a SeedSequence draw of
        (seed_t, stream), another data order than the trial's."""
        draw = np.random.SeedSequence([self.seed(trial) & 0xFFFFFFFF, _STREAM_TWIN]).generate_state(1, np.uint32)
        return int(draw[0] & 0x7FFFFFFF)

    def rewind_point(self, trial: int) -> Dict[str, torch.Tensor]:
        return self.run.arm(0, TICKET, trial).load_rewind()

    def final_model(self, level: int, trial: int) -> nn.Module:
        """A model holding the level's ticket mask and final weights."""
        arm = self.run.arm(level, TICKET, trial)
        model = self.model(self.seed(trial))
        install_masks(model, arm.load_mask(model))
        arm.load_final_into(model)
        return model

    def final_state(self, level: int, trial: int) -> Dict[str, torch.Tensor]:
        return cpu_state(self.final_model(level, trial))

    def ticket_mask(self, level: int, trial: int) -> Callable[[nn.Module], Masks]:
        return self.run.arm(level, TICKET, trial).load_mask

    def draw_mask(self, level: int, trial: int, model: nn.Module,
                  rewind_point: Optional[Dict[str, torch.Tensor]], apply: bool = True) -> Masks:
        """The element mask pruning `model` gives for level `level` (the IMP step; early-bird draws it too)."""
        return prune_with_config(model, self.config, initial=rewind_point, apply=apply,
                                 generator=_generator(self.seed(trial), _STREAM_PRUNE, level))

    def pruned_mask(self, level: int, trial: int, rewind_point: Dict[str, torch.Tensor], refill: bool = True) -> Masks:
        """The level-`level` ticket mask: prune the level-1 ticket's final weights (then, with --refill, refill
        the element mask into whole tiles, scored by those weights)."""
        model = self.final_model(level - 1, trial)
        masks = self.draw_mask(level, trial, model, rewind_point)
        block, nm = parse_refill(self.config.refill), parse_nm(self.config.refill)
        if refill and block is not None:
            masks = refill_masks(model, masks, block, self.prunable)
        if refill and nm is not None:  # --refill nm:N:M: the element ticket made exactly N:M
            masks = nm_refill_masks(model, masks, nm, self.prunable)
        return {name: m.detach().to("cpu") for name, m in masks.items()}

    def element_density(self, level: int, trial: int, rewind_point: Dict[str, torch.Tensor]) -> float:
        """Total density (pruned layers) of the level's element-wise ticket before refilling."""
        model = self.final_model(level - 1, trial)
        install_masks(model, self.pruned_mask(level, trial, rewind_point, refill=False))
        return densities(model, self.prunable)[0]

    def random_mask(self, level: int, trial: int, model: nn.Module) -> Masks:
        masks = random_masks_like(self.ticket_mask(level, trial)(model), granularity=self.config.granularity,
                                  generator=_generator(self.seed(trial), _STREAM_RANDOM_MASK, level))
        return {n: m.cpu() for n, m in masks.items()}

    def mask_at_init(self, method: str, level: int, trial: int, model: nn.Module) -> Masks:
        from fastticket.lottery.pai import SCORE_BATCHES, prune_at_init, score_batches
        config = self.config
        keep = alive_count(self.ticket_mask(level, trial)(model), self.prunable, config.granularity)
        batches = score_batches(self.data, SCORE_BATCHES, config.batch_size, self.seed(trial))
        masks = prune_at_init(model, method, keep, self.prunable, batches=batches, granularity=config.granularity)
        return {n: m.detach().to("cpu") for n, m in masks.items()}

    def early_bird_hook(self, level: int, trial: int, min_iter: int) -> Optional[EvalHook]:
        """With --early-bird, the ticket's tracker: it draws the next level's (element) mask at each evaluation."""
        if self.config.early_bird is None:
            return None
        from fastticket.lottery.early_bird import EarlyBird
        rewind = self.run.arm(0, TICKET, trial)
        prunable = set(self.prunable)

        def draw(model: nn.Module) -> Masks:
            point = rewind.load_rewind() if rewind.has_rewind() else None
            masks = self.draw_mask(level + 1, trial, model, point, apply=False)
            return {n: m for n, m in masks.items() if n in prunable}

        return EarlyBird(self.config.early_bird, draw, self.config.iterations, min_iter=min_iter)


Prepared = Union[ArmJob, Dict[str, Any]]  # an arm to train, or a finished arm's result.json


def prepare_arm(s: SearchState, level: int, arm: str, trial: int, replica: int = 0) -> Prepared:
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
    plan = arms.kind(arm).plan(s, level, trial, replica)
    base, seed = arms.twin_base(arm), s.seed(trial)
    if base is not None:
        # --stability's twin: its arm's plan (same init, rewind point, start) and mask, trained on another batch
        # stream; it keeps no rewind point and captures none (fastticket.lottery.stability). The mask is the
        # arm's saved one, or (trials-parallel: the arm may be prepared on another rank at the same moment)
        # the plan's own, which is the same function of the previous level.
        own = s.run.arm(level, base, trial, replica)
        plan = dataclasses.replace(plan, make_masks=own.load_mask if own.has_mask() else plan.make_masks,
                                   keep_rewind=False, capture_rewind_at=None)
        seed = s.twin_seed(trial)
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
                   lr_fixed_at=plan.lr_fixed_at, result_extra={**plan.result_extra, **s.arm_fields},
                   replica=replica, dst=plan.dst)
    hook = s.early_bird_hook(level, trial, plan.capture_rewind_at or 0) if arm == TICKET else None
    return ArmJob(spec, model, directory, seed, hook)


def prepare_shared(s: SearchState, level: int, arm: str, trial: int, replica: int = 0) -> Prepared:
    """`prepare_arm`; in a data-parallel search rank 0 prepares the arm (computes its mask once, reads its
    files) and every other rank receives it: the result of a finished arm, or the prepared model's state."""
    context = s.context
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
    hook = s.early_bird_hook(level, trial, spec.capture_rewind_at or 0) if arm == TICKET else None
    return ArmJob(spec, model, s.run.arm(level, arm, trial, replica), shared["seed"], hook)
