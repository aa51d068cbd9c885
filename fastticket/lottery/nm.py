"""N:M structured masks (2:4 is what NVIDIA sparse tensor cores run): in every group of M consecutive weights
along the input dimension at most N are kept.

Groups, as NVIDIA's ASP lays them out for the GEMM view [C_out, K] with channels-last (tap-major) K order:
- Linear [out, in]: groups of M consecutive inputs in each row;
- Conv2d [C_out, C_in, kh, kw]: groups of M consecutive *input channels* at each (out, kh, kw), i.e. along C_in
  of the [C_out, kh*kw*C_in] view the conv kernels tile (fastticket.lottery.criteria.as_2d). A group never
  straddles two taps.
When the input dimension is not a multiple of M the last group of a row is partial and keeps at most N.

Ties are broken as fastticket.lottery.prune breaks them: among equal scores the smaller index goes first
(so the larger index is kept). NaN scores count as -inf. Only weights alive in the old mask can be kept
(`nm_mask`: masks only shrink); `nm_refill_mask` may revive pruned positions to fill a group up to N.
"""
from __future__ import annotations

import math
import re
from typing import Dict, Iterable, Mapping, Optional, Tuple

import torch
from torch import nn

from fastticket.errors import ConfigError

NM = Tuple[int, int]
NM_HELP = "nm:N:M with 1 <= N < M (nm alone is 2:4)"


def parse_nm(spec: Optional[str]) -> Optional[NM]:
    """"nm" -> (2, 4); "nm:N:M" -> (N, M) with 1 <= N < M; anything not starting with "nm" -> None."""
    if spec is None or not str(spec).strip().startswith("nm"):
        return None
    text = str(spec).strip()
    if text == "nm":
        return 2, 4
    match = re.fullmatch(r"nm:(\d+):(\d+)", text)
    if not match or not 1 <= int(match.group(1)) < int(match.group(2)):
        raise ConfigError(f"N:M sparsity must be {NM_HELP}, e.g. nm:2:4; got {spec!r}")
    return int(match.group(1)), int(match.group(2))


def _rows(t: torch.Tensor) -> torch.Tensor:
    """The [rows, in] view whose rows hold the groups: conv [C_out, C_in, kh, kw] -> [C_out*kh*kw, C_in]."""
    if t.dim() == 4:
        return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])
    return t.reshape(t.shape[0], -1)


def _from_rows(rows: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    if len(shape) == 4:
        c_out, c_in, kh, kw = shape
        return rows.reshape(c_out, kh, kw, c_in).permute(0, 3, 1, 2).contiguous()
    return rows.reshape(shape)


def _grouped(rows: torch.Tensor, m: int, fill) -> torch.Tensor:
    """[rows, in] -> [rows, groups, M], the partial last group padded with `fill`."""
    r, k = rows.shape
    pad = -k % m
    if pad:
        rows = torch.cat([rows, rows.new_full((r, pad), fill)], dim=1)
    return rows.reshape(r, -1, m)


def _keep_top(scores: torch.Tensor, eligible: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """[rows, G, M] bool: in each group the (up to) n eligible entries with the highest scores."""
    s = torch.nan_to_num(scores.double(), nan=-math.inf)
    # Ascending stable sort by score, then stable by eligibility: the last n positions are the n best eligible
    # entries (ineligible ones always rank below), and among equal scores the smaller index ranks lower.
    order = torch.sort(s, dim=-1, stable=True).indices
    by_eligible = torch.sort(eligible.gather(-1, order).to(torch.int8), dim=-1, stable=True).indices
    order = order.gather(-1, by_eligible)
    rank_kept = torch.zeros_like(eligible)
    rank_kept[..., m - n:] = True
    kept = torch.zeros_like(eligible).scatter(-1, order, rank_kept)
    return kept & eligible


def nm_mask(mask: torch.Tensor, scores: torch.Tensor, nm: NM) -> torch.Tensor:
    """The N:M mask keeping, in each group, the N highest-scoring weights alive in `mask` (fewer if fewer
    are alive); the result is a subset of `mask`, with mask's shape."""
    n, m = nm
    alive = _grouped(_rows(mask.bool()), m, False)
    s = _grouped(_rows(scores.detach().to(torch.float64)), m, -math.inf)
    kept = _keep_top(s, alive, n, m)
    k = _rows(mask).shape[1]
    return _from_rows(kept.reshape(kept.shape[0], -1)[:, :k], mask.shape)


def nm_refill_mask(mask: torch.Tensor, weight: torch.Tensor, nm: NM) -> torch.Tensor:
    """An element ticket turned into an exactly N:M mask: in each group the surviving weights with the largest
    |w| first, and a group with fewer than N survivors filled up to N with pruned positions (those revive
    at their rewind-point values, as block refill's do). Every full group keeps exactly N; a partial last
    group of k < M entries keeps min(N, k)."""
    n, m = nm
    alive = mask.bool()
    # Survivors rank by |w| above every pruned position (score -1 < 0 <= |w|); pruned ones tie at -1, so the
    # higher index among them is taken first, the rule the ties follow everywhere.
    score = torch.where(alive, weight.detach().double().abs(), torch.full_like(weight, -1.0, dtype=torch.float64))
    return nm_mask(torch.ones_like(alive), score, nm)


def is_nm(mask: torch.Tensor, nm: NM, exact: bool = False) -> bool:
    """Every group keeps at most N (exact=True: exactly min(N, group size))."""
    n, m = nm
    rows = _rows(mask.bool())
    counts = _grouped(rows, m, False).sum(-1)
    if not exact:
        return bool((counts <= n).all())
    sizes = _grouped(torch.ones_like(rows), m, False).sum(-1)
    return bool((counts == sizes.clamp(max=n)).all())


def nm_refill_masks(model: nn.Module, masks: Mapping[str, torch.Tensor], nm: NM,
                    prunable: Iterable[str]) -> Dict[str, torch.Tensor]:
    """`nm_refill_mask` for every prunable layer, scored by the model's current weights; others unchanged."""
    from fastticket.sparse.nn import masked_modules
    layers = dict(masked_modules(model))
    prunable = set(prunable)
    return {name: (nm_refill_mask(mask, layers[name].weight, nm) if name in prunable else mask.clone())
            for name, mask in masks.items()}
