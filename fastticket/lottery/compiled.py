"""One training step (forward, backward, masked optimizer step), eager or compiled with torch.compile.

`make_train_step(model, optimizer, compiled)` returns a `TrainStep`: `set_lr(lr)` sets the learning rate of
the following steps, `loss(x, y)` runs the forward and the loss, `update(loss)` the backward and the optimizer
step. fastticket.lottery.engine.Engine drives it arm by arm (`--compile` does not stack arms).

Compiled (`CompiledTrainStep`, `fastticket search --compile`):
- the forward + loss is compiled with `fullgraph=True`: masked layers trace through the custom ops of
  fastticket/sparse/ops.py (no graph break), and AOTAutograd compiles the backward graph with it;
- the optimizer step is a second `fullgraph=True` function: the masked SGD / Adam / AdamW formulas of
  kernels/masked_optim_reference.py (the torch backend's own), traced over device tensors (torch.compile
  fuses it into a few kernels, as it does for torch.optim). The learning rate and the step count live on the device, so
  no value changes the graph and nothing syncs with the host;
- on CUDA the mode is "reduce-overhead" (CUDA graphs). Masks and tile maps are static while an arm trains,
  so each step replays one captured graph; a step object is built per arm, and building one resets
  torch.compile's caches (`torch._dynamo.reset()`), so each arm compiles and captures anew.
Off by default: no GPU has measured it yet. On CPU it runs too (the tests use it), giving the eager numbers
to within float rounding (fused multiply-adds): the tests hold parameters to a relative 1e-5 of eager.

The optimizer's own `state` keeps torch.optim's layout throughout (buffers created up front, 'step' counted
on the CPU as well), so checkpoints, resume and `optimizer.state_dict()` work as with the eager step.
"""
from __future__ import annotations

import os
from typing import Callable, List

import torch
import torch.nn.functional as F
from torch import nn

from fastticket.kernels.masked_optim_reference import adam_foreach_, sgd_foreach_

__all__ = ["TrainStep", "CompiledTrainStep", "make_train_step", "compile_backend"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class TrainStep:
    """The eager step: the plain PyTorch forward, backward and optimizer step."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 loss_fn: LossFn = F.cross_entropy) -> None:
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn

    def set_lr(self, lr: float) -> None:
        """The learning rate of the following steps."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(self.model(x), y)

    def update(self, loss: torch.Tensor) -> None:
        """Backward from `loss` and one optimizer step."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()


def compile_backend(device: torch.device) -> dict:
    """torch.compile arguments of the compiled step: inductor, with CUDA graphs on CUDA.
    FASTTICKET_COMPILE_BACKEND overrides the backend (the CPU tests use "aot_eager": the same traced graphs,
    fullgraph included, without minutes of C++ code generation)."""
    backend = os.environ.get("FASTTICKET_COMPILE_BACKEND", "inductor")
    kwargs = {"fullgraph": True, "backend": backend}
    if backend == "inductor" and device.type == "cuda":
        kwargs["mode"] = "reduce-overhead"
    return kwargs


class CompiledTrainStep(TrainStep):
    """The step compiled with torch.compile (see the module docstring)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 loss_fn: LossFn = F.cross_entropy) -> None:
        from fastticket.sparse.optim import MaskedAdam, MaskedSGD

        super().__init__(model, optimizer, loss_fn)
        if any(getattr(m, "fused_update", None) is not None for m in model.modules()):
            raise ValueError("the compiled training step cannot run the dW+update fusion; disable one of them")
        if not isinstance(optimizer, (MaskedSGD, MaskedAdam)):
            raise ValueError(f"the compiled training step needs a MaskedSGD / MaskedAdam / MaskedAdamW, "
                             f"got {type(optimizer).__name__}")
        device = next(model.parameters()).device
        self.device = device
        self.is_sgd = isinstance(optimizer, MaskedSGD)
        self.lr = torch.zeros((), dtype=torch.float32, device=device)
        self.steps: List[torch.Tensor] = []  # per group, on the device: steps taken (SGD) / Adam's step count
        self.first: List[torch.Tensor] = []  # SGD: per group, whether its momentum buffers are still unset
        for group in optimizer.param_groups:
            self._prepare_state(group)
        # What the traced step reads, gathered once (fixed while an arm trains) outside the optimizer's own
        # structures: its param_groups hold the lr, which must not be a guarded constant of the graph.
        self.groups = [_StaticGroup(group, optimizer) for group in optimizer.param_groups]
        options = compile_backend(device)
        self.cuda_graphs = options.get("mode") == "reduce-overhead"
        # One compiled step per arm: the graphs guard on this object, so an older arm's are dead weight (and
        # would count against torch.compile's recompile limit); under CUDA graphs they would also replay the
        # tile maps and dispatch choices of older masks. Start from empty caches.
        torch._dynamo.reset()
        self._loss = torch.compile(self._loss_fn, **options)
        self._step = torch.compile(self._optimizer_step, **options)

    def _prepare_state(self, group: dict) -> None:
        """Optimizer state created up front (shapes fixed before tracing), in torch.optim's layout."""
        state = self.optimizer.state
        if self.is_sgd:
            unset = group["momentum"] != 0 and any("momentum_buffer" not in state[p] for p in group["params"])
            for p in group["params"]:
                if group["momentum"] != 0 and "momentum_buffer" not in state[p]:
                    state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            self.first.append(torch.tensor(bool(unset), device=self.device))
            self.steps.append(torch.zeros((), dtype=torch.float32, device=self.device))
            return
        count = 0.0
        for p in group["params"]:
            s = self.optimizer._init_state(p, group["amsgrad"])
            count = float(s["step"])
        self.steps.append(torch.tensor(count, dtype=torch.float32, device=self.device))

    def _loss_fn(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(self.model(x), y)

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self._loss(x, y)

    def set_lr(self, lr: float) -> None:
        super().set_lr(lr)  # the param groups too: state dicts and checkpoints record it as before
        self.lr.fill_(lr)   # what the compiled step reads: a device scalar, so a new lr recompiles nothing

    def update(self, loss: torch.Tensor) -> None:
        # Gradients stay allocated under CUDA graphs (fixed addresses: the captured step reads them in place).
        self.optimizer.zero_grad(set_to_none=not self.cuda_graphs)
        loss.backward()
        self._step()
        if not self.is_sgd:  # torch.optim's CPU step counters, for checkpoints (no device sync)
            for group in self.optimizer.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        self.optimizer.state[p]["step"] += 1

    @torch.no_grad()
    def _optimizer_step(self) -> None:
        for gi, group in enumerate(self.groups):
            live = [i for i, p in enumerate(group.params) if p.grad is not None]
            if self.is_sgd:
                _sgd(group, live, self.lr, self.first[gi])
                self.first[gi].fill_(False)
            else:
                self.steps[gi].add_(1)
                _adam(group, live, self.lr, self.steps[gi])


class _StaticGroup:
    """One parameter group as the compiled step sees it: params, masks, state tensors, hyperparameters."""

    def __init__(self, group: dict, optimizer: torch.optim.Optimizer) -> None:
        self.params = list(group["params"])
        self.masks = [optimizer.mask_for(p) for p in self.params]
        self.hp = {k: v for k, v in group.items() if k not in ("params", "lr")}
        state = optimizer.state
        self.bufs = [state[p].get("momentum_buffer") for p in self.params]
        self.exp_avgs = [state[p].get("exp_avg") for p in self.params]
        self.exp_avg_sqs = [state[p].get("exp_avg_sq") for p in self.params]
        self.max_exp_avg_sqs = [state[p].get("max_exp_avg_sq") for p in self.params]


def _sgd(group: _StaticGroup, live: List[int], lr: torch.Tensor, first: torch.Tensor) -> None:
    """The masked SGD formulas (kernels/masked_optim_reference.py) over device scalars: lr, and `first`, which
    makes this step's momentum buffers the direction itself."""
    hp = group.hp
    bufs = [group.bufs[i] for i in live]
    sgd_foreach_([group.params[i] for i in live], [group.params[i].grad for i in live],
                 [group.masks[i] for i in live], bufs, lr=lr, momentum=hp["momentum"], dampening=hp["dampening"],
                 nesterov=hp["nesterov"], weight_decay=hp["weight_decay"], maximize=hp["maximize"],
                 first=first if hp["momentum"] != 0 else None)


def _adam(group: _StaticGroup, live: List[int], lr: torch.Tensor, step: torch.Tensor) -> None:
    """The masked Adam / AdamW formulas (kernels/masked_optim_reference.py) over device scalars (lr and the
    step count)."""
    hp = group.hp
    beta1, beta2 = hp["betas"]
    adam_foreach_([group.params[i] for i in live], [group.params[i].grad for i in live],
                  [group.masks[i] for i in live], [group.exp_avgs[i] for i in live],
                  [group.exp_avg_sqs[i] for i in live], [group.max_exp_avg_sqs[i] for i in live], step=step,
                  lr=lr, beta1=beta1, beta2=beta2, eps=hp["eps"], weight_decay=hp["weight_decay"],
                  amsgrad=hp["amsgrad"], maximize=hp["maximize"],
                  decoupled=hp.get("decoupled_weight_decay", False))


def make_train_step(model: nn.Module, optimizer: torch.optim.Optimizer, compiled: bool = False,
                    loss_fn: LossFn = F.cross_entropy) -> TrainStep:
    """The training step of one arm: compiled (see CompiledTrainStep) or eager."""
    return (CompiledTrainStep if compiled else TrainStep)(model, optimizer, loss_fn)
