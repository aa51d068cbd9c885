"""fastticket.lottery.prune: exact counts, masks only shrink, deterministic ties, block tiles, criteria, controls."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fastticket.errors import ConfigError
from fastticket.sparse.nn import masked_modules, sparsify
from fastticket.lottery.prune import parse_granularity, prune, random_masks_like, remove_count


class Small(nn.Module):
    """conv -> fc -> output: one layer of each kind the layerwise rates distinguish."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 6, 3)
        self.fc = nn.Linear(6 * 4 * 4, 40)
        self.output = nn.Linear(40, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(torch.relu(self.fc(torch.relu(self.conv(x)).flatten(1))))


def small_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return sparsify(Small())


def retrain_(model: nn.Module, seed: int) -> None:
    """Stand-in for training: new random weights, pruned entries kept at zero (the invariant)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in masked_modules(model):
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=g))
            layer.apply_mask_()


def alive(model: nn.Module) -> dict:
    return {name: int(layer.weight_mask.sum()) for name, layer in masked_modules(model)}


def expected_after(alive_count: int, rate_hundredths: int) -> int:
    # floor(rate * alive + 1/2) in integers: the documented round-half-up on the decimal rate.
    return alive_count - (alive_count * rate_hundredths + 50) // 100


def test_remove_count_rounds_half_up_on_the_decimal_rate():
    assert remove_count(0.2, 5) == 1          # exactly 1.0, no binary drift
    assert remove_count(0.1, 15) == 2         # 1.5 rounds up
    assert remove_count(0.1, 25) == 3         # 2.5 rounds up (not half-even)
    assert remove_count(0.1, 14) == 1         # 1.4 rounds down
    assert remove_count(0.3, 10) == 3         # 0.3 * 10 is 3.0000000000000004 in binary; still 3
    assert remove_count(0.7, 10) == 7
    assert remove_count(0.5, 0) == 0


def test_layerwise_exact_counts_per_level_each_layer_at_its_rate():
    model = small_model()
    rates = {"conv": 15, "fc": 20, "output": 10}  # hundredths
    expected = alive(model)
    for level in range(1, 8):
        retrain_(model, level)
        before = {n: l.weight_mask.clone() for n, l in masked_modules(model)}
        masks = prune(model, 0.2, conv_rate=0.15, output_rate=0.1)
        expected = {n: expected_after(c, rates[n]) for n, c in expected.items()}
        assert alive(model) == expected, f"level {level}"
        for name, layer in masked_modules(model):
            assert torch.equal(masks[name], layer.weight_mask)
            assert not (layer.weight_mask & ~before[name]).any(), "a mask grew"
            assert (layer.weight[~layer.weight_mask] == 0).all()
    # The counts follow (1 - r)^L up to the per-level rounding.
    sizes = {n: l.weight.numel() for n, l in masked_modules(model)}
    for name, r in (("conv", 0.15), ("fc", 0.2), ("output", 0.1)):
        assert abs(expected[name] / sizes[name] - (1 - r) ** 7) < 7 / sizes[name] + 1e-9


def test_layerwise_removes_the_smallest_magnitudes():
    model = small_model()
    before = {n: (l.weight.detach().abs().clone(), l.weight_mask.clone()) for n, l in masked_modules(model)}
    prune(model, 0.3)
    for name, layer in masked_modules(model):
        mags, old = before[name]
        removed = old & ~layer.weight_mask
        kept = layer.weight_mask
        assert removed.any()
        assert mags[removed].max() <= mags[kept].min()


def test_global_scope_one_threshold_with_exclusions():
    model = small_model()
    # Scale the fc layer down so a global threshold takes far more from it than from conv.
    with torch.no_grad():
        model.fc.weight.mul_(0.01)
    out_before = model.output.weight.detach().clone()
    prunable = ["conv", "fc"]
    total = sum(getattr(model, n).weight.numel() for n in prunable)
    mags = {n: getattr(model, n).weight.detach().abs().clone() for n in prunable}
    prune(model, 0.25, scope="global", exclude=["output"])
    counts = alive(model)
    assert counts["output"] == model.output.weight.numel()  # excluded: still dense
    assert torch.equal(model.output.weight, out_before)
    assert counts["conv"] + counts["fc"] == total - remove_count(0.25, total)
    assert counts["fc"] / model.fc.weight.numel() < counts["conv"] / model.conv.weight.numel()
    kept = torch.cat([mags[n][getattr(model, n).weight_mask] for n in prunable])
    removed = torch.cat([mags[n][~getattr(model, n).weight_mask] for n in prunable])
    assert removed.max() <= kept.min()


def test_exclude_by_pattern_in_layerwise_scope():
    model = small_model()
    prune(model, 0.5, exclude=["f*"])
    counts = alive(model)
    assert counts["fc"] == model.fc.weight.numel()
    assert counts["conv"] < model.conv.weight.numel() and counts["output"] < model.output.weight.numel()


def test_ties_are_broken_by_flat_index_deterministically():
    model = small_model()
    with torch.no_grad():
        for _, layer in masked_modules(model):
            layer.weight.fill_(0.5)
    prune(model, 0.2)
    for _, layer in masked_modules(model):
        flat = layer.weight_mask.flatten()
        k = remove_count(0.2, flat.numel())
        assert not flat[:k].any() and flat[k:].all(), "equal scores: the lowest flat indices go first"
    # Second pruning among survivors with ties: again the lowest surviving indices.
    prune(model, 0.2)
    flat = model.fc.weight_mask.flatten()
    k1 = remove_count(0.2, flat.numel())
    k2 = remove_count(0.2, flat.numel() - k1)
    assert not flat[:k1 + k2].any() and flat[k1 + k2:].all()


def test_block_granularity_prunes_whole_tiles_including_edge_tiles():
    lin = sparsify(nn.Sequential(nn.Linear(13, 10), nn.Linear(10, 3)))
    torch.manual_seed(1)
    with torch.no_grad():
        lin[0].weight.copy_(torch.randn(10, 13))
    # 4x4 tiles of a 10x13 weight: 3 x 4 = 12 tiles, the last row and column of tiles are partial.
    prune(lin, 0.25, granularity="block:4x4", exclude=["1"])
    mask = lin[0].weight_mask
    tiles_dead = 0
    for ti in range(3):
        for tj in range(4):
            tile = mask[ti * 4:(ti + 1) * 4, tj * 4:(tj + 1) * 4]
            assert tile.all() or not tile.any(), f"tile {(ti, tj)} partially pruned"
            tiles_dead += int(not tile.any())
            if not tile.any():
                assert (lin[0].weight[ti * 4:(ti + 1) * 4, tj * 4:(tj + 1) * 4] == 0).all()
    assert tiles_dead == remove_count(0.25, 12) == 3


def test_block_edge_tiles_are_normalised_by_their_size():
    lin = sparsify(nn.Sequential(nn.Linear(5, 4), nn.Linear(4, 2)))
    with torch.no_grad():
        # 4x4 tiles over [4, 5]: a full tile (16 entries of 0.3) and an edge tile (4 entries of 0.5).
        # Sum-L1 would prune the edge tile (2.0 < 4.8); mean-|w| prunes the full one (0.3 < 0.5).
        lin[0].weight.fill_(0.3)
        lin[0].weight[:, 4] = 0.5
    prune(lin, 0.5, granularity="block:4x4", exclude=["1"])
    assert lin[0].weight_mask[:, 4].all() and not lin[0].weight_mask[:, :4].any()


def test_block_granularity_on_conv_prunes_the_conv_kernels_tiles():
    # Blocks are tiles of the filter in the conv kernels' tap-major K order (kh, kw, C_in), so every pruned
    # block is a tile the kernels skip; the mask buffer keeps its [C_out, C_in, kh, kw] layout.
    from fastticket.kernels.tile_map import as_2d_mask, build_tile_map

    model = small_model()
    prune(model, 0.5, granularity="block:2x6", exclude=["fc", "output"])
    m2d = as_2d_mask(model.conv.weight_mask, "tap_major")  # [6, 18]: 3 x 3 tiles of 2x6
    assert build_tile_map(model.conv.weight_mask, 2, 6, "tap_major").n_live == 9 - remove_count(0.5, 9)
    for ti in range(3):
        for tj in range(3):
            tile = m2d[ti * 2:(ti + 1) * 2, tj * 6:(tj + 1) * 6]
            assert tile.all() or not tile.any()
    assert int(m2d.sum()) == (9 - remove_count(0.5, 9)) * 12


def test_block_l2_norm():
    lin = sparsify(nn.Sequential(nn.Linear(4, 2), nn.Linear(2, 2)))
    with torch.no_grad():
        # tile 0 (cols 0-1): |w| = 1, 1, 1, 1 (L1 mean 1, RMS 1); tile 1 (cols 2-3): 0, 0, 0, 1.9
        # (L1 mean 0.475, RMS 0.95). Both norms prune tile 1 here; with 2.1 instead, RMS keeps it.
        lin[0].weight.copy_(torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 2.1]]))
    masks_l1 = prune(lin, 0.5, granularity="block:2x2", exclude=["1"], apply=False)
    masks_l2 = prune(lin, 0.5, granularity="block:2x2", exclude=["1"], apply=False, block_norm="l2")
    assert masks_l1["0"][:, :2].all() and not masks_l1["0"][:, 2:].any()
    assert masks_l2["0"][:, 2:].all() and not masks_l2["0"][:, :2].any()


def test_movement_criterion_keeps_weights_that_grew():
    lin = sparsify(nn.Sequential(nn.Linear(4, 1), nn.Linear(1, 1)))
    initial = torch.tensor([[0.9, 0.1, 0.5, 0.0]])
    with torch.no_grad():
        lin[0].weight.copy_(torch.tensor([[1.0, 0.6, 0.4, 0.2]]))  # growth: +0.1, +0.5, -0.1, +0.2
    masks = prune(lin, 0.5, criterion="movement", initial={"0": initial}, exclude=["1"], apply=False)
    assert masks["0"].tolist() == [[False, True, False, True]]
    # magnitude would keep the two largest instead
    masks = prune(lin, 0.5, criterion="magnitude", exclude=["1"], apply=False)
    assert masks["0"].tolist() == [[True, True, False, False]]
    # a state dict works as `initial` too
    masks = prune(lin, 0.5, criterion="movement", initial={"0.weight": initial}, exclude=["1"], apply=False)
    assert masks["0"].tolist() == [[False, True, False, True]]
    with pytest.raises(ConfigError, match="initial"):
        prune(lin, 0.5, criterion="movement")


def test_random_criterion_exact_count_and_seeded():
    def masks(seed):
        model = small_model()
        return prune(model, 0.3, criterion="random", generator=torch.Generator().manual_seed(seed))
    a, b, c = masks(1), masks(1), masks(2)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], c[n]) for n in a)
    for name, m in a.items():
        assert int(m.sum()) == m.numel() - remove_count(0.3, m.numel())


@pytest.mark.parametrize("rate", [0, 1, -0.1, 1.5, float("nan"), "0.2", True])
def test_bad_rate_is_a_clear_error(rate):
    with pytest.raises(ConfigError, match=r"must be in \(0, 1\)"):
        prune(small_model(), rate)


def test_bad_conv_rate_and_scope_and_criterion():
    with pytest.raises(ConfigError, match="conv_rate"):
        prune(small_model(), 0.2, conv_rate=1.0)
    with pytest.raises(ConfigError, match="scope"):
        prune(small_model(), 0.2, scope="sideways")
    with pytest.raises(ConfigError, match="criterion"):
        prune(small_model(), 0.2, criterion="vibes")


@pytest.mark.parametrize("spec", ["block", "block:0x4", "block:4", "block:4x", "blocks:4x4", "tile:2x2", ""])
def test_bad_granularity(spec):
    with pytest.raises(ConfigError, match="granularity"):
        parse_granularity(spec)


def test_parse_granularity():
    assert parse_granularity("element") is None
    assert parse_granularity("block:16x32") == (16, 32)


def test_random_masks_like_keeps_per_layer_counts_exactly():
    model = small_model()
    prune(model, 0.4, conv_rate=0.2, output_rate=0.1)
    ticket = {n: l.weight_mask.clone() for n, l in masked_modules(model)}
    r1 = random_masks_like(model, generator=torch.Generator().manual_seed(0))
    r2 = random_masks_like(ticket, generator=torch.Generator().manual_seed(0))
    r3 = random_masks_like(ticket, generator=torch.Generator().manual_seed(1))
    for name, m in ticket.items():
        assert r1[name].dtype == torch.bool and r1[name].shape == m.shape
        assert int(r1[name].sum()) == int(m.sum())
        assert torch.equal(r1[name], r2[name])
        assert not torch.equal(r1[name], m)
        assert not torch.equal(r1[name], r3[name])
    explicit = random_masks_like(ticket, densities={"fc": 0.25}, generator=torch.Generator().manual_seed(0))
    assert int(explicit["fc"].sum()) == round(0.25 * ticket["fc"].numel())


def test_random_masks_like_block_granularity_keeps_tile_counts():
    model = small_model()
    prune(model, 0.5, granularity="block:4x8")
    masks = random_masks_like(model, generator=torch.Generator().manual_seed(0), granularity="block:4x8")
    from fastticket.lottery.prune import alive_units
    for name, layer in masked_modules(model):
        assert int(alive_units(masks[name], (4, 8)).sum()) == int(alive_units(layer.weight_mask, (4, 8)).sum())


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 40), k=st.integers(1, 40), rate=st.sampled_from([0.05, 0.1, 0.2, 0.25, 0.5, 0.9]),
       seed=st.integers(0, 1000), scope=st.sampled_from(["layerwise", "global"]))
def test_exact_counts_property(n, k, rate, seed, scope):
    torch.manual_seed(seed)
    model = sparsify(nn.Sequential(nn.Linear(k, n), nn.Linear(n, 3)))
    with torch.no_grad():
        # Few distinct values: many ties, which must not change the count.
        model[0].weight.copy_(torch.randint(0, 3, (n, k)).float())
    old = model[0].weight_mask.clone()
    prune(model, rate, scope=scope, exclude=["1"])
    removed = int(old.sum()) - int(model[0].weight_mask.sum())
    expected = remove_count(rate, n * k)
    if scope == "layerwise":
        expected = min(expected, n * k - 1)  # layerwise never empties a layer
    assert removed == expected
    assert math.isclose(remove_count(rate, n * k), math.floor(rate * n * k + 0.5), abs_tol=1)
