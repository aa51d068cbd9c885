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

from fastticket.kernels import masked_linear, masked_linear_dw
from fastticket.sparse import linear as linear_op
from fastticket.kernels.tile_map import TileMap, TileMapCache, build_tile_map
from fastticket.sparse.testing import rel_error
from sm90 import Expect, assert_properties, problems

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
    dw = masked_linear_dw.linear_grad_weight(g, x, mask, tm, out=torch.full((n, k), nan, device=device))
    live_elems = tm.live.repeat_interleave(bn, 0).repeat_interleave(bk, 1)[:n, :k]
    assert torch.isnan(dw[~live_elems]).all(), "a dead tile of dW was written"
    assert_parity(dw[live_elems], ref_dw[live_elems.cpu()], TOL[torch.float32], "dW (live tiles)")
    assert (dw[live_elems & ~mask] == 0).all(), "pruned entries of a live tile must get exactly zero gradient"
    # Default allocation: dead tiles are zero.
    assert_parity(masked_linear_dw.linear_grad_weight(g, x, mask, tm), ref_dw, TOL[torch.float32], "dW")


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


WIDE_CASES = [
    # (m, n, k, kind, density): odd shapes, partial edge groups, dead tiles, all-dead, all-live
    (29, 37, 53, "block", 0.4),
    (33, 70, 45, "element", 0.05),
    (17, 20, 72, "dead", 0.0),
    (20, 48, 36, "live", 1.0),
]


@pytest.mark.launches_triton
@pytest.mark.parametrize("rows", [2, 4])
@pytest.mark.parametrize("case", WIDE_CASES, ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}-{c[3]}{c[4]}")
def test_wide_programs_match_reference_and_never_read_dead_tiles(device, rows, case):
    """Programs 2 or 4 map tiles wide (union lists + per-entry live bits): same result as the reference,
    every output element written (NaN-poisoned buffers), and dead tiles of W (NaN garbage) never loaded, also
    when a neighbouring tile in the same program is live."""
    m, n, k, kind, density = case
    x, w, b, mask, g = make_case(m, n, k, kind, density, seed=zlib.crc32(repr(case).encode()), device=device)
    bn, bk = masked_linear.linear_tile_sizes(device, x.dtype)
    tm = build_tile_map(mask, bn, bk)
    dead_elems = ~tm.live.repeat_interleave(bn, 0).repeat_interleave(bk, 1)[:n, :k]
    w_garbage = w.masked_fill(dead_elems.to(device), float("nan"))
    nan = float("nan")
    y = masked_linear.linear_forward(x, w_garbage, b, tm, out=torch.full((m, n), nan, device=device),
                                     rows_per_program=rows)
    assert_parity(y, masked_linear.reference_masked_linear(x, w, b, mask), 1e-5, f"forward, {rows} tiles wide")
    ref_dx, _, _ = masked_linear.reference_masked_linear_grads(x, w, b, mask, g)
    dx = masked_linear.linear_grad_input(g, w_garbage, tm, out=torch.full((m, k), nan, device=device),
                                         rows_per_program=rows)
    assert_parity(dx, ref_dx, 1e-5, f"dX, {rows} tiles wide")


@pytest.mark.launches_triton
@pytest.mark.parametrize("rows", [1, 2])
def test_live_lists_longer_than_one_staged_chunk(device, rows, monkeypatch):
    """Lists are staged LIST_CHUNK entries at a time: with a chunk of 4, rows of up to 9 live tiles cross
    several chunk boundaries (and end mid-chunk)."""
    monkeypatch.setattr(masked_linear, "_LIST_CHUNK", 4)
    x, w, b, mask, g = make_case(21, 70, 141, "block", 0.7, seed=13, device=device)
    bn, bk = masked_linear.linear_tile_sizes(device, x.dtype)
    tm = build_tile_map(mask, bn, bk)
    assert tm.max_live_per_row > 4 and tm.max_live_per_col > 4
    y = masked_linear.linear_forward(x, w, b, tm, out=torch.full((21, 70), float("nan"), device=device),
                                     rows_per_program=rows)
    assert_parity(y, masked_linear.reference_masked_linear(x, w, b, mask), 1e-5, "forward")
    ref_dx, _, _ = masked_linear.reference_masked_linear_grads(x, w, b, mask, g)
    dx = masked_linear.linear_grad_input(g, w, tm, rows_per_program=rows)
    assert_parity(dx, ref_dx, 1e-5, "dX")


@pytest.mark.launches_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("poisoned", [False, True], ids=["fresh", "poisoned-out"])
def test_dw_split_over_tokens(device, dtype, poisoned):
    """dW with the token reduction split across programs (atomic adds into fp32): same result as the reference,
    dead tiles untouched, pruned entries exactly zero. 150 rows in 3 splits of 64 (the last one partial)."""
    m, n, k = 150, 37, 53
    x, w, b, mask, g = make_case(m, n, k, "block", 0.4, seed=17, device=device, dtype=dtype)
    bn, bk = masked_linear.linear_tile_sizes(device, x.dtype)
    tm = build_tile_map(mask, bn, bk)
    _, ref_dw, _ = masked_linear.reference_masked_linear_grads(x, w, b, mask, g)
    out = torch.full((n, k), float("nan"), device=device, dtype=dtype) if poisoned else None
    dw = masked_linear_dw.linear_grad_weight(g, x, mask, tm, out=out, split_m=3)
    assert dw.dtype == dtype
    live_elems = tm.live.repeat_interleave(bn, 0).repeat_interleave(bk, 1)[:n, :k].to(device)
    if poisoned:
        assert torch.isnan(dw[~live_elems]).all(), "a dead tile of dW was written"
    else:
        assert (dw[~live_elems] == 0).all()
    assert_parity(dw[live_elems], ref_dw[live_elems.cpu()], TOL[dtype], "dW (live tiles)")
    assert (dw[live_elems & ~mask] == 0).all(), "pruned entries of a live tile must get exactly zero gradient"


@pytest.mark.launches_triton
@pytest.mark.parametrize("live", ["all-live", "one-tile", "all-dead"])
def test_dw_split_buffer_covers_live_tiles_only(device, live, monkeypatch):
    """The split dW's partial sums live in one fp32 slab per live tile (no N x K buffer): the buffer it zero-
    fills is [n_live, BN, BK], and the scattered result matches the float64 reference on odd shapes, with dead
    tiles untouched in a NaN-poisoned `out` and pruned entries exactly zero."""
    m, n, k = 140, 37, 45
    x, w, b, mask, g = make_case(m, n, k, "element", 0.6, seed=23, device=device)
    bn, bk = masked_linear.linear_tile_sizes(device, x.dtype)
    if live == "one-tile":
        keep = torch.zeros_like(mask)
        keep[bn:2 * bn, 2 * bk:] = True  # the partial last tile of the second tile-row
        mask &= keep
    elif live == "all-dead":
        mask[:] = False
    tm = build_tile_map(mask, bn, bk)
    w = w * mask
    zeros, sizes = torch.zeros, []
    monkeypatch.setattr(masked_linear.torch, "zeros", lambda *a, **kw: sizes.append(tuple(a[0])) or zeros(*a, **kw))
    out = torch.full((n, k), float("nan"), device=device)
    dw = masked_linear_dw.linear_grad_weight(g, x, mask, tm, out=out, split_m=3)
    monkeypatch.setattr(masked_linear.torch, "zeros", zeros)
    assert sizes == ([(tm.n_live, bn, bk)] if tm.n_live else []), sizes
    live_elems = tm.live.repeat_interleave(bn, 0).repeat_interleave(bk, 1)[:n, :k].to(device)
    assert torch.isnan(dw[~live_elems]).all(), "a dead tile of dW was written"
    _, ref_dw, _ = masked_linear.reference_masked_linear_grads(x, w, b, mask, g)
    assert_parity(dw[live_elems], ref_dw[live_elems.cpu()], TOL[torch.float32], "dW (live tiles)")
    assert (dw[live_elems & ~mask] == 0).all(), "pruned entries of a live tile must get exactly zero gradient"


def test_dw_split_defaults(monkeypatch):
    """Off CUDA, and under deterministic algorithms, dW is never split (atomics round in varying order)."""
    assert masked_linear_dw._dw_split(10_000, 3, torch.device("cpu")) == 1
    monkeypatch.setattr(masked_linear_dw, "sm_count", lambda index: 132)
    cuda = torch.device("cuda", 0)
    assert masked_linear_dw._dw_split(65536, 8, cuda) == 64  # 4 * 132 / 8 = 66, capped at 65536 / 1024
    assert masked_linear_dw._dw_split(2048, 8, cuda) == 2    # each split keeps >= 1024 tokens
    assert masked_linear_dw._dw_split(65536, 10_000, cuda) == 1  # enough live tiles to fill the GPU
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert masked_linear_dw._dw_split(65536, 8, cuda) == 1
    finally:
        torch.use_deterministic_algorithms(previous)


# A 5 x 5 tile map (75 x 70 at 16 x 16 tiles: odd tile counts, partial edge tiles) whose 3 x 3 quads hold a
# fully live quad, one-live-sub-tile quads (edge and corner quads too), a diagonal quad and a dead quad.
QUAD_TILES = [[1, 1, 0, 1, 1],
              [1, 1, 0, 0, 0],
              [1, 0, 0, 0, 1],
              [0, 1, 0, 1, 0],
              [0, 1, 0, 0, 1]]


def quad_case(pattern: str, dtype, device, seed: int):
    """(x, w, b, mask, g) of 70 tokens through a 70 -> 75 layer; mask tiles: QUAD_TILES, random, or all live;
    live tiles element-thinned by half, so they hold pruned entries too."""
    m, n, k = 70, 75, 70
    gen = torch.Generator().manual_seed(seed)
    bn, bk = masked_linear.linear_tile_sizes(device, dtype)
    if pattern == "designed":
        tiles = torch.tensor(QUAD_TILES, dtype=torch.bool)
    elif pattern == "random":
        tiles = torch.rand(-(-n // bn), -(-k // bk), generator=gen) < 0.4
    else:
        tiles = torch.ones(-(-n // bn), -(-k // bk), dtype=torch.bool)
    mask = tiles.repeat_interleave(bn, 0).repeat_interleave(bk, 1)[:n, :k] & (torch.rand(n, k, generator=gen) < 0.5)
    x = torch.randn(m, k, generator=gen)
    w = torch.randn(n, k, generator=gen) / math.sqrt(k) * mask
    g = torch.randn(m, n, generator=gen)
    to = dict(device=device, dtype=dtype)
    return x.to(**to), w.to(**to), None, mask.to(device), g.to(**to)


QUAD_RUNS = [(pattern, dtype, split) for pattern in ("designed",) for dtype in (torch.float32, torch.float16)
             for split in (1, 3)] + [("random", torch.float32, 1), ("random", torch.float16, 3),
                                     ("live", torch.float32, 3), ("live", torch.float16, 1)]


@pytest.mark.launches_triton
@pytest.mark.parametrize("pattern,dtype,split", QUAD_RUNS,
                         ids=[f"{p}-{str(d)[6:]}-{'split' if s > 1 else 'direct'}" for p, d, s in QUAD_RUNS])
def test_dw_quads_match_reference_and_write_only_live_tiles(device, pattern, dtype, split):
    """Quad dW programs (2 x 2 map tiles each): the float64 reference on every live tile, pruned entries exactly
    zero, and the dead tiles of a NaN-poisoned `out` still NaN (also the dead sub-tiles of live quads), by the
    direct store and by the atomic compact-slab path (70 tokens in 2 splits)."""
    x, w, b, mask, g = quad_case(pattern, dtype, device, seed=zlib.crc32(f"quads-{pattern}".encode()))
    bn, bk = masked_linear.linear_tile_sizes(device, dtype)
    tm = build_tile_map(mask, bn, bk)
    n, k = w.shape
    bits = tm.quads().bits.tolist()
    if pattern == "designed":  # the cases the pattern is there for
        assert 15 in bits and {1, 2, 4, 8} & set(bits) and 9 in bits and tm.quads().n_quads == 8
    _, ref_dw, _ = masked_linear.reference_masked_linear_grads(x, w, b, mask, g)
    out = torch.full((n, k), float("nan"), device=device, dtype=dtype)
    dw = masked_linear_dw.linear_grad_weight(g, x, mask, tm, out=out, split_m=split, tiles_per_program=2)
    assert dw is out and dw.dtype == dtype
    live_elems = tm.live.repeat_interleave(bn, 0).repeat_interleave(bk, 1)[:n, :k].to(device)
    assert torch.isnan(dw[~live_elems]).all(), "a dead tile of dW was written"
    assert_parity(dw[live_elems], ref_dw[live_elems.cpu()], TOL[dtype], "dW quads (live tiles)")
    assert (dw[live_elems & ~mask] == 0).all(), "pruned entries of a live tile must get exactly zero gradient"
    tiles = masked_linear_dw.linear_grad_weight(g, x, mask, tm, split_m=split, tiles_per_program=1)
    assert_parity(torch.where(live_elems, dw, 0.0), tiles.double(), TOL[dtype], "dW quads vs tiles")


@pytest.mark.launches_triton
def test_dw_quads_split_counts_quad_programs(device, monkeypatch):
    """The token split is sized for the programs that run: quads when quads run, tiles otherwise."""
    x, w, b, mask, g = quad_case("designed", torch.float32, device, seed=3)
    tm = build_tile_map(mask, *masked_linear.linear_tile_sizes(device, x.dtype))
    seen = []
    monkeypatch.setattr(masked_linear_dw, "_dw_split", lambda m, programs, dev: seen.append(programs) or 1)
    masked_linear_dw.linear_grad_weight(g, x, mask, tm, tiles_per_program=2)
    masked_linear_dw.linear_grad_weight(g, x, mask, tm, tiles_per_program=1)
    assert seen == [tm.quads().n_quads, tm.n_live]
    with pytest.raises(ValueError, match="tiles_per_program must be None"):
        masked_linear_dw.linear_grad_weight(g, x, mask, tm, tiles_per_program=4)


def test_dw_quads_heuristic(monkeypatch):
    """Quads by default only on CUDA outside the interpreter, not for IEEE fp32, with quads >= 3/4 full and
    enough programs (token splits counted) for every SM."""
    live = torch.ones(4096, 4096, dtype=torch.bool)
    full = build_tile_map(live, 64, 64)
    checker = live.clone().view(64, 64, 64, 64)
    checker[1::2, :, :, :] = False  # every other tile-row dead: quads half full
    half = build_tile_map(checker.view(4096, 4096), 64, 64)
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert not masked_linear_dw._dw_quads(full, 8192, torch.bfloat16, cpu)
    assert not masked_linear_dw._dw_quads(full, 8192, torch.bfloat16, cuda), "the interpreter runs tiles"
    monkeypatch.setattr(masked_linear_dw, "interpreter_active", lambda: False)
    monkeypatch.setattr(masked_linear_dw, "sm_count", lambda index: 132)
    assert masked_linear_dw._dw_quads(full, 8192, torch.bfloat16, cuda)
    assert masked_linear_dw._dw_quads(full, 8192, torch.float16, cuda)
    assert not masked_linear_dw._dw_quads(half, 8192, torch.bfloat16, cuda), "fill 0.5 < _WIDE_MIN_FILL"
    monkeypatch.setattr(masked_linear_dw, "dot_input_precision", lambda dtype, lib: "ieee")
    assert not masked_linear_dw._dw_quads(full, 8192, torch.float32, cuda), "IEEE fp32 (FMA) keeps tiles"
    monkeypatch.setattr(masked_linear_dw, "dot_input_precision", lambda dtype, lib: None)
    few = torch.zeros(4096, 4096, dtype=torch.bool)
    few[:128 * 4, :128 * 4] = True  # 16 full quads
    few_map = build_tile_map(few, 64, 64)
    assert masked_linear_dw._dw_quads(few_map, 65536, torch.bfloat16, cuda), "16 quads x 33 splits fill 132 SMs"
    assert not masked_linear_dw._dw_quads(few_map, 1024, torch.bfloat16, cuda), "16 programs for 132 SMs"


def test_live_bucket_groups_imp_levels():
    """The autotune key changes every halving of the live fraction, not at every IMP level (20% pruned each)."""
    assert [masked_linear.live_bucket(f) for f in (1.0, 0.8, 0.64, 0.51, 0.41, 0.26, 0.2, 0.01, 0.0)] == \
        [0, 0, 0, 0, 1, 1, 2, 6, 7]
    levels = [0.8 ** i for i in range(20)]
    assert len({masked_linear.live_bucket(f) for f in levels}) <= 8


class _FakeTensor:
    def __init__(self, element_size):
        self._size = element_size
        self.device = torch.device("cpu")

    def element_size(self):
        return self._size


def test_config_pruning():
    """mma.sync configs (BLOCK_M = 32) only for small M; configs that overflow shared memory are dropped."""
    configs = masked_linear._cuda_configs()
    def kept(m, elem, width):
        pruned = masked_linear._prune_configs(configs, {"M": m, "x_ptr": _FakeTensor(elem)}, BLOCK_N=width)
        return {(c.kwargs["BLOCK_M"], c.num_warps, c.num_stages) for c in pruned}
    big_bf16 = kept(8192, 2, 64)
    assert all(block_m >= 64 for block_m, _, _ in big_bf16) and (128, 8, 4) in big_bf16
    assert any(block_m == 32 for block_m, _, _ in kept(16, 2, 64))
    assert all(block_m <= 64 for block_m, _, _ in kept(16, 2, 64))
    # fp32, 128 wide: no listed config fits the 160 KiB default budget as it is; the kept ones lose stages
    # (never below 3 buffers) until they fit
    fp32_wide = kept(8192, 4, 128)
    assert fp32_wide
    for block_m, _, stages in fp32_wide:
        assert 3 <= stages and stages * (block_m * 64 + 64 * 128) * 4 <= masked_linear._SMEM_BUDGET
    # distinct configs: no two with the same (BLOCK_M, warps, stages)
    assert len({(c.kwargs["BLOCK_M"], c.num_warps, c.num_stages) for c in configs}) == len(configs)


def test_fp32_configs_per_precision_and_alignment():
    """fp32 forward / dX: IEEE tries only its spill-free configs (BLOCK_M 64 / 32 on 8 warps), at strides that
    are not multiples of 16 (LeNet's 300 / 100 / 10) only BLOCK_M 32 on 8 warps; TF32 keeps the tensor-core
    list when aligned and BLOCK_M 64 on 8 warps otherwise; bf16 ignores alignment. The autotune key holds
    INPUT_PRECISION, so TF32 and IEEE never share a tuned config."""
    def kept(elem, precision, k, n=4096):
        args = {"M": 8192, "x_ptr": _FakeTensor(elem), "stride_xm": k, "stride_xk": 1, "stride_wn": k,
                "stride_wk": 1, "stride_ym": n, "stride_yn": 1}
        pruned = masked_linear._prune_configs(masked_linear._cuda_configs(), args, BLOCK_N=64,
                                              INPUT_PRECISION=precision)
        return {(c.kwargs["BLOCK_M"], c.num_warps, c.num_stages) for c in pruned}
    assert kept(4, "ieee", 4096) == {(64, 8, 3), (32, 8, 3)}
    assert kept(4, "ieee", 300, n=100) == {(32, 8, 3)}
    assert kept(4, "ieee", 784, n=300) == {(32, 8, 3)}
    assert kept(4, "tf32", 300, n=100) == {(64, 8, 3)}
    assert (128, 8, 3) in kept(4, "tf32", 4096) and (128, 8, 4) in kept(2, None, 300, n=100)
    assert all("INPUT_PRECISION" in key for key in masked_linear._KEYS.values())


def test_dw_quad_config_pruning(monkeypatch):
    """Quad dW configs: stages cut to the shared memory (>= 3 kept), IEEE fp32 only BLOCK_M 32 (FMA registers),
    BLOCK_M 128 not for a handful of tokens; the sm_90 budget keeps more than the 160 KiB default."""
    def kept(elem, precision, m=8192):
        pruned = masked_linear_dw._dw_quad_prune_configs(
            masked_linear_dw._dw_quad_cuda_configs(), {"M": m, "x_ptr": _FakeTensor(elem)},
            INPUT_PRECISION=precision, BLOCK_N=128, BLOCK_K=128)
        return [(c.kwargs["BLOCK_M"], c.num_warps, c.num_stages) for c in pruned]
    assert kept(2, None) == [(64, 8, 4), (32, 8, 5)]              # 128 x 3 stages = 192 KiB > 160 KiB
    assert kept(4, "tf32") == [(32, 8, 5)]                        # fp32 BLOCK_M 64: 2 stages fit, dropped
    assert kept(4, "ieee") == [(32, 8, 5)]
    assert kept(2, None, m=40) == [(64, 8, 4), (32, 8, 5)]
    for elem, precision in ((2, None), (4, "tf32"), (4, "ieee")):  # K = 300: X's rows and dW's rows unaligned
        unaligned = masked_linear_dw._dw_quad_prune_configs(
            masked_linear_dw._dw_quad_cuda_configs(),
            {"M": 256, "x_ptr": _FakeTensor(elem), "stride_xm": 300, "stride_xk": 1, "stride_dwn": 300,
             "stride_dwk": 1}, INPUT_PRECISION=precision, BLOCK_N=128, BLOCK_K=128)
        assert [(c.kwargs["BLOCK_M"], c.num_warps, c.num_stages) for c in unaligned] == [(32, 16, 5)]
    monkeypatch.setattr(masked_linear, "_SMEM_BUDGET", 232448)    # sm_90's 227 KiB
    assert kept(2, None) == [(64, 8, 4), (128, 8, 3), (32, 8, 5)]
    assert kept(4, "tf32") == [(64, 8, 3), (32, 8, 5)]
    assert kept(2, None, m=40) == [(64, 8, 4), (32, 8, 5)]


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
    y = linear_op.masked_linear(x, w, b, mask, lambda bn, bk: cache.get(mask, bn, bk), fused_update)
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
    ref_dx, ref_dw, ref_db = masked_linear.reference_masked_linear_grads(x, w, b, mask, g)
    if path == "dense":
        # Fusion applies to tile-skipping layers only: cuBLAS's dW (masked) and the optimizer step run here.
        assert not seen
        assert_parity(dw, ref_dw, 1e-5, "dW")
    else:
        assert len(seen) == 1 and dw is None
        g2, x2 = seen[0]
        assert torch.equal(g2, g.reshape(-1, 37)) and torch.equal(x2, x.reshape(-1, 53))
    assert_parity(dx, ref_dx, 1e-5, "dX")
    assert_parity(db, ref_db, 1e-5, "dbias")


@pytest.mark.launches_triton
def test_no_grad_inference(device, path):
    x, w, b, mask, _ = make_case(10, 20, 30, "element", 0.4, seed=4, device=device)
    cache = TileMapCache()
    w.requires_grad_(True)
    with torch.no_grad():
        y = linear_op.masked_linear(x, w, b, mask, lambda bn, bk: cache.get(mask, bn, bk))
    assert not y.requires_grad
    assert_parity(y, masked_linear.reference_masked_linear(x, w, b, mask), 1e-5, "forward")


def _sparse_file_tensor(directory, name: str, shape, dtype: torch.dtype) -> torch.Tensor:
    """A tensor backed by a sparse file: gigabytes of address space, memory only for the pages touched."""
    numel = shape[0] * shape[1]
    path = directory / name
    with open(path, "wb") as f:
        f.truncate(numel * torch.empty((), dtype=dtype).element_size())
    return torch.from_file(str(path), shared=False, size=numel, dtype=dtype).view(*shape)


@pytest.mark.launches_triton
@pytest.mark.skipif(ON_CUDA, reason="CPU interpreter check; the GPU session runs the real-size dX test")
def test_grad_input_offsets_past_int32(tmp_path) -> None:
    """dX reads W[n, k] at n * stride_wn: for a weight with N*K >= 2^31 elements (a 262k-vocabulary head) the
    row offsets of the last tiles pass 2^31 and must be computed in int64. Here N = 2^27 + 16 rows of K = 16,
    only the last tile live (file-backed tensors: nothing else is ever touched)."""
    m, k, bn, bk = 16, 16, 16, 16
    n = (1 << 27) + bn
    w = _sparse_file_tensor(tmp_path, "w", (n, k), torch.float32)
    dy = _sparse_file_tensor(tmp_path, "dy", (m, n), torch.float32)
    gen = torch.Generator().manual_seed(11)
    last = n - bn
    w[last:] = torch.randn(bn, k, generator=gen)
    dy[:, last:] = torch.randn(m, bn, generator=gen)
    tiles_n = n // bn
    i32 = lambda *v: torch.tensor(v, dtype=torch.int32)  # noqa: E731
    live = torch.zeros(tiles_n, 1, dtype=torch.bool)
    live[-1, 0] = True
    # The tile map written out (building it from a 2^31-element mask would touch every page).
    tile_map = TileMap(shape=(n, k), block=(bn, bk), live=live,
                       row_ptr=torch.cat([torch.zeros(tiles_n, dtype=torch.int32), i32(1)]), col_idx=i32(0),
                       col_ptr=i32(0, 1), row_idx=i32(tiles_n - 1), coo_rows=i32(tiles_n - 1), coo_cols=i32(0),
                       n_live=1, max_live_per_row=1, max_live_per_col=1)
    out = torch.full((m, k), float("nan"))
    masked_linear.linear_grad_input(dy, w, tile_map, out=out)
    assert_parity(out, dy[:, last:].double() @ w[last:].double(), 1e-5, "dX past int32 offsets")


# sm_90 compile checks (tests/sm90.py, the sm90_compiled fixture): the main configurations of the hot linear
# kernels compiled as a real launch would compile them (an 8192-token batch through a 4096 x 4096 layer,
# contiguous, bf16), and the properties they must keep. THE table for the linear kernels: whoever changes
# their configs or code updates it here. Names: kernel, dtype, program width (N for the forward, K for dX:
# 64 / 128 / 256 columns over 64-wide map tiles), then BLOCK_M, warps, stages.
# Forward / dX stage their live lists in registers, so every num_stages is that many shared-memory buffers
# (with the index loaded inside the loop, num_stages 3 and 4 both gave 2); the configurations are the ones
# the autotuner keeps on an H100 (227 KiB of shared memory) after pruning stages that do not fit. One tf32
# configuration per kernel keeps the fp32 path compiling with tensor cores.
SM90_EXPECT = {
    "fwd bf16 N64 BM128 w8 s4": Expect("wgmma", buffers=4, async16=True),
    "fwd bf16 N64 BM64 w4 s5": Expect("wgmma", buffers=5, async16=True),
    "fwd bf16 N256 BM128 w8 s4": Expect("wgmma", buffers=4, async16=True),
    "fwd bf16 N256 BM64 w4 s5": Expect("wgmma", buffers=5, async16=True),
    "dx bf16 K64 BM128 w8 s4": Expect("wgmma", buffers=4, async16=True),
    "dx bf16 K128 BM128 w8 s4": Expect("wgmma", buffers=4, async16=True),
    "dx bf16 K256 BM64 w4 s5": Expect("wgmma", buffers=5, async16=True),
    "dw bf16 BM64 w4 s4": Expect("wgmma", buffers=4, async16=True),
    "dw bf16 BM128 w4 s3": Expect("wgmma", buffers=3, async16=True),
    "dw+sgd bf16 BM64 w4 s3": Expect("wgmma", buffers=3, async16=True),
    "fwd tf32 N128 BM128 w8 s3": Expect("wgmma", buffers=3),
    "dx tf32 K128 BM128 w8 s3": Expect("wgmma", buffers=3),
    "dw tf32 BM64 w4 s4": Expect("wgmma", buffers=4),
    "dw+sgd tf32 BM64 w8 s3": Expect("wgmma", buffers=3),
    # fp32 without TF32 (IEEE: FMA, no tensor core) and LeNet-300-100's odd strides (784 -> 300, 300 -> 100,
    # 100 -> 10; 256 tokens): the first config the pruning keeps for each, and the fused / split kernels. At
    # strides that are not multiples of 16 there are no 16-byte async copies (and bf16 loses its pipelining:
    # the operand loads are scalar), but nothing may spill.
    "fwd ieee 4096 BM64 w8 s3": Expect("fma", buffers=2, async16=True),
    "dx ieee 4096 BM64 w8 s3": Expect("fma", buffers=2, async16=True),
    "dw+sgd ieee 4096 BM64 w8 s3": Expect("fma", buffers=2, async16=True),
    "fwd ieee 784>300 BM32 w8 s3": Expect("fma", buffers=2),
    "dx ieee 784>300 BM32 w8 s3": Expect("fma", buffers=2),
    "fwd ieee 300>100 BM32 w8 s3": Expect("fma", buffers=2),
    "dx ieee 300>100 BM32 w8 s3": Expect("fma", buffers=2),
    "fwd ieee 100>10 BM32 w8 s3": Expect("fma", buffers=2),
    "dx ieee 100>10 BM32 w8 s3": Expect("fma", buffers=2),
    "fwd tf32 300>100 BM64 w8 s3": Expect("wgmma", buffers=3),
    "dx tf32 300>100 BM64 w8 s3": Expect("wgmma", buffers=3),
    "fwd bf16 300>100 BM128 w8 s4": Expect("wgmma"),
    # ... unpipelined (K = 300 is not known divisible by 16), where the same layer with 304 inputs pipelines 4 deep
    # with 16-byte async copies: why kernels/dispatch.py sends such 16-bit layers to cuBLAS on a GPU.
    "fwd bf16 304>100 BM128 w8 s4": Expect("wgmma", buffers=4, async16=True),
    "dw ieee 300>100 BM64 w4 s4": Expect("fma", buffers=3),
    "dw+sgd tf32 300>100 BM64 w8 s3": Expect("wgmma", buffers=3),
    "dw+sgd bf16 300>100 BM64 w8 s3": Expect("wgmma"),  # 8 warps at unaligned rows: 4 spill 8 bytes
    "dw+sgd ieee 100>10 BM64 w8 s3": Expect("fma", buffers=2),
    "sgd-slab fp32 300>100 w8": Expect(None),
    # Quad dW programs (128 x 128 over 2 x 2 map tiles; kernels/masked_linear_dw.py), the first config kept:
    # tensor cores and pipelining for bf16 / TF32, FMA with BLOCK_M 32 for IEEE (BLOCK_M 64 reaches 255
    # registers and spills at 784 -> 300), nothing spilling; the split's atomic epilogue in bf16 at 4096 and at
    # an unaligned stride (bench/sm90_report.py prints every combination).
    "dw-quad bf16 4096 BM64 w8 s4": Expect("wgmma", buffers=4, async16=True),
    "dw-quad-split bf16 4096 BM64 w8 s4": Expect("wgmma", buffers=4, async16=True),
    "dw-quad tf32 4096 BM64 w8 s3": Expect("wgmma", buffers=3),
    "dw-quad ieee 4096 BM32 w8 s5": Expect("fma", buffers=4, async16=True),
    "dw-quad bf16 784>300 BM64 w8 s4": Expect("wgmma", buffers=4),
    "dw-quad tf32 784>300 BM64 w8 s3": Expect("wgmma", buffers=3),
    "dw-quad ieee 784>300 BM32 w8 s5": Expect("fma", buffers=4),
    # K = 300 (X's and dW's rows not 16-aligned): BLOCK_M 32 on 16 warps; bf16 loses its pipelining there, as
    # the 64-wide dW does (scalar operand loads).
    "dw-quad bf16 300>100 BM32 w16 s5": Expect("wgmma"),
    "dw-quad-split bf16 300>100 BM32 w16 s5": Expect("wgmma"),
    "dw-quad tf32 300>100 BM32 w16 s5": Expect("wgmma", buffers=5),
    "dw-quad ieee 300>100 BM32 w16 s5": Expect("fma", buffers=4),
}

SM90_BODY = r"""
import torch
import fastticket.kernels.linear_dw_sgd as linear_dw_sgd
import fastticket.kernels.masked_linear as ml
import fastticket.kernels.masked_linear_dw as mld

WANTED = %r
M, N, K = 8192, 4096, 4096
BN, BK = ml.linear_tile_sizes(torch.device("cuda"), torch.bfloat16)
BUCKET = ml.live_bucket(0.4)
i32, u8, f32 = ptr(torch.int32), ptr(torch.uint8), ptr(torch.float32)
lists = dict(LIST_CHUNK=ml._LIST_CHUNK, GROUP_M=ml._GROUP_M)


def check_dw_sgd(label, t, precision, M, N, K):
    # The fused dW+SGD kernel with the config its launcher uses for `precision` (momentum and weight decay).
    fused = linear_dw_sgd.cuda_meta(precision, aligned=N %% 16 == 0 and K %% 16 == 0)
    name = f"dw+sgd {label} BM{fused['BLOCK_M']} w{fused['num_warps']} s{fused['num_stages']}"
    if name in WANTED:
        check(name, linear_dw_sgd._dw_sgd_kernel, t, t, u8, f32, f32, i32, i32, M, N, K, N, 1, K, 1, 0.1, 0.9,
              0.0, 1e-4, INPUT_PRECISION=precision, HAS_MOMENTUM=True, FIRST=False, NESTEROV=False,
              MAXIMIZE=False, HAS_WD=True, BLOCK_N=BN, BLOCK_K=BK, **fused)



ml._SMEM_BUDGET = SMEM_LIMIT_SM90  # the pruning asks an H100 for this; here no device answers
for dtype, tag, precision in ((torch.bfloat16, "bf16", None), (torch.float32, "tf32", "tf32")):
    t = ptr(dtype)
    for width in (64, 128, 256):
        for kind, named, wide in (("fwd", "x_ptr", "BLOCK_N"), ("dx", "dy_ptr", "BLOCK_K")):
            # The configs a launch at this width keeps after the autotuner's pruning (stages that fit).
            for c in ml._prune_configs(ml._cuda_configs(), {"M": M, named: Arg(dtype)}, **{wide: width}):
                cfg = f"BM{c.kwargs['BLOCK_M']} w{c.num_warps} s{c.num_stages}"
                meta = dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
                if kind == "fwd" and f"fwd {tag} N{width} {cfg}" in WANTED:
                    check(f"fwd {tag} N{width} {cfg}", ml._fwd_kernel, t, t, t, t, i32, i32, i32, M, N, K, K, 1,
                          K, 1, N, 1, BUCKET, HAS_BIAS=True, INPUT_PRECISION=precision, BLOCK_N=width, BLOCK_K=BK,
                          TILE_N=BN, **lists, **meta)
                if kind == "dx" and f"dx {tag} K{width} {cfg}" in WANTED:
                    check(f"dx {tag} K{width} {cfg}", ml._dx_kernel, t, t, t, i32, i32, i32, M, N, K, N, 1, K, 1,
                          K, 1, BUCKET, INPUT_PRECISION=precision, BLOCK_N=BN, BLOCK_K=width, TILE_K=BK, **lists,
                          **meta)
    for c in ml._dw_cuda_configs():
        name = f"dw {tag} BM{c.kwargs['BLOCK_M']} w{c.num_warps} s{c.num_stages}"
        if name in WANTED:  # the split variant (fp32 atomics): what a layer with few live tiles runs
            check(name, ml._dw_kernel, t, t, u8, f32, i32, i32, i32, i32, M, N, K, 1024, N, 1, K, 1, K, 1, K, 1,
                  BUCKET, INPUT_PRECISION=precision, ATOMIC=True, BLOCK_N=BN, BLOCK_K=BK, TILE_N=BN, TILE_K=BK,
                  **c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
    check_dw_sgd(tag, t, precision, M, N, K)
# IEEE fp32 and LeNet's odd strides: the first config a launch's pruning keeps (it reads the strides).
SHAPES = {"4096": (8192, 4096, 4096), "784>300": (256, 300, 784), "300>100": (256, 100, 300),
          "304>100": (256, 100, 304), "100>10": (256, 10, 100)}
for shape, (M, N, K) in SHAPES.items():
    for dtype, tag, precision in ((torch.float32, "ieee", "ieee"), (torch.float32, "tf32", "tf32"),
                                  (torch.bfloat16, "bf16", None)):
        t = ptr(dtype)
        fwd_strides = dict(stride_xm=K, stride_xk=1, stride_wn=K, stride_wk=1, stride_ym=N, stride_yn=1)
        c = ml._prune_configs(ml._cuda_configs(), dict(M=M, x_ptr=Arg(dtype), **fwd_strides), BLOCK_N=64,
                              INPUT_PRECISION=precision)[0]
        meta = dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
        name = f"fwd {tag} {shape} BM{c.kwargs['BLOCK_M']} w{c.num_warps} s{c.num_stages}"
        if name in WANTED:
            check(name, ml._fwd_kernel, t, t, t, t, i32, i32, i32, M, N, K, K, 1, K, 1, N, 1, BUCKET, HAS_BIAS=True,
                  INPUT_PRECISION=precision, BLOCK_N=64, BLOCK_K=BK, TILE_N=BN, **lists, **meta)
        dx_strides = dict(stride_dym=N, stride_dyn=1, stride_wn=K, stride_wk=1, stride_dxm=K, stride_dxk=1)
        c = ml._prune_configs(ml._cuda_configs(), dict(M=M, dy_ptr=Arg(dtype), **dx_strides), BLOCK_K=64,
                              INPUT_PRECISION=precision)[0]
        meta = dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
        name = f"dx {tag} {shape} BM{c.kwargs['BLOCK_M']} w{c.num_warps} s{c.num_stages}"
        if name in WANTED:
            check(name, ml._dx_kernel, t, t, t, i32, i32, i32, M, N, K, N, 1, K, 1, K, 1, BUCKET,
                  INPUT_PRECISION=precision, BLOCK_N=BN, BLOCK_K=64, TILE_K=BK, **lists, **meta)
        c = ml._dw_prune_configs(ml._dw_cuda_configs(), {"M": M})[0]
        name = f"dw {tag} {shape} BM{c.kwargs['BLOCK_M']} w{c.num_warps} s{c.num_stages}"
        if name in WANTED:  # the split variant: atomics into the compact slabs
            check(name, ml._dw_kernel, t, t, u8, f32, i32, i32, i32, i32, M, N, K, 128, N, 1, K, 1, K, 1, BK, 1,
                  BUCKET, INPUT_PRECISION=precision, ATOMIC=True, BLOCK_N=BN, BLOCK_K=BK, TILE_N=BN, TILE_K=BK,
                  **c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
        # Quad programs (kernels/masked_linear_dw.py), the first config the pruning keeps: the direct store
        # (its dW in the input dtype, stride K) and the split's atomics into the compact slabs.
        for kind, atomic in (("dw-quad", False), ("dw-quad-split", True)):
            strides = dict(stride_xm=K, stride_xk=1, stride_dwn=BK if atomic else K, stride_dwk=1)
            c = mld._dw_quad_prune_configs(mld._dw_quad_cuda_configs(), dict(M=M, x_ptr=Arg(dtype), **strides),
                                           INPUT_PRECISION=precision, BLOCK_N=2 * BN, BLOCK_K=2 * BK)[0]
            name = f"{kind} {tag} {shape} BM{c.kwargs['BLOCK_M']} w{c.num_warps} s{c.num_stages}"
            if name in WANTED:
                check(name, ml._dw_kernel, t, t, u8, f32 if atomic else t, i32, i32, i32, i32, M, N, K,
                      128 if atomic else M, N, 1, K, 1, K, 1, BK if atomic else K, 1, BUCKET,
                      INPUT_PRECISION=precision, ATOMIC=atomic, BLOCK_N=2 * BN, BLOCK_K=2 * BK, TILE_N=BN,
                      TILE_K=BK, **c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
        check_dw_sgd(f"{tag} {shape}", t, precision, M, N, K)
        name = f"sgd-slab {'fp32' if dtype == torch.float32 else tag} {shape} w8"
        if name in WANTED and tag != "tf32":
            check(name, linear_dw_sgd._sgd_slab_kernel, f32, t, u8, f32, f32, i32, i32, N, K, 0.1, 0.9, 0.0, 1e-4,
                  HAS_MOMENTUM=True, FIRST=False, NESTEROV=False, MAXIMIZE=False, HAS_WD=True, BLOCK_N=BN,
                  BLOCK_K=BK, num_warps=8)
# Controls: the main forward configuration without pipelining, and in IEEE fp32 (no tensor core).
b16 = ptr(torch.bfloat16)
check("control: fwd bf16 unpipelined", ml._fwd_kernel, b16, b16, b16, b16, i32, i32, i32, M, N, K, K, 1, K, 1, N, 1,
      BUCKET, HAS_BIAS=True, INPUT_PRECISION=None, BLOCK_N=64, BLOCK_K=BK, TILE_N=BN, **lists, BLOCK_M=128,
      num_warps=8, num_stages=1)
check("control: fwd fp32 ieee", ml._fwd_kernel, f32, f32, f32, f32, i32, i32, i32, M, N, K, K, 1, K, 1, N, 1, BUCKET,
      HAS_BIAS=True, INPUT_PRECISION="ieee", BLOCK_N=64, BLOCK_K=BK, TILE_N=BN, **lists, BLOCK_M=128, num_warps=8,
      num_stages=3)
""" % sorted(SM90_EXPECT)


@pytest.mark.skipif(ON_CUDA, reason="with a GPU every other test compiles the kernels for real")
def test_kernels_compile_for_sm90_without_a_gpu(sm90_compiled):
    missing = sorted(set(SM90_EXPECT) - set(sm90_compiled))
    assert not missing, f"configurations no longer launched (update SM90_EXPECT): {missing}"


@pytest.mark.skipif(ON_CUDA, reason="offline compile check; a GPU runs the kernels themselves")
def test_sm90_checks_catch_lost_tensor_cores_and_pipelining(sm90_compiled):
    """The checks can fail: the main forward compiled without pipelining, or in IEEE fp32, breaks its row."""
    expect = SM90_EXPECT["fwd bf16 N64 BM128 w8 s4"]
    if sm90_compiled["control: fwd bf16 unpipelined"]["specialisation"] != "launch":
        pytest.skip("this triton has no launch binder to specialise with")
    assert any("pipelining" in p for p in problems(sm90_compiled["control: fwd bf16 unpipelined"], expect))
    assert any("MMA 'fma'" in p for p in problems(sm90_compiled["control: fwd fp32 ieee"], expect))


@pytest.mark.skipif(ON_CUDA, reason="offline compile check; a GPU runs the kernels themselves")
@pytest.mark.parametrize("name", sorted(SM90_EXPECT))
def test_sm90_tensor_cores_pipelining_no_spills(name, sm90_compiled):
    assert_properties(sm90_compiled, name, SM90_EXPECT[name])
