"""Graph-safe masked optimizer steps: the per-step scalars on the device (docs/architecture.md, "The engine").

A CUDA graph replays its launches with the arguments they were captured with: a step that hands its lr or
Adam's bias corrections to the kernels as float arguments would replay the captured step's values forever,
and its step count, kept on the host, would not move at all. In graph-safe mode (`set_graph_safe(True)`;
fastticket/lottery/cuda_graph.py turns it on) a masked optimizer's step is split in two:

- the host part (`host_step()`): what torch.optim does on the host, in the same order: each stepped
  parameter's 'step' += 1 (a CPU float tensor in `optimizer.state`, so state dicts stay interchangeable), the
  scalars computed from it by the eager step's own formula (kernels/masked_optim.adam_scalars), and one
  non_blocking copy of them from a pinned host buffer into a device tensor whose address never moves;
- the device part (`device_step()`): the launches, which read those scalars on the device: the Triton
  kernels through a pointer (a constexpr switch: the eager kernels are compiled as before), the torch
  backend as 0-dim device tensors in the same foreach formulas (kernels/masked_optim_reference.py).

`step()` runs both, so a graph-safe optimizer is an ordinary optimizer with the eager step's numbers. A CUDA
graph holds the device part; its owner runs the host part before every replay and the device part alone
inside `host_part_given()` while capturing. `host_step()` returns the step's layout key: every address and
host-side constant the captured launches baked in (plans, hyperparameters other than lr, which tensors share
a step count, gradient and state addresses); a replay is valid while the key is the captured one.

Rows: one per (parameter group, tensors sharing a step count), masked_optim.ROW_WIDTH float64 values (lr,
lr / bias_correction1, 1 / sqrt(bias_correction2), the step count; SGD writes lr only).
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from fastticket.kernels import masked_optim
from fastticket.kernels.masked_optim import ROW_WIDTH, adam_scalars
from fastticket.sparse._optim_torch import adam_step_torch_rows

__all__ = ["StepScalars", "GraphSafeSteps", "RING"]

RING = 4  # pinned host buffers in flight: the host waits only when it is RING steps ahead of the device

# The float lr handed to the launchers in graph-safe mode: they read the row instead, and a path that read
# this float (frozen in a graph) would turn the weights into NaN, which every test of the split step sees.
_NOT_READ = float("nan")

_SGD_KEYS = ("momentum", "dampening", "nesterov", "weight_decay", "maximize")
_ADAM_KEYS = ("betas", "eps", "weight_decay", "amsgrad", "maximize", "decoupled_weight_decay")


class StepScalars:
    """The device rows a graph-safe step reads, and the pinned host buffers they are copied from.

    The device tensor keeps its address while the number of rows holds (a captured graph reads it in place).
    Each step's values go into the next pinned buffer of a ring of RING, copied non_blocking; an event per
    buffer says when its copy has run, so a buffer is never rewritten while a copy may still read it."""

    def __init__(self, device: torch.device, event_factory: Optional[Callable[[], Any]] = None) -> None:
        self.device = device
        self.rows: Optional[torch.Tensor] = None
        # The ring runs on CUDA (pinned buffers, CUDA events); `event_factory` lets a test run it on the CPU.
        self._event_factory = event_factory or (torch.cuda.Event if device.type == "cuda" else None)
        self._host: List[torch.Tensor] = []
        self._events: List[Any] = []
        self._next = 0

    def _allocate(self, n: int) -> None:
        self.rows = torch.zeros((n, ROW_WIDTH), dtype=torch.float64, device=self.device)
        if self._event_factory is not None:
            pin = self.device.type == "cuda"
            self._host = [torch.zeros((n, ROW_WIDTH), dtype=torch.float64, pin_memory=pin) for _ in range(RING)]
            self._events = [None] * RING
            self._next = 0

    def write(self, rows: Sequence[Tuple[float, ...]]) -> Optional[torch.Tensor]:
        """This step's rows on the device (None when there are none)."""
        if not rows:
            return None
        values = torch.tensor(rows, dtype=torch.float64)
        if self.rows is None or self.rows.shape[0] != len(rows):
            self._allocate(len(rows))
        if self._event_factory is None:  # a CPU device: the copy is done when copy_ returns
            self.rows.copy_(values)  # type: ignore[union-attr]
            return self.rows
        slot = self._next
        self._next = (slot + 1) % RING
        if self._events[slot] is not None:
            self._events[slot].synchronize()  # its last copy has run: the buffer may be rewritten
        else:
            self._events[slot] = self._event_factory()
        self._host[slot].copy_(values)
        self.rows.copy_(self._host[slot], non_blocking=True)  # type: ignore[union-attr]
        self._events[slot].record(torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None)
        return self.rows


def _addresses(optimizer, params: Sequence[torch.Tensor]) -> tuple:
    """Where the launches read and write: each gradient and each per-parameter state tensor."""
    out = []
    for p in params:
        out.append(p.grad.data_ptr())
        for key, value in optimizer.state.get(p, {}).items():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                out.append((key, value.data_ptr()))
    return tuple(out)


class GraphSafeSteps:
    """The split step of the masked optimizers (mixed into fastticket.sparse.optim._MaskedOptimizer)."""

    _step_scalars: Optional[StepScalars] = None
    _host_given = False
    _host_parts: List[Tuple[Any, Any, Any]] = []
    launch_refs: List[torch.Tensor] = []  # the device tables the last device part's launches read (see device_step)
    last_key: Optional[tuple] = None  # the layout key of the last host part (GraphedStep reads it after warm-up)

    @property
    def graph_safe(self) -> bool:
        return self._step_scalars is not None

    def set_graph_safe(self, on: bool = True) -> None:
        """Read the per-step scalars from the device (on) or take them as float kernel arguments (off)."""
        if not on:
            self._step_scalars = None
            return
        devices = {p.device for g in self.param_groups for p in g["params"]}  # type: ignore[attr-defined]
        if len(devices) != 1:
            raise ValueError(f"graph-safe steps need every parameter on one device, found "
                             f"{', '.join(sorted(str(d) for d in devices)) or 'no parameters'}")
        if self._step_scalars is None or self._step_scalars.device != next(iter(devices)):
            self._step_scalars = StepScalars(next(iter(devices)))

    @contextlib.contextmanager
    def host_part_given(self) -> Iterator[None]:
        """Inside: step() is the device part only (the caller ran host_step(); a CUDA graph's capture)."""
        if not self.graph_safe:
            raise RuntimeError("host_part_given() needs graph-safe steps: call set_graph_safe(True) first")
        previous, self._host_given = self._host_given, True
        try:
            yield
        finally:
            self._host_given = previous

    def host_step(self) -> tuple:
        """The host part of one step (see the module docstring); returns the step's layout key."""
        if not self.graph_safe:
            raise RuntimeError("host_step() needs graph-safe steps: call set_graph_safe(True) first")
        rows: List[Tuple[float, ...]] = []
        parts, key = [], []
        for g, group in enumerate(self.param_groups):  # type: ignore[attr-defined]
            plan = self._plan(g, group)  # type: ignore[attr-defined]
            layout = self._group_rows(group, plan, rows)
            parts.append((plan, layout))
            constants = tuple(group.get(k) for k in self._graph_keys)
            key.append((plan, constants, layout, _addresses(self, plan.params)))
        device_rows = self._step_scalars.write(rows)  # type: ignore[union-attr]
        self._host_parts = [(plan, layout, device_rows) for plan, layout in parts]
        self.last_key = (None if device_rows is None else device_rows.data_ptr(), tuple(key))
        return self.last_key

    def device_step(self) -> None:
        """The device part of the step whose host part ran last: the launches, scalars read on the device.
        (Run once per host part: a second run would step again with the same count; a capture that failed
        before any launch ran is the one legitimate repeat, fastticket/lottery/cuda_graph.py.)"""
        if not self._host_parts:
            raise RuntimeError("device_step() before any host_step(): the step count would not move; run the "
                               "host part before every device part")
        # A graph captured from this device part must hold these: the launchers' table caches are bounded, and
        # a table evicted and freed would leave its memory to other tensors while the graph still reads it.
        self.launch_refs = []
        for (plan, layout, rows), group in zip(self._host_parts, self.param_groups):  # type: ignore[attr-defined]
            if plan.params:
                self._group_launch(group, plan, layout, rows)

    def _graph_safe_step(self) -> bool:
        """step()'s graph-safe path: both parts, or the device part alone inside host_part_given()."""
        if not self.graph_safe:
            return False
        if not self._host_given:
            self.host_step()
        self.device_step()
        return True

    # per optimizer: the constants baked into the launches, a group's rows, a group's launches
    _graph_keys: Tuple[str, ...] = ()

    def _group_rows(self, group: Dict[str, Any], plan, rows: List[Tuple[float, ...]]) -> Any:
        raise NotImplementedError

    def _group_launch(self, group: Dict[str, Any], plan, layout: Any, rows: torch.Tensor) -> None:
        raise NotImplementedError


class GraphSafeSGD(GraphSafeSteps):
    """MaskedSGD's parts: one row per group (lr)."""

    _graph_keys = _SGD_KEYS

    def _group_rows(self, group, plan, rows):
        if not plan.params:
            return None
        rows.append((float(group["lr"]),) + (0.0,) * (ROW_WIDTH - 1))
        return len(rows) - 1

    def _group_launch(self, group, plan, row, rows):
        # MaskedSGD's own launch loop, reading lr from the device row (a 0-dim tensor for the torch backend).
        triton_lr = dict(lr=_NOT_READ, scalars=rows[row], keep=self.launch_refs)
        self._sgd_launch(group, plan, triton_lr, rows[row, masked_optim.ROW_LR])  # type: ignore[attr-defined]


class GraphSafeAdam(GraphSafeSteps):
    """MaskedAdam / MaskedAdamW's parts: one row per step count of a group (normally one)."""

    _graph_keys = _ADAM_KEYS

    def _group_rows(self, group, plan, rows):
        amsgrad = group["amsgrad"]
        lr = float(group["lr"])
        beta1, beta2 = (float(b) for b in group["betas"])
        row_of, seen = [], {}
        for p in plan.params:
            state = self._init_state(p, amsgrad)  # type: ignore[attr-defined]
            state["step"] += 1  # a CPU scalar tensor, as in torch.optim and the eager step
            step = int(state["step"].item())
            if step not in seen:
                seen[step] = len(rows)
                rows.append((lr, *adam_scalars(lr, beta1, beta2, step), float(step)))
            row_of.append(seen[step])
        return tuple(row_of)

    def _group_launch(self, group, plan, row_of, rows):
        amsgrad = group["amsgrad"]
        states = [self.state[p] for p in plan.params]  # type: ignore[attr-defined]
        beta1, beta2 = group["betas"]
        decoupled = group.get("decoupled_weight_decay", self._decoupled_default)  # type: ignore[attr-defined]
        hp = dict(beta1=float(beta1), beta2=float(beta2), eps=group["eps"], weight_decay=group["weight_decay"],
                  amsgrad=amsgrad, maximize=group["maximize"], decoupled=decoupled)
        for backend, idx, sub in plan.by_backend:
            grads = [self._grad_of(p) for p in sub["params"]]  # type: ignore[attr-defined]
            args = (sub["params"], grads, sub["masks"], [states[i]["exp_avg"] for i in idx],
                    [states[i]["exp_avg_sq"] for i in idx],
                    [states[i].get("max_exp_avg_sq") if amsgrad else None for i in idx], [row_of[i] for i in idx])
            if backend == "triton":
                masked_optim.adam_step_(*args, **sub["tile_kwargs"], lr=_NOT_READ, scalars=rows,
                                        keep=self.launch_refs, **hp)
            else:
                adam_step_torch_rows(*args, rows, **hp)
