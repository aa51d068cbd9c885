"""K arms as one stacked model (the stacked step of fastticket.lottery.engine.Engine), and how many fit.

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

The arms of a group share the iteration and the start iteration (fastticket.lottery.train groups them that way), so
the lr and the optimizer's step count are shared; each arm keeps its own batch stream (batches are drawn once
per trial and stacked to x[K, B, ...]). The per-arm models and optimizers stay the arms' canonical state:
the engine's `sync_out` copies the stacked tensors back into them before every evaluation and checkpoint, so
the files each arm writes are exactly those of an arm trained alone.

Backend: the stacked step runs on the backend a lone arm would use (fastticket.sparse.backend). On the triton
backend vmap cannot batch a Triton launch, so the masked layers see that they are inside a functorch
transform (fastticket/sparse/functional.py): a masked linear layer runs all K arms as one grouped launch, the arm
a grid dimension over the arms' concatenated live-tile lists, or as one batched dense GEMM where the
one-arm dispatch rule says dense (element masks) (kernels/grouped_linear.py, wired by the vmap rule of
fastticket/sparse/ops.py); a masked conv layer runs the dense op, which vmap makes one grouped convolution (the
default conv dispatch sends every conv layer to cuDNN anyway; a grouped conv launch is not built). The
masked optimizer steps the stacked tensors on the same backend (on triton one fused multi-tensor launch).
Why the vmap rule and not a second, stacked model: the stacked engine keeps taking any model unchanged, and
only the op that cannot be batched by vmap gets a batched implementation.

Fast path on the torch backend: for the models whose structure fastticket.lottery.stacked_plan knows (fully
connected nets, Conv-2/4/6) the forward is a hand-stacked plan instead of vmap (Linear layers as one bmm with
the weight gradient computed in the weights' layout, convolutions arm by arm), measured faster on CPU
(README, Results); vmap stays the path of every other model, and of every model on the triton backend.
"""
from __future__ import annotations

import os
from typing import Dict, Optional, Sequence

import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from fastticket.lottery.stacked_plan import forward_plan, stacked_forward
from fastticket.sparse.backend import resolve_backend, use_backend


class StackedModule(nn.Module):
    """K models' parameters and buffers stacked along a leading arm dimension, as one module whose forward is
    the vmapped functional call of the first model (which DistributedDataParallel can wrap)."""

    def __init__(self, models: Sequence[nn.Module], probe: Optional[torch.Tensor] = None) -> None:
        super().__init__()
        self.k = len(models)
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
        # Models whose forward fastticket.lottery.stacked_plan knows (LeNet, Conv-2/4/6), on the torch backend: the
        # hand-stacked forward (bmm for Linear layers, K plain convolutions; faster on CPU than vmap), checked
        # once against the vmap forward on `probe` (a few inputs).
        device = self.stacked[0].device if self.names else torch.device("cpu")
        self.plan = forward_plan(base) if probe is not None and resolve_backend(device) == "torch" else None
        if self.plan is not None and not self._plan_agrees(probe):
            self.plan = None

    @torch.no_grad()
    def _plan_agrees(self, probe: torch.Tensor) -> bool:
        x = probe.unsqueeze(0).expand(self.k, *probe.shape)
        params = dict(zip(self.names, self.stacked))
        planned = stacked_forward(self.plan, params, x)
        mapped = self._forward(params, self.buffer_dict(), x)
        return planned.shape == mapped.shape and torch.allclose(planned, mapped, rtol=1e-4, atol=1e-5)

    def buffer_dict(self) -> Dict[str, torch.Tensor]:
        return {name: getattr(self, f"stacked_{i}") for i, name in enumerate(self.buffer_names)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        params = dict(zip(self.names, self.stacked))
        if self.plan is not None:
            return stacked_forward(self.plan, params, x)
        return self._forward(params, self.buffer_dict(), x)


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
