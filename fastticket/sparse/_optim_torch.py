"""The masked optimizers' torch-backend step for Adam / AdamW: the formulas of
kernels/masked_optim_reference.py (adam_foreach_), or on CPU tensors torch's fused CPU Adam, which computes
the same formulas reading and writing each tensor once instead of seven foreach passes (docs/architecture.md,
"Optimizers and rewinding"). SGD's torch step is sgd_foreach_ itself.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch

from fastticket.kernels.masked_optim import ROW_LR, ROW_STEP
from fastticket.kernels.masked_optim_reference import adam_foreach_, fill_pruned_

__all__ = ["adam_step_torch", "adam_step_torch_rows", "ADAM_STATE"]

_FUSED_ADAM = hasattr(torch, "_fused_adam_") and hasattr(torch, "_fused_adamw_")


def _fusable(*lists: Sequence[torch.Tensor]) -> bool:
    """Whether torch's fused Adam kernel takes these tensors: on the CPU (elsewhere its step counts would have
    to live on the device; the foreach passes serve there), one floating dtype, dense and contiguous."""
    if not _FUSED_ADAM or not lists[0]:
        return False
    first = lists[0][0]
    if first.device.type != "cpu" or not first.is_floating_point():
        return False
    return all(t.device.type == "cpu" and t.dtype == first.dtype and not t.is_sparse and t.is_contiguous()
               for ts in lists for t in ts)


def _step_tensor(step: int) -> torch.Tensor:
    # The fused kernel reads each tensor's step count from a tensor (it does not increment it).
    return torch.tensor(float(step))


ADAM_STATE = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def adam_step_torch(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                    masks: Sequence[Optional[torch.Tensor]], exp_avgs: Sequence[torch.Tensor],
                    exp_avg_sqs: Sequence[torch.Tensor], max_exp_avg_sqs: Sequence[Optional[torch.Tensor]],
                    steps: Sequence[int], *, lr: float, beta1: float, beta2: float, eps: float,
                    weight_decay: float, amsgrad: bool, maximize: bool, decoupled: bool,
                    still_zero: Optional[Sequence[bool]] = None, arm_slices: bool = False) -> None:
    """Masked Adam/AdamW over a list of tensors (`steps[i]`: tensor i's step count, already incremented).

    Multi-tensor, one pass per formula over the tensors sharing a step count (normally all of them); pruned
    entries of the weight and the moments end as exact zeros (kernels/masked_optim_reference.py).

    On the CPU the formulas run as torch's fused Adam, one pass per tensor. There, a tensor whose weight and
    moments are known to be zero on pruned entries (`still_zero[i]`, kept by the optimizer from tensor
    versions) has its gradient masked before the step instead of three tensors zeroed after it: with a zero
    gradient, each formula leaves a zero entry zero (the moments stay 0, the update is 0 / (0 + eps), weight
    decay of 0 is 0), so the result is the same, for one pass instead of three (the gradient is masked in
    place: afterwards it is zero on pruned entries). (Not in the foreach passes:
    torch.sqrt over a second moment with many exact zeros runs ~30x slower on CPU than over dense values;
    the fused kernel's square root does not, measured.)"""
    buckets: Dict[int, List[int]] = {}
    for i, step in enumerate(steps):
        buckets.setdefault(int(step), []).append(i)
    for step, idx in buckets.items():
        p = [params[i] for i in idx]
        m = [masks[i] for i in idx]
        ea, eas = [exp_avgs[i] for i in idx], [exp_avg_sqs[i] for i in idx]
        d = [grads[i] for i in idx]
        mx = [max_exp_avg_sqs[i] for i in idx] if amsgrad else []
        if _fusable(p, d, ea, eas, mx):
            # One pass per tensor (torch's fused CPU Adam: the reference's formulas, read and written once)
            # instead of seven foreach passes.
            zero = [bool(still_zero and still_zero[i]) for i in idx]
            fill_pruned_(d, [mask if z else None for mask, z in zip(m, zero)])
            fused = torch._fused_adamw_ if decoupled else torch._fused_adam_
            # The kernel rounds the last few elements of a tensor (its scalar tail) differently from the
            # vectorised rest, so an element's result depends on where the tensor ends: stacked tensors
            # ([K, ...], fastticket.lottery.batched) are passed as their K arm slices, so each arm is stepped exactly
            # as it would be alone, whatever the group size (bit-identical resume when a level regroups).
            lists = [[v for t in ts for v in t.unbind(0)] for ts in (p, d, ea, eas, mx)] if arm_slices \
                else [p, d, ea, eas, mx]
            fused(*lists, [_step_tensor(step)] * len(lists[0]), lr=lr, beta1=beta1,
                  beta2=beta2, weight_decay=weight_decay, eps=eps, amsgrad=amsgrad, maximize=maximize)
            after = [None if z else mask for mask, z in zip(m, zero)]
            for group in (p, ea, eas) + ((mx,) if amsgrad else ()):
                fill_pruned_(group, after)
            continue
        adam_foreach_(p, d, m, ea, eas, mx, step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                      weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize, decoupled=decoupled)


def adam_step_torch_rows(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                         masks: Sequence[Optional[torch.Tensor]], exp_avgs: Sequence[torch.Tensor],
                         exp_avg_sqs: Sequence[torch.Tensor], max_exp_avg_sqs: Sequence[Optional[torch.Tensor]],
                         rows: Sequence[int], scalars: torch.Tensor, *, beta1: float, beta2: float, eps: float,
                         weight_decay: float, amsgrad: bool, maximize: bool, decoupled: bool) -> None:
    """The graph-safe torch step (fastticket/sparse/_step_scalars.py): tensor i's lr and step count are row
    `rows[i]` of the float64 device tensor `scalars`, read as 0-dim device tensors by the reference's foreach
    formulas, which compute the bias corrections from them on the device (no host value is baked into a
    captured graph). The foreach passes on every device: torch's fused CPU Adam takes host step counts."""
    buckets: Dict[int, List[int]] = {}
    for i, row in enumerate(rows):
        buckets.setdefault(int(row), []).append(i)
    for row, idx in buckets.items():
        adam_foreach_([params[i] for i in idx], [grads[i] for i in idx], [masks[i] for i in idx],
                      [exp_avgs[i] for i in idx], [exp_avg_sqs[i] for i in idx],
                      [max_exp_avg_sqs[i] for i in idx] if amsgrad else [], step=scalars[row, ROW_STEP],
                      lr=scalars[row, ROW_LR], beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                      amsgrad=amsgrad, maximize=maximize, decoupled=decoupled)
