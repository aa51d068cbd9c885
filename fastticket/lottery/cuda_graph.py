"""The stacked training step replayed as a CUDA graph (`--cuda-graph`): host-free steps for small models.

A LeNet arm step is ~31 kernel launches and ~0.1 ms of GPU work against 0.4-0.8 ms of Python: on a GPU a small
model's search is host-bound. Within an engine (one group of arms at one level) the masks, tile maps and
tensor addresses do not change and the step does no device-to-host transfer (docs/architecture.md, "The
experiment"), so the whole step (forward, backward, the masked optimizer) can be captured once and replayed.

What is captured: MaskedSGD, MaskedAdam and MaskedAdamW (amsgrad, weight decay, decoupled, maximize), on the
triton and the torch backend, in graph-safe mode (fastticket/sparse/_step_scalars.py): their step is split
into a host part (each parameter's 'step' += 1 in optimizer.state, as torch.optim keeps it; lr and Adam's
bias corrections computed as the eager step does; one non_blocking copy into a device tensor) and a device
part (the launches, reading those scalars on the device). The graph holds the device part; the host part
runs before every replay, so a replay steps the count and reads this step's lr: an lr schedule replays the
same graph, never re-captured.

How, and why each rule holds the numbers to eager's:
- warm-up: the first WARMUP_STEPS steps run eagerly on a side stream (torch's rule before a capture: lazy
  state, momentum buffers, autotuning and the optimizer's launch plan and address tables are made outside
  the graph); they are real training steps, not discarded ones;
- gradients are zeroed in place (set_to_none=False), so they keep the addresses the optimizer's address
  tables were built for; 0 + g is g, so the update is eager's;
- each batch is copied into static input buffers; the losses come out of a static buffer, cloned;
- the graph holds the device tables its optimizer launches read (`graph_refs`): the launchers' caches are
  bounded, and a table evicted and freed would hand its memory to other tensors under the graph;
- the host part returns a layout key (plans, hyperparameters other than lr, which tensors share a step
  count, gradient and state addresses): a replay needs the captured key; a step whose key moved runs eagerly
  (its host part already ran: the device part alone), and the step is captured again once the key has held
  still for a step;
- an engine lives within one level's group (train.py builds a new one for new masks or fewer arms), so a
  graph is never replayed across a mask change;
- what cannot be captured says so and runs eager: not CUDA, not stacked, data-parallel (DDP's hooks), an
  optimizer without a graph-safe step (a user's own torch optimizer, a subclass of the masked ones), or a
  capture that raised (then the optimizer leaves graph-safe mode). `mode` is what result.json records
  ("cuda_graph" or "eager: <why>").
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Tuple

import torch

from fastticket.sparse.optim import MaskedAdam, MaskedAdamW, MaskedSGD

__all__ = ["WARMUP_STEPS", "GRAPH_SAFE_OPTIMIZERS", "graph_unsupported", "GraphedStep"]

WARMUP_STEPS = 3
GRAPH_SAFE_OPTIMIZERS = (MaskedSGD, MaskedAdam, MaskedAdamW)  # exactly these types: a subclass may override step

StepBody = Callable[[torch.Tensor, torch.Tensor, bool], torch.Tensor]  # (x, y, set_to_none) -> losses [K]


def graph_unsupported(device: torch.device, stacked: bool, data_parallel: bool, optimizer: Any) -> Optional[str]:
    """Why this engine's step cannot be captured as a CUDA graph, or None when it can."""
    if device.type != "cuda":
        return f"the device is {device.type}, CUDA graphs need a CUDA device"
    if not stacked:
        return "the arms train one at a time (not stacked)"
    if data_parallel:
        return "data-parallel training (DistributedDataParallel's hooks are not captured)"
    if type(optimizer) not in GRAPH_SAFE_OPTIMIZERS:
        return (f"{type(optimizer).__name__} has no graph-safe step (its step count and lr would be frozen in "
                f"the graph); only {' / '.join(c.__name__ for c in GRAPH_SAFE_OPTIMIZERS)} are captured")
    return None


class GraphedStep:
    """Steps `body` eagerly for WARMUP_STEPS on a side stream, then as a captured CUDA graph (see above).

    `optimizer` is put in graph-safe mode (fastticket/sparse/_step_scalars.py); `host_steps` counts the host
    parts run outside the body (one before every replay and capture), `captures` the graphs made."""

    def __init__(self, body: StepBody, optimizer: Any, device: torch.device) -> None:
        self.body, self.optimizer, self.device = body, optimizer, device
        optimizer.set_graph_safe(True)  # warm-up included: it runs (and compiles) the kernels the graph holds
        self.steps = 0
        self.graph: Optional[Any] = None
        self.static: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        self.out: Optional[torch.Tensor] = None
        self.graph_key: Optional[tuple] = None
        self.graph_refs: list = []
        self.prev_key: Optional[tuple] = None
        self.failed: Optional[str] = None
        self.replays = self.captures = self.host_steps = 0

    @property
    def mode(self) -> str:
        if self.failed:
            return f"eager: capture failed ({self.failed})"
        if self.replays == 0 and self.steps > WARMUP_STEPS + 1:  # a step could have replayed: none did
            return "eager: the optimizer's layout key moved every step, nothing was captured"
        return "cuda_graph"

    def _host_step(self) -> tuple:
        """This step's host part (step counts, lr and bias corrections to the device): before the graph."""
        self.host_steps += 1
        return self.optimizer.host_step()

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
        self.graph = graph

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.steps += 1
        if self.failed:
            return self.body(x, y, True)
        if self.steps <= WARMUP_STEPS:
            out = self._eager(x, y)  # step() runs both parts
            self.prev_key = self.optimizer.last_key
            return out
        key = self._host_step()
        steady, self.prev_key = self.prev_key == key, key
        if self.graph is not None and key != self.graph_key:
            self.graph = None  # an address or a constant the graph baked in moved: captured again once it holds
        if self.graph is None and not steady:
            with self.optimizer.host_part_given():
                return self._eager(x, y)
        if self.graph is None:
            torch.cuda.synchronize(self.device)
            try:
                with self.optimizer.host_part_given():
                    self._capture(x, y)
            except Exception as e:  # a capture that cannot be made runs eager, and says so
                self.graph, self.failed = None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                torch.cuda.synchronize(self.device)
                with self.optimizer.host_part_given():  # this step's host part ran above
                    out = self.body(x, y, True)
                self.optimizer.set_graph_safe(False)  # eager from here: the float-argument kernels
                return out
            self.graph_key = key
            self.graph_refs = list(self.optimizer.launch_refs)  # the device tables the graph reads live with it
            self.captures += 1
        static_x, static_y = self.static  # type: ignore[misc]
        static_x.copy_(x)
        static_y.copy_(y)
        self.graph.replay()
        self.replays += 1
        return self.out.clone()  # type: ignore[union-attr]
