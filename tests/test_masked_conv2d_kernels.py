"""Masked Conv2d kernels against a float64 F.conv2d reference: forward, dX, dW, dbias.

Kernels run on the GPU when there is one, else in the Triton interpreter (tests/conftest.py), so shapes are
small and the cases a representative cross-section (kernel 1x1/3x3/5x5, stride 1/2, padding 0/1/'same'/
'valid', dilation 1/2, odd spatial sizes, element/block/all-dead/all-live masks, channels_last) rather than
their cartesian product.
"""
from __future__ import annotations

import math

import pytest
import torch

from fastticket.kernels.masked_conv2d import (
    conv2d_forward, conv2d_grad_input, conv2d_grad_weight, conv2d_tile_sizes, conv_geometry,
    reference_masked_conv2d_grads, tile_map_expand,
)
from fastticket.sparse.conv import masked_conv2d
import fastticket.kernels.masked_conv2d as masked_conv2d_module
from fastticket.kernels.tile_map import TileMapCache, build_tile_map
from fastticket.sparse.testing import rel_error
from sm90 import Expect, assert_properties

FP32_TOL = 1e-5
HALF_TOL = 1e-2


@pytest.fixture(autouse=True)
def ieee_fp32(monkeypatch):
    # The fp32 bound is for IEEE products; on a GPU cuDNN's TF32 default would make the kernels round like TF32.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


def make_mask(kind: str, shape, tile, gen: torch.Generator) -> torch.Tensor:
    """element: ~45% of entries live; block: whole (BN x BK) tiles of the [C_out, kh*kw*C_in] view dead or alive
    (with at least one of each), live tiles themselves element-pruned so the dW epilogue mask matters."""
    c_out = shape[0]
    k = math.prod(shape[1:])
    if kind == "live":
        return torch.ones(shape, dtype=torch.bool)
    if kind == "dead":
        return torch.zeros(shape, dtype=torch.bool)
    if kind == "element":
        return torch.rand(shape, generator=gen) < 0.45
    assert kind == "block"
    bn, bk = tile
    tn, tk = -(-c_out // bn), -(-k // bk)
    live = torch.rand(tn, tk, generator=gen) < 0.5
    live.view(-1)[0], live.view(-1)[-1] = True, False
    dense = live.repeat_interleave(bn, 0).repeat_interleave(bk, 1)[:c_out, :k]
    inside = torch.rand(c_out, k, generator=gen) < 0.8
    # The tiles are those of the kernels' tap-major K order (kh, kw, C_in); the mask keeps the filter's layout.
    _, c_in, kh, kw = shape
    return (dense & inside).reshape(c_out, kh, kw, c_in).permute(0, 3, 1, 2).contiguous()


def make_case(n, c_in, c_out, hw, kernel, mask_kind, seed, dtype=torch.float32, device="cpu", bias=True):
    gen = torch.Generator().manual_seed(seed)
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    x = torch.randn(n, c_in, *hw, generator=gen)
    tile = conv2d_tile_sizes(c_out, c_in * kh * kw, dtype, torch.device(device))
    mask = make_mask(mask_kind, (c_out, c_in, kh, kw), tile, gen)
    # The zero invariant: pruned weights are exactly zero in storage.
    weight = torch.randn(c_out, c_in, kh, kw, generator=gen) * mask
    b = torch.randn(c_out, generator=gen) if bias else None
    to = dict(device=device, dtype=dtype)
    return (x.to(**to), weight.to(**to), b.to(**to) if b is not None else None, mask.to(device), tile)


# (batch, C_in, C_out, (H, W), kernel, stride, padding, dilation, mask, bias)
CASES = [
    (2, 6, 12, (7, 9), 3, 1, 1, 1, "block", True),
    (2, 5, 12, (9, 7), 3, 2, 0, 2, "element", True),
    (1, 4, 10, (7, 9), 5, 1, "same", 1, "block", True),
    (3, 16, 16, (7, 5), 1, 2, 0, 1, "block", True),
    (2, 16, 9, (5, 7), 1, 1, 0, 1, "element", False),
    (2, 6, 12, (8, 9), 3, 1, "same", 2, "block", False),
    (3, 3, 8, (9, 9), 5, 2, 1, 1, "element", True),
    (2, 4, 12, (7, 9), 3, 2, "valid", 1, "live", True),
    (2, 4, 12, (7, 9), 3, 1, 1, 1, "dead", True),
    (2, 6, 12, (7, 8), (1, 3), (2, 1), (0, 1), (1, 2), "block", True),
    (2, 3, 12, (6, 9), (2, 4), 1, "same", 1, "element", True),  # even kernel: asymmetric 'same' padding
    (1, 2, 10, (9, 8), 7, 2, 3, 1, "block", True),  # 49 taps: bounds tested per element, not by bitmask
    # C_in a multiple of BK (16 here): tap-aligned K tiles, forward / dW gather one tap per tile and dX runs
    # as the per-tap gather (no atomics, every element written: the NaN-poisoned dX proves it).
    (2, 16, 12, (7, 9), 3, 1, 1, 1, "block", True),
    (2, 32, 10, (9, 7), 3, 2, 1, 2, "element", False),
    (1, 16, 12, (6, 7), 1, 2, 0, 1, "block", True),   # stride 2, 1x1: input pixels no output reads get 0
    (2, 16, 12, (7, 8), 5, 1, "same", 1, "dead", True),
    (2, 16, 8, (7, 9), (2, 3), (2, 1), (1, 0), (1, 2), "live", True),
]


def _ids(case):
    n, ci, co, hw, k, s, p, d, m, b = case
    return f"k{k}-s{s}-p{p}-d{d}-{m}-{hw[0]}x{hw[1]}" + ("" if b else "-nobias")


@pytest.mark.launches_triton
@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
def test_launchers_match_float64_reference(case, device):
    n, c_in, c_out, hw, kernel, stride, padding, dilation, mask_kind, bias = case
    x, weight, b, mask, tile = make_case(n, c_in, c_out, hw, kernel, mask_kind, seed=CASES.index(case),
                                         device=device, bias=bias)
    tile_map = build_tile_map(mask, *tile, k_order="tap_major")
    geom = conv_geometry(hw, weight.shape[2:], stride, padding, dilation)
    gen = torch.Generator().manual_seed(7)
    grad_out = torch.randn(n, c_out, *geom.out_hw, generator=gen).to(device)
    y_ref, dx_ref, dw_ref, db_ref = reference_masked_conv2d_grads(x, weight, b, mask, grad_out, stride, padding,
                                                                  dilation)

    y = torch.full_like(y_ref, float("nan"), dtype=x.dtype)
    conv2d_forward(x, weight, b, tile_map, stride, padding, dilation, out=y)
    assert rel_error(y, y_ref) < FP32_TOL

    dx = torch.full_like(x, float("nan"))
    conv2d_grad_input(grad_out, weight, tile_map, x.shape, stride, padding, dilation, out=dx)
    assert rel_error(dx, dx_ref) < FP32_TOL

    # dW, single program per live tile: live tiles poisoned with NaN must be fully written; dead tiles hold a
    # sentinel that must survive, proving they are never written.
    live = tile_map_expand(tile_map, weight.shape, device)
    dw = torch.where(live, torch.full_like(weight, float("nan")), torch.full_like(weight, 7.0))
    conv2d_grad_weight(x, grad_out, mask, tile_map, stride, padding, dilation, out=dw, split_m=1)
    assert torch.all(dw[~live] == 7.0)
    assert rel_error(torch.where(live, dw, 0.0), dw_ref) < FP32_TOL
    assert torch.all(dw[live & ~mask] == 0.0)  # the element mask of the epilogue

    # dW split over output pixels (atomic adds): the path large GPUs take when few tiles are live.
    dw_split = conv2d_grad_weight(x, grad_out, mask, tile_map, stride, padding, dilation, split_m=3)
    assert rel_error(dw_split, dw_ref) < FP32_TOL
    assert torch.all(dw_split[~mask] == 0.0)
    dw_split_out = torch.where(live, torch.full_like(weight, float("nan")), torch.full_like(weight, 7.0))
    conv2d_grad_weight(x, grad_out, mask, tile_map, stride, padding, dilation, out=dw_split_out, split_m=2)
    assert torch.all(dw_split_out[~live] == 7.0)
    assert rel_error(torch.where(live, dw_split_out, 0.0), dw_ref) < FP32_TOL

    if mask_kind == "dead":
        assert tile_map.n_live == 0 and torch.all(y == b.view(1, -1, 1, 1)) and torch.all(dx == 0)
    if mask_kind == "block":
        assert 0 < tile_map.n_live < tile_map.n_tiles  # the case really skips tiles


def _autograd_run(x, weight, b, mask, tile_maps, grad_out, stride, padding, dilation, groups=1):
    x = x.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    bb = b.detach().clone().requires_grad_(True) if b is not None else None
    y = masked_conv2d(x, w, bb, mask, tile_maps, stride, padding, dilation, groups)
    y.backward(grad_out)
    return y, x.grad, w.grad, (bb.grad if bb is not None else None)


ENTRY_CASES = [
    # (batch, C_in, C_out, (H, W), kernel, stride, padding, dilation, mask)
    (2, 6, 12, (7, 9), 3, 2, 1, 1, "block"),
    (3, 5, 10, (9, 7), 5, 1, "same", 2, "element"),
    (2, 4, 12, (7, 9), 3, 1, 1, 1, "dead"),
]


@pytest.mark.launches_triton
def test_default_dispatch_sends_every_conv_layer_to_cudnn(device, monkeypatch):
    """Until a GPU measures a crossover, the conv threshold is 0: even one live tile out of many runs cuDNN
    (kernels/dispatch.py), while the benchmark's forced path still reaches the kernels."""
    from fastticket.app.bench import conv as conv_suite
    from fastticket.kernels.dispatch import DENSE_THRESHOLDS, use_tile_skipping

    monkeypatch.delenv("FASTTICKET_DENSE_THRESHOLD_CONV2D", raising=False)
    assert DENSE_THRESHOLDS["conv2d"] == 0.0
    x, weight, b, mask, _ = make_case(2, 8, 24, (7, 9), 3, "block", seed=5, device=device)
    cache = TileMapCache()
    tile_maps = lambda bn, bk, k_order="mask": cache.get(mask, bn, bk, 0, k_order)  # noqa: E731
    sparse = mask.clone()
    sparse[1:] = False  # a single output channel keeps weights: one live tile-row
    weight = weight * sparse
    cache_sparse = TileMapCache()
    sparse_maps = lambda bn, bk, k_order="mask": cache_sparse.get(sparse, bn, bk, 0, k_order)  # noqa: E731
    for m, maps in ((mask, tile_maps), (sparse, sparse_maps)):
        w = weight.clone().requires_grad_(True)
        y = masked_conv2d(x, w, b, m, maps, 1, 1, 1)
        assert "MaskedConv2dFunction" not in type(y.grad_fn).__name__
    with conv_suite.forced_skip():
        assert use_tile_skipping(1.0, "conv2d")
        w = weight.clone().requires_grad_(True)
        y = masked_conv2d(x, w, b, sparse, sparse_maps, 1, 1, 1)
        assert "MaskedConv2dFunction" in type(y.grad_fn).__name__


@pytest.mark.launches_triton
@pytest.mark.parametrize("path,threshold", [("skip", "1.01"), ("dense", "0.0")])
@pytest.mark.parametrize("case", ENTRY_CASES, ids=lambda c: f"k{c[4]}-s{c[5]}-p{c[6]}-d{c[7]}-{c[8]}")
def test_autograd_entry_point_both_dispatch_paths(case, path, threshold, device, monkeypatch):
    monkeypatch.setenv("FASTTICKET_DENSE_THRESHOLD_CONV2D", threshold)
    n, c_in, c_out, hw, kernel, stride, padding, dilation, mask_kind = case
    x, weight, b, mask, _ = make_case(n, c_in, c_out, hw, kernel, mask_kind, seed=11, device=device)
    cache = TileMapCache()
    geom = conv_geometry(hw, weight.shape[2:], stride, padding, dilation)
    grad_out = torch.randn(n, c_out, *geom.out_hw, generator=torch.Generator().manual_seed(3)).to(device)
    y, dx, dw, db = _autograd_run(x, weight, b, mask, lambda bn, bk, k_order="mask": cache.get(mask, bn, bk, k_order=k_order), grad_out,
                                  stride, padding, dilation)
    refs = reference_masked_conv2d_grads(x, weight, b, mask, grad_out, stride, padding, dilation)
    for got, ref in zip((y, dx, dw, db), refs):
        assert rel_error(got, ref) < FP32_TOL
    assert torch.all(dw[~mask] == 0.0)
    # The env threshold really picked the path: the kernels' Function or cuDNN's convolution node.
    assert ("MaskedConv2dFunction" in type(y.grad_fn).__name__) == (path == "skip")


@pytest.mark.launches_triton
def test_channels_last_in_and_out(device, monkeypatch):
    monkeypatch.setenv("FASTTICKET_DENSE_THRESHOLD_CONV2D", "1.01")
    x, weight, b, mask, tile = make_case(2, 6, 12, (7, 9), 3, "block", seed=5, device=device)
    x = x.contiguous(memory_format=torch.channels_last)
    grad_out = torch.randn(2, 4, 5, 12, generator=torch.Generator().manual_seed(1)).to(device).permute(0, 3, 1, 2)
    cache = TileMapCache()
    y, dx, dw, db = _autograd_run(x, weight, b, mask, lambda bn, bk, k_order="mask": cache.get(mask, bn, bk, k_order=k_order), grad_out, 2, 1, 1)
    assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
    assert dx.is_contiguous(memory_format=torch.channels_last)
    refs = reference_masked_conv2d_grads(x, weight, b, mask, grad_out, 2, 1, 1)
    for got, ref in zip((y, dx, dw, db), refs):
        assert rel_error(got, ref) < FP32_TOL

    # A channels_last filter (what model.to(memory_format=channels_last) makes) read through its strides.
    weight_cl = weight.contiguous(memory_format=torch.channels_last)
    mask_cl = mask.contiguous(memory_format=torch.channels_last)
    tile_map = build_tile_map(mask_cl, *tile, k_order="tap_major")
    y2 = conv2d_forward(x.contiguous(), weight_cl, b, tile_map, 2, 1, 1)
    assert y2.is_contiguous(memory_format=torch.channels_last)
    assert rel_error(y2, refs[0]) < FP32_TOL
    dw2 = conv2d_grad_weight(x, grad_out, mask_cl, tile_map, 2, 1, 1)
    assert rel_error(dw2, refs[2]) < FP32_TOL


@pytest.mark.launches_triton
def test_channels_last_tap_aligned_paths(device, monkeypatch):
    """NHWC input, C_in a multiple of BK: forward and dW gather contiguous channel runs, dX is the per-tap
    gather (no atomics) and comes back channels_last; strided, padded and dilated."""
    monkeypatch.setenv("FASTTICKET_DENSE_THRESHOLD_CONV2D", "1.01")
    x, weight, b, mask, tile = make_case(2, 16, 12, (9, 8), 3, "block", seed=15, device=device)
    x = x.contiguous(memory_format=torch.channels_last)
    geom = conv_geometry((9, 8), (3, 3), 2, 2, 2)
    grad_out = torch.randn(2, *geom.out_hw, 12, generator=torch.Generator().manual_seed(4)).to(device).permute(0, 3, 1, 2)
    launched = []
    real_kernel = masked_conv2d_module._kernel
    monkeypatch.setattr(masked_conv2d_module, "_kernel", lambda name, *a: launched.append(name) or real_kernel(name, *a))
    cache = TileMapCache()
    y, dx, dw, db = _autograd_run(x, weight, b, mask, lambda bn, bk, k_order="mask": cache.get(mask, bn, bk, k_order=k_order),
                                  grad_out, 2, 2, 2)
    assert "dx_gather" in launched and "dx" not in launched
    assert y.is_contiguous(memory_format=torch.channels_last) and dx.is_contiguous(memory_format=torch.channels_last)
    refs = reference_masked_conv2d_grads(x, weight, b, mask, grad_out, 2, 2, 2)
    for got, ref in zip((y, dx, dw, db), refs):
        assert rel_error(got, ref) < FP32_TOL
    assert torch.all(dw[~mask] == 0.0)


def test_tile_map_in_mask_order_is_rejected(device):
    x, weight, b, mask, tile = make_case(1, 16, 12, (5, 5), 3, "block", seed=2, device=device)
    with pytest.raises(ValueError, match="tap-major"):
        conv2d_forward(x, weight, b, build_tile_map(mask, *tile), 1, 1, 1)


@pytest.mark.launches_triton
def test_fp16_with_fp32_accumulation(device, monkeypatch):
    monkeypatch.setenv("FASTTICKET_DENSE_THRESHOLD_CONV2D", "1.01")
    x, weight, b, mask, _ = make_case(2, 6, 12, (7, 9), 3, "block", seed=9, dtype=torch.float16, device=device)
    cache = TileMapCache()
    grad_out = torch.randn(2, 12, 7, 9, generator=torch.Generator().manual_seed(2)).to(device, torch.float16)
    y, dx, dw, db = _autograd_run(x, weight, b, mask, lambda bn, bk, k_order="mask": cache.get(mask, bn, bk, k_order=k_order), grad_out, 1, "same", 1)
    assert y.dtype == dx.dtype == dw.dtype == db.dtype == torch.float16
    refs = reference_masked_conv2d_grads(x, weight, b, mask, grad_out, 1, "same", 1)
    for got, ref in zip((y, dx, dw, db), refs):
        assert rel_error(got, ref) < HALF_TOL


@pytest.mark.launches_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 arithmetic needs a GPU (the interpreter has none)")
def test_bf16_with_fp32_accumulation(device, monkeypatch):
    monkeypatch.setenv("FASTTICKET_DENSE_THRESHOLD_CONV2D", "1.01")
    x, weight, b, mask, _ = make_case(4, 32, 96, (15, 13), 3, "block", seed=4, dtype=torch.bfloat16, device=device)
    cache = TileMapCache()
    grad_out = torch.randn(4, 96, 8, 7, device=device, dtype=torch.bfloat16)
    y, dx, dw, db = _autograd_run(x, weight, b, mask, lambda bn, bk, k_order="mask": cache.get(mask, bn, bk, k_order=k_order), grad_out, 2, 1, 1)
    refs = reference_masked_conv2d_grads(x, weight, b, mask, grad_out, 2, 1, 1)
    for got, ref in zip((y, dx, dw, db), refs):
        assert rel_error(got, ref) < HALF_TOL


@pytest.mark.launches_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="TF32 exists on GPUs only")
def test_tf32_follows_cudnn_flag(device, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    x, weight, b, mask, tile = make_case(4, 64, 128, (17, 15), 3, "block", seed=6, device=device)
    tile_map = build_tile_map(mask, *tile, k_order="tap_major")
    y = conv2d_forward(x, weight, b, tile_map, 1, 1, 1)
    assert rel_error(y, reference_masked_conv2d_grads(x, weight, b, mask, torch.ones_like(y), 1, 1, 1)[0]) < 1e-3


def test_groups_fall_back_to_cudnn_with_masked_weight_gradient(device, monkeypatch):
    monkeypatch.setenv("FASTTICKET_DENSE_THRESHOLD_CONV2D", "1.01")  # would pick the kernels if groups were 1
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(2, 6, 7, 9, generator=gen).to(device)
    mask = (torch.rand(8, 3, 3, 3, generator=gen) < 0.5).to(device)
    weight = torch.randn(8, 3, 3, 3, generator=gen).to(device) * mask
    b = torch.randn(8, generator=gen).to(device)
    grad_out = torch.randn(2, 8, 7, 9, generator=gen).to(device)
    cache = TileMapCache()
    got = _autograd_run(x, weight, b, mask, lambda bn, bk, k_order="mask": cache.get(mask, bn, bk, k_order=k_order), grad_out, 1, 1, 1, groups=2)
    refs = reference_masked_conv2d_grads(x, weight, b, mask, grad_out, 1, 1, 1, groups=2)
    for g, r in zip(got, refs):
        assert rel_error(g, r) < FP32_TOL
    assert torch.all(got[2][~mask] == 0.0)


def test_geometry_matches_conv2d_rules():
    assert conv_geometry((7, 9), (3, 3), 2, 1, 1).out_hw == (4, 5)
    same = conv_geometry((7, 8), (2, 4), 1, "same", (1, 2))
    assert same.out_hw == (7, 8) and same.pad == (0, 3)  # F.conv2d puts the odd extra pad bottom/right
    assert conv_geometry((7, 9), (3, 3), 1, "valid", 1).out_hw == (5, 7)
    with pytest.raises(ValueError, match="strided"):
        conv_geometry((7, 9), (3, 3), 2, "same", 1)
    with pytest.raises(ValueError, match="larger than the padded input"):
        conv_geometry((3, 3), (5, 5), 1, 0, 1)


@pytest.mark.launches_triton
def test_edge_inputs_unbatched_empty_batch_and_dtype_mismatch(device, monkeypatch):
    monkeypatch.setenv("FASTTICKET_DENSE_THRESHOLD_CONV2D", "1.01")
    x, weight, b, mask, _ = make_case(1, 4, 12, (7, 9), 3, "block", seed=21, device=device)
    cache = TileMapCache()
    tile_maps = lambda bn, bk, k_order="mask": cache.get(mask, bn, bk, k_order=k_order)  # noqa: E731
    # Unbatched [C, H, W] input, as nn.Conv2d accepts.
    y = masked_conv2d(x[0], weight, b, mask, tile_maps, 1, 1, 1)
    ref = reference_masked_conv2d_grads(x, weight, b, mask, torch.ones(1, 12, 7, 9, device=device), 1, 1, 1)[0]
    assert y.shape == (12, 7, 9) and rel_error(y, ref[0]) < FP32_TOL
    # An empty batch gives empty outputs and zero weight / bias gradients, not garbage.
    empty = x[:0].clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    bb = b.clone().requires_grad_(True)
    out = masked_conv2d(empty, w, bb, mask, tile_maps, 1, 1, 1)
    out.sum().backward()
    assert out.shape == (0, 12, 7, 9) and torch.all(w.grad == 0) and torch.all(bb.grad == 0)
    with pytest.raises(TypeError, match="matching dtypes"):
        masked_conv2d(x.double(), weight, b, mask, tile_maps, 1, 1, 1)


# sm_90 compile checks (tests/sm90.py, the sm90_compiled fixture): the main configurations of the conv
# kernels compiled as a real launch would compile them (the conv benchmark's ImageNet-sized layer: batch 64,
# 256 -> 256 channels, 3x3, 56x56, stride 1, padding 1, bf16; the input and output channels_last (NHWC) or
# plain NCHW, the filter contiguous), and the properties they must keep. THE table for the conv kernels:
# whoever changes their configs or code updates it here.
# NHWC: the tap-major gathers are 16-byte async copies with num_stages buffers in flight, epilogues store
# 16-byte vectors, the per-tap dX gather has no atomics. NCHW inputs (PyTorch's default layout) compile
# to unstaged scalar gathers (buffers 0, and 254 registers in the dX gather): tensor cores, nothing more.
SM90_EXPECT = {
    "fwd bf16 nhwc BM128 w8 s4": Expect("wgmma", buffers=4, async16=True, store_bytes=16),
    "fwd bf16 nhwc BM64 w4 s3": Expect("wgmma", buffers=3, async16=True, store_bytes=16),
    "dx-gather bf16 nhwc BM128 w8 s4": Expect("wgmma", buffers=4, async16=True, store_bytes=16, no_atomics=True),
    "dx-gather bf16 nhwc BM64 w4 s3": Expect("wgmma", buffers=3, async16=True, store_bytes=16, no_atomics=True),
    "dw bf16 nhwc BM128 w8 s4": Expect("wgmma", buffers=4, async16=True),
    "fwd bf16 nchw BM128 w8 s4": Expect("wgmma"),
    "dx-gather bf16 nchw BM128 w8 s4": Expect("wgmma", no_atomics=True),
    "dw bf16 nchw BM128 w8 s4": Expect("wgmma"),
    "dx-atomic bf16 nchw BM128 w8 s3": Expect("wgmma"),  # C_in not a multiple of BK: GEMM then col2im
    "fwd tf32 nhwc BM128 w8 s3": Expect("wgmma", buffers=3),
}

SM90_BODY = r"""
import torch
import fastticket.kernels.masked_conv2d as conv

WANTED = %r
NB, C, HW, KS = 64, 256, 56, 3
M, K = NB * HW * HW, C * KS * KS
BUCKET = conv.live_bucket(0.3)
BN, BK = conv.conv2d_tile_sizes(C, K, torch.bfloat16, torch.device("cuda"))
LAYOUTS = {"nchw": (C * HW * HW, HW * HW, HW, 1), "nhwc": (C * HW * HW, 1, HW * C, C)}  # X, Y and dX strides
filt = (K, KS * KS, KS, 1)
geom = (1, 1, 1, 1, 1, 1)  # stride, padding, dilation
i32, u8, f32 = ptr(torch.int32), ptr(torch.uint8), ptr(torch.float32)
for dtype, tag, precision in ((torch.bfloat16, "bf16", None), (torch.float32, "tf32", "tf32")):
    t = ptr(dtype)
    for c in conv._cuda_configs():
        cfg = f"BM{c.kwargs['BLOCK_M']} w{c.num_warps} s{c.num_stages}"
        for layout, act in LAYOUTS.items():
            flat = layout == "nchw"  # the launchers' FLAT_OUT: the output is plain contiguous NCHW
            common = dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages, KH=KS, KW=KS, INDEX_I64=False,
                          BLOCK_N=BN, BLOCK_K=BK, INPUT_PRECISION=precision)
            name = f"{tag} {layout} {cfg}"
            if "fwd " + name in WANTED:
                check("fwd " + name, conv._conv2d_fwd_kernel, t, t, t, t, i32, i32, M, C, HW, HW, C, HW, HW, BUCKET,
                      *act, *filt, *act, *geom, HAS_BIAS=True, USE_BITS=False, TAP_ALIGNED=True, FLAT_OUT=flat,
                      LIST_CHUNK=conv._LIST_CHUNK, **common)
            if "dx-gather " + name in WANTED:
                check("dx-gather " + name, conv._conv2d_dx_gather_kernel, t, t, t, i32, i32, M, C, HW, HW, C, HW,
                      HW, BUCKET, *act, *filt, *act, *geom, FLAT_OUT=flat, LIST_CHUNK=conv._LIST_CHUNK, **common)
            if "dx-atomic " + name in WANTED:
                check("dx-atomic " + name, conv._conv2d_dx_kernel, t, t, f32, i32, i32, M, C, HW, HW, C, HW, HW,
                      BUCKET, *act, *filt, *act, *geom, ATOMIC=True, **common)
            if "dw " + name in WANTED:  # the split variant (fp32 atomics) a launch with few live tiles runs
                check("dw " + name, conv._conv2d_dw_kernel, t, t, u8, f32, i32, i32, M, C, HW, HW, C, HW, HW,
                      M // 8, BUCKET, *act, *act, *filt, *filt, *geom, ATOMIC=True, USE_BITS=False,
                      TAP_ALIGNED=True, **common)
""" % sorted(SM90_EXPECT)


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU every other test compiles the kernels for real")
def test_kernels_compile_for_sm90_without_a_gpu(sm90_compiled):
    missing = sorted(set(SM90_EXPECT) - set(sm90_compiled))
    assert not missing, f"configurations no longer launched (update SM90_EXPECT): {missing}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="offline compile check; a GPU runs the kernels themselves")
@pytest.mark.parametrize("name", sorted(SM90_EXPECT))
def test_sm90_tensor_cores_pipelining_no_spills(name, sm90_compiled):
    assert_properties(sm90_compiled, name, SM90_EXPECT[name])
