"""Masked optimizer steps: SGD (momentum, dampening, nesterov, weight decay, maximize) and Adam / AdamW.

The math is torch.optim's, with a mask: the gradient (after weight decay) is zeroed on pruned entries, and
the new weight and state are written as zero there, so no step can revive a pruned weight and state on
pruned entries stays exactly zero (docs/architecture.md, "The invariant").

This file holds the Triton kernels + launchers; the formulas as multi-tensor PyTorch (the tests' float64
reference, the launchers' fallback, the torch backend and the compiled step) are kernels/masked_optim_reference.py. Triton launches are multi-tensor: one launch per group of same-dtype tensors
covers all of them through device tables of addresses (kernels/_multi_tensor.py); masks with dead
(BN x BK) tiles are stepped over live tiles only. Tensors the kernel cannot take (non-contiguous, mixed
dtypes) go through the reference, per tensor.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
from torch.utils.weak import WeakIdKeyDictionary

from fastticket.kernels._common import device_guard, interpreter_active
from fastticket.kernels._multi_tensor import (DEFAULT_TILE, FLAG_MASK, FLAG_TILE, HAS_TRITON, TensorTable,
                                              kernel_supported, pointer_type, tl_dtype)
from fastticket.kernels.masked_optim_reference import adam_reference_, sgd_reference_
from fastticket.kernels.tile_map import TileMapCache

if HAS_TRITON:
    import triton
    import triton.language as tl

    from fastticket.kernels._multi_tensor import chunk_geometry, tensor_ptr

__all__ = ["DEFAULT_TILE", "sgd_reference_", "adam_reference_", "sgd_step_", "adam_step_", "tile_map_for",
           "adam_scalars", "ROW_WIDTH", "ROW_LR", "ROW_STEP_SIZE", "ROW_INV_BC2_SQRT", "ROW_STEP"]

FLAG_FIRST = 4  # SGD: the first step, whose momentum buffer is the gradient itself

# Graph-safe steps (fastticket/sparse/_step_scalars.py) read a step's scalars from a float64 device row instead
# of float arguments, so a replayed CUDA graph reads the values the host wrote for this step: lr,
# lr / bias_correction1, 1 / sqrt(bias_correction2) (Adam; the kernel's step_size and inv_bc2_sqrt) and the
# step count (the torch formulas compute their bias corrections from it on the device). SGD reads lr only.
ROW_LR, ROW_STEP_SIZE, ROW_INV_BC2_SQRT, ROW_STEP = range(4)
ROW_WIDTH = 4


# ----------------------------------------------------------------------------------------------------------
# Live-tile iteration
# ----------------------------------------------------------------------------------------------------------


def tile_map_for(mask: Optional[torch.Tensor], block: Tuple[int, int], provider=None):
    """The tile map used for live-tile-only iteration, or None for element mode (no mask, not 2-D-viewable,
    or no dead tile: then element chunks move the same bytes with simpler addressing)."""
    if mask is None or mask.dim() < 2:
        return None
    tile_map = provider(*block) if provider is not None else _explicit_tile_maps(mask, block)
    return tile_map if tile_map.n_live < tile_map.n_tiles else None


_explicit_maps = WeakIdKeyDictionary()  # explicit mask tensor -> its TileMapCache


def _explicit_tile_maps(mask: torch.Tensor, block: Tuple[int, int]):
    cache = _explicit_maps.get(mask)
    if cache is None:
        cache = _explicit_maps[mask] = TileMapCache()
    return cache.get(mask, block[0], block[1])


# ----------------------------------------------------------------------------------------------------------
# Triton: kernels
# ----------------------------------------------------------------------------------------------------------

_kernels: dict = {}

if HAS_TRITON:

    @triton.jit
    def _full_chunk_keep(m_ptr, offs, flags):
        """The mask of a wholly in-bounds chunk: an unpredicated (vectorizable) byte load when the tensor
        has a mask, all-true without reading anything when it has none."""
        if (flags & 1) != 0:
            keep = tl.load(m_ptr + offs) != 0
        else:
            keep = offs >= 0
        return keep

    @triton.jit
    def sgd_update(p, g, keep, buf, first, lr, momentum, dampening, weight_decay, HAS_MOMENTUM: tl.constexpr,
                   NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_WD: tl.constexpr):
        """torch.optim.SGD's step on one block of a masked tensor, in the compute dtype: returns the new
        parameter and momentum buffer (the `buf` given, unused, without momentum). `first`: the first step,
        whose buffer is the gradient itself (`buf` is ignored then). Pruned entries (keep False) get a zero
        gradient and come back as exact zeros in both. Shared by the multi-tensor step here and the fused
        dW + SGD kernel (kernels/linear_dw_sgd.py)."""
        if MAXIMIZE:
            g = -g
        if HAS_WD:
            g = g + weight_decay * p
        g = tl.where(keep, g, 0.0)
        d = g
        if HAS_MOMENTUM:
            buf = tl.where(first, g, buf * momentum + (1.0 - dampening) * g)
            buf = tl.where(keep, buf, 0.0)
            if NESTEROV:
                d = g + momentum * buf
            else:
                d = buf
        return tl.where(keep, p - lr * d, 0.0), buf

    @triton.jit
    def _sgd_apply(addr_ptr, t, offs, valid, flags, lr, momentum, dampening, weight_decay,
                   DTYPE: tl.constexpr, PTR_TY: tl.constexpr, COMPUTE: tl.constexpr, ALIGNED: tl.constexpr,
                   BOUNDED: tl.constexpr, HAS_MOMENTUM: tl.constexpr,
                   NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_WD: tl.constexpr):
        p_ptr = tensor_ptr(addr_ptr, 6 * t, PTR_TY, ALIGNED)
        g_ptr = tensor_ptr(addr_ptr, 6 * t + 1, PTR_TY, ALIGNED)
        m_ptr = tensor_ptr(addr_ptr, 6 * t + 2, tl.pointer_type(tl.int8), ALIGNED)
        b_ptr = tensor_ptr(addr_ptr, 6 * t + 3, PTR_TY, ALIGNED)
        # Per-tensor flags as full tensors: the interpreter rejects a load mask combined from a scalar.
        has_mask = ((offs * 0 + flags) & 1) != 0
        first = (flags & 4) != 0
        if BOUNDED:
            p = tl.load(p_ptr + offs, mask=valid, other=0.0).to(COMPUTE)
            g = tl.load(g_ptr + offs, mask=valid, other=0.0).to(COMPUTE)
            keep = tl.load(m_ptr + offs, mask=valid & has_mask, other=1) != 0
        else:
            p = tl.load(p_ptr + offs).to(COMPUTE)
            g = tl.load(g_ptr + offs).to(COMPUTE)
            keep = _full_chunk_keep(m_ptr, offs, flags)
        buf = g  # placeholder without momentum
        if HAS_MOMENTUM:
            # On the first step the launcher hands a zeroed fresh buffer, so the unconditional read is harmless.
            if BOUNDED:
                buf = tl.load(b_ptr + offs, mask=valid, other=0.0).to(COMPUTE)
            else:
                buf = tl.load(b_ptr + offs).to(COMPUTE)
        p, buf = sgd_update(p, g, keep, buf, first, lr, momentum, dampening, weight_decay,
                            HAS_MOMENTUM, NESTEROV, MAXIMIZE, HAS_WD)
        if HAS_MOMENTUM:
            if BOUNDED:
                tl.store(b_ptr + offs, buf.to(DTYPE), mask=valid)
            else:
                tl.store(b_ptr + offs, buf.to(DTYPE))
        if BOUNDED:
            tl.store(p_ptr + offs, p.to(DTYPE), mask=valid)
        else:
            tl.store(p_ptr + offs, p.to(DTYPE))

    @triton.jit
    def sgd_kernel(addr_ptr, meta_ptr, chunk_ptr, lr, momentum, dampening, weight_decay, scalars_ptr,
                   DTYPE: tl.constexpr, PTR_TY: tl.constexpr, COMPUTE: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                   ALIGNED: tl.constexpr, HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr,
                   MAXIMIZE: tl.constexpr, HAS_WD: tl.constexpr, SCALARS_PTR: tl.constexpr = False,
                   SCALAR: tl.constexpr = tl.float32):
        if SCALARS_PTR:  # graph-safe: this step's lr from its device row (fastticket/sparse/_step_scalars.py)
            lr = tl.load(scalars_ptr).to(SCALAR)
        t, offs, valid, full, flags = chunk_geometry(chunk_ptr, meta_ptr, BN, BK, ALIGNED)
        if full:
            _sgd_apply(addr_ptr, t, offs, valid, flags, lr, momentum, dampening, weight_decay, DTYPE, PTR_TY, COMPUTE,
                       ALIGNED, False, HAS_MOMENTUM, NESTEROV, MAXIMIZE, HAS_WD)
        else:
            _sgd_apply(addr_ptr, t, offs, valid, flags, lr, momentum, dampening, weight_decay, DTYPE, PTR_TY, COMPUTE,
                       ALIGNED, True, HAS_MOMENTUM, NESTEROV, MAXIMIZE, HAS_WD)

    @triton.jit
    def _sqrt_rn(x):
        # sqrt_rn is fp32-only; float64 sqrt is correctly rounded already (sqrt.rn.f64).
        if x.dtype.is_fp64():
            return tl.sqrt(x)
        else:
            return tl.sqrt_rn(x)

    @triton.jit
    def _div_rn(a, b):
        # div_rn is fp32-only; float64 division is IEEE-rounded already (div.rn.f64).
        if a.dtype.is_fp64():
            return a / b
        else:
            return tl.div_rn(a, b)

    @triton.jit
    def _adam_apply(addr_ptr, t, offs, valid, flags, lr, beta1, beta2, eps, weight_decay, step_size,
                    inv_bc2_sqrt, DTYPE: tl.constexpr, PTR_TY: tl.constexpr, COMPUTE: tl.constexpr,
                    ALIGNED: tl.constexpr,
                    BOUNDED: tl.constexpr,
                    AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_WD: tl.constexpr, DECOUPLED: tl.constexpr):
        p_ptr = tensor_ptr(addr_ptr, 6 * t, PTR_TY, ALIGNED)
        g_ptr = tensor_ptr(addr_ptr, 6 * t + 1, PTR_TY, ALIGNED)
        m_ptr = tensor_ptr(addr_ptr, 6 * t + 2, tl.pointer_type(tl.int8), ALIGNED)
        ea_ptr = tensor_ptr(addr_ptr, 6 * t + 3, PTR_TY, ALIGNED)
        eas_ptr = tensor_ptr(addr_ptr, 6 * t + 4, PTR_TY, ALIGNED)
        mx_ptr = tensor_ptr(addr_ptr, 6 * t + 5, PTR_TY, ALIGNED)
        has_mask = ((offs * 0 + flags) & 1) != 0
        if BOUNDED:
            p = tl.load(p_ptr + offs, mask=valid, other=0.0).to(COMPUTE)
            g = tl.load(g_ptr + offs, mask=valid, other=0.0).to(COMPUTE)
            keep = tl.load(m_ptr + offs, mask=valid & has_mask, other=1) != 0
            m = tl.load(ea_ptr + offs, mask=valid, other=0.0).to(COMPUTE)
            v = tl.load(eas_ptr + offs, mask=valid, other=0.0).to(COMPUTE)
        else:
            p = tl.load(p_ptr + offs).to(COMPUTE)
            g = tl.load(g_ptr + offs).to(COMPUTE)
            keep = _full_chunk_keep(m_ptr, offs, flags)
            m = tl.load(ea_ptr + offs).to(COMPUTE)
            v = tl.load(eas_ptr + offs).to(COMPUTE)
        if MAXIMIZE:
            g = -g
        if HAS_WD:
            if DECOUPLED:
                p = p * (1.0 - lr * weight_decay)
            else:
                g = g + weight_decay * p
        g = tl.where(keep, g, 0.0)
        m = tl.where(keep, m + (1.0 - beta1) * (g - m), 0.0)
        v = tl.where(keep, v * beta2 + (1.0 - beta2) * (g * g), 0.0)
        if AMSGRAD:
            if BOUNDED:
                vmax = tl.load(mx_ptr + offs, mask=valid, other=0.0).to(COMPUTE)
            else:
                vmax = tl.load(mx_ptr + offs).to(COMPUTE)
            vmax = tl.where(keep, tl.maximum(vmax, v), 0.0)
            denom = _sqrt_rn(vmax) * inv_bc2_sqrt + eps
            if BOUNDED:
                tl.store(mx_ptr + offs, vmax.to(DTYPE), mask=valid)
            else:
                tl.store(mx_ptr + offs, vmax.to(DTYPE))
        else:
            denom = _sqrt_rn(v) * inv_bc2_sqrt + eps
        p = tl.where(keep, p - step_size * _div_rn(m, denom), 0.0)
        if BOUNDED:
            tl.store(p_ptr + offs, p.to(DTYPE), mask=valid)
            tl.store(ea_ptr + offs, m.to(DTYPE), mask=valid)
            tl.store(eas_ptr + offs, v.to(DTYPE), mask=valid)
        else:
            tl.store(p_ptr + offs, p.to(DTYPE))
            tl.store(ea_ptr + offs, m.to(DTYPE))
            tl.store(eas_ptr + offs, v.to(DTYPE))

    @triton.jit
    def adam_kernel(addr_ptr, meta_ptr, chunk_ptr, lr, beta1, beta2, eps, weight_decay, step_size, inv_bc2_sqrt,
                    scalars_ptr,
                    DTYPE: tl.constexpr, PTR_TY: tl.constexpr, COMPUTE: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                    ALIGNED: tl.constexpr, AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_WD: tl.constexpr,
                    DECOUPLED: tl.constexpr, SCALARS_PTR: tl.constexpr = False, SCALAR: tl.constexpr = tl.float32):
        if SCALARS_PTR:  # graph-safe: lr, lr / bias_correction1, 1 / sqrt(bias_correction2) from the device row
            lr = tl.load(scalars_ptr).to(SCALAR)
            step_size = tl.load(scalars_ptr + 1).to(SCALAR)
            inv_bc2_sqrt = tl.load(scalars_ptr + 2).to(SCALAR)
        t, offs, valid, full, flags = chunk_geometry(chunk_ptr, meta_ptr, BN, BK, ALIGNED)
        if full:
            _adam_apply(addr_ptr, t, offs, valid, flags, lr, beta1, beta2, eps, weight_decay, step_size,
                        inv_bc2_sqrt, DTYPE, PTR_TY, COMPUTE, ALIGNED, False, AMSGRAD, MAXIMIZE, HAS_WD, DECOUPLED)
        else:
            _adam_apply(addr_ptr, t, offs, valid, flags, lr, beta1, beta2, eps, weight_decay, step_size,
                        inv_bc2_sqrt, DTYPE, PTR_TY, COMPUTE, ALIGNED, True, AMSGRAD, MAXIMIZE, HAS_WD, DECOUPLED)

    _kernels.update(sgd=sgd_kernel, adam=adam_kernel)




def _build_kernels() -> dict:
    if not HAS_TRITON:
        raise RuntimeError("the triton backend needs triton installed")
    return _kernels


def _compute_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _num_warps(block: Tuple[int, int]) -> int:
    return 8 if block[0] * block[1] >= 4096 else 4


def _scalar_dtype(dtype: torch.dtype):
    """The precision a graph-safe kernel reads its device scalars in: that of the float arguments the eager
    launch passes, so both give the same numbers bit for bit. A compiled kernel takes a Python float as fp32;
    the interpreter keeps it a Python float, which meets the compute dtype."""
    return _compute_dtype(dtype) if interpreter_active() else tl.float32


def _scalar_args(scalars: Optional[torch.Tensor], dtype: torch.dtype, fallback: torch.Tensor) -> dict:
    """The launch's scalars pointer and its constexpr switch: the device row when graph-safe; otherwise
    any tensor (never read: SCALARS_PTR False compiles the eager kernel, float arguments only)."""
    if scalars is None:
        return dict(scalars_ptr=fallback, SCALARS_PTR=False)
    return dict(scalars_ptr=scalars, SCALARS_PTR=True, SCALAR=_scalar_dtype(dtype))


def adam_scalars(lr: float, beta1: float, beta2: float, step: int) -> Tuple[float, float]:
    """Adam's per-step scalars, lr / bias_correction1 and 1 / sqrt(bias_correction2), as the kernel takes them:
    one formula for the eager launch and the graph-safe row, so both read the same numbers."""
    bias_correction1 = 1 - beta1 ** step
    bias_correction2_sqrt = math.sqrt(1 - beta2 ** step)
    return lr / bias_correction1, 1.0 / bias_correction2_sqrt


# ----------------------------------------------------------------------------------------------------------
# Triton: launchers (list versions of the references above, plus tile maps and block size)
# ----------------------------------------------------------------------------------------------------------


def sgd_step_(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
              masks: Sequence[Optional[torch.Tensor]], momentum_buffers: List[Optional[torch.Tensor]], *,
              lr: float, momentum: float, dampening: float, nesterov: bool, weight_decay: float, maximize: bool,
              tile_maps: Optional[Sequence[object]] = None, block: Tuple[int, int] = DEFAULT_TILE,
              scalars: Optional[torch.Tensor] = None, keep: Optional[list] = None) -> None:
    """Masked SGD, one Triton launch per (device, dtype) bucket; `tile_maps[i]` (or None) selects the
    live-tile-only path for tensor i. New momentum buffers are stored into `momentum_buffers`. `scalars`
    (graph-safe): a float64 device row (ROW_WIDTH values) whose ROW_LR is read instead of `lr`; `keep`: a list
    the device tables each launch reads are appended to (a CUDA graph must hold them: the table caches may
    evict them, and a freed table's memory would be reused under the graph)."""
    tile_maps = list(tile_maps) if tile_maps is not None else [None] * len(params)
    ref_lr = lr if scalars is None else scalars[ROW_LR]
    buckets: dict = {}
    for i, (p, g, m) in enumerate(zip(params, grads, masks)):
        buf = momentum_buffers[i]
        if p.dtype != g.dtype or not kernel_supported(p, g, m, buf) or (buf is not None and buf.dtype != p.dtype):
            momentum_buffers[i] = sgd_reference_(p, g, m, buf, lr=ref_lr, momentum=momentum, dampening=dampening,
                                                 nesterov=nesterov, weight_decay=weight_decay, maximize=maximize)
            continue
        buckets.setdefault((p.device, p.dtype), []).append(i)
    if not buckets:
        return
    kernel = _build_kernels()["sgd"]
    for (device, dtype), idx in buckets.items():
        table = TensorTable(device, block)
        for i in idx:
            p, g, m, tm = params[i], grads[i], masks[i], tile_maps[i]
            flags = (FLAG_MASK if m is not None else 0) | (FLAG_TILE if tm is not None else 0)
            buf = momentum_buffers[i]
            if momentum != 0 and buf is None:
                flags |= FLAG_FIRST
                # Zeroed: dead tiles are never visited, and the kernel reads the buffer unconditionally.
                buf = torch.zeros_like(p)
                momentum_buffers[i] = buf
            rows, cols = (tm.shape if tm is not None else (1, p.numel()))
            table.add([p, g, m.view(torch.int8) if m is not None and m.dtype == torch.bool else m,
                       buf if momentum != 0 else None], p.numel(), rows, cols, flags, tm)
        addr, meta, chunks, n_chunks = table.build()
        if keep is not None:
            keep += [addr, meta, chunks]
        if n_chunks == 0:
            continue
        with device_guard(params[idx[0]]):  # Triton launches on the current device, not the tensors'
            kernel[(n_chunks,)](addr, meta, chunks, float(lr), float(momentum), float(dampening),
                                float(weight_decay), **_scalar_args(scalars, dtype, addr), DTYPE=tl_dtype(dtype),
                                PTR_TY=pointer_type(dtype), COMPUTE=_compute_dtype(dtype), BN=block[0], BK=block[1],
                                ALIGNED=table.aligned, HAS_MOMENTUM=momentum != 0, NESTEROV=bool(nesterov),
                                MAXIMIZE=bool(maximize), HAS_WD=weight_decay != 0, num_warps=_num_warps(block))


def adam_step_(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], masks: Sequence[Optional[torch.Tensor]],
               exp_avgs: Sequence[torch.Tensor], exp_avg_sqs: Sequence[torch.Tensor],
               max_exp_avg_sqs: Sequence[Optional[torch.Tensor]], steps: Sequence[int], *, lr: float, beta1: float,
               beta2: float, eps: float, weight_decay: float, amsgrad: bool, maximize: bool, decoupled: bool,
               tile_maps: Optional[Sequence[object]] = None, block: Tuple[int, int] = DEFAULT_TILE,
               scalars: Optional[torch.Tensor] = None, keep: Optional[list] = None) -> None:
    """Masked Adam/AdamW, one Triton launch per (device, dtype, step) bucket (tensors of a group almost
    always share the step count, so this is one launch per group in practice). `scalars` (graph-safe): float64
    device rows [R, ROW_WIDTH]; then `steps[i]` is tensor i's row, and lr and the bias corrections are read
    from it on the device (`lr` is not used). `keep`: as in sgd_step_."""
    tile_maps = list(tile_maps) if tile_maps is not None else [None] * len(params)
    buckets: dict = {}
    for i, (p, g, m) in enumerate(zip(params, grads, masks)):
        ea, eas, mx = exp_avgs[i], exp_avg_sqs[i], max_exp_avg_sqs[i]
        same = all(t is None or t.dtype == p.dtype for t in (g, ea, eas, mx))
        if not same or not kernel_supported(p, g, m, ea, eas, mx):
            row = None if scalars is None else scalars[int(steps[i])]
            adam_reference_(p, g, m, ea, eas, mx, step=steps[i] if row is None else row[ROW_STEP],
                            lr=lr if row is None else row[ROW_LR], beta1=beta1, beta2=beta2, eps=eps,
                            weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize, decoupled=decoupled)
            continue
        buckets.setdefault((p.device, p.dtype, int(steps[i])), []).append(i)
    if not buckets:
        return
    kernel = _build_kernels()["adam"]
    for (device, dtype, step), idx in buckets.items():
        table = TensorTable(device, block)
        for i in idx:
            p, m, tm = params[i], masks[i], tile_maps[i]
            flags = (FLAG_MASK if m is not None else 0) | (FLAG_TILE if tm is not None else 0)
            rows, cols = (tm.shape if tm is not None else (1, p.numel()))
            table.add([p, grads[i], m.view(torch.int8) if m is not None and m.dtype == torch.bool else m,
                       exp_avgs[i], exp_avg_sqs[i], max_exp_avg_sqs[i] if amsgrad else None],
                      p.numel(), rows, cols, flags, tm)
        addr, meta, chunks, n_chunks = table.build()
        if keep is not None:
            keep += [addr, meta, chunks]
        if n_chunks == 0:
            continue
        if scalars is None:
            step_size, inv_bc2_sqrt = adam_scalars(lr, beta1, beta2, step)
        else:  # read from the row on the device: these floats are not used (NaN if they were)
            step_size, inv_bc2_sqrt = math.nan, math.nan
        with device_guard(params[idx[0]]):
            kernel[(n_chunks,)](addr, meta, chunks, float(lr), float(beta1), float(beta2), float(eps),
                                float(weight_decay), float(step_size), float(inv_bc2_sqrt),
                                **_scalar_args(None if scalars is None else scalars[step], dtype, addr),
                                DTYPE=tl_dtype(dtype), PTR_TY=pointer_type(dtype), COMPUTE=_compute_dtype(dtype),
                                BN=block[0], BK=block[1], ALIGNED=table.aligned, AMSGRAD=bool(amsgrad),
                                MAXIMIZE=bool(maximize), HAS_WD=weight_decay != 0, DECOUPLED=bool(decoupled),
                                num_warps=_num_warps(block))
