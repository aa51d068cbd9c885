"""The one place a masked layer's forward/backward picks its implementation (see fastticket.backend).

torch backend: the dense op on the stored weight, exact because pruned weights are exactly zero in storage
(docs/architecture.md, "The invariant"), with the weight gradient masked so no optimizer can revive a pruned weight.
triton backend: the tile-skipping kernels in fastticket.kernels, which choose per layer between cuBLAS /
cuDNN and tile skipping from the layer's live-tile fraction.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from fastticket.backend import resolve_backend
from fastticket.kernels._common import mask_gradient
from fastticket.kernels.tile_map import TileMap

__all__ = ["masked_linear", "masked_conv2d", "mask_gradient"]

TileMapProvider = Callable[[int, int], TileMap]

# Set by fastticket.batched while a stacked group steps: its optimizer holds every weight's mask explicitly and
# zeroes pruned entries of weights and state after each step (the update is elementwise, so a live entry never
# sees a pruned one), so the per-layer gradient mask would only repeat that work inside vmap.
_grad_mask_in_optimizer = False


@contextlib.contextmanager
def gradient_masked_by_optimizer() -> Iterator[None]:
    global _grad_mask_in_optimizer
    previous, _grad_mask_in_optimizer = _grad_mask_in_optimizer, True
    try:
        yield
    finally:
        _grad_mask_in_optimizer = previous


def _grad_masked(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return weight if _grad_mask_in_optimizer else mask_gradient(weight, mask)


def masked_linear(x: torch.Tensor, weight: torch.Tensor, bias, mask: torch.Tensor,
                  tile_maps: TileMapProvider, fused_update=None) -> torch.Tensor:
    if resolve_backend(x.device) == "triton":
        # Imported on use: triton is optional (not installed off Linux) and the torch backend must not need it.
        from fastticket.kernels.masked_linear import masked_linear as triton_masked_linear

        return triton_masked_linear(x, weight, bias, mask, tile_maps, fused_update)
    return F.linear(x, _grad_masked(weight, mask), bias)


def masked_conv2d(x: torch.Tensor, weight: torch.Tensor, bias, mask: torch.Tensor, tile_maps: TileMapProvider,
                  stride, padding, dilation, groups: int) -> torch.Tensor:
    if resolve_backend(x.device) == "triton":
        from fastticket.kernels.masked_conv2d import masked_conv2d as triton_masked_conv2d

        return triton_masked_conv2d(x, weight, bias, mask, tile_maps, stride, padding, dilation, groups)
    return F.conv2d(x, _grad_masked(weight, mask), bias, stride, padding, dilation, groups)
