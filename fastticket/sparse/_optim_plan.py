"""The masked optimizers' cached launch plan: per parameter group, what a step needs that does not change
from step to step (which parameters are stepped, their masks, tile maps and backend split), built once and
reused while a cheap key says it still holds (docs/architecture.md, "The engine").

Why: finding a parameter's mask (weak-dict and registry lookups), its tile map and its backend, and slicing
the lists per backend, cost ~10-20 us of Python per tensor per step: most of a step's host time for a
50-tensor model on a GPU, where the kernels themselves take microseconds.

What invalidates a plan (each is in its key, checked every step in one pass over the group):
- the optimizer's plan epoch: bumped by add_param_group, load_state_dict and unpickling;
- the group's parameter list (identity, length and each parameter's identity) and which have a gradient;
- each mask's identity and version counter (a mask changed in place, `set_mask_`, bumps it; so do tile maps);
  a masked layer whose `weight_mask` or `weight` was replaced;
- the mask registry's generation (a masked layer built since: an unowned parameter may now be owned);
- the requested backend (FASTTICKET_BACKEND / use_backend).
Not in it: gradients (fetched each step: zero_grad(set_to_none=True) replaces them), optimizer state (read
each step: rewinding pops or zeroes it, a torch.optim contract the plan must not bend) and hyperparameters
such as lr (read from the group each step, so an LR schedule never rebuilds the plan).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from fastticket.sparse import _mask_registry
from fastticket.sparse.backend import indices_by_backend, requested_backend

__all__ = ["GroupPlan", "plan_key"]


class GroupPlan:
    """One group's step layout. `params` / `masks` / `tile_maps`: the stepped parameters (those with a
    gradient when the plan was built) and what the step applies to each; `by_backend`: (backend, indices,
    the params, masks and tile-map arguments restricted to those indices)."""

    __slots__ = ("key", "params", "masks", "owners", "by_backend")

    def __init__(self, key: tuple, params: List[torch.Tensor], masks: List[Optional[torch.Tensor]],
                 owners: List[Any], by_backend: List[Tuple[str, List[int], Dict[str, Any]]]) -> None:
        self.key, self.params, self.masks, self.owners, self.by_backend = key, params, masks, owners, by_backend

    def owners_hold(self) -> bool:
        """Every layer-owned mask is still its layer's `weight_mask`, on the same weight."""
        for layer, p, m in self.owners:
            if getattr(layer, "weight_mask", None) is not m or getattr(layer, "weight", None) is not p:
                return False
        return True


def plan_key(epoch: int, params: Sequence[torch.Tensor], masks: Optional[Sequence[Optional[torch.Tensor]]]) -> tuple:
    """The key a plan is valid for. `masks`: the masks of the plan being checked (None while building)."""
    mask_part = () if masks is None else tuple(0 if m is None else (id(m), m._version) for m in masks)
    return (epoch, _mask_registry.generation(), requested_backend(), id(params), len(params),
            tuple(id(p) if p.grad is not None else 0 for p in params), mask_part)


def build_plan(optimizer, group: Dict[str, Any], epoch: int) -> GroupPlan:
    """A fresh plan for `group` of `optimizer` (a fastticket.sparse.optim._MaskedOptimizer)."""
    all_params = group["params"]
    params = [p for p in all_params if p.grad is not None]
    masks = [optimizer.mask_for(p) for p in params]
    owners = []
    for p, m in zip(params, masks):
        if m is not None and p not in optimizer._explicit_masks:
            cached = optimizer._owner_cache.get(p)  # filled by mask_for just above (a registry scan is O(layers))
            layer = cached[0]() if cached is not None and cached[0] is not None else None
            if layer is not None:
                owners.append((layer, p, m))
    by_backend = []
    for backend, idx in indices_by_backend([p.device for p in params]).items():
        sub = dict(params=[params[i] for i in idx], masks=[masks[i] for i in idx])
        if backend == "triton":
            sub["tile_kwargs"] = dict(tile_maps=[optimizer.tile_map_for(params[i], masks[i]) for i in idx],
                                      block=optimizer.block_tile)
        by_backend.append((backend, idx, sub))
    key = plan_key(epoch, all_params, masks)
    return GroupPlan(key, params, masks, owners, by_backend)
