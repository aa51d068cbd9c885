"""Refilling an element-wise ticket into whole tiles (fastticket.lottery.prune.refill_mask, Chen et al. 2022)."""
import pytest
import torch
from torch import nn

from fastticket.errors import ConfigError
from fastticket.kernels.tile_map import as_2d_mask
from fastticket.sparse.nn import sparsify
from fastticket.lottery.prune import check_refill_fits, refill_mask, refill_masks


def tiles_whole(mask, r, c):
    m = as_2d_mask(mask, "tap_major" if mask.dim() == 4 else "mask")  # the tiles the kernels skip
    for i in range(0, m.shape[0], r):
        for j in range(0, m.shape[1], c):
            t = m[i:i + r, j:j + c]
            if bool(t.any()) and not bool(t.all()):
                return False
    return True


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_density_exact_with_whole_tiles_when_the_count_is_a_tile_multiple(seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(16, 24, generator=g, dtype=torch.float64)
    mask = torch.zeros(16 * 24, dtype=torch.bool)
    mask[torch.randperm(16 * 24, generator=g)[:5 * 16]] = True  # 80 alive = 5 tiles of 4x4
    out = refill_mask(mask.reshape(16, 24), w, (4, 4))
    assert int(out.sum()) == 80
    assert tiles_whole(out, 4, 4)


def test_keeps_the_tiles_with_the_most_surviving_magnitude():
    w = torch.zeros(4, 4, dtype=torch.float64)
    mask = torch.zeros(4, 4, dtype=torch.bool)
    # tile (0,0): one big survivor; tile (1,1): three small survivors; tile (0,1): big weight but pruned
    w[0, 0], mask[0, 0] = 5.0, True
    w[2:4, 2:4] = 1.0
    mask[2, 2] = mask[2, 3] = mask[3, 2] = True
    w[0, 3] = 100.0
    out = refill_mask(mask, w, (2, 2))  # 4 alive -> 1 tile of 4
    expect = torch.zeros(4, 4, dtype=torch.bool)
    expect[0:2, 0:2] = True
    assert torch.equal(out, expect)


def test_random_shapes_stay_within_half_a_tile_and_only_tiles_holding_survivors():
    g = torch.Generator().manual_seed(3)
    for _ in range(20):
        n, k = int(torch.randint(3, 30, (1,), generator=g)), int(torch.randint(3, 30, (1,), generator=g))
        r, c = int(torch.randint(1, 5, (1,), generator=g)), int(torch.randint(1, 5, (1,), generator=g))
        w = torch.randn(n, k, generator=g)
        mask = torch.rand(n, k, generator=g) < float(torch.rand(1, generator=g))
        if r >= n and c >= k:
            continue
        out = refill_mask(mask, w, (r, c))
        assert tiles_whole(out, r, c)
        if int(mask.sum()) == 0:
            assert not bool(out.any())
            continue
        assert abs(int(out.sum()) - int(mask.sum())) <= r * c / 2 or int(out.sum()) <= r * c  # at least one tile
        # a kept tile holds at least one surviving weight: masks only shrink across refilled levels
        m2, o2 = mask.reshape(n, -1), out.reshape(n, -1)
        for i in range(0, n, r):
            for j in range(0, k, c):
                if bool(o2[i:i + r, j:j + c].any()):
                    assert bool(m2[i:i + r, j:j + c].any())


def test_conv_weights_are_refilled_in_the_conv_kernels_tiles():
    torch.manual_seed(0)
    model = sparsify(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 10)))
    masks = {"0": torch.rand(8, 3, 3, 3) < 0.5, "2": torch.ones(10, 128, dtype=torch.bool)}
    out = refill_masks(model, masks, (4, 9), ["0"])
    assert out["0"].shape == (8, 3, 3, 3)
    assert tiles_whole(out["0"], 4, 9)
    assert torch.equal(out["2"], masks["2"])  # not in the refilled (prunable) set


def test_a_tile_covering_a_whole_layer_is_a_clear_error():
    model = sparsify(nn.Sequential(nn.Linear(20, 10), nn.Linear(10, 4)))
    with pytest.raises(ConfigError, match=r"larger than layer '1' \(4x10"):
        check_refill_fits(model, (16, 16), ["0", "1"])
    check_refill_fits(model, (8, 8), ["0", "1"])  # edge tiles hanging over a layer are fine
    with pytest.raises(ConfigError, match="covers a whole"):
        refill_mask(torch.ones(4, 10, dtype=torch.bool), torch.randn(4, 10), (16, 16))
