"""Masked optimizers against torch.optim (float64) on masked gradients, on both backends.

The reference: torch.optim.SGD / Adam / AdamW run in float64 on the same parameters with the gradient
multiplied by the mask. With pruned weights zero, that is exactly the masked step (docs/architecture.md,
"The invariant"), so
trajectories must agree to fp32 rounding, while pruned weights and state stay exactly zero throughout.
Gradients on pruned entries are NaN in the runs under test: the step must mask them, not multiply them.
"""
from __future__ import annotations

import copy
import zlib
from typing import Dict, List

import pytest
import torch

from fastticket.sparse import _mask_registry
from fastticket.sparse.backend import use_backend
from fastticket.kernels import masked_optim
from fastticket.sparse.optim import MaskedAdam, MaskedAdamW, MaskedSGD
from fastticket.sparse.rewind import reset_state_, rewind_, rewind_and_reset_
from fastticket.sparse.testing import rel_error
from sm90 import Expect, assert_properties

SHAPES = [(40, 30), (30,), (17, 13), (12, 20)]
STEPS = 50
STATE_KEYS = ("momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.launches_triton)]


def _problem(seed: int):
    g = torch.Generator().manual_seed(seed)
    masks = [torch.rand(SHAPES[0], generator=g) > 0.5,
             None,                                            # a bias: unmasked
             torch.zeros(SHAPES[2], dtype=torch.bool),        # an all-dead tensor
             torch.rand(SHAPES[3], generator=g) > 0.8]        # 20 % density
    params = [torch.randn(s, generator=g, dtype=torch.float64) for s in SHAPES]
    for p, m in zip(params, masks):
        if m is not None:
            p.mul_(m)
    grads = [[torch.randn(s, generator=g, dtype=torch.float64) for s in SHAPES] for _ in range(STEPS)]
    return params, masks, grads


OPTIMIZERS = {
    "sgd-momentum-wd": (torch.optim.SGD, MaskedSGD,
                        [dict(lr=0.05, momentum=0.9, weight_decay=1e-2), dict(lr=0.02, momentum=0.5)]),
    "sgd-nesterov-max": (torch.optim.SGD, MaskedSGD,
                         [dict(lr=0.05, momentum=0.9, nesterov=True, maximize=True, weight_decay=1e-3),
                          dict(lr=0.01, momentum=0.8, nesterov=True, maximize=True)]),
    "sgd-dampening": (torch.optim.SGD, MaskedSGD,
                      [dict(lr=0.05, momentum=0.9, dampening=0.3), dict(lr=0.1)]),
    "adam-amsgrad": (torch.optim.Adam, MaskedAdam,
                     [dict(lr=1e-2, amsgrad=True, weight_decay=1e-2), dict(lr=3e-3, betas=(0.8, 0.95))]),
    "adam-max": (torch.optim.Adam, MaskedAdam,
                 [dict(lr=1e-2, maximize=True, eps=1e-6), dict(lr=2e-2, weight_decay=0.1)]),
    "adamw": (torch.optim.AdamW, MaskedAdamW,
              [dict(lr=1e-2, weight_decay=0.1, amsgrad=True), dict(lr=5e-3)]),
}


def _groups(params: List[torch.Tensor], hps: List[dict]) -> List[dict]:
    return [dict(params=params[:2], **hps[0]), dict(params=params[2:], **hps[1])]


def _check_pruned_zero(params, masks, opt) -> None:
    for p, m in zip(params, masks):
        if m is None:
            continue
        assert bool((p[~m] == 0).all()), "a pruned weight was revived"
        for key in STATE_KEYS:
            s = opt.state[p].get(key)
            if s is not None:
                assert bool((s[~m] == 0).all()), f"optimizer state {key} nonzero on pruned entries"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_trajectory_matches_torch_optim(name: str, backend: str) -> None:
    torch_cls, masked_cls, hps = OPTIMIZERS[name]
    params64, masks, grads = _problem(seed=zlib.crc32(name.encode()) % 1000)
    ref_params = [p.clone().requires_grad_() for p in params64]
    ours = [p.float().requires_grad_() for p in params64]
    ref = torch_cls(_groups(ref_params, hps))
    group_masks = _groups(masks, hps)
    # Masks given both ways: the first group's via masks=..., the second group's via the group key "mask".
    groups = _groups(ours, hps)
    groups[1]["mask"] = group_masks[1]["params"]
    opt = masked_cls(groups, masks=[masks[0], masks[1], None, None])
    sched_ref = torch.optim.lr_scheduler.StepLR(ref, step_size=10, gamma=0.7)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.7)
    with use_backend(backend):
        for t in range(STEPS):
            for p, q, m, g in zip(ref_params, ours, masks, grads[t]):
                p.grad = g if m is None else g * m
                # NaN on pruned entries: only a step that masks (not multiplies) the gradient survives this.
                q.grad = (g if m is None else g.masked_fill(~m, float("nan"))).float()
            if t == 3:
                ours[1].grad = None  # a parameter without gradient this step is skipped, state untouched
                ref_params[1].grad = None
            ref.step()
            opt.step()
            sched_ref.step()
            sched.step()
            _check_pruned_zero(ours, masks, opt)
            if t == STEPS // 2:
                # state_dict round trip mid-trajectory: a fresh optimizer continues identically.
                saved = copy.deepcopy(opt.state_dict())
                groups = _groups(ours, hps)
                groups[1]["mask"] = group_masks[1]["params"]
                opt = masked_cls(groups, masks=[masks[0], masks[1], None, None])
                opt.load_state_dict(saved)
                sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.7, last_epoch=t)
                assert opt.param_groups[0]["lr"] == pytest.approx(ref.param_groups[0]["lr"])
    tol = 1e-5 if "sgd" in name else 5e-5
    for p, q in zip(ref_params, ours):
        if p.detach().norm() > 0:
            assert rel_error(q.detach(), p.detach()) < tol
        else:
            assert bool((q == 0).all())
        for key in STATE_KEYS:
            if key in ref.state[p]:
                assert key in opt.state[q], key
                rs, os_ = ref.state[p][key], opt.state[q][key]
                if rs.norm() > 0:
                    assert rel_error(os_, rs) < tol, key
                else:
                    assert bool((os_ == 0).all()), key
        if "step" in ref.state[p]:
            assert float(opt.state[q]["step"]) == float(ref.state[p]["step"])
    assert ref_params[2].norm() == 0 and bool((ours[2] == 0).all())  # the all-dead tensor never moved


@pytest.mark.launches_triton
@pytest.mark.parametrize("name", ["adam-amsgrad", "adamw", "sgd-momentum-wd"])
def test_triton_backend_steps_float64_parameters(name: str) -> None:
    """float64 parameters on the triton backend (the fused kernels compute in float64; Adam's correctly
    rounded sqrt / division were fp32-only intrinsics and failed to compile for float64): torch.optim's
    float64 trajectory to 1e-12, pruned entries exact zeros."""
    torch_cls, masked_cls, hps = OPTIMIZERS[name]
    params64, masks, grads = _problem(seed=7)
    ref_params = [p.clone().requires_grad_() for p in params64]
    ours = [p.clone().requires_grad_() for p in params64]
    ref = torch_cls(_groups(ref_params, hps))
    opt = masked_cls(_groups(ours, hps), masks=masks)
    with use_backend("triton"):
        for t in range(5):
            for p, q, m, g in zip(ref_params, ours, masks, grads[t]):
                p.grad = g if m is None else g * m
                q.grad = g.clone()
            ref.step()
            opt.step()
    _check_pruned_zero(ours, masks, opt)
    for p, q in zip(ref_params, ours):
        if p.detach().norm() > 0:
            assert rel_error(q.detach(), p.detach()) < 1e-12


def _count_launches(monkeypatch, name: str) -> Dict[str, int]:
    counts = {"launches": 0}
    kernel = masked_optim._kernels[name]

    class Counting:
        def __getitem__(self, grid):
            counts["launches"] += 1
            return kernel[grid]

    monkeypatch.setitem(masked_optim._kernels, name, Counting())
    return counts


@pytest.mark.launches_triton
@pytest.mark.parametrize("cls", [MaskedSGD, MaskedAdam])
def test_one_launch_per_group(monkeypatch, cls) -> None:
    params64, masks, grads = _problem(seed=3)
    ours = [p.float().requires_grad_() for p in params64]
    opt = cls([dict(params=ours[:2]), dict(params=ours[2:])], lr=0.01, masks=masks)
    counts = _count_launches(monkeypatch, "sgd" if cls is MaskedSGD else "adam")
    with use_backend("triton"):
        for q, g in zip(ours, grads[0]):
            q.grad = g.float()
        opt.step()
    assert counts["launches"] == 2


def _block_mask(shape, tile, live_fraction, seed) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    tiles = (-(-shape[0] // tile[0]), -(-shape[1] // tile[1]))
    live = torch.rand(tiles, generator=g) < live_fraction
    live[0, 0] = True
    full = live.repeat_interleave(tile[0], 0).repeat_interleave(tile[1], 1)[: shape[0], : shape[1]]
    return (full & (torch.rand(shape, generator=g) > 0.3)).contiguous()


@pytest.mark.launches_triton
@pytest.mark.parametrize("cls,kw", [(MaskedSGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-2)),
                                    (MaskedAdamW, dict(lr=1e-2, amsgrad=True))])
def test_block_mask_steps_live_tiles_only(cls, kw) -> None:
    tile = (8, 8)
    shapes = [(40, 30), (17, 21)]
    masks = [_block_mask(s, tile, 0.4, seed=i) for i, s in enumerate(shapes)]
    g = torch.Generator().manual_seed(7)
    p_ref = [(torch.randn(s, generator=g) * m).requires_grad_() for s, m in zip(shapes, masks)]
    p_tri = [p.detach().clone().requires_grad_() for p in p_ref]
    dead = [masked_optim.tile_map_for(m, tile).live.logical_not() for m in masks]
    assert all(d.any() for d in dead)  # the test needs dead tiles
    opt_ref = cls(p_ref, masks=masks, **kw)
    opt_tri = cls(p_tri, masks=masks, **kw)
    opt_tri.block_tile = tile
    sentinel = []
    for p, d in zip(p_tri, dead):
        # Break the invariant inside dead tiles on purpose: a live-tile-only step never touches them, so the
        # sentinel survives; an element-wise step would overwrite it with 0.
        full = d.repeat_interleave(tile[0], 0).repeat_interleave(tile[1], 1)[: p.shape[0], : p.shape[1]]
        with torch.no_grad():
            p[full] = 123.0
        sentinel.append(full)
    for t in range(5):
        grads = [torch.randn(s, generator=g) for s in shapes]
        for p, q, gr in zip(p_ref, p_tri, grads):
            p.grad, q.grad = gr.clone(), gr.clone()
        with use_backend("torch"):
            opt_ref.step()
        with use_backend("triton"):
            opt_tri.step()
    for p, q, full, m in zip(p_ref, p_tri, sentinel, masks):
        assert bool((q[full] == 123.0).all())
        assert rel_error(q.detach()[~full], p.detach()[~full]) < 1e-6
        assert bool((q[~full & ~m] == 0).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_rewind_and_reset(backend: str) -> None:
    g = torch.Generator().manual_seed(11)
    params = [torch.randn(s, generator=g).requires_grad_() for s in SHAPES]
    sources = [torch.randn(s, generator=g) for s in SHAPES]
    masks = [torch.rand(s, generator=g) > 0.5 if len(s) > 1 else None for s in SHAPES]
    masks[2] = torch.zeros(SHAPES[2], dtype=torch.bool)
    sources[0][~masks[0]] = float("nan")  # pruned entries of the rewind point must not leak
    opt = MaskedAdam(params, lr=1e-2, amsgrad=True, masks=masks)
    sgd = MaskedSGD(params, lr=0.1, momentum=0.9, masks=masks)
    with use_backend(backend):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
        sgd.step()
        rewind_and_reset_(params, sources, masks, opt)
        reset_state_(sgd)
    for p, s, m in zip(params, sources, masks):
        expect = s if m is None else torch.where(m, s, torch.zeros(()))
        assert torch.equal(p.detach(), expect)
    for p in params:
        assert float(opt.state[p]["step"]) == 0
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            assert bool((opt.state[p][key] == 0).all())
        assert bool((sgd.state[p]["momentum_buffer"] == 0).all())
    # After the reset the optimizer behaves as a fresh one.
    fresh_params = [p.detach().clone().requires_grad_() for p in params]
    fresh = MaskedAdam(fresh_params, lr=1e-2, amsgrad=True, masks=masks)
    with use_backend(backend):
        for p, q in zip(params, fresh_params):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()
        opt.step()
        fresh.step()
    for p, q in zip(params, fresh_params):
        assert torch.allclose(p, q, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rewind_plain(backend: str) -> None:
    g = torch.Generator().manual_seed(5)
    params = [torch.randn(s, generator=g) for s in SHAPES]
    sources = [torch.randn(s, generator=g) for s in SHAPES]
    with use_backend(backend):
        rewind_(params, sources, [None] * len(params))
    for a, b in zip(params, sources):
        assert torch.equal(a, b)


@pytest.mark.launches_triton
@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_triton_launchers_match_float64_reference(kind: str) -> None:
    """The kernels alone, fp32 against the float64 reference, odd sizes across chunk boundaries."""
    g = torch.Generator().manual_seed(2)
    # 4550 and 4480 elements: full 4096-element chunks (unpredicated path, with and without a mask) and
    # partial ones (bounds-checked path).
    shapes = [(70, 65), (5,), (64, 70)]
    masks = [torch.rand(s, generator=g) > 0.5 for s in shapes[:2]] + [None]
    p64 = [torch.randn(s, generator=g, dtype=torch.float64) * (1 if m is None else m) for s, m in zip(shapes, masks)]
    p32 = [p.float() for p in p64]
    s64 = [[torch.zeros_like(p) for p in p64] for _ in range(2)]
    s32 = [[torch.zeros_like(p) for p in p32] for _ in range(2)]
    b64: List = [None] * 3
    b32: List = [None] * 3
    adam = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2, amsgrad=False, maximize=False,
                decoupled=False)
    sgd = dict(lr=0.05, momentum=0.9, dampening=0.0, nesterov=True, weight_decay=1e-2, maximize=False)
    for step in range(1, 4):
        grads = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
        if kind == "adam":
            for i in range(3):
                masked_optim.adam_reference_(p64[i], grads[i], masks[i], s64[0][i], s64[1][i], None, step=step,
                                             **adam)
            masked_optim.adam_step_(p32, [x.float() for x in grads], masks, s32[0], s32[1], [None] * 3,
                                    [step] * 3, **adam)
        else:
            for i in range(3):
                b64[i] = masked_optim.sgd_reference_(p64[i], grads[i], masks[i], b64[i], **sgd)
            masked_optim.sgd_step_(p32, [x.float() for x in grads], masks, b32, **sgd)
    for a, b in zip(p32, p64):
        assert rel_error(a, b) < 1e-5
    states = zip(s32[0] + s32[1], s64[0] + s64[1]) if kind == "adam" else zip(b32, b64)
    for a, b in states:
        assert rel_error(a, b) < 1e-5


@pytest.mark.launches_triton
def test_layer_masks_found_automatically() -> None:
    from fastticket.sparse.nn import MaskedLinear

    layer = MaskedLinear(12, 9)
    assert _mask_registry.layer_of(layer.weight) is layer
    mask = torch.rand(9, 12, generator=torch.Generator().manual_seed(0)) > 0.5
    layer.set_mask_(mask)
    opt = MaskedSGD(layer.parameters(), lr=0.1, momentum=0.9)
    for backend in ("torch", "triton"):
        with use_backend(backend):
            layer.weight.grad = torch.randn(9, 12)
            layer.bias.grad = torch.randn(9)
            opt.step()
        assert bool((layer.weight[~mask] == 0).all())
        assert bool((layer.weight[mask] != 0).all())
        assert bool((opt.state[layer.weight]["momentum_buffer"][~mask] == 0).all())


@pytest.mark.launches_triton
def test_masks_found_after_sparsify_of_an_optimized_model() -> None:
    """The optimizer built on a dense model keeps working after `sparsify` moves the same Parameters into
    masked layers: the owner is resolved when the step runs, not when the optimizer is built."""
    from torch import nn

    from fastticket.sparse.nn import sparsify

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 9), nn.ReLU(), nn.Linear(9, 4))
    opt = MaskedAdam(model.parameters(), lr=1e-2)
    with use_backend("torch"):
        model(torch.randn(3, 12)).sum().backward()
        opt.step()  # dense: no layer owns the weights yet (negative lookups get cached here)
    sparsify(model)
    mask = torch.rand(9, 12, generator=torch.Generator().manual_seed(1)) > 0.5
    model[0].set_mask_(mask)
    reset_state_(opt)
    for backend in ("torch", "triton"):
        with use_backend(backend):
            opt.zero_grad()
            model(torch.randn(3, 12)).sum().backward()
            model[0].weight.grad.add_(1.0)  # nonzero on pruned entries: only the optimizer's mask stops it
            opt.step()
        assert bool((model[0].weight[~mask] == 0).all())
        assert bool((opt.state[model[0].weight]["exp_avg"][~mask] == 0).all())


# sm_90 compile checks (tests/sm90.py, the sm90_compiled fixture): the multi-tensor optimizer steps and the
# rewind pass compiled as a real launch would compile them (64 x 64 chunks, aligned tables), and the
# properties they must keep. THE table for these kernels. No tensor cores here: what matters is vectorized
# access on the unmasked path (the 16-byte hint covers 4 elements: 16-byte loads for fp32, 8 for 16-bit
# dtypes) and no spills. The rewind pass (once per level, not per step) runs bounds-masked scalar loads.
SM90_EXPECT = {
    "sgd bf16": Expect(None, load_bytes=8),
    "adam bf16": Expect(None, load_bytes=8),
    "sgd fp32": Expect(None, load_bytes=16),
    "adam fp32": Expect(None, load_bytes=16),
    "sgd fp32 graph-safe": Expect(None, load_bytes=16),
    "adam fp32 graph-safe": Expect(None, load_bytes=16),
    "rewind bf16": Expect(None),
    "rewind fp32": Expect(None),
}

SM90_BODY = r"""
import torch
import fastticket.kernels.masked_optim as masked_optim
import fastticket.kernels.rewind as rewind_kernels
import triton.language as tl
from fastticket.kernels._multi_tensor import DEFAULT_TILE, pointer_type, tl_dtype

i64, i32, f64 = ptr(torch.int64), ptr(torch.int32), ptr(torch.float64)
BN, BK = DEFAULT_TILE
for dtype, tag in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
    geometry = dict(DTYPE=tl_dtype(dtype), PTR_TY=pointer_type(dtype), COMPUTE=masked_optim._compute_dtype(dtype),
                    BN=BN, BK=BK, ALIGNED=True, num_warps=masked_optim._num_warps(DEFAULT_TILE))
    # eager: float arguments (the scalars pointer is not read); graph-safe: the step's scalars from a f64 row
    for mode, scalars in (("", dict(SCALARS_PTR=False)), (" graph-safe", dict(SCALARS_PTR=True, SCALAR=tl.float32))):
        if mode and dtype != torch.float32:
            continue
        check(f"sgd {tag}{mode}", masked_optim._kernels["sgd"], i64, i64, i32, 0.1, 0.9, 0.0, 1e-4, f64,
              HAS_MOMENTUM=True, NESTEROV=True, MAXIMIZE=False, HAS_WD=True, **scalars, **geometry)
        check(f"adam {tag}{mode}", masked_optim._kernels["adam"], i64, i64, i32, 1e-3, 0.9, 0.999, 1e-8, 1e-2, 1e-3,
              1.0, f64, AMSGRAD=False, MAXIMIZE=False, HAS_WD=True, DECOUPLED=True, **scalars, **geometry)
    check(f"rewind {tag}", rewind_kernels._rewind_kernel, i64, i64, i32, PTR_TY=pointer_type(dtype), BN=BN, BK=BK)
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU every other test compiles the kernels for real")
def test_kernels_compile_for_sm90_without_a_gpu(sm90_compiled):
    missing = sorted(set(SM90_EXPECT) - set(sm90_compiled))
    assert not missing, f"kernels not compiled: {missing}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="offline compile check; a GPU runs the kernels themselves")
@pytest.mark.parametrize("name", sorted(SM90_EXPECT))
def test_sm90_vectorized_no_spills(name, sm90_compiled):
    assert_properties(sm90_compiled, name, SM90_EXPECT[name])


@pytest.mark.parametrize("cls,kw", [(MaskedSGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-2, nesterov=True)),
                                    (MaskedSGD, dict(lr=0.1, momentum=0.9, dampening=0.1, maximize=True)),
                                    (MaskedAdam, dict(lr=1e-2, weight_decay=1e-2, amsgrad=True)),
                                    (MaskedAdamW, dict(lr=1e-2, maximize=True))])
def test_torch_backend_is_multi_tensor_and_equals_the_per_tensor_reference(monkeypatch, cls, kw) -> None:
    """The torch backend's step runs the reference's formulas over all tensors at once (never the per-tensor
    reference in a loop) and gives its float64 numbers to rounding, pruned entries exact zeros."""
    params64, masks, grads = _problem(seed=11)
    ours = [p.clone().requires_grad_() for p in params64]
    ref = [p.clone() for p in params64]
    opt = cls(ours, masks=masks, **kw)
    sgd = cls is MaskedSGD
    bufs = [None] * len(ref)
    moments = [(torch.zeros_like(p), torch.zeros_like(p), torch.zeros_like(p)) for p in ref]
    reference = masked_optim.sgd_reference_ if sgd else masked_optim.adam_reference_
    calls = []
    monkeypatch.setattr(masked_optim, "sgd_reference_" if sgd else "adam_reference_",
                        lambda *a, **k: calls.append(1) or reference(*a, **k))
    hp = {k: v for k, v in opt.defaults.items() if k in ("lr", "momentum", "dampening", "nesterov", "weight_decay",
                                                          "maximize", "eps", "amsgrad")}
    with use_backend("torch"):
        for t in range(5):
            for q, m, g in zip(ours, masks, grads[t]):
                q.grad = g if m is None else g.masked_fill(~m, float("nan"))
            opt.step()
            assert not calls, "the torch backend stepped tensor by tensor"
            for i, (p, m, g) in enumerate(zip(ref, masks, grads[t])):
                if sgd:
                    bufs[i] = reference(p, g, m, bufs[i], **hp)
                else:
                    beta1, beta2 = opt.defaults["betas"]
                    reference(p, g, m, *moments[i], step=t + 1, beta1=beta1, beta2=beta2,
                              decoupled=opt.defaults["decoupled_weight_decay"], **hp)
            for q, p, m in zip(ours, ref, masks):
                # foreach's add-with-alpha may fuse a multiply-add the reference rounds twice: float64 rounding
                torch.testing.assert_close(q.detach(), p, rtol=1e-12, atol=1e-14)
                if m is not None:
                    assert bool((q[~m] == 0).all())


@pytest.mark.parametrize("cls,kw,state_keys", [
    (MaskedAdam, dict(lr=0.1, weight_decay=1e-2, amsgrad=True), ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")),
    (MaskedAdamW, dict(lr=0.1, maximize=True), ("exp_avg", "exp_avg_sq"))])
def test_fused_cpu_adam_masks_only_the_gradient_once_pruned_entries_are_zero(cls, kw, state_keys) -> None:
    """The CPU (fused) Adam step: once a step has left weight and state zero on pruned entries, it masks only
    the gradient (in place); an in-place mask change, a hand edit or a loaded state makes the next step
    re-mask them all."""
    g = torch.Generator().manual_seed(7)
    p = torch.nn.Parameter(torch.randn(9, 13, generator=g, dtype=torch.float64))
    mask = torch.rand(9, 13, generator=g) > 0.4
    with torch.no_grad():
        p.mul_(mask)
    opt = cls([p], masks=[mask], **kw)

    def step() -> torch.Tensor:
        p.grad = torch.randn(9, 13, generator=g, dtype=torch.float64) + 1.0  # non-zero on pruned entries too
        grad = p.grad
        with use_backend("torch"):
            opt.step()
        return grad

    def pruned_all_zero() -> bool:
        tensors = [p.detach()] + [opt.state[p][k] for k in state_keys]
        return all(bool((t[~mask] == 0).all()) for t in tensors)

    assert not bool((step()[~mask] == 0).all())  # first step: weight and state re-masked, gradient untouched
    assert pruned_all_zero()
    assert bool((step()[~mask] == 0).all()) and pruned_all_zero()  # steady state: the gradient is masked
    mask[0, :] = False                                            # prune a row mid-training, in place
    step()
    assert pruned_all_zero()                                       # row 0's weights and stale moments zeroed
    with torch.no_grad():
        p[~mask] = 5.0                                             # a hand edit (apply_mask_ forgotten)
    step()
    assert pruned_all_zero()
    state = copy.deepcopy(opt.state_dict())
    for k in state_keys:
        state["state"][0][k].fill_(1.0)                            # a loaded state with non-zero pruned entries
    opt.load_state_dict(state)
    step()
    assert pruned_all_zero()


def test_stacked_arms_are_stepped_bit_for_bit_like_each_arm_alone() -> None:
    """fastticket.lottery.batched's stacked optimizer (stacked_arms): each arm's slice of a [K, ...] tensor gets exactly
    the bits it gets stepped alone (torch's fused CPU Adam rounds a tensor's tail differently, so the arms
    are passed as their own tensors)."""
    g = torch.Generator().manual_seed(3)
    shape = (37, 29)  # odd sizes: every arm's slice ends in a scalar tail
    arms = [torch.randn(shape, generator=g) for _ in range(3)]
    masks = [torch.rand(shape, generator=g) > 0.3 for _ in range(3)]
    grads = [[torch.randn(shape, generator=g) for _ in range(3)] for _ in range(4)]
    stacked = torch.nn.Parameter(torch.stack(arms) * torch.stack(masks))
    opt = MaskedAdam([stacked], lr=1e-2, masks=[torch.stack(masks)])
    opt.stacked_arms = True
    alone = [torch.nn.Parameter(a * m) for a, m in zip(arms, masks)]
    opts = [MaskedAdam([p], lr=1e-2, masks=[m]) for p, m in zip(alone, masks)]
    with use_backend("torch"):
        for step in grads:
            stacked.grad = torch.stack(step)
            opt.step()
            for p, o, gr in zip(alone, opts, step):
                p.grad = gr.clone()
                o.step()
    for k, p in enumerate(alone):
        assert torch.equal(stacked[k], p)
        assert torch.equal(opt.state[stacked]["exp_avg_sq"][k], opts[k].state[p]["exp_avg_sq"])


@pytest.mark.parametrize("lr", [float("nan"), float("inf"), -1e-3])
def test_a_learning_rate_that_makes_no_sense_is_refused(lr):
    p = torch.nn.Parameter(torch.randn(3, 4))
    for cls in (MaskedAdam, MaskedSGD):
        with pytest.raises(ValueError, match="Invalid learning rate.*finite number >= 0"):
            cls([p], lr=lr)


def test_another_models_optimizer_state_is_refused_not_a_crash():
    from fastticket.sparse.nn import MaskedLinear
    small, big = MaskedLinear(4, 3), MaskedLinear(8, 5)
    for layer in (small, big):
        layer.weight.grad, layer.bias.grad = torch.randn_like(layer.weight), torch.randn_like(layer.bias)
    other = MaskedAdam(big.parameters(), lr=1e-3)
    other.step()
    opt = MaskedAdam(small.parameters(), lr=1e-3)
    with pytest.raises(ValueError, match=r"exp_avg of parameter 0 \(group 0\) has shape \(5, 8\), the parameter "
                                         r"\(3, 4\); it is another model's state"):
        opt.load_state_dict(other.state_dict())
