"""The dW+update fusion (kernels/linear_dw_sgd.py, wired by fastticket/sparse/fused_update.py) against the unfused path
and a float64 reference."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fastticket.sparse import optim as fopt
from fastticket.sparse.backend import use_backend
from fastticket.kernels import linear_dw_sgd
from fastticket.kernels.masked_linear import linear_tile_sizes
from fastticket.kernels.tile_map import build_tile_map
from fastticket.sparse.nn import MaskedLinear
from fastticket.sparse.testing import parity_tolerance, rel_error

pytestmark = pytest.mark.launches_triton  # every test here launches the Triton kernels


@pytest.fixture
def tile_skipping(monkeypatch):
    """Every MaskedLinear runs the tile-skipping kernels (the only layers the fusion applies to)."""
    monkeypatch.setenv("FASTTICKET_DENSE_THRESHOLD_LINEAR", "1.01")


def _mask_with_dead_tiles(shape, block, seed) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(shape, generator=g) > 0.4
    m[: block[0], : block[1]] = False  # one dead tile at least
    return m


@pytest.mark.parametrize("hp", [dict(momentum=0.9, dampening=0.0, nesterov=True, weight_decay=1e-2, maximize=False),
                                dict(momentum=0.8, dampening=0.2, nesterov=False, weight_decay=0.0, maximize=True),
                                dict(momentum=0.0, dampening=0.0, nesterov=False, weight_decay=1e-3,
                                     maximize=False)])
@pytest.mark.parametrize("split_m, tiles_per_program", [(None, 1), (3, 1), (3, 2)],
                         ids=["unsplit", "split3", "split3-quads"])
def test_kernel_matches_float64_reference(hp, split_m, tiles_per_program, device) -> None:
    """Unsplit, and split over tokens (3 splits of 64 rows, the last partial: partial dW slabs per live tile,
    reduced by tile or by 2 x 2 quad programs, then the SGD epilogue): against the float64 reference, dead tiles
    (among them a dead sub-tile of a live quad) never touched."""
    n, k, m = 37, 45, (21 if split_m is None else 150)  # not multiples of any tile
    block = linear_tile_sizes(device, torch.float32)
    mask = _mask_with_dead_tiles((n, k), block, seed=1).to(device)
    tile_map = build_tile_map(mask, *block)
    assert tile_map.n_live < tile_map.n_tiles
    g = torch.Generator().manual_seed(2)
    w64 = (torch.randn(n, k, generator=g, dtype=torch.float64) * mask.cpu()).to(device)
    w = w64.float()
    dead = ~tile_map.live.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[:n, :k]
    buf, buf64 = None, None
    for step in range(3):
        dy = torch.randn(m, n, generator=g, dtype=torch.float64).to(device)
        x = torch.randn(m, k, generator=g, dtype=torch.float64).to(device)
        buf64 = linear_dw_sgd.linear_dw_sgd_reference_(dy, x, w64, mask, buf64, lr=0.05, **hp)
        buf = linear_dw_sgd.linear_dw_sgd_(dy.float(), x.float(), w, mask, tile_map, buf, lr=0.05, **hp,
                                           split_m=split_m, tiles_per_program=tiles_per_program)
        if step == 0 and buf is not None:
            buf[dead] = float("nan")  # dead tiles of the buffer must never be read or written again
    assert rel_error(w, w64) < 1e-5
    assert bool((w[~mask] == 0).all())
    if hp["momentum"]:
        assert bool(buf[dead].isnan().all())
        assert rel_error(buf[~dead], buf64[~dead]) < 1e-5


def _mlp(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(MaskedLinear(20, 40), nn.ReLU(), MaskedLinear(40, 24), nn.Tanh(), MaskedLinear(24, 5))
    block = linear_tile_sizes(torch.device("cpu"), torch.float32)
    for i, layer in enumerate(l for l in model if isinstance(l, MaskedLinear)):
        layer.set_mask_(_mask_with_dead_tiles(layer.weight.shape, block, seed=10 + i))
    return model


def _train(model, opt, sched, steps: int, fused: bool, device, dense=()):
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randn(12, 20, generator=g).to(device)
        y = torch.randint(0, 5, (12,), generator=g).to(device)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        if fused:
            # The fusion applied the weight updates inside backward: no weight gradient was produced, except
            # on the layers dispatched to dense cuBLAS (`dense`: indices into model), which keep their dW.
            for i, layer in enumerate(model):
                if isinstance(layer, MaskedLinear):
                    assert (layer.weight.grad is not None) == (i in dense), i
        opt.step()
        sched.step()


def test_fused_equals_unfused_over_10_steps(device, tile_skipping) -> None:
    base = _mlp(0).to(device)
    runs = {}
    with use_backend("triton"):
        for fused in (False, True):
            model = copy.deepcopy(base)
            opt = fopt.MaskedSGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3, nesterov=True)
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
            if fused:
                assert fopt.enable_fused_dw_update(model, opt)
            _train(model, opt, sched, 10, fused, device)
            if fused:
                base_weights = {id(l): w for l, w in zip(model, [getattr(b, 'weight', None) for b in base])}
            runs[fused] = (model, opt)
    (m0, o0), (m1, o1) = runs[False], runs[True]
    for (name, p0), p1 in zip(m0.named_parameters(), m1.parameters()):
        assert rel_error(p1.detach(), p0.detach()) < 1e-5, name
        assert rel_error(o1.state[p1]["momentum_buffer"], o0.state[p0]["momentum_buffer"]) < 1e-5, name
    for l0, l1 in zip(m0, m1):
        if isinstance(l1, MaskedLinear):
            assert bool((l1.weight[~l1.weight_mask] == 0).all())
            assert rel_error(l1.weight.detach(), base_weights[id(l1)]) > 1e-2  # training did move the weights
    # The state the fused path kept is torch's: a state dict round trip onto the unfused path works.
    fopt.disable_fused_dw_update(m1)
    assert all(getattr(l, "fused_update", None) is None for l in m1)
    o0.load_state_dict(o1.state_dict())


def test_fallback_warns_once_and_stays_unfused(device) -> None:
    model = _mlp(1).to(device)
    fopt._warned_reasons.clear()
    adam = fopt.MaskedAdam(model.parameters(), lr=1e-3)
    with use_backend("triton"):
        with pytest.warns(RuntimeWarning, match="needs MaskedSGD"):
            assert not fopt.enable_fused_dw_update(model, adam)
    assert all(getattr(l, "fused_update", None) is None for l in model)
    sgd = fopt.MaskedSGD(model.parameters(), lr=0.1)
    with use_backend("torch"):
        with pytest.warns(RuntimeWarning, match="not triton"):
            assert not fopt.enable_fused_dw_update(model, sgd)
    sgd.register_step_pre_hook(lambda *a: None)
    with use_backend("triton"):
        with pytest.warns(RuntimeWarning, match="step hooks"):
            assert not fopt.enable_fused_dw_update(model, sgd)
    assert all(getattr(l, "fused_update", None) is None for l in model)


def test_gradient_accumulation_is_refused(device, tile_skipping) -> None:
    model = _mlp(2).to(device)
    opt = fopt.MaskedSGD(model.parameters(), lr=0.1, momentum=0.9)
    with use_backend("triton"):
        assert fopt.enable_fused_dw_update(model, opt)
        x = torch.randn(4, 20, device=device)
        model(x).sum().backward()
        with pytest.raises(RuntimeError, match="twice before optimizer.step"):
            model(x).sum().backward()
        opt.step()
        model(x).sum().backward()  # the guard resets at each optimizer.step()


def test_dense_dispatched_layers_keep_the_unfused_dw(device, monkeypatch) -> None:
    """Fusion applies only to layers on the tile-skipping kernels: a layer the dispatch sends to cuBLAS gets its
    weight gradient (and the optimizer's step) as without fusion. With threshold 0.6 the last layer (half its
    tiles live) skips tiles and the first two (5 of 6 live) go dense."""
    monkeypatch.setenv("FASTTICKET_DENSE_THRESHOLD_LINEAR", "0.6")
    base = _mlp(3).to(device)
    block = linear_tile_sizes(device, torch.float32)
    fractions = [l.tile_map(*block).live_fraction for l in base if isinstance(l, MaskedLinear)]
    assert fractions[0] >= 0.6 and fractions[1] >= 0.6 and fractions[2] < 0.6, fractions
    runs = {}
    with use_backend("triton"):
        for fused in (False, True):
            model = copy.deepcopy(base)
            opt = fopt.MaskedSGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
            if fused:
                assert fopt.enable_fused_dw_update(model, opt)
            _train(model, opt, sched, 6, fused, device, dense=(0, 2))
            runs[fused] = model
    for (name, p0), p1 in zip(runs[False].named_parameters(), runs[True].parameters()):
        assert rel_error(p1.detach(), p0.detach()) < 1e-5, name


class _LaunchRecorder:
    """Stands in for a jitted kernel: records each launch's tensor dtypes and keyword arguments, then runs it."""

    def __init__(self, kernel) -> None:
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(([a.dtype for a in args if isinstance(a, torch.Tensor)], kwargs))
            return self.kernel[grid](*args, **kwargs)
        return launch


# fp16 on CPU: the Triton 3.8 interpreter's tl.dot returns garbage for bf16 operands (checked), bf16 on a GPU.
@pytest.mark.parametrize("dtype", [torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else []))
def test_16bit_activations_stay_16bit(dtype, device, monkeypatch) -> None:
    """16-bit activations of an fp32 master weight (autocast): dW is computed from 16-bit operands (tensor cores
    on a GPU, as the unfused dW kernel does), rounded to that dtype, and only the update runs in fp32."""
    recorder = _LaunchRecorder(linear_dw_sgd._dw_sgd_kernel)
    monkeypatch.setattr(linear_dw_sgd, "_dw_sgd_kernel", recorder)
    n, k, m = 37, 45, 21
    block = linear_tile_sizes(device, dtype)
    mask = _mask_with_dead_tiles((n, k), block, seed=4).to(device)
    tile_map = build_tile_map(mask, *block)
    g = torch.Generator().manual_seed(5)
    w64 = (torch.randn(n, k, generator=g, dtype=torch.float64) * mask.cpu()).to(device)
    w = w64.float()
    dy = torch.randn(m, n, generator=g).to(device, dtype)
    x = torch.randn(m, k, generator=g).to(device, dtype)
    hp = dict(lr=0.05, momentum=0.9, dampening=0.0, nesterov=False, weight_decay=1e-2, maximize=False)
    buf = linear_dw_sgd.linear_dw_sgd_(dy, x, w, mask, tile_map, None, **hp)
    buf64 = linear_dw_sgd.linear_dw_sgd_reference_(dy.double(), x.double(), w64, mask, None, dw_dtype=dtype, **hp)
    (dtypes, kwargs), = recorder.launches
    assert dtypes[:2] == [dtype, dtype]  # dY and X as given, not upcast to the weight's fp32
    assert dtypes[3] == torch.float32 and kwargs["INPUT_PRECISION"] is None  # the weight; a 16-bit dot
    tol = parity_tolerance(dtype)
    assert rel_error(w, w64) < tol and rel_error(buf, buf64) < tol
