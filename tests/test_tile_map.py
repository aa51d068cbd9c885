"""Property tests: the tile map's lists enumerate exactly the live tiles of a mask, in every form.

The oracle is `reference_live_tiles` (a plain loop over tiles); CSR, transposed CSR and COO must each
agree with it and with each other, for odd shapes, all-dead and all-live masks. The layer's cache must
rebuild after every kind of mask change a user can make.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastticket.kernels.tile_map import TileMapCache, build_stacked_tile_map, build_tile_map, reference_live_tiles
from fastticket.sparse.nn import MaskedLinear


@st.composite
def masks(draw):
    n = draw(st.integers(1, 70))
    k = draw(st.integers(1, 70))
    bn = draw(st.sampled_from([1, 3, 8, 16, 32, 64]))
    bk = draw(st.sampled_from([1, 5, 8, 16, 32, 64]))
    kind = draw(st.sampled_from(["element", "block", "dead", "live", "single"]))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    if kind == "element":
        density = draw(st.floats(0.0, 1.0))
        mask = torch.rand(n, k, generator=gen) < density
    elif kind == "block":
        tiles = torch.rand(-(-n // bn), -(-k // bk), generator=gen) < 0.4
        mask = tiles.repeat_interleave(bn, 0).repeat_interleave(bk, 1)[:n, :k] & (torch.rand(n, k, generator=gen) < 0.3)
    elif kind == "dead":
        mask = torch.zeros(n, k, dtype=torch.bool)
    elif kind == "live":
        mask = torch.ones(n, k, dtype=torch.bool)
    else:  # one live entry, anywhere (edge tiles included)
        mask = torch.zeros(n, k, dtype=torch.bool)
        mask[draw(st.integers(0, n - 1)), draw(st.integers(0, k - 1))] = True
    return mask, bn, bk


def tiles_from_csr(ptr: torch.Tensor, idx: torch.Tensor):
    ptr, idx = ptr.tolist(), idx.tolist()
    out = set()
    for r in range(len(ptr) - 1):
        row = idx[ptr[r]:ptr[r + 1]]
        assert row == sorted(row) and len(set(row)) == len(row), "each list is sorted without duplicates"
        out.update((r, c) for c in row)
    return out


@settings(max_examples=150, deadline=None)
@given(masks())
def test_lists_enumerate_exactly_the_live_tiles(case):
    mask, bn, bk = case
    tm = build_tile_map(mask, bn, bk)
    ref = reference_live_tiles(mask, bn, bk)
    expected = {tuple(t) for t in ref.nonzero().tolist()}

    assert tm.live.shape == ref.shape and torch.equal(tm.live.cpu(), ref)
    assert tm.shape == tuple(mask.shape) and tm.block == (bn, bk)
    for t in (tm.row_ptr, tm.col_idx, tm.col_ptr, tm.row_idx, tm.coo_rows, tm.coo_cols):
        assert t.dtype == torch.int32
    # forward CSR
    assert tm.row_ptr.numel() == ref.shape[0] + 1 and tm.row_ptr[0] == 0
    assert tiles_from_csr(tm.row_ptr, tm.col_idx) == expected
    # transposed lists for dX: (k-tile, n-tile) pairs
    assert tm.col_ptr.numel() == ref.shape[1] + 1 and tm.col_ptr[0] == 0
    assert {(r, c) for c, r in tiles_from_csr(tm.col_ptr, tm.row_idx)} == expected
    # COO for dW: row-major order, no duplicates
    coo = list(zip(tm.coo_rows.tolist(), tm.coo_cols.tolist()))
    assert coo == sorted(expected)
    # counts
    assert tm.n_live == len(expected) == tm.col_idx.numel() == tm.row_idx.numel()
    assert tm.live_fraction == len(expected) / ref.numel()
    assert tm.max_live_per_row == int(ref.sum(1).max())
    assert tm.max_live_per_col == int(ref.sum(0).max())


@settings(max_examples=60, deadline=None)
@given(masks(), st.sampled_from([1, 2, 3, 4]), st.sampled_from(["rows", "cols"]))
def test_grouped_lists_hold_the_union_and_per_tile_bits(case, rows, axis):
    """Grouped lists (wide programs): group g lists exactly the tile-columns live in any of its tile-rows,
    and bit r of each entry is set exactly when tile-row g*rows + r is live there."""
    mask, bn, bk = case
    tm = build_tile_map(mask, bn, bk)
    live = reference_live_tiles(mask, bn, bk)
    live = live if axis == "rows" else live.t()
    grouped = tm.grouped(axis, rows)
    assert grouped is tm.grouped(axis, rows) or rows == 1, "cached on the map"
    groups = -(-live.shape[0] // rows)
    assert grouped.groups == groups and grouped.ptr.dtype == grouped.idx.dtype == torch.int32
    ptr, idx = grouped.ptr.tolist(), grouped.idx.tolist()
    bits = grouped.bits.tolist() if grouped.bits is not None else [1] * len(idx)
    assert grouped.n_entries == len(idx) == ptr[-1]
    for g in range(groups):
        block = live[g * rows:(g + 1) * rows]
        entries = idx[ptr[g]:ptr[g + 1]]
        assert entries == block.any(0).nonzero().flatten().tolist()
        for e, c in zip(bits[ptr[g]:ptr[g + 1]], entries):
            assert e == sum(int(block[r, c]) << r for r in range(block.shape[0]))


def reference_quads(live: torch.Tensor):
    """Plain-loop oracle of the quads: [(quad row, quad col, bits, [COO index or -1 per sub-tile])]."""
    coo = {tuple(t): i for i, t in enumerate(live.nonzero().tolist())}
    out = []
    for qr in range(-(-live.shape[0] // 2)):
        for qc in range(-(-live.shape[1] // 2)):
            subs = [coo.get((2 * qr + dr, 2 * qc + dc), -1) for dr in (0, 1) for dc in (0, 1)]
            bits = sum(1 << s for s in range(4) if subs[s] >= 0)
            if bits:
                out.append((qr, qc, bits, subs))
    return out


@settings(max_examples=80, deadline=None)
@given(masks())
def test_quads_list_every_live_2x2_block_with_bits_and_coo_slabs(case):
    """The quad dW's programs: every 2 x 2 block of tiles with a live tile, row-major, its 4-bit live mask and
    each live sub-tile's COO index (edge quads of odd tile counts: the outside tiles dead)."""
    mask, bn, bk = case
    tm = build_tile_map(mask, bn, bk)
    quads = tm.quads()
    assert quads is tm.quads(), "cached on the map"
    for t in (quads.rows, quads.cols, quads.bits, quads.slabs):
        assert t.dtype == torch.int32 and t.device == mask.device
    got = list(zip(quads.rows.tolist(), quads.cols.tolist(), quads.bits.tolist(), quads.slabs.tolist()))
    assert got == reference_quads(reference_live_tiles(mask, bn, bk))
    assert quads.n_quads == len(got) and quads.slabs.shape == (len(got), 4)
    live_slabs = sorted(s for _, _, _, subs in got for s in subs if s >= 0)
    assert live_slabs == list(range(tm.n_live)), "each live tile in exactly one quad"


@settings(max_examples=40, deadline=None)
@given(st.lists(masks(), min_size=1, max_size=4), st.integers(0, 3))
def test_stacked_map_concatenates_each_arms_lists(cases, kind_seed):
    """A stacked map of A arms' masks (same shape and tiles, each its own pattern): arm a's forward list of
    tile-row r is entry a * tiles_n + r of the one concatenated CSR, its dX list entry a * tiles_k + c, each
    exactly that arm's own lists; live, live_flags and the counts are every arm's."""
    first, bn, bk = cases[0]
    n, k = first.shape
    gen = torch.Generator().manual_seed(kind_seed)
    # Every arm takes the first case's shape: its own mask where shapes agree, otherwise a fresh random one.
    stack = torch.stack([m if m.shape == first.shape else torch.rand(n, k, generator=gen) < 0.3 for m, _, _ in cases])
    sm = build_stacked_tile_map(stack, bn, bk)
    arms = stack.shape[0]
    tn, tk = -(-n // bn), -(-k // bk)
    assert sm.arms == arms and sm.shape == (n, k) and sm.tiles == (tn, tk)
    assert sm.row_ptr.numel() == arms * tn + 1 and sm.col_ptr.numel() == arms * tk + 1
    for t in (sm.row_ptr, sm.col_idx, sm.col_ptr, sm.row_idx):
        assert t.dtype == torch.int32
    row_ptr, col_idx = sm.row_ptr.tolist(), sm.col_idx.tolist()
    col_ptr, row_idx = sm.col_ptr.tolist(), sm.row_idx.tolist()
    for a in range(arms):
        one = build_tile_map(stack[a], bn, bk)
        assert torch.equal(sm.live[a], one.live)
        assert torch.equal(sm.live_flags[a], one.live.flatten().to(torch.uint8))
        for r in range(tn):
            lo, hi = row_ptr[a * tn + r], row_ptr[a * tn + r + 1]
            assert col_idx[lo:hi] == one.col_idx[one.row_ptr[r]:one.row_ptr[r + 1]].tolist()
        for c in range(tk):
            lo, hi = col_ptr[a * tk + c], col_ptr[a * tk + c + 1]
            assert row_idx[lo:hi] == one.row_idx[one.col_ptr[c]:one.col_ptr[c + 1]].tolist()
    assert sm.n_live == int(sm.live.sum()) == len(col_idx) == len(row_idx)
    assert sm.live_fraction == sm.n_live / (arms * tn * tk)


def test_stacked_map_needs_a_stacked_2d_mask():
    with pytest.raises(ValueError, match="arms, N, K"):
        build_stacked_tile_map(torch.ones(4, 5, dtype=torch.bool), 2, 2)


def test_tap_major_order_tiles_the_permuted_filter():
    """k_order="tap_major" tiles a conv mask as [C_out, kh*kw*C_in] (what the conv kernels reduce over);
    the cache keeps it apart from the mask-order map of the same mask."""
    gen = torch.Generator().manual_seed(5)
    mask = torch.rand(10, 6, 3, 3, generator=gen) < 0.2
    tm = build_tile_map(mask, 8, 16, k_order="tap_major")
    assert tm.k_order == "tap_major" and tm.shape == (10, 54)
    assert torch.equal(tm.live.cpu(), reference_live_tiles(mask.permute(0, 2, 3, 1).reshape(10, -1), 8, 16))
    assert torch.equal(tm.live.cpu(), reference_live_tiles(mask, 8, 16, k_order="tap_major"))
    cache = TileMapCache()
    assert cache.get(mask, 8, 16, k_order="tap_major") is not cache.get(mask, 8, 16)
    assert cache.get(mask, 8, 16).k_order == "mask"


def test_all_dead_and_all_live_extremes():
    dead = build_tile_map(torch.zeros(37, 53, dtype=torch.bool), 16, 16)
    assert dead.n_live == 0 and dead.live_fraction == 0.0 and dead.max_live_per_row == 0
    assert dead.row_ptr.tolist() == [0] * 4 and dead.col_ptr.tolist() == [0] * 5
    live = build_tile_map(torch.ones(37, 53, dtype=torch.bool), 16, 16)
    assert live.n_live == 12 and live.live_fraction == 1.0 and live.max_live_per_row == 4
    assert live.max_live_per_col == 3


def test_uint8_and_conv_shaped_masks():
    gen = torch.Generator().manual_seed(3)
    mask = torch.rand(8, 3, 3, 3, generator=gen) < 0.2
    tm = build_tile_map(mask.to(torch.uint8), 4, 8)
    assert torch.equal(tm.live.cpu(), reference_live_tiles(mask, 4, 8))
    assert tm.shape == (8, 27)


def random_mask(shape, density, seed):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) < density


def assert_map_matches(layer: MaskedLinear, bn=16, bk=16):
    tm = layer.tile_map(bn, bk)
    assert torch.equal(tm.live.cpu(), reference_live_tiles(layer.weight_mask, bn, bk))
    return tm


def test_cache_hits_until_the_mask_changes():
    layer = MaskedLinear(53, 37)
    layer.set_mask_(random_mask((37, 53), 0.3, 1))
    first = assert_map_matches(layer)
    assert layer.tile_map(16, 16) is first, "an unchanged mask must reuse its tile map"
    assert layer.tile_map(32, 16) is not first and layer.tile_map(32, 16).block == (32, 16)

    # set_mask_
    layer.set_mask_(random_mask((37, 53), 0.02, 2))
    second = assert_map_matches(layer)
    assert second is not first

    # in-place edit of the buffer, without telling the layer: kill every entry of tile (0, 0)
    layer.weight_mask[:16, :16] = False
    third = assert_map_matches(layer)
    assert third is not second and not bool(third.live[0, 0])

    # in-place edit followed by mask_changed_()
    layer.weight_mask[0, 0] = True
    layer.mask_changed_()
    assert bool(assert_map_matches(layer).live[0, 0])


def test_cache_rebuilds_after_load_state_dict():
    src = MaskedLinear(53, 37)
    src.set_mask_(random_mask((37, 53), 0.05, 5))
    dst = MaskedLinear(53, 37)
    before = assert_map_matches(dst)
    assert before.n_live == before.n_tiles
    dst.load_state_dict(src.state_dict())
    after = assert_map_matches(dst)
    assert torch.equal(after.live, src.tile_map(16, 16).live)
    assert after.n_live < before.n_live


def test_cache_rebuilds_when_the_buffer_is_replaced():
    cache = TileMapCache()
    mask = random_mask((20, 20), 0.5, 8)
    a = cache.get(mask, 8, 8)
    other = torch.zeros(20, 20, dtype=torch.bool)
    b = cache.get(other, 8, 8)
    assert b is not a and b.n_live == 0
