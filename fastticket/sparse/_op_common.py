"""What the masked ops' entry points share (fastticket/sparse/linear.py, conv.py, ops.py): tile maps cached per
mask storage, the bias gradient, and running a custom Function without autocast.

Tile maps: an op that sees tensors, not layers (the custom ops of ops.py, the vmap rule of linear.py) keeps
its own cache of tile maps per mask storage (weakly referenced: a freed mask's entry is dropped, and its
address cannot be reused while the entry lives), rebuilt when the mask changes in place (its version
counter) like the layers' own caches. Under CUDA graphs ("reduce-overhead") a graph replays the tile maps it
was captured with: a mask change must be followed by a new capture, which the compiled training step
(fastticket/lottery/compiled.py) does once per arm.
"""
from __future__ import annotations

import contextlib
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch.multiprocessing.reductions import StorageWeakRef

from fastticket.kernels.tile_map import StackedTileMap, TileMap, TileMapCache, build_stacked_tile_map

__all__ = ["op_tile_map", "op_stacked_tile_map", "bias_grad", "without_autocast"]

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


def bias_grad(grad: torch.Tensor, dims: Sequence[int]) -> Optional[torch.Tensor]:
    """db: `grad` summed over `dims`; 16-bit gradients summed in fp32 over many rows, then rounded once."""
    acc = torch.float32 if grad.dtype in (torch.float16, torch.bfloat16) else grad.dtype
    return grad.sum(dim=tuple(dims), dtype=acc).to(grad.dtype)


def without_autocast(device: torch.device):
    """Inputs already cast to the compute dtype (kernels/_common.autocast_inputs): autocast must not re-cast
    inside a custom Function's dense path."""
    if device.type in ("cuda", "cpu"):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()
