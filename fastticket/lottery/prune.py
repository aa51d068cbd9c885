"""Pruning: which surviving weights of a masked model to remove at the end of an IMP level.

Semantics (docs/architecture.md, "The experiment (fastticket/lottery)"), the contract the search and the tests rely on:

- `rate` is the fraction of the weights *still alive* that one call removes; masks only shrink.
- Exact counts. A layer (layerwise scope) or the pool of all prunable layers (global scope) with `alive`
  surviving units loses exactly ``k = floor(rate * alive + 1/2)`` units: round half up, computed in exact
  rational arithmetic on the decimal the user wrote (``Fraction(repr(rate))``), so 0.1 * 15 = 1.5 rounds to
  2 and 0.2 * 5 = 1 is exactly 1 (no binary floating-point drift). Layerwise pruning never removes the last
  surviving unit of a layer (a layer with nothing left would cut the network); global pruning removes
  exactly k, wherever they are.
- Ties are broken deterministically: units are ranked by score with a stable sort over their flat index
  (global scope: layers in registration order, then flat index), and the lowest-ranked k go. So among equal
  scores the unit with the smaller index is pruned first. NaN scores count as -inf (pruned first).
- Granularity `element` prunes single weights. `block:RxC` prunes whole RxC tiles of the 2-D weight view
  [out, in*kh*kw] (the tiles the kernels skip); the rate then counts *tiles*, a tile is alive while any of its
  entries is, and pruning a tile zeroes all of its entries. Tiles at the right/bottom edges are partial;
  their norm is normalised by the number of entries they hold (mean |w| for L1, root-mean-square for L2)
  so a small edge tile is not pruned merely for being small.
- Granularity `nm:N:M` (fastticket.lottery.nm): every prunable layer is pruned to exactly N:M in one call (in
  each group of M consecutive inputs the N alive weights with the highest scores stay); the rate is not used.
- Scope `layerwise`: every layer at its own rate (conv layers `conv_rate`, fc layers `rate`, the output layer
  `output_rate`; None means `rate`). Scope `global`: one threshold across all prunable layers at `rate`.
  In both scopes `exclude` (names or fnmatch patterns; "output" means the output layer) keeps layers dense.

Criteria are pluggable (fastticket.lottery.criteria: ``@criterion("name")``, higher score = keep).
"""
from __future__ import annotations

import fnmatch
import math
from fractions import Fraction
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

# check_rate and parse_granularity are the config's (one check for the config, pruning and the CLI); importable
# from here too.
from fastticket.lottery.config import SCOPES, Block, check_rate, parse_granularity  # noqa: F401
from fastticket.errors import ConfigError, MaskError
from fastticket.lottery.criteria import (BLOCK_NORMS, ScoreContext, alive_units, as_2d, expand_tiles, get_criterion,
                                         tile_counts, tile_sums)
from fastticket.lottery.nm import nm_mask, parse_nm
from fastticket.sparse.nn import masked_modules, untied_masked_modules


def remove_count(rate: float, alive: int) -> int:
    """How many of `alive` units one pruning step at `rate` removes: floor(rate * alive + 1/2), exactly."""
    return min(alive, math.floor(Fraction(repr(float(rate))) * alive + Fraction(1, 2)))


# ---------------------------------------------------------------------------------------------- layer rates

def _default_output_layer(model: nn.Module) -> Optional[str]:
    try:
        from fastticket.lottery.models import output_layer_name
        return output_layer_name(model)
    except (ImportError, ValueError, AttributeError, KeyError):
        # Models not from our registry: the last masked layer in registration order is the classifier.
        names = [n for n, _ in masked_modules(model)]
        return names[-1] if names else None


def _excluded(name: str, exclude: Iterable[str], output_layer: Optional[str]) -> bool:
    for pattern in exclude:
        if pattern == "output" and name == output_layer:
            return True
        if fnmatch.fnmatchcase(name, pattern):
            return True
    return False


def layer_rates(model: nn.Module, rate: float, *, scope: str = "layerwise", conv_rate: Optional[float] = None,
                output_rate: Optional[float] = None, exclude: Iterable[str] = (),
                output_layer: Optional[str] = None) -> Dict[str, Optional[float]]:
    """name -> rate for every masked layer; None for layers that stay dense (excluded).

    Global scope gives every prunable layer `rate` (the pool is pruned together at that rate).
    """
    if scope not in SCOPES:
        raise ConfigError(f"scope must be one of {SCOPES}, got {scope!r}")
    check_rate(rate, "rate")
    if conv_rate is not None:
        check_rate(conv_rate, "conv_rate")
    if output_rate is not None:
        check_rate(output_rate, "output_rate")
    exclude = list(exclude or ())
    if output_layer is None:
        output_layer = _default_output_layer(model)
    rates: Dict[str, Optional[float]] = {}
    for name, module in masked_modules(model):
        if _excluded(name, exclude, output_layer):
            rates[name] = None
        elif scope == "global":
            rates[name] = rate
        elif name == output_layer:
            rates[name] = output_rate if output_rate is not None else rate
        elif isinstance(module, nn.Conv2d):
            rates[name] = conv_rate if conv_rate is not None else rate
        else:
            rates[name] = rate
    return rates


# ---------------------------------------------------------------------------------------------------- pruning

def _lookup_initial(initial: Optional[Mapping[str, torch.Tensor]], name: str) -> Optional[torch.Tensor]:
    # Accept {layer name: weight} or a model state dict ({"layer.weight": ...}).
    if initial is None:
        return None
    if name in initial:
        return initial[name]
    return initial.get(f"{name}.weight")


def _ranked_for_removal(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Positions (into `scores`) of the k lowest scores; ties go to the lower position (stable sort)."""
    scores = torch.nan_to_num(scores.float(), nan=-math.inf)
    order = torch.sort(scores, stable=True).indices
    return order[:k]


def _unit_mask_to_element(keep_units: torch.Tensor, old_mask: torch.Tensor, block: Block) -> torch.Tensor:
    if block is None:
        return keep_units.reshape(old_mask.shape) & old_mask.bool()
    return expand_tiles(keep_units, block, old_mask.shape) & old_mask.bool()


@torch.no_grad()
def prune(model: nn.Module, rate: float = 0.2, *, scope: str = "layerwise", conv_rate: Optional[float] = None,
          output_rate: Optional[float] = None, exclude: Iterable[str] = (), granularity: str = "element",
          criterion: str = "magnitude", initial: Optional[Mapping[str, torch.Tensor]] = None,
          generator: Optional[torch.Generator] = None, output_layer: Optional[str] = None,
          block_norm: str = "l1", apply: bool = True,
          batches: Optional[Sequence[Tuple[torch.Tensor, torch.Tensor]]] = None) -> Dict[str, torch.Tensor]:
    """One pruning step on a sparsified model: the new bool mask of every masked layer (name -> mask).

    With apply=True (default) the masks are installed in place (`set_mask_`, which zeroes pruned weights).
    `initial`: {layer name or "name.weight": weights at the rewind point}, needed by the movement criterion.
    `batches`: [(x, y), ...] from the training split, needed by the snip and grasp criteria.
    See the module docstring for rates, rounding, ties and granularity.
    """
    block = parse_granularity(granularity)
    if block_norm not in BLOCK_NORMS:
        raise ConfigError(f"block norm must be one of {BLOCK_NORMS}, got {block_norm!r}")
    score_fn = get_criterion(criterion)
    if not list(untied_masked_modules(model)):
        raise MaskError(f"prune: this {type(model).__name__} has no masked layers, so there is nothing to prune; "
                        f"call fastticket.sparsify(model) first")
    rates = layer_rates(model, rate, scope=scope, conv_rate=conv_rate, output_rate=output_rate,
                        exclude=exclude, output_layer=output_layer)
    layers = dict(masked_modules(model))
    new_masks: Dict[str, torch.Tensor] = {name: m.weight_mask.clone() for name, m in layers.items()}
    shared: Dict[str, Any] = {}

    # Scores and alive units of every prunable layer, flattened, in registration order.
    entries = []
    for name, module in layers.items():
        if rates[name] is None:
            continue
        ctx = ScoreContext(name, module.weight.detach(), _lookup_initial(initial, name), generator, block,
                           block_norm, model, batches, shared)
        scores = score_fn(ctx)
        if tuple(scores.shape) != ctx.unit_shape:
            raise ValueError(f"criterion {criterion!r} returned scores of shape {tuple(scores.shape)} for "
                             f"layer {name!r}; expected the unit shape {ctx.unit_shape}")
        alive = alive_units(module.weight_mask, block).reshape(-1)
        entries.append((name, module, scores.reshape(-1).to(alive.device), alive))

    def finish(name: str, module: nn.Module, alive: torch.Tensor) -> None:
        unit_shape = ScoreContext(name, module.weight, None, None, block).unit_shape
        new_masks[name] = _unit_mask_to_element(alive.reshape(unit_shape), module.weight_mask, block)

    nm = parse_nm(granularity)
    if nm is not None:  # N:M is the target structure: each group keeps its N best, whatever the rate
        for name, module, scores, _ in entries:
            new_masks[name] = nm_mask(module.weight_mask, scores.reshape(module.weight.shape), nm)
    elif scope == "layerwise":
        for name, module, scores, alive in entries:
            alive_idx = alive.nonzero().flatten()
            # Never empty a layer: a layer with no weights left disconnects everything after it.
            k = min(remove_count(rates[name], alive_idx.numel()), max(0, alive_idx.numel() - 1))
            alive = alive.clone()
            alive[alive_idx[_ranked_for_removal(scores[alive_idx], k)]] = False
            finish(name, module, alive)
    else:
        alive_idx = [a.nonzero().flatten() for _, _, _, a in entries]
        pooled = torch.cat([s[i].to(torch.float32).cpu() for (_, _, s, _), i in zip(entries, alive_idx)]) \
            if entries else torch.zeros(0)
        k = remove_count(rate, pooled.numel())
        removed = torch.zeros(pooled.numel(), dtype=torch.bool)
        removed[_ranked_for_removal(pooled, k)] = True
        offset = 0
        for (name, module, _, alive), idx in zip(entries, alive_idx):
            gone = removed[offset:offset + idx.numel()].to(idx.device)
            offset += idx.numel()
            alive = alive.clone()
            alive[idx[gone]] = False
            finish(name, module, alive)

    if apply:
        for name, mask in new_masks.items():
            layers[name].set_mask_(mask)
    return new_masks


def prune_with_config(model: nn.Module, config, *, initial: Optional[Mapping[str, torch.Tensor]] = None,
                      generator: Optional[torch.Generator] = None, apply: bool = True,
                      output_layer: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """`prune` with the pruning fields of a SearchConfig (scope, rates, exclude, granularity, criterion)."""
    return prune(model, config.rate, scope=config.scope, conv_rate=config.conv_rate,
                 output_rate=config.output_rate, exclude=config.exclude, granularity=config.granularity,
                 criterion=config.criterion, initial=initial, generator=generator, output_layer=output_layer,
                 apply=apply)


# ----------------------------------------------------------------------------------------- random controls

def random_masks_like(model_or_masks: Union[nn.Module, Mapping[str, torch.Tensor]],
                      densities: Optional[Mapping[str, float]] = None,
                      generator: Optional[torch.Generator] = None,
                      granularity: str = "element") -> Dict[str, torch.Tensor]:
    """Random masks with the same per-layer density as the given masks (the random-pruning control).

    Counts are exact: each layer keeps exactly as many units as its given mask has alive (or, with
    `densities` {name: fraction}, floor(density * units + 1/2)). Positions are uniform without replacement,
    drawn from `generator` on the CPU layer by layer in order, so a seed fixes the masks on any device.
    With block granularity whole tiles are drawn (same live-tile count); partial edge tiles then make the
    element density differ slightly from the given mask's.
    """
    block = parse_granularity(granularity)
    nm = parse_nm(granularity)
    if isinstance(model_or_masks, nn.Module):
        masks = {name: m.weight_mask for name, m in masked_modules(model_or_masks)}
    else:
        masks = dict(model_or_masks)
    if nm is not None and densities is not None:
        raise ConfigError(f"granularity {granularity} fixes every pruned layer's density at N/M; "
                          f"drop the densities")
    out: Dict[str, torch.Tensor] = {}
    for name, mask in masks.items():
        if nm is not None:  # a random N:M mask for every pruned layer; a dense (unpruned) layer stays dense
            scores = torch.rand(mask.shape, generator=generator, dtype=torch.float64).to(mask.device)
            out[name] = mask.bool().clone() if bool(mask.all()) else nm_mask(torch.ones_like(mask), scores, nm)
            continue
        units = alive_units(mask, block)
        n_units = units.numel()
        if densities is not None and name in densities:
            d = float(densities[name])
            if not 0.0 <= d <= 1.0:
                raise ConfigError(f"density for {name!r} must be in [0, 1], got {d}")
            keep = min(n_units, math.floor(Fraction(repr(d)) * n_units + Fraction(1, 2)))
        else:
            keep = int(units.sum())
        chosen = torch.randperm(n_units, generator=generator)[:keep]
        flat = torch.zeros(n_units, dtype=torch.bool)
        flat[chosen] = True
        flat = flat.reshape(units.shape).to(mask.device)
        out[name] = flat if block is None else expand_tiles(flat, block, mask.shape)
    return out


# ------------------------------------------------------------------------------------- pruning to a count

@torch.no_grad()
def prune_to_count(model: nn.Module, keep: int, *, prunable: Sequence[str], criterion: str = "magnitude",
                   granularity: str = "element", batches: Optional[Sequence[Tuple[torch.Tensor, torch.Tensor]]] = None,
                   generator: Optional[torch.Generator] = None, apply: bool = True) -> Dict[str, torch.Tensor]:
    """Global pruning to exactly `keep` alive units over the `prunable` layers (the other masked layers keep
    their masks): the highest-scoring `keep` of the alive units stay, ties broken as in `prune` (layers in
    registration order, then flat index). How the pruning-at-initialization controls reach a ticket's density.
    """
    block = parse_granularity(granularity)
    score_fn = get_criterion(criterion)
    layers = dict(masked_modules(model))
    unknown = [n for n in prunable if n not in layers]
    if unknown:
        raise ConfigError(f"prunable layers {unknown} are not masked layers of the model")
    new_masks: Dict[str, torch.Tensor] = {name: m.weight_mask.clone() for name, m in layers.items()}
    shared: Dict[str, Any] = {}
    entries: List[Tuple[str, nn.Module, torch.Tensor, torch.Tensor]] = []
    for name, module in layers.items():
        if name not in prunable:
            continue
        ctx = ScoreContext(name, module.weight.detach(), None, generator, block, "l1", model, batches, shared)
        scores = score_fn(ctx)
        if tuple(scores.shape) != ctx.unit_shape:
            raise ValueError(f"criterion {criterion!r} returned scores of shape {tuple(scores.shape)} for "
                             f"layer {name!r}; expected the unit shape {ctx.unit_shape}")
        entries.append((name, module, scores.reshape(-1).float().cpu(), alive_units(module.weight_mask, block)))
    alive_idx = [a.reshape(-1).nonzero().flatten().cpu() for _, _, _, a in entries]
    pooled = torch.cat([s[i] for (_, _, s, _), i in zip(entries, alive_idx)]) if entries else torch.zeros(0)
    if not 0 <= keep <= pooled.numel():
        raise ConfigError(f"cannot keep {keep} units: the prunable layers have {pooled.numel()} alive")
    removed = torch.zeros(pooled.numel(), dtype=torch.bool)
    removed[_ranked_for_removal(pooled, pooled.numel() - keep)] = True
    nm = parse_nm(granularity)
    offset = 0
    for (name, module, scores, alive), idx in zip(entries, alive_idx):
        if nm is not None:  # the N:M structure decides the count: each group keeps its N best by the criterion
            new_masks[name] = nm_mask(module.weight_mask, scores.reshape(module.weight.shape), nm)
            continue
        gone = removed[offset:offset + idx.numel()]
        offset += idx.numel()
        flat = alive.reshape(-1).cpu().clone()
        flat[idx[gone]] = False
        new_masks[name] = _unit_mask_to_element(flat.reshape(alive.shape).to(alive.device), module.weight_mask, block)
    if apply:
        for name, mask in new_masks.items():
            layers[name].set_mask_(mask)
    return new_masks


def alive_count(masks: Mapping[str, torch.Tensor], names: Iterable[str], granularity: str = "element") -> int:
    """Alive units (weights, or tiles holding any) of the named layers' masks."""
    block = parse_granularity(granularity)
    return sum(int(alive_units(masks[n], block).sum()) for n in names)


# ------------------------------------------------------------------------------------------------ refilling

def refill_mask(mask: torch.Tensor, weight: torch.Tensor, block: Tuple[int, int]) -> torch.Tensor:
    """An element mask refilled into whole RxC tiles (Chen et al. 2022, IMP-Refill), same density.

    Tiles are ranked by the magnitude of the weights surviving in `mask` (sum of |w| over the tile's alive
    entries; ties by tile index) and taken whole, most first, among the tiles holding any surviving weight;
    the number taken is the one whose total entry count is nearest the element mask's alive count (the
    smaller on a tie), at least one tile while any weight survives. With full tiles that is alive / (R*C)
    rounded half down: the density is exact whenever alive is a multiple of R*C and within half a tile
    otherwise. Every tile of the result is all ones or all zeros.
    """
    r, c = block
    m2d = as_2d(mask).bool()
    n, k = m2d.shape
    if r >= n and c >= k:
        raise ConfigError(f"refill tile {r}x{c} covers a whole {n}x{k} weight matrix (out x in*kh*kw), which "
                          f"would be kept or dropped entirely; choose a smaller --refill block")
    target = int(m2d.sum())
    if target == 0:
        return torch.zeros_like(mask, dtype=torch.bool)
    w2d = as_2d(weight).detach().double().abs() * m2d
    score = tile_sums(w2d, block).reshape(-1)
    holds = tile_sums(m2d.double(), block).reshape(-1) > 0
    sizes = tile_counts((n, k), block, m2d.device).reshape(-1)
    candidates = holds.nonzero().flatten()
    # Most magnitude first; a stable sort on the negated score keeps the lower tile index first on ties.
    order = candidates[torch.sort(-score[candidates], stable=True).indices]
    cumulative = torch.cumsum(sizes[order].double(), 0)
    distance = (cumulative - target).abs()
    take = int(torch.argmin(distance)) + 1  # argmin returns the first minimum: the smaller count on a tie
    tiles = torch.zeros(score.numel(), dtype=torch.bool, device=m2d.device)
    tiles[order[:take]] = True
    grid = tiles.reshape(-(-n // r), -(-k // c))
    return expand_tiles(grid, block, mask.shape)


def refill_masks(model: nn.Module, masks: Mapping[str, torch.Tensor], block: Tuple[int, int],
                 prunable: Iterable[str]) -> Dict[str, torch.Tensor]:
    """`refill_mask` for every prunable layer, scored by the model's current weights; other masks unchanged."""
    layers = dict(masked_modules(model))
    prunable = set(prunable)
    return {name: (refill_mask(mask, layers[name].weight, block) if name in prunable else mask.clone())
            for name, mask in masks.items()}


def check_refill_fits(model: nn.Module, block: Tuple[int, int], prunable: Iterable[str]) -> None:
    """A ConfigError (one line) when a refill tile covers a whole prunable layer's 2-D weight."""
    layers = dict(masked_modules(model))
    for name in prunable:
        n, k = as_2d(layers[name].weight).shape
        # Tiles may hang over a layer's edges (as in the kernels' tile maps), but a layer inside one tile would
        # be kept or dropped whole.
        if block[0] >= n and block[1] >= k:
            raise ConfigError(f"--refill block:{block[0]}x{block[1]} is larger than layer {name!r} "
                              f"({n}x{k} as out x in*kh*kw): the layer would be one tile; choose a smaller tile")

