"""Dynamic sparse training controls (issue 23): SET and RigL's drop/regrow, alone and inside a search."""
import csv
import json
import math
import os

import pytest
import torch
from torch import nn

import fastticket.lottery.engine as engine_mod
from fastticket.errors import ConfigError
from fastticket.lottery import dst, stop
from fastticket.lottery.config import SearchConfig
from fastticket.lottery.criteria import alive_units, tile_norms
from fastticket.lottery.engine import make_optimizer
from fastticket.lottery.presets import get_preset
from fastticket.lottery.rundir import arm_dir
from fastticket.lottery.search import run_search
from fastticket.sparse.nn import masked_modules, sparsify

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _mask(shape, density, g):
    return torch.rand(shape, generator=g) < density


# ------------------------------------------------------------------------------------------ pure functions

def test_cosine_update_fraction():
    assert dst.update_fraction(0, 0.3, 100) == pytest.approx(0.3)
    assert dst.update_fraction(50, 0.3, 100) == pytest.approx(0.15)
    assert dst.update_fraction(25, 0.3, 100) == pytest.approx(0.15 * (1 + math.cos(math.pi / 4)))
    assert dst.update_fraction(100, 0.3, 100) == 0.0 and dst.update_fraction(140, 0.3, 100) == 0.0
    assert dst.end_step(1000, 0.75) == 750
    due = [t for t in range(1, 1001) if dst.update_due(t, 100, 750)]
    assert due == [100, 200, 300, 400, 500, 600, 700]


def test_element_drop_regrow_matches_a_reference():
    g = torch.Generator().manual_seed(1)
    mask = _mask((13, 17), 0.4, g)
    weight = torch.randn(13, 17, generator=g, dtype=torch.float64) * mask
    grad = torch.randn(13, 17, generator=g, dtype=torch.float64)
    new = dst.drop_regrow(mask, weight, grad.abs().reshape(-1), 0.3)
    # Reference by plain Python sorting over positions.
    flat_m, flat_w, flat_g = mask.reshape(-1).tolist(), weight.reshape(-1).tolist(), grad.reshape(-1).tolist()
    live = [i for i, m in enumerate(flat_m) if m]
    dead = [i for i, m in enumerate(flat_m) if not m]
    k = min(math.floor(0.3 * len(live)), len(dead))
    assert k > 0
    drop = sorted(live, key=lambda i: (abs(flat_w[i]), i))[:k]
    grow = sorted(dead, key=lambda i: (-abs(flat_g[i]), i))[:k]
    expected = set(live) - set(drop) | set(grow)
    assert set(torch.nonzero(new.reshape(-1)).reshape(-1).tolist()) == expected
    assert int(new.sum()) == int(mask.sum())  # the count never changes


def test_block_drop_regrow_moves_whole_tiles_by_tile_norms():
    g = torch.Generator().manual_seed(2)
    block = (2, 3)
    tiles = _mask((4, 5), 0.5, g)  # a 8x15 weight: 4x5 tiles of 2x3
    mask = tiles.repeat_interleave(2, 0).repeat_interleave(3, 1)
    weight = torch.randn(8, 15, generator=g, dtype=torch.float64) * mask
    grad = torch.randn(8, 15, generator=g, dtype=torch.float64)
    score = tile_norms(grad, block, "l1").reshape(-1)
    new = dst.drop_regrow(mask, weight, score, 0.5, block)
    new_tiles = alive_units(new, block)
    # Whole tiles: the element mask is its tile grid expanded.
    assert torch.equal(new, new_tiles.repeat_interleave(2, 0).repeat_interleave(3, 1))
    assert int(new_tiles.sum()) == int(tiles.sum())
    wn, live = tile_norms(weight, block, "l1").reshape(-1).tolist(), tiles.reshape(-1).tolist()
    live_i = [i for i, m in enumerate(live) if m]
    dead_i = [i for i, m in enumerate(live) if not m]
    k = min(math.floor(0.5 * len(live_i)), len(dead_i))
    drop = sorted(live_i, key=lambda i: (wn[i], i))[:k]
    grow = sorted(dead_i, key=lambda i: (-score[i].item(), i))[:k]
    assert set(torch.nonzero(new_tiles.reshape(-1)).reshape(-1).tolist()) == set(live_i) - set(drop) | set(grow)


def _mlp(seed):
    torch.manual_seed(seed)
    model = sparsify(nn.Sequential(nn.Linear(6, 9), nn.ReLU(), nn.Linear(9, 4)).double())
    g = torch.Generator().manual_seed(seed)
    for _, m in masked_modules(model):
        m.set_mask_(_mask(m.weight.shape, 0.5, g))
    return model


def test_dense_gradient_is_dy_t_x_on_pruned_entries_too():
    model = _mlp(3)
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(5, 6, generator=g, dtype=torch.float64), torch.randint(0, 4, (5,), generator=g)
    grads = dst.dense_gradients(model, x, y, ["0", "2"])
    w0, b0, w2, b2 = (p.detach() for p in model.parameters())
    h = torch.relu(x @ w0.T + b0)
    out = h @ w2.T + b2
    dout = (torch.softmax(out, 1) - torch.nn.functional.one_hot(y, 4).double()) / 5
    assert torch.allclose(grads["2"], dout.T @ h, atol=1e-12)
    dh = (dout @ w2) * (h > 0)
    assert torch.allclose(grads["0"], dh.T @ x, atol=1e-12)
    assert bool((grads["2"][~model[2].weight_mask] != 0).any())  # dense: the pruned entries have a gradient
    assert all(p.grad is None for p in model.parameters())  # the model itself untouched


@pytest.mark.parametrize("method", ["set", "rigl"])
def test_update_keeps_counts_regrows_dead_at_zero_with_zero_state(method):
    model = _mlp(5)
    config = SearchConfig(optimizer="adam", lr=0.01)
    opt = make_optimizer(config, model)
    g = torch.Generator().manual_seed(6)
    x, y = torch.randn(8, 6, generator=g, dtype=torch.float64), torch.randint(0, 4, (8,), generator=g)
    for _ in range(3):  # optimizer state everywhere live
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    before = {n: m.weight_mask.clone() for n, m in masked_modules(model)}
    versions = {n: m.mask_version for n, m in masked_modules(model)}
    grads = dst.dense_gradients(model, x, y, list(before)) if method == "rigl" else None
    gen = dst.set_generator(0, 1, 0, 100) if method == "set" else None
    moved = dst.update_(model, opt, method, 0.3, None, list(before), grads, gen)
    for name, m in masked_modules(model):
        old, new = before[name], m.weight_mask
        regrown = new & ~old
        assert int(new.sum()) == int(old.sum()) and moved[name] == int(regrown.sum()) > 0
        assert m.mask_version > versions[name]
        assert bool((m.weight[regrown] == 0).all()) and bool((m.weight[~new] == 0).all())
        for value in opt.state[m.weight].values():
            if torch.is_tensor(value) and value.shape == m.weight.shape:
                assert bool((value[regrown] == 0).all()) and bool((value[~new] == 0).all())
        if method == "rigl":  # the regrown are the k largest |grad| among the previously dead
            score = grads[name].abs().masked_fill(old, -1)
            k = int(regrown.sum())
            top = torch.topk(score.reshape(-1), k).indices
            assert set(top.tolist()) == set(torch.nonzero(regrown.reshape(-1)).reshape(-1).tolist())
    # The next step keeps every pruned weight exactly zero.
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    assert all(bool((m.weight[~m.weight_mask] == 0).all()) for _, m in masked_modules(model))


def test_set_draws_are_a_function_of_the_step():
    a = torch.rand(5, generator=dst.set_generator(3, 1, 0, 200))
    assert torch.equal(a, torch.rand(5, generator=dst.set_generator(3, 1, 0, 200)))
    assert not torch.equal(a, torch.rand(5, generator=dst.set_generator(3, 1, 0, 300)))


@pytest.mark.parametrize("changes", [dict(dst_interval=0), dict(dst_drop_fraction=0.0), dict(dst_end=1.5)])
def test_bad_settings_are_one_line_config_errors(changes):
    with pytest.raises(ConfigError, match=next(iter(changes))):
        SearchConfig(**changes)


def test_cli_flags_set_the_dst_settings(capsys, tmp_path):
    from fastticket.app import cli
    parser = cli.build_parser()
    config = cli.config_from_args(parser.parse_args(["search", "--controls", "rigl,set", "--dst-interval", "50",
                                                     "--dst-drop-fraction", "0.5", "--dst-end", "0.5"]))
    assert (config.controls, config.dst_interval, config.dst_drop_fraction, config.dst_end) == (
        ("rigl", "set"), 50, 0.5, 0.5)
    assert cli.main(["search", "--dst-end", "1.5", "--out", str(tmp_path / "x")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "dst_end must be in (0, 1]" in err[0]


# ----------------------------------------------------------------------------------------- in a search

def tiny(**changes):
    base = dict(iterations=12, eval_every=4, levels=1, controls=("rigl", "set"), val_size=300, dst_interval=2,
                dst_drop_fraction=0.3, dst_end=0.75)
    base.update(changes)
    return get_preset("lenet-mnist5k").replace(**base)


def _load(run, arm, name):
    return torch.load(os.path.join(arm_dir(run, 1, arm, 0), name), map_location="cpu", weights_only=True)


def test_search_with_rigl_and_set(tmp_path, monkeypatch):
    """Every step: the dynamic arms' pruned weights and their optimizer state are exact zeros and the count per
    layer is the ticket's; the mask moves at update steps only."""
    seen = {}  # id(model) -> (model, [(iteration, masks, arm)])
    real_step = engine_mod.Engine.step

    def step(self, iteration):
        losses = real_step(self, iteration)
        self.sync_out()
        for s in self.states:
            arm = getattr(s, "_arm", None)
            masks = {n: m.weight_mask.clone() for n, m in masked_modules(s.model)}
            for n, m in masked_modules(s.model):
                assert bool((m.weight[~m.weight_mask] == 0).all()), f"revived at {iteration}"
                for v in s.optimizer.state.get(m.weight, {}).values():
                    if torch.is_tensor(v) and v.shape == m.weight.shape:
                        assert bool((v[~m.weight_mask] == 0).all())
            # Keyed by the model itself (kept alive here): an id() alone is reused once a level's model is
            # freed, which would splice two models' histories together.
            seen.setdefault(id(s.model), (s.model, []))[1].append((iteration + 1, masks, arm))
        return losses

    monkeypatch.setattr(engine_mod.Engine, "step", step)
    config = tiny(granularity="element")
    out = str(tmp_path / "run")
    run_search(config, out, progress=False)
    ticket = json.load(open(os.path.join(arm_dir(out, 1, "ticket", 0), "result.json")))
    for arm in ("rigl", "set"):
        result = json.load(open(os.path.join(arm_dir(out, 1, arm, 0), "result.json")))
        assert result["dst"] == arm and result["status"] == "ok"
        assert result["layer_density"] == ticket["layer_density"]
        start, final = _load(out, arm, "mask.pt"), _load(out, arm, "final_mask.pt")
        assert any(not torch.equal(start[n], final[n]) for n in start)
        assert all(int(start[n].sum()) == int(final[n].sum()) for n in start)
        assert torch.equal(_load(out, arm, "final.pt")["fc.0.weight_mask"], final["fc.0"])
    # Each level-1 model's history: the mask changes only right after an update step (2, 4, 6, 8; T_end = 9).
    moving = 0
    for _, history in seen.values():
        for (it_a, a, _), (it_b, b, _) in zip(history, history[1:]):
            changed = any(not torch.equal(a[n], b[n]) for n in a)
            if changed:
                assert it_a in (2, 4, 6, 8), it_a
                moving += 1
            assert all(int(a[n].sum()) == int(b[n].sum()) for n in a)
    assert moving >= 2 * 4 - 1  # both arms move at (nearly) every update
    from fastticket.app.report import make_report
    make_report(out)
    with open(os.path.join(out, "report", "results.csv")) as f:
        rows = list(csv.DictReader(f))
    arms = {r["arm"] for r in rows if r["level"] == "1"}
    assert {"ticket", "rigl", "set"} <= arms
    dens = {r["arm"]: r["weights_remaining_pct"] for r in rows if r["level"] == "1"}
    assert dens["rigl"] == dens["set"] == dens["ticket"]


def test_block_rigl_search_keeps_whole_tiles(tmp_path):
    out = str(tmp_path / "run")
    run_search(tiny(granularity="block:4x4", controls=("rigl",)), out, progress=False)
    start, final = _load(out, "rigl", "mask.pt"), _load(out, "rigl", "final_mask.pt")
    assert any(not torch.equal(start[n], final[n]) for n in start)
    for n, m in final.items():
        tiles = alive_units(m, (4, 4))
        full = tiles.repeat_interleave(4, 0).repeat_interleave(4, 1)[:m.shape[0], :m.shape[1]]
        assert torch.equal(m, full), n
        assert int(tiles.sum()) == int(alive_units(start[n], (4, 4)).sum())


class _Killed(Exception):
    pass


@pytest.mark.filterwarnings("error::UserWarning")  # a resumed dynamic arm must not "revive" weights
def test_resume_after_a_kill_mid_training_is_identical(tmp_path, monkeypatch):
    whole = str(tmp_path / "whole")
    run_search(tiny(), whole, progress=False)
    real_check = stop.check

    def check(where=""):
        if "iteration 4 of level 1" in where:  # after the updates at 2 and 4, before those at 6 and 8
            raise _Killed(where)
        real_check(where)

    cut = str(tmp_path / "cut")
    monkeypatch.setattr(stop, "check", check)
    with pytest.raises(_Killed):
        run_search(tiny(), cut, progress=False)
    ckpt = _load(cut, "set", "checkpoint.pt")
    assert ckpt["iteration"] == 4
    assert not torch.equal(ckpt["model"]["fc.0.weight_mask"], _load(cut, "set", "mask.pt")["fc.0"])
    monkeypatch.setattr(stop, "check", real_check)
    run_search(tiny(), cut, resume=True, progress=False)
    for arm in ("rigl", "set"):
        a, b = _load(whole, arm, "final.pt"), _load(cut, arm, "final.pt")
        assert all(torch.equal(a[k], b[k]) for k in a), arm
        ra = json.load(open(os.path.join(arm_dir(whole, 1, arm, 0), "result.json")))
        rb = json.load(open(os.path.join(arm_dir(cut, 1, arm, 0), "result.json")))
        ra.pop("wall_time_s"), rb.pop("wall_time_s")
        assert ra == rb
    # The ticket stacked with them (its engine rebuilt at every update) gets its numbers as if alone.
    alone = str(tmp_path / "alone")
    run_search(tiny(controls=()), alone, progress=False)
    a, b = _load(alone, "ticket", "final.pt"), _load(whole, "ticket", "final.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_dense_gradient_of_masks_on_any_weight_embedding_and_attention():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.attn, self.out = nn.Embedding(10, 6), nn.MultiheadAttention(6, 2, batch_first=True), nn.Linear(6, 3)

        def forward(self, x):
            h = self.emb(x)
            return self.out(self.attn(h, h, h)[0].mean(1))

    torch.manual_seed(7)
    model = sparsify(Net().double())
    g = torch.Generator().manual_seed(8)
    for _, layer in masked_modules(model):
        layer.set_mask_(_mask(layer.weight.shape, 0.5, g))
    x, y = torch.randint(0, 10, (4, 5), generator=g), torch.randint(0, 3, (4,), generator=g)
    names = [n for n, _ in masked_modules(model)]
    assert "attn.in_proj_weight" in names and "emb" in names
    grads = dst.dense_gradients(model, x, y, names)
    plain = Net().double()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.endswith("_mask")})
    nn.functional.cross_entropy(plain(x), y).backward()
    expected = {"emb": plain.emb.weight.grad, "attn.in_proj_weight": plain.attn.in_proj_weight.grad,
                "attn.out_proj": plain.attn.out_proj.weight.grad, "out": plain.out.weight.grad}
    for n in names:
        assert torch.allclose(grads[n], expected[n], atol=1e-12), n
