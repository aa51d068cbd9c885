"""Masked optimizers (drop-in for torch.optim.SGD / Adam / AdamW) and the opt-in dW+update fusion.

`MaskedSGD(model.parameters(), lr=...)` finds the masks of masked layers' weights by itself (through
`fastticket.sparse._mask_registry`); masks for other tensors are given as `masks=[...]` aligned with the params, or
as a param-group key `"mask"` (a list aligned with the group's params). For a masked parameter the step
masks the gradient, keeps optimizer state zero on pruned entries and writes pruned weights as exact zeros,
so no step can revive them (docs/architecture.md, "The invariant"). State lives in `self.state` under
torch.optim's keys ('step', 'momentum_buffer', 'exp_avg', 'exp_avg_sq', 'max_exp_avg_sq'), so state dicts and
LR schedulers work as with torch.optim, and state dicts are interchangeable with torch.optim's.

Backend (fastticket.sparse.backend.resolve_backend of the parameter's device): "triton" runs the fused multi-tensor
kernels of fastticket.kernels.masked_optim, "torch" runs the formulas of
kernels/masked_optim_reference.py (torch._foreach_* passes, one per formula over a group's tensors), or for
Adam/AdamW on CPU tensors torch's fused CPU Adam (one pass per tensor; fastticket/sparse/_optim_torch.py)
(the tests check both against the reference in float64).
Rewinding and optimizer-state resets live in fastticket.sparse.rewind. `set_graph_safe(True)` splits the step
into a host part and a device part reading its scalars on the device, for CUDA graphs
(fastticket/sparse/_step_scalars.py).
"""
from __future__ import annotations

import math
import warnings
import weakref
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.optim import Optimizer
from torch.utils.weak import WeakIdKeyDictionary

from fastticket.sparse import _mask_registry, fused_update
from fastticket.sparse._optim_plan import build_plan, plan_key
from fastticket.sparse._optim_torch import ADAM_STATE, adam_step_torch
from fastticket.sparse._step_scalars import GraphSafeAdam, GraphSafeSGD
from fastticket.kernels import masked_optim
from fastticket.kernels.masked_optim_reference import sgd_foreach_

ParamsT = Union[Iterable[torch.Tensor], Iterable[Dict[str, Any]]]

__all__ = ["MaskedSGD", "MaskedAdam", "MaskedAdamW", "enable_fused_dw_update", "disable_fused_dw_update",
           "mask_optimizer_state_"]


@torch.no_grad()
def mask_optimizer_state_(optimizer: Optimizer) -> int:
    """Zero the state of any optimizer (torch.optim's too) on pruned entries, and the pruned weights; call it
    after changing masks mid-training. Returns how many parameters had a mask.

    Masked layers mask the weight gradient, but torch.optim's SGD with momentum, Adam and AdamW keep stepping
    with the state gathered before a mask change and would revive every newly pruned weight. With that state
    zero, a zero gradient and a zero weight, each of their updates on a pruned entry is exactly zero (weight
    decay included), so the pruned weights stay zero. The masked optimizers of this module need no such call.
    """
    masked = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            mask = (optimizer.mask_for(p) if isinstance(optimizer, _MaskedOptimizer)
                    else _mask_registry.mask_of(p))
            if mask is None:
                continue
            masked += 1
            pruned = ~mask.to(device=p.device, dtype=torch.bool)
            p.masked_fill_(pruned, 0.0)
            for value in optimizer.state.get(p, {}).values():
                if isinstance(value, torch.Tensor) and tuple(value.shape) == tuple(p.shape):
                    value.masked_fill_(pruned, 0.0)
    return masked


def _as_bool_mask(mask: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    if tuple(mask.shape) != tuple(param.shape):
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match parameter shape {tuple(param.shape)}")
    if mask.dtype == torch.bool and mask.device == param.device:
        return mask  # kept by reference: later in-place edits of the caller's mask are seen
    return (mask != 0).to(param.device)


def _check_lr(lr: float) -> None:
    if not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr < 0.0:
        raise ValueError(f"Invalid learning rate: {lr} (must be a finite number >= 0)")


class _MaskedOptimizer(Optimizer):
    """What the masked optimizers share: mask lookup and the explicit-mask bookkeeping."""

    def __init__(self, params: ParamsT, defaults: Dict[str, Any],
                 masks: Optional[Sequence[Optional[torch.Tensor]]] = None) -> None:
        # Masks are kept out of param_groups so that state_dict() stays tensor-free in its groups, exactly
        # like torch.optim's; identity-keyed because tensors hash by id but compare elementwise.
        self._explicit_masks: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._owner_cache: WeakIdKeyDictionary = WeakIdKeyDictionary()
        # Tile size of block-mask skipping: masks with a dead (BN x BK) tile are stepped over live tiles only.
        self.block_tile: Tuple[int, int] = tuple(masked_optim.DEFAULT_TILE)  # type: ignore[assignment]
        # param -> the versions of its mask, weight and state as the last torch-backend step left them (exactly
        # zero on pruned entries); see _still_zero.
        self._zero_after_step: WeakIdKeyDictionary = WeakIdKeyDictionary()
        # Set by fastticket.lottery.batched: every parameter is K arms stacked along dim 0 (see _optim_torch.py).
        self.stacked_arms = False
        # The cached launch plans (fastticket/sparse/_optim_plan.py): group index -> GroupPlan; the epoch moves
        # when groups or state are replaced wholesale; plan_builds counts builds (tests assert reuse).
        self._plans: Dict[int, Any] = {}
        self._plan_epoch = 0
        self.plan_builds = 0
        super().__init__(params, defaults)
        if masks is not None:
            flat = [p for g in self.param_groups for p in g["params"]]
            masks = list(masks)
            if len(masks) != len(flat):
                raise ValueError(f"masks=[...] has {len(masks)} entries for {len(flat)} parameters")
            for p, m in zip(flat, masks):
                if m is not None:
                    self._explicit_masks[p] = _as_bool_mask(m, p)

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        group_masks = param_group.pop("mask", None) if isinstance(param_group, dict) else None
        self._invalidate_plans()
        super().add_param_group(param_group)
        if group_masks is not None:
            params = self.param_groups[-1]["params"]
            if isinstance(group_masks, torch.Tensor):
                group_masks = [group_masks]
            group_masks = list(group_masks)
            if len(group_masks) != len(params):
                raise ValueError(f"param group 'mask' has {len(group_masks)} entries for {len(params)} params")
            for p, m in zip(params, group_masks):
                if m is not None:
                    self._explicit_masks[p] = _as_bool_mask(m, p)

    def mask_for(self, param: torch.Tensor) -> Optional[torch.Tensor]:
        """The mask the step applies to `param`: explicit, else its masked layer's `weight_mask`, else None."""
        mask = self._explicit_masks.get(param)
        if mask is not None:
            return mask
        cached = self._owner_cache.get(param)
        if cached is not None:
            layer_ref, registry_size = cached  # (weak ref to the owner or None, registry generation)
            layer = layer_ref() if layer_ref is not None else None
            if layer is not None and getattr(layer, "weight", None) is param:
                return layer.weight_mask
            if layer_ref is None and registry_size == _mask_registry.generation():
                return None  # known unowned, and no layer was built since we looked
        layer = _mask_registry.layer_of(param)
        self._owner_cache[param] = (weakref.ref(layer) if layer is not None else None,
                                    _mask_registry.generation())
        return None if layer is None else layer.weight_mask

    def tile_map_for(self, param: torch.Tensor, mask: Optional[torch.Tensor]):
        """Tile map for the live-tile-only step, or None (element mode). Layer masks use the layer's cached
        tile maps (rebuilt only when the mask changes); explicit masks a cache keyed on the mask tensor."""
        if mask is None:
            return None
        provider = None
        if param not in self._explicit_masks:
            cached = self._owner_cache.get(param)
            layer = cached[0]() if cached is not None and cached[0] is not None else None
            if layer is not None and hasattr(layer, "tile_map"):
                provider = layer.tile_map
        return masked_optim.tile_map_for(mask, self.block_tile, provider)

    def _invalidate_plans(self) -> None:
        # getattr: torch.optim's __init__ calls add_param_group before our __init__ body has run to the end.
        self.__dict__["_plan_epoch"] = self.__dict__.get("_plan_epoch", 0) + 1
        self.__dict__["_plans"] = {}

    def _plan(self, g: int, group: Dict[str, Any]):
        """Group g's cached launch plan, rebuilt only when its key moved (fastticket/sparse/_optim_plan.py)."""
        epoch = (self._plan_epoch, self.block_tile)
        plan = self._plans.get(g)
        if plan is None or plan.key != plan_key(epoch, group["params"], plan.masks) or not plan.owners_hold():
            plan = self._plans[g] = build_plan(self, group, epoch)
            self.plan_builds += 1
        return plan

    def _grad_of(self, p: torch.Tensor) -> torch.Tensor:
        if p.grad.is_sparse:
            raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
        return p.grad

    @staticmethod
    def _closure_loss(closure: Optional[Callable[[], float]]) -> Optional[float]:
        """The closure's loss, evaluated with grad enabled (step() itself runs under no_grad), or None."""
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self._check_state_shapes(state_dict)
        self._zero_after_step = WeakIdKeyDictionary()  # loaded state is re-masked in full at its first step
        super().load_state_dict(state_dict)
        self._invalidate_plans()

    def _check_state_shapes(self, state_dict: Dict[str, Any]) -> None:
        """Every per-parameter state tensor (moments, momentum) must have its parameter's shape: the fused
        kernels index them as such, so another model's state would read out of bounds (a crash, not an error)."""
        saved_groups = state_dict.get("param_groups", []) if isinstance(state_dict, dict) else []
        state = state_dict.get("state", {}) if isinstance(state_dict, dict) else {}
        for g, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            for i, (p, key) in enumerate(zip(group["params"], saved.get("params", []))):
                for name, t in (state.get(key) or {}).items():
                    if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape != p.shape:
                        raise ValueError(f"optimizer state does not fit: {name} of parameter {i} (group {g}) has "
                                         f"shape {tuple(t.shape)}, the parameter {tuple(p.shape)}; it is another "
                                         f"model's state")

    def _versions(self, p: torch.Tensor, m: torch.Tensor, keys: Sequence[str]) -> Tuple[int, ...]:
        state = self.state.get(p, {})
        held = [state.get(k) for k in keys]
        return (id(m), m._version, p._version, *((id(t), t._version) if t is not None else (0, 0) for t in held))

    def _still_zero(self, params: Sequence[torch.Tensor], masks: Sequence[Optional[torch.Tensor]],
                    keys: Sequence[str]) -> List[bool]:
        """Per parameter: are its weight and state still exactly zero on its pruned entries, as the last step
        left them? Anything that touched the mask, the weight or the state since (a mask change, a rewind, a
        hand edit, a loaded state) bumped a tensor version, and that parameter is re-masked in full."""
        return [m is not None and self._zero_after_step.get(p) == self._versions(p, m, keys)
                for p, m in zip(params, masks)]

    def _record_zero(self, params: Sequence[torch.Tensor], masks: Sequence[Optional[torch.Tensor]],
                     keys: Sequence[str]) -> None:
        for p, m in zip(params, masks):
            if m is not None:
                self._zero_after_step[p] = self._versions(p, m, keys)

    def __setstate__(self, state: Dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_explicit_masks", WeakIdKeyDictionary())
        self.__dict__.setdefault("_owner_cache", WeakIdKeyDictionary())
        self.__dict__.setdefault("block_tile", tuple(masked_optim.DEFAULT_TILE))
        self.__dict__["_zero_after_step"] = WeakIdKeyDictionary()
        self.__dict__.setdefault("stacked_arms", False)
        self.__dict__.setdefault("plan_builds", 0)
        self._invalidate_plans()


class MaskedSGD(GraphSafeSGD, _MaskedOptimizer):
    """torch.optim.SGD with masks; same constructor arguments (foreach / fused accepted and ignored: the step
    is always one fused pass per group on the triton backend; groups record fused=None so that
    load_state_dict keeps 'step' counters on the CPU as torch's non-fused optimizers do)."""

    def __init__(self, params: ParamsT, lr: float = 1e-3, momentum: float = 0, dampening: float = 0,
                 weight_decay: float = 0, nesterov: bool = False, *, maximize: bool = False,
                 foreach: Optional[bool] = None, differentiable: bool = False, fused: Optional[bool] = None,
                 masks: Optional[Sequence[Optional[torch.Tensor]]] = None) -> None:
        _check_lr(lr)
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        if differentiable:
            raise ValueError("MaskedSGD does not support differentiable=True")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize, foreach=foreach, differentiable=False, fused=None)
        super().__init__(params, defaults, masks)

    def __setstate__(self, state: Dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("nesterov", False)
            group.setdefault("maximize", False)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        loss = self._closure_loss(closure)
        if self._graph_safe_step():  # lr read on the device (fastticket/sparse/_step_scalars.py)
            return loss
        for g, group in enumerate(self.param_groups):
            plan = self._plan(g, group)
            if plan.params:
                lr = float(group["lr"])
                self._sgd_launch(group, plan, dict(lr=lr), lr)
        return loss

    def _sgd_launch(self, group: Dict[str, Any], plan, triton_lr: Dict[str, Any], torch_lr: Any) -> None:
        """One group's SGD launches, eager or graph-safe: `triton_lr` the triton launcher's lr arguments (the
        float, or the device row of _step_scalars.py), `torch_lr` the torch backend's (a float or a 0-dim
        device tensor)."""
        state = self.state
        bufs = [state[p].get("momentum_buffer") for p in plan.params]
        hp = dict(momentum=group["momentum"], dampening=group["dampening"], nesterov=group["nesterov"],
                  weight_decay=group["weight_decay"], maximize=group["maximize"])
        for backend, idx, sub in plan.by_backend:
            sub_bufs = [bufs[i] for i in idx]
            args = (sub["params"], [self._grad_of(p) for p in sub["params"]], sub["masks"], sub_bufs)
            if backend == "triton":
                masked_optim.sgd_step_(*args, **sub["tile_kwargs"], **triton_lr, **hp)
            else:
                sgd_foreach_(*args, lr=torch_lr, **hp)
            for i, b in zip(idx, sub_bufs):
                bufs[i] = b
        if group["momentum"] != 0:
            for p, b in zip(plan.params, bufs):
                state[p]["momentum_buffer"] = b


def _scalar_dtype() -> torch.dtype:
    # torch.optim keeps 'step' as a CPU float tensor of this dtype; matching it keeps state dicts interchangeable.
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


class MaskedAdam(GraphSafeAdam, _MaskedOptimizer):
    """torch.optim.Adam with masks; same constructor arguments (foreach / fused / capturable / differentiable
    accepted; capturable and differentiable must be False)."""

    _decoupled_default = False

    def __init__(self, params: ParamsT, lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0, amsgrad: bool = False, *,
                 foreach: Optional[bool] = None, maximize: bool = False, capturable: bool = False,
                 differentiable: bool = False, fused: Optional[bool] = None,
                 decoupled_weight_decay: Optional[bool] = None,
                 masks: Optional[Sequence[Optional[torch.Tensor]]] = None) -> None:
        _check_lr(lr)
        if eps < 0.0:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= betas[0] < 1.0 or not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameters: {betas}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if differentiable:
            raise ValueError(f"{type(self).__name__} does not support differentiable=True")
        if capturable:
            raise ValueError(f"{type(self).__name__} does not take capturable=True: for a CUDA graph call "
                             "set_graph_safe(True), which reads the step count and lr on the device")
        if decoupled_weight_decay is None:
            decoupled_weight_decay = self._decoupled_default
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize, foreach=foreach, capturable=False, differentiable=False, fused=None,
                        decoupled_weight_decay=decoupled_weight_decay)
        super().__init__(params, defaults, masks)

    def __setstate__(self, state: Dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("amsgrad", False)
            group.setdefault("maximize", False)
            group.setdefault("decoupled_weight_decay", self._decoupled_default)

    def _init_state(self, p: torch.Tensor, amsgrad: bool) -> Dict[str, Any]:
        state = self.state[p]
        if len(state) == 0 or "exp_avg" not in state:
            state["step"] = torch.tensor(0.0, dtype=_scalar_dtype())
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if amsgrad and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        loss = self._closure_loss(closure)
        if self._graph_safe_step():  # lr and bias corrections read on the device (_step_scalars.py)
            return loss
        for g, group in enumerate(self.param_groups):
            plan = self._plan(g, group)
            params = plan.params
            if not params:
                continue
            amsgrad = group["amsgrad"]
            states = [self._init_state(p, amsgrad) for p in params]
            steps = []
            for s in states:
                s["step"] += 1  # a CPU scalar tensor, as in torch.optim: no device sync (as _step_scalars.py)
                steps.append(int(s["step"].item()))
            beta1, beta2 = group["betas"]
            hp = dict(lr=float(group["lr"]), beta1=float(beta1), beta2=float(beta2), eps=group["eps"],
                      weight_decay=group["weight_decay"], amsgrad=amsgrad, maximize=group["maximize"],
                      decoupled=group.get("decoupled_weight_decay", self._decoupled_default))
            for backend, idx, sub in plan.by_backend:
                args = (sub["params"], [self._grad_of(p) for p in sub["params"]], sub["masks"],
                        [states[i]["exp_avg"] for i in idx], [states[i]["exp_avg_sq"] for i in idx],
                        [states[i].get("max_exp_avg_sq") if amsgrad else None for i in idx], [steps[i] for i in idx])
                if backend == "triton":
                    masked_optim.adam_step_(*args, **sub["tile_kwargs"], **hp)
                else:
                    adam_step_torch(*args, **hp, still_zero=self._still_zero(args[0], args[2], ADAM_STATE),
                                     arm_slices=self.stacked_arms)
                    self._record_zero(args[0], args[2], ADAM_STATE)
        return loss


class MaskedAdamW(MaskedAdam):
    """torch.optim.AdamW with masks (decoupled weight decay, default 1e-2); same constructor arguments."""

    _decoupled_default = True

    def __init__(self, params: ParamsT, lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False, *, maximize: bool = False,
                 foreach: Optional[bool] = None, capturable: bool = False, differentiable: bool = False,
                 fused: Optional[bool] = None, masks: Optional[Sequence[Optional[torch.Tensor]]] = None) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                         foreach=foreach, maximize=maximize, capturable=capturable, differentiable=differentiable,
                         fused=fused, decoupled_weight_decay=True, masks=masks)


# ----------------------------------------------------------------------------------------------------------
# dW + update fusion
# ----------------------------------------------------------------------------------------------------------

_warned_reasons: set = set()


def _warn_once(reason: str) -> None:
    # Once per distinct reason: a training loop re-enabling every level must not repeat the same line.
    if reason not in _warned_reasons:
        _warned_reasons.add(reason)
        warnings.warn(f"fastticket: dW+update fusion not enabled ({reason}); using the unfused path",
                      RuntimeWarning, stacklevel=3)


def enable_fused_dw_update(model: nn.Module, optimizer: Optimizer) -> bool:
    """Opt in to the dW+update fusion for every MaskedLinear of `model` trained by `optimizer` (a MaskedSGD
    on the triton backend): the layer's backward applies the SGD update per live tile and never writes dW.

    Returns whether it was enabled; when a precondition fails (listed in fastticket.kernels.linear_dw_sgd)
    it warns once, in one line, and leaves the unfused path. Precondition the caller must keep: no gradient
    clipping or accumulation between backward and step (fused weights have no .grad; accumulation raises).
    """
    if not isinstance(optimizer, MaskedSGD):
        _warn_once(f"optimizer is {type(optimizer).__name__}, the fusion needs MaskedSGD")
        return False
    return fused_update.enable(model, optimizer, _warn_once)


def disable_fused_dw_update(model: nn.Module) -> None:
    """Back to the unfused path: every MaskedLinear's `fused_update` is cleared."""
    fused_update.disable(model)
