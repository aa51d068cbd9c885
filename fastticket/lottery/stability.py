"""Instability analysis (Frankle, Dziugaite, Roy & Carbin, ICML 2020, "Linear Mode Connectivity and the
Lottery Ticket Hypothesis"): is an arm's training stable to SGD noise from its start?

With `--stability N` every arm that trains at a level gets a twin (`arms.twin_name`): the same plan (init,
mask, rewind point, start iteration, lr rule), trained under different SGD noise, i.e. a different batch
stream (`plans.SearchState.twin_seed`), in the same group as its arm (one stacked run). Once both finished,
the test error is evaluated along the straight line theta(a) = (1 - a) theta_1 + a theta_2 at N evenly
spaced a in [0, 1], from the two final weights. Both hold the same mask, so every interpolated point keeps the pruned entries
exact zeros. Instability = max error on the path - mean of the two endpoints' errors, in points of test error
(percent); 0 means the two copies are linearly mode-connected.

BatchNorm: interpolated running statistics are not the statistics of the interpolated network, so for a model
with statistics (`engine.has_statistics`) every point's statistics are recomputed (cumulative average over
`BN_BATCHES` training batches of the twin's stream, in train mode, no gradient) before it is evaluated; the
endpoints too, so the whole path is measured alike.

The numbers are written into the arm's result.json (instability, stability_alphas, stability_errors) by
`record_stability` after the level trained; a resumed search computes what a killed one had not written from
the same final.pt files, so the numbers are the same.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence

import torch
from torch import nn

from fastticket.lottery.engine import has_statistics
from fastticket.lottery.train import evaluate

if TYPE_CHECKING:
    from fastticket.lottery.data import DeviceData

BN_BATCHES = 8  # training batches per interpolated point for the recomputed BatchNorm statistics


def alphas(points: int) -> List[float]:
    return [i / (points - 1) for i in range(points)]


def interpolate(first: Dict[str, torch.Tensor], second: Dict[str, torch.Tensor], a: float) -> Dict[str, torch.Tensor]:
    """(1 - a) first + a second for floating tensors; masks the union of both (they differ only where masks
    move during training: RigL / SET, fastticket.lottery.dst), so the line runs through both supports; the
    others (BN counters) from `first`."""
    return {k: ((1.0 - a) * v + a * second[k]) if torch.is_floating_point(v)
            else (v | second[k]) if v.dtype == torch.bool else v for k, v in first.items()}


@torch.no_grad()
def _recompute_statistics(model: nn.Module, data: "DeviceData", batch_size: int, seed: int) -> None:
    """Reset every BatchNorm's running statistics and recompute them as a cumulative average over BN_BATCHES
    training batches (momentum None), in train mode."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    was_training = model.training
    model.train()
    for i in range(BN_BATCHES):
        model(data.batch(i, batch_size, seed)[0])
    model.train(was_training)
    for m, momentum in zip(bns, momenta):
        m.momentum = momentum


def path_errors(model: nn.Module, first: Dict[str, torch.Tensor], second: Dict[str, torch.Tensor],
                data: "DeviceData", points: int, batch_size: int, seed: int) -> List[float]:
    """Test error (percent) of `model` (masks installed) at each of `points` points on the line between the
    state dicts `first` and `second`."""
    device = next(model.parameters()).device
    first = {k: v.to(device) for k, v in first.items()}
    second = {k: v.to(device) for k, v in second.items()}
    statistics = has_statistics(model)
    errors = []
    for a in alphas(points):
        model.load_state_dict(interpolate(first, second, a))  # re-applies the mask (the invariant)
        if statistics:
            _recompute_statistics(model, data, batch_size, seed)
        errors.append(100.0 * (1.0 - evaluate(model, data.test.x, data.test.y)[1]))
    return errors


def instability(errors: Sequence[float]) -> float:
    """Max error on the path minus the mean of the endpoints' errors (points of test error)."""
    return max(errors) - 0.5 * (errors[0] + errors[-1])


def record_stability(s: Any, level: int, rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """For each arm row of `rows` with a twin among them (both finished ok), its instability written into its
    result.json (when not already there); returns the rows with those arms' results updated. `s`: the
    search's fastticket.lottery.plans.SearchState (not imported: plans imports this module's neighbours)."""
    from fastticket.lottery.arms import twin_base, twin_name
    if not s.context.main:  # rank 0 computes and writes them (every rank reads the same final.pt files)
        return rows
    config = s.config
    by_key = {(r["arm"], r["trial"], r.get("replica", 0)): i for i, r in enumerate(rows)}
    out = list(rows)
    for (arm, trial, replica), i in by_key.items():
        twin = by_key.get((twin_name(arm), trial, replica))
        row = rows[i]
        if twin_base(arm) is not None or twin is None or "instability" in row:
            continue
        if row.get("status") != "ok" or rows[twin].get("status") != "ok":
            continue
        result = _stability_fields(s, level, arm, trial, replica, config.stability)
        if result is None:
            continue
        updated = {**row, **result}
        s.run.arm(level, arm, trial, replica).write_result(updated)
        out[i] = updated
    return out


def _stability_fields(s: Any, level: int, arm: str, trial: int, replica: int,
                      points: int) -> Optional[Dict[str, Any]]:
    from fastticket.lottery.arms import twin_name
    from fastticket.sparse.nn import install_masks, masks_in_state
    own, other = s.run.arm(level, arm, trial, replica), s.run.arm(level, twin_name(arm), trial, replica)
    model = s.model(s.seed(trial))
    first, second = own.load_final(), other.load_final()
    own.load_mask(model)  # verifies the arm's mask file against the model (a MaskError names it)
    ends = masks_in_state(model, first), masks_in_state(model, second)
    install_masks(model, {name: ends[0][name] | ends[1][name] for name in ends[0]})  # what `interpolate` loads
    errors = path_errors(model, first, second, s.data, points, s.config.batch_size, s.twin_seed(trial))
    return {"instability": instability(errors), "stability_alphas": alphas(points), "stability_errors": errors}
