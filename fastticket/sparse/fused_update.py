"""Wiring of the dW + SGD update fusion into a model and its MaskedSGD (the kernel: kernels/linear_dw_sgd.py).

`fastticket.sparse.optim.enable_fused_dw_update(model, optimizer)` is the entry point: it checks that the optimizer
is a MaskedSGD, then calls `enable` here, which checks the remaining preconditions (listed in
kernels/linear_dw_sgd.py) and installs a `FusedSGDUpdate` as every MaskedLinear's `fused_update`. The
layer's backward calls it with (dY_2d, X_2d) after computing dX; it runs the fused kernel on the layer's
weight and keeps the momentum buffer in `optimizer.state[weight]`, where the unfused step keeps it.
"""
from __future__ import annotations

import weakref
from typing import Callable, List

import torch

from fastticket.sparse.backend import resolve_backend
from fastticket.sparse.masked_weight import MaskGradient
from fastticket.sparse.nn import MaskedLinear

__all__ = ["FusedSGDUpdate", "enable", "disable"]


class FusedSGDUpdate:
    """The `fused_update` callable of one MaskedLinear: reads the optimizer's current group hyperparameters
    (so LR schedulers apply) and keeps the momentum buffer in `optimizer.state[weight]`."""

    def __init__(self, layer: MaskedLinear, optimizer: torch.optim.Optimizer, group_index: int) -> None:
        # Imported here, not at the top: triton is optional (not installed off Linux) and this module is
        # imported by fastticket.sparse.optim, which must work without it. `enable` builds one of these only once
        # the layer's device resolved to the triton backend.
        from fastticket.kernels.linear_dw_sgd import linear_dw_sgd_
        from fastticket.kernels.masked_linear import linear_tile_sizes

        self._step = linear_dw_sgd_
        self._tile_sizes = linear_tile_sizes
        self._layer = weakref.ref(layer)
        self._optimizer = weakref.ref(optimizer)
        self._group_index = group_index
        self.pending = False  # updated since the last optimizer.step()

    def __call__(self, grad_out: torch.Tensor, x: torch.Tensor) -> None:
        layer, optimizer = self._layer(), self._optimizer()
        if layer is None or optimizer is None:
            raise RuntimeError("fused dW update: its layer or optimizer no longer exists; "
                               "call fastticket.sparse.optim.disable_fused_dw_update(model)")
        weight = layer.weight
        if weight.grad is not None:
            raise RuntimeError("fused dW update: the weight already has a .grad (gradient accumulation?); the "
                               "fused path cannot accumulate: call disable_fused_dw_update(model)")
        if self.pending:
            raise RuntimeError("fused dW update ran twice before optimizer.step() (layer used twice in one "
                               "forward, or two backwards per step); call disable_fused_dw_update(model)")
        group = optimizer.param_groups[self._group_index]
        state = optimizer.state[weight]
        bn, bk = self._tile_sizes(weight.device, weight.dtype)
        tile_map = layer.tile_map(bn, bk)
        with torch.no_grad():
            buf = self._step(grad_out, x, weight, layer.weight_mask, tile_map, state.get("momentum_buffer"),
                             lr=float(group["lr"]), momentum=group["momentum"], dampening=group["dampening"],
                             nesterov=group["nesterov"], weight_decay=group["weight_decay"],
                             maximize=group["maximize"])
        if buf is not None:
            state["momentum_buffer"] = buf
        self.pending = True


def _foreign_grad_hooks(weight: torch.Tensor) -> bool:
    """Gradient hooks on `weight` other than its own mask's (which the fusion's masked epilogue covers)."""
    hooks = list((getattr(weight, "_backward_hooks", None) or {}).values())
    return (any(not isinstance(h, MaskGradient) for h in hooks)
            or bool(getattr(weight, "_post_accumulate_grad_hooks", None)))


def _foreign_hooks(optimizer: torch.optim.Optimizer) -> bool:
    hooks = list(getattr(optimizer, "_optimizer_step_pre_hooks", {}).values())
    hooks += list(getattr(optimizer, "_optimizer_step_post_hooks", {}).values())
    return any(not getattr(h, "_fastticket_fused", False) for h in hooks)


def disable(model: torch.nn.Module) -> None:
    """Back to the unfused path for every MaskedLinear of `model` (and drop the step hook)."""
    for module in model.modules():
        if isinstance(module, MaskedLinear):
            update = module.fused_update
            handle = getattr(update, "hook_handle", None)
            if handle is not None:
                handle.remove()
            module.fused_update = None


def enable(model: torch.nn.Module, optimizer: torch.optim.Optimizer, warn: Callable[[str], None]) -> bool:
    """Install FusedSGDUpdate on every MaskedLinear of `model` trained by `optimizer` (a MaskedSGD: the caller
    checks that) when the other preconditions hold; otherwise call `warn(reason)` and leave every layer on the
    unfused path. Returns whether it was enabled."""
    layers = [m for m in model.modules() if isinstance(m, MaskedLinear)]
    reason = None
    if not layers:
        reason = "the model has no MaskedLinear layer"
    elif _foreign_hooks(optimizer):
        reason = "the optimizer has step hooks"
    group_of = {}
    if reason is None:
        for gi, group in enumerate(optimizer.param_groups):
            for p in group["params"]:
                group_of[id(p)] = gi
        owners = {}
        for layer in layers:
            owners[id(layer.weight)] = owners.get(id(layer.weight), 0) + 1
        for layer in layers:
            w = layer.weight
            if id(w) not in group_of:
                reason = "a MaskedLinear weight is not in the optimizer"
            elif owners[id(w)] > 1:
                reason = "a weight is shared by several layers"
            elif resolve_backend(w.device) != "triton":
                reason = f"the backend for {w.device} is not triton"
            elif w.dtype not in (torch.float32, torch.float16, torch.bfloat16) or not w.is_contiguous():
                reason = f"weight dtype {w.dtype} / layout not supported"
            elif _foreign_grad_hooks(w):
                reason = "a weight has gradient hooks"
            elif not layer.weight_mask.is_contiguous():
                reason = "a weight mask is not contiguous"
            if reason is not None:
                break
    if reason is not None:
        warn(reason)
        return False
    disable(model)  # idempotent: a second enable replaces the first
    updates: List[FusedSGDUpdate] = []
    for layer in layers:
        update = FusedSGDUpdate(layer, optimizer, group_of[id(layer.weight)])
        layer.fused_update = update
        updates.append(update)

    def _clear_pending(opt, args, kwargs) -> None:
        for u in updates:
            u.pending = False

    # Our own hook (marked, so a second enable does not mistake it for a user's): it only resets the
    # once-per-step guard.
    _clear_pending._fastticket_fused = True  # type: ignore[attr-defined]
    handle = optimizer.register_step_post_hook(_clear_pending)
    for u in updates:
        u.hook_handle = handle
    return True
