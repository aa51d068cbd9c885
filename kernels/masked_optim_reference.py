"""The masked SGD and Adam / AdamW formulas, written once: multi-tensor PyTorch, float64-capable.

The math is torch.optim's, with a mask: the new weight and state are written as exact zeros on pruned
entries, so no step can revive a pruned weight and state on pruned entries stays zero (docs/architecture.md,
"The invariant"). The direction is not masked before it is used: every entry is computed on its own, so a
live entry gets torch.optim's value and the pruned ones are overwritten with zeros afterwards (a NaN/inf
gradient on a pruned entry included: kernels/_common.zero_pruned_ writes exact zeros over anything).

Each formula runs once over all of a list's tensors (torch._foreach_*). The same functions are the tests'
float64 reference for the Triton kernels (kernels/masked_optim.py, which also falls back to them for tensors
it cannot take), the torch backend's step (fastticket/sparse/optim.py) and what the compiled training step
traces (fastticket/lottery/compiled.py): there `lr` and Adam's `step` are device scalars (a new value
recompiles nothing) and SGD's momentum buffers exist up front, `first` saying on the device whether this is
their first step.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Union

import torch

from fastticket.kernels._common import zero_pruned_

__all__ = ["sgd_foreach_", "adam_foreach_", "sgd_reference_", "adam_reference_", "fill_pruned_"]

Scalar = Union[float, torch.Tensor]


def fill_pruned_(tensors: Sequence[torch.Tensor], masks: Sequence[Optional[torch.Tensor]]) -> None:
    """Exact zeros on every pruned entry (NaN/inf included): in place, per tensor (there is no foreach
    masked_fill; zero_pruned_ is a bitwise AND, much cheaper than masked_fill_ on CPU)."""
    for t, m in zip(tensors, masks):
        if m is not None:
            zero_pruned_(t, m)


def _add_scaled_(ts: List[torch.Tensor], xs: List[torch.Tensor], scale: Scalar) -> None:
    """ts += scale * xs: one fused pass for a number; a device scalar (traced step) multiplies first."""
    if isinstance(scale, torch.Tensor):
        torch._foreach_add_(ts, torch._foreach_mul(xs, scale))
    else:
        torch._foreach_add_(ts, xs, alpha=scale)


def _momentum_(bufs: List[Optional[torch.Tensor]], d: List[torch.Tensor], momentum: float, dampening: float,
               first: Optional[torch.Tensor]) -> None:
    """buf = momentum * buf + (1 - dampening) * d; a buffer's first step makes it d itself. Eager: a None
    buffer is new (created here, in the list). Traced: every buffer exists and `first` is a device flag."""
    if first is not None:
        new = torch._foreach_add(torch._foreach_mul(bufs, momentum), d, alpha=1 - dampening)
        for b, n, di in zip(bufs, new, d):
            b.copy_(torch.where(first, di, n))
        return
    old = [i for i, b in enumerate(bufs) if b is not None]
    for i, b in enumerate(bufs):
        if b is None:
            bufs[i] = torch.clone(d[i]).detach()
    if old:
        kept = [bufs[i] for i in old]
        torch._foreach_mul_(kept, momentum)
        torch._foreach_add_(kept, [d[i] for i in old], alpha=1 - dampening)


@torch.no_grad()
def sgd_foreach_(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                 masks: Sequence[Optional[torch.Tensor]], momentum_buffers: List[Optional[torch.Tensor]], *,
                 lr: Scalar, momentum: float, dampening: float, nesterov: bool, weight_decay: float,
                 maximize: bool, first: Optional[torch.Tensor] = None) -> None:
    """Masked SGD over a list of tensors, in place (new momentum buffers are stored into `momentum_buffers`).
    torch.optim.SGD semantics: the first step's buffer is the (decayed) gradient itself."""
    params, masks = list(params), list(masks)
    d = torch._foreach_neg(list(grads)) if maximize else list(grads)
    if weight_decay != 0:
        d = torch._foreach_add(d, params, alpha=weight_decay)
    if momentum != 0:
        _momentum_(momentum_buffers, d, momentum, dampening, first)
        bufs = list(momentum_buffers)
        fill_pruned_(bufs, masks)
        d = torch._foreach_add(d, bufs, alpha=momentum) if nesterov else bufs
    _add_scaled_(params, d, -lr)
    fill_pruned_(params, masks)


def _sqrt(v: Scalar) -> Scalar:
    return v.sqrt() if isinstance(v, torch.Tensor) else math.sqrt(v)


@torch.no_grad()
def adam_foreach_(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                  masks: Sequence[Optional[torch.Tensor]], exp_avgs: Sequence[torch.Tensor],
                  exp_avg_sqs: Sequence[torch.Tensor], max_exp_avg_sqs: Sequence[Optional[torch.Tensor]], *,
                  step: Scalar, lr: Scalar, beta1: float, beta2: float, eps: float, weight_decay: float,
                  amsgrad: bool, maximize: bool, decoupled: bool) -> None:
    """Masked Adam (decoupled=False) / AdamW (decoupled=True) over tensors sharing the step count `step`
    (already incremented), in place."""
    p, m, ea, eas = list(params), list(masks), list(exp_avgs), list(exp_avg_sqs)
    mx = list(max_exp_avg_sqs) if amsgrad else []
    d = torch._foreach_neg(list(grads)) if maximize else list(grads)
    if weight_decay != 0:
        if decoupled:
            torch._foreach_mul_(p, 1 - lr * weight_decay)
        else:
            d = torch._foreach_add(d, p, alpha=weight_decay)
    torch._foreach_lerp_(ea, d, 1 - beta1)
    torch._foreach_mul_(eas, beta2)
    torch._foreach_addcmul_(eas, d, d, value=1 - beta2)
    bias_correction1 = 1 - beta1 ** step
    bias_correction2_sqrt = _sqrt(1 - beta2 ** step)
    if amsgrad:
        torch._foreach_maximum_(mx, eas)
    denom = torch._foreach_sqrt(mx if amsgrad else eas)
    torch._foreach_div_(denom, bias_correction2_sqrt)
    torch._foreach_add_(denom, eps)
    step_size = -lr / bias_correction1
    if isinstance(step_size, torch.Tensor):
        _add_scaled_(p, torch._foreach_div(ea, denom), step_size)
    else:
        torch._foreach_addcdiv_(p, ea, denom, value=step_size)
    for group in (p, ea, eas) + ((mx,) if amsgrad else ()):
        fill_pruned_(group, m)


def sgd_reference_(param: torch.Tensor, grad: torch.Tensor, mask: Optional[torch.Tensor],
                   momentum_buffer: Optional[torch.Tensor], **hp) -> Optional[torch.Tensor]:
    """One masked SGD step on one tensor (sgd_foreach_'s keywords); returns the momentum buffer (new on the
    first step)."""
    bufs = [momentum_buffer]
    sgd_foreach_([param], [grad], [mask], bufs, **hp)
    return bufs[0]


def adam_reference_(param: torch.Tensor, grad: torch.Tensor, mask: Optional[torch.Tensor], exp_avg: torch.Tensor,
                    exp_avg_sq: torch.Tensor, max_exp_avg_sq: Optional[torch.Tensor], **hp) -> None:
    """One masked Adam / AdamW step on one tensor (adam_foreach_'s keywords)."""
    adam_foreach_([param], [grad], [mask], [exp_avg], [exp_avg_sq], [max_exp_avg_sq], **hp)
