"""The arm registry: every kind of arm a search trains (the ticket and its controls), in one table.

An `ArmKind` says all there is to know about a kind: its name (config.json, result.json, the CLI's
--controls), how its mask and init are planned (`plan`, over a `Planner`: the search's access to the run's
masks, rewind points and pruning: fastticket.lottery.plans.SearchState), its legend label, colour and curve style (the
report), and whether --reinits replicates it. Its replicas' names (r-th replica: NAME{r+1}, the first plain
NAME) are the arms' directory names and progress labels. The search, the report, the CLI and the config all
read this table; a new arm kind is one entry here (and, if its mask needs something new, one Planner method).

This module is a leaf of the experiment (it imports nothing of it), so the config can read it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, Optional, Protocol, Sequence, Tuple

import torch
from torch import nn

from fastticket.sparse.nn import model_masks

Masks = Dict[str, torch.Tensor]


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
    dst: Optional[str] = None               # dynamic sparse training (rigl / set): the mask moves while training


class Planner(Protocol):
    """What a plan reads from the search (fastticket.lottery.plans.SearchState implements it)."""

    config: Any  # the SearchConfig

    def seed(self, trial: int) -> int: ...
    def reinit_seed(self, level: int, trial: int, replica: int) -> int: ...
    def rewind_point(self, trial: int) -> Dict[str, torch.Tensor]: ...
    def final_state(self, level: int, trial: int) -> Dict[str, torch.Tensor]: ...
    def ticket_mask(self, level: int, trial: int) -> Callable[[nn.Module], Masks]: ...
    def pruned_mask(self, level: int, trial: int, rewind_point: Dict[str, torch.Tensor]) -> Masks: ...
    def element_density(self, level: int, trial: int, rewind_point: Dict[str, torch.Tensor]) -> float: ...
    def random_mask(self, level: int, trial: int, model: nn.Module) -> Masks: ...
    def mask_at_init(self, method: str, level: int, trial: int, model: nn.Module) -> Masks: ...


Plan = Callable[[Planner, int, int, int], ArmPlan]  # (planner, level, trial, replica) -> plan


def _plan_ticket(p: Planner, level: int, trial: int, replica: int) -> ArmPlan:
    """Level 0: the dense net from its init (late rewinding captures the rewind point at k). Level L >= 1:
    level L-1's trained ticket pruned, rewound (--rewind weights) or kept trained (lr / none), from k."""
    config, k, seed = p.config, p.config.rewind_iter, p.seed(trial)
    if level == 0:
        return ArmPlan(seed, model_masks, None, 0, keep_rewind=k == 0, capture_rewind_at=k if k > 0 else None)
    rewind_point = p.rewind_point(trial)
    extra: Dict[str, Any] = {"rewind": config.rewind}
    if config.refill is not None:
        extra.update(refill=config.refill, element_density=p.element_density(level, trial, rewind_point))
    make = lambda model: p.pruned_mask(level, trial, rewind_point)  # noqa: E731
    if config.rewind == "weights":
        return ArmPlan(seed, make, rewind_point, k, keep_rewind=True, result_extra=extra)
    # lr rewinding / fine-tuning start from the previous level's trained weights (times the new mask), over
    # the same iterations k..end; fine-tuning keeps the schedule's final lr throughout.
    return ArmPlan(seed, make, p.final_state(level - 1, trial), k, result_extra=extra,
                   lr_fixed_at=config.iterations - 1 if config.rewind == "none" else None)


def _plan_reinit(p: Planner, level: int, trial: int, replica: int) -> ArmPlan:
    # The ticket's mask, a fresh init from a seed no ticket uses; trained from iteration 0 (a fresh init has
    # no rewind point to continue from).
    return ArmPlan(p.reinit_seed(level, trial, replica), p.ticket_mask(level, trial), None, 0)


def _plan_random(p: Planner, level: int, trial: int, replica: int) -> ArmPlan:
    # A random mask with the ticket's per-layer counts, from the trial's rewind point, over the ticket's iterations.
    return ArmPlan(p.seed(trial), lambda model: p.random_mask(level, trial, model), p.rewind_point(trial),
                   p.config.rewind_iter)


def _plan_at_init(method: str) -> Plan:
    def plan(p: Planner, level: int, trial: int, replica: int) -> ArmPlan:
        # The trial's init pruned at initialization to the ticket's count of alive units over the pruned
        # layers (the same total density), trained from iteration 0 like a fresh net.
        return ArmPlan(p.seed(trial), lambda model: p.mask_at_init(method, level, trial, model), None, 0)
    return plan


def _plan_dst(method: str) -> Plan:
    def plan(p: Planner, level: int, trial: int, replica: int) -> ArmPlan:
        # Sparse from scratch (Mocanu et al. 2018; Evci et al. 2020): a random mask with the ticket's per-layer
        # counts (the random control's draw) and a fresh init (the reinit control's seed), trained from
        # iteration 0 while fastticket.lottery.dst moves the mask.
        c = p.config
        extra = {"dst": method, "dst_interval": c.dst_interval, "dst_drop_fraction": c.dst_drop_fraction,
                 "dst_end": c.dst_end}
        return ArmPlan(p.reinit_seed(level, trial, replica), lambda model: p.random_mask(level, trial, model),
                       None, 0, result_extra=extra, dst=method)
    return plan


@dataclasses.dataclass(frozen=True)
class ArmKind:
    name: str
    label: str                 # the report's legend
    color: str                 # matplotlib colour of its points
    curve_style: str           # line style of its training curves
    plan: Plan
    replicated: bool = False   # --reinits R trains R of it per ticket, each with its own init seed
    pruned_at_init: bool = False  # a pruning-at-initialization control (fastticket.lottery.pai)

    def replicas(self, reinits: int) -> int:
        return reinits if self.replicated else 1


KINDS: Tuple[ArmKind, ...] = (
    ArmKind("ticket", "winning ticket (IMP)", "tab:blue", "-", _plan_ticket),
    ArmKind("reinit", "random reinit", "tab:orange", "--", _plan_reinit, replicated=True),
    ArmKind("random", "random pruning", "tab:green", ":", _plan_random),
    ArmKind("snip", "SNIP at init", "tab:red", "-.", _plan_at_init("snip"), pruned_at_init=True),
    ArmKind("grasp", "GraSP at init", "tab:purple", "-.", _plan_at_init("grasp"), pruned_at_init=True),
    ArmKind("synflow", "SynFlow at init", "tab:brown", "-.", _plan_at_init("synflow"), pruned_at_init=True),
    ArmKind("rigl", "RigL (dynamic sparse)", "tab:pink", "-.", _plan_dst("rigl")),
    ArmKind("set", "SET (dynamic sparse)", "tab:olive", "-.", _plan_dst("set")),
)
BY_NAME: Dict[str, ArmKind] = {kind.name: kind for kind in KINDS}
ARMS: Tuple[str, ...] = tuple(BY_NAME)          # in report order
TICKET, REINIT, RANDOM, SNIP, GRASP, SYNFLOW, RIGL, SET = ARMS
CONTROLS: Tuple[str, ...] = ARMS[1:]           # every kind but the ticket
PAI_ARMS: Tuple[str, ...] = tuple(k.name for k in KINDS if k.pruned_at_init)


# --stability: an arm's twin (the same plan under a different batch stream, fastticket.lottery.stability) is
# the arm NAME_twin, in its own directory NAME_twin_trialT (replicas NAME_twin{r+1}).
TWIN_SUFFIX = "_twin"


def twin_name(arm: str) -> str:
    return arm + TWIN_SUFFIX


def twin_base(arm: str) -> Optional[str]:
    """The arm kind a twin arm copies (ticket_twin -> ticket), None for an arm that is no twin."""
    base = arm[:-len(TWIN_SUFFIX)] if arm.endswith(TWIN_SUFFIX) else None
    return base if base in BY_NAME else None


def with_twins(arms: Sequence[Tuple[str, int]], stability: Optional[int]) -> List[Tuple[str, int]]:
    """`arms` (level_arms) with each arm's twin right after it when --stability is on."""
    if not stability:
        return list(arms)
    return [a for arm, r in arms for a in ((arm, r), (twin_name(arm), r))]


def kind(name: str) -> ArmKind:
    name = twin_base(name) or name
    if name not in BY_NAME:
        raise ValueError(f"unknown arm {name!r}; arms are {', '.join(ARMS)}")
    return BY_NAME[name]


def arm_name(arm: str, replica: int = 0) -> str:
    """An arm's name with its replica: the directory name (NAME_trialT) and progress label. The r-th replica
    (r >= 1) is NAME{r+1}; the first keeps NAME, so run directories written before replicas existed read the
    same."""
    return f"{arm}{replica + 1}" if replica else arm


def level_arms(controls: Sequence[str], reinits: int, level: int) -> List[Tuple[str, int]]:
    """(arm kind, replica) of one trial at `level`, in run order: the ticket first (the controls read its
    mask), then each control with its replicas. Level 0 is the dense ticket alone."""
    arms = [(TICKET, 0)]
    if level > 0:
        for control in controls:
            arms += [(control, r) for r in range(kind(control).replicas(reinits))]
    return arms


def order_key(arm: str) -> Tuple[int, str]:
    """Sort key of arm names: registry order, unknown names after."""
    return (ARMS.index(arm) if arm in BY_NAME else len(ARMS), arm)


def label(arm: str) -> str:
    return BY_NAME[arm].label if arm in BY_NAME else arm


def color(arm: str) -> Optional[str]:
    return BY_NAME[arm].color if arm in BY_NAME else None


def curve_style(arm: str) -> str:
    return BY_NAME[arm].curve_style if arm in BY_NAME else "-."
