"""dW + SGD update fusion for MaskedLinear: the weight gradient never reaches device memory.

One program per live (BN x BK) tile of the layer's tile map (COO list): it accumulates the dW tile
`dY^T @ X` over the batch in fp32, applies the element mask, then runs the masked SGD step (weight decay,
momentum with dampening / nesterov, maximize, lr) on that tile of the weight and momentum buffer in the
epilogue. Bytes saved per step against "dW GEMM + fused step": dW written once and read once (2 x N*K
elements), for the live tiles. Dead tiles are never touched: weights and momentum there are zero already
(the invariant, DESIGN.md section 3), which is exactly what the unfused step would leave.

Semantics are torch.optim.SGD's, including the first step's `buf = d` (no buffer in optimizer.state yet);
the buffer lives in `optimizer.state[weight]["momentum_buffer"]`, so state dicts, `reset_state_` and a later
switch back to the unfused path see the same state.

Enabling (`fastticket.optim.enable_fused_dw_update`) sets each MaskedLinear's `fused_update`; the layer's
backward (kernels/masked_linear.py) computes dX with the old weight, then calls `fused_update(dY_2d, X_2d)`
and returns no weight gradient, so `optimizer.step()` skips the weight (grad None) and steps the rest.

Checked before enabling (otherwise a one-line warning and the unfused path):
- the optimizer is a MaskedSGD, every MaskedLinear weight is in it, in exactly one MaskedLinear;
- the layer's device resolves to the triton backend; weight contiguous, dtype fp32 / fp16 / bf16;
- no hooks that expect the weight gradient: tensor hooks / post-accumulate-grad hooks on the weight,
  optimizer step pre/post hooks.
Checked at run time: the weight has no `.grad` when its update runs (gradient accumulation or a weight grad
from elsewhere), and the update runs at most once between two `optimizer.step()` calls (a layer reused in one
forward): either raises, since a fused update cannot be undone.
Not checkable, so a documented precondition: no gradient clipping or other code that reads or rescales the
gradients between backward and step (the fused weights have no gradient to clip).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import triton
import triton.language as tl

from fastticket.kernels._common import dot_input_precision
from fastticket.kernels.masked_linear import block_sizes, dw_tile
from fastticket.kernels.masked_optim import sgd_update
from fastticket.kernels.tile_map import TileMap

# Fixed launch config on CUDA: autotuning would run the in-place update several times per call.
_CUDA_META = dict(BLOCK_M=64, num_warps=4, num_stages=3)
_INTERP_META = dict(BLOCK_M=16, num_warps=4)


@triton.jit
def _dw_sgd_kernel(
    dy_ptr, x_ptr, mask_ptr, w_ptr, buf_ptr, coo_rows, coo_cols,
    M, N, K,
    stride_dym, stride_dyn, stride_xm, stride_xk,
    lr, momentum, dampening, weight_decay,
    INPUT_PRECISION: tl.constexpr, HAS_MOMENTUM: tl.constexpr, FIRST: tl.constexpr, NESTEROV: tl.constexpr,
    MAXIMIZE: tl.constexpr, HAS_WD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    t = tl.program_id(0)
    acc, offs_n, offs_k, tile_ok = dw_tile(
        dy_ptr, x_ptr, tl.load(coo_rows + t), tl.load(coo_cols + t), M, N, K,
        stride_dym, stride_dyn, stride_xm, stride_xk, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    # Weight, mask and momentum buffer are contiguous [N, K] (checked when the fusion is enabled).
    offs = offs_n[:, None] * K + offs_k[None, :]
    keep = tl.load(mask_ptr + offs, mask=tile_ok, other=0) != 0
    w = tl.load(w_ptr + offs, mask=tile_ok, other=0.0).to(tl.float32)
    # The dW tile is rounded to the weight dtype first, as the unfused path stores it before stepping.
    g = acc.to(w_ptr.dtype.element_ty).to(tl.float32)
    buf = g  # placeholder: without momentum, or on the first step (whose buffer is the gradient itself)
    if HAS_MOMENTUM and not FIRST:
        buf = tl.load(buf_ptr + offs, mask=tile_ok, other=0.0).to(tl.float32)
    w, buf = sgd_update(w, g, keep, buf, FIRST, lr, momentum, dampening, weight_decay,
                        HAS_MOMENTUM, NESTEROV, MAXIMIZE, HAS_WD)
    if HAS_MOMENTUM:
        tl.store(buf_ptr + offs, buf.to(buf_ptr.dtype.element_ty), mask=tile_ok)
    tl.store(w_ptr + offs, w.to(w_ptr.dtype.element_ty), mask=tile_ok)


def linear_dw_sgd_(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor,
                   tile_map: TileMap, momentum_buffer: Optional[torch.Tensor], *, lr: float, momentum: float,
                   dampening: float, nesterov: bool, weight_decay: float, maximize: bool) -> Optional[torch.Tensor]:
    """Fused `dW = (dY^T X) * mask` + masked SGD step on `weight` in place; returns the momentum buffer
    (allocated, zeroed, on the first step). grad_out [M, N], x [M, K], weight / mask [N, K] contiguous."""
    m, n = grad_out.shape
    k = x.shape[1]
    if tuple(weight.shape) != (n, k) or tuple(tile_map.shape) != (n, k):
        raise ValueError(f"shapes: dY {tuple(grad_out.shape)}, X {tuple(x.shape)}, weight {tuple(weight.shape)}, "
                         f"tile map {tile_map.shape}")
    if not weight.is_contiguous() or not mask.is_contiguous():
        raise ValueError("linear_dw_sgd_ needs a contiguous weight and mask")
    first = momentum != 0 and momentum_buffer is None
    if first:
        momentum_buffer = torch.zeros_like(weight)  # dead tiles are never written: they must hold zeros
    if tile_map.n_live == 0:
        return momentum_buffer if momentum != 0 else None
    grad_out = grad_out.to(weight.dtype)
    x = x.to(weight.dtype)
    mask_u8 = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
    bn, bk = tile_map.block
    meta = _CUDA_META if weight.device.type == "cuda" else _INTERP_META
    _dw_sgd_kernel[(tile_map.n_live,)](
        grad_out, x, mask_u8, weight, momentum_buffer if momentum != 0 else weight,
        tile_map.coo_rows, tile_map.coo_cols,
        m, n, k, grad_out.stride(0), grad_out.stride(1), x.stride(0), x.stride(1),
        float(lr), float(momentum), float(dampening), float(weight_decay),
        INPUT_PRECISION=dot_input_precision(x.dtype, "matmul"), HAS_MOMENTUM=momentum != 0, FIRST=first,
        NESTEROV=bool(nesterov), MAXIMIZE=bool(maximize), HAS_WD=weight_decay != 0,
        BLOCK_N=bn, BLOCK_K=bk, **meta,
    )
    return momentum_buffer if momentum != 0 else None


@torch.no_grad()
def linear_dw_sgd_reference_(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor,
                             momentum_buffer: Optional[torch.Tensor], *, lr: float, momentum: float,
                             dampening: float, nesterov: bool, weight_decay: float,
                             maximize: bool) -> Optional[torch.Tensor]:
    """The same step unfused, in the weight's dtype (pass float64 tensors for a float64 reference)."""
    from fastticket.kernels.masked_optim import sgd_reference_

    dw = (grad_out.to(weight.dtype).t() @ x.to(weight.dtype)) * mask
    return sgd_reference_(weight, dw, mask, momentum_buffer, lr=lr, momentum=momentum, dampening=dampening,
                          nesterov=nesterov, weight_decay=weight_decay, maximize=maximize)


# ----------------------------------------------------------------------------------------------------------
# Wiring into a model + MaskedSGD
# ----------------------------------------------------------------------------------------------------------


class FusedSGDUpdate:
    """The `fused_update` callable of one MaskedLinear: reads the optimizer's current group hyperparameters
    (so LR schedulers apply) and keeps the momentum buffer in `optimizer.state[weight]`."""

    def __init__(self, layer, optimizer, group_index: int) -> None:
        import weakref

        self._layer = weakref.ref(layer)
        self._optimizer = weakref.ref(optimizer)
        self._group_index = group_index
        self.pending = False  # updated since the last optimizer.step()

    def __call__(self, grad_out: torch.Tensor, x: torch.Tensor) -> None:
        layer, optimizer = self._layer(), self._optimizer()
        if layer is None or optimizer is None:
            raise RuntimeError("fused dW update: its layer or optimizer no longer exists; "
                               "call fastticket.optim.disable_fused_dw_update(model)")
        weight = layer.weight
        if weight.grad is not None:
            raise RuntimeError("fused dW update: the weight already has a .grad (gradient accumulation?); the "
                               "fused path cannot accumulate: call disable_fused_dw_update(model)")
        if self.pending:
            raise RuntimeError("fused dW update ran twice before optimizer.step() (layer used twice in one "
                               "forward, or two backwards per step); call disable_fused_dw_update(model)")
        group = optimizer.param_groups[self._group_index]
        state = optimizer.state[weight]
        bn, bk = block_sizes(weight.device, weight.dtype)
        tile_map = layer.tile_map(bn, bk)
        with torch.no_grad():
            buf = linear_dw_sgd_(grad_out, x, weight, layer.weight_mask, tile_map, state.get("momentum_buffer"),
                                 lr=float(group["lr"]), momentum=group["momentum"], dampening=group["dampening"],
                                 nesterov=group["nesterov"], weight_decay=group["weight_decay"],
                                 maximize=group["maximize"])
        if buf is not None:
            state["momentum_buffer"] = buf
        self.pending = True


def _foreign_hooks(optimizer) -> bool:
    hooks = list(getattr(optimizer, "_optimizer_step_pre_hooks", {}).values())
    hooks += list(getattr(optimizer, "_optimizer_step_post_hooks", {}).values())
    return any(not getattr(h, "_fastticket_fused", False) for h in hooks)


def disable(model: torch.nn.Module) -> None:
    """Back to the unfused path for every MaskedLinear of `model` (and drop the step hook)."""
    from fastticket.nn import MaskedLinear

    for module in model.modules():
        if isinstance(module, MaskedLinear):
            update = module.fused_update
            handle = getattr(update, "hook_handle", None)
            if handle is not None:
                handle.remove()
            module.fused_update = None


def enable(model: torch.nn.Module, optimizer, warn: Callable[[str], None]) -> bool:
    """Install FusedSGDUpdate on every MaskedLinear of `model` when the preconditions (module docstring)
    hold; otherwise call `warn(reason)` and leave every layer on the unfused path. Returns whether enabled."""
    from fastticket.backend import resolve_backend
    from fastticket.nn import MaskedLinear
    from fastticket.optim import MaskedSGD

    layers = [m for m in model.modules() if isinstance(m, MaskedLinear)]
    reason = None
    if not isinstance(optimizer, MaskedSGD):
        reason = f"optimizer is {type(optimizer).__name__}, the fusion needs MaskedSGD"
    elif not layers:
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
            elif getattr(w, "_backward_hooks", None) or getattr(w, "_post_accumulate_grad_hooks", None):
                reason = "a weight has gradient hooks"
            elif not layer.weight_mask.is_contiguous():
                reason = "a weight mask is not contiguous"
            if reason is not None:
                break
    if reason is not None:
        warn(reason)
        return False
    disable(model)  # idempotent: a second enable replaces the first
    updates = []
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
