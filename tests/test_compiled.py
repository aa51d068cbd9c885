"""torch.compile on sparsified models: the custom ops of fastticket/sparse/ops.py (no graph break) and the compiled
training step of fastticket/lottery/compiled.py (forward, backward, masked optimizer step), against eager.

`backend="aot_eager"` (FASTTICKET_COMPILE_BACKEND): dynamo's full-graph capture and AOTAutograd's backward
graph, without inductor's C++ code generation (minutes on CI's 2 cores). fullgraph=True everywhere: a graph
break is an error. Tolerance: the compiled step reorders a few float operations (e.g. Adam's update), so
parameters agree with eager to a relative 1e-5 after several steps, and pruned weights stay exactly zero.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import fastticket
from fastticket.sparse.backend import use_backend
from fastticket.lottery.compiled import CompiledTrainStep, make_train_step
from fastticket.lottery.data import DatasetInfo
from fastticket.lottery.models import build_model
from fastticket.sparse.optim import MaskedAdam, MaskedAdamW, MaskedSGD
from fastticket.sparse.testing import rel_error

BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.launches_triton)]
TOL = 1e-5


@pytest.fixture(autouse=True)
def _aot_eager(monkeypatch):
    monkeypatch.setenv("FASTTICKET_COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _lenet(seed: int = 0) -> torch.nn.Module:
    """LeNet-300-100 on 14x14 inputs (a smaller first layer than MNIST's, same structure), sparsified: the
    first layer block-pruned (whole tiles dead: the tile-skipping kernels run), the others element-pruned
    (every tile live: the dispatch picks the dense op)."""
    torch.manual_seed(seed)
    model = fastticket.sparsify(build_model("lenet300", DatasetInfo("tiny", (1, 14, 14), 10)))
    layers = [m for _, m in fastticket.masked_modules(model)]
    g = torch.Generator().manual_seed(seed + 1)
    first = layers[0]
    tiles = torch.rand(-(-first.weight.shape[0] // 16), -(-first.weight.shape[1] // 16), generator=g) < 0.3
    first.set_mask_(tiles.repeat_interleave(16, 0).repeat_interleave(16, 1)[: first.weight.shape[0],
                                                                           : first.weight.shape[1]])
    for layer in layers[1:]:
        layer.set_mask_(torch.rand(layer.weight.shape, generator=g) > 0.2)
    return model


def _batches(steps: int, batch: int = 8):
    g = torch.Generator().manual_seed(5)
    return [(torch.randn(batch, 1, 14, 14, generator=g), torch.randint(0, 10, (batch,), generator=g))
            for _ in range(steps)]


def _train(model, optimizer, compiled: bool, batches, lrs):
    step = make_train_step(model, optimizer, compiled)
    losses = []
    for (x, y), lr in zip(batches, lrs):
        step.set_lr(lr)
        loss = step.loss(x, y)
        losses.append(float(loss.detach()))
        step.update(loss)
    return losses


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparsified_lenet_forward_compiles_fullgraph(backend) -> None:
    model = _lenet()
    x = torch.randn(4, 1, 14, 14, generator=torch.Generator().manual_seed(2))
    with use_backend(backend):
        expected = model(x)
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        out = compiled(x)
        out.square().sum().backward()
    assert rel_error(out, expected) < TOL
    for _, layer in fastticket.masked_modules(model):
        assert (layer.weight.grad[~layer.weight_mask] == 0).all()


# The triton backend runs in the (slow) interpreter here: one optimizer on it, every optimizer on torch.
STEP_CASES = [
    pytest.param("triton", lambda params: MaskedSGD(params, lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-3),
                 id="sgd-dampening-wd-triton", marks=pytest.mark.launches_triton),
    pytest.param("torch", lambda params: MaskedSGD(params, lr=0.05, momentum=0.9, nesterov=True), id="sgd-nesterov"),
    pytest.param("torch", lambda params: MaskedAdam(params, lr=1e-2, weight_decay=1e-3, amsgrad=True),
                 id="adam-amsgrad"),
    pytest.param("torch", lambda params: MaskedAdamW(params, lr=1e-2), id="adamw"),
]


@pytest.mark.parametrize("backend,make_optimizer", STEP_CASES)
def test_compiled_training_step_matches_eager(backend, make_optimizer) -> None:
    """Forward, backward and the masked optimizer step compiled with fullgraph=True give eager's weights, state
    and losses; pruned weights and their state stay exactly zero; lr changes need no recompile."""
    base = _lenet()
    batches = _batches(4)
    lrs = [1.0, 0.5, 0.5, 0.25]
    runs = {}
    with use_backend(backend):
        for compiled in (False, True):
            model = copy.deepcopy(base)
            optimizer = make_optimizer(model.parameters())
            scale = optimizer.defaults["lr"]
            runs[compiled] = (model, optimizer, _train(model, optimizer, compiled, batches,
                                                       [scale * f for f in lrs]))
    (m0, o0, l0), (m1, o1, l1) = runs[False], runs[True]
    assert l1 == pytest.approx(l0, rel=TOL)
    for (name, p0), p1 in zip(m0.named_parameters(), m1.parameters()):
        assert rel_error(p1.detach(), p0.detach()) < TOL, name
    s0, s1 = o0.state_dict(), o1.state_dict()
    assert s0["state"].keys() == s1["state"].keys()
    for i, state in s0["state"].items():
        assert state.keys() == s1["state"][i].keys()
        for key, value in state.items():
            assert rel_error(s1["state"][i][key].double(), value.double()) < TOL, (i, key)
    for _, layer in fastticket.masked_modules(m1):
        assert (layer.weight[~layer.weight_mask] == 0).all()


def test_compiled_step_refuses_the_fused_update() -> None:
    model = _lenet()
    optimizer = MaskedSGD(model.parameters(), lr=0.1)
    next(m for _, m in fastticket.masked_modules(model)).fused_update = lambda g, x: None
    with pytest.raises(ValueError, match="fusion"):
        CompiledTrainStep(model, optimizer)
