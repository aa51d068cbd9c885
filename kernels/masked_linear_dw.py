"""dW of the masked linear layer over its live tiles: the launchers of _masked_linear_jit.py's `_dw_kernel`.

    dW = (dY^T @ X) * M, computed only where the tile map has live tiles; dead tiles are never written.

Two program shapes, one kernel (a constexpr tells them apart):

- tiles (`tiles_per_program=1`): one program per live BN x BK map tile (COO list), 64 x 64 on CUDA;
- quads (`tiles_per_program=2`): one program per live 2 x 2 block of map tiles (`TileMap.quads`), a
  (2 BN) x (2 BK) = 128 x 128 output tile computed with one tl.dot per step over the token chunk. Per output
  element it loads half the operand bytes of a 64 x 64 program (twice the arithmetic intensity: the
  shape of cuBLAS's tiles); a dead top / bottom (left / right) pair of sub-tiles leaves that half of dY^T
  (X) unloaded, the element mask is applied in the epilogue and only the live sub-tiles are stored. A dead
  sub-tile of a live quad is MMA work for nothing, so quads pay only when the quads are full.

The choice (`_dw_quads`, a heuristic no GPU has measured yet): on CUDA, not in the interpreter, for
16-bit and TF32 inputs (IEEE fp32 runs on FMA, where the wider tile only adds registers), quads when their
fill n_live / (4 n_quads) is at least _WIDE_MIN_FILL (the forward / dX's wide-program bar) and the quads'
programs, token splits included, still give every SM one; tiles otherwise. `fastticket bench --suite
linear` times both (its `dw-tiles-vs-quads` rows) so a lent GPU settles it; `tiles_per_program` overrides.

Token split (`_dw_split`): enough programs (tiles or quads, whichever runs) for ~4 per SM when few are live;
the splits add with fp32 atomics into a compact buffer of one BN x BK slab per live tile (COO order; a quad
adds each live sub-tile into its own slab), which `scatter_live_slabs` then writes into dW: buffer,
zero-fill and epilogue scale with the live tiles, never with N x K. 1 off CUDA and under
torch.use_deterministic_algorithms(True). The fused dW + SGD (kernels/linear_dw_sgd.py) runs 64 x 64
tiles only (its split path reuses `live_slabs` with tiles).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import triton

from fastticket.kernels._common import (device_guard, dot_input_precision, first_config_only, interpreter_active,
                                        live_bucket, sm_count)
from fastticket.kernels._masked_linear_jit import _dw_kernel
from fastticket.kernels import masked_linear as _ml
from fastticket.kernels.masked_linear import _KEYS, _WIDE_MIN_FILL, _check_tile_map, _kernel, _launch_meta
from fastticket.kernels.tile_map import TileMap

__all__ = ["linear_grad_weight", "dw_split_rows", "live_slabs", "scatter_live_slabs", "live_tile_index"]

_TILES_PER_PROGRAM = (1, 2)


# ------------------------------------------------------------------------------------------------ config

def _dw_quad_cuda_configs() -> List[triton.Config]:
    """Quad dW configs (128 x 128 fp32 accumulator): 8 warps, where it is 64 registers a thread (on 4 warps it
    is 128 and the sm_90 compile goes past 200 registers, spilling for IEEE). BLOCK_M is the token chunk of one
    step, the MMA's reduction (not its M: BLOCK_M 32 still compiles to wgmma). Stages are trimmed to the shared
    memory by _dw_quad_prune_configs."""
    return [triton.Config({"BLOCK_M": block_m}, num_warps=8, num_stages=stages)
            for block_m, stages in [(64, 4), (128, 3), (32, 5)]]


# IEEE fp32 runs the quad's product on FMA: BLOCK_M 64 on 8 warps takes 255 registers a thread on sm_90 and
# spills at LeNet's 784 -> 300 strides; BLOCK_M 32 compiles spill-free (127-146 registers) at every shape
# bench/sm90_report.py covers.
_DW_QUAD_IEEE_MAX_BLOCK_M = 32
# X or dW row strides that are not multiples of 16 elements (LeNet's 300 -> 100 and 100 -> 10: K = 300, 100)
# make the 128-wide loads and the direct store scalar, one 64-bit address per element: on 8 warps that spills
# on sm_90 (bf16 140 bytes, TF32 352, IEEE 88); BLOCK_M 32 on 16 warps compiles spill-free for all three.
_DW_QUAD_UNALIGNED_CONFIGS = ((32, 16, 5),)


def _x_dw_strides_aligned(named_args) -> bool:
    """X's and dW's non-unit strides all multiples of 16 elements (what triton's divisibility needs)."""
    return all(named_args.get(name, 16) % 16 == 0 for name in ("stride_xm", "stride_xk", "stride_dwn", "stride_dwk")
               if named_args.get(name, 16) != 1)


def _dw_quad_prune_configs(configs, named_args, **kwargs):
    """The quad configs that fit: IEEE fp32 only BLOCK_M <= _DW_QUAD_IEEE_MAX_BLOCK_M, BLOCK_M far above M
    dropped, stages cut to the shared memory (two [128, BLOCK_M] / [BLOCK_M, 128] operand tiles a stage) and a
    config left with fewer than 3 dropped; unaligned X / dW strides take _DW_QUAD_UNALIGNED_CONFIGS instead.
    Duplicates collapse."""
    m = named_args["M"]
    if not _x_dw_strides_aligned(named_args):
        configs = [triton.Config({"BLOCK_M": bm}, num_warps=w, num_stages=st) for bm, w, st in _DW_QUAD_UNALIGNED_CONFIGS]
    x = named_args["x_ptr"]
    budget = _ml._SMEM_BUDGET  # read at call time: the sm_90 compile checks set it to Hopper's
    if x.device.type == "cuda":
        budget = getattr(torch.cuda.get_device_properties(x.device), "shared_memory_per_block_optin", budget)
    ieee = kwargs.get("INPUT_PRECISION") == "ieee"
    per_row = (kwargs.get("BLOCK_N", 128) + kwargs.get("BLOCK_K", 128)) * x.element_size()
    kept = {}
    for cfg in configs:
        block_m = cfg.kwargs["BLOCK_M"]
        if (ieee and block_m > _DW_QUAD_IEEE_MAX_BLOCK_M) or (block_m > 64 and block_m >= 2 * max(m, 1)):
            continue
        stages = min(cfg.num_stages, budget // (block_m * per_row))
        if stages < 3:
            continue
        kept.setdefault((block_m, cfg.num_warps, stages),
                        triton.Config(dict(cfg.kwargs), num_warps=cfg.num_warps, num_stages=stages))
    if not kept:
        return [triton.Config({"BLOCK_M": 32}, num_warps=8, num_stages=3)]
    return first_config_only(list(kept.values()))


_AUTOTUNED_QUADS: dict = {}


def _quad_kernel(device: torch.device, atomic: bool):
    """The jitted dW kernel as the quads launch it: autotuned with the quad configs on CUDA."""
    if device.type != "cuda":
        return _dw_kernel
    if atomic not in _AUTOTUNED_QUADS:
        # Timed runs add into the buffer again: re-zero it before each (split dW only).
        _AUTOTUNED_QUADS[atomic] = triton.autotune(
            configs=_dw_quad_cuda_configs(), key=_KEYS["dw"],
            prune_configs_by={"early_config_prune": _dw_quad_prune_configs},
            reset_to_zero=["dw_ptr"] if atomic else None)(_dw_kernel)
    return _AUTOTUNED_QUADS[atomic]


# ------------------------------------------------------------------------------------------------ choices

def _dw_split(m: int, programs: int, device: torch.device) -> int:
    """Token splits per dW program (tile or quad): enough programs to fill the GPU (4 per SM) when few are
    live, each split still reducing >= 1024 tokens so the fp32 atomics stay a small part of its work. 1 under
    the interpreter and under torch.use_deterministic_algorithms(True) (atomic adds round in varying order)."""
    if device.type != "cuda" or torch.are_deterministic_algorithms_enabled():
        return 1
    want = triton.cdiv(4 * sm_count(device.index or 0), max(1, programs))
    return max(1, min(want, triton.cdiv(m, 1024)))


def dw_split_rows(m: int, programs: int, device: torch.device, split_m: Optional[int]) -> Tuple[int, int]:
    """(splits, tokens per split) of a dW reduction over m tokens shared by `programs` programs: `split_m` or
    _dw_split's default, in whole 64-token chunks (m == 0 runs one split whose loop is empty and stores zeros)."""
    split = _dw_split(m, programs, device) if split_m is None else max(1, int(split_m))
    m_per_split = max(64, triton.cdiv(triton.cdiv(max(m, 1), split), 64) * 64) if split > 1 else max(m, 1)
    return triton.cdiv(max(m, 1), m_per_split), m_per_split


def _dw_quads(tile_map: TileMap, m: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether dW runs quad programs by default (module docstring; unmeasured, so conservative): CUDA only, not
    IEEE fp32, quads at least _WIDE_MIN_FILL full, and n_quads x splits >= one program per SM."""
    if device.type != "cuda" or interpreter_active() or tile_map.n_live == 0:
        return False
    if dot_input_precision(dtype, "matmul") == "ieee":
        return False
    quads = tile_map.quads()
    if tile_map.n_live < _WIDE_MIN_FILL * 4 * quads.n_quads:
        return False
    return quads.n_quads * _dw_split(m, quads.n_quads, device) >= sm_count(device.index or 0)


def dw_uses_quads(tile_map: TileMap, m: int, dtype: torch.dtype, device: torch.device,
               tiles_per_program: Optional[int]) -> bool:
    if tiles_per_program is None:
        return _dw_quads(tile_map, m, dtype, device)
    if tiles_per_program not in _TILES_PER_PROGRAM:
        raise ValueError(f"tiles_per_program must be None (the heuristic), 1 (64 x 64 tiles) or 2 (2 x 2 quads), "
                         f"got {tiles_per_program!r}")
    return tiles_per_program == 2


# ------------------------------------------------------------------------------------------------ launchers

def linear_grad_weight(grad_out: torch.Tensor, x: torch.Tensor, mask: torch.Tensor, tile_map: TileMap,
                       out: Optional[torch.Tensor] = None, *, split_m: Optional[int] = None,
                       tiles_per_program: Optional[int] = None) -> torch.Tensor:
    """dW = (grad_out^T @ x) * mask, computed for live tiles only. Returns [N, K] in x's dtype.

    Dead tiles are never written: a fresh result is zero-initialised, and a caller-supplied `out` must hold
    zeros there already (the tests pass a NaN-filled `out` to prove the dead tiles are left untouched).
    `split_m` programs share each reduction over tokens (default: _dw_split, so that a layer with few live
    tiles still fills the GPU); with more than one, partial tiles add with atomics (not bit-reproducible run
    to run) into a compact fp32 buffer of the live tiles only; 1 is deterministic. `tiles_per_program`: 1
    (one program per map tile), 2 (per 2 x 2 quad of tiles) or None (the heuristic _dw_quads).
    """
    m, n = grad_out.shape
    k = x.shape[1]
    _check_tile_map(tile_map, n, k, x.device, x.dtype)
    quads = dw_uses_quads(tile_map, m, x.dtype, x.device, tiles_per_program)
    if out is None:
        out = torch.zeros((n, k), device=x.device, dtype=x.dtype)
    if tile_map.n_live == 0:
        return out
    programs = tile_map.quads().n_quads if quads else tile_map.n_live
    split, m_per_split = dw_split_rows(m, programs, x.device, split_m)
    if split > 1:
        # Partial sums add into one fp32 slab per live tile (see _dw_kernel), then scattered into `out`.
        slabs = live_slabs(grad_out, x, mask, tile_map, split, m_per_split, quads=quads)
        return scatter_live_slabs(out, slabs, tile_map)
    _launch_dw(grad_out, x, mask, tile_map, out, 1, m_per_split, quads)
    return out


def live_slabs(grad_out: torch.Tensor, x: torch.Tensor, mask: torch.Tensor, tile_map: TileMap, split: int,
               m_per_split: int, *, quads: bool = False) -> torch.Tensor:
    """The masked dW of every live tile, reduced over `split` token splits with fp32 atomics: the compact
    [n_live, BN, BK] fp32 buffer (COO order), zero outside the weight's bounds, by tile or quad programs.
    Used by the split dW and by the split fused dW + SGD (kernels/linear_dw_sgd.py)."""
    bn, bk = tile_map.block
    slabs = torch.zeros((tile_map.n_live, bn, bk), device=x.device, dtype=torch.float32)
    _launch_dw(grad_out, x, mask, tile_map, slabs, split, m_per_split, quads)
    return slabs


def live_tile_index(tile_map: TileMap, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows, cols, valid) of the compact split-dW buffer [n_live, BN, BK]: element (t, i, j) is dW[rows[t, i],
    cols[t, j]] where valid[t, i, j] (tiles at the right / bottom edge are partial). O(live tiles) to build."""
    bn, bk = tile_map.block
    n, k = tile_map.shape
    rows = tile_map.coo_rows.to(device).long()[:, None] * bn + torch.arange(bn, device=device)
    cols = tile_map.coo_cols.to(device).long()[:, None] * bk + torch.arange(bk, device=device)
    valid = (rows < n)[:, :, None] & (cols < k)[:, None, :]
    return rows, cols, valid


def scatter_live_slabs(out: torch.Tensor, slabs: torch.Tensor, tile_map: TileMap) -> torch.Tensor:
    """The split-dW epilogue: write each live tile's fp32 slab ([n_live, BN, BK]) into its tile of `out` (in
    out's dtype). Dead tiles of `out` are not touched (they hold zeros already), so the cost is the live tiles'."""
    rows, cols, valid = live_tile_index(tile_map, out.device)
    r = rows[:, :, None].expand(valid.shape)[valid]
    c = cols[:, None, :].expand(valid.shape)[valid]
    out[r, c] = slabs[valid].to(out.dtype)
    return out


def _launch_dw(grad_out, x, mask, tile_map: TileMap, acc: torch.Tensor, split: int, m_per_split: int,
               quads: bool) -> None:
    m, n = grad_out.shape
    k = x.shape[1]
    bn, bk = tile_map.block
    atomic = split > 1
    mask_u8 = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
    if quads:
        q = tile_map.quads()
        kernel = _quad_kernel(x.device, atomic)
        programs, lists, width = q.n_quads, (q.rows, q.cols, q.bits, q.slabs), 2
    else:
        kernel = _kernel("dw", x.device, atomic)
        programs, width = tile_map.n_live, 1
        lists = (tile_map.coo_rows, tile_map.coo_cols, tile_map.coo_rows, tile_map.coo_rows)  # no bits / slabs
    with device_guard(acc):
        kernel[(programs, split)](
            grad_out, x, mask_u8, acc, *lists,
            m, n, k, m_per_split,
            grad_out.stride(0), grad_out.stride(1), x.stride(0), x.stride(1),
            mask_u8.stride(0), mask_u8.stride(1), acc.stride(-2), acc.stride(-1),
            live_bucket(tile_map.live_fraction),
            INPUT_PRECISION=dot_input_precision(x.dtype, "matmul"), ATOMIC=atomic,
            BLOCK_N=width * bn, BLOCK_K=width * bk, TILE_N=bn, TILE_K=bk, **_launch_meta(x.device),
        )
