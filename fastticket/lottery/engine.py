"""The training step of K >= 1 arms that share a start (iteration, start iteration, lr rule): one engine.

`Engine(config, jobs, states, data, context, stacked)` steps every arm once per `step(iteration)` and returns
the arms' losses [K] on the device (no sync); `set_lr` sets the lr of the following steps; `sync_out` makes
each arm's own model and optimizer hold its current state (what evaluation and checkpoints read).

Two ways to step K arms, chosen per device and model (`stacks`) unless the caller says:
- stacked: the arms' parameters stacked along a leading arm dimension as one model
  (fastticket.lottery.batched.StackedModule) and one masked optimizer over the stacked tensors (its update
  is elementwise, so each arm's slice gets exactly the update it would get alone). K = 1 takes this path
  too, so an arm's numbers do not depend on how its level was split into groups (--parallel-arms N >= 2);
- arm by arm: each arm's own model and optimizer through its TrainStep (fastticket.lottery.compiled),
  compiled with torch.compile under --compile (the compiled step is one arm's).
The default stacks, except with --compile or --parallel-arms 1 (one arm at a time) and for conv nets on CPU,
where K plain convolutions one arm at a time beat the stacked step (batched's hand-stacked plan or vmap's
grouped convolution).

Both leave pruned weights and optimizer state exactly zero: the masked optimizer zeroes them after every
step, so the layers' own gradient mask is switched off (`gradient_masked_by_optimizer`; the gradient is
deliberately not masked: Adam's sqrt over a second moment full of exact zeros is several times slower on CPU
than over dense values, so zeroing after the step is the faster order). In a data-parallel search the model
is wrapped by the platform (DistributedDataParallel, fastticket.lottery.platform.Context.wrap).
"""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from fastticket.lottery.batched import StackedModule
from fastticket.lottery.compiled import make_train_step
from fastticket.lottery.config import SearchConfig
from fastticket.lottery.cuda_graph import GraphedStep, graph_unsupported
from fastticket.lottery.platform import SOLO, Context
from fastticket.lottery import recipe
from fastticket.sparse.functional import gradient_masked_by_optimizer
from fastticket.sparse.optim import mask_optimizer_state_

if TYPE_CHECKING:
    from fastticket.lottery.data import DeviceData


def make_optimizer(config: SearchConfig, model: Union[nn.Module, Sequence[torch.Tensor]],
                   masks: Optional[Sequence[Optional[torch.Tensor]]] = None) -> torch.optim.Optimizer:
    """The config's masked optimizer over a model's parameters, or over given tensors with explicit `masks`
    (the stacked parameters of a group of arms)."""
    from fastticket.sparse.optim import MaskedAdam, MaskedAdamW, MaskedSGD
    if recipe.user_optimizer(config):  # arms with it train one at a time (`stacks`), over their own model
        return recipe.build_optimizer(config, model)
    params = list(model.parameters()) if isinstance(model, nn.Module) else list(model)
    if config.optimizer == "sgd":
        return MaskedSGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay,
                         masks=masks)
    if config.optimizer == "adamw":
        return MaskedAdamW(params, lr=config.lr, weight_decay=config.weight_decay, masks=masks)
    return MaskedAdam(params, lr=config.lr, weight_decay=config.weight_decay, masks=masks)


def has_statistics(model: nn.Module) -> bool:
    """Does `model` hold buffers besides its masks (BatchNorm running statistics)?"""
    return any(not name.endswith("weight_mask") for name, _ in model.named_buffers())


def stacks(config: SearchConfig, model: nn.Module, device: torch.device) -> bool:
    """Does the engine stack arms of this model on this device by default (see the module docstring)?"""
    if arms_per_engine(config) == 1 or recipe.user_functions(config):
        return False
    return not (device.type == "cpu" and any(isinstance(m, nn.Conv2d) for m in model.modules()))


def stack_failure(model: nn.Module, probe: torch.Tensor) -> Optional[str]:
    """Why two copies of `model` cannot run as one stacked model on `probe` (a couple of inputs), or None.
    For a user's model, tried once before training: vmap cannot trace every model (e.g. data-dependent Python
    control flow)."""
    import copy
    try:
        with torch.no_grad():
            StackedModule([copy.deepcopy(model) for _ in range(2)])(probe.unsqueeze(0).expand(2, *probe.shape))
    except Exception as exc:  # noqa: BLE001 - vmap raises many kinds of error for what it cannot trace
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
    return None


def arms_per_engine(config: SearchConfig) -> Optional[int]:
    """The most arms one engine takes (None: any number): one with --parallel-arms 1 (each arm alone, its
    own plain step) and with --compile (building a compiled step resets torch.compile's caches,
    fastticket.lottery.compiled)."""
    return 1 if config.compile or config.parallel_arms == 1 else None


class Engine:
    """K arms' training step (see the module docstring). `jobs` give each arm's batch stream (`seed`),
    `states` its model and optimizer; `stacked` None lets `stacks` decide."""

    def __init__(self, config: SearchConfig, jobs: Sequence[Any], states: Sequence[Any], data: "DeviceData",
                 context: Context = SOLO, stacked: Optional[bool] = None) -> None:
        self.config, self.data, self.context = config, data, context
        self.states, self.k = list(states), len(states)
        self.seeds = [job.seed for job in jobs]
        model = self.states[0].model
        self.stacked = stacks(config, model, next(model.parameters()).device) if stacked is None else stacked
        self.graphed: Optional[GraphedStep] = None
        self.eager_reason = "off"  # why the step is not captured (--cuda-graph, fastticket/lottery/cuda_graph.py)
        if self.stacked:
            self._stack()
        else:
            loss_fn = recipe.loss_function(config)
            self.steps = [make_train_step(context.wrap(s.model, has_statistics(s.model)), s.optimizer,
                                          compiled=config.compile, loss_fn=loss_fn) for s in self.states]
            # Any torch optimizer: the layers mask its gradient, and the pruned weights and its state are
            # zeroed after each step (fastticket.lottery.recipe); the masked optimizers do both themselves.
            self.user_optimizer = recipe.user_optimizer(config)

    # ------------------------------------------------------------------------------- the stacked step
    def _stack(self) -> None:
        models = [s.model for s in self.states]
        # A couple of training inputs, on which the hand-stacked forward is checked once against vmap's.
        self.module = StackedModule(models, probe=self.data.batch(0, 2, self.seeds[0])[0])
        self.names, self.params, self.buffers = self.module.names, list(self.module.stacked), self.module.buffer_dict()
        self.model = self.context.wrap(self.module, has_statistics(models[0]))
        arm_params = [dict(m.named_parameters()) for m in models]
        masks: List[Optional[torch.Tensor]] = []
        for name in self.names:
            per_arm = [s.optimizer.mask_for(arm_params[a][name]) for a, s in enumerate(self.states)]
            masks.append(None if per_arm[0] is None else torch.stack(per_arm))
        self.optimizer = make_optimizer(self.config, self.params, masks=masks)
        self.optimizer.stacked_arms = True  # type: ignore[attr-defined]  (steps each arm's slice as if alone)
        self.optimizer.param_groups[0]["lr"] = self.states[0].optimizer.param_groups[0]["lr"]
        if self.config.cuda_graph:
            self.eager_reason = graph_unsupported(self.params[0].device, True, self.context.data_parallel,
                                                  self.optimizer) or ""
            if not self.eager_reason:
                self.graphed = GraphedStep(self._stacked_body, self.optimizer, self.params[0].device)
        for i, name in enumerate(self.names):
            per_arm_state = [self.states[a].optimizer.state.get(arm_params[a][name], {}) for a in range(self.k)]
            if per_arm_state[0]:
                self.optimizer.state[self.params[i]] = self._stacked_state(per_arm_state, arm_params[0][name].shape)

    @staticmethod
    def _stacked_state(per_arm: List[Dict[str, Any]], shape: torch.Size) -> Dict[str, Any]:
        stacked = {}
        for key, value in per_arm[0].items():
            if key == "step" or not torch.is_tensor(value) or value.shape != shape:
                stacked[key] = value.clone() if torch.is_tensor(value) else value  # shared: same step count
            else:
                stacked[key] = torch.stack([s[key] for s in per_arm])
        return stacked

    def _batches(self, iteration: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Each arm's trial stream, gathered to [K, B, ...] (one stream: a broadcast view, no copy)."""
        if len(set(self.seeds)) == 1:
            x, y = self.data.batch(iteration, self.config.batch_size, self.seeds[0])
            return x.unsqueeze(0).expand(self.k, *x.shape), y.unsqueeze(0).expand(self.k, *y.shape)
        return self.data.batches(iteration, self.config.batch_size, self.seeds)

    def _stacked_step(self, iteration: int) -> torch.Tensor:
        x, y = self._batches(iteration)
        if self.graphed is not None:
            return self.graphed(x, y)
        return self._stacked_body(x, y, True)

    def _stacked_body(self, x: torch.Tensor, y: torch.Tensor, set_to_none: bool) -> torch.Tensor:
        with gradient_masked_by_optimizer():
            out = self.model(x)  # [K, B, classes]
            losses = F.cross_entropy(out.flatten(0, 1), y.reshape(-1), reduction="none").view(self.k, -1).mean(1)
            self.optimizer.zero_grad(set_to_none=set_to_none)
            # The arms' parameters are disjoint, so the gradient of the sum is each arm's own gradient.
            losses.sum().backward()
            self.optimizer.step()
        return losses.detach()

    # ------------------------------------------------------------------------------------ arm by arm
    def _arm_step(self, a: int, iteration: int) -> torch.Tensor:
        x, y = self.data.batch(iteration, self.config.batch_size, self.seeds[a])
        # The compiled step traces the masked layers as they are (it cannot enter the context manager).
        masked_by_optimizer = not (self.config.compile or self.user_optimizer)
        with gradient_masked_by_optimizer() if masked_by_optimizer else contextlib.nullcontext():
            loss = self.steps[a].loss(x, y)
            self.steps[a].update(loss)  # the backward too: the weights' gradient hooks read the setting
        if self.user_optimizer:
            mask_optimizer_state_(self.states[a].optimizer)
        return loss.detach().reshape(1)

    # ------------------------------------------------------------------------------------- interface
    def set_lr(self, lr: float) -> None:
        for step in ([] if self.stacked else self.steps):
            step.set_lr(lr)
        if self.stacked:
            for group in self.optimizer.param_groups:
                group["lr"] = lr

    @property
    def step_mode(self) -> str:
        """How the steps run under --cuda-graph: "cuda_graph", or "eager: <why not>" (result.json records it)."""
        if self.graphed is not None:
            return self.graphed.mode
        if not self.stacked:
            return "eager: the arms train one at a time (not stacked)"
        return f"eager: {self.eager_reason}"

    def step(self, iteration: int) -> torch.Tensor:
        """One training step of every arm; returns the arms' losses [K] on the device (no sync)."""
        if self.stacked:
            return self._stacked_step(iteration)
        losses = [self._arm_step(a, iteration) for a in range(self.k)]
        return losses[0] if self.k == 1 else torch.cat(losses)

    @torch.no_grad()
    def sync_out(self) -> None:
        """Copy each arm's slice of the stacked parameters, buffers and optimizer state into its own model
        and optimizer (arm by arm they are the arms' own already)."""
        if not self.stacked:
            return
        lr = self.optimizer.param_groups[0]["lr"]
        for a, state in enumerate(self.states):
            arm_params = dict(state.model.named_parameters())
            for i, name in enumerate(self.names):
                arm_params[name].copy_(self.params[i][a])
                stacked = self.optimizer.state.get(self.params[i])
                if stacked:
                    state.optimizer.state[arm_params[name]] = {
                        key: (value[a].clone() if torch.is_tensor(value) and key != "step"
                              and value.dim() > 0 and value.shape[0] == self.k
                              and value.shape[1:] == arm_params[name].shape
                              else (value.clone() if torch.is_tensor(value) else value))
                        for key, value in stacked.items()}
            for name, buf in state.model.named_buffers():
                buf.copy_(self.buffers[name][a])
            for group in state.optimizer.param_groups:
                group["lr"] = lr
