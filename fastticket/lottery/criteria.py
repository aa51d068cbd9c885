"""Pruning criteria and the tile views they score: which units (weights, or RxC tiles) matter most.

A criterion is a function ``fn(ctx: ScoreContext) -> scores`` registered with ``@criterion("name")``; higher
means keep. Scores have the unit shape: the weight's shape (element) or the tile grid (block);
`ctx.norm(t)` gives per-unit magnitudes of any weight-shaped tensor at the current granularity. The
built-ins here are magnitude, movement and random; fastticket.lottery.pai registers the pruning-at-init
saliencies (snip, grasp, synflow). fastticket.lottery.prune applies a criterion (rates, rounding, ties).

Tiles are those of the 2-D weight view [out, in*kh*kw] the kernels skip (`as_2d`); partial edge tiles are
normalised by the number of entries they hold.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from fastticket.errors import ConfigError
from fastticket.kernels.tile_map import live_tiles

Block = Optional[Tuple[int, int]]  # None: element granularity; (R, C): block granularity
BLOCK_NORMS = ("l1", "l2")


# ------------------------------------------------------------------------------------------------ tile views

def as_2d(t: torch.Tensor) -> torch.Tensor:
    """The [out, K] matrix the kernels tile: a conv filter [C_out, C_in, kh, kw] in the conv kernels' tap-major
    K order (kh, kw, C_in), so a pruned block is exactly a tile the kernels skip; a linear weight as it is."""
    if t.dim() == 4:
        return t.permute(0, 2, 3, 1).reshape(t.shape[0], -1)
    return t.reshape(t.shape[0], -1)


def from_2d(t2d: torch.Tensor, weight_shape: Sequence[int]) -> torch.Tensor:
    """The inverse of `as_2d` for a tensor of `weight_shape`."""
    if len(weight_shape) == 4:
        c_out, c_in, kh, kw = weight_shape
        return t2d.reshape(c_out, kh, kw, c_in).permute(0, 3, 1, 2).contiguous()
    return t2d.reshape(tuple(weight_shape))


def tile_sums(t2d: torch.Tensor, block: Tuple[int, int]) -> torch.Tensor:
    """Sum of each (R x C) tile of a 2-D tensor; partial edge tiles sum what they hold."""
    (n, k), (r, c) = t2d.shape, block
    tn, tk = -(-n // r), -(-k // c)
    padded = t2d.new_zeros(tn * r, tk * c)
    padded[:n, :k] = t2d
    return padded.view(tn, r, tk, c).sum(dim=(1, 3))


def tile_counts(shape2d: Tuple[int, int], block: Tuple[int, int], device: torch.device) -> torch.Tensor:
    return tile_sums(torch.ones(shape2d, device=device), block)


def tile_norms(t: torch.Tensor, block: Tuple[int, int], norm: str = "l1") -> torch.Tensor:
    """Per-tile norm of a weight-shaped tensor, normalised by the tile's entry count (mean |x| or RMS)."""
    t2d = as_2d(t).float()
    counts = tile_counts(tuple(t2d.shape), block, t2d.device)
    if norm == "l1":
        return tile_sums(t2d.abs(), block) / counts
    if norm == "l2":
        return (tile_sums(t2d * t2d, block) / counts).sqrt()
    raise ConfigError(f"block norm must be one of {BLOCK_NORMS}, got {norm!r}")


def expand_tiles(tile_mask: torch.Tensor, block: Tuple[int, int], weight_shape: Sequence[int]) -> torch.Tensor:
    """A [tiles_n, tiles_k] bool grid as an element mask of `weight_shape` (edge tiles cropped)."""
    r, c = block
    n = weight_shape[0]
    k = math.prod(weight_shape[1:])
    full = tile_mask.repeat_interleave(r, dim=0).repeat_interleave(c, dim=1)[:n, :k]
    return from_2d(full, weight_shape)


def alive_units(mask: torch.Tensor, block: Block) -> torch.Tensor:
    """Which units (weights, or tiles holding any surviving weight) are alive, in the unit shape."""
    if block is None:
        return mask.bool()
    return live_tiles(as_2d(mask), block[0], block[1])


# -------------------------------------------------------------------------------------------------- criteria

@dataclasses.dataclass
class ScoreContext:
    """What a criterion sees for one layer."""

    name: str
    weight: torch.Tensor                 # the trained weights (pruned entries are zero)
    initial: Optional[torch.Tensor]      # the weights at the rewind point / init, if the caller passed them
    generator: Optional[torch.Generator]  # CPU generator for stochastic criteria
    block: Block
    block_norm: str = "l1"
    # Whole-model criteria (snip, grasp, synflow) score every layer from one pass over the model: they see the
    # model, the scoring batches (training split only) and `shared`, one dict per pruning call that caches
    # the pass for the other layers.
    model: Optional[nn.Module] = None
    batches: Optional[Sequence[Tuple[torch.Tensor, torch.Tensor]]] = None
    shared: Dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def unit_shape(self) -> Tuple[int, ...]:
        if self.block is None:
            return tuple(self.weight.shape)
        n, k = as_2d(self.weight).shape
        return (-(-n // self.block[0]), -(-k // self.block[1]))

    def norm(self, t: torch.Tensor) -> torch.Tensor:
        """Per-unit magnitude of `t`: |t| per element, or the normalised tile norm per tile."""
        if self.block is None:
            return t.detach().float().abs()
        return tile_norms(t.detach(), self.block, self.block_norm)

    def unit_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Per-unit sum of an element score (a tile's score is the sum of its entries' scores)."""
        if self.block is None:
            return t
        return tile_sums(as_2d(t), self.block)

    def whole_model(self, key: str, compute: Callable[[nn.Module, "ScoreContext"], Dict[str, torch.Tensor]]
                    ) -> Dict[str, torch.Tensor]:
        """`compute(model, ctx)` ({layer name: element scores}) once per pruning call, cached in `shared`."""
        if self.model is None:
            raise ConfigError(f"the {key} criterion scores the whole model: call prune(..., model) through "
                              f"fastticket.lottery.prune (it passes the model to the criterion)")
        if key not in self.shared:
            self.shared[key] = compute(self.model, self)
        return self.shared[key]


Criterion = Callable[[ScoreContext], torch.Tensor]
CRITERIA: Dict[str, Criterion] = {}


def criterion(name: str) -> Callable[[Criterion], Criterion]:
    """Register a pruning criterion under `name` (higher score = keep)."""
    def register(fn: Criterion) -> Criterion:
        CRITERIA[name] = fn
        return fn
    return register


def get_criterion(name: str) -> Criterion:
    if name not in CRITERIA:
        raise ConfigError(f"unknown pruning criterion {name!r}; known: {sorted(CRITERIA)}")
    return CRITERIA[name]


@criterion("magnitude")
def _magnitude(ctx: ScoreContext) -> torch.Tensor:
    return ctx.norm(ctx.weight)


@criterion("movement")
def _movement(ctx: ScoreContext) -> torch.Tensor:
    # Magnitude increase |w_T| - |w_0| (Zhou et al. 2019): keeps weights that grew during training.
    if ctx.initial is None:
        raise ConfigError("the movement criterion needs the initial (rewind-point) weights: pass initial=...")
    return ctx.norm(ctx.weight) - ctx.norm(ctx.initial.to(ctx.weight.device))


@criterion("random")
def _random(ctx: ScoreContext) -> torch.Tensor:
    # Drawn on the CPU so a seeded generator gives the same mask on any device.
    return torch.rand(ctx.unit_shape, generator=ctx.generator).to(ctx.weight.device)
