"""MaskedLinear on the triton backend trains like the torch backend and keeps pruned weights at zero.

On CPU the triton backend runs the kernels in the Triton interpreter (tests/conftest.py sets it up).
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fastticket.sparse.backend import use_backend
from fastticket.sparse.testing import rel_error
from fastticket.sparse.nn import MaskedLinear, masked_modules

pytestmark = pytest.mark.launches_triton  # the tests here run the triton backend


def make_mlp(device: torch.device, seed: int = 0) -> nn.Sequential:
    """20 -> 48 -> 10 with masks that leave some 16x16 tiles dead and others partly live."""
    torch.manual_seed(seed)
    model = nn.Sequential(MaskedLinear(20, 48), nn.ReLU(), MaskedLinear(48, 10)).to(device)
    gen = torch.Generator().manual_seed(seed + 1)
    first, second = model[0], model[2]
    m1 = torch.rand(48, 20, generator=gen) < 0.4
    m1[16:32, :] = False  # a dead output tile-row
    first.set_mask_(m1.to(device))
    m2 = torch.rand(10, 48, generator=gen) < 0.5
    m2[:, :16] = False  # a dead k tile-column
    second.set_mask_(m2.to(device))
    return model


def batches(device, steps, batch_shape=(12,)):
    gen = torch.Generator().manual_seed(123)
    return [(torch.randn(*batch_shape, 20, generator=gen).to(device),
             torch.randint(0, 10, batch_shape, generator=gen).to(device)) for _ in range(steps)]


def train(model, backend, opt_name, data):
    opt = (torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9) if opt_name == "sgd"
           else torch.optim.Adam(model.parameters(), lr=1e-2))
    with use_backend(backend):
        for x, y in data:
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x).reshape(-1, 10), y.reshape(-1))
            loss.backward()
            opt.step()
    return model


@pytest.fixture(params=["skip", "dense"])
def path(request, monkeypatch):
    monkeypatch.setenv("FASTTICKET_DENSE_THRESHOLD_LINEAR", "1.01" if request.param == "skip" else "0.0")
    return request.param


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_triton_backend_trains_to_the_same_weights(device, path, opt_name):
    reference = make_mlp(device)
    model = copy.deepcopy(reference)
    start = copy.deepcopy(reference.state_dict())
    data = batches(device, steps=5, batch_shape=(3, 4))  # 3-D input batches
    train(reference, "torch", opt_name, data)
    train(model, "triton", opt_name, data)
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        assert not torch.equal(q, start[name]), f"{name} did not train (the test would prove nothing)"
        # Adam normalises tiny gradient differences, so allow a little more than one kernel's tolerance.
        assert rel_error(p, q) < 1e-4, f"{name}: {rel_error(p, q)}"
    for _, layer in masked_modules(model):
        assert (layer.weight[~layer.weight_mask] == 0).all(), "a pruned weight was revived"


def test_no_grad_inference_and_3d_input(device, path):
    model = make_mlp(device)
    x = torch.randn(2, 5, 20, generator=torch.Generator().manual_seed(4)).to(device)
    with torch.no_grad():
        with use_backend("torch"):
            expected = model(x)
        with use_backend("triton"):
            out = model(x)
    assert out.shape == (2, 5, 10) and not out.requires_grad
    assert rel_error(out, expected) < 1e-5


def test_fused_update_replaces_weight_grad(device, path):
    model = make_mlp(device)
    layer = model[0]
    calls = []

    def fused_update(grad_out_2d, x_2d):
        calls.append((tuple(grad_out_2d.shape), tuple(x_2d.shape)))
        with torch.no_grad():  # a toy SGD step on the masked gradient, in place
            layer.weight.sub_(0.1 * (grad_out_2d.t() @ x_2d).masked_fill(~layer.weight_mask, 0.0))

    layer.fused_update = fused_update
    before = layer.weight.detach().clone()
    x = torch.randn(2, 6, 20, generator=torch.Generator().manual_seed(5)).to(device)
    with use_backend("triton"):
        model(x).square().sum().backward()
    assert layer.bias.grad is not None and model[2].weight.grad is not None
    if path == "dense":
        # The fusion applies to tile-skipping layers only: a dense-dispatched layer keeps cuBLAS's masked dW.
        assert calls == [] and layer.weight.grad is not None and torch.equal(layer.weight, before)
        assert (layer.weight.grad[~layer.weight_mask] == 0).all()
        return
    assert calls == [((12, 48), (12, 20))]
    assert layer.weight.grad is None, "with fused_update the weight must get no .grad"
    assert not torch.equal(layer.weight, before)
    assert (layer.weight[~layer.weight_mask] == 0).all()


def test_mask_change_is_seen_by_the_next_forward(device, path):
    layer = MaskedLinear(53, 37).to(device)
    x = torch.randn(9, 53, generator=torch.Generator().manual_seed(6)).to(device)
    with use_backend("triton"), torch.no_grad():
        layer(x)  # builds and caches the tile map of the all-live mask
        layer.weight_mask[:, 16:] = False  # in-place edit of the buffer
        layer.apply_mask_()
        out = layer(x)
    expected = x[:, :16] @ layer.weight[:, :16].t() + layer.bias
    assert rel_error(out, expected) < 1e-5


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_torch_compile_runs(device, backend, monkeypatch):
    # aot_eager exercises dynamo + autograd tracing without a C++ compile (slow on CI's 2 cores); fullgraph:
    # the triton path traces through the custom ops of fastticket/sparse/ops.py, no graph break.
    from fastticket.sparse import linear

    dispatched = []
    real = linear.use_tile_skipping
    monkeypatch.setattr(linear, "use_tile_skipping", lambda *a, **kw: dispatched.append(a) or real(*a, **kw))
    model = make_mlp(device)
    x = torch.randn(8, 20, generator=torch.Generator().manual_seed(7)).to(device)
    with use_backend("torch"):
        expected = model(x)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with use_backend(backend):
        out = compiled(x)
        out.sum().backward()
    assert rel_error(out, expected) < 1e-5
    assert bool(dispatched) == (backend == "triton"), "the compiled model did not run the selected backend"
    assert model[0].weight.grad is not None
    assert (model[0].weight.grad[~model[0].weight_mask] == 0).all()


def test_autocast_computes_in_the_autocast_dtype(device, path):
    if device.type != "cuda" and path == "skip":
        pytest.skip("autocast on CPU means bf16, which the Triton interpreter cannot multiply")
    model = make_mlp(device)
    x = torch.randn(6, 20, generator=torch.Generator().manual_seed(8)).to(device)
    with use_backend("torch"):
        expected = model(x)
    with use_backend("triton"), torch.autocast(device.type, dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert model[0].weight.grad.dtype == torch.float32, "the fp32 master weight gets an fp32 gradient"
    assert (model[0].weight.grad[~model[0].weight_mask] == 0).all()
    assert rel_error(out, expected) < 2e-2


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_float64_layers_on_the_triton_backend_are_exact(device, monkeypatch, kind):
    """The one-arm tile kernels compute in fp32: a float64 layer must not silently lose precision there
    (it did: errors of order 1 in its output), so it takes the dense op even where tiles would be skipped."""
    from fastticket.sparse.nn import MaskedConv2d
    monkeypatch.setenv(f"FASTTICKET_DENSE_THRESHOLD_{kind.upper()}", "1.01")  # tile skipping wherever allowed
    torch.manual_seed(3)
    if kind == "linear":
        layer, x = MaskedLinear(70, 50), torch.randn(9, 70)
        mask = torch.rand(50, 70) < 0.6
        mask[:32, :32] = False
    else:
        layer, x = MaskedConv2d(5, 20, 3, padding=1), torch.randn(2, 5, 6, 7)
        mask = torch.rand(20, 5, 3, 3) < 0.6
        mask[:16] = False
    layer = layer.double().to(device)
    layer.set_mask_(mask.to(device))
    x = x.double().to(device).requires_grad_()
    outputs = {}
    for backend in ("torch", "triton"):
        with use_backend(backend):
            out = layer(x)
            grads = torch.autograd.grad(out.square().sum(), (x, layer.weight))
        outputs[backend] = (out.detach(), *grads)
    for ref, got in zip(outputs["torch"], outputs["triton"]):
        assert rel_error(got, ref) < 1e-12
