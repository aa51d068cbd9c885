"""K arms' masked linear layers as one grouped launch: Triton kernels, launchers, float64 reference.

A group of arms trained as one stacked model (fastticket.lottery.batched) holds each masked linear layer as stacked
tensors: X [A, M, K] (arm a's tokens), W [A, N, K] (arm a's weight, pruned entries exactly zero), M [A, N, K]
(arm a's own bool mask), b [A, N]. The math per arm is the one-arm layer's (kernels/masked_linear.py):

    forward  Y[a]  = X[a] @ W[a]^T + b[a]   program per (M-tile, N-tile, arm): the live K-tiles of arm a's
                                            output tile-row
    dX       dX[a] = dY[a] @ W[a]           program per (M-tile, K-tile, arm): the live N-tiles of arm a's
                                            tile-column (transposed lists)
    dW       dW[a] = (dY[a]^T @ X[a]) * M[a]  program per (tile, arm) over every tile of every arm: a live
                                            tile is reduced over the tokens, mask in the epilogue; a dead
                                            tile reduces nothing and stores exact zeros
    db       db[a] = dY[a].sum(rows)        in PyTorch

The arm is a grid dimension (program_id(1)); one launch covers every arm. The tile map is a StackedTileMap
(kernels/tile_map.py): every arm's lists concatenated into one ptr / idx pair, arm a's tile-row r at
`row_ptr[a * tiles_n + r]`. The forward and dX reuse the one-arm kernels' list walk (`_live_tiles_dot`) and
launch order (`_grouped_tile`), so an arm's sums run in the same order as the one-arm kernels' at program
width 1; wide programs (2 or 4 map tiles per program) are not used here: K arms already multiply the
programs, which is what wide programs were for. dW has no token split either (same reason) and is
deterministic; it writes every element of dW, so a caller's buffer needs no zeroing (the tests pass
NaN-filled ones).

Dispatch (kernels/dispatch.py, the one-arm rule): the stacked map's live fraction (live tiles of all arms
over all tiles of all arms, i.e. the grouped launch's work relative to the dense batched GEMM) against the
same linear threshold: at or above it one batched dense GEMM (torch.baddbmm / bmm; exact under the zero
invariant, dW masked after the product) runs instead. Element-masked arms keep every tile live and take it.

Precision: as the one-arm kernels (fp32 IEEE or TF32 following torch's matmul flag, 16-bit inputs
accumulated in fp32), and float64 inputs accumulate in float64 (the CPU tests compare a stacked training
run with the torch backend to 1e-9).

Autotuning (CUDA): the one-arm kernels' forward / dX / dW configs and pruning, keyed also on the arm count.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from fastticket.kernels._common import device_guard, dot_input_precision, live_bucket
from fastticket.kernels._masked_linear_jit import _grouped_tile, _live_tiles_dot
from fastticket.kernels.masked_linear import (_GROUP_M, _INTERPRETER_BLOCK_M, _LIST_CHUNK, _cuda_configs,
                                              _dw_cuda_configs, _dw_prune_configs, _prune_configs, linear_tile_sizes,
                                              reference_masked_linear, reference_masked_linear_grads)
from fastticket.kernels.tile_map import StackedTileMap

__all__ = ["grouped_linear_forward", "grouped_linear_grad_input", "grouped_linear_grad_weight",
           "reference_grouped_linear",
           "reference_grouped_linear_grads"]


# ------------------------------------------------------------------------------------------------ kernels

@triton.jit
def _grouped_fwd_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, row_ptr, col_idx,
    M, N, K, TILES_N,
    stride_xa, stride_xm, stride_xk, stride_wa, stride_wn, stride_wk, stride_ba,
    stride_ya, stride_ym, stride_yn,
    ARMS, LIVE_BUCKET,  # autotune keys only
    HAS_BIAS: tl.constexpr, INPUT_PRECISION: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    LIST_CHUNK: tl.constexpr, GROUP_M: tl.constexpr,
):
    arm = tl.program_id(1).to(tl.int64)
    pid_m, pid_n = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    x_ptr += arm * stride_xa
    w_ptr += arm * stride_wa
    y_ptr += arm * stride_ya
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    m_ok = offs_m < M
    n_ok = offs_n < N
    # Arm a's lists are entries a * TILES_N + r of the concatenated CSR (program width = one map tile).
    acc = _live_tiles_dot(row_ptr, col_idx, col_idx, arm * TILES_N + pid_n,
                          x_ptr, offs_m, m_ok, stride_xm, stride_xk,
                          w_ptr, offs_n, n_ok, stride_wk, stride_wn,
                          K, tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC), INPUT_PRECISION, BLOCK_K, BLOCK_N,
                          BLOCK_N, LIST_CHUNK)
    if HAS_BIAS:
        bias = tl.load(b_ptr + arm * stride_ba + offs_n, mask=n_ok, other=0.0).to(ACC)
        acc += bias[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
             acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _grouped_dx_kernel(
    dy_ptr, w_ptr, dx_ptr, col_ptr, row_idx,
    M, N, K, TILES_K,
    stride_dya, stride_dym, stride_dyn, stride_wa, stride_wn, stride_wk, stride_dxa, stride_dxm, stride_dxk,
    ARMS, LIVE_BUCKET,
    INPUT_PRECISION: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    LIST_CHUNK: tl.constexpr, GROUP_M: tl.constexpr,
):
    arm = tl.program_id(1).to(tl.int64)
    pid_m, pid_k = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K), GROUP_M)
    dy_ptr += arm * stride_dya
    w_ptr += arm * stride_wa
    dx_ptr += arm * stride_dxa
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_k = (pid_k * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
    m_ok = offs_m < M
    k_ok = offs_k < K
    acc = _live_tiles_dot(col_ptr, row_idx, row_idx, arm * TILES_K + pid_k,
                          dy_ptr, offs_m, m_ok, stride_dym, stride_dyn,
                          w_ptr, offs_k, k_ok, stride_wn, stride_wk,
                          N, tl.zeros((BLOCK_M, BLOCK_K), dtype=ACC), INPUT_PRECISION, BLOCK_N, BLOCK_K,
                          BLOCK_K, LIST_CHUNK)
    tl.store(dx_ptr + offs_m[:, None] * stride_dxm + offs_k[None, :] * stride_dxk,
             acc.to(dx_ptr.dtype.element_ty), mask=m_ok[:, None] & k_ok[None, :])


@triton.jit
def _grouped_dw_kernel(
    dy_ptr, x_ptr, mask_ptr, live_ptr, dw_ptr,
    M, N, K, TILES_K,
    stride_dya, stride_dym, stride_dyn, stride_xa, stride_xm, stride_xk,
    stride_ma, stride_mn, stride_mk, stride_dwa, stride_dwn, stride_dwk,
    ARMS, LIVE_BUCKET,
    INPUT_PRECISION: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Program (tile t of the arm's [tiles_n, tiles_k] grid, arm): every tile of every arm gets a program, so
    # dead tiles are written too (exact zeros) and no caller has to zero the buffer first.
    t = tl.program_id(0)
    arm = tl.program_id(1).to(tl.int64)
    live = tl.load(live_ptr + arm * tl.num_programs(0) + t) != 0
    nt = t // TILES_K
    kt = t % TILES_K
    dy_ptr += arm * stride_dya
    x_ptr += arm * stride_xa
    offs_n = (nt * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_k = (kt * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
    n_ok = offs_n < N
    k_ok = offs_k < K
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=ACC)
    # A dead tile's reduction is empty: its loop runs zero times.
    m_end = tl.where(live, M, 0)
    for m0 in range(0, m_end, BLOCK_M):
        offs_m = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        m_ok = offs_m < M
        dyt = tl.load(dy_ptr + offs_m[None, :] * stride_dym + offs_n[:, None] * stride_dyn,
                      mask=m_ok[None, :] & n_ok[:, None], other=0.0)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(dyt, x, acc, input_precision=INPUT_PRECISION)
    tile_ok = n_ok[:, None] & k_ok[None, :]
    # Element mask in the epilogue (pruned entries of a live tile get exactly zero); a dead tile's mask is all
    # zero, so it is not even read.
    keep = tl.load(mask_ptr + arm * stride_ma + offs_n[:, None] * stride_mn + offs_k[None, :] * stride_mk,
                   mask=tile_ok & live, other=0)
    acc = tl.where(keep != 0, acc, 0.0)
    tl.store(dw_ptr + arm * stride_dwa + offs_n[:, None] * stride_dwn + offs_k[None, :] * stride_dwk,
             acc.to(dw_ptr.dtype.element_ty), mask=tile_ok)


_AUTOTUNED: dict = {}
# INPUT_PRECISION: the shared pruning (masked_linear._prune_configs) gives TF32 and IEEE fp32 different configs.
_KEYS = {"fwd": ["M", "N", "K", "ARMS", "LIVE_BUCKET", "INPUT_PRECISION"],
         "dx": ["M", "N", "K", "ARMS", "LIVE_BUCKET", "INPUT_PRECISION"],
         "dw": ["M", "N", "K", "ARMS", "LIVE_BUCKET", "INPUT_PRECISION"]}


def _kernel(name: str, device: torch.device):
    """The jitted kernel: autotuned on CUDA with the one-arm kernels' configs, plain under the interpreter."""
    base = {"fwd": _grouped_fwd_kernel, "dx": _grouped_dx_kernel, "dw": _grouped_dw_kernel}[name]
    if device.type != "cuda":
        return base
    if name not in _AUTOTUNED:
        if name == "dw":
            _AUTOTUNED[name] = triton.autotune(configs=_dw_cuda_configs(), key=_KEYS[name],
                                               prune_configs_by={"early_config_prune": _dw_prune_configs})(base)
        else:
            _AUTOTUNED[name] = triton.autotune(configs=_cuda_configs(), key=_KEYS[name],
                                               prune_configs_by={"early_config_prune": _prune_configs})(base)
    return _AUTOTUNED[name]


def _launch_meta(device: torch.device) -> dict:
    return {} if device.type == "cuda" else {"BLOCK_M": _INTERPRETER_BLOCK_M, "num_warps": 4}


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _check(tile_map: StackedTileMap, arms: int, n: int, k: int, device: torch.device,
           dtype: torch.dtype) -> Tuple[int, int]:
    bn, bk = linear_tile_sizes(device, dtype)
    if tuple(tile_map.block) != (bn, bk):
        raise ValueError(f"stacked tile map has tiles {tile_map.block}, the kernels on {device.type} use {(bn, bk)}")
    if (tile_map.arms, *tile_map.shape) != (arms, n, k):
        raise ValueError(f"stacked tile map is for {tile_map.arms} arms of shape {tile_map.shape}, "
                         f"got {arms} of {(n, k)}")
    return bn, bk


# ------------------------------------------------------------------------------------------------ launchers

def grouped_linear_forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                           tile_map: StackedTileMap, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Y[a] = x[a] @ weight[a]^T + bias[a] over each arm's live tiles, one launch. x: [A, M, K]; weight:
    [A, N, K]; bias: [A, N] or None; returns [A, M, N] in x's dtype. `out` is fully overwritten."""
    arms, m, k = x.shape
    n = weight.shape[1]
    bn, bk = _check(tile_map, arms, n, k, x.device, x.dtype)
    if out is None:
        out = torch.empty((arms, m, n), device=x.device, dtype=x.dtype)
    if arms == 0 or m == 0 or n == 0:
        return out
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, bn), arms)  # noqa: E731
    with device_guard(out):
        _kernel("fwd", x.device)[grid](
            x, weight, bias if bias is not None else x, out, tile_map.row_ptr, tile_map.col_idx,
            m, n, k, tile_map.tiles[0],
            x.stride(0), x.stride(1), x.stride(2), weight.stride(0), weight.stride(1), weight.stride(2),
            bias.stride(0) if bias is not None else 0,
            out.stride(0), out.stride(1), out.stride(2), arms, live_bucket(tile_map.live_fraction),
            HAS_BIAS=bias is not None, INPUT_PRECISION=dot_input_precision(x.dtype, "matmul"), ACC=_acc(x.dtype),
            BLOCK_N=bn, BLOCK_K=bk, LIST_CHUNK=_LIST_CHUNK, GROUP_M=_GROUP_M, **_launch_meta(x.device),
        )
    return out


def grouped_linear_grad_input(grad_out: torch.Tensor, weight: torch.Tensor, tile_map: StackedTileMap,
                              out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """dX[a] = grad_out[a] @ weight[a] over each arm's live tiles, one launch. grad_out: [A, M, N]; returns
    [A, M, K]; `out` is fully overwritten."""
    arms, m, n = grad_out.shape
    k = weight.shape[2]
    bn, bk = _check(tile_map, arms, n, k, grad_out.device, grad_out.dtype)
    if out is None:
        out = torch.empty((arms, m, k), device=grad_out.device, dtype=grad_out.dtype)
    if arms == 0 or m == 0 or k == 0:
        return out
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(k, bk), arms)  # noqa: E731
    with device_guard(out):
        _kernel("dx", grad_out.device)[grid](
            grad_out, weight, out, tile_map.col_ptr, tile_map.row_idx,
            m, n, k, tile_map.tiles[1],
            grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
            weight.stride(0), weight.stride(1), weight.stride(2), out.stride(0), out.stride(1), out.stride(2),
            arms, live_bucket(tile_map.live_fraction),
            INPUT_PRECISION=dot_input_precision(grad_out.dtype, "matmul"), ACC=_acc(grad_out.dtype),
            BLOCK_N=bn, BLOCK_K=bk, LIST_CHUNK=_LIST_CHUNK, GROUP_M=_GROUP_M, **_launch_meta(grad_out.device),
        )
    return out


def grouped_linear_grad_weight(grad_out: torch.Tensor, x: torch.Tensor, mask: torch.Tensor,
                               tile_map: StackedTileMap, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """dW[a] = (grad_out[a]^T @ x[a]) * mask[a], reduced on live tiles only, one launch; every element is
    written (dead tiles and pruned entries as exact zeros), so `out` may hold anything. Returns [A, N, K]."""
    arms, m, n = grad_out.shape
    k = x.shape[2]
    bn, bk = _check(tile_map, arms, n, k, x.device, x.dtype)
    if out is None:
        out = torch.empty((arms, n, k), device=x.device, dtype=x.dtype)
    if arms == 0 or n == 0 or k == 0:
        return out
    tiles_n, tiles_k = tile_map.tiles
    mask_u8 = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
    with device_guard(out):
        _kernel("dw", x.device)[(tiles_n * tiles_k, arms)](
            grad_out, x, mask_u8, tile_map.live_flags, out,
            m, n, k, tiles_k,
            grad_out.stride(0), grad_out.stride(1), grad_out.stride(2), x.stride(0), x.stride(1), x.stride(2),
            mask_u8.stride(0), mask_u8.stride(1), mask_u8.stride(2), out.stride(0), out.stride(1), out.stride(2),
            arms, live_bucket(tile_map.live_fraction),
            INPUT_PRECISION=dot_input_precision(x.dtype, "matmul"), ACC=_acc(x.dtype),
            BLOCK_N=bn, BLOCK_K=bk, **_launch_meta(x.device),
        )
    return out


# ------------------------------------------------------------------------------------------------ reference

def reference_grouped_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                             mask: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Per arm, the one-arm reference (Y[a] = x[a] @ (W[a] * M[a])^T + b[a]) in `dtype`, stacked."""
    return torch.stack([reference_masked_linear(x[a], weight[a], None if bias is None else bias[a], mask[a], dtype)
                        for a in range(x.shape[0])])


def reference_grouped_linear_grads(x, weight, bias, mask, grad_out, dtype: torch.dtype = torch.float64):
    """Per arm, (dX, dW, db) of the one-arm reference, stacked (db None without bias)."""
    per_arm = [reference_masked_linear_grads(x[a], weight[a], None if bias is None else bias[a], mask[a],
                                             grad_out[a], dtype) for a in range(x.shape[0])]
    dx, dw, db = zip(*per_arm)
    return torch.stack(dx), torch.stack(dw), (None if bias is None else torch.stack(db))
