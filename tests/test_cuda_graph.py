"""--cuda-graph (fastticket/lottery/cuda_graph.py): what a CPU can check.

The captured path itself needs a CUDA device (the GPU session's `search-cuda-graph` step measures it); here:
the decision (captured only on CUDA, stacked, not data-parallel, the masked SGD / Adam / AdamW), the
setting's validation, CLI flag and config.json round trip, that on CPU the setting is a no-op with
bit-identical results and result.json says why it ran eager, and GraphedStep's schedule (warm-up, one host
part before every replay, an lr schedule replayed without re-capture, a layout change, a failed capture)
with the CUDA calls replaced by stand-ins whose "replay" runs the step's device part, so the numbers of a
graphed run are checked against eager's.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from fastticket.errors import ConfigError
from fastticket.lottery import cuda_graph
from fastticket.lottery.config import SearchConfig
from fastticket.lottery.cuda_graph import WARMUP_STEPS, GraphedStep, graph_unsupported
from fastticket.lottery.presets import get_preset
from fastticket.lottery.rundir import arm_dir
from fastticket.lottery.search import run_search
import fastticket.kernels._multi_tensor as multi_tensor
import fastticket.sparse._optim_torch as optim_torch
from fastticket.sparse.backend import use_backend
from fastticket.sparse.optim import MaskedAdam, MaskedAdamW, MaskedSGD
from fastticket.sparse.testing import rel_error
from run_snapshot import load

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _params():
    return [torch.randn(3, 2, generator=torch.Generator().manual_seed(0)).requires_grad_()]


def test_capture_is_chosen_only_for_cuda_stacked_masked_optimizers():
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    sgd = MaskedSGD(_params(), lr=0.1)
    for opt in (sgd, MaskedAdam(_params()), MaskedAdamW(_params(), amsgrad=True)):
        assert graph_unsupported(cuda, True, False, opt) is None
    assert "device is cpu" in graph_unsupported(cpu, True, False, sgd)
    assert "one at a time" in graph_unsupported(cuda, False, False, sgd)
    assert "data-parallel" in graph_unsupported(cuda, True, True, sgd)

    class Mine(MaskedAdam):  # a subclass may override step(): not known to be graph-safe
        pass
    for opt in (torch.optim.Adam(_params()), Mine(_params())):
        reason = graph_unsupported(cuda, True, False, opt)
        assert f"{type(opt).__name__} has no graph-safe step" in reason


def test_setting_is_validated_round_trips_and_has_a_flag():
    with pytest.raises(ConfigError, match="cuda_graph must be true or false"):
        SearchConfig(cuda_graph="yes")
    config = SearchConfig(cuda_graph=True)
    assert SearchConfig.from_dict(json.loads(config.to_json())).cuda_graph is True
    from fastticket.app.cli import build_parser, config_from_args
    args = build_parser().parse_args(["search", "--cuda-graph", "--out", "x"])
    assert config_from_args(args).cuda_graph is True


def test_on_cpu_the_setting_is_a_no_op(tmp_path):
    base = get_preset("lenet-mnist5k").replace(iterations=6, eval_every=3, levels=1, controls=[], val_size=100,
                                               optimizer="sgd", momentum=0.9)
    runs = {}
    for graphed in (False, True):
        runs[graphed] = str(tmp_path / str(graphed))
        run_search(base.replace(cuda_graph=graphed), runs[graphed], progress=False)
    for level in (0, 1):
        ours = load(os.path.join(arm_dir(runs[True], level, "ticket", 0), "final.pt"))
        ref = load(os.path.join(arm_dir(runs[False], level, "ticket", 0), "final.pt"))
        assert ours.keys() == ref.keys()
        for key, value in ref.items():
            assert torch.equal(ours[key], value), key
        with open(os.path.join(arm_dir(runs[True], level, "ticket", 0), "result.json")) as f:
            assert json.load(f)["step_mode"].startswith("eager: the device is cpu")
        with open(os.path.join(arm_dir(runs[False], level, "ticket", 0), "result.json")) as f:
            assert "step_mode" not in json.load(f)


class _FakeGraph:
    """A captured step's stand-in: a replay runs what the graph's kernels would, the forward, backward and the
    optimizer's device part (reading the scalars the last host part wrote), and no host part."""

    def __init__(self, log, run):
        self.log, self.run = log, run

    def replay(self):
        self.log.append("replay")
        self.run()


class _Recording(GraphedStep):
    """GraphedStep with its CUDA calls replaced: records which path each step took, host parts included."""

    def __init__(self, optimizer, fail=False, body=None):
        super().__init__(body or (lambda x, y, set_to_none: torch.zeros(1)), optimizer, torch.device("cpu"))
        self.log, self.fail = [], fail

    def _host_step(self):
        self.log.append("host")
        return super()._host_step()

    def _eager(self, x, y):
        self.log.append("eager")
        return self.body(x, y, False)

    def _capture(self, x, y):
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        self.log.append("capture")  # a capture runs no kernel: nothing is stepped here
        self.static, self.out = (x.clone(), y.clone()), None

        def run():
            with self.optimizer.host_part_given():
                self.out = self.body(self.static[0], self.static[1], False)
        self.graph = _FakeGraph(self.log, run)


def _model_and_body(cls, kw, grad_stays):
    g = torch.Generator().manual_seed(4)
    w = torch.randn(5, 3, dtype=torch.float64, generator=g).requires_grad_()
    mask = torch.rand(5, 3, generator=g) > 0.4
    with torch.no_grad():
        w.mul_(mask)
    opt = cls([w], masks=[mask], **kw)

    def body(x, y, set_to_none):
        loss = ((x @ w - y) ** 2).mean()
        opt.zero_grad(set_to_none=set_to_none and not grad_stays)
        loss.backward()
        opt.step()
        return loss.detach().reshape(1)
    return w, mask, opt, body


SCHEDULED = {"adam": (MaskedAdam, dict(lr=0.05, amsgrad=True, weight_decay=0.01)),
             "adamw": (MaskedAdamW, dict(lr=0.05, maximize=False)),
             "sgd": (MaskedSGD, dict(lr=0.05, momentum=0.9, nesterov=True))}


@pytest.mark.launches_triton
@pytest.mark.parametrize("name", list(SCHEDULED))
def test_graphed_step_replays_through_an_lr_schedule_with_the_eager_numbers(name, monkeypatch):
    """Adam and SGD are captured once; an lr that moves every step replays the same graph (no eager step, no
    re-capture); every replay is preceded by exactly one host part, so the step count moves; the weights end
    as a plain eager run's, bit for bit (triton backend: the kernels read the host part's scalars)."""
    monkeypatch.setattr(cuda_graph.torch.cuda, "synchronize", lambda device=None: None)
    cls, kw = SCHEDULED[name]
    g = torch.Generator().manual_seed(5)
    batches = [(torch.randn(4, 5, dtype=torch.float64, generator=g), torch.randn(4, 3, dtype=torch.float64,
                                                                                  generator=g)) for _ in range(8)]
    results = {}
    with use_backend("triton"):
        for graphed in (False, True):
            w, mask, opt, body = _model_and_body(cls, kw, grad_stays=graphed)
            step = _Recording(opt, body=body) if graphed else None
            for i, (x, y) in enumerate(batches):
                opt.param_groups[0]["lr"] = kw["lr"] * 0.8 ** i  # the schedule: a new lr every step
                step(x, y) if graphed else body(x, y, True)
            results[graphed] = (w, opt, step)
    (eager_w, eager_opt, _), (w, opt, step) = results[False], results[True]
    n = len(batches) - WARMUP_STEPS
    assert step.log == ["eager"] * WARMUP_STEPS + ["host", "capture", "replay"] + ["host", "replay"] * (n - 1)
    assert (step.captures, step.replays, step.host_steps) == (1, n, n)
    assert step.mode == "cuda_graph"
    # The graph holds the device tables its launches read (address, meta, chunks): a bounded cache may evict
    # them, and their memory must not be reused under the graph.
    cached = [t for tables in multi_tensor._address_tables.values() for t in tables]
    assert len(step.graph_refs) == 3 and any(t is c for t in step.graph_refs for c in cached)
    assert torch.equal(w, eager_w)
    assert bool((w[~mask] == 0).all())
    if name != "sgd":
        assert float(opt.state[w]["step"]) == float(eager_opt.state[eager_w]["step"]) == len(batches)
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[w][key], eager_opt.state[eager_w][key])
            assert bool((opt.state[w][key][~mask] == 0).all())


def test_graphed_step_recaptures_when_the_layout_moves(monkeypatch):
    """What the graph baked in moves (here a constant of the launches): that step runs eagerly with its host
    part already done (one host part: the count moves once), the next captures again; then replays."""
    monkeypatch.setattr(cuda_graph.torch.cuda, "synchronize", lambda device=None: None)
    w, _, opt, body = _model_and_body(MaskedAdam, dict(lr=0.05), grad_stays=True)
    step = _Recording(opt, body=body)
    x, y = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    with use_backend("torch"):
        for _ in range(WARMUP_STEPS + 2):
            step(x, y)
        step.log.clear()
        opt.param_groups[0]["weight_decay"] = 0.1
        for _ in range(3):
            step(x, y)
    assert step.log == ["host", "eager", "host", "capture", "replay", "host", "replay"]
    assert float(opt.state[w]["step"]) == WARMUP_STEPS + 5 and step.captures == 2


def test_a_layout_that_never_holds_is_never_captured_and_says_so(monkeypatch):
    monkeypatch.setattr(cuda_graph.torch.cuda, "synchronize", lambda device=None: None)
    w, _, opt, body = _model_and_body(MaskedAdam, dict(lr=0.05), grad_stays=True)
    step = _Recording(opt, body=body)
    x, y = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    with use_backend("torch"):
        for i in range(WARMUP_STEPS + 3):
            opt.param_groups[0]["weight_decay"] = 0.01 * i  # a constant the launches bake in, moving each step
            step(x, y)
    assert step.log == ["eager"] * WARMUP_STEPS + ["host", "eager"] * 3
    assert step.mode == "eager: the optimizer's layout key moved every step, nothing was captured"
    assert float(opt.state[w]["step"]) == WARMUP_STEPS + 3


def test_failed_capture_runs_eager_and_says_so(monkeypatch):
    monkeypatch.setattr(cuda_graph.torch.cuda, "synchronize", lambda device=None: None)
    opt = MaskedSGD(_params(), lr=0.1)
    step = _Recording(opt, fail=True)
    calls = []
    step.body = lambda x, y, set_to_none: calls.append(set_to_none) or opt.step() or torch.zeros(1)
    for _ in range(WARMUP_STEPS + 3):
        step(torch.randn(2, 3), torch.arange(2))
    assert step.mode.startswith("eager: capture failed (RuntimeError: operation not permitted")
    # warm-up (gradients kept), then the failed step and the ones after it, plain eager
    assert calls == [False] * WARMUP_STEPS + [True, True, True]
    assert "replay" not in step.log
    assert not opt.graph_safe  # back to the float-argument kernels


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_a_stacked_search_engine_through_the_graphed_schedule_keeps_the_eager_numbers(optimizer, monkeypatch):
    """The search's own stacked engine (2 LeNet-300-100 arms, masks, stacked optimizer state) stepped through
    GraphedStep's schedule with stand-in replays, under an lr schedule, against the same engine eager: the
    same weights (the torch backend's graph-safe formulas: within float32 rounding), pruned weights exactly
    zero, one capture, Adam's step count moving on every replay."""
    monkeypatch.setattr(cuda_graph.torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(optim_torch, "_FUSED_ADAM", False)  # the eager step CUDA runs: the foreach formulas
    from fastticket.app.bench import search as search_bench
    from fastticket.app.bench.search_graph import OPTIMIZERS
    from fastticket.lottery.engine import Engine

    device = torch.device("cpu")
    data = search_bench._synthetic((1, 28, 28), 64, device)
    config = SearchConfig(model="lenet300", batch_size=8, **OPTIMIZERS[optimizer])
    engines = []
    with use_backend("torch"):
        for graphed in (False, True):
            pairs = [search_bench._arm(config, data, seed, device) for seed in range(2)]
            engine = Engine(config, [j for j, _ in pairs], [s for _, s in pairs], data, stacked=True)
            if graphed:
                engine.graphed = _Recording(engine.optimizer, body=engine._stacked_body)
            for it in range(WARMUP_STEPS + 4):
                engine.set_lr(config.lr * 0.9 ** it)
                engine.step(it)
            engines.append(engine)
    eager, graphed = engines
    assert graphed.graphed.captures == 1 and graphed.graphed.replays == 4 and graphed.step_mode == "cuda_graph"
    for (name, a), b in zip(zip(eager.names, eager.params), graphed.params):
        assert rel_error(b, a) <= 1e-6, name
    for p in graphed.params:
        mask = graphed.optimizer.mask_for(p)
        if mask is not None:
            assert bool((p[~mask] == 0).all())
            if optimizer == "adam":
                assert float(graphed.optimizer.state[p]["step"]) == WARMUP_STEPS + 4
                assert bool((graphed.optimizer.state[p]["exp_avg"][~mask] == 0).all())


def test_the_gpu_sessions_graph_rows_on_a_cpu(monkeypatch):
    """fastticket/app/bench/search_graph.py at its smallest: the rows a lent GPU fills in (Adam and SGD, graph
    against eager under an lr schedule), here both sides eager and the row saying so."""
    from fastticket.app.bench import BenchOptions, search_graph

    monkeypatch.setattr(search_graph, "ARMS", 2)
    monkeypatch.setattr(search_graph, "BATCH", 8)
    monkeypatch.setattr(search_graph, "_case", lambda k, opt, data, device, steps, repeats, real=search_graph._case:
                        real(k, opt, data, device, 2, 1))
    options = BenchOptions(device="cpu", quick=True)
    rows = search_graph.graph_rows(options)
    assert [r.case for r in rows] == ["2 arms lenet300 adam", "2 arms lenet300 sgd", "1 arm lenet300 adam",
                                      "1 arm lenet300 sgd"]
    for row in rows:
        assert row.parity == 0.0 and row.extra["captures"] == 0
        assert row.extra["step_mode"].startswith("eager: the device is cpu")
        assert row.extra["optimizer"] in ("MaskedAdam", "MaskedSGD") and row.extra["optimizer"] in row.op
