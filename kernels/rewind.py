"""Rewinding passes: `w = w_rewind * mask` and optimizer state zeroing, in one multi-tensor launch.

PyTorch references first (the torch backend of fastticket.sparse.rewind), Triton launchers after.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from fastticket.kernels._common import device_guard
from fastticket.kernels._multi_tensor import (DEFAULT_TILE, FLAG_MASK, HAS_TRITON, TensorTable, kernel_supported,
                                              pointer_type)

__all__ = ["rewind_reference_", "zero_reference_", "rewind_and_zero_", "rewind_", "zero_"]

FLAG_SRC = 8  # meta flag: the tensor has a source to copy (a rewind); without one the pass zeroes it


def _zero_like_scalar(t: torch.Tensor) -> torch.Tensor:
    return torch.zeros((), dtype=t.dtype, device=t.device)


@torch.no_grad()
def rewind_reference_(params: Sequence[torch.Tensor], sources: Sequence[torch.Tensor],
                      masks: Sequence[Optional[torch.Tensor]]) -> None:
    for p, src, m in zip(params, sources, masks):
        src = src.to(device=p.device, dtype=p.dtype)
        # where, not multiply: a NaN/inf in the rewind point on a pruned entry must still give an exact zero.
        p.copy_(src if m is None else torch.where(m.to(p.device) != 0, src, _zero_like_scalar(p)))


@torch.no_grad()
def zero_reference_(tensors: Sequence[torch.Tensor]) -> None:
    for t in tensors:
        t.zero_()


# ----------------------------------------------------------------------------------------------------------
# Triton: one launch per (device, dtype) covering every tensor, through multi-tensor address tables.
# ----------------------------------------------------------------------------------------------------------

if HAS_TRITON:
    import triton
    import triton.language as tl

    from fastticket.kernels._multi_tensor import chunk_geometry

    @triton.jit
    def _rewind_kernel(addr_ptr, meta_ptr, chunk_ptr, PTR_TY: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        """Per tensor: dst = where(mask, src, 0); without a source (flag bit 8 clear) dst = 0 (state reset)."""
        t, offs, valid, full, flags = chunk_geometry(chunk_ptr, meta_ptr, BN, BK, False)
        dst_ptr = tl.load(addr_ptr + 6 * t).to(PTR_TY)
        src_ptr = tl.load(addr_ptr + 6 * t + 1).to(PTR_TY)
        m_ptr = tl.load(addr_ptr + 6 * t + 2).to(tl.pointer_type(tl.int8))
        has_mask = ((offs * 0 + flags) & 1) != 0
        has_src = ((offs * 0 + flags) & 8) != 0
        keep = tl.load(m_ptr + offs, mask=valid & has_mask, other=1) != 0
        src = tl.load(src_ptr + offs, mask=valid & has_src & keep, other=0.0)
        tl.store(dst_ptr + offs, src, mask=valid)


def _bump_versions(tensors: Sequence[torch.Tensor]) -> None:
    # A Triton kernel writes memory behind torch's back: torch's version counters do not move. Caches keyed
    # on them (the layers' tile maps look at mask._version) must see the change, so bump each counter with
    # an empty in-place op on a view (views share their base's counter; nothing is launched on the data).
    for t in tensors:
        t.view(-1)[:0].zero_()


def _as_int8(mask: torch.Tensor) -> torch.Tensor:
    return mask.view(torch.int8) if mask.dtype == torch.bool else mask


@torch.no_grad()
def rewind_and_zero_(params: Sequence[torch.Tensor], sources: Sequence[torch.Tensor],
                     masks: Sequence[Optional[torch.Tensor]], zero: Sequence[torch.Tensor] = (),
                     block: Tuple[int, int] = DEFAULT_TILE) -> None:
    """`p = where(mask, source, 0)` for every param and `t = 0` for every tensor of `zero` (optimizer
    state), one launch per (device, dtype) for all of them. Tensors the kernel cannot take (non-contiguous,
    unknown dtype, shape mismatch) go through the reference."""
    jobs: dict = {}
    for p, src, m in zip(params, sources, masks):
        src = src.to(device=p.device, dtype=p.dtype)
        m = None if m is None else (m != 0 if m.dtype not in (torch.bool, torch.uint8, torch.int8) else m)
        if not kernel_supported(p, src, m):
            rewind_reference_([p], [src], [m])
            continue
        jobs.setdefault((p.device, p.dtype), []).append((p, src, m))
    for t in zero:
        if not kernel_supported(t):
            t.zero_()
            continue
        jobs.setdefault((t.device, t.dtype), []).append((t, None, None))
    for (device, dtype), entries in jobs.items():
        table = TensorTable(device, block)
        for dst, src, m in entries:
            flags = (FLAG_MASK if m is not None else 0) | (FLAG_SRC if src is not None else 0)
            table.add([dst, src, None if m is None else _as_int8(m)], dst.numel(), 1, dst.numel(), flags)
        addr, meta, chunks, n_chunks = table.build()
        if n_chunks:
            with device_guard(entries[0][0]):  # Triton launches on the current device, not the tensors'
                _rewind_kernel[(n_chunks,)](addr, meta, chunks, PTR_TY=pointer_type(dtype), BN=block[0],
                                            BK=block[1])
        _bump_versions([dst for dst, _, _ in entries])


@torch.no_grad()
def rewind_(params: Sequence[torch.Tensor], sources: Sequence[torch.Tensor],
            masks: Sequence[Optional[torch.Tensor]]) -> None:
    rewind_and_zero_(params, sources, masks)


@torch.no_grad()
def zero_(tensors: Sequence[torch.Tensor]) -> None:
    rewind_and_zero_([], [], [], zero=tensors)
