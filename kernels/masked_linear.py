"""Masked linear layer that skips pruned tiles: Triton kernels, launchers, float64 reference.

Math (docs/architecture.md, "The invariant" and "Kernels"), with W the stored weight [N, K] whose pruned
entries are exactly zero and M its bool mask:

    forward  Y  = X @ W^T + b          program per (M-tile, N-tile), loops over the live K-tiles of its
                                       output tile-row only (CSR `row_ptr` / `col_idx` of the tile map)
    dX          = dY @ W               program per (M-tile, K-tile), loops over the live N-tiles of its
                                       tile-column only (transposed lists `col_ptr` / `row_idx`)
    dW          = (dY^T @ X) * M       one program per live (BN x BK) tile (COO `coo_rows` / `coo_cols`) or
                                       per live 2 x 2 block of tiles (TileMap.quads), the element mask applied
                                       in the epilogue; dead tiles are never written, so the zero-initialised
                                       buffer keeps them exactly zero (launchers: kernels/masked_linear_dw.py)
    db          = dY.sum(rows)         once, in PyTorch (a reduction, not worth a per-tile kernel)

Because pruned weights are zero in storage, the forward and dX need no element mask: skipping dead tiles
is exact, and inside a live tile the zeros contribute nothing.

Precision: fp32 inputs use IEEE fp32 products unless `torch.backends.cuda.matmul.allow_tf32` is set (then
TF32, like cuBLAS under the same flag); bf16 / fp16 inputs accumulate in fp32; outputs are in the input dtype.

Tile sizes: the tile map's (BN, BK) is the kernels' skipping grain: a forward / dX step consumes one map
tile along the reduction, and a program covers 1, 2 or 4 map tiles across (BLOCK_N = ROWS * TILE_N in the
forward, BLOCK_K = ROWS * TILE_K in dX), walking the union of their lists (TileMap.grouped) and loading only
the live sub-tiles of each step. BN / BK are fixed per device (64 x 64 on CUDA, 16 x 16 in the CPU
interpreter so small test shapes still span several tiles); the width comes from _rows_per_program (a
heuristic, unmeasured) and autotuning on CUDA varies BLOCK_M, num_warps and num_stages, keyed on (M, N, K,
width, live_bucket(live fraction)) plus the dtypes (triton adds those). Under the interpreter a single fixed
config runs (autotuning there would take minutes).

Pipelining: each program stages its live list in registers (_LIST_CHUNK entries at a time) and picks the
step's tile index out of registers, so the operand loads do not depend on a load issued in the same loop;
compiled for sm_90 the forward and dX then hold num_stages shared-memory buffers per operand (2 with the
index loaded in the loop, whatever num_stages; tests/test_masked_linear_kernels.py checks it).

dW (kernels/masked_linear_dw.py): programs per (live tile or live quad, token split); its configs are here,
beside the other kernels' (kernels/grouped_linear.py shares them).

Autograd, and the per-layer choice between these kernels and dense cuBLAS (kernels/dispatch.py's
thresholds), live in fastticket/sparse/linear.py; the threshold values are placeholders until
`fastticket bench --suite linear` is run on a GPU (its `crossover` row suggests one).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import triton

from fastticket.kernels._common import device_guard, dot_input_precision, first_config_only, live_bucket, sm_count
from fastticket.kernels.tile_map import TileMap
from fastticket.kernels._masked_linear_jit import _dw_kernel, _dx_kernel, _fwd_kernel

__all__ = [
    "linear_tile_sizes", "linear_forward", "linear_grad_input",
    "reference_masked_linear", "reference_masked_linear_grads",
]


# ------------------------------------------------------------------------------------------------ config

def linear_tile_sizes(device: torch.device, dtype: torch.dtype) -> Tuple[int, int]:
    """(BLOCK_N, BLOCK_K) the kernels use on `device` for `dtype`: also the tile size of the tile map.

    64 x 64 on CUDA for every dtype: one tile per K step keeps a bf16 tile at 8 KiB and an fp32 one at
    16 KiB in shared memory, so 3-4 pipeline stages fit on sm80/sm90; it is also the block-pruning grain
    the paper-style `block:64x64` masks use. 16 x 16 (the smallest tl.dot) off-CUDA, where the interpreter
    runs small test shapes that must still cover several tiles.
    """
    if device.type == "cuda":
        return 64, 64
    return 16, 16


# Fixed BLOCK_M off-CUDA (interpreter).
_INTERPRETER_BLOCK_M = 16
# M-tiles per launch-order group (L2 reuse; see _grouped_tile).
_GROUP_M = 8
# Live-list entries a forward / dX program stages in registers at a time (see _live_tiles_dot).
_LIST_CHUNK = 64
# Tile-rows (forward) or tile-columns (dX) one program may cover: 64-wide tiles -> 64, 128 or 256 wide programs.
_WIDE_ROWS = (1, 2, 4)
# A wide program multiplies every dead sub-tile of its union list as zeros: take width only when at least
# this fraction of the (rows x entries) sub-tiles it computes are live tiles.
_WIDE_MIN_FILL = 0.75
# Below this many tokens, BLOCK_M = 32 configs (mma.sync on Hopper: warp-group MMA needs 64 rows per warp
# group) may win, because a 64-row tile would be mostly padding; above it they are not even tried.
_SMALL_M = 32
# Per-block shared-memory budget when the device cannot be asked (sm_80's 163 KiB; sm_90 has 227 KiB).
_SMEM_BUDGET = 160 * 1024


def _cuda_configs() -> List[triton.Config]:
    """Forward / dX configs. Each compiles (sm_90) to num_stages shared-memory buffers per operand (the live
    list is staged in registers, so no stage is spent on an index load) and to a kernel distinct from the
    others; BLOCK_M = 32 is the one mma.sync config (pruned unless M is small, see _prune_configs)."""
    return [triton.Config({"BLOCK_M": block_m}, num_warps=warps, num_stages=stages)
            for block_m, warps, stages in [(128, 8, 4), (128, 4, 4), (64, 4, 5), (256, 8, 3), (32, 4, 5)]]


# fp32 forward / dX configs that compile without register spills on sm_90 (bench/sm90_report.py; the sm_90
# checks of tests/test_masked_linear_kernels.py hold them). IEEE fp32 runs on FMA, whose 64 x 64 fp32
# operand fragments per thread make BLOCK_M 128 on 8 warps spill (dX: 132 bytes at 4096 x 4096); BLOCK_M 64
# on 8 warps does not. Strides that are not multiples of 16 elements (LeNet's 300, 100, 10) turn the 16-byte
# async copies into scalar loads whose addresses take the registers: there only BLOCK_M 32 on 8 warps (IEEE)
# or BLOCK_M 64 on 8 warps (TF32) stay spill-free.
_IEEE_CONFIGS = ((64, 8, 3), (32, 8, 3))
_IEEE_UNALIGNED_CONFIGS = ((32, 8, 3),)
_TF32_UNALIGNED_CONFIGS = ((64, 8, 3),)


def _strides_aligned(named_args) -> bool:
    """Every non-unit stride of the launch a multiple of 16 elements (what triton's divisibility needs)."""
    return all(v % 16 == 0 for name, v in named_args.items()
               if name.startswith("stride") and isinstance(v, int) and v != 1)


def _fp32_configs(precision: Optional[str], aligned: bool) -> Optional[List[triton.Config]]:
    """The fp32 configs to try instead of _cuda_configs (None: keep those)."""
    table = {("ieee", True): _IEEE_CONFIGS, ("ieee", False): _IEEE_UNALIGNED_CONFIGS,
             ("tf32", False): _TF32_UNALIGNED_CONFIGS}.get((precision, aligned))
    if table is None:
        return None
    return [triton.Config({"BLOCK_M": bm}, num_warps=w, num_stages=st) for bm, w, st in table]


def _dw_cuda_configs() -> List[triton.Config]:
    """dW configs: BLOCK_M is the reduction chunk over tokens, the MMA tile is the 64 x 64 map tile."""
    return [triton.Config({"BLOCK_M": block_m}, num_warps=4, num_stages=stages)
            for block_m, stages in [(64, 4), (128, 3), (32, 5)]]


def _prune_configs(configs, named_args, **kwargs):
    """Drop configs that cannot win or cannot fit: BLOCK_M = 32 (mma.sync) unless M is small, BLOCK_M far
    above M. A config whose pipeline buffers overflow shared memory for this dtype and program width keeps
    as many stages as fit, if that is still >= 3 buffers; otherwise it is dropped. Duplicates collapse."""
    m = named_args["M"]
    a = named_args["x_ptr"] if "x_ptr" in named_args else named_args["dy_ptr"]
    elem = a.element_size()
    width = kwargs.get("BLOCK_N", 64) if "x_ptr" in named_args else kwargs.get("BLOCK_K", 64)
    step = 64  # the map tile along the reduction
    budget = _SMEM_BUDGET
    if a.device.type == "cuda":
        budget = getattr(torch.cuda.get_device_properties(a.device), "shared_memory_per_block_optin", budget)
    fp32 = _fp32_configs(kwargs.get("INPUT_PRECISION"), _strides_aligned(named_args)) if elem == 4 else None
    if fp32 is not None:
        configs = fp32
    kept = {}
    for cfg in configs:
        block_m = cfg.kwargs["BLOCK_M"]
        if block_m < 64 and m > _SMALL_M and fp32 is None:  # FMA (IEEE) has no 64-row warp-group minimum
            continue
        if block_m > 64 and block_m >= 2 * max(m, 1):
            continue
        # More than 128 fp32 accumulator registers per thread spills on sm_90 (256 x 256, or 128 x 256 on
        # 4 warps: seen in the sm_90 compile checks, tests/test_masked_linear_kernels.py).
        if block_m * width > 128 * 32 * cfg.num_warps:
            continue
        stages = min(cfg.num_stages, budget // ((block_m * step + step * width) * elem))
        if stages < 3:
            continue
        kept.setdefault((block_m, cfg.num_warps, stages),
                        triton.Config(dict(cfg.kwargs), num_warps=cfg.num_warps, num_stages=stages))
    if not kept:
        stages = max(2, min(3, budget // ((64 * step + step * width) * elem)))
        return [triton.Config({"BLOCK_M": 64}, num_warps=4, num_stages=stages)]
    return first_config_only(list(kept.values()))


def _dw_prune_configs(configs, named_args, **kwargs):
    m = named_args["M"]
    kept = [c for c in configs if c.kwargs["BLOCK_M"] >= 64 or m <= _SMALL_M]
    return first_config_only(kept or configs)


_AUTOTUNED: dict = {}
# INPUT_PRECISION: fp32 under TF32 and under IEEE share dtypes but not configs (_fp32_configs).
_KEYS = {"fwd": ["M", "N", "K", "BLOCK_N", "LIVE_BUCKET", "INPUT_PRECISION"],
         "dx": ["M", "N", "K", "BLOCK_K", "LIVE_BUCKET", "INPUT_PRECISION"],
         "dw": ["M", "N", "K", "M_PER_SPLIT", "LIVE_BUCKET", "INPUT_PRECISION"]}


def _kernel(name: str, device: torch.device, atomic: bool = False):
    """The jitted kernel to launch: autotuned on CUDA, plain (fixed BLOCK_M) under the interpreter."""
    base = {"fwd": _fwd_kernel, "dx": _dx_kernel, "dw": _dw_kernel}[name]
    if device.type != "cuda":
        return base
    tag = (name, atomic)
    if tag not in _AUTOTUNED:
        if name == "dw":
            # Timed runs add into the buffer again: re-zero it before each (split dW only).
            _AUTOTUNED[tag] = triton.autotune(configs=_dw_cuda_configs(), key=_KEYS[name],
                                              prune_configs_by={"early_config_prune": _dw_prune_configs},
                                              reset_to_zero=["dw_ptr"] if atomic else None)(base)
        else:
            _AUTOTUNED[tag] = triton.autotune(configs=_cuda_configs(), key=_KEYS[name],
                                              prune_configs_by={"early_config_prune": _prune_configs})(base)
    return _AUTOTUNED[tag]


def _launch_meta(device: torch.device) -> dict:
    return {} if device.type == "cuda" else {"BLOCK_M": _INTERPRETER_BLOCK_M, "num_warps": 4}


def _check_tile_map(tile_map: TileMap, n: int, k: int, device: torch.device, dtype: torch.dtype) -> Tuple[int, int]:
    bn, bk = linear_tile_sizes(device, dtype)
    if tuple(tile_map.block) != (bn, bk):
        raise ValueError(f"tile map has tiles {tile_map.block}, the kernels on {device.type} use {(bn, bk)}")
    if tuple(tile_map.shape) != (n, k):
        raise ValueError(f"tile map is for a weight of shape {tile_map.shape}, got {(n, k)}")
    return bn, bk


def _rows_per_program(tile_map: TileMap, axis: str, m: int, dtype: torch.dtype, device: torch.device,
                      requested: Optional[int]) -> int:
    """How many map tiles wide a forward (axis "rows") or dX (axis "cols") program is.

    On CUDA by default: the widest of 4 / 2 tiles (256 / 128 columns) whose grouped lists waste at most a
    quarter of the MMA work on dead sub-tiles (_WIDE_MIN_FILL) and still give every SM a program (with
    128-row M tiles); fp32 stops at 2 (a 256-wide fp32 B tile leaves no room for 3 buffers). Unmeasured:
    a GPU run of `fastticket bench --suite linear` should confirm it. The interpreter uses 1 unless asked.
    """
    if requested is not None:
        if requested not in _WIDE_ROWS:
            raise ValueError(f"rows_per_program must be one of {_WIDE_ROWS}, got {requested}")
        return requested
    if device.type != "cuda" or tile_map.n_live == 0:
        return 1
    tiles_m = triton.cdiv(max(m, 1), 128)
    for rows in (4, 2):
        if rows == 4 and dtype == torch.float32:
            continue
        lists = tile_map.grouped(axis, rows)
        fill = tile_map.n_live / max(1, rows * lists.n_entries)
        if fill >= _WIDE_MIN_FILL and tiles_m * lists.groups >= sm_count(device.index or 0):
            return rows
    return 1


# ------------------------------------------------------------------------------------------------ launchers

def linear_forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], tile_map: TileMap,
                   out: Optional[torch.Tensor] = None, *, rows_per_program: Optional[int] = None) -> torch.Tensor:
    """Y = x @ weight^T + bias over the live tiles only. x: [M, K]; returns [M, N] in x's dtype.

    `out` (optional, [M, N], x's dtype) is fully overwritten, which the tests check by passing NaN-filled buffers.
    `rows_per_program` (1, 2 or 4 map tiles of N per program) overrides the width heuristic.
    """
    m, k = x.shape
    n = weight.shape[0]
    bn, bk = _check_tile_map(tile_map, n, k, x.device, x.dtype)
    if out is None:
        out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    if m == 0 or n == 0:
        return out
    rows = _rows_per_program(tile_map, "rows", m, x.dtype, x.device, rows_per_program)
    lists = tile_map.grouped("rows", rows)
    width = rows * bn
    kernel = _kernel("fwd", x.device)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, width),)  # noqa: E731
    with device_guard(out):
        kernel[grid](
            x, weight, bias if bias is not None else x, out, lists.ptr, lists.idx,
            lists.bits if lists.bits is not None else lists.idx,
            m, n, k,
            x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), out.stride(0), out.stride(1),
            live_bucket(tile_map.live_fraction),
            HAS_BIAS=bias is not None, INPUT_PRECISION=dot_input_precision(x.dtype, "matmul"),
            BLOCK_N=width, BLOCK_K=bk, TILE_N=bn, LIST_CHUNK=_LIST_CHUNK, GROUP_M=_GROUP_M,
            **_launch_meta(x.device),
        )
    return out


def linear_grad_input(grad_out: torch.Tensor, weight: torch.Tensor, tile_map: TileMap,
                      out: Optional[torch.Tensor] = None, *, rows_per_program: Optional[int] = None
                      ) -> torch.Tensor:
    """dX = grad_out @ weight over the live tiles only. grad_out: [M, N]; returns [M, K].

    `rows_per_program` (1, 2 or 4 map tiles of K per program) overrides the width heuristic."""
    m, n = grad_out.shape
    k = weight.shape[1]
    bn, bk = _check_tile_map(tile_map, n, k, grad_out.device, grad_out.dtype)
    if out is None:
        out = torch.empty((m, k), device=grad_out.device, dtype=grad_out.dtype)
    if m == 0 or k == 0:
        return out
    rows = _rows_per_program(tile_map, "cols", m, grad_out.dtype, grad_out.device, rows_per_program)
    lists = tile_map.grouped("cols", rows)
    width = rows * bk
    kernel = _kernel("dx", grad_out.device)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(k, width),)  # noqa: E731
    with device_guard(out):
        kernel[grid](
            grad_out, weight, out, lists.ptr, lists.idx, lists.bits if lists.bits is not None else lists.idx,
            m, n, k,
            grad_out.stride(0), grad_out.stride(1), weight.stride(0), weight.stride(1), out.stride(0),
            out.stride(1), live_bucket(tile_map.live_fraction),
            INPUT_PRECISION=dot_input_precision(grad_out.dtype, "matmul"),
            BLOCK_N=bn, BLOCK_K=width, TILE_K=bk, LIST_CHUNK=_LIST_CHUNK, GROUP_M=_GROUP_M,
            **_launch_meta(grad_out.device),
        )
    return out


# ------------------------------------------------------------------------------------------------ reference

def reference_masked_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                            mask: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Y = x @ (weight * mask)^T + bias in `dtype` (float64 by default), any leading batch dims."""
    w = weight.to(dtype) * mask.to(dtype)
    y = x.to(dtype) @ w.t()
    if bias is not None:
        y = y + bias.to(dtype)
    return y


def reference_masked_linear_grads(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                                  mask: torch.Tensor, grad_out: torch.Tensor, dtype: torch.dtype = torch.float64
                                  ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """(dX, dW, db) of `reference_masked_linear` for upstream gradient grad_out, in `dtype`.

    dX = dY @ (W*M), dW = (dY^T @ X) * M, db = dY summed over all rows; x / grad_out may have batch dims.
    """
    k = x.shape[-1]
    n = weight.shape[0]
    x2 = x.reshape(-1, k).to(dtype)
    g2 = grad_out.reshape(-1, n).to(dtype)
    m = mask.to(dtype)
    dx = (g2 @ (weight.to(dtype) * m)).reshape(x.shape)
    dw = (g2.t() @ x2) * m
    db = g2.sum(0) if bias is not None else None
    return dx, dw, db
