"""A group of K arms trained as one stacked model (the batched path of fastticket.train.train_arms).

Mechanism: torch.func. The arms' parameters and buffers (BatchNorm running statistics and the weight masks
included) are stacked along a new leading arm dimension (`stack_module_state`), and one `vmap` of
`functional_call(base model)` runs the K forward passes as one: K LeNets become batched matrix products,
K conv nets batched convolutions. It needs nothing from the model beyond being an nn.Module, so every model
the search builds (linear and conv nets, ResNet-20 with BatchNorm, torchvision models) takes the same path;
a model vmap cannot run would fail at its first step (none of the built-in ones does; the tests run LeNet,
Conv-2 and ResNet-20). Masked layers keep the invariant: the masked optimizer steps the stacked tensors
with the stacked masks given explicitly (the update is elementwise, so one arm's slice gets exactly the
update it would get alone) and writes pruned entries of weights and optimizer state as exact zeros in every
arm. The layers' own gradient mask (`mask_gradient`) is switched off for the stacked step
(`functional.gradient_masked_by_optimizer`): the optimizer's zeroing already makes it redundant, and inside
vmap it would run as the slow masked_fill. (It still works under vmap, a custom Function with a generated
vmap rule, for anyone calling a masked layer in vmap directly.)

The arms of a group share the iteration and the start iteration (fastticket.train groups them that way), so
the lr and the optimizer's step count are shared; each arm keeps its own batch stream (batches are drawn once
per trial and stacked to x[K, B, ...]). The per-arm models and optimizers stay the arms' canonical state:
`sync_out` copies the stacked tensors back into them before every evaluation and checkpoint, so the files
each arm writes are exactly those of an arm trained alone.

Backend: the stacked step runs on the backend a lone arm would use (fastticket.backend). On the triton
backend vmap cannot batch a Triton launch, so the masked layers see that they are inside a functorch
transform (fastticket/functional.py): a masked linear layer runs all K arms as one grouped launch, the arm
a grid dimension over the arms' concatenated live-tile lists, or as one batched dense GEMM where the
one-arm dispatch rule says dense (element masks) (kernels/grouped_linear.py, wired by the vmap rule of
fastticket/ops.py); a masked conv layer runs the dense op, which vmap makes one grouped convolution (the
default conv dispatch sends every conv layer to cuDNN anyway; a grouped conv launch is not built). The
masked optimizer steps the stacked tensors on the same backend (on triton one fused multi-tensor launch).
Why the vmap rule and not a second, stacked model: the stacked engine keeps taking any model unchanged, and
only the op that cannot be batched by vmap gets a batched implementation.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from fastticket.backend import use_backend
from fastticket.config import SearchConfig
from fastticket.functional import gradient_masked_by_optimizer
from fastticket.train import ArmJob, ArmState, data_parallel, has_statistics, make_optimizer

if TYPE_CHECKING:
    from fastticket.data import DeviceData


class StackedEngine:
    """K arms (same model architecture, same iteration and start iteration) as one stacked model."""

    def __init__(self, config: SearchConfig, jobs: Sequence[ArmJob], states: Sequence[ArmState],
                 data: "DeviceData") -> None:
        self.config, self.jobs, self.states, self.data = config, list(jobs), list(states), data
        self.k = len(jobs)
        models = [s.model for s in states]
        self.module = _StackedModule(models)
        self.names, self.params, self.buffers = self.module.names, list(self.module.stacked), self.module.buffer_dict()
        self.model = data_parallel(self.module, has_statistics(models[0]))  # DDP in a data-parallel search
        arm_params = [dict(m.named_parameters()) for m in models]
        arm_masks = [[s.optimizer.mask_for(arm_params[a][n]) for n in self.names]  # type: ignore[attr-defined]
                     for a, s in enumerate(states)]
        masks: List[Optional[torch.Tensor]] = []
        for i in range(len(self.names)):
            per_arm = [arm_masks[a][i] for a in range(self.k)]
            masks.append(None if per_arm[0] is None else torch.stack(per_arm))
        self.optimizer = make_optimizer(config, self.params, masks=masks)
        self.optimizer.param_groups[0]["lr"] = states[0].optimizer.param_groups[0]["lr"]
        self._load_optimizer_state(arm_params)
        # Batches: one draw per trial stream, then gathered to [K, B, ...].
        seeds = [job.seed for job in jobs]
        self.unique_seeds = list(dict.fromkeys(seeds))
        self.gather = torch.tensor([self.unique_seeds.index(s) for s in seeds], device=data.device)

    # ------------------------------------------------------------------ optimizer state in and out
    def _load_optimizer_state(self, arm_params: List[Dict[str, torch.Tensor]]) -> None:
        for i, name in enumerate(self.names):
            per_arm = [self.states[a].optimizer.state.get(arm_params[a][name], {}) for a in range(self.k)]
            if not per_arm[0]:
                continue
            stacked = {}
            for key, value in per_arm[0].items():
                if key == "step" or not torch.is_tensor(value) or value.shape != arm_params[0][name].shape:
                    stacked[key] = value.clone() if torch.is_tensor(value) else value  # shared: same step count
                else:
                    stacked[key] = torch.stack([s[key] for s in per_arm])
            self.optimizer.state[self.params[i]] = stacked

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def step(self, iteration: int) -> torch.Tensor:
        """One training step of every arm; returns the arms' losses [K] on the device (no sync)."""
        batches = [self.data.batch(iteration, self.config.batch_size, s) for s in self.unique_seeds]
        if len(batches) == 1:
            x = batches[0][0].unsqueeze(0).expand(self.k, *batches[0][0].shape)
            y = batches[0][1].unsqueeze(0).expand(self.k, *batches[0][1].shape)
        else:
            x = torch.stack([b[0] for b in batches]).index_select(0, self.gather)
            y = torch.stack([b[1] for b in batches]).index_select(0, self.gather)
        with gradient_masked_by_optimizer():
            out = self.model(x)  # [K, B, classes]
            losses = F.cross_entropy(out.flatten(0, 1), y.reshape(-1), reduction="none").view(self.k, -1).mean(1)
            self.optimizer.zero_grad(set_to_none=True)
            # The arms' parameters are disjoint, so the gradient of the sum is each arm's own gradient.
            losses.sum().backward()
            self.optimizer.step()
        return losses.detach()

    @torch.no_grad()
    def sync_out(self) -> None:
        """Copy each arm's slice of the stacked parameters, buffers and optimizer state into its own model
        and optimizer (what its checkpoint and evaluation read)."""
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


class _StackedModule(nn.Module):
    """K models' parameters and buffers stacked along a leading arm dimension, as one module whose forward is
    the vmapped functional call of the first model (which DistributedDataParallel can wrap)."""

    def __init__(self, models: Sequence[nn.Module]) -> None:
        super().__init__()
        params, buffers = stack_module_state(list(models))
        self.names = list(params)
        self.stacked = nn.ParameterList([nn.Parameter(params[n]) for n in self.names])
        self.buffer_names = list(buffers)
        for i, name in enumerate(self.buffer_names):  # registered, so DDP can broadcast BatchNorm statistics
            self.register_buffer(f"stacked_{i}", buffers[name])
        base = models[0]  # not a submodule: functional_call swaps the stacked tensors in for the call only

        def forward(p: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
            return functional_call(base, (p, b), (x,))

        self._forward = vmap(forward, in_dims=(0, 0, 0))

    def buffer_dict(self) -> Dict[str, torch.Tensor]:
        return {name: getattr(self, f"stacked_{i}") for i, name in enumerate(self.buffer_names)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward(dict(zip(self.names, self.stacked)), self.buffer_dict(), x)


# ------------------------------------------------------------------------------ group sizing

def _available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 1 << 34


def arm_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """An estimate of one arm's training memory: parameters x 4 (weights, gradients, two optimizer moments),
    buffers, and the activations of one batch x 3 (kept for backward, their gradients, workspace)."""
    size = sum(p.numel() * p.element_size() for p in model.parameters()) * 4
    size += sum(b.numel() * b.element_size() for b in model.buffers())
    acts = [0]

    def hook(module: nn.Module, inputs, output) -> None:
        if torch.is_tensor(output):
            acts[0] += output.numel() * output.element_size()

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad(), use_backend("torch"):
            was = model.training
            model.eval()
            model(x)
            model.train(was)
    finally:
        for h in handles:
            h.remove()
    return size + 3 * acts[0]


def group_size(model: nn.Module, x: torch.Tensor, device: torch.device, fraction: float = 0.6) -> int:
    """How many arms fit in `fraction` of the device's free memory at once (at least 1)."""
    return max(1, int(_available_bytes(device) * fraction) // max(1, arm_bytes(model, x)))
