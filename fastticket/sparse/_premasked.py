"""Gradients that arrive already masked: the tile-skipping dW kernel masks in its epilogue, so the weight's
MaskGradient hook (fastticket.sparse.masked_weight) need not run a second, dense masked_fill over them.

The backward marks the exact tensor it returns; the hook skips its pass only for that same tensor object. Any
other tensor (autograd summed the gradients of a weight used twice, or cast it) is masked as usual, so a mark
can only save work, never leave a gradient unmasked.
"""
from __future__ import annotations

import weakref
from typing import Dict

import torch

_MARKED: Dict[int, "weakref.ref[torch.Tensor]"] = {}


def mark(grad: torch.Tensor) -> None:
    """`grad` holds zeros on every pruned entry of its weight."""
    key = id(grad)
    _MARKED[key] = weakref.ref(grad, lambda _ref: _MARKED.pop(key, None))


def take(grad: torch.Tensor) -> bool:
    """Was this very tensor marked (the mark is used up)?"""
    ref = _MARKED.pop(id(grad), None)
    return ref is not None and ref() is grad
