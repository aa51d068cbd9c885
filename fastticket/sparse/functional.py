"""The one place a masked layer's forward/backward picks its implementation (see fastticket.sparse.backend).

torch backend: the dense op on the stored weight, exact because pruned weights are exactly zero in storage
(docs/architecture.md, "The invariant"), with the weight gradient masked so no optimizer can revive a pruned weight.
triton backend: the tile-skipping kernels in fastticket.kernels, which choose per layer between cuBLAS /
cuDNN and tile skipping from the layer's live-tile fraction. While torch.compile traces, the triton backend
goes through the custom ops of fastticket/sparse/ops.py (no graph break), or straight to the traceable dense op when
the dispatch threshold sends every layer of that kind to the vendor library. Inside a functorch transform
(the stacked arms of fastticket.lottery.batched: `vmap(functional_call(model))`) a Triton launch cannot take the
batched tensors: a masked linear layer goes through `fastticket.sparse.linear.vmapped_masked_linear`, whose vmap rule
runs the arms as one grouped launch (or one batched GEMM, by the same dispatch rule); a masked conv layer
takes the dense op (vmap makes it one grouped convolution), which is what the conv dispatch threshold
(0: every conv layer to cuDNN) picks for one arm too. A grouped conv launch is not built.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from fastticket.sparse import conv, linear
from fastticket.sparse.backend import resolve_backend
from fastticket.kernels._common import autocast_inputs, mask_gradient
from fastticket.kernels.dispatch import dense_threshold
from fastticket.kernels.tile_map import TileMap

__all__ = ["masked_linear", "masked_conv2d", "mask_gradient"]

TileMapProvider = Callable[[int, int], TileMap]

# Set by the search's training engine (fastticket.lottery.engine) around the forward and backward passes: its
# masked optimizers zero pruned entries of weights and state after every step (the update is elementwise, so a
# live entry never sees a pruned one), so the per-layer gradient mask (an autograd Function per layer and step)
# would only repeat that work.
_grad_mask_in_optimizer = False


@contextlib.contextmanager
def gradient_masked_by_optimizer() -> Iterator[None]:
    global _grad_mask_in_optimizer
    previous, _grad_mask_in_optimizer = _grad_mask_in_optimizer, True
    try:
        yield
    finally:
        _grad_mask_in_optimizer = previous


def optimizer_masks_gradients() -> bool:
    """True inside `gradient_masked_by_optimizer`: the weights' gradient hooks (fastticket.sparse.masked_weight)
    leave the gradient as it is, the masked optimizer's zeroing covers it."""
    return _grad_mask_in_optimizer


def _grad_masked(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return weight if _grad_mask_in_optimizer else mask_gradient(weight, mask)


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def _in_functorch_transform() -> bool:
    """True inside vmap / grad / ... of torch.func: the tensors a layer sees may be batched or grad-tracking
    wrappers, which a Triton launch cannot read."""
    return torch._C._functorch.peek_interpreter_stack() is not None


def masked_linear(x: torch.Tensor, weight: torch.Tensor, bias, mask: torch.Tensor,
                  tile_maps: TileMapProvider, fused_update=None) -> torch.Tensor:
    if resolve_backend(x.device) == "triton":
        if _compiling() and fused_update is None:
            if dense_threshold("linear") <= 0:
                return F.linear(x, _grad_masked(weight, mask), bias)
            from fastticket.sparse import ops  # noqa: F401  (registers torch.ops.fastticket.*)

            x, weight, bias = autocast_inputs(x, weight, bias)
            return torch.ops.fastticket.masked_linear(x, weight, bias, mask)
        if _in_functorch_transform():
            if fused_update is not None:
                raise RuntimeError("masked_linear: the dW+update fusion (fused_update) cannot run inside vmap / "
                                   "torch.func transforms; disable it (fastticket.sparse.optim.disable_fused_dw_update)")
            x, weight, bias = autocast_inputs(x, weight, bias)
            return linear.vmapped_masked_linear(x, weight, bias, mask)
        return linear.masked_linear(x, weight, bias, mask, tile_maps, fused_update)
    return F.linear(x, _grad_masked(weight, mask), bias)


def masked_conv2d(x: torch.Tensor, weight: torch.Tensor, bias, mask: torch.Tensor, tile_maps: TileMapProvider,
                  stride, padding, dilation, groups: int) -> torch.Tensor:
    if resolve_backend(x.device) == "triton":
        if _compiling():
            if groups != 1 or dense_threshold("conv2d") <= 0:
                return F.conv2d(x, _grad_masked(weight, mask), bias, stride, padding, dilation, groups)
            return _compiled_conv2d(x, weight, bias, mask, stride, padding, dilation)
        if _in_functorch_transform():  # stacked arms: the dense op (see the module docstring)
            return F.conv2d(x, _grad_masked(weight, mask), bias, stride, padding, dilation, groups)
        return conv.masked_conv2d(x, weight, bias, mask, tile_maps, stride, padding, dilation, groups)
    return F.conv2d(x, _grad_masked(weight, mask), bias, stride, padding, dilation, groups)


def _pair(v):
    return [int(v), int(v)] if isinstance(v, int) else [int(e) for e in v] * (2 if len(v) == 1 else 1)


def _compiled_conv2d(x, weight, bias, mask, stride, padding, dilation) -> torch.Tensor:
    from fastticket.sparse import ops  # noqa: F401  (registers torch.ops.fastticket.*)

    if x.dim() == 3:
        return _compiled_conv2d(x.unsqueeze(0), weight, bias, mask, stride, padding, dilation)[0]
    x, weight, bias = autocast_inputs(x, weight, bias)
    pad, pad_str = ([0, 0], padding) if isinstance(padding, str) else (_pair(padding), "")
    return torch.ops.fastticket.masked_conv2d(x, weight, bias, mask, _pair(stride), pad, pad_str, _pair(dilation))
