"""--stability (fastticket.lottery.stability): each training arm's twin under another data order, the test error
along the line between their final weights, instability in results, report and comparison; batched equals
one at a time; a killed search resumes to the same numbers."""
import csv
import os
import subprocess
import sys

import pytest
import torch

import fastticket.lottery.data as data_module
from fastticket.errors import ConfigError
from fastticket.lottery import stability
from fastticket.lottery.config import SearchConfig
from fastticket.lottery.plans import SearchState
from fastticket.lottery.presets import get_preset
from fastticket.lottery.rundir import arm_dir
from fastticket.lottery.search import run_search

from run_snapshot import ONE_THREAD_ENV, run_dir_snapshot

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny(**changes):
    base = dict(model="lenet300", iterations=16, eval_every=8, levels=1, controls=["reinit"], val_size=100,
                batch_size=16, stability=5)
    base.update(changes)
    return get_preset("lenet-mnist5k").replace(**base)


@pytest.fixture
def float64_data(monkeypatch):
    """The search in float64 with a 300-image test split (evaluation dominates these tiny runs)."""
    real = data_module.load_dataset

    def load(*args, **kwargs):
        data = real(*args, **kwargs)
        data.test.x, data.test.y = data.test.x[:300], data.test.y[:300]
        for split in (data.train, data.val, data.test):
            split.x = split.x.to(torch.float64)
        return data

    monkeypatch.setattr(data_module, "load_dataset", load)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def _final(run, level, arm, trial=0):
    return torch.load(os.path.join(arm_dir(run, level, arm, trial), "final.pt"), weights_only=True)


def _measured(rows):
    return [r for r in rows if "instability" in r]


def test_same_data_order_gives_zero_instability(tmp_path, float64_data, monkeypatch):
    # Forcing the twin onto its arm's own batch stream: the two copies are the same network, the path is flat.
    monkeypatch.setattr(SearchState, "twin_seed", SearchState.seed)
    rows = run_search(tiny(), str(tmp_path / "run"), progress=False)
    measured = _measured(rows)
    assert sorted((r["level"], r["arm"]) for r in measured) == [(0, "ticket"), (1, "reinit"), (1, "ticket")]
    for r in measured:
        assert len(r["stability_errors"]) == 5 and r["stability_alphas"][0] == 0.0 and r["stability_alphas"][-1] == 1.0
        assert abs(r["instability"]) < 1e-9, r
        assert max(r["stability_errors"]) - min(r["stability_errors"]) < 1e-9


def test_different_data_orders_give_positive_instability_and_keep_the_mask(tmp_path, float64_data):
    run = str(tmp_path / "run")
    rows = run_search(tiny(rate=0.9), run, progress=False)
    measured = _measured(rows)
    assert len(measured) == 3
    assert any(r["instability"] > 0 for r in measured), [r["instability"] for r in measured]
    for r in measured:  # the barrier is measured against the endpoints: never below them
        assert r["instability"] >= -1e-9
    a, b = _final(run, 1, "ticket"), _final(run, 1, "ticket_twin")
    key = next(k for k in a if k.endswith("weight_mask"))[:-len("_mask")]
    assert torch.equal(a[key + "_mask"], b[key + "_mask"])
    assert not torch.equal(a[key], b[key])  # another data order: other weights
    assert (~a[key + "_mask"]).any()
    # Every interpolated point keeps the pruned entries exact zeros.
    for alpha in stability.alphas(5):
        mid = stability.interpolate(a, b, alpha)
        assert torch.all(mid[key][~a[key + "_mask"]] == 0)


def test_stability_arms_are_bit_identical_batched_and_one_at_a_time(tmp_path, float64_data):
    config = tiny()
    one = run_search(config.replace(parallel_arms=1), str(tmp_path / "one"), progress=False)
    many = run_search(config, str(tmp_path / "many"), progress=False)
    assert [(r["level"], r["arm"]) for r in one] == [(r["level"], r["arm"]) for r in many]
    assert ("ticket_twin" in {r["arm"] for r in many}) and ("reinit_twin" in {r["arm"] for r in many})
    for a, b in zip(_measured(one), _measured(many)):
        assert abs(a["instability"] - b["instability"]) < 1e-9
        assert all(abs(x - y) < 1e-9 for x, y in zip(a["stability_errors"], b["stability_errors"]))
    for arm in ("ticket_twin", "reinit_twin"):
        wa, wb = _final(str(tmp_path / "one"), 1, arm), _final(str(tmp_path / "many"), 1, arm)
        assert all(torch.allclose(wa[k].double(), wb[k].double(), rtol=0, atol=1e-9) for k in wa)


def test_results_csv_report_and_compare_show_instability(tmp_path, monkeypatch):
    from fastticket.app.compare import make_comparison
    from fastticket.app.report import make_report
    real = data_module.load_dataset

    def small(*args, **kwargs):
        data = real(*args, **kwargs)
        data.test.x, data.test.y = data.test.x[:300], data.test.y[:300]
        return data

    monkeypatch.setattr(data_module, "load_dataset", small)
    runs = [str(tmp_path / "k0"), str(tmp_path / "k4")]
    run_search(tiny(iterations=12, eval_every=6, controls=[], stability=3), runs[0], progress=False)
    run_search(tiny(iterations=12, eval_every=6, controls=[], stability=3, rewind_iter=4), runs[1], progress=False)
    written = make_report(runs[0])
    names = {os.path.basename(p) for p in written}
    assert {"instability_vs_weights.png", "stability_paths.png", "results.csv"} <= names
    with open(os.path.join(runs[0], "report", "results.csv")) as f:
        table = list(csv.DictReader(f))
    assert "instability" in table[0]
    assert [r["arm"] for r in table] == ["ticket", "ticket"]  # the twins are no rows of their own
    assert all(float(r["instability"]) >= 0 for r in table)
    with open(os.path.join(runs[0], "report", "results.md")) as f:
        assert "instability (pts)" in f.read()
    out = str(tmp_path / "cmp")
    written = make_comparison(runs, out)
    assert os.path.join(out, "instability_vs_weights.png") in written
    with open(os.path.join(out, "results.csv")) as f:
        table = list(csv.DictReader(f))
    assert len(table) == 4 and all(r["instability"] != "" for r in table)


def test_config_and_flag_validate_stability():
    for bad in (1, -3, 2.5, True, "30"):
        with pytest.raises(ConfigError, match="stability must be"):
            SearchConfig(stability=bad).validate()
    with pytest.raises(ConfigError, match="early_bird"):
        SearchConfig(stability=5, early_bird=0.1, levels=1).validate()
    SearchConfig(stability=0).validate()
    from fastticket.app.cli import build_parser
    parser = build_parser()
    assert parser.parse_args(["search", "--stability"]).stability == 30
    assert parser.parse_args(["search", "--stability", "7"]).stability == 7
    assert parser.parse_args(["search"]).stability is None
    with pytest.raises(SystemExit):
        parser.parse_args(["search", "--stability", "1"])


def _cmd(out, *extra):
    return [sys.executable, "-m", "fastticket", "search", "--model", "lenet300", "--levels", "1", "--iterations",
            "12", "--eval-every", "6", "--controls", "none", "--stability", "3", "--out", out, "--no-progress",
            *extra]


def test_resume_after_a_kill_gives_the_same_instability(tmp_path):
    whole, log = str(tmp_path / "whole"), str(tmp_path / "faults.log")
    done = subprocess.run(_cmd(whole), env=dict(ONE_THREAD_ENV, FASTTICKET_FAULT_LOG=log), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    with open(log) as f:
        points = [line.split(maxsplit=2) for line in f.read().splitlines()]
    level1 = [(int(n), kind, path) for n, kind, path in points if "level_01" in path]
    # Killed while the level-1 twin trains (its first checkpoint half written): the resume continues both
    # copies from their checkpoints on their own batch streams, then measures the path. (One kill point:
    # every subprocess costs seconds; the crash sweep covers the atomic writes themselves.)
    twin_ckpt = next(n for n, kind, path in level1 if "ticket_twin_trial0" in path and "checkpoint" in path)
    assert max(n for n, kind, path in level1 if path.endswith("ticket_trial0/result.json")) > twin_ckpt
    reference = run_dir_snapshot(whole)
    assert "instability" in reference[0][next(k for k in reference[0] if "level_01/ticket_trial0" in k)]
    for at in (twin_ckpt,):
        cut = str(tmp_path / f"cut{at}")
        killed = subprocess.run(_cmd(cut), env=dict(ONE_THREAD_ENV, FASTTICKET_FAULT_AT=str(at)),
                                capture_output=True, text=True, timeout=300)
        assert killed.returncode != 0
        resumed = subprocess.run(_cmd(cut, "--resume"), env=ONE_THREAD_ENV, capture_output=True, text=True,
                                 timeout=300)
        assert resumed.returncode == 0, resumed.stderr
        rows, tensors, lines = run_dir_snapshot(cut)
        assert rows == reference[0]
        assert lines == reference[2]
        for key in reference[1]:
            for name, t in reference[1][key].items():
                assert torch.equal(t, tensors[key][name]), f"{key}:{name} differs after resume"


class _Batches:
    """The DeviceData surface path_errors reads: seeded training batches and a test split."""

    def __init__(self, gen):
        self.x = torch.randn(64, 6, generator=gen, dtype=torch.float64)
        self.test = type("Split", (), {"x": torch.randn(40, 6, generator=gen, dtype=torch.float64),
                                       "y": torch.randint(0, 3, (40,), generator=gen)})()

    def batch(self, iteration, batch_size, seed):
        idx = torch.randperm(64, generator=torch.Generator().manual_seed(seed * 1000 + iteration))[:batch_size]
        return self.x[idx], None


def test_batchnorm_statistics_are_recomputed_at_every_point():
    from fastticket.sparse.nn import install_masks, model_masks, sparsify
    gen = torch.Generator().manual_seed(5)
    torch.manual_seed(5)
    model = sparsify(torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.BatchNorm1d(5), torch.nn.Linear(5, 3))
                     .double())
    masks = model_masks(model)
    first_name = next(n for n in masks if n.startswith("0"))
    masks[first_name] = torch.rand(masks[first_name].shape, generator=gen) < 0.6
    install_masks(model, masks)
    first = {k: v.clone() for k, v in model.state_dict().items()}
    second = {k: (v + torch.randn(v.shape, generator=gen, dtype=v.dtype) if torch.is_floating_point(v) else v)
              for k, v in first.items()}
    second["1.running_mean"].fill_(1e6)  # stale statistics that must not be used
    data = _Batches(gen)
    errors = stability.path_errors(model, first, second, data, 3, 16, seed=7)
    assert len(errors) == 3 and all(0 <= e <= 100 for e in errors)
    # After the last point (a = 1) the statistics are the average over BN_BATCHES batches of the first layer's
    # output under the second weights (pruned entries exact zeros), computed here in float64.
    w = second["0.weight"] * masks[first_name]
    assert torch.all(model[0].weight[~masks[first_name]] == 0)
    means = [(data.batch(i, 16, 7)[0] @ w.T + second["0.bias"]).mean(0) for i in range(stability.BN_BATCHES)]
    assert torch.allclose(model[1].running_mean, torch.stack(means).mean(0), rtol=1e-12, atol=1e-12)
    assert stability.instability([10.0, 30.0, 20.0]) == 15.0


def test_the_path_between_two_moving_masks_runs_through_both_supports():
    """RigL / SET arms end with different masks: every point of the line keeps both ends' live weights."""
    g = torch.Generator().manual_seed(5)
    m1, m2 = torch.rand(6, 7, generator=g) < 0.5, torch.rand(6, 7, generator=g) < 0.5
    w1, w2 = torch.randn(6, 7, generator=g) * m1, torch.randn(6, 7, generator=g) * m2
    for a in (0.0, 0.3, 1.0):
        point = stability.interpolate({"w": w1, "w_mask": m1}, {"w": w2, "w_mask": m2}, a)
        assert torch.equal(point["w_mask"], m1 | m2)
        assert torch.equal(point["w"], (1 - a) * w1 + a * w2)
