"""The stacked forward of K arms by hand, for the models whose structure it knows: a plan of steps.

fastticket.lottery.batched runs a group of arms as one `vmap(functional_call(model))`, which works for any model.
For models built of Linear layers, elementwise activations, Flatten, and plain convolutions with pooling
(LeNet-300-100, Conv-2/4/6, an nn.Sequential of those) this module runs the same forward as a plan read
off the model, which is faster on CPU (measured: README, Results):
- Linear layers of the K arms are the engine's stacked linear op (fastticket.sparse.linear.stacked_linear:
  one `torch.baddbmm` over the stacked [K, out, in] weights, dW = g^T x as one bmm straight into
  [K, out, in]; vmap's linear rule yields a transposed view that autograd's AccumulateGrad then copies into
  a contiguous gradient, a pass over every weight each step);
- convolutions run arm by arm (K plain convolutions on the arms' slices of the stacked weights): vmap turns
  them into one grouped convolution, which is ~2x slower on CPU than K plain ones;
- no per-step functional_call (swapping the stacked tensors into the module and back) and no vmap dispatch.
`forward_plan` returns None for any model it does not know (BatchNorm nets, torchvision models), and the
caller keeps vmap. Masks are not needed in the forward: pruned weights are exactly zero in storage and the
masked optimizer zeroes pruned entries after every step.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from fastticket.sparse.linear import stacked_linear

__all__ = ["forward_plan", "stacked_forward"]

# A plan step: "flatten"; ("linear", NAME) or ("conv", NAME, the Conv2d) for the layer whose stacked params are
# NAME.weight / NAME.bias; or an elementwise function or pooling module applied to the activations.
Step = Union[str, Tuple[str, str], Callable[[torch.Tensor], torch.Tensor]]

_ELEMENTWISE = (nn.ReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.LeakyReLU, nn.ELU, nn.SiLU, nn.Identity)


def _lenet_plan(model: nn.Module) -> List[Step]:
    # fastticket.lottery.models.LeNet300.forward: flatten, relu(fc_i(x)) for each hidden layer, then output(x).
    plan: List[Step] = ["flatten"]
    for i in range(len(model.fc)):
        plan += [("linear", f"fc.{i}"), torch.relu]
    return plan + [("linear", "output")]


def _convnet_plan(model: nn.Module) -> Optional[List[Step]]:
    # fastticket.lottery.models.ConvNet.forward: features(x).flatten(1), then as LeNet300 after its flatten.
    features = _sequential_plan(model.features, "features.")
    return None if features is None else features + _lenet_plan(model)


def _sequential_plan(model: nn.Sequential, prefix: str = "") -> Optional[List[Step]]:
    plan: List[Step] = []
    for name, child in model.named_children():
        if isinstance(child, nn.Linear):
            plan.append(("linear", prefix + name))
        elif isinstance(child, nn.Conv2d) and child.padding_mode == "zeros":
            plan.append(("conv", prefix + name))
        elif isinstance(child, (nn.MaxPool2d, nn.AvgPool2d)) and any(isinstance(p, tuple) and p[0] == "conv"
                                                                        for p in plan):
            plan.append(child)  # on the arms' [B, C, H, W] activations, after a convolution
        elif isinstance(child, nn.Flatten) and child.start_dim == 1 and child.end_dim == -1:
            plan.append("flatten")
        elif type(child) in _ELEMENTWISE:
            plan.append(child)
        else:
            return None
    return plan


def forward_plan(model: nn.Module) -> Optional[List[Step]]:
    """The forward of `model` as a plan of stacked steps, or None when the model is not one whose forward
    this module knows (LeNet300, ConvNet, an nn.Sequential of Linear / Conv2d / activations / pooling /
    Flatten)."""
    from fastticket.lottery.models import ConvNet, LeNet300

    if type(model) is LeNet300:
        plan: Optional[List[Step]] = _lenet_plan(model)
    elif type(model) is ConvNet:
        plan = _convnet_plan(model)
    elif type(model) is nn.Sequential:
        plan = _sequential_plan(model)
    else:
        return None
    if plan is None:
        return None
    modules = dict(model.named_modules())
    for step in plan:
        if isinstance(step, tuple):
            layer = modules.get(step[1])
            kind = nn.Linear if step[0] == "linear" else nn.Conv2d
            # A layer the plan does not model (e.g. one with the triton dW+update hook) sends it to vmap.
            if not isinstance(layer, kind) or getattr(layer, "fused_update", None) is not None:
                return None
            if step[0] == "conv":
                plan[plan.index(step)] = ("conv", step[1], layer)  # its stride, padding, dilation, groups
    return plan


def stacked_forward(plan: List[Step], params: Dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The K arms' outputs [K, B, classes] for inputs x [K, B, ...] and stacked params {name: [K, ...]}.

    Convolutions (and what follows them up to the flatten) run arm by arm on a list of [B, C, H, W]
    activations: K plain convolutions are faster on CPU than the grouped convolution vmap makes of them."""
    arms: Optional[List[torch.Tensor]] = None  # per-arm activations while in the convolutional part
    for step in plan:
        if step == "flatten":
            x = torch.stack([a.flatten(1) for a in arms]) if arms is not None else x.flatten(2)
            arms = None
        elif isinstance(step, tuple) and step[0] == "linear":
            x = stacked_linear(x, params[step[1] + ".weight"], params.get(step[1] + ".bias"))
        elif isinstance(step, tuple):
            conv = step[2]
            ws = params[step[1] + ".weight"].unbind(0)
            bias = params.get(step[1] + ".bias")
            bs = bias.unbind(0) if bias is not None else [None] * len(ws)
            arms = arms if arms is not None else list(x.unbind(0))
            arms = [F.conv2d(a, w, b, conv.stride, conv.padding, conv.dilation, conv.groups)
                    for a, w, b in zip(arms, ws, bs)]
        elif arms is not None:
            arms = [step(a) for a in arms]
        else:
            x = step(x)
    return x
