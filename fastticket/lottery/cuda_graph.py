"""The stacked training step replayed as a CUDA graph (`--cuda-graph`): host-free steps for small models.

A LeNet arm step is ~31 kernel launches and ~0.1 ms of GPU work against 0.4-0.8 ms of Python: on a GPU a small
model's search is host-bound. Within an engine (one group of arms at one level) the masks, tile maps and
tensor addresses do not change and the step does no device-to-host transfer (docs/architecture.md, "The
experiment"), so the whole step (forward, backward, the masked optimizer) can be captured once and replayed.

How, and why each rule holds the numbers to eager's:
- warm-up: the first WARMUP_STEPS steps run eagerly on a side stream (torch's rule before a capture: lazy
  state, momentum buffers, autotuning and the optimizer's launch plan and address tables are made outside
  the graph); they are real training steps, not discarded ones;
- gradients are zeroed in place (set_to_none=False), so they keep the addresses the optimizer's address
  tables were built for; 0 + g is g, so the update is eager's;
- each batch is copied into static input buffers; the losses come out of a static buffer, cloned;
- the captured step bakes the lr in (MaskedSGD reads it as a host float): a step whose lr differs from the
  captured one runs eagerly, and the step is captured again once the lr has held still for a step (an LR
  warm-up runs eager, the flat stretches of a schedule replay);
- an engine lives within one level's group (train.py builds a new one for new masks or fewer arms), so a
  graph is never replayed across a mask change;
- what cannot be captured says so and runs eager: not CUDA, not stacked, data-parallel (DDP's hooks), an
  optimizer whose step reads host state each step (MaskedAdam's step count and bias correction), or a
  capture that raised. `mode` is what result.json records ("cuda_graph" or "eager: <why>").
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Tuple

import torch

from fastticket.sparse.optim import MaskedSGD

__all__ = ["WARMUP_STEPS", "graph_unsupported", "GraphedStep"]

WARMUP_STEPS = 3

StepBody = Callable[[torch.Tensor, torch.Tensor, bool], torch.Tensor]  # (x, y, set_to_none) -> losses [K]


def graph_unsupported(device: torch.device, stacked: bool, data_parallel: bool, optimizer: Any) -> Optional[str]:
    """Why this engine's step cannot be captured as a CUDA graph, or None when it can."""
    if device.type != "cuda":
        return f"the device is {device.type}, CUDA graphs need a CUDA device"
    if not stacked:
        return "the arms train one at a time (not stacked)"
    if data_parallel:
        return "data-parallel training (DistributedDataParallel's hooks are not captured)"
    if type(optimizer) is not MaskedSGD:
        return (f"{type(optimizer).__name__} computes its step count and bias correction on the host each step; "
                "only MaskedSGD is captured")
    return None


class GraphedStep:
    """Steps `body` eagerly for WARMUP_STEPS on a side stream, then as a captured CUDA graph (see above)."""

    def __init__(self, body: StepBody, optimizer: Any, device: torch.device) -> None:
        self.body, self.optimizer, self.device = body, optimizer, device
        self.steps = 0
        self.graph: Optional[Any] = None
        self.static: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        self.out: Optional[torch.Tensor] = None
        self.graph_lr: Optional[float] = None
        self.prev_lr: Optional[float] = None
        self.failed: Optional[str] = None
        self.replays = 0

    @property
    def mode(self) -> str:
        return f"eager: capture failed ({self.failed})" if self.failed else "cuda_graph"

    def _lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def _eager(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            out = self.body(x, y, False)
        torch.cuda.current_stream(self.device).wait_stream(side)
        return out

    def _capture(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.static = (x.detach().clone(), y.detach().clone())  # contiguous buffers the graph reads
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.out = self.body(self.static[0], self.static[1], False)
        self.graph, self.graph_lr = graph, self._lr()

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        lr = self._lr()
        steady = self.prev_lr == lr
        self.prev_lr = lr
        self.steps += 1
        if self.failed or self.steps <= WARMUP_STEPS or (self.graph is None and not steady):
            return self._eager(x, y) if not self.failed else self.body(x, y, True)
        if self.graph is not None and lr != self.graph_lr:
            self.graph = None  # the schedule moved: eager now, captured again once it holds still
            return self._eager(x, y)
        if self.graph is None:
            torch.cuda.synchronize(self.device)
            try:
                self._capture(x, y)
            except Exception as e:  # a capture that cannot be made runs eager, and says so
                self.graph, self.failed = None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                torch.cuda.synchronize(self.device)
                return self.body(x, y, True)
        static_x, static_y = self.static  # type: ignore[misc]
        static_x.copy_(x)
        static_y.copy_(y)
        self.graph.replay()
        self.replays += 1
        return self.out.clone()  # type: ignore[union-attr]
