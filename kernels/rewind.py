"""Rewinding and pruning passes: `w = w_rewind * mask`, optimizer state zeroing, in-place mask updates.

PyTorch references first (the torch backend), Triton launchers after.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch


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


@torch.no_grad()
def update_masks_reference_(masks: Sequence[torch.Tensor], new_masks: Sequence[torch.Tensor],
                            tensors: Sequence[Sequence[torch.Tensor]]) -> None:
    for m, new, ts in zip(masks, new_masks, tensors):
        keep = (m != 0) & (new.to(m.device) != 0)
        m.copy_(keep)
        for t in ts:
            t.copy_(torch.where(keep, t, _zero_like_scalar(t)))


# ----------------------------------------------------------------------------------------------------------
# Triton: one launch per (device, dtype) covering every tensor, through masked_optim's address tables.
# ----------------------------------------------------------------------------------------------------------

from fastticket.kernels.masked_optim import HAS_TRITON, TensorTable, _pointer_type, kernel_supported  # noqa: E402

if HAS_TRITON:
    import triton
    import triton.language as tl

    from fastticket.kernels.masked_optim import _chunk_geometry

    @triton.jit
    def _rewind_kernel(addr_ptr, meta_ptr, chunk_ptr, PTR_TY: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        """Per tensor: dst = where(mask, src, 0); without a source (flag bit 8 clear) dst = 0 (state reset)."""
        t, offs, valid, full, flags = _chunk_geometry(chunk_ptr, meta_ptr, BN, BK, False)
        dst_ptr = tl.load(addr_ptr + 6 * t).to(PTR_TY)
        src_ptr = tl.load(addr_ptr + 6 * t + 1).to(PTR_TY)
        m_ptr = tl.load(addr_ptr + 6 * t + 2).to(tl.pointer_type(tl.int8))
        has_mask = ((offs * 0 + flags) & 1) != 0
        has_src = ((offs * 0 + flags) & 8) != 0
        keep = tl.load(m_ptr + offs, mask=valid & has_mask, other=1) != 0
        src = tl.load(src_ptr + offs, mask=valid & has_src & keep, other=0.0)
        tl.store(dst_ptr + offs, src, mask=valid)

    @triton.jit
    def _update_mask_kernel(addr_ptr, meta_ptr, chunk_ptr, PTR_TY: tl.constexpr, BN: tl.constexpr,
                            BK: tl.constexpr):
        """mask &= new_mask, and up to four tensors zeroed where the mask is now False (flag bits 16..19)."""
        t, offs, valid, full, flags = _chunk_geometry(chunk_ptr, meta_ptr, BN, BK, False)
        m_ptr = tl.load(addr_ptr + 6 * t).to(tl.pointer_type(tl.int8))
        n_ptr = tl.load(addr_ptr + 6 * t + 1).to(tl.pointer_type(tl.int8))
        keep = (tl.load(m_ptr + offs, mask=valid, other=0) != 0) & (tl.load(n_ptr + offs, mask=valid, other=0) != 0)
        tl.store(m_ptr + offs, keep.to(tl.int8), mask=valid)
        for j in tl.static_range(4):
            x_ptr = tl.load(addr_ptr + 6 * t + 2 + j).to(PTR_TY)
            present = ((offs * 0 + flags) & (16 << j)) != 0
            # Only pruned entries are touched: live ones are neither read nor written.
            tl.store(x_ptr + offs, tl.zeros(offs.shape, x_ptr.dtype.element_ty), mask=valid & present & (keep == 0))

FLAG_SRC = 8


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
                     block: Tuple[int, int] = (64, 64)) -> None:
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
            flags = (1 if m is not None else 0) | (FLAG_SRC if src is not None else 0)
            table.add([dst, src, None if m is None else _as_int8(m)], dst.numel(), 1, dst.numel(), flags)
        addr, meta, chunks, n_chunks = table.build()
        if n_chunks:
            _rewind_kernel[(n_chunks,)](addr, meta, chunks, PTR_TY=_pointer_type(dtype), BN=block[0], BK=block[1])
        _bump_versions([dst for dst, _, _ in entries])


@torch.no_grad()
def rewind_(params: Sequence[torch.Tensor], sources: Sequence[torch.Tensor],
            masks: Sequence[Optional[torch.Tensor]]) -> None:
    rewind_and_zero_(params, sources, masks)


@torch.no_grad()
def zero_(tensors: Sequence[torch.Tensor]) -> None:
    rewind_and_zero_([], [], [], zero=tensors)


@torch.no_grad()
def update_masks_(masks: Sequence[torch.Tensor], new_masks: Sequence[torch.Tensor],
                  tensors: Sequence[Sequence[torch.Tensor]], block: Tuple[int, int] = (64, 64)) -> None:
    """`mask &= new_mask` in place and each of `tensors[i]` (up to 4: the weight and its optimizer state)
    zeroed where mask i is now False, in one pass per (device, dtype)."""
    jobs: dict = {}
    for m, new, ts in zip(masks, new_masks, tensors):
        ts = list(ts)
        new = new.to(m.device)
        new = new if new.dtype == m.dtype else new.to(m.dtype)
        dtypes = {t.dtype for t in ts}
        if (m.dtype not in (torch.bool, torch.uint8) or len(ts) > 4 or len(dtypes) > 1
                or not all(kernel_supported(t, new, m) for t in ts)
                or not new.is_contiguous() or not m.is_contiguous()):
            update_masks_reference_([m], [new], [ts])
            continue
        dtype = ts[0].dtype if ts else torch.float32
        jobs.setdefault((m.device, dtype), []).append((m, new, ts))
    for (device, dtype), entries in jobs.items():
        table = TensorTable(device, block)
        for m, new, ts in entries:
            flags = sum(16 << j for j in range(len(ts)))
            table.add([_as_int8(m), _as_int8(new)] + list(ts), m.numel(), 1, m.numel(), flags)
        addr, meta, chunks, n_chunks = table.build()
        if n_chunks:
            _update_mask_kernel[(n_chunks,)](addr, meta, chunks, PTR_TY=_pointer_type(dtype), BN=block[0], BK=block[1])
        _bump_versions([m for m, _, _ in entries] + [t for _, _, ts in entries for t in ts])
