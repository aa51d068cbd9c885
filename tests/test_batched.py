"""Batched arms (fastticket.lottery.batched): a level trained as one stacked model gives the numbers of the same arms
trained one at a time (float64 to 1e-9, float32 within a justified tolerance), per-arm files unchanged."""
import json
import math
import os

import pytest
import torch

import fastticket.lottery.data as data_module
from fastticket.lottery.data import load_dataset
from fastticket.lottery.presets import get_preset
from fastticket.lottery.rundir import RunDir, arm_dir
from fastticket.lottery.search import run_search
from fastticket.lottery.progress import Progress
from fastticket.lottery.arm_state import ArmJob, ArmSpec
from fastticket.lottery.train import build_masked_model, train_arms
from fastticket.sparse.nn import masked_modules

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny(**changes):
    base = dict(iterations=24, eval_every=6, levels=1, controls=["reinit", "random"], val_size=200, trials=2,
                reinits=2, rewind_iter=6, batch_size=16)
    base.update(changes)
    return get_preset("lenet-mnist5k").replace(**base)


def _small(monkeypatch, dtype):
    """The search's data in `dtype`, with a 200-image test split (evaluation dominates these tiny runs)."""
    real = data_module.load_dataset

    def load(*args, **kwargs):
        data = real(*args, **kwargs)
        data.test.x, data.test.y = data.test.x[:200], data.test.y[:200]
        for split in (data.train, data.val, data.test):
            split.x = split.x.to(dtype)
        return data

    monkeypatch.setattr(data_module, "load_dataset", load)


@pytest.fixture
def float64_data(monkeypatch):
    """The search in float64: models built in the default dtype, the data converted after loading."""
    _small(monkeypatch, torch.float64)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.fixture
def float32_data(monkeypatch):
    _small(monkeypatch, torch.float32)


def _metrics(run, r):
    path = arm_dir(run, r["level"], r["arm"], r["trial"], r.get("replica", 0))
    with open(os.path.join(path, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _compare(one, many, run_one, run_many, tol):
    assert [(r["level"], r["arm"], r["trial"], r.get("replica", 0)) for r in one] == \
           [(r["level"], r["arm"], r["trial"], r.get("replica", 0)) for r in many]
    for a, b in zip(one, many):
        assert a["status"] == b["status"] == "ok"
        assert a["early_stop_iter"] == b["early_stop_iter"], (a, b)
        assert a["final_iter"] == b["final_iter"] and a["density"] == b["density"]
        assert abs(a["test_acc_at_early_stop"] - b["test_acc_at_early_stop"]) <= tol["acc"]
        assert abs(a["final_test_acc"] - b["final_test_acc"]) <= tol["acc"]
        for ma, mb in zip(_metrics(run_one, a), _metrics(run_many, b)):
            assert ma["iteration"] == mb["iteration"]
            for key in ("val_acc", "test_acc"):
                assert abs(ma[key] - mb[key]) <= tol["acc"], (key, ma, mb)
            for key in ("train_loss", "val_loss"):
                assert abs(ma[key] - mb[key]) <= tol["loss"] * max(1.0, abs(ma[key])), (key, ma, mb)


def _arm_dirs(run):
    return sorted(os.path.relpath(os.path.join(root), run) for root, dirs, files in os.walk(run)
                  if "result.json" in files)


@pytest.fixture
def conv_tiny(monkeypatch):
    """A small conv net (Conv-2's structure, 8 channels, one fc of 32): the conv path without Conv-2's 3.2M
    fc weights, whose checkpoints would dominate the test's time."""
    from fastticket.lottery import models
    monkeypatch.setitem(models.MODELS, "conv-tiny", lambda info: models.ConvNet(info, (8,), hidden=(32,)))


@pytest.mark.parametrize("model", ["lenet300", "conv-tiny"])
def test_batched_level_equals_arms_one_at_a_time_in_float64(tmp_path, float64_data, conv_tiny, model):
    """Trials x {ticket, reinit x 2, random} with late rewinding (tickets and random start at k, reinits at 0):
    the same early-stopping iterations and accuracies to 1e-9 whether the level trains at once or arm by arm."""
    changes = dict(model=model) if model == "lenet300" else dict(model=model, iterations=12, eval_every=4,
                                                                 rewind_iter=4, batch_size=8, val_size=50)
    config = tiny(**changes)
    one, many = str(tmp_path / "one"), str(tmp_path / "many")
    rows_one = run_search(config.replace(parallel_arms=1), one, progress=False)
    rows_many = run_search(config, many, progress=False)
    assert len(rows_many) == 2 * (1 + 4)  # 2 trials x (level-0 ticket + ticket, reinit, reinit2, random)
    assert _arm_dirs(one) == _arm_dirs(many)
    assert "levels/level_01/reinit2_trial1" in _arm_dirs(many)
    _compare(rows_one, rows_many, one, many, dict(acc=1e-9, loss=1e-9))
    # Each reinit replica has its own init: level-1 reinit and reinit2 of a trial start from different weights.
    w1 = torch.load(os.path.join(arm_dir(many, 1, "reinit", 0), "final.pt"), weights_only=True)
    w2 = torch.load(os.path.join(arm_dir(many, 1, "reinit", 0, replica=1), "final.pt"), weights_only=True)
    key = next(k for k in w1 if k.endswith("weight") and not k.endswith("mask"))
    assert not torch.equal(w1[key], w2[key])
    for k in w1:  # same ticket mask, and pruned weights exactly zero in every arm
        if k.endswith("weight_mask"):
            assert torch.equal(w1[k], w2[k])
            assert torch.all(w2[k[:-len("_mask")]][~w2[k]] == 0)


def _max_drift(run_a, rows_a, run_b, rows_b):
    """(largest relative train/val loss difference, largest val/test accuracy difference) over all arms and
    evaluations of two runs of the same arms."""
    loss = acc = 0.0
    for a, b in zip(rows_a, rows_b):
        for ma, mb in zip(_metrics(run_a, a), _metrics(run_b, b)):
            loss = max([loss] + [abs(ma[k] - mb[k]) / max(1.0, abs(ma[k])) for k in ("train_loss", "val_loss")])
            acc = max([acc] + [abs(ma[k] - mb[k]) for k in ("val_acc", "test_acc")])
    return loss, acc


def test_batched_level_agrees_with_arms_one_at_a_time_in_float32(tmp_path, float32_data, monkeypatch):
    """float32: the stacked step sums in another order (one bmm over the arms instead of one GEMM per arm),
    so the two runs differ by rounding. How much rounding alone moves these metrics is measured here, not
    guessed: the same arms one at a time again, with every Linear layer's reduction in another order (input
    features permuted: the same math, other roundings). Batched must stay within 10x that drift.
    Measured (torch 2.14 CPU): permuted order 9e-7 relative in the losses after 24 Adam steps (1.1e-6 after
    96: the drift grows slowly, Adam's normalised steps do not amplify it), batched 8e-8 (1.1e-7 after 96),
    so the bound has ~100x margin; a wrong arm (other batches, other mask) differs by >1e-2. Accuracies:
    an image flips only when its top-two logits are tied to ~1e-6, so a few near-ties (3 of 200 test images)
    are allowed; 0 flipped in the measurements. The early-stopping iteration may move by one evaluation on a
    near tie of validation losses, so it is not compared here (float64 pins it)."""
    import torch.nn.functional as F
    config = tiny(trials=1, reinits=2)
    one, many, perm = str(tmp_path / "one"), str(tmp_path / "many"), str(tmp_path / "perm")
    rows_one = run_search(config.replace(parallel_arms=1), one, progress=False)
    rows_many = run_search(config, many, progress=False)
    linear = F.linear

    def permuted_linear(x, w, b=None):
        order = torch.randperm(w.shape[1], generator=torch.Generator().manual_seed(w.shape[1]))
        return linear(x[..., order], w[:, order], b)

    monkeypatch.setattr(F, "linear", permuted_linear)
    rows_perm = run_search(config.replace(parallel_arms=1), perm, progress=False)
    monkeypatch.setattr(F, "linear", linear)
    rounding, _ = _max_drift(one, rows_one, perm, rows_perm)
    assert 0 < rounding < 1e-4  # the reordering did change the roundings, and only them
    for a, b in zip(rows_one, rows_many):
        a["early_stop_iter"] = b["early_stop_iter"] = None
    _compare(rows_one, rows_many, one, many, dict(acc=3 / 200, loss=10 * rounding))


def test_resnet20_with_batchnorm_trains_batched_like_alone(tmp_path, float64_data):
    """BatchNorm running statistics are stacked per arm: ResNet-20 batched equals ResNet-20 alone."""
    config = tiny(model="resnet20", iterations=2, eval_every=2, rewind_iter=0, batch_size=4, val_size=20,
                  levels=0, trials=2)  # two level-0 tickets: one stacked group of two
    one, many = str(tmp_path / "one"), str(tmp_path / "many")
    rows_one = run_search(config.replace(parallel_arms=1), one, progress=False)
    rows_many = run_search(config, many, progress=False)
    _compare(rows_one, rows_many, one, many, dict(acc=1e-9, loss=1e-9))
    a = torch.load(os.path.join(arm_dir(one, 0, "ticket", 1), "final.pt"), weights_only=True)
    b = torch.load(os.path.join(arm_dir(many, 0, "ticket", 1), "final.pt"), weights_only=True)
    running = [k for k in a if k.endswith("running_mean")]
    assert running
    for k in running:
        torch.testing.assert_close(a[k], b[k], rtol=1e-12, atol=1e-12)


def test_a_diverged_arm_stops_and_the_others_carry_on(tmp_path):
    """Three arms in one stacked group; one is poisoned: it is reported diverged at the first evaluation, its
    state saved, and the other two finish with the numbers they get when trained alone."""
    config = tiny(iterations=12, eval_every=4)
    data = load_dataset("mnist5k", None, torch.device("cpu"), config.val_size, config.seed)
    messages = []

    class Recorder(Progress):
        def message(self, text):
            messages.append(text)

    def jobs(root, arms):
        run = RunDir(str(root))
        out = []
        for trial in arms:
            model = build_masked_model(config, data.info, trial, torch.device("cpu"))
            if trial == 1:
                with torch.no_grad():
                    next(model.parameters()).fill_(float("nan"))
            out.append(ArmJob(ArmSpec(0, "ticket", trial, 0), model, run.arm(0, "ticket", trial).open(), trial))
        return out

    prunable = [n for n, _ in masked_modules(build_masked_model(config, data.info, 0, torch.device("cpu")))]
    together = train_arms(config, jobs(tmp_path / "together", [0, 1, 2]), data, prunable, Recorder())
    assert [r["status"] for r in together] == ["ok", "diverged", "ok"]
    assert together[1]["final_iter"] == 4 and "between iterations 0 and 4" in together[1]["message"]
    assert any("diverged" in m for m in messages)
    final = torch.load(os.path.join(str(tmp_path / "together"), "levels", "level_00", "ticket_trial1",
                                    "final.pt"), weights_only=True)
    assert any(not torch.isfinite(v).all() for v in final.values() if v.is_floating_point())  # its state, kept
    alone = train_arms(config, jobs(tmp_path / "alone", [0, 2]), data, prunable, Progress(), stacked=False)
    for a, b in zip(alone, [together[0], together[2]]):
        assert a["early_stop_iter"] == b["early_stop_iter"]
        assert math.isclose(a["final_test_acc"], b["final_test_acc"], abs_tol=3e-3)


def test_parallel_arms_limits_the_group_and_old_run_dirs_resume(tmp_path, float32_data):
    """--parallel-arms 2 trains a level's 3 reinits as groups of at most 2; the numbers match all at once, and
    parallel_arms (how to run) may change on resume while config.json without the new fields still resumes."""
    config = tiny(trials=1, iterations=12, eval_every=6, reinits=3)  # reinits start at 0: a group of 3
    sizes = []

    class Sizes(Progress):
        def arm_started(self, level, levels, arm, trial):
            sizes.append(arm)

    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    rows_a = run_search(config.replace(parallel_arms=2), a, progress=Sizes())
    assert "2 arms" in sizes and not any(s.startswith(("3", "4")) for s in sizes)
    rows_b = run_search(config, b, progress=False)
    _compare(rows_a, rows_b, a, b, dict(acc=1e-12, loss=1e-12))
    assert run_search(config.replace(parallel_arms=1), a, resume=True, progress=False) == rows_a
    # A run directory written before reinits/parallel_arms existed: its config.json lacks them.
    with open(os.path.join(a, "config.json")) as f:
        saved = json.load(f)
    saved.pop("reinits"), saved.pop("parallel_arms")
    with open(os.path.join(a, "config.json"), "w") as f:
        json.dump(saved, f)
    rows_old = run_search(config.replace(reinits=1), a, resume=True, progress=False)  # absent: the default, 1
    assert rows_old == [r for r in rows_a if not r.get("replica")]


@pytest.mark.parametrize("model,planned", [("lenet300", True), ("conv-tiny", True), ("resnet20", False)])
def test_hand_stacked_forward_equals_the_vmap_path_in_float64(conv_tiny, model, planned):
    """Fully connected and conv nets take the hand-stacked path (bmm for Linear layers, K plain convolutions);
    three steps of it give the vmap path's weights and optimizer state to float64 rounding, pruned entries
    exactly zero in every arm. Models it does not know (BatchNorm) keep vmap."""
    from fastticket.lottery.engine import Engine
    from fastticket.app.bench.search import _arm, _synthetic
    from fastticket.lottery.config import SearchConfig

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        shape = (1, 28, 28) if model == "lenet300" else (3, 32, 32)
        data = _synthetic(shape, 64, torch.device("cpu"))
        config = SearchConfig(model=model, batch_size=4)
        engines = []
        for use_plan in (True, False):
            pairs = [_arm(config, data, seed, torch.device("cpu")) for seed in (0, 1, 1)]  # two arms share a stream
            engine = Engine(config, [j for j, _ in pairs], [s for _, s in pairs], data, stacked=True)
            assert (engine.module.plan is not None) == planned
            if not use_plan:
                engine.module.plan = None
            for it in range(3):
                engine.step(it)
            engines.append(engine)
        if not planned:
            return
        fast, vmapped = engines
        for p, q in zip(fast.params, vmapped.params):
            m = fast.optimizer.mask_for(p)
            torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
            for key in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(fast.optimizer.state[p][key], vmapped.optimizer.state[q][key],
                                           rtol=1e-10, atol=1e-14)
            if m is not None:
                assert bool((p[~m] == 0).all()) and bool((fast.optimizer.state[p]["exp_avg"][~m] == 0).all())
    finally:
        torch.set_default_dtype(previous)
