"""Which masked layer owns a parameter, so optimizers find weight masks without being handed them.

Masked layers register themselves here when they are built (one call in `MaskedLayer._init_mask`). The
registry holds layers weakly and is keyed by the layer, not by its weight tensor, because the weight can be
swapped after construction (`sparsify` puts the original Parameter object into the new layer) and
`load_state_dict` may replace buffers: the owner of a parameter is therefore resolved by identity
(`layer.weight is param`) when asked, and the mask is always read fresh from the layer.
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch

_layers: "weakref.WeakSet" = weakref.WeakSet()
_generation = 0  # bumped on every registration: lets callers cache "no layer owns this tensor" safely


def register_layer(layer) -> None:
    """Record a masked layer (anything with `weight` and `weight_mask`); held weakly."""
    global _generation
    _layers.add(layer)
    _generation += 1


def generation() -> int:
    """A counter that moves whenever a layer is registered (a negative lookup older than it may be stale)."""
    return _generation


def layer_of(param: torch.Tensor):
    """The registered layer whose `weight` is `param` (identity), or None."""
    for layer in list(_layers):
        if getattr(layer, "weight", None) is param:
            return layer
    return None


def mask_of(param: torch.Tensor) -> Optional[torch.Tensor]:
    """The `weight_mask` of the layer owning `param`, or None when no registered layer owns it."""
    layer = layer_of(param)
    return None if layer is None else layer.weight_mask


def registered_layers() -> int:
    return len(_layers)
