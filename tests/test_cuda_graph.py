"""--cuda-graph (fastticket/lottery/cuda_graph.py): what a CPU can check.

The captured path itself needs a CUDA device (the GPU session's `search-cuda-graph` step measures it); here:
the decision (captured only on CUDA, stacked, not data-parallel, MaskedSGD), the setting's validation, CLI
flag and config.json round trip, that on CPU the setting is a no-op with bit-identical results and
result.json says why it ran eager, and GraphedStep's schedule (warm-up, lr changes, failed capture) with
the CUDA calls replaced by recording stand-ins.
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
from fastticket.sparse.optim import MaskedAdam, MaskedSGD
from run_snapshot import load

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _params():
    return [torch.randn(3, 2, generator=torch.Generator().manual_seed(0)).requires_grad_()]


def test_capture_is_chosen_only_for_cuda_stacked_sgd():
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    sgd, adam = MaskedSGD(_params(), lr=0.1), MaskedAdam(_params())
    assert graph_unsupported(cuda, True, False, sgd) is None
    assert "device is cpu" in graph_unsupported(cpu, True, False, sgd)
    assert "one at a time" in graph_unsupported(cuda, False, False, sgd)
    assert "data-parallel" in graph_unsupported(cuda, True, True, sgd)
    assert "MaskedAdam" in graph_unsupported(cuda, True, False, adam)


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
    def __init__(self, log):
        self.log = log

    def replay(self):
        self.log.append("replay")


class _Recording(GraphedStep):
    """GraphedStep with its CUDA calls replaced: records which path each step took."""

    def __init__(self, optimizer, fail=False):
        super().__init__(lambda x, y, set_to_none: torch.zeros(1), optimizer, torch.device("cpu"))
        self.log, self.fail = [], fail

    def _eager(self, x, y):
        self.log.append("eager")
        return torch.zeros(1)

    def _capture(self, x, y):
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        self.log.append("capture")
        self.static, self.out = (x.clone(), y.clone()), torch.zeros(1)
        self.graph, self.graph_lr = _FakeGraph(self.log), self._lr()


def test_graphed_step_schedule(monkeypatch):
    monkeypatch.setattr(cuda_graph.torch.cuda, "synchronize", lambda device=None: None)
    opt = MaskedSGD(_params(), lr=0.1)
    step = _Recording(opt)
    x, y = torch.randn(2, 3), torch.arange(2)
    for i in range(WARMUP_STEPS + 3):
        step(x, y)
    assert step.log == ["eager"] * WARMUP_STEPS + ["capture", "replay", "replay", "replay"]
    step.log.clear()
    opt.param_groups[0]["lr"] = 0.05  # the schedule moves: eager, then captured again once it holds
    step(x, y)
    step(x, y)
    step(x, y)
    assert step.log == ["eager", "capture", "replay", "replay"]
    assert step.mode == "cuda_graph"


def test_failed_capture_runs_eager_and_says_so(monkeypatch):
    monkeypatch.setattr(cuda_graph.torch.cuda, "synchronize", lambda device=None: None)
    step = _Recording(MaskedSGD(_params(), lr=0.1), fail=True)
    calls = []
    step.body = lambda x, y, set_to_none: calls.append(set_to_none) or torch.zeros(1)
    for _ in range(WARMUP_STEPS + 3):
        step(torch.randn(2, 3), torch.arange(2))
    assert step.mode.startswith("eager: capture failed (RuntimeError: operation not permitted")
    assert calls == [True, True, True]  # the failed step and the ones after it, plain eager
    assert "replay" not in step.log
