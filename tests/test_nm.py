"""N:M structured tickets (fastticket.lottery.nm): exact N:M masks, top-N per group, refill, config checks."""
import pytest
import torch
from torch import nn

from fastticket.errors import ConfigError
from fastticket.lottery.config import SearchConfig
from fastticket.lottery.nm import is_nm, nm_mask, nm_refill_mask, parse_nm
from fastticket.lottery.prune import prune, random_masks_like
from fastticket.sparse.nn import sparsify


def groups(t):
    """Independent reference: (row, group) -> list of flat positions, built with plain loops."""
    if t.dim() == 4:
        c_out, c_in, kh, kw = t.shape
        for o in range(c_out):
            for i in range(kh):
                for j in range(kw):
                    for g in range(0, c_in, 4):
                        yield [(o, c, i, j) for c in range(g, min(g + 4, c_in))]
    else:
        for o in range(t.shape[0]):
            for g in range(0, t.shape[1], 4):
                yield [(o, c) for c in range(g, min(g + 4, t.shape[1]))]


def reference_keep(scores, alive, n):
    keep = torch.zeros_like(alive)
    for group in groups(scores):
        live = [p for p in group if alive[p]]
        # highest score first; on equal scores the larger index is kept (the smaller is pruned first)
        live.sort(key=lambda p: (float(scores[p]), p), reverse=True)
        for p in live[:n]:
            keep[p] = True
    return keep


@pytest.mark.parametrize("shape", [(5, 12), (3, 10), (4, 3, 2, 2), (2, 6, 3, 1)])  # odd dims, conv, partial
@pytest.mark.parametrize("n", [1, 2, 3])
def test_top_n_per_group_against_a_loop_reference(shape, n):
    g = torch.Generator().manual_seed(n * 7 + len(shape))
    scores = torch.randn(shape, generator=g, dtype=torch.float64)
    scores.view(-1)[::5] = 0.5  # ties
    alive = torch.rand(shape, generator=g) > 0.2
    out = nm_mask(alive, scores, (n, 4))
    assert torch.equal(out, reference_keep(scores, alive, n))
    assert is_nm(out, (n, 4)) and not bool((out & ~alive).any())


def test_dense_mask_becomes_exactly_n_m_with_partial_groups():
    g = torch.Generator().manual_seed(3)
    for shape in [(6, 10), (3, 5, 3, 3)]:
        out = nm_mask(torch.ones(shape, dtype=torch.bool), torch.randn(shape, generator=g), (2, 4))
        assert is_nm(out, (2, 4), exact=True)
        for group in groups(out):
            assert sum(bool(out[p]) for p in group) == min(2, len(group))


def test_prune_with_nm_granularity_keeps_top_magnitude_and_excludes_stay_dense():
    torch.manual_seed(0)
    model = sparsify(nn.Sequential(nn.Conv2d(4, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 10)))
    w = {n: m.weight.detach().clone() for n, m in model.named_modules() if hasattr(m, "weight_mask")}
    masks = prune(model, 0.2, granularity="nm:2:4", exclude=("output",))
    assert is_nm(masks["0"], (2, 4), exact=True)
    assert torch.equal(masks["0"], reference_keep(w["0"].abs().double(), torch.ones_like(masks["0"]), 2))
    assert bool(masks["3"].all())
    assert bool((model[0].weight[~masks["0"]] == 0).all())  # the invariant: pruned entries are exact zeros


def test_refill_to_n_m_keeps_survivors_by_magnitude_and_fills_short_groups():
    g = torch.Generator().manual_seed(5)
    w = torch.randn(4, 12, generator=g, dtype=torch.float64)
    mask = torch.rand(4, 12, generator=g) > 0.7  # an element ticket at ~30%
    out = nm_refill_mask(mask, w * mask, (2, 4))
    assert is_nm(out, (2, 4), exact=True)
    for group in groups(w):
        live = sorted((p for p in group if mask[p]), key=lambda p: (abs(float(w[p])), p), reverse=True)
        for p in live[:2]:
            assert out[p]  # the strongest survivors stay
        if len(live) >= 2:
            assert all(not out[p] for p in group if not mask[p])  # nothing revived where survivors suffice


def test_random_control_is_n_m_and_dense_layers_stay_dense():
    masks = {"a": nm_mask(torch.ones(4, 8, dtype=torch.bool), torch.randn(4, 8), (2, 4)),
             "b": torch.ones(3, 3, dtype=torch.bool)}
    out = random_masks_like(masks, generator=torch.Generator().manual_seed(0), granularity="nm:2:4")
    assert is_nm(out["a"], (2, 4), exact=True) and bool(out["b"].all())


def test_parse_and_config_refuse_what_means_nothing():
    assert parse_nm("nm") == (2, 4) and parse_nm("nm:1:8") == (1, 8) and parse_nm("element") is None
    for bad in ["nm:4:2", "nm:0:4", "nm:2", "nm:a:b"]:
        with pytest.raises(ConfigError, match="nm:N:M"):
            parse_nm(bad)
    SearchConfig(granularity="nm:2:4", levels=1)
    SearchConfig(refill="nm", levels=2)
    with pytest.raises(ConfigError, match="levels 1"):
        SearchConfig(granularity="nm", levels=3)
    with pytest.raises(ConfigError, match="scope global"):
        SearchConfig(granularity="nm", levels=1, scope="global")
    with pytest.raises(ConfigError, match="granularity element"):
        SearchConfig(granularity="nm", levels=1, refill="nm")


@pytest.mark.usefixtures("one_torch_thread")
def test_a_search_with_refill_nm_records_exact_2_4_tickets(tmp_path):
    import json
    import os

    from fastticket.lottery.presets import get_preset
    from fastticket.lottery.rundir import arm_dir
    from fastticket.lottery.search import run_search
    run = str(tmp_path / "run")
    run_search(get_preset("lenet-mnist5k").replace(iterations=4, eval_every=4, levels=1, controls=(), val_size=500,
                                                  refill="nm:2:4"), run)
    here = arm_dir(run, 1, "ticket", 0)
    masks = torch.load(os.path.join(here, "mask.pt"), weights_only=True)
    with open(os.path.join(here, "result.json")) as f:
        result = json.load(f)
    assert result["refill"] == "nm:2:4" and 0.75 < result["element_density"] < 0.85  # the element ticket
    pruned = [m for m in masks.values() if not bool(m.all())]
    assert pruned and all(is_nm(m, (2, 4), exact=True) for m in pruned)


def test_pruning_at_init_to_a_count_gives_n_m_by_the_criterion():
    from fastticket.lottery.prune import prune_to_count
    torch.manual_seed(1)
    model = sparsify(nn.Sequential(nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(4 * 2 * 2, 6)))
    w0 = model[0].weight.detach().abs().double().clone()
    masks = prune_to_count(model, 0, prunable=["0"], granularity="nm:2:4")
    assert torch.equal(masks["0"], reference_keep(w0, torch.ones_like(masks["0"]), 2))
    assert bool(masks["2"].all()) and is_nm(masks["0"], (2, 4), exact=True)
