"""Rewinding: write the rewind point back into the surviving weights and reset optimizer state.

Not an optimizer step: IMP calls these between levels. `rewind_` writes `p = source * mask` (pruned entries
as exact zeros, NaN sources included: the invariant, docs/architecture.md, "The invariant"),
`reset_state_` zeroes an optimizer's state as for a fresh optimizer, and `rewind_and_reset_` does both in
one pass. Backend (fastticket.sparse.backend) per tensor device: "triton" runs the multi-tensor pass of
fastticket.kernels.rewind (one launch per device and dtype), "torch" its PyTorch reference.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
from torch import nn
from torch.optim import Optimizer

from fastticket.sparse.backend import indices_by_backend
from fastticket.kernels import rewind as rewind_kernels
from fastticket.sparse.nn import masked_modules, weight_key

__all__ = ["rewind_", "rewind_to", "rewind_and_reset_", "reset_state_"]


@torch.no_grad()
def rewind_(params: Sequence[torch.Tensor], sources: Sequence[torch.Tensor],
            masks: Sequence[Optional[torch.Tensor]]) -> None:
    """`p = source * mask` in place for every parameter (mask None: plain copy), in one fused pass per
    device and dtype on the triton backend. Pruned entries are written as exact zeros (NaN sources included)."""
    params, sources, masks = list(params), list(sources), list(masks)
    if not (len(params) == len(sources) == len(masks)):
        raise ValueError(f"rewind_: {len(params)} params, {len(sources)} sources, {len(masks)} masks")
    for backend, idx in indices_by_backend([p.device for p in params]).items():
        fn = rewind_kernels.rewind_ if backend == "triton" else rewind_kernels.rewind_reference_
        fn([params[i] for i in idx], [sources[i] for i in idx], [masks[i] for i in idx])


def rewind_to(model: nn.Module, source_state: Dict[str, torch.Tensor]) -> None:
    """Rewind `model` to `source_state` (e.g. a state dict saved at initialization) and keep its current masks:
    masked weights become source * mask, everything else a plain copy; the masks in `source_state` are ignored.
    The call an IMP loop uses between levels (a bare `load_state_dict` would restore the saved masks too)."""
    masked = {weight_key(name, layer): layer for name, layer in masked_modules(model)}
    params, sources, masks = [], [], []
    state = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for key, tensor in state.items():
            if key.endswith("_mask") and key[: -len("_mask")] in masked:
                continue  # the masks are the ones already installed, not the rewind point's
            src = source_state[key].to(tensor.device)
            if key in masked:
                params.append(tensor)
                sources.append(src)
                masks.append(masked[key].weight_mask)
            else:
                tensor.copy_(src)
        rewind_(params, sources, masks)


def _state_tensors_to_zero(optimizer: Optimizer) -> List[torch.Tensor]:
    """Reset the step counters, drop momentum buffers where dampening makes a zero buffer differ from
    "no buffer yet", and return the state tensors that must be zeroed."""
    to_zero: List[torch.Tensor] = []
    for group in optimizer.param_groups:
        drop_buffers = group.get("dampening", 0) != 0
        for p in group["params"]:
            state = optimizer.state.get(p)
            if not state:
                continue
            for key in list(state.keys()):
                value = state[key]
                if key == "momentum_buffer" and drop_buffers:
                    del state[key]
                elif key == "step" and isinstance(value, torch.Tensor):
                    value.zero_()
                elif key == "step":
                    state[key] = 0
                elif isinstance(value, torch.Tensor):
                    to_zero.append(value)
    return to_zero


@torch.no_grad()
def rewind_and_reset_(params: Sequence[torch.Tensor], sources: Sequence[torch.Tensor],
                      masks: Sequence[Optional[torch.Tensor]], optimizer: Optional[Optimizer] = None) -> None:
    """A level's reset in one fused pass per device and dtype: `p = source * mask` for every parameter and
    the optimizer's state zeroed (see `reset_state_` for the semantics)."""
    params, sources, masks = list(params), list(sources), list(masks)
    if not (len(params) == len(sources) == len(masks)):
        raise ValueError(f"rewind: {len(params)} params, {len(sources)} sources, {len(masks)} masks")
    zero = _state_tensors_to_zero(optimizer) if optimizer is not None else []
    items = [("p", i, params[i].device) for i in range(len(params))] + [("z", j, t.device) for j, t in enumerate(zero)]
    for backend, idx in indices_by_backend([d for _, _, d in items]).items():
        ps = [items[k][1] for k in idx if items[k][0] == "p"]
        zs = [zero[items[k][1]] for k in idx if items[k][0] == "z"]
        if backend == "triton":
            rewind_kernels.rewind_and_zero_([params[i] for i in ps], [sources[i] for i in ps], [masks[i] for i in ps],
                                            zero=zs)
        else:
            rewind_kernels.rewind_reference_([params[i] for i in ps], [sources[i] for i in ps], [masks[i] for i in ps])
            rewind_kernels.zero_reference_(zs)


@torch.no_grad()
def reset_state_(optimizer: Optimizer) -> None:
    """Zero the optimizer's state in place, as for a freshly built optimizer (used at each rewind).

    Tensors are zeroed where they are (no reallocation; one fused pass on the triton backend) and 'step'
    counters set to 0. A zero momentum buffer is equivalent to torch SGD's "no buffer yet" only when
    dampening is 0 (the first step then gives buf = grad exactly); with dampening the buffer is dropped so
    the next step re-creates it as torch does.
    """
    to_zero = _state_tensors_to_zero(optimizer)
    for backend, idx in indices_by_backend([t.device for t in to_zero]).items():
        fn = rewind_kernels.zero_ if backend == "triton" else rewind_kernels.zero_reference_
        fn([to_zero[i] for i in idx])
