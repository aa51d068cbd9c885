"""Pruning at initialization: the SNIP, GraSP and SynFlow saliencies, and the controls built from them.

The saliencies are whole-model passes, registered here as pruning criteria ("snip", "grasp", "synflow";
fastticket.lottery.criteria); `prune_at_init` prunes a freshly initialised network with one of them to a given
count of alive weights, the way the search builds its snip/grasp/synflow control arms (same total density as the
level's ticket, global over the prunable layers, then trained like the ticket).

Each pass runs on a dense float64 copy of the model (fastticket.sparse.nn.densify): the masked layers' weights are
exactly zero where pruned, so the copy computes the same function, autograd's double backward (GraSP) works
through plain layers, and the model itself is left untouched. Scores are per element, for the masked layers
(keyed by their module names); unit (tile) sums are the criterion's business.

- SNIP (Lee et al. 2019): |dL/dw * w|, L the cross-entropy summed over the scoring batches' means.
- GraSP (Wang et al. 2020): w * (H g), g = dL/dw over the batches, H the Hessian of L; GraSP removes the
  weights with the largest -w * Hg, so the keep-score is w * Hg. Logits are divided by a temperature of
  200 as in the authors' code.
- SynFlow (Tanaka et al. 2020): R = 1^T (prod_l |W_l|) 1, the all-ones input pushed through the network with
  every parameter replaced by its absolute value (batch norm in eval mode); score |w * dR/dw|. Data-free.
  Applied iteratively: SYNFLOW_ROUNDS rounds, round r keeping total * d^(r/n) weights (exponential schedule),
  rescoring the pruned network each round.
"""
from __future__ import annotations

import copy
from typing import Dict, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from fastticket.errors import ConfigError
from fastticket.lottery.criteria import ScoreContext, criterion
from fastticket.lottery.prune import alive_count, prune_to_count
from fastticket.sparse.nn import densify, masked_modules, model_masks, weight_key

Batches = Sequence[Tuple[torch.Tensor, torch.Tensor]]

SCORE_BATCHES = 10        # training batches SNIP and GraSP score with
SYNFLOW_ROUNDS = 100      # the paper's iteration count
GRASP_TEMPERATURE = 200.0


def _dense_copy(model: nn.Module) -> Tuple[nn.Module, Dict[str, nn.Parameter]]:
    """A float64 plain-layer copy of `model` and its masked layers' weights by module name."""
    keys = {name: weight_key(name, layer) for name, layer in masked_modules(model)}
    twin = densify(copy.deepcopy(model)).double()
    params = dict(twin.named_parameters())
    return twin, {name: params[key] for name, key in keys.items()}


def snip_saliency(model: nn.Module, batches: Batches) -> Dict[str, torch.Tensor]:
    twin, weights = _dense_copy(model)
    twin.eval()  # scoring must not move batch-norm statistics of the copy; the model itself is untouched
    with torch.enable_grad():
        params = list(weights.values())
        total = [torch.zeros_like(p) for p in params]
        for x, y in batches:
            loss = F.cross_entropy(twin(x.double()), y)
            for acc, g in zip(total, torch.autograd.grad(loss, params)):
                acc += g
    return {name: (g * w).abs().detach() for (name, w), g in zip(weights.items(), total)}


def grasp_saliency(model: nn.Module, batches: Batches,
                   temperature: float = GRASP_TEMPERATURE) -> Dict[str, torch.Tensor]:
    twin, weights = _dense_copy(model)
    twin.eval()
    params = list(weights.values())
    with torch.enable_grad():
        g = [torch.zeros_like(p) for p in params]
        for x, y in batches:
            loss = F.cross_entropy(twin(x.double()) / temperature, y)
            for acc, gi in zip(g, torch.autograd.grad(loss, params)):
                acc += gi
        hg = [torch.zeros_like(p) for p in params]
        for x, y in batches:
            loss = F.cross_entropy(twin(x.double()) / temperature, y)
            grads = torch.autograd.grad(loss, params, create_graph=True)
            z = sum((gi.detach() * gr).sum() for gi, gr in zip(g, grads))
            for acc, h in zip(hg, torch.autograd.grad(z, params)):
                acc += h
    return {name: (w * h).detach() for (name, w), h in zip(weights.items(), hg)}


def synflow_saliency(model: nn.Module, input_shape: Sequence[int]) -> Dict[str, torch.Tensor]:
    twin, weights = _dense_copy(model)
    twin.eval()
    with torch.no_grad():
        for p in twin.parameters():
            p.abs_()
    with torch.enable_grad():
        out = twin(torch.ones((1, *input_shape), dtype=torch.float64))
        grads = torch.autograd.grad(out.sum(), list(weights.values()))
    return {name: (g * w).abs().detach() for (name, w), g in zip(weights.items(), grads)}


# The saliencies as pruning criteria (fastticket.lottery.criteria): registered when this module is imported.

def _need_batches(ctx: ScoreContext, name: str) -> Sequence[Tuple[torch.Tensor, torch.Tensor]]:
    if not ctx.batches:
        raise ConfigError(f"the {name} criterion needs training batches to score with: pass batches=[(x, y), ...]")
    return ctx.batches


@criterion("snip")
def _snip(ctx: ScoreContext) -> torch.Tensor:
    # Connection sensitivity |g * w| (Lee et al. 2019).
    scores = ctx.whole_model("snip", lambda model, c: snip_saliency(model, _need_batches(c, "snip")))
    return ctx.unit_sum(scores[ctx.name].to(ctx.weight.device))


@criterion("grasp")
def _grasp(ctx: ScoreContext) -> torch.Tensor:
    # Gradient-signal preservation (Wang et al. 2020): keep the weights with the largest w * Hg.
    scores = ctx.whole_model("grasp", lambda model, c: grasp_saliency(model, _need_batches(c, "grasp")))
    return ctx.unit_sum(scores[ctx.name].to(ctx.weight.device))


@criterion("synflow")
def _synflow(ctx: ScoreContext) -> torch.Tensor:
    # Synaptic flow |w * dR/dw| of the all-ones input through |W| (Tanaka et al. 2020); data-free: only the
    # input's shape is taken from the batches. Iterating it is prune_at_init's job.
    scores = ctx.whole_model("synflow", lambda model, c: synflow_saliency(
        model, tuple(_need_batches(c, "synflow")[0][0].shape[1:])))
    return ctx.unit_sum(scores[ctx.name].to(ctx.weight.device))


def prune_at_init(model: nn.Module, method: str, keep: int, prunable: Sequence[str], *,
                  batches: Batches, granularity: str = "element",
                  rounds: int = SYNFLOW_ROUNDS) -> Dict[str, torch.Tensor]:
    """Prune `model` (in place) with `method` (snip, grasp, synflow) to exactly `keep` alive units over the
    prunable layers; returns the masks. SNIP and GraSP prune in one shot; SynFlow in `rounds` rounds."""
    if method not in ("snip", "grasp", "synflow"):
        raise ValueError(f"unknown pruning-at-init method {method!r}; use snip, grasp or synflow")
    if method != "synflow":
        return prune_to_count(model, keep, prunable=prunable, criterion=method, granularity=granularity,
                              batches=batches)
    total = alive_count(model_masks(model), prunable, granularity)
    masks: Dict[str, torch.Tensor] = model_masks(model)
    for r in range(1, rounds + 1):
        # Exponential schedule: round r keeps total * (keep/total)^(r/n); the last round keeps exactly `keep`.
        target = keep if r == rounds else max(keep, int(round(total * (keep / total) ** (r / rounds))))
        masks = prune_to_count(model, target, prunable=prunable, criterion="synflow", granularity=granularity,
                               batches=batches[:1])
    return masks


def score_batches(data, count: int, batch_size: int, seed: int) -> Batches:
    """The first `count` training batches of the trial's stream (DeviceData.batch: training split only)."""
    return [data.batch(i, batch_size, seed) for i in range(count)]

