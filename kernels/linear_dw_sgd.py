"""dW + SGD update fusion for MaskedLinear: the weight gradient never reaches device memory.

One program per live (BN x BK) tile of the layer's tile map (COO list): it accumulates the dW tile
`dY^T @ X` over the batch in fp32, applies the element mask, then runs the masked SGD step (weight decay,
momentum with dampening / nesterov, maximize, lr) on that tile of the weight and momentum buffer in the
epilogue. Bytes saved per step against "dW GEMM + fused step": dW written once and read once (2 x N*K
elements), for the live tiles. Dead tiles are never touched: weights and momentum there are zero already
(docs/architecture.md, "The invariant"), which is exactly what the unfused step would leave.

Semantics are torch.optim.SGD's, including the first step's `buf = d` (no buffer in optimizer.state yet);
the buffer lives in `optimizer.state[weight]["momentum_buffer"]`, so state dicts, `reset_state_` and a later
switch back to the unfused path see the same state.

This file holds the kernel, its launcher and the float64 reference. The wiring into a model and its
MaskedSGD lives in fastticket/sparse/fused_update.py: enabling (`fastticket.sparse.optim.enable_fused_dw_update`) sets
each MaskedLinear's `fused_update`; the layer's backward (kernels/masked_linear.py) computes dX with the
old weight, then calls `fused_update(dY_2d, X_2d)` and returns no weight gradient, so `optimizer.step()`
skips the weight (grad None) and steps the rest. Only on layers that run the tile-skipping kernels: a layer
the dispatch sends to cuBLAS keeps cuBLAS's dW (masked) and the optimizer's step, which is faster there than
any per-tile kernel.

Checked by fastticket/sparse/fused_update.py before enabling (otherwise a one-line warning and the unfused path):
- the optimizer is a MaskedSGD, every MaskedLinear weight is in it, in exactly one MaskedLinear;
- the layer's device resolves to the triton backend; weight contiguous, dtype fp32 / fp16 / bf16;
- no hooks that expect the weight gradient: tensor hooks / post-accumulate-grad hooks on the weight,
  optimizer step pre/post hooks.
Checked at run time: the weight has no `.grad` when its update runs (gradient accumulation or a weight grad
from elsewhere), and the update runs at most once between two `optimizer.step()` calls (a layer reused in one
forward): either raises, since a fused update cannot be undone.
Not checkable, so a documented precondition: no gradient clipping or other code that reads or rescales the
gradients between backward and step (the fused weights have no gradient to clip).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from fastticket.kernels._common import device_guard, dot_input_precision
from fastticket.kernels._masked_linear_jit import dw_program, dw_rows_dot
from fastticket.kernels.masked_linear_dw import dw_split_rows, dw_uses_quads, live_slabs
from fastticket.kernels.masked_optim import sgd_reference_, sgd_update
from fastticket.kernels.tile_map import TileMap

# Fixed launch config on CUDA: autotuning would run the in-place update several times per call.
# fp32 (TF32 or IEEE), and 16-bit inputs whose rows are not 16-aligned, on 8 warps: on 4 they spill on sm_90 at
# LeNet's odd strides (256 bytes TF32, 44 IEEE, 8 bf16 at 300 -> 100); on 8 they compile spill-free at every shape
# bench/sm90_report.py covers (bf16 300 -> 100: 140 registers).
_CUDA_META = dict(BLOCK_M=64, num_warps=4, num_stages=3)
_CUDA_META_8_WARPS = dict(BLOCK_M=64, num_warps=8, num_stages=3)


def cuda_meta(precision: Optional[str], aligned: bool = True) -> dict:
    """The fused kernel's launch config on CUDA for a dot precision (None: 16-bit inputs) and whether N, K and
    the row strides of dY and X are all multiples of 16."""
    return _CUDA_META if precision is None and aligned else _CUDA_META_8_WARPS


# Why the fused kernel has no quad programs (the dW kernel's 128 x 128 tiles over 2 x 2 map tiles): compiled
# offline for sm_90 (triton 3.8) with a quad's SGD epilogue, every config spills. Spill bytes, bf16 / tf32 / ieee,
# 4096 x 4096 at 8192 tokens: BM64 w8 88 / 144 / 32, BM32 w16 80 / 112 / 32; 784 -> 300: BM32 w16 136 / 88 / 48
# (1.5-4 KB at 300 -> 100). Its split path reduces with quads where the dW kernel would (live_slabs), since
# there the epilogue steps each 64 x 64 slab on its own.

_INTERPRETER_META = dict(BLOCK_M=16, num_warps=4)


@triton.jit
def _dw_sgd_kernel(
    dy_ptr, x_ptr, mask_ptr, w_ptr, buf_ptr, coo_rows, coo_cols,
    M, N, K,
    stride_dym, stride_dyn, stride_xm, stride_xk,
    lr, momentum, dampening, weight_decay,
    INPUT_PRECISION: tl.constexpr, HAS_MOMENTUM: tl.constexpr, FIRST: tl.constexpr, NESTEROV: tl.constexpr,
    MAXIMIZE: tl.constexpr, HAS_WD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Program t: live tile t, as the dW kernel's tile programs (_masked_linear_jit.dw_program). Never a quad:
    # with the SGD epilogue's weight, momentum and mask tiles beside a 128 x 128 accumulator the sm_90 compile
    # spills at every config tried (the note above _INTERPRETER_META).
    t = tl.program_id(0)
    _, _, offs_n, offs_k, n_ok, k_ok, tile_ok = dw_program(
        coo_rows, coo_cols, coo_rows, t, N, K, BLOCK_N, BLOCK_K, BLOCK_N, BLOCK_K)
    acc = dw_rows_dot(dy_ptr, x_ptr, offs_n, n_ok, offs_k, k_ok, 0, M, stride_dym, stride_dyn,
                      stride_xm, stride_xk, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    _sgd_tile(acc, offs_n, offs_k, tile_ok, dy_ptr, mask_ptr, w_ptr, buf_ptr, K, lr, momentum, dampening,
              weight_decay, HAS_MOMENTUM, FIRST, NESTEROV, MAXIMIZE, HAS_WD)


@triton.jit
def _sgd_slab_kernel(
    slab_ptr, dy_ptr, mask_ptr, w_ptr, buf_ptr, coo_rows, coo_cols,
    N, K,
    lr, momentum, dampening, weight_decay,
    HAS_MOMENTUM: tl.constexpr, FIRST: tl.constexpr, NESTEROV: tl.constexpr,
    MAXIMIZE: tl.constexpr, HAS_WD: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # The split path's epilogue: live tile t's dW was reduced over the token splits into slab t (compact
    # [n_live, BLOCK_N, BLOCK_K] fp32, masked, kernels/masked_linear_dw.py's live_slabs); step that tile.
    t = tl.program_id(0)
    nt = tl.load(coo_rows + t)
    kt = tl.load(coo_cols + t)
    local_n = tl.arange(0, BLOCK_N)
    local_k = tl.arange(0, BLOCK_K)
    offs_n = nt.to(tl.int64) * BLOCK_N + local_n
    offs_k = kt.to(tl.int64) * BLOCK_K + local_k
    tile_ok = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    acc = tl.load(slab_ptr + t.to(tl.int64) * (BLOCK_N * BLOCK_K) + local_n[:, None] * BLOCK_K + local_k[None, :])
    _sgd_tile(acc, offs_n, offs_k, tile_ok, dy_ptr, mask_ptr, w_ptr, buf_ptr, K, lr, momentum, dampening,
              weight_decay, HAS_MOMENTUM, FIRST, NESTEROV, MAXIMIZE, HAS_WD)


@triton.jit
def _sgd_tile(acc, offs_n, offs_k, tile_ok, dy_ptr, mask_ptr, w_ptr, buf_ptr, K, lr, momentum, dampening,
              weight_decay, HAS_MOMENTUM: tl.constexpr, FIRST: tl.constexpr, NESTEROV: tl.constexpr,
              MAXIMIZE: tl.constexpr, HAS_WD: tl.constexpr):
    """The masked SGD step of one weight tile given its fp32 dW tile `acc` (both kernels' epilogue)."""
    # Weight, mask and momentum buffer are contiguous [N, K] (checked when the fusion is enabled).
    offs = offs_n[:, None] * K + offs_k[None, :]
    keep = tl.load(mask_ptr + offs, mask=tile_ok, other=0) != 0
    w = tl.load(w_ptr + offs, mask=tile_ok, other=0.0).to(tl.float32)
    # The dW tile is rounded to the activation dtype first: the unfused path stores dW in that dtype (and
    # autograd's cast hands it to an fp32 master weight under autocast) before stepping.
    g = acc.to(dy_ptr.dtype.element_ty).to(tl.float32)
    buf = g  # placeholder: without momentum, or on the first step (whose buffer is the gradient itself)
    if HAS_MOMENTUM and not FIRST:
        buf = tl.load(buf_ptr + offs, mask=tile_ok, other=0.0).to(tl.float32)
    w, buf = sgd_update(w, g, keep, buf, FIRST, lr, momentum, dampening, weight_decay,
                        HAS_MOMENTUM, NESTEROV, MAXIMIZE, HAS_WD)
    if HAS_MOMENTUM:
        tl.store(buf_ptr + offs, buf.to(buf_ptr.dtype.element_ty), mask=tile_ok)
    tl.store(w_ptr + offs, w.to(w_ptr.dtype.element_ty), mask=tile_ok)


def linear_dw_sgd_(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor,
                   tile_map: TileMap, momentum_buffer: Optional[torch.Tensor], *, lr: float, momentum: float,
                   dampening: float, nesterov: bool, weight_decay: float, maximize: bool,
                   split_m: Optional[int] = None, tiles_per_program: Optional[int] = None
                   ) -> Optional[torch.Tensor]:
    """Fused `dW = (dY^T X) * mask` + masked SGD step on `weight` in place; returns the momentum buffer
    (allocated, zeroed, on the first step). grad_out [M, N], x [M, K], weight / mask [N, K] contiguous.

    dW is computed in the activation dtype (x's; grad_out is cast to it): bf16 / fp16 activations of an fp32
    master weight (autocast) stay 16-bit on the tensor cores, as the unfused dW kernel computes them; only
    the update itself runs in fp32 on the weight's dtype.

    `split_m` token splits (default: masked_linear_dw's _dw_split, > 1 only on CUDA when few tiles are live, so
    that a layer of a handful of live tiles still fills the SMs): each split's partial dW adds with fp32
    atomics into one compact slab per live tile, then one SGD epilogue program per live tile steps it.

    `tiles_per_program` (the split path's reduction only): 1 (a program per 64 x 64 map tile), 2 (per 2 x 2 quad
    of tiles, 128 x 128) or None (the dW kernel's heuristic, masked_linear_dw.dw_uses_quads)."""
    m, n = grad_out.shape
    k = x.shape[1]
    if tuple(weight.shape) != (n, k) or tuple(tile_map.shape) != (n, k):
        raise ValueError(f"shapes: dY {tuple(grad_out.shape)}, X {tuple(x.shape)}, weight {tuple(weight.shape)}, "
                         f"tile map {tile_map.shape}")
    if not weight.is_contiguous() or not mask.is_contiguous():
        raise ValueError("linear_dw_sgd_ needs a contiguous weight and mask")
    first = momentum != 0 and momentum_buffer is None
    if first:
        momentum_buffer = torch.zeros_like(weight)  # dead tiles are never written: they must hold zeros
    if tile_map.n_live == 0:
        return momentum_buffer if momentum != 0 else None
    if grad_out.dtype != x.dtype:
        grad_out = grad_out.to(x.dtype)
    mask_u8 = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
    bn, bk = tile_map.block
    precision = dot_input_precision(x.dtype, "matmul")
    # Quads only reduce the split path's slabs (the note above _INTERPRETER_META); the unsplit kernel runs
    # tiles. Where the quads' programs need no split, the tiles' (more programs) need none either.
    quads = dw_uses_quads(tile_map, m, x.dtype, weight.device, tiles_per_program)
    aligned = all(v % 16 == 0 for v in (n, k, grad_out.stride(0), x.stride(0)))
    meta = cuda_meta(precision, aligned) if weight.device.type == "cuda" else _INTERPRETER_META
    programs = tile_map.quads().n_quads if quads else tile_map.n_live
    split, m_per_split = dw_split_rows(m, programs, weight.device, split_m)
    hyper = dict(HAS_MOMENTUM=momentum != 0, FIRST=first, NESTEROV=bool(nesterov), MAXIMIZE=bool(maximize),
                 HAS_WD=weight_decay != 0)
    if split > 1:
        slabs = live_slabs(grad_out, x, mask, tile_map, split, m_per_split, quads=quads)
        with device_guard(weight):
            _sgd_slab_kernel[(tile_map.n_live,)](
                slabs, grad_out, mask_u8, weight, momentum_buffer if momentum != 0 else weight,
                tile_map.coo_rows, tile_map.coo_cols, n, k,
                float(lr), float(momentum), float(dampening), float(weight_decay), **hyper,
                BLOCK_N=bn, BLOCK_K=bk, num_warps=meta["num_warps"])
        return momentum_buffer if momentum != 0 else None
    with device_guard(weight):
        _dw_sgd_kernel[(tile_map.n_live,)](
            grad_out, x, mask_u8, weight, momentum_buffer if momentum != 0 else weight,
            tile_map.coo_rows, tile_map.coo_cols,
            m, n, k, grad_out.stride(0), grad_out.stride(1), x.stride(0), x.stride(1),
            float(lr), float(momentum), float(dampening), float(weight_decay),
            INPUT_PRECISION=precision, **hyper, BLOCK_N=bn, BLOCK_K=bk, **meta,
        )
    return momentum_buffer if momentum != 0 else None


@torch.no_grad()
def linear_dw_sgd_reference_(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor,
                             momentum_buffer: Optional[torch.Tensor], *, lr: float, momentum: float,
                             dampening: float, nesterov: bool, weight_decay: float,
                             maximize: bool, dw_dtype: Optional[torch.dtype] = None) -> Optional[torch.Tensor]:
    """The same step unfused, in the weight's dtype (pass float64 tensors for a float64 reference).
    `dw_dtype` rounds dW to the activation dtype first, as the kernel does (None: no rounding)."""
    dw = (grad_out.to(weight.dtype).t() @ x.to(weight.dtype)) * mask
    if dw_dtype is not None:
        dw = dw.to(dw_dtype).to(weight.dtype)
    return sgd_reference_(weight, dw, mask, momentum_buffer, lr=lr, momentum=momentum, dampening=dampening,
                          nesterov=nesterov, weight_decay=weight_decay, maximize=maximize)
