"""Parity of the masked-linear Triton kernels against a float64 reference (docs/architecture.md, "Tests").

Runs on the GPU when there is one, otherwise on CPU tensors in the Triton interpreter (tests/conftest.py),
where the tiles are 16 x 16 so the small shapes here still span several tiles, with partial edge tiles.
Every launcher output is NaN-poisoned first, so an element a kernel forgets to write fails the test.
"""
from __future__ import annotations

import math
import zlib

import pytest
import torch

from fastticket.kernels import masked_linear
from fastticket.kernels.tile_map import TileMapCache, build_tile_map
from fastticket.testing import rel_error

TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
ON_CUDA = torch.cuda.is_available()


def assert_parity(out: torch.Tensor, ref: torch.Tensor, tol: float, what: str = "") -> None:
    err = rel_error(out, ref)
    # `err < tol` is False for NaN, so NaN never passes.
    assert err < tol, f"{what}: relative error {err} >= {tol}"


def dtype_or_skip(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    if dtype == torch.bfloat16 and device.type != "cuda":
        pytest.skip("bf16 needs a GPU: the Triton interpreter has no bf16 matmul (numpy has no bfloat16)")
    return dtype


def make_mask(n: int, k: int, kind: str, density: float, gen: torch.Generator, block=None) -> torch.Tensor:
    """element: iid entries; block: whole (bn x bk) tiles alive with prob `density` (then element-thinned by
    half inside, so live tiles also hold pruned entries); dead / live: all pruned / none pruned."""
    if kind == "element":
        return torch.rand(n, k, generator=gen) < density
    if kind == "block":
        bn, bk = block
        tiles = torch.rand(-(-n // bn), -(-k // bk), generator=gen) < density
        tiles[0, 0] = True  # at least one live tile, so the case is not all-dead by chance
        coarse = tiles.repeat_interleave(bn, 0).repeat_interleave(bk, 1)[:n, :k]
        return coarse & (torch.rand(n, k, generator=gen) < 0.5)
    if kind == "dead":
        return torch.zeros(n, k, dtype=torch.bool)
    if kind == "live":
        return torch.ones(n, k, dtype=torch.bool)
    raise ValueError(kind)


def make_case(m, n, k, kind, density, seed, device, dtype=torch.float32, bias=True, batch=()):
    gen = torch.Generator().manual_seed(seed)
    bn, bk = masked_linear.linear_tile_sizes(device, dtype)
    mask = make_mask(n, k, kind, density, gen, block=(bn, bk))
    x = torch.randn(*batch, m, k, generator=gen)
    w = torch.randn(n, k, generator=gen) / math.sqrt(k) * mask  # zero invariant: pruned entries are 0
    b = torch.randn(n, generator=gen) if bias else None
    g = torch.randn(*batch, m, n, generator=gen)
    to = dict(device=device, dtype=dtype)
    return (x.to(**to), w.to(**to), None if b is None else b.to(**to), mask.to(device), g.to(**to))


# 150 rows: more M-tiles than one launch-order group (GROUP_M = 8), so the grouped ordering is covered.
SHAPES = [(29, 37, 53), (64, 48, 80), (1, 16, 16), (33, 17, 5), (150, 20, 40)]
MASKS = [("element", 0.05), ("element", 0.5), ("block", 0.3), ("block", 0.6), ("dead", 0.0), ("live", 1.0)]


# ------------------------------------------------------------------------------------------- launchers

@pytest.mark.launches_triton
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kind,density", MASKS, ids=[f"{k}{d}" for k, d in MASKS])
def test_launchers_match_float64_reference(device, shape, kind, density):
    m, n, k = shape
    x, w, b, mask, g = make_case(m, n, k, kind, density, seed=zlib.crc32(repr((shape, kind)).encode()), device=device)
    bn, bk = masked_linear.linear_tile_sizes(device, x.dtype)
    tm = build_tile_map(mask, bn, bk)
    nan = float("nan")

    y = masked_linear.linear_forward(x, w, b, tm, out=torch.full((m, n), nan, device=device))
    assert_parity(y, masked_linear.reference_masked_linear(x, w, b, mask), TOL[torch.float32], "forward")

    ref_dx, ref_dw, _ = masked_linear.reference_masked_linear_grads(x, w, b, mask, g)
    dx = masked_linear.linear_grad_input(g, w, tm, out=torch.full((m, k), nan, device=device))
    assert_parity(dx, ref_dx, TOL[torch.float32], "dX")

    # dW: poison everything. Live tiles must be fully written, dead tiles never touched (still NaN).
    dw = masked_linear.linear_grad_weight(g, x, mask, tm, out=torch.full((n, k), nan, device=device))
    live_elems = tm.live.repeat_interleave(bn, 0).repeat_interleave(bk, 1)[:n, :k]
    assert torch.isnan(dw[~live_elems]).all(), "a dead tile of dW was written"
    assert_parity(dw[live_elems], ref_dw[live_elems.cpu()], TOL[torch.float32], "dW (live tiles)")
    assert (dw[live_elems & ~mask] == 0).all(), "pruned entries of a live tile must get exactly zero gradient"
    # Default allocation: dead tiles are zero.
    assert_parity(masked_linear.linear_grad_weight(g, x, mask, tm), ref_dw, TOL[torch.float32], "dW")


@pytest.mark.launches_triton
def test_dead_tiles_are_never_read(device):
    """With garbage (NaN) stored in the dead tiles of W, tile skipping still gives the masked result: the
    kernels never load a dead tile. (A dense GEMM would propagate the NaN.)"""
    x, w, b, mask, g = make_case(40, 48, 64, "block", 0.4, seed=7, device=device)
    bn, bk = masked_linear.linear_tile_sizes(device, x.dtype)
    tm = build_tile_map(mask, bn, bk)
    assert 0 < tm.n_live < tm.n_tiles
    dead_elems = ~tm.live.repeat_interleave(bn, 0).repeat_interleave(bk, 1)[:48, :64]
    w_garbage = w.masked_fill(dead_elems, float("nan"))
    assert_parity(masked_linear.linear_forward(x, w_garbage, b, tm),
                  masked_linear.reference_masked_linear(x, w, b, mask), 1e-5, "fwd")
    ref_dx, _, _ = masked_linear.reference_masked_linear_grads(x, w, b, mask, g)
    assert_parity(masked_linear.linear_grad_input(g, w_garbage, tm), ref_dx, 1e-5, "dX")


def test_tile_map_of_wrong_block_or_shape_is_rejected(device):
    x, w, b, mask, _ = make_case(8, 32, 32, "element", 0.5, seed=1, device=device)
    bn, bk = masked_linear.linear_tile_sizes(device, x.dtype)
    with pytest.raises(ValueError, match="tiles"):
        masked_linear.linear_forward(x, w, b, build_tile_map(mask, bn * 2, bk))
    with pytest.raises(ValueError, match="shape"):
        masked_linear.linear_forward(x, w[:16], b[:16], build_tile_map(mask[:16, :16], bn, bk))


def test_parity_check_rejects_nan_and_wrong_results():
    ref = torch.randn(5, 7, dtype=torch.float64)
    bad = ref.clone()
    bad[2, 3] = float("nan")
    with pytest.raises(AssertionError):
        assert_parity(bad, ref, 1e-5)
    with pytest.raises(AssertionError):
        assert_parity(ref * 1.001, ref, 1e-5)
    assert_parity(ref.float(), ref, 1e-5)


# ------------------------------------------------------------------------------------------- autograd

@pytest.fixture(params=["skip", "dense"])
def path(request, monkeypatch):
    """Force tile skipping (threshold above any live fraction) or dense cuBLAS (threshold 0)."""
    monkeypatch.setenv("FASTTICKET_DENSE_THRESHOLD_LINEAR", "1.01" if request.param == "skip" else "0.0")
    return request.param


def run_autograd(x, w, b, mask, g, fused_update=None):
    x = x.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    b = b.detach().clone().requires_grad_(True) if b is not None else None
    cache = TileMapCache()
    y = masked_linear.masked_linear(x, w, b, mask, lambda bn, bk: cache.get(mask, bn, bk), fused_update)
    y.backward(g)
    return y, x.grad, w.grad, (b.grad if b is not None else None)


CASES = [
    # (m, n, k, kind, density, bias, batch)
    (29, 37, 53, "element", 0.2, True, ()),
    (29, 37, 53, "block", 0.3, False, ()),
    (7, 33, 40, "block", 0.5, True, (2, 3)),
    (20, 48, 20, "dead", 0.0, True, ()),
    (20, 48, 20, "dead", 0.0, False, (2,)),
    (24, 40, 36, "live", 1.0, True, ()),
]


@pytest.mark.launches_triton
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}-{c[3]}{c[4]}-b{int(c[5])}-{len(c[6])+2}d")
def test_autograd_matches_reference(device, path, case, monkeypatch):
    m, n, k, kind, density, bias, batch = case
    x, w, b, mask, g = make_case(m, n, k, kind, density, seed=11, device=device, bias=bias, batch=batch)

    calls = []
    real_forward = masked_linear.linear_forward
    monkeypatch.setattr(masked_linear, "linear_forward", lambda *a, **kw: calls.append(1) or real_forward(*a, **kw))
    y, dx, dw, db = run_autograd(x, w, b, mask, g)
    assert bool(calls) == (path == "skip"), "the forced path did not run"

    assert y.shape == (*batch, m, n) and dx.shape == x.shape and dw.shape == w.shape
    assert_parity(y, masked_linear.reference_masked_linear(x, w, b, mask), 1e-5, "forward")
    ref_dx, ref_dw, ref_db = masked_linear.reference_masked_linear_grads(x, w, b, mask, g)
    assert_parity(dx, ref_dx, 1e-5, "dX")
    assert_parity(dw, ref_dw, 1e-5, "dW")
    assert (dw[~mask] == 0).all()
    if bias:
        assert_parity(db, ref_db, 1e-5, "dbias")
    if kind == "dead":
        assert (dw == 0).all() and (dx == 0).all()
        expected = b.expand_as(y) if bias else torch.zeros_like(y)
        assert torch.equal(y, expected)


@pytest.mark.launches_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_inputs_accumulate_in_fp32(device, path, dtype):
    dtype = dtype_or_skip(dtype, device)
    x, w, b, mask, g = make_case(29, 40, 72, "block", 0.5, seed=3, device=device, dtype=dtype, batch=(2,))
    y, dx, dw, db = run_autograd(x, w, b, mask, g)
    assert y.dtype == dx.dtype == dw.dtype == db.dtype == dtype
    ref_dx, ref_dw, ref_db = masked_linear.reference_masked_linear_grads(x, w, b, mask, g)
    assert_parity(y, masked_linear.reference_masked_linear(x, w, b, mask), TOL[dtype], "forward")
    assert_parity(dx, ref_dx, TOL[dtype], "dX")
    assert_parity(dw, ref_dw, TOL[dtype], "dW")
    assert_parity(db, ref_db, TOL[dtype], "dbias")
    assert (dw[~mask] == 0).all()


@pytest.mark.launches_triton
@pytest.mark.skipif(not ON_CUDA, reason="TF32 is a GPU tensor-core mode; the interpreter computes fp32 in IEEE")
def test_tf32_follows_torch_flag(device, path, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    x, w, b, mask, g = make_case(300, 256, 512, "element", 0.3, seed=5, device=device)
    y, dx, dw, _ = run_autograd(x, w, b, mask, g)
    ref_dx, ref_dw, _ = masked_linear.reference_masked_linear_grads(x, w, b, mask, g)
    assert_parity(y, masked_linear.reference_masked_linear(x, w, b, mask), 1e-3, "forward")
    assert_parity(dx, ref_dx, 1e-3, "dX")
    assert_parity(dw, ref_dw, 1e-3, "dW")


@pytest.mark.launches_triton
def test_fused_update_gets_grad_out_after_dx_and_weight_gets_no_grad(device, path):
    x, w, b, mask, g = make_case(13, 37, 53, "element", 0.3, seed=9, device=device, batch=(2,))
    seen = []

    def fused_update(grad_out_2d, x_2d):
        seen.append((grad_out_2d.clone(), x_2d.clone()))

    y, dx, dw, db = run_autograd(x, w, b, mask, g, fused_update=fused_update)
    assert len(seen) == 1 and dw is None
    g2, x2 = seen[0]
    assert torch.equal(g2, g.reshape(-1, 37)) and torch.equal(x2, x.reshape(-1, 53))
    ref_dx, _, ref_db = masked_linear.reference_masked_linear_grads(x, w, b, mask, g)
    assert_parity(dx, ref_dx, 1e-5, "dX")
    assert_parity(db, ref_db, 1e-5, "dbias")


@pytest.mark.launches_triton
def test_no_grad_inference(device, path):
    x, w, b, mask, _ = make_case(10, 20, 30, "element", 0.4, seed=4, device=device)
    cache = TileMapCache()
    w.requires_grad_(True)
    with torch.no_grad():
        y = masked_linear.masked_linear(x, w, b, mask, lambda bn, bk: cache.get(mask, bn, bk))
    assert not y.requires_grad
    assert_parity(y, masked_linear.reference_masked_linear(x, w, b, mask), 1e-5, "forward")


# Compiles the linear kernels and the fused dW + SGD kernel for Hopper (sm_90) without a GPU (the
# compile_for_sm90 fixture, tests/conftest.py), as tests/test_masked_conv2d_kernels.py does for the conv kernels.
_GPU_COMPILE_BODY = r"""
import fastticket.kernels.linear_dw_sgd as linear_dw_sgd
import fastticket.kernels.masked_linear as masked_linear

for t, precision in (("*bf16", None), ("*fp32", "tf32")):
    common = dict(INPUT_PRECISION=precision, BLOCK_M=128, BLOCK_N=64, BLOCK_K=64)
    compile_kernel(masked_linear._fwd_kernel, {"x_ptr": t, "w_ptr": t, "b_ptr": t, "y_ptr": t, "row_ptr": "*i32",
                   "col_idx": "*i32"}, dict(common, HAS_BIAS=True, GROUP_M=8))
    compile_kernel(masked_linear._dx_kernel, {"dy_ptr": t, "w_ptr": t, "dx_ptr": t, "col_ptr": "*i32",
                   "row_idx": "*i32"},
                   dict(common, GROUP_M=8))
    compile_kernel(masked_linear._dw_kernel, {"dy_ptr": t, "x_ptr": t, "mask_ptr": "*u8", "dw_ptr": t,
                   "coo_rows": "*i32", "coo_cols": "*i32"}, common)
    compile_kernel(linear_dw_sgd._dw_sgd_kernel, {"dy_ptr": t, "x_ptr": t, "mask_ptr": "*u8", "w_ptr": t, "buf_ptr": t,
                   "coo_rows": "*i32", "coo_cols": "*i32", "lr": "fp32", "momentum": "fp32", "dampening": "fp32",
                   "weight_decay": "fp32"},
                   dict(common, BLOCK_M=64, HAS_MOMENTUM=True, FIRST=False, NESTEROV=True, MAXIMIZE=False,
                        HAS_WD=True), num_warps=4)
print("compiled")
"""


@pytest.mark.skipif(ON_CUDA, reason="with a GPU every other test compiles the kernels for real")
def test_kernels_compile_for_sm90_without_a_gpu(compile_for_sm90):
    compile_for_sm90(_GPU_COMPILE_BODY)
