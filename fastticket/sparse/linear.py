"""The masked linear layer's one autograd Function, for one arm and for K stacked arms, eager and under vmap.

Math (docs/architecture.md, "The invariant"), with W the stored weight whose pruned entries are exactly zero
and M its bool mask: Y = X @ W^T + b, dX = dY @ W, dW = (dY^T @ X) * M, db = dY summed over the rows. One
arm: X [..., K], W [N, K]. Stacked arms (fastticket.lottery.batched): X [A, M, K], W [A, N, K], M [A, N, K],
b [A, N], each arm its own layer.

`skips_tiles` is the only place a masked linear layer decides between the tile-skipping kernels
(kernels/masked_linear.py, kernels/grouped_linear.py) and the dense vendor GEMM (F.linear / baddbmm, exact
under the invariant, dW masked after the product). `_forward`, `_grad_input` and `_grad_weight` hold each
formula once; `MaskedLinearFunction` runs them eagerly, the custom ops of fastticket/sparse/ops.py run them
while torch.compile traces, and the Function's `vmap` rule runs the vmapped arms as one stacked call.

Entry points: `masked_linear` (a layer on the triton backend, eager), `vmapped_masked_linear` (the same
layer inside a functorch transform), `grouped_masked_linear` (stacked arms, triton backend) and
`stacked_linear` (stacked arms on the torch backend: dense, dW left unmasked for the masked optimizer,
fastticket/lottery/stacked_plan.py). A Function with no tile map runs dense.

Under vmap: a Triton launch cannot take batched tensors, so the Function's `vmap` staticmethod receives the
arms' stacked tensors and calls the Function again on them with the stacked tile map of the arms' masks
(one grouped launch per layer for forward, dX and dW, or one batched GEMM where the rule says dense); the
autograd of that call is recorded on the stacked tensors. Called outside any vmap level (a torch.func.grad
nested inside the vmap reaches the Function with the batched tensors themselves) it has no tile map and is
the dense op: correct under every transform. Why a `vmap` staticmethod and not `torch.library.register_vmap`
on the custom op: on torch 2.5.1 a custom op's vmap rule ran below its autograd and the output had no
grad_fn; the Function form composes with autograd on 2.5.1 and 2.14.1 alike.
"""
from __future__ import annotations

from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F

from fastticket.kernels._common import autocast_inputs
from fastticket.kernels.dispatch import use_tile_skipping
from fastticket.kernels.tile_map import StackedTileMap, TileMap
from fastticket.sparse import _premasked
from fastticket.sparse._op_common import bias_grad, op_stacked_tile_map, without_autocast

__all__ = ["skips_tiles", "MaskedLinearFunction", "masked_linear", "vmapped_masked_linear",
           "grouped_masked_linear", "stacked_linear"]

TileMapProvider = Callable[[int, int], TileMap]
FusedUpdate = Callable[[torch.Tensor, torch.Tensor], None]
AnyTileMap = Optional[Union[TileMap, StackedTileMap]]


def skips_tiles(tile_map: AnyTileMap, dtype: torch.dtype) -> bool:
    """Whether a masked linear layer (one arm, or stacked arms with a StackedTileMap) runs the tile-skipping
    kernels: its live-tile fraction below the linear threshold of kernels/dispatch.py. The stacked fraction is
    live tiles of all arms over all their tiles (the grouped launch's work relative to the batched GEMM). The
    one-arm kernels compute in fp32 or tensor-core precisions, so a float64 layer goes dense; the grouped
    kernels accumulate float64 in float64 and take any dtype. No tile map: dense. On a GPU a 16-bit layer whose
    in_features is not a multiple of 16 goes dense too (its kernels compile unpipelined; kernels/dispatch.py)."""
    if tile_map is None:
        return False
    if isinstance(tile_map, StackedTileMap):
        return use_tile_skipping(tile_map.live_fraction, "linear")
    return use_tile_skipping(tile_map.live_fraction, "linear", dtype, row_elements=tile_map.shape[1],
                             cuda=tile_map.live.is_cuda)


# ------------------------------------------------------------------------------------------------ formulas
# x, grad 2-D ([M, K], [M, N]) with a weight [N, K], or 3-D ([A, M, K], [A, M, N]) with a weight [A, N, K].

def _forward(x, weight, bias, tile_map: AnyTileMap, skip: bool) -> torch.Tensor:
    if skip:
        if weight.dim() == 3:
            from fastticket.kernels.grouped_linear import grouped_linear_forward
            return grouped_linear_forward(x, weight, bias, tile_map)
        from fastticket.kernels.masked_linear import linear_forward
        return linear_forward(x, weight, bias, tile_map)
    # Dense is exact: pruned weights are zero in storage.
    if weight.dim() == 2:
        return F.linear(x, weight, bias)
    wt = weight.transpose(1, 2)
    return torch.bmm(x, wt) if bias is None else torch.baddbmm(bias.unsqueeze(1), x, wt)


def _grad_input(grad, weight, tile_map: AnyTileMap, skip: bool) -> torch.Tensor:
    if skip:
        if weight.dim() == 3:
            from fastticket.kernels.grouped_linear import grouped_linear_grad_input
            return grouped_linear_grad_input(grad, weight, tile_map)
        from fastticket.kernels.masked_linear import linear_grad_input
        return linear_grad_input(grad, weight, tile_map)
    return grad @ weight if weight.dim() == 2 else torch.bmm(grad, weight)


def _grad_weight(grad, x, mask: Optional[torch.Tensor], tile_map: AnyTileMap, skip: bool) -> torch.Tensor:
    """dW, masked (mask None: left unmasked, for a caller whose optimizer masks). The stacked dense dW is one
    bmm straight into the weights' contiguous [A, N, K] layout (vmap's linear rule leaves a transposed view,
    which autograd's AccumulateGrad then copies every step)."""
    if skip:
        if x.dim() == 3:
            from fastticket.kernels.grouped_linear import grouped_linear_grad_weight
            return grouped_linear_grad_weight(grad, x, mask, tile_map)
        from fastticket.kernels.masked_linear_dw import linear_grad_weight
        return linear_grad_weight(grad, x, mask, tile_map)
    dw = grad.t() @ x if x.dim() == 2 else torch.bmm(grad.transpose(1, 2), x)
    return dw if mask is None else dw.masked_fill_(~mask.bool(), 0.0)


def _as_rows(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, skip: bool) -> torch.Tensor:
    """The upstream gradient as the formulas take it: rows of x's dtype (a stacked one keeps its arm dim)."""
    g = grad if weight.dim() == 3 else grad.reshape(-1, weight.shape[0])
    if g.dtype != x.dtype:
        g = g.to(x.dtype)
    if skip and g.stride(-1) != 1 and g.stride(-2) != 1:
        g = g.contiguous()  # e.g. an expanded (stride-0) gradient: keep the kernels' loads coalesced
    return g


def _has_mask_gradient_hook(weight: torch.Tensor) -> bool:
    """Whether `weight` carries a gradient hook that zeroes its pruned entries (fastticket.sparse.masked_weight's
    MaskGradient, marked `masks_gradient`): MaskedLinear weights and MaskedWeight parameters do."""
    hooks = getattr(weight, "_backward_hooks", None) or {}
    return any(getattr(h, "masks_gradient", False) for h in hooks.values())


def linear_grads(grad, x, weight, mask, tile_map: AnyTileMap, skip: bool, need_x: bool, need_w: bool,
                 fused_update: Optional[FusedUpdate] = None, dw_mask: Optional[torch.Tensor] = ...):
    """(dX shaped like x or None, dW or None, the gradient rows) of a masked linear layer. dX comes first: a
    fused optimizer update (called as fused_update(grad_rows, x_rows), only where tiles are skipped: a dense
    layer keeps the vendor dW) rewrites the weight in place and leaves dW None."""
    x2 = x if weight.dim() == 3 else x.reshape(-1, weight.shape[1])
    g = _as_rows(grad, x, weight, skip)
    dx = _grad_input(g, weight, tile_map, skip).reshape(x.shape) if need_x else None
    dw = None
    if need_w:
        if fused_update is not None and skip:
            fused_update(g, x2)
        else:
            dw = _grad_weight(g, x2, mask if dw_mask is ... else dw_mask, tile_map, skip)
    return dx, dw, g


def linear_output(x, weight, bias, tile_map: AnyTileMap, skip: bool) -> torch.Tensor:
    """Y for x [..., K] (one arm) or [A, M, K] (stacked)."""
    n = weight.shape[-2]
    if weight.dim() == 3:
        return _forward(x, weight, bias, tile_map, skip)
    return _forward(x.reshape(-1, x.shape[-1]), weight, bias, tile_map, skip).reshape(*x.shape[:-1], n)


# ------------------------------------------------------------------------------------------------ autograd

def _arm_first(t: torch.Tensor, dim: Optional[int], arms: int) -> torch.Tensor:
    """A vmap rule's physical tensor with its arm dimension first; one vmap did not batch is expanded
    (a stride-0 arm dimension: no copy; autograd sums the arms' gradients into it)."""
    return t.movedim(dim, 0) if dim is not None else t.expand(arms, *t.shape)


class MaskedLinearFunction(torch.autograd.Function):
    """Y = X @ W^T + b with tile skipping or the dense GEMM (`skips_tiles`), dW masked.

    apply(x, weight, bias, mask, tile_map, fused_update): one arm (x [..., K], weight [N, K], tile_map the
    layer's TileMap for linear_tile_sizes(x.device, x.dtype)) or stacked arms (x [A, M, K], weight [A, N, K],
    a StackedTileMap); tile_map None runs dense, mask None leaves dW unmasked. fused_update (one arm), when
    given, is called in the backward as fused_update(grad_out_2d, x_2d) after dX, updates the weight in place,
    and the weight gets no .grad. Written in the setup_context form with a `vmap` rule (module docstring)."""

    @classmethod
    def apply(cls, *args):  # type: ignore[override]
        # torch's Function.apply binds the arguments to forward's signature (inspect.signature) on every call
        # of a setup_context-form Function: ~0.1 ms a call, 8% of the default search's wall time. Every call
        # here passes all six arguments by position, so outside functorch transforms nothing needs binding.
        if len(args) != 6 or torch._C._are_functorch_transforms_active():
            return super().apply(*args)
        return super(torch.autograd.Function, cls).apply(*args)

    @staticmethod
    def forward(x, weight, bias, mask, tile_map, fused_update):
        return linear_output(x, weight, bias, tile_map, skips_tiles(tile_map, x.dtype))

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, weight, bias, mask, tile_map, fused_update = inputs
        ctx.save_for_backward(x, weight, mask)
        ctx.tile_map, ctx.skip = tile_map, skips_tiles(tile_map, x.dtype)
        ctx.has_bias, ctx.fused_update = bias is not None, fused_update
        ctx.hook_masks = _has_mask_gradient_hook(weight)

    @staticmethod
    def backward(ctx, grad):
        x, weight, mask = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dw_mask = mask
        if not ctx.skip and mask is not None and ctx.hook_masks:
            # One masking of the dense dW, not two: the weight's MaskGradient hook masks it next (a full N x K
            # masked_fill), or leaves it to the masked optimizer inside the engine's
            # gradient_masked_by_optimizer. The tile-skipping dW masks in its epilogue at no extra launch.
            dw_mask = None
        dx, dw, g = linear_grads(grad, x, weight, mask, ctx.tile_map, ctx.skip, need_x, need_w, ctx.fused_update,
                                 dw_mask=dw_mask)
        if ctx.skip and mask is not None and ctx.hook_masks and dw is not None:
            _premasked.mark(dw)  # masked in the tile-skipping kernel's epilogue: the hook need not mask it again
        db = bias_grad(g, (g.dim() - 2,)) if ctx.has_bias and need_b else None
        return dx, dw, db, None, None, None

    @staticmethod
    def vmap(info, in_dims, x, weight, bias, mask, tile_map, fused_update):
        from fastticket.kernels.masked_linear import linear_tile_sizes

        arms = info.batch_size
        x_dim, w_dim, b_dim, m_dim = in_dims[:4]
        x, weight, mask = _arm_first(x, x_dim, arms), _arm_first(weight, w_dim, arms), _arm_first(mask, m_dim, arms)
        if bias is not None:
            bias = _arm_first(bias, b_dim, arms)
        lead, n = x.shape[1:-1], weight.shape[1]
        x3 = x.reshape(arms, -1, x.shape[-1])
        stacked_map = op_stacked_tile_map(mask, *linear_tile_sizes(x.device, x.dtype))
        y = grouped_masked_linear(x3, weight, bias, mask, stacked_map)
        return y.reshape(arms, *lead, n), 0


# ------------------------------------------------------------------------------------------------ entry points

def _checked_inputs(what: str, x, weight, bias):
    """Under autocast, the inputs in the compute dtype; matching dtypes, or one line saying which differ."""
    x, weight, bias = autocast_inputs(x, weight, bias)
    if x.dtype != weight.dtype or (bias is not None and bias.dtype != x.dtype):
        raise TypeError(f"{what}: input dtype {x.dtype}, weight {weight.dtype}"
                        + (f", bias {bias.dtype}" if bias is not None else "") + " must match")
    return x, weight, bias


@torch.compiler.disable
def masked_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], mask: torch.Tensor,
                  tile_maps: TileMapProvider, fused_update: Optional[FusedUpdate] = None) -> torch.Tensor:
    """Masked linear layer on the triton backend: tile skipping or dense cuBLAS, chosen per layer.

    x: [..., K]; weight: [N, K] with pruned entries exactly zero; mask: bool [N, K]; tile_maps: callable
    (BN, BK) -> TileMap, cached by the layer per mask version; fused_update: see MaskedLinearFunction.
    Runs under torch.no_grad() (no autograd graph is recorded) and inside a torch.compile'd model (graph break
    here: this function is excluded from tracing and runs eagerly; fastticket/sparse/functional.py sends a
    traced layer to the custom op of ops.py instead).
    """
    from fastticket.kernels.masked_linear import linear_tile_sizes

    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"input has {x.shape[-1]} features, weight expects {weight.shape[1]} "
                         f"(weight shape {tuple(weight.shape)})")
    x, weight, bias = _checked_inputs("masked_linear", x, weight, bias)
    tile_map = tile_maps(*linear_tile_sizes(x.device, x.dtype))
    with without_autocast(x.device):
        return MaskedLinearFunction.apply(x, weight, bias, mask, tile_map, fused_update)


def vmapped_masked_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                          mask: torch.Tensor) -> torch.Tensor:
    """Y = x @ weight^T + bias for a masked linear layer called inside a functorch transform (the Function's
    vmap rule makes the arms one grouped call; see the module docstring)."""
    return MaskedLinearFunction.apply(x, weight, bias, mask, None, None)


def grouped_masked_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                          mask: torch.Tensor, tile_map: StackedTileMap) -> torch.Tensor:
    """Stacked arms' masked linear layer on the triton backend: x [A, M, K], weight [A, N, K], bias [A, N] or
    None, mask [A, N, K], tile_map for linear_tile_sizes(x.device, x.dtype)."""
    if x.dim() != 3 or weight.dim() != 3 or x.shape[0] != weight.shape[0] or x.shape[2] != weight.shape[2]:
        raise ValueError(f"grouped masked linear needs x [A, M, K] and weight [A, N, K], got "
                         f"{tuple(x.shape)} and {tuple(weight.shape)}")
    x, weight, bias = _checked_inputs("grouped masked linear", x, weight, bias)
    with without_autocast(x.device):
        return MaskedLinearFunction.apply(x, weight, bias, mask, tile_map, None)


def stacked_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """y[a] = x[a] @ weight[a]^T + bias[a] for x [A, B, in], weight [A, out, in], bias [A, out] or None: the
    dense stacked layer, dW left unmasked (the caller's masked optimizer zeroes pruned entries after the step)."""
    return MaskedLinearFunction.apply(x, weight, bias, None, None, None)
