"""The masked layers' triton paths as torch.library custom ops, so `torch.compile(model, fullgraph=True)` traces
a sparsified model whole (no graph break per masked layer).

`fastticket::masked_linear` and `fastticket::masked_conv2d` take the layer's tensors (input, weight, bias,
mask, and the conv geometry) and run, inside the op, what the eager triton path runs: the per-layer dispatch
(kernels/dispatch.py) between the tile-skipping kernels and cuBLAS / cuDNN, with tile maps derived from the
mask. Their backward is a second op (`..._backward`: dX and the masked dW) wired with
`torch.library.register_autograd`; each op has a fake (meta) implementation giving the output's shape, dtype
and strides, which is all the compiler needs. fastticket/sparse/functional.py calls them while torch.compile traces
(`torch.compiler.is_compiling()`); eager calls keep the autograd Functions of kernels/ (less dispatch
overhead per call).

Tile maps: an op sees tensors, not layers, so it keeps its own cache of tile maps per mask storage (weakly
referenced: a freed mask's entry is dropped, and its address cannot be reused while the entry lives),
rebuilt when the mask changes in place (its version counter) like the layers' own caches. Under CUDA graphs
("reduce-overhead") the graph replays the tile maps it was captured with: a masks change must be followed
by a new capture, which the compiled training step (fastticket/lottery/compiled.py) does once per arm.

Under vmap (a group of arms stacked by fastticket.lottery.batched: `vmap(functional_call(model))`), a masked linear
layer on the triton backend goes through `vmapped_masked_linear`: an autograd Function whose vmap rule
receives the arms' stacked tensors and runs them as one grouped launch (kernels/grouped_linear.py: the arm a
grid dimension, the stacked tile map of the arms' masks, cached here per mask storage like the one-arm
maps), or as one batched dense GEMM when the dispatch rule says dense. Its autograd (forward and backward)
is the grouped Function's, recorded on the stacked tensors. Why an autograd Function with a `vmap`
staticmethod and not `torch.library.register_vmap` on the custom op above: on torch 2.5.1 (the minimum this
project supports) a custom op's vmap rule runs below its autograd, so the vmapped output had no grad_fn and
backward failed (checked); the Function form composes with autograd on 2.5.1 and 2.14.1 alike.

Needs torch >= 2.4 (`torch.library.custom_op`, `register_fake`, `register_autograd`).
"""
# No `from __future__ import annotations` here: torch 2.5's custom_op reads the signature's annotations and
# cannot parse string ones such as 'Tuple[torch.Tensor, torch.Tensor]' (the module failed to import there).
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef

from fastticket.kernels.dispatch import use_tile_skipping
from fastticket.kernels.tile_map import StackedTileMap, TileMap, TileMapCache, build_stacked_tile_map

__all__ = ["masked_linear", "masked_conv2d", "op_tile_map", "op_stacked_tile_map", "vmapped_masked_linear"]

_tile_caches: Dict[Tuple, Tuple[StorageWeakRef, object]] = {}


def _per_storage(mask: torch.Tensor, kind: str, make):
    """The cache object of `kind` for `mask`'s storage and view (created by make()), dropped with the storage."""
    storage = mask.untyped_storage()
    key = (kind, StorageWeakRef(storage).cdata, mask.storage_offset(), tuple(mask.shape), tuple(mask.stride()))
    hit = _tile_caches.get(key)
    if hit is None or hit[0].expired():
        for stale in [k for k, (ref, _) in _tile_caches.items() if ref.expired()]:
            del _tile_caches[stale]
        hit = _tile_caches[key] = (StorageWeakRef(storage), make())
    return hit[1]


def op_tile_map(mask: torch.Tensor, block_n: int, block_k: int, k_order: str = "mask") -> TileMap:
    """The tile map of `mask` for (block_n x block_k) tiles (K in `k_order`, kernels/tile_map.py), cached per
    mask storage and view."""
    return _per_storage(mask, "one", TileMapCache).get(mask, block_n, block_k, 0, k_order)


def op_stacked_tile_map(mask: torch.Tensor, block_n: int, block_k: int) -> StackedTileMap:
    """The stacked tile map of a stacked linear mask [A, N, K] (kernels/tile_map.py), cached per mask storage
    and view, rebuilt when the mask is modified in place (its version counter) or its data moves."""
    cache = _per_storage(mask, "stacked", dict)
    key = (block_n, block_k)
    token = (mask._version, mask.data_ptr())
    hit = cache.get(key)
    if hit is None or hit[0] != token:
        hit = cache[key] = (token, build_stacked_tile_map(mask, block_n, block_k))
    return hit[1]


def _like(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """`t` with the strides `torch.empty_like(ref)` has: what the fake implementations promise."""
    want = torch.empty_like(ref)
    if t.stride() == want.stride():
        return t
    return want.copy_(t)


# ------------------------------------------------------------------------------------------------- linear

@torch.library.custom_op("fastticket::masked_linear", mutates_args=())
def masked_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                  mask: torch.Tensor) -> torch.Tensor:
    from fastticket.kernels import masked_linear as kernels

    k, n = x.shape[-1], weight.shape[0]
    x2 = x.reshape(-1, k)
    tile_map = op_tile_map(mask, *kernels.linear_tile_sizes(x.device, x.dtype))
    if use_tile_skipping(tile_map.live_fraction, "linear", x.dtype):
        y2 = kernels.linear_forward(x2, weight, bias, tile_map)
    else:
        y2 = F.linear(x2, weight, bias)  # exact: pruned weights are zero in storage
    return y2.reshape(*x.shape[:-1], n).contiguous()


@masked_linear.register_fake
def _(x, weight, bias, mask):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op("fastticket::masked_linear_backward", mutates_args=())
def masked_linear_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor,
                           need_x: bool, need_w: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """(dX, masked dW); an empty tensor stands for one not asked for."""
    from fastticket.kernels import masked_linear as kernels

    k, n = x.shape[-1], weight.shape[0]
    x2, g2 = x.reshape(-1, k), grad.reshape(-1, n).to(x.dtype)
    tile_map = op_tile_map(mask, *kernels.linear_tile_sizes(x.device, x.dtype))
    skipping = use_tile_skipping(tile_map.live_fraction, "linear", x.dtype)
    dx = dw = x.new_empty(0)
    if need_x:
        dx2 = kernels.linear_grad_input(g2, weight, tile_map) if skipping else g2 @ weight
        dx = _like(dx2.reshape(x.shape), x)
    if need_w:
        if skipping:
            dw2 = kernels.linear_grad_weight(g2, x2, mask, tile_map)
        else:
            dw2 = (g2.t() @ x2).masked_fill_(~mask.bool(), 0.0)
        dw = _like(dw2.to(weight.dtype), weight)
    return dx, dw


@masked_linear_backward.register_fake
def _(grad, x, weight, mask, need_x, need_w):
    return (torch.empty_like(x) if need_x else x.new_empty(0),
            torch.empty_like(weight) if need_w else x.new_empty(0))


def _linear_setup(ctx, inputs, output) -> None:
    x, weight, bias, mask = inputs
    ctx.save_for_backward(x, weight, mask)
    ctx.has_bias = bias is not None


def _bias_grad(grad: torch.Tensor, dims) -> torch.Tensor:
    # 16-bit gradients summed in fp32 over many rows, then rounded once (as the eager paths do).
    acc = torch.float32 if grad.dtype in (torch.float16, torch.bfloat16) else grad.dtype
    return grad.sum(dim=dims, dtype=acc).to(grad.dtype)


def _linear_backward(ctx, grad):
    x, weight, mask = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    dx, dw = torch.ops.fastticket.masked_linear_backward(grad, x, weight, mask, need_x, need_w)
    db = _bias_grad(grad, tuple(range(grad.dim() - 1))) if ctx.has_bias and need_b else None
    return (dx if need_x else None), (dw if need_w else None), db, None


masked_linear.register_autograd(_linear_backward, setup_context=_linear_setup)


# ------------------------------------------------------------------------------------------------- under vmap

def _arm_first(t: torch.Tensor, dim: Optional[int], arms: int) -> torch.Tensor:
    """A vmap rule's physical tensor with its arm dimension first; one vmap did not batch is expanded
    (a stride-0 arm dimension: no copy; autograd sums the arms' gradients into it)."""
    return t.movedim(dim, 0) if dim is not None else t.expand(arms, *t.shape)


class _VmappedMaskedLinear(torch.autograd.Function):
    """The masked linear layer as seen inside vmap on the triton backend (fastticket/sparse/functional.py routes it
    here whenever a functorch transform is active). Its `vmap` rule runs the vmapped arms as one grouped call
    (kernels/grouped_linear.py). Called outside any vmap level (a transform such as torch.func.grad nested
    inside the vmap reaches forward / backward with the batched tensors themselves) it is the dense op,
    exact under the zero invariant, with the masked dW: correct under every transform, grouped where the
    stacked engine needs it."""

    @staticmethod
    def forward(x, weight, bias, mask):
        return F.linear(x, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, weight, bias, mask = inputs
        ctx.save_for_backward(x, weight, mask)
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx, grad):
        x, weight, mask = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        n, k = weight.shape
        dx = grad @ weight if need_x else None
        dw = (grad.reshape(-1, n).t() @ x.reshape(-1, k)).masked_fill(~mask, 0.0) if need_w else None
        db = _bias_grad(grad, tuple(range(grad.dim() - 1))) if ctx.has_bias and need_b else None
        return dx, dw, db, None

    @staticmethod
    def vmap(info, in_dims, x, weight, bias, mask):
        from fastticket.kernels.grouped_linear import grouped_masked_linear
        from fastticket.kernels.masked_linear import linear_tile_sizes

        arms = info.batch_size
        x_dim, w_dim, b_dim, m_dim = in_dims
        x, weight, mask = _arm_first(x, x_dim, arms), _arm_first(weight, w_dim, arms), _arm_first(mask, m_dim, arms)
        if bias is not None:
            bias = _arm_first(bias, b_dim, arms)
        lead, n = x.shape[1:-1], weight.shape[1]
        x3 = x.reshape(arms, -1, x.shape[-1])
        tile_map = op_stacked_tile_map(mask, *linear_tile_sizes(x.device, x.dtype))
        y = grouped_masked_linear(x3, weight, bias, mask, tile_map)
        return y.reshape(arms, *lead, n), 0


def vmapped_masked_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                          mask: torch.Tensor) -> torch.Tensor:
    """Y = x @ weight^T + bias for a masked linear layer called inside vmap (see _VmappedMaskedLinear)."""
    return _VmappedMaskedLinear.apply(x, weight, bias, mask)


# ------------------------------------------------------------------------------------------------- conv2d
# Padding travels as ints plus a string ("same" / "valid" / "" for the ints): custom ops take no unions.

def _conv_padding(padding: Sequence[int], padding_str: str):
    return padding_str if padding_str else tuple(padding)


def _conv_tile_map(weight: torch.Tensor, mask: torch.Tensor, device: torch.device) -> TileMap:
    from fastticket.kernels.masked_conv2d import conv2d_tile_sizes

    c_out, c_in, kh, kw = weight.shape
    # The conv kernels reduce K tap-major (kh, kw, C_in): their tile maps are of the permuted filter.
    return op_tile_map(mask, *conv2d_tile_sizes(c_out, c_in * kh * kw, weight.dtype, device), k_order="tap_major")


def _conv_format(x: torch.Tensor, weight: torch.Tensor) -> torch.memory_format:
    from fastticket.kernels.masked_conv2d import _memory_format, _wants_channels_last

    return _memory_format(_wants_channels_last(x, weight))


def _conv_skipping(x: torch.Tensor, tile_map: TileMap) -> bool:
    # The eager path's rules (kernels/masked_conv2d.py, masked_conv2d): deterministic mode keeps cuDNN.
    if x.device.type == "cuda" and torch.are_deterministic_algorithms_enabled():
        return False
    return use_tile_skipping(tile_map.live_fraction, "conv2d", x.dtype)


@torch.library.custom_op("fastticket::masked_conv2d", mutates_args=())
def masked_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], mask: torch.Tensor,
                  stride: List[int], padding: List[int], padding_str: str, dilation: List[int]) -> torch.Tensor:
    from fastticket.kernels.masked_conv2d import conv2d_forward

    pad = _conv_padding(padding, padding_str)
    tile_map = _conv_tile_map(weight, mask, x.device)
    if _conv_skipping(x, tile_map):
        y = conv2d_forward(x, weight, bias, tile_map, tuple(stride), pad, tuple(dilation))
    else:
        y = F.conv2d(x, weight, bias, tuple(stride), pad, tuple(dilation))
    return y.contiguous(memory_format=_conv_format(x, weight))


@masked_conv2d.register_fake
def _(x, weight, bias, mask, stride, padding, padding_str, dilation):
    from fastticket.kernels.masked_conv2d import conv_geometry

    geom = conv_geometry(tuple(x.shape[2:]), tuple(weight.shape[2:]), tuple(stride),
                         _conv_padding(padding, padding_str), tuple(dilation))
    return x.new_empty((x.shape[0], weight.shape[0], *geom.out_hw)).contiguous(
        memory_format=_conv_format(x, weight))


def _dense_conv_grads(grad, x, weight, stride, pad, dilation, need_x: bool, need_w: bool):
    """cuDNN's dX and (unmasked) dW; string padding ('same' may pad asymmetrically) through autograd."""
    empty = x.new_empty(0)
    if isinstance(pad, str):
        with torch.enable_grad():
            xr = x.detach().requires_grad_(need_x)
            wr = weight.detach().requires_grad_(need_w)
            y = F.conv2d(xr, wr, None, stride, pad, dilation)
            wanted = [t for t, need in ((xr, need_x), (wr, need_w)) if need]
            grads = list(torch.autograd.grad(y, wanted, grad))
        return (grads.pop(0) if need_x else empty), (grads.pop(0) if need_w else empty)
    dx, dw, _ = torch.ops.aten.convolution_backward(grad, x, weight, None, list(stride), list(pad), list(dilation),
                                                     False, [0, 0], 1, [need_x, need_w, False])
    return (dx if need_x else empty), (dw if need_w else empty)


@torch.library.custom_op("fastticket::masked_conv2d_backward", mutates_args=())
def masked_conv2d_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor,
                           stride: List[int], padding: List[int], padding_str: str, dilation: List[int],
                           need_x: bool, need_w: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """(dX, masked dW); an empty tensor stands for one not asked for."""
    from fastticket.kernels.masked_conv2d import conv2d_grad_input, conv2d_grad_weight

    pad = _conv_padding(padding, padding_str)
    stride_t, dilation_t = tuple(stride), tuple(dilation)
    tile_map = _conv_tile_map(weight, mask, x.device)
    dx = dw = x.new_empty(0)
    grad = grad.to(x.dtype)
    if _conv_skipping(x, tile_map):
        if need_x:
            dx = conv2d_grad_input(grad, weight, tile_map, x.shape, stride_t, pad, dilation_t,
                                   channels_last=_conv_format(x, weight) == torch.channels_last)
        if need_w:
            dw = conv2d_grad_weight(x, grad, mask, tile_map, stride_t, pad, dilation_t).to(weight.dtype)
    else:
        dx, dw = _dense_conv_grads(grad, x, weight, stride_t, pad, dilation_t, need_x, need_w)
        if need_w:
            dw = dw.masked_fill_(~mask.bool(), 0.0).to(weight.dtype)
    return (_like(dx, x) if need_x else dx), (_like(dw, weight) if need_w else dw)


@masked_conv2d_backward.register_fake
def _(grad, x, weight, mask, stride, padding, padding_str, dilation, need_x, need_w):
    return (torch.empty_like(x) if need_x else x.new_empty(0),
            torch.empty_like(weight) if need_w else x.new_empty(0))


def _conv_setup(ctx, inputs, output) -> None:
    x, weight, bias, mask, stride, padding, padding_str, dilation = inputs
    ctx.save_for_backward(x, weight, mask)
    ctx.geometry = (stride, padding, padding_str, dilation)
    ctx.has_bias = bias is not None


def _conv_backward(ctx, grad):
    x, weight, mask = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    dx, dw = torch.ops.fastticket.masked_conv2d_backward(grad, x, weight, mask, *ctx.geometry, need_x, need_w)
    db = _bias_grad(grad, (0, 2, 3)) if ctx.has_bias and need_b else None
    return (dx if need_x else None), (dw if need_w else None), db, None, None, None, None, None


masked_conv2d.register_autograd(_conv_backward, setup_context=_conv_setup)
