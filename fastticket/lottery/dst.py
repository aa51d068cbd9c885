"""Dynamic sparse training: the drop / regrow update of SET (Mocanu et al. 2018) and RigL (Evci et al. 2020).

An arm trained sparse from scratch at its level's density; every `dst_interval` steps until `dst_end` of the
iterations, each pruned layer drops its k smallest-magnitude live units and regrows k units that were dead
before the drop: at random (SET) or by the largest dense-gradient magnitude (RigL), with
k = f(t) * live units and f(t) = alpha / 2 * (1 + cos(pi t / T_end)) (RigL's cosine decay). A unit is a weight
(element granularity) or an RxC tile of the kernels' 2-D weight view (block granularity: whole tiles move, so
the kernels keep skipping). The count per layer never changes.

Regrown weights start at exactly zero (they were pruned, so zero in storage) with zero optimizer state;
dropped ones are zeroed by `set_mask_`, which also bumps the layer's mask version (tile maps are rebuilt).
The pure functions (`update_fraction`, `drop_regrow`) are what the tests check against references; `update_`
applies them to a model and its optimizer. SET's regrow draws come from a generator seeded by
(trial seed, level, replica, iteration), a function of the step alone, so a resumed arm draws the same.
See docs/architecture.md, "Dynamic sparse training".
"""
from __future__ import annotations

import copy
import math
from typing import Dict, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fastticket.lottery.config import parse_granularity
from fastticket.lottery.criteria import Block, alive_units, expand_tiles, tile_norms
from fastticket.sparse.nn import densify, masked_modules, weight_key

RIGL, SET = "rigl", "set"
METHODS = (RIGL, SET)
_STREAM_SET = 23  # SET's regrow stream (distinct from the search's pruning / mask / reinit streams)


def update_fraction(step: int, alpha: float, end_step: int) -> float:
    """RigL's cosine-decaying update fraction f(t) = alpha / 2 (1 + cos(pi t / T_end)); 0 from T_end on."""
    if step >= end_step:
        return 0.0
    return alpha / 2.0 * (1.0 + math.cos(math.pi * step / end_step))


def end_step(iterations: int, end: float) -> int:
    """T_end: the step count after which the mask stays fixed (`end` of the iterations)."""
    return int(math.floor(end * iterations))


def update_due(step: int, interval: int, end: int) -> bool:
    """Is there a drop/regrow after `step` training steps (every `interval`, strictly before T_end)?"""
    return 0 < step < end and step % interval == 0


def _unit_scores(t: torch.Tensor, block: Block) -> torch.Tensor:
    """Per-unit magnitude, flat: |t| per weight, or each tile's L1 norm (normalised by its entry count)."""
    scores = t.detach().abs() if block is None else tile_norms(t.detach(), block, "l1")
    return torch.nan_to_num(scores.reshape(-1).double(), nan=0.0)


def drop_regrow(mask: torch.Tensor, weight: torch.Tensor, regrow_score: torch.Tensor, fraction: float,
                block: Block = None) -> torch.Tensor:
    """The layer's new bool mask: drop the k = floor(fraction * live units) live units of smallest magnitude,
    regrow the k units of largest `regrow_score` among those dead before the drop (so a dropped unit never
    comes back in the same update, as in RigL). `regrow_score` is flat over the units (weights, or tiles in
    row-major tile order). Ties break by position (stable sorts): the update is deterministic."""
    live = alive_units(mask.bool(), block).reshape(-1)
    n_live, n_dead = int(live.sum()), int((~live).sum())
    k = min(int(math.floor(fraction * n_live)), n_dead)
    new = live.clone()
    if k > 0:
        magnitude = torch.where(live, _unit_scores(weight, block), torch.full_like(live, math.inf, dtype=torch.float64))
        drop = torch.argsort(magnitude, stable=True)[:k]
        score = torch.nan_to_num(regrow_score.reshape(-1).to(live.device).double(), nan=-math.inf)
        score = torch.where(live, torch.full_like(score, -math.inf), score)
        grow = torch.argsort(score, descending=True, stable=True)[:k]
        new[drop] = False
        new[grow] = True
    if block is None:
        return new.reshape(mask.shape)
    units = alive_units(mask.bool(), block)
    return expand_tiles(new.reshape(units.shape), block, mask.shape)


def set_generator(seed: int, level: int, replica: int, step: int) -> torch.Generator:
    """SET's regrow generator at `step`: a function of (trial seed, level, replica, step) alone."""
    parts = [int(p) & 0xFFFFFFFF for p in (seed, _STREAM_SET, level, replica, step)]
    return torch.Generator().manual_seed(int(np.random.SeedSequence(parts).generate_state(1, np.uint64)[0]
                                             & 0x7FFF_FFFF_FFFF_FFFF))


def dense_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor, names: Sequence[str]) -> Dict[str, torch.Tensor]:
    """dL/dW of the dense weights at the model's current parameters on one batch (RigL's regrow score).

    A copy of the model is densified (plain nn.Linear / nn.Conv2d; pruned weights stay zero, so its forward
    is the masked model's) and backpropagated once: the gradient is dY^T X over every entry, pruned ones
    included, on whatever backend the masked layers use. The copy's BatchNorm statistics and the RNG
    (dropout) are left as they were, so the update does not perturb the training run."""
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        dense = densify(copy.deepcopy(model))
        dense.train(model.training)
        dense.zero_grad(set_to_none=True)
        F.cross_entropy(dense(x), y).backward()  # the loss the training step takes
    # densify keeps the parameters' names: each mask's weight by its state-dict key (attention's in_proj too).
    layers, params = dict(masked_modules(model)), dict(dense.named_parameters())
    return {n: params[weight_key(n, layers[n])].grad.detach() for n in names}


@torch.no_grad()
def update_(model: nn.Module, optimizer: torch.optim.Optimizer, method: str, fraction: float, block: Block,
            names: Sequence[str], grads: Optional[Dict[str, torch.Tensor]] = None,
            generator: Optional[torch.Generator] = None) -> Dict[str, int]:
    """One drop/regrow over the layers `names` of `model`, in place; returns the number of moved weights per
    layer. RigL needs `grads` (from `dense_gradients`), SET a `generator`. Afterwards the dropped weights and
    every regrown one are exactly zero, with zero optimizer state (and the masked optimizer keeps pruned
    entries zero from then on)."""
    if method not in METHODS:
        raise ValueError(f"unknown dynamic sparse training method {method!r}; methods are {', '.join(METHODS)}")
    layers = dict(masked_modules(model))
    params = {id(layer.weight): layer for layer in layers.values()}
    moved: Dict[str, int] = {}
    regrown_of: Dict[int, torch.Tensor] = {}
    for name in names:
        layer = layers[name]
        old = layer.weight_mask.bool().clone()
        n_units = alive_units(old, block).numel()
        if method == RIGL:
            score = _unit_scores(grads[name], block)
        else:
            score = torch.rand(n_units, generator=generator, dtype=torch.float64)
        new = drop_regrow(old, layer.weight, score, fraction, block)
        regrown = new & ~old
        layer.set_mask_(new)          # zeroes the dropped weights, bumps the mask version (tile maps)
        layer.weight.masked_fill_(regrown, 0.0)  # already zero (they were pruned); said here, not assumed
        regrown_of[id(layer.weight)] = regrown
        moved[name] = int(regrown.sum())
    for group in optimizer.param_groups:
        for p in group["params"]:
            layer = params.get(id(p))
            if layer is None or id(p) not in regrown_of:
                continue
            reset = regrown_of[id(p)] | ~layer.weight_mask.bool()  # regrown: fresh state; pruned: zero state
            for value in optimizer.state.get(p, {}).values():
                if isinstance(value, torch.Tensor) and tuple(value.shape) == tuple(p.shape):
                    value.masked_fill_(reset, 0.0)
    return moved


def due(config, step: int) -> bool:
    """Is a drop/regrow due after `step` training steps under the search's settings?"""
    return update_due(step, config.dst_interval, end_step(config.iterations, config.dst_end))


def arm_update_(config, job, optimizer: torch.optim.Optimizer, data, step: int, prunable: Sequence[str],
                context=None) -> None:
    """The search's drop/regrow of one dynamic arm (an ArmJob with `spec.dst` set) after `step` steps (`due`):
    RigL scores the dead weights by the dense gradient on the batch of the step just taken (summed over the
    ranks in a data-parallel search, so every rank draws the same mask); SET draws from `set_generator`."""
    spec, model = job.spec, job.model
    fraction = update_fraction(step, config.dst_drop_fraction, end_step(config.iterations, config.dst_end))
    grads = generator = None
    if spec.dst == RIGL:
        x, y = data.batch(step - 1, config.batch_size, job.seed)
        grads = dense_gradients(model, x, y, prunable)
        if context is not None and context.data_parallel:
            grads = {n: context.shard_sum_(g.contiguous()) for n, g in grads.items()}
    else:
        generator = set_generator(job.seed, spec.level, spec.replica, step)
    update_(model, optimizer, spec.dst, fraction, parse_granularity(config.granularity), prunable, grads, generator)
