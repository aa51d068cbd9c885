"""Masked Conv2d: implicit-GEMM Triton kernels that skip pruned weight tiles, launchers, a float64 reference.

GEMM view (docs/architecture.md, "The engine (fastticket/sparse, kernels)"). With X [N, C_in, H, W], W [C_out, C_in, kh, kw], Y [N, C_out, H_out, W_out]:

    M = N * H_out * W_out   output pixels (rows)
    N = C_out               output channels (columns)
    K = kh * kw * C_in      tap-major: k = (r * kw + s) * C_in + c_in, so a run of C_in consecutive k is one
                            filter tap's input channels, contiguous in NHWC (channels_last) memory

The tile map is therefore built over the filter permuted to [C_out, kh, kw, C_in] (build_tile_map(...,
k_order="tap_major"); the layer caches it per mask change like any tile map), while the mask buffer keeps
the filter's own layout (it is the layer's public weight_mask). When C_in is a multiple of BK every K tile
lies inside one tap ("tap-aligned"): its gather is BLOCK_M runs of BK contiguous channels with one bounds
bit per pixel, which an sm_90 compile turns into 16-byte async copies (cp.async) for NHWC inputs. Otherwise
(e.g. a 3-channel first layer) a K tile mixes taps and each element gets its own tap and bounds test.
No im2col buffer is ever materialised: every kernel gathers its input patch from X on the fly, with
stride, padding ('same' included) and dilation, out-of-image taps masked to zero.

- forward: one program per (pixel tile, C_out tile); it loops over the live K tiles of its C_out tile-row
  (CSR row_ptr/col_idx) only, the list staged in registers as in kernels/masked_linear.py (so num_stages
  buffers are in flight); bias fused in the epilogue. Every output element is written, also for a
  tile-row with no live tile (then Y = bias), so an output poisoned before the launch comes back clean.
  A contiguous NCHW output is addressed as one run per channel plane (FLAT_OUT), so the compiler can
  prove contiguity along pixels, stage the MMA tile through shared memory and store vectors; Triton
  exposes no explicit shared-memory staging, the tests check the vector stores in the sm_90 compile.
- dX, tap-aligned (C_in % BK == 0): an implicit GEMM over input pixels. One program per (input-pixel tile,
  C_in tile) sums over the filter taps: dY gathered at the output pixel the tap maps the input pixel to
  (none where the stride skips it or it falls outside) times W[live C_out tiles, tap, C_in tile]; the
  tap's K tile is tap * (C_in / BK) + C_in tile, whose live C_out tiles the transposed lists (col_ptr /
  row_idx) name. Every dX element is written exactly once: no atomics, no zeroing, deterministic.
  Strided layers waste the MMA rows of input pixels a tap does not reach (1 - 1/stride^2 of them).
- dX otherwise: "GEMM then col2im": one program per (pixel tile, K tile) computes dCols = dY[pixels, live
  C_out tiles] @ W[live C_out tiles, K tile] and scatters it into dX with fp32 atomic adds (about
  live_fraction * kh * kw adds per dX element, nondeterministic order); a 1x1 filter maps every (pixel, k)
  to a distinct input element and stores without atomics.
- dW = (dY^T @ cols(X)) * M: one program per live tile (COO list), optionally split over M with fp32
  atomics to fill the GPU; the element mask is applied in the epilogue; dead tiles are never written.
- dbias: one reduction of dY over (N, H_out, W_out).

Autograd and the choice between these kernels and dense cuDNN live in fastticket/sparse/conv.py (the
kernels implement groups == 1 only).

Memory formats: NCHW and channels_last inputs (and weights) are read through their strides; the output
and dX use the input's memory format (channels_last if X or W is, as cuDNN does). dtypes: fp32 (IEEE, or
TF32 when torch.backends.cudnn.allow_tf32 is set, as for cuDNN), bf16 and fp16, all with fp32 accumulation.
Autotuning (CUDA only) keys on the problem size and the bucketed live fraction; under the interpreter a fixed
small configuration runs. The GPU build of every kernel is checked without a GPU by compiling for sm_90
(tests/test_masked_conv2d_kernels.py); GPU numerics and speed are checked only where a GPU is present.
"""
from __future__ import annotations

import warnings
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
import triton

from fastticket.kernels._common import (device_guard, dot_input_precision, first_config_only,
                                        interpreter_active, live_bucket,
                                        next_power_of_2, sm_count)
from fastticket.kernels.conv_geometry import ConvGeometry, IntPair, Padding, conv_geometry
from fastticket.kernels.tile_map import TileMap
from fastticket.kernels._masked_conv2d_jit import (_MAX_BITMASK_TAPS, _conv2d_dw_kernel, _conv2d_dx_gather_kernel,
                                                    _conv2d_dx_kernel, _conv2d_fwd_kernel)

__all__ = [
    "ConvGeometry", "conv_geometry", "conv2d_tile_sizes", "conv2d_forward", "conv2d_grad_input",
    "conv2d_grad_weight", "reference_masked_conv2d",
    "reference_masked_conv2d_grads", "tile_map_expand",
]

# Interpreter-only tiles: small enough that test layers (<= 16 channels) have several tiles per dimension,
# so tile skipping and the transposed lists are exercised. tl.dot on a GPU needs every dim >= 16, which
# conv2d_tile_sizes guarantees off the interpreter.
_INTERPRETER_TILE = (8, 16)
_INTERPRETER_BLOCK_M = 64
# Live-list entries the forward and dX programs stage in registers at a time (see _conv2d_fwd_kernel).
_LIST_CHUNK = 64


def conv2d_tile_sizes(c_out: int, k: int, dtype: torch.dtype, device: torch.device) -> Tuple[int, int]:
    """(BN, BK): the weight tile the kernels skip by, i.e. the tile map the layer must provide.

    Fixed per layer shape (not autotuned), because the tile map, and with it the dispatch decision, depends
    on it. 64 x 32 on the GPU: every gathered input element carries its own address and bounds bit, and
    with BK = 64 ptxas (sm_90) spills registers in every launch configuration; with BK = 32 the forward,
    dX and dW kernels compile without spills at BLOCK_M = 128 / 8 warps and 64 / 4 warps. A `block:64x64`
    mask is two whole tiles. Narrow layers get narrower tiles so little of a tile is padding.
    """
    if interpreter_active() or device.type != "cuda":
        return _INTERPRETER_TILE
    return (min(64, max(16, next_power_of_2(c_out))), min(32, max(16, next_power_of_2(k))))


def _wants_channels_last(*tensors: torch.Tensor) -> bool:
    # cuDNN's rule: the result is channels_last when the input or the weight is (and not plain contiguous).
    return any(t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)
               for t in tensors)


def _memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


# ------------------------------------------------------------------------------ CUDA autotuning (lazy)

def _cuda_configs() -> list:
    # BLOCK_M 128 needs 8 warps and 64 needs 4 to stay clear of register spills (checked with ptxas, sm_90).
    # No 2-stage configs: with the live lists staged in registers, num_stages buffers are in flight, and
    # fewer than 3 cannot hide a gather's latency.
    shapes = [(64, 4, 3), (64, 4, 4), (128, 8, 3), (128, 8, 4)]
    return [triton.Config({"BLOCK_M": bm}, num_warps=warps, num_stages=stages) for bm, warps, stages in shapes]


def _prune_configs(configs, named_args, **kwargs):
    """Drop 128-row programs where the output has under 256 rows (mostly padding, as the linear kernels'
    pruning does), then apply FASTTICKET_FIRST_CONFIG (_common.first_config_only)."""
    m = named_args["M_in"] if "M_in" in named_args else named_args["M"]
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= 64 or c.kwargs["BLOCK_M"] * 2 <= m]
    return first_config_only(kept or configs)


_AUTOTUNED: dict = {}


def _kernel(name: str, atomic: bool = False):
    """The kernel to launch: autotuned over BLOCK_M / warps / stages on CUDA, the plain jit function under the
    interpreter. BN/BK are never tuned: they are the tile map's tile. Keys include the bucketed live fraction
    (_common.live_bucket) so a much sparser layer gets its own config without re-tuning every IMP level."""
    raw = {"fwd": _conv2d_fwd_kernel, "dx": _conv2d_dx_kernel, "dx_gather": _conv2d_dx_gather_kernel,
           "dw": _conv2d_dw_kernel}[name]
    if interpreter_active():
        return raw
    tag = (name, atomic)
    if tag not in _AUTOTUNED:
        key = ["M_in" if name == "dx_gather" else "M", "C_in", "C_out", "H_out", "W_out", "LIVE_BUCKET", "KH", "KW"]
        if name == "dw":
            key = key + ["m_per_split"]
        # Atomic outputs must start from zero for every timed run and again before the real one. Plain stores
        # are idempotent and get no reset, so dead tiles of a caller's dW buffer are never touched.
        zero = {"dx": ["dx_ptr"], "dw": ["dw_ptr"]}.get(name) if atomic else None
        _AUTOTUNED[tag] = triton.autotune(configs=_cuda_configs(), key=key, reset_to_zero=zero,
                                          prune_configs_by={"early_config_prune": _prune_configs})(raw)
    return _AUTOTUNED[tag]


def _launch_meta() -> dict:
    return {"BLOCK_M": _INTERPRETER_BLOCK_M} if interpreter_active() else {}


def _grid_m(m: int, other: int):
    if interpreter_active():
        return (triton.cdiv(m, _INTERPRETER_BLOCK_M), other)
    return lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), other)


def _check_tile_map(tile_map: TileMap, c_out: int, k: int) -> Tuple[int, int]:
    if tile_map.k_order != "tap_major":
        raise ValueError(f"the conv kernels need a tile map of the filter in tap-major K order "
                         f"(build_tile_map(mask, bn, bk, k_order='tap_major')), got k_order={tile_map.k_order!r}")
    if tuple(tile_map.shape) != (c_out, k):
        raise ValueError(f"tile map is for a [{tile_map.shape[0]}, {tile_map.shape[1]}] weight, the filter is "
                         f"[{c_out}, {k}] (C_out x kh*kw*C_in)")
    return tile_map.block


def _flat_nchw(t: torch.Tensor) -> bool:
    """Plain contiguous NCHW (the epilogues then address a pixel tile as one run per channel plane)."""
    return t.is_contiguous()


def _needs_i64(*tensors: torch.Tensor) -> bool:
    """True when some element offset of these tensors (or a padding tap next to one) may pass int32."""
    span = max(sum((size - 1) * abs(step) for size, step in zip(t.shape, t.stride())) if t.numel() else 0
               for t in tensors)
    return span >= 2 ** 31 - 2 ** 24  # margin for the negative offsets of padding taps, which are masked


def _check_out(out: torch.Tensor, shape: Tuple[int, ...], dtype: torch.dtype, device: torch.device, what: str) -> None:
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or out.device != device:
        raise ValueError(f"{what} out= must be {tuple(shape)} {dtype} on {device}, "
                         f"got {tuple(out.shape)} {out.dtype} on {out.device}")


# ------------------------------------------------------------------------------------------- launchers

def conv2d_forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], tile_map: TileMap,
                   stride: IntPair = 1, padding: Padding = 0, dilation: IntPair = 1, *,
                   out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Y = conv2d(X, W) + b over the live tiles of `tile_map` only (exact when dead tiles of W are zero).

    `out` (optional) receives Y; every element is written. Without it Y is allocated in X's memory format.
    """
    n, c_in, h, w = x.shape
    c_out, _, kh, kw = weight.shape
    if x.dtype != weight.dtype or (bias is not None and bias.dtype != x.dtype):
        raise TypeError(f"conv2d_forward needs matching dtypes, got input {x.dtype}, weight {weight.dtype}")
    geom = conv_geometry((h, w), (kh, kw), stride, padding, dilation)
    bn, bk = _check_tile_map(tile_map, c_out, c_in * kh * kw)
    h_out, w_out = geom.out_hw
    if out is None:
        out = torch.empty((n, c_out, h_out, w_out), device=x.device, dtype=x.dtype,
                          memory_format=_memory_format(_wants_channels_last(x, weight)))
    else:
        _check_out(out, (n, c_out, h_out, w_out), x.dtype, x.device, "conv2d_forward")
    m = n * h_out * w_out
    if m == 0:
        return out
    with device_guard(out):
        _kernel("fwd")[_grid_m(m, tile_map.tiles[0])](
            x, weight, bias if bias is not None else x, out, tile_map.row_ptr, tile_map.col_idx,
            m, c_in, h, w, c_out, h_out, w_out, live_bucket(tile_map.live_fraction),
            *x.stride(), *weight.stride(), *out.stride(),
            *geom.stride, *geom.pad, *geom.dilation,
            KH=kh, KW=kw, HAS_BIAS=bias is not None, INDEX_I64=_needs_i64(x, out),
            # tap-aligned tiles test bounds per pixel: no bitmask to build
            USE_BITS=kh * kw <= _MAX_BITMASK_TAPS and c_in % bk != 0, TAP_ALIGNED=c_in % bk == 0,
            FLAT_OUT=_flat_nchw(out), LIST_CHUNK=_LIST_CHUNK, BLOCK_N=bn, BLOCK_K=bk,
            INPUT_PRECISION=dot_input_precision(x.dtype, "cudnn"), **_launch_meta(),
        )
    return out


def conv2d_grad_input(grad_out: torch.Tensor, weight: torch.Tensor, tile_map: TileMap,
                      input_shape: Sequence[int], stride: IntPair = 1, padding: Padding = 0,
                      dilation: IntPair = 1, *, channels_last: Optional[bool] = None,
                      out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """dX = conv_transpose2d(dY, W) over the transposed live-tile lists (see the module docstring).

    `out` (optional, X's shape and dtype) is zeroed here and receives dX. 3x3 and larger filters accumulate
    in an fp32 buffer with atomic adds (directly in `out` when it is fp32).
    """
    n, c_in, h, w = (int(v) for v in input_shape)
    c_out, _, kh, kw = weight.shape
    geom = conv_geometry((h, w), (kh, kw), stride, padding, dilation)
    bn, bk = _check_tile_map(tile_map, c_out, c_in * kh * kw)
    h_out, w_out = geom.out_hw
    if tuple(grad_out.shape) != (n, c_out, h_out, w_out):
        raise ValueError(f"grad_out is {tuple(grad_out.shape)}, expected {(n, c_out, h_out, w_out)}")
    if channels_last is None:
        channels_last = _wants_channels_last(grad_out, weight)
    fmt = _memory_format(channels_last)
    if out is None:
        out = torch.empty((n, c_in, h, w), device=grad_out.device, dtype=weight.dtype, memory_format=fmt)
    else:
        _check_out(out, (n, c_in, h, w), weight.dtype, grad_out.device, "conv2d_grad_input")
    grad_out = grad_out.to(weight.dtype)
    if c_in % bk == 0 and n * h * w > 0 and tile_map.n_live > 0:
        # Per-tap gather: every dX element written once, no atomics, no zeroing (see the kernel).
        m_in = n * h * w
        with device_guard(out):
            _kernel("dx_gather")[_grid_m(m_in, c_in // bk)](
                grad_out, weight, out, tile_map.col_ptr, tile_map.row_idx,
                m_in, c_in, h, w, c_out, h_out, w_out, live_bucket(tile_map.live_fraction),
                *grad_out.stride(), *weight.stride(), *out.stride(),
                *geom.stride, *geom.pad, *geom.dilation,
                KH=kh, KW=kw, INDEX_I64=_needs_i64(grad_out, out), FLAT_OUT=_flat_nchw(out),
                LIST_CHUNK=_LIST_CHUNK, BLOCK_N=bn, BLOCK_K=bk,
                INPUT_PRECISION=dot_input_precision(weight.dtype, "cudnn"), **_launch_meta(),
            )
        return out
    # Otherwise (C_in not a multiple of BK: a K tile mixes taps) "GEMM then col2im" with atomic adds.
    # Distinct (pixel, k) pairs of a 1x1 filter hit distinct input elements, so plain stores are race-free.
    atomic = (kh, kw) != (1, 1)
    acc = out if (not atomic or out.dtype == torch.float32) else torch.empty_like(out, dtype=torch.float32)
    acc.zero_()  # padding-only / stride-skipped input pixels and dead K tiles receive nothing
    m = n * h_out * w_out
    if m == 0 or tile_map.n_live == 0:
        return out.zero_()
    with device_guard(out):
        _kernel("dx", atomic)[_grid_m(m, tile_map.tiles[1])](
            grad_out, weight, acc, tile_map.col_ptr, tile_map.row_idx,
            m, c_in, h, w, c_out, h_out, w_out, live_bucket(tile_map.live_fraction),
            *grad_out.stride(), *weight.stride(), *acc.stride(),
            *geom.stride, *geom.pad, *geom.dilation,
            KH=kh, KW=kw, ATOMIC=atomic, INDEX_I64=_needs_i64(grad_out, acc), BLOCK_N=bn, BLOCK_K=bk,
            INPUT_PRECISION=dot_input_precision(weight.dtype, "cudnn"), **_launch_meta(),
        )
    if acc is not out:
        out.copy_(acc)
    return out


def _default_split_m(m: int, n_live: int, device: torch.device) -> int:
    """How many programs share one dW tile's M reduction: enough to fill the GPU when few tiles are live."""
    if interpreter_active() or device.type != "cuda":
        return 1
    want = triton.cdiv(4 * sm_count(device.index or 0), max(1, n_live))
    # Each split should still loop over several BLOCK_M chunks, or the atomics dominate.
    return max(1, min(want, triton.cdiv(m, 1024)))


def conv2d_grad_weight(x: torch.Tensor, grad_out: torch.Tensor, mask: torch.Tensor, tile_map: TileMap,
                       stride: IntPair = 1, padding: Padding = 0, dilation: IntPair = 1, *,
                       out: Optional[torch.Tensor] = None, split_m: Optional[int] = None) -> torch.Tensor:
    """dW = (dY^T @ cols(X)) * mask, computed and written for the live tiles of `tile_map` only.

    Without `out`, dW is a fresh zero tensor shaped (and strided) like `mask`, its dtype X's. With `out`,
    dead tiles of `out` are left untouched (the caller's zeros stay zeros: the invariant says they must be)
    and every element of a live tile is written. `split_m > 1` (default on CUDA: enough programs to fill
    the GPU) splits each tile's reduction over output pixels across programs that add into an fp32 buffer
    with atomics; `split_m == 1` is deterministic.
    """
    n, c_in, h, w = x.shape
    c_out, _, kh, kw = mask.shape
    geom = conv_geometry((h, w), (kh, kw), stride, padding, dilation)
    bn, bk = _check_tile_map(tile_map, c_out, c_in * kh * kw)
    h_out, w_out = geom.out_hw
    if tuple(grad_out.shape) != (n, c_out, h_out, w_out):
        raise ValueError(f"grad_out is {tuple(grad_out.shape)}, expected {(n, c_out, h_out, w_out)}")
    fresh = out is None
    if fresh:
        out = torch.zeros_like(mask, dtype=x.dtype, device=x.device,
                               memory_format=_memory_format(_wants_channels_last(mask)))
    else:
        _check_out(out, tuple(mask.shape), x.dtype, x.device, "conv2d_grad_weight")
    m = n * h_out * w_out
    if tile_map.n_live == 0:
        return out
    if m == 0:
        # Empty batch: the gradient is zero, live tiles included.
        return out.masked_fill_(tile_map_expand(tile_map, mask.shape, out.device), 0.0)
    grad_out = grad_out.to(x.dtype)
    split = _default_split_m(m, tile_map.n_live, x.device) if split_m is None else max(1, int(split_m))
    split = min(split, m)
    m_per_split = triton.cdiv(m, split)
    split = triton.cdiv(m, m_per_split)
    atomic = split > 1
    acc = out
    if atomic and not (fresh and out.dtype == torch.float32):
        # Atomics need a zeroed fp32 buffer (which the CUDA autotuner also re-zeroes between timed runs); a
        # caller's buffer only receives the live tiles from it.
        acc = torch.zeros_like(out, dtype=torch.float32)
    mask_bytes = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
    with device_guard(out):
        _kernel("dw", atomic)[(tile_map.n_live, split)](
            x, grad_out, mask_bytes, acc, tile_map.coo_rows, tile_map.coo_cols,
            m, c_in, h, w, c_out, h_out, w_out, m_per_split, live_bucket(tile_map.live_fraction),
            *x.stride(), *grad_out.stride(), *mask_bytes.stride(), *acc.stride(),
            *geom.stride, *geom.pad, *geom.dilation,
            KH=kh, KW=kw, ATOMIC=atomic, INDEX_I64=_needs_i64(x, grad_out),
            USE_BITS=kh * kw <= _MAX_BITMASK_TAPS, TAP_ALIGNED=c_in % bk == 0, BLOCK_N=bn, BLOCK_K=bk,
            INPUT_PRECISION=dot_input_precision(x.dtype, "cudnn"), **_launch_meta(),
        )
    if acc is not out:
        live = tile_map_expand(tile_map, mask.shape, out.device)
        out.copy_(torch.where(live, acc.to(out.dtype), out))
    return out


def tile_map_expand(tile_map: TileMap, shape: Sequence[int], device: torch.device) -> torch.Tensor:
    """bool tensor of the weight's shape: True on elements inside a live tile."""
    bn, bk = tile_map.block
    c_out, k = tile_map.shape
    live = tile_map.live.to(device).repeat_interleave(bn, 0).repeat_interleave(bk, 1)[:c_out, :k]
    if tile_map.k_order == "tap_major":
        # The map's K is (kh, kw, C_in); the weight's layout is (C_in, kh, kw).
        c_out, c_in, kh, kw = (int(v) for v in shape)
        return live.reshape(c_out, kh, kw, c_in).permute(0, 3, 1, 2)
    return live.reshape(tuple(shape))


# ------------------------------------------------------------------------------------------- reference

def reference_masked_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                            mask: torch.Tensor, stride: IntPair = 1, padding: Padding = 0, dilation: IntPair = 1,
                            groups: int = 1, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """conv2d(X, W * M) + b in `dtype` (float64 by default): the math every kernel here must reproduce."""
    w = weight.to(dtype) * (mask != 0).to(dtype)
    b = bias.to(dtype) if bias is not None else None
    return F.conv2d(x.to(dtype), w, b, stride, padding, dilation, groups)


def reference_masked_conv2d_grads(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                                  mask: torch.Tensor, grad_out: torch.Tensor, stride: IntPair = 1,
                                  padding: Padding = 0, dilation: IntPair = 1, groups: int = 1,
                                  dtype: torch.dtype = torch.float64):
    """(Y, dX, dW, db) by float64 autograd through F.conv2d; dW masked, db None without a bias."""
    x_r = x.detach().to(dtype).requires_grad_(True)
    w_r = weight.detach().to(dtype).requires_grad_(True)
    b_r = bias.detach().to(dtype).requires_grad_(True) if bias is not None else None
    keep = (mask != 0).to(dtype)
    with warnings.catch_warnings():
        # 'same' with an even receptive field pads a copy of the input in float64; fine for a reference.
        warnings.filterwarnings("ignore", message="Using padding='same'")
        y = F.conv2d(x_r, w_r * keep, b_r, stride, padding, dilation, groups)
        y.backward(grad_out.to(dtype))
    grad_w = w_r.grad * keep  # d(W*M)/dW = M already; this keeps the reference explicit about masking
    return y.detach(), x_r.grad, grad_w, (b_r.grad if b_r is not None else None)
