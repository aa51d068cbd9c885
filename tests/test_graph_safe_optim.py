"""Graph-safe masked optimizer steps (fastticket/sparse/_step_scalars.py): the split host part / device part a
CUDA graph replay runs must give the eager step's numbers.

N steps eagerly against N steps as a replay would run them (`host_step()`, then the device part alone inside
`host_part_given()`), float64, with a changing lr, amsgrad / weight decay / decoupled / maximize, two groups,
NaN gradients on pruned entries. The triton backend (what CUDA runs by default) must be bit-exact: its kernels
read the same scalars from a device row that the eager launch passes as float arguments. The torch backend's
graph-safe step runs the reference's foreach formulas on 0-dim device scalars: measured against the foreach
step with host floats (what it runs on CUDA), within a few ulp (the scale-then-add is two roundings there).
"""
from __future__ import annotations

import copy

import pytest
import torch

import fastticket.sparse._optim_torch as optim_torch
from fastticket.kernels.masked_optim import ROW_LR, ROW_STEP, ROW_WIDTH
from fastticket.sparse.backend import use_backend
from fastticket.sparse._step_scalars import RING, StepScalars
from fastticket.sparse.optim import MaskedAdam, MaskedAdamW, MaskedSGD
from fastticket.sparse.testing import rel_error
from test_masked_optim import STATE_KEYS, _check_pruned_zero

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SHAPES = [(6, 10), (10,), (5, 7)]
STEPS = 4
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.launches_triton)]
CASES = {
    "adam-amsgrad-wd": (MaskedAdam, dict(lr=1e-2, amsgrad=True, weight_decay=0.1)),
    "adamw-maximize": (MaskedAdamW, dict(lr=1e-2, maximize=True, weight_decay=0.1, betas=(0.8, 0.95))),
    "adamw-amsgrad-decoupled": (MaskedAdam, dict(lr=2e-2, amsgrad=True, decoupled_weight_decay=True,
                                                 weight_decay=0.05, eps=1e-6)),
    "sgd-nesterov-wd": (MaskedSGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2)),
    "sgd-dampening-max": (MaskedSGD, dict(lr=0.05, momentum=0.8, dampening=0.3, maximize=True)),
}


def _problem(device):
    g = torch.Generator().manual_seed(7)
    masks = [torch.rand(SHAPES[0], generator=g) > 0.4, None, torch.rand(SHAPES[2], generator=g) > 0.7]
    params = [torch.randn(s, generator=g, dtype=torch.float64) for s in SHAPES]
    grads = []
    for _ in range(STEPS):
        step = [torch.randn(s, generator=g, dtype=torch.float64) for s in SHAPES]
        for d, m in zip(step, masks):
            if m is not None:
                d[~m] = float("nan")  # the step must mask the gradient, not multiply it
        grads.append([d.to(device) for d in step])
    params = [(p * m if m is not None else p).to(device).requires_grad_() for p, m in zip(params, masks)]
    return params, [None if m is None else m.to(device) for m in masks], grads


def _run(cls, kw, backend, device, split, steps=STEPS):
    params, masks, grads = _problem(device)
    groups = [dict(params=params[:2]), dict(params=params[2:], lr=kw["lr"] / 2)]
    opt = cls(groups, masks=masks, **kw)
    if split:
        opt.set_graph_safe(True)
    keys = []
    with use_backend(backend):
        for i in range(steps):
            for p, d in zip(params, grads[i]):  # in place, as a captured step keeps its gradients' addresses
                p.grad = d.clone() if p.grad is None else p.grad.copy_(d)
            for gi, group in enumerate(opt.param_groups):
                group["lr"] = kw["lr"] * 0.6 ** i / (gi + 1)  # a schedule: the lr moves every step
            if split:
                keys.append(opt.host_step())
                with opt.host_part_given():
                    opt.step()
            else:
                opt.step()
    return params, masks, opt, keys


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
def test_split_step_gives_the_eager_numbers(name, backend, device, monkeypatch):
    cls, kw = CASES[name]
    if backend == "torch":  # the eager step CUDA runs: the foreach passes (CPU would take torch's fused Adam)
        monkeypatch.setattr(optim_torch, "_FUSED_ADAM", False)
    eager, _, eager_opt, _ = _run(cls, kw, backend, device, split=False)
    split, masks, split_opt, keys = _run(cls, kw, backend, device, split=True)
    for a, b in zip(eager, split):
        if backend == "triton":
            assert torch.equal(a, b), name
        else:
            assert rel_error(b, a) <= 8 * torch.finfo(torch.float64).eps, name
    for p_eager, p_split in zip(eager, split):
        for key in STATE_KEYS:
            if key in eager_opt.state[p_eager]:
                a, b = eager_opt.state[p_eager][key], split_opt.state[p_split][key]
                assert torch.equal(a, b) if backend == "triton" else rel_error(b, a) <= 8 * torch.finfo(a.dtype).eps
    _check_pruned_zero(split, masks, split_opt)
    assert len(set(keys[1:])) == 1, "an lr change moved the layout key: a graph would be re-captured"
    if cls is not MaskedSGD:
        step = split_opt.state[split[0]]["step"]
        assert step.device.type == "cpu" and step.dim() == 0 and step.dtype == eager_opt.state[eager[0]]["step"].dtype
        assert float(step) == STEPS


@pytest.mark.launches_triton
def test_state_dict_round_trips_and_steps_on_eagerly(device):
    """A graph-safe optimizer's state dict is torch.optim's (step: a CPU float tensor): an eager optimizer
    loaded from it continues with exactly the numbers the graph-safe one computes."""
    cls, kw = CASES["adam-amsgrad-wd"]
    with use_backend("triton"):
        params, masks, opt, _ = _run(cls, kw, "triton", device, split=True, steps=2)
        state = copy.deepcopy(opt.state_dict())  # load_state_dict would share the tensors, not copy them
        assert all(s["step"].device.type == "cpu" and float(s["step"]) == 2 for s in state["state"].values())
        twins = [p.detach().clone().requires_grad_() for p in params]
        other = cls([dict(params=twins[:2]), dict(params=twins[2:])], masks=masks, **kw)
        other.load_state_dict(state)
        torch_opt = torch.optim.Adam([dict(params=[t.detach().clone() for t in twins[:2]]),
                                      dict(params=[t.detach().clone() for t in twins[2:]])], **kw)
        torch_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # interchangeable with torch.optim's
        assert torch_opt.state_dict()["state"][0]["step"].dtype == state["state"][0]["step"].dtype
        g = torch.Generator().manual_seed(3)
        for _ in range(2):
            grads = [torch.randn(p.shape, generator=g, dtype=torch.float64).to(device) for p in params]
            for p, t, d in zip(params, twins, grads):
                p.grad, t.grad = d.clone(), d.clone()
            opt.step()
            other.step()
        for p, t in zip(params, twins):
            assert torch.equal(p, t)
        _check_pruned_zero(params, masks, opt)


@pytest.mark.launches_triton
def test_tensors_with_different_step_counts_get_their_own_rows(device):
    """A loaded state where one tensor has stepped more: each step count is a row (as eager buckets them),
    and the layout key says which tensors share one."""
    params, masks, _ = _problem(device)
    with use_backend("triton"):
        opts = []
        for split in (False, True):
            ps = [p.detach().clone().requires_grad_() for p in params]
            opt = MaskedAdam(ps, masks=masks, lr=1e-2)
            for p in ps:
                p.grad = torch.ones_like(p)
            opt.step()
            opt.state[ps[1]]["step"] += 4  # the bias: five steps ahead of the rest
            if split:
                opt.set_graph_safe(True)
            for p in ps:
                p.grad = torch.full_like(p, 0.5)
            opt.step()
            opts.append((ps, opt))
    (eager, _), (split, opt) = opts
    for a, b in zip(eager, split):
        assert torch.equal(a, b)
    rows = opt._step_scalars.rows
    assert rows.shape == (2, ROW_WIDTH)
    assert rows[:, ROW_STEP].tolist() == [2.0, 6.0] and rows[:, ROW_LR].tolist() == [1e-2, 1e-2]
    assert opt.last_key[1][0][2] == (0, 1, 0)


def test_layout_key_moves_with_what_a_graph_bakes_in():
    """Same key while only the lr moves; another key when a constant of the launches, a gradient's address
    or a state tensor's address moves (a graph replayed then would use stale values or freed memory)."""
    params, masks, _ = _problem(torch.device("cpu"))
    opt = MaskedAdam(params, masks=masks, lr=1e-2)
    opt.set_graph_safe(True)
    for p in params:
        p.grad = torch.randn(p.shape, dtype=torch.float64)
    with use_backend("torch"):
        first = opt.host_step()
        opt.param_groups[0]["lr"] = 5e-3
        assert opt.host_step() == first
        opt.param_groups[0]["weight_decay"] = 0.1
        moved = opt.host_step()
        assert moved != first
        params[0].grad = params[0].grad.clone()
        assert opt.host_step() != moved
        key = opt.host_step()
        opt.state[params[2]]["exp_avg"] = opt.state[params[2]]["exp_avg"].clone()
        assert opt.host_step() != key
    assert float(opt.state[params[0]]["step"]) == 6  # every host part is a step, as torch.optim counts


def test_graph_safe_mode_is_explicit_and_refuses_what_it_cannot_do():
    p = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    opt = MaskedSGD([p], lr=0.1)
    with pytest.raises(RuntimeError, match="set_graph_safe"):
        opt.host_step()
    opt.set_graph_safe(True)
    p.grad = torch.ones_like(p)
    with pytest.raises(RuntimeError, match="before any host_step"), opt.host_part_given():
        opt.step()
    meta = torch.zeros(2, device="meta", requires_grad=True)
    with pytest.raises(ValueError, match="one device, found cpu, meta"):
        MaskedAdam([p, meta]).set_graph_safe(True)
    opt.set_graph_safe(False)
    assert not opt.graph_safe


class _Event:
    """A CUDA event's stand-in: records when it was recorded and waited on."""

    def __init__(self, log, n):
        self.log, self.n = log, n

    def record(self, stream=None):
        self.log.append(("record", self.n))

    def synchronize(self):
        self.log.append(("wait", self.n))


def test_pinned_ring_never_rewrites_a_buffer_its_copy_may_still_read():
    """The CUDA path of StepScalars on the CPU: each step's values go through the next of RING host buffers;
    a buffer is rewritten only after waiting on the event recorded after its last copy; the device rows keep
    their address (a graph reads them in place) until their number changes."""
    log, made = [], []

    def factory():
        made.append(_Event(log, len(made)))
        return made[-1]
    scalars = StepScalars(torch.device("cpu"), event_factory=factory)
    first = None
    for step in range(RING + 2):
        rows = scalars.write([(0.1 * step, 1.0, 2.0, float(step)), (0.2, 3.0, 4.0, 5.0)])
        first = first or rows.data_ptr()
        assert rows.data_ptr() == first and rows[0].tolist() == [0.1 * step, 1.0, 2.0, float(step)]
    assert len(made) == RING
    assert log == [("record", i) for i in range(RING)] + [("wait", 0), ("record", 0), ("wait", 1), ("record", 1)]
    assert scalars.write([(1.0, 2.0, 3.0, 4.0)]).shape == (1, ROW_WIDTH)  # three rows -> one: a new tensor
    assert scalars.write([]) is None


@pytest.mark.launches_triton
@pytest.mark.parametrize("cls,kw", [CASES["adam-amsgrad-wd"], CASES["sgd-nesterov-wd"]])
def test_tensors_the_kernel_cannot_take_read_the_row_too(cls, kw):
    """A non-contiguous parameter goes through the reference formulas inside the triton launchers: graph-safe,
    they read lr and the step count from the device row too (a float there would be frozen in a graph)."""
    runs = []
    for split in (False, True):
        init = torch.randn(6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(11))
        p = torch.empty_strided((6, 5), (1, 6), dtype=torch.float64).copy_(init)
        mask = torch.rand(6, 5, generator=torch.Generator().manual_seed(12)) > 0.5
        p = p.mul_(mask).requires_grad_()
        assert not p.is_contiguous()
        opt = cls([p], masks=[mask], **kw)
        if split:
            opt.set_graph_safe(True)
        with use_backend("triton"):
            for i in range(STEPS):
                p.grad = torch.randn(6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(i))
                opt.param_groups[0]["lr"] = kw["lr"] * 0.5 ** i
                opt.step()
        runs.append(p.detach())
        assert bool((p[~mask] == 0).all())
    assert rel_error(runs[1], runs[0]) <= 8 * torch.finfo(torch.float64).eps


def test_capturable_points_at_graph_safe_mode():
    with pytest.raises(ValueError, match=r"capturable=True: for a CUDA graph call set_graph_safe\(True\)"):
        MaskedAdamW([torch.zeros(2, requires_grad=True)], capturable=True)
