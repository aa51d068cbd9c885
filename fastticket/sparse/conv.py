"""The masked conv2d layer's autograd Function and its one skip-vs-dense decision (triton backend).

`conv2d_plan` is the only place a masked conv layer decides between the implicit-GEMM tile-skipping kernels
of kernels/masked_conv2d.py and dense cuDNN (`F.conv2d` on the stored weight, exact under the zero invariant
of docs/architecture.md, "The invariant", with the weight gradient masked): the kernels run when the layer's
live-tile fraction is below `kernels.dispatch.dense_threshold("conv2d")` (FASTTICKET_DENSE_THRESHOLD_CONV2D:
1.01 forces the kernels, 0.0 forces cuDNN), groups == 1 (all the kernels implement) and, on CUDA, not under
torch.use_deterministic_algorithms(True) (the kernels' dX and split dW add with atomics in an order that
varies run to run; cuDNN honours the flag). `conv2d_grads` holds the kernels' backward once, for
`MaskedConv2dFunction` (eager) and the custom op of fastticket/sparse/ops.py (torch.compile).
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from fastticket.kernels._common import mask_gradient
from fastticket.kernels.dispatch import use_tile_skipping
from fastticket.kernels.tile_map import TileMap
from fastticket.sparse._op_common import bias_grad

__all__ = ["conv2d_plan", "conv2d_grads", "MaskedConv2dFunction", "masked_conv2d"]

TileMapOf = Callable[[int, int], TileMap]


def conv2d_plan(x: torch.Tensor, weight: torch.Tensor, groups: int, tile_map_of: TileMapOf) -> Optional[TileMap]:
    """The tile map to skip tiles with, or None where the layer runs dense cuDNN (see the module docstring).
    tile_map_of(BN, BK) gives the layer's tap-major tile map; it is asked only for groups == 1."""
    from fastticket.kernels.masked_conv2d import conv2d_tile_sizes

    if groups != 1:
        return None
    c_out, c_in, kh, kw = weight.shape
    tile_map = tile_map_of(*conv2d_tile_sizes(c_out, c_in * kh * kw, weight.dtype, x.device))
    if not use_tile_skipping(tile_map.live_fraction, "conv2d", weight.dtype):
        return None
    if x.device.type == "cuda" and torch.are_deterministic_algorithms_enabled():
        return None
    return tile_map


def conv2d_grads(grad, x, weight, mask, tile_map: TileMap, stride, padding, dilation, need_x: bool,
                 need_w: bool, channels_last: bool) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(dX, masked dW in the weight's dtype) by the tile-skipping kernels; None for one not asked for."""
    from fastticket.kernels.masked_conv2d import conv2d_grad_input, conv2d_grad_weight

    dx = dw = None
    if need_x:
        dx = conv2d_grad_input(grad, weight, tile_map, x.shape, stride, padding, dilation,
                               channels_last=channels_last)
    if need_w:
        dw = conv2d_grad_weight(x, grad, mask, tile_map, stride, padding, dilation)
        if dw.dtype != weight.dtype:
            dw = dw.to(weight.dtype)
    return dx, dw


class MaskedConv2dFunction(torch.autograd.Function):
    """Y = conv2d(X, W) + b with the tile-skipping kernels in forward and backward (groups == 1).

    The weight gradient is masked (pruned weights never receive gradient); X and W gradients are exact
    under the zero invariant.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], mask: torch.Tensor,
                tile_map: TileMap, stride: Tuple[int, int], padding, dilation: Tuple[int, int]):
        from fastticket.kernels.masked_conv2d import _wants_channels_last, conv2d_forward

        y = conv2d_forward(x, weight, bias, tile_map, stride, padding, dilation)
        ctx.save_for_backward(x, weight, mask)
        ctx.tile_map = tile_map
        ctx.conv = (stride, padding, dilation)
        ctx.has_bias = bias is not None
        ctx.channels_last = _wants_channels_last(x, weight)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        x, weight, mask = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x, grad_w = conv2d_grads(grad_out, x, weight, mask, ctx.tile_map, *ctx.conv, need_x, need_w,
                                      ctx.channels_last)
        grad_b = bias_grad(grad_out.to(x.dtype), (0, 2, 3)) if ctx.has_bias and need_b else None
        return grad_x, grad_w, grad_b, None, None, None, None, None


def masked_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], mask: torch.Tensor,
                  tile_maps, stride=1, padding=0, dilation=1, groups: int = 1) -> torch.Tensor:
    """Masked conv2d on the triton backend (what `MaskedConv2d.forward` calls): the tile-skipping kernels or
    dense cuDNN with the weight gradient masked, by `conv2d_plan`. tile_maps(BN, BK, k_order=...) is the
    layer's cached tile-map provider. Accepts [N, C, H, W] or unbatched [C, H, W] input, like nn.Conv2d."""
    from fastticket.kernels.conv_geometry import _pair

    if groups == 1 and x.dim() == 3:
        return masked_conv2d(x.unsqueeze(0), weight, bias, mask, tile_maps, stride, padding, dilation, groups)[0]
    if groups == 1 and (x.dim() != 4 or weight.dim() != 4):
        raise ValueError(f"masked_conv2d expects a 4-D input and filter, "
                         f"got {tuple(x.shape)} and {tuple(weight.shape)}")
    if groups == 1 and x.shape[1] != weight.shape[1]:
        raise ValueError(f"input has {x.shape[1]} channels, the filter expects {weight.shape[1]} (groups=1)")
    tile_map = conv2d_plan(x, weight, groups, lambda bn, bk: tile_maps(bn, bk, k_order="tap_major"))
    if tile_map is None:
        return F.conv2d(x, mask_gradient(weight, mask), bias, stride, padding, dilation, groups)
    stride_p, dil_p = _pair(stride, "stride"), _pair(dilation, "dilation")
    if not isinstance(padding, str):
        padding = _pair(padding, "padding")
    if x.device.type == "cuda" and torch.is_autocast_enabled("cuda"):
        # Autocast does not see inside a custom Function: cast as F.conv2d would, then run without autocast.
        dtype = torch.get_autocast_dtype("cuda")
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
        with torch.autocast("cuda", enabled=False):
            return MaskedConv2dFunction.apply(x, weight, bias, mask, tile_map, stride_p, padding, dil_p)
    if x.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype):
        raise TypeError(f"masked_conv2d needs matching dtypes, got input {x.dtype}, weight {weight.dtype}"
                        + (f", bias {bias.dtype}" if bias is not None else ""))
    return MaskedConv2dFunction.apply(x, weight, bias, mask, tile_map, stride_p, padding, dil_p)
