"""The masked layers' triton paths as torch.library custom ops, so `torch.compile(model, fullgraph=True)` traces
a sparsified model whole (no graph break per masked layer).

`fastticket::masked_linear` and `fastticket::masked_conv2d` take the layer's tensors (input, weight, bias,
mask, and the conv geometry) and run, inside the op, what the eager triton path runs: the decision and the
formulas of fastticket/sparse/linear.py (`skips_tiles`, `linear_output`, `linear_grads`) and conv.py
(`conv2d_plan`, `conv2d_grads`), with tile maps derived from the mask and cached per mask storage
(fastticket/sparse/_op_common.py). Their backward is a second op (`..._backward`: dX and the masked dW) wired
with `torch.library.register_autograd`; each op has a fake (meta) implementation giving the output's shape,
dtype and strides, which is all the compiler needs. fastticket/sparse/functional.py calls them while
torch.compile traces (`torch.compiler.is_compiling()`); eager calls keep the autograd Functions (less
dispatch overhead per call).

Needs torch >= 2.4 (`torch.library.custom_op`, `register_fake`, `register_autograd`).
"""
# No `from __future__ import annotations` here: torch 2.5's custom_op reads the signature's annotations and
# cannot parse string ones such as 'Tuple[torch.Tensor, torch.Tensor]' (the module failed to import there).
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from fastticket.kernels.tile_map import TileMap
from fastticket.sparse._op_common import bias_grad, op_tile_map
from fastticket.sparse.conv import conv2d_grads, conv2d_plan
from fastticket.sparse.linear import linear_grads, linear_output, skips_tiles

__all__ = ["masked_linear", "masked_conv2d"]


def _like(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """`t` with the strides `torch.empty_like(ref)` has: what the fake implementations promise."""
    want = torch.empty_like(ref)
    if t.stride() == want.stride():
        return t
    return want.copy_(t)


# ------------------------------------------------------------------------------------------------- linear

def _linear_tile_map(x: torch.Tensor, mask: torch.Tensor) -> TileMap:
    from fastticket.kernels.masked_linear import linear_tile_sizes

    return op_tile_map(mask, *linear_tile_sizes(x.device, x.dtype))


@torch.library.custom_op("fastticket::masked_linear", mutates_args=())
def masked_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                  mask: torch.Tensor) -> torch.Tensor:
    tile_map = _linear_tile_map(x, mask)
    return linear_output(x, weight, bias, tile_map, skips_tiles(tile_map, x.dtype)).contiguous()


@masked_linear.register_fake
def _(x, weight, bias, mask):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op("fastticket::masked_linear_backward", mutates_args=())
def masked_linear_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor,
                           need_x: bool, need_w: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """(dX, masked dW); an empty tensor stands for one not asked for."""
    tile_map = _linear_tile_map(x, mask)
    dx, dw, _ = linear_grads(grad, x, weight, mask, tile_map, skips_tiles(tile_map, x.dtype), need_x, need_w)
    empty = x.new_empty(0)
    return (_like(dx, x) if need_x else empty), (_like(dw.to(weight.dtype), weight) if need_w else empty)


@masked_linear_backward.register_fake
def _(grad, x, weight, mask, need_x, need_w):
    return (torch.empty_like(x) if need_x else x.new_empty(0),
            torch.empty_like(weight) if need_w else x.new_empty(0))


def _linear_setup(ctx, inputs, output) -> None:
    x, weight, bias, mask = inputs
    ctx.save_for_backward(x, weight, mask)
    ctx.has_bias = bias is not None


def _linear_backward(ctx, grad):
    x, weight, mask = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    dx, dw = torch.ops.fastticket.masked_linear_backward(grad, x, weight, mask, need_x, need_w)
    db = bias_grad(grad, tuple(range(grad.dim() - 1))) if ctx.has_bias and need_b else None
    return (dx if need_x else None), (dw if need_w else None), db, None


masked_linear.register_autograd(_linear_backward, setup_context=_linear_setup)


# ------------------------------------------------------------------------------------------------- conv2d
# Padding travels as ints plus a string ("same" / "valid" / "" for the ints): custom ops take no unions.

def _conv_padding(padding: Sequence[int], padding_str: str):
    return padding_str if padding_str else tuple(padding)


def _conv_tile_map(x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor) -> Optional[TileMap]:
    # The conv kernels reduce K tap-major (kh, kw, C_in): their tile maps are of the permuted filter.
    return conv2d_plan(x, weight, 1, lambda bn, bk: op_tile_map(mask, bn, bk, k_order="tap_major"))


def _conv_format(x: torch.Tensor, weight: torch.Tensor) -> torch.memory_format:
    from fastticket.kernels.masked_conv2d import _memory_format, _wants_channels_last

    return _memory_format(_wants_channels_last(x, weight))


@torch.library.custom_op("fastticket::masked_conv2d", mutates_args=())
def masked_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], mask: torch.Tensor,
                  stride: List[int], padding: List[int], padding_str: str, dilation: List[int]) -> torch.Tensor:
    from fastticket.kernels.masked_conv2d import conv2d_forward

    pad = _conv_padding(padding, padding_str)
    tile_map = _conv_tile_map(x, weight, mask)
    if tile_map is not None:
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
    pad = _conv_padding(padding, padding_str)
    stride_t, dilation_t = tuple(stride), tuple(dilation)
    tile_map = _conv_tile_map(x, weight, mask)
    grad = grad.to(x.dtype)
    empty = x.new_empty(0)
    if tile_map is not None:
        dx, dw = conv2d_grads(grad, x, weight, mask, tile_map, stride_t, pad, dilation_t, need_x, need_w,
                              channels_last=_conv_format(x, weight) == torch.channels_last)
        dx, dw = (empty if dx is None else dx), (empty if dw is None else dw)
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
    db = bias_grad(grad, (0, 2, 3)) if ctx.has_bias and need_b else None
    return (dx if need_x else None), (dw if need_w else None), db, None, None, None, None, None


masked_conv2d.register_autograd(_conv_backward, setup_context=_conv_setup)
