"""The masked optimizers' cached launch plan (fastticket/sparse/_optim_plan.py).

A planned optimizer must step exactly (bit for bit, float64) like one whose plan is thrown away before every
step (the plan-less path), across every event that can make a plan stale: an lr change (must not rebuild),
a mask change, a loaded state dict, a new param group, a parameter losing its gradient. And the plan must
really be reused: built once per group over N plain steps.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fastticket.sparse.backend import use_backend
from fastticket.sparse.nn import MaskedLinear
from fastticket.sparse.optim import MaskedAdam, MaskedAdamW, MaskedSGD

OPTIMIZERS = {
    "sgd": lambda ps: MaskedSGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-3),
    "adam": lambda ps: MaskedAdam(ps, lr=0.01, weight_decay=1e-3),
    "adamw": lambda ps: MaskedAdamW(ps, lr=0.01, amsgrad=True),
}


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(MaskedLinear(9, 7), nn.Tanh(), MaskedLinear(7, 4)).double()
    g = torch.Generator().manual_seed(seed + 1)
    model[0].set_mask_(torch.rand(model[0].weight.shape, generator=g) > 0.4)
    # All dead: its one tile is skipped by the triton step's tile map, until step 5 revives it (a stale
    # tile map would keep it frozen).
    model[2].set_mask_(torch.zeros(model[2].weight.shape, dtype=torch.bool))
    return model


def _backward(model: nn.Module, step: int, extra=None) -> None:
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(5, 9, generator=g, dtype=torch.float64)
    loss = model(x).square().mean()
    if extra is not None:
        loss = loss + (extra * torch.randn(extra.shape, generator=g, dtype=torch.float64)).sum()
    loss.backward()


def _assert_invariant(model: nn.Module, opt) -> None:
    for layer in (model[0], model[2]):
        pruned = ~layer.weight_mask
        assert torch.all(layer.weight[pruned] == 0)
        for value in opt.state[layer.weight].values():
            if isinstance(value, torch.Tensor) and value.shape == layer.weight.shape:
                assert torch.all(value[pruned] == 0)


def _events_run(kind: str, backend: str, steps: int = 12):
    planned, unplanned = _model(3), _model(3)
    opt_p, opt_u = OPTIMIZERS[kind](planned.parameters()), OPTIMIZERS[kind](unplanned.parameters())
    extra_p = extra_u = None
    builds = []
    g = torch.Generator().manual_seed(7)
    with use_backend(backend):
        for step in range(steps):
            if step == 3:  # an LR schedule: read each step, never a rebuild
                for opt in (opt_p, opt_u):
                    opt.param_groups[0]["lr"] *= 0.5
            if step == 5:  # a mask change mid-training (in place: same tensor, new version)
                new = torch.rand(planned[0].weight.shape, generator=g) > 0.7
                planned[0].set_mask_(new)
                unplanned[0].set_mask_(new)
                revived = torch.rand(planned[2].weight.shape, generator=g) > 0.3
                planned[2].set_mask_(revived)
                unplanned[2].set_mask_(revived)
            if step == 7:  # a state dict round trip
                opt_p.load_state_dict(copy.deepcopy(opt_p.state_dict()))
                opt_u.load_state_dict(copy.deepcopy(opt_u.state_dict()))
            if step == 9:  # a new group: a plain tensor with an explicit mask
                t = torch.randn(6, 5, generator=g, dtype=torch.float64)
                m = torch.rand(6, 5, generator=g) > 0.5
                extra_p, extra_u = (t * m).requires_grad_(), (t * m).requires_grad_()
                opt_p.add_param_group(dict(params=[extra_p], mask=[m], lr=0.02))
                opt_u.add_param_group(dict(params=[extra_u], mask=[m.clone()], lr=0.02))
            for model, opt, extra in ((planned, opt_p, extra_p), (unplanned, opt_u, extra_u)):
                opt.zero_grad()
                _backward(model, step, extra)
                if step == 10:  # a parameter without a gradient this step (frozen bias)
                    model[2].bias.grad = None
            opt_u._invalidate_plans()  # the plan-less path: rebuilt before every step
            opt_p.step()
            opt_u.step()
            builds.append(opt_p.plan_builds)
            for a, b in zip(planned.parameters(), unplanned.parameters()):
                assert torch.equal(a, b), f"step {step}: planned and plan-less steps differ"
            if extra_p is not None:
                assert torch.equal(extra_p, extra_u)
                assert torch.all(extra_p[~opt_p.mask_for(extra_p)] == 0)
            _assert_invariant(planned, opt_p)
    return builds


@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_plan_equals_planless_across_events(kind):
    builds = _events_run(kind, "torch")
    assert builds[0] == 1
    assert builds[3] == builds[2] == 1          # lr change: no rebuild
    assert builds[5] == builds[4] + 1           # mask changes: one rebuild
    assert builds[6] == builds[5]
    assert builds[7] == builds[6] + 1           # load_state_dict
    assert builds[9] == builds[8] + 2           # add_param_group: both groups' plans
    assert builds[10] == builds[9] + 1          # bias lost its gradient: group 0 rebuilt
    assert builds[11] == builds[10] + 1         # and got it back


@pytest.mark.launches_triton
def test_plan_equals_planless_triton_sgd():
    _events_run("sgd", "triton", steps=8)


def test_plan_built_once_over_many_steps():
    model = _model(5)
    opt = MaskedAdam([dict(params=[model[0].weight, model[0].bias]),
                      dict(params=[model[2].weight, model[2].bias], lr=3e-3)], lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    with use_backend("torch"):
        for step in range(20):
            opt.zero_grad(set_to_none=True)  # gradients replaced every step: not part of the plan
            _backward(model, step)
            opt.step()
            sched.step()
    assert opt.plan_builds == 2  # one per group
    assert opt.param_groups[0]["lr"] < 1e-2
    _assert_invariant(model, opt)


def test_replaced_mask_buffer_rebuilds_plan():
    model = _model(8)
    opt = MaskedSGD(model.parameters(), lr=0.1, momentum=0.5)
    with use_backend("torch"):
        _backward(model, 0)
        opt.step()
        # A new mask tensor under the same name (not an in-place edit): the plan's mask is stale.
        g = torch.Generator().manual_seed(9)
        model[0].weight_mask = torch.rand(model[0].weight.shape, generator=g) > 0.5
        model[0].mask_changed_()
        opt.zero_grad()
        _backward(model, 1)
        opt.step()
    assert opt.plan_builds == 2
    _assert_invariant(model, opt)
