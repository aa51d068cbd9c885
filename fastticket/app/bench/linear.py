"""Linear suite: fastticket's masked linear against dense cuBLAS, the prune-style path and torch BSR.

Implementations timed in the same run (GPU only):

    fastticket        the layer as users get it: per-layer dispatch between tile skipping and dense cuBLAS
    fastticket-skip   the tile-skipping kernels forced on (FASTTICKET_DENSE_THRESHOLD_LINEAR=1.01): the data
                      from which the dispatch threshold is measured
    dense             F.linear(x, w, b) on the stored weight (cuBLAS), no mask at all: the baseline
    prune             F.linear(x, w * mask, b): torch.nn.utils.prune / OpenLTH style, mask applied each call
    bsr               F.linear(x, w.to_sparse_bsr(block), b): torch's BSR kernels, forward only (torch has no
                      gradient for a BSR weight); "n/a" with the reason where a combination is unsupported

Every row also carries a parity column: the largest relative error of fastticket's outputs (forced tile
skipping and the dispatched path) against a float64 reference of the same math, for the row's op.

Crossover: for each case family (shape x mask kind) the suite finds the largest live-tile fraction at which
tile skipping beats dense on fwd+bwd and reports it in a summary row (`extra["crossover_live_fraction"]`,
`extra["suggested_threshold"]`); kernels/dispatch.py's DENSE_THRESHOLDS["linear"] should be set from it.

dW program shape (op "dw", rows `dw_program_rows`): kernels/masked_linear_dw.py's dW timed alone with 64 x 64
tile programs (`dw-tiles`, tiles_per_program=1) and 128 x 128 quad programs (`dw-quads`, 2) against the dense
path's cuBLAS dW (`dense`: dY^T X, masked), on block:128x128 masks (every quad full) and block:64x64 masks
(random tiles, quads part full). Each row carries `quads_vs_tiles` (tiles ms / quads ms: > 1 means quads are
faster), the quads' fill and what the heuristic `_dw_quads` picks; a closing `dw-quads` row sums them up, so
a GPU run settles the heuristic.

Without a GPU the suite runs the parity part only, in the Triton interpreter on small shapes.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F

from fastticket.app.bench.cases import grid_layers, skip_and_dispatch_parity
from fastticket.app.bench import (BenchOptions, BenchRow, crossover_row, env_override, layer_op_row, make_mask, suite,
                                  time_ms)
from fastticket.kernels._common import tf32_set

DENSITIES = (1.0, 0.5, 0.2, 0.1, 0.05, 0.02)
GPU_MASKS = ("element", "block:64x64", "block:32x32")
OPS = ("fwd", "bwd", "fwd+bwd")
N_INPUT_SETS = 3  # rotated during timing so consecutive calls do not hit a warm L2


@dataclass(frozen=True)
class LinearCase:
    name: str
    tokens: int        # M: rows of X (batch x sequence)
    out_features: int  # N
    in_features: int   # K

    @property
    def shape(self) -> str:
        return f"{self.tokens}x{self.in_features}->{self.out_features}"


def full_cases() -> List[LinearCase]:
    return [
        # LeNet-300-100 on MNIST, batch 60 (Frankle & Carbin 2019)
        LinearCase("lenet.fc1", 60, 300, 784),
        LinearCase("lenet.fc2", 60, 100, 300),
        LinearCase("lenet.fc3", 60, 10, 100),
        # Conv-6 on CIFAR-10: 256 x 4 x 4 features after three pools, fc 256, 256, 10, batch 60
        LinearCase("conv6.fc1", 60, 256, 4096),
        LinearCase("conv6.fc2", 60, 256, 256),
        LinearCase("conv6.fc3", 60, 10, 256),
        # large layers, 8K tokens
        LinearCase("large.4096x4096", 8192, 4096, 4096),
        LinearCase("large.1024->4096", 8192, 4096, 1024),
        LinearCase("large.4096->1024", 8192, 1024, 4096),
    ]


def quick_gpu_cases() -> List[LinearCase]:
    return [LinearCase("lenet.fc1", 60, 300, 784), LinearCase("large.4096x4096", 2048, 4096, 4096)]


def cpu_cases() -> List[LinearCase]:
    # Interpreter-sized: still several 16 x 16 tiles per dimension and partial edge tiles.
    return [LinearCase("lenet.fc3", 60, 10, 100), LinearCase("odd", 29, 37, 53),
            LinearCase("lenet.fc2-small", 60, 100, 96)]


def grid(options: BenchOptions) -> Tuple[List[LinearCase], Tuple[str, ...], Tuple[float, ...]]:
    """(cases, mask kinds, densities) the suite runs for `options`: the full or quick GPU grid, or on a CPU the
    interpreter-sized one. `fastticket bench` and bench/test_bench_linear.py both take their cases from here."""
    if options.torch_device.type != "cuda":
        return cpu_cases(), ("element", "block:16x16"), (1.0, 0.2, 0.05)
    if options.quick:
        return quick_gpu_cases(), ("element", "block:64x64"), (1.0, 0.5, 0.1)
    return full_cases(), GPU_MASKS, DENSITIES


def forced_skip() -> contextlib.AbstractContextManager:
    return env_override("FASTTICKET_DENSE_THRESHOLD_LINEAR", "1.01")


def tf32(enabled: bool) -> contextlib.AbstractContextManager:
    """TF32 matmuls on or off inside the block (fp32 storage; the "tf32" precision of the suite)."""
    return tf32_set("matmul", enabled)


class BenchLayer:
    """One masked weight plus everything the implementations need (tile-map cache, BSR copy)."""

    def __init__(self, case: LinearCase, mask_kind: str, density: float, dtype: torch.dtype,
                 device: torch.device, seed: int) -> None:
        from fastticket.kernels.masked_linear import linear_tile_sizes
        from fastticket.kernels.tile_map import TileMapCache

        gen = torch.Generator().manual_seed(seed)
        n, k = case.out_features, case.in_features
        self.mask = make_mask((n, k), mask_kind, density, gen, keep_one_block=True).to(device)
        w = torch.randn(n, k, generator=gen) / k ** 0.5
        self.weight = (w.to(device) * self.mask).to(dtype).requires_grad_(True)  # zero invariant
        self.bias = (torch.randn(n, generator=gen) * 0.1).to(device=device, dtype=dtype).requires_grad_(True)
        self.xs = [torch.randn(case.tokens, k, generator=gen).to(device=device, dtype=dtype).requires_grad_(True)
                   for _ in range(N_INPUT_SETS)]
        self.gs = [torch.randn(case.tokens, n, generator=gen).to(device=device, dtype=dtype)
                   for _ in range(N_INPUT_SETS)]
        self.cache = TileMapCache()
        self.mask_kind = mask_kind
        self.tile = linear_tile_sizes(device, dtype)

    def tile_map(self, bn: int, bk: int):
        return self.cache.get(self.mask, bn, bk)

    def grads(self, y: torch.Tensor, x: torch.Tensor, g: torch.Tensor, retain: bool):
        """(dX, dW, db) of `y` for grad-output `g`."""
        return torch.autograd.grad(y, [x, self.weight, self.bias], g, retain_graph=retain, allow_unused=True)

    def fastticket(self, x: torch.Tensor) -> torch.Tensor:
        from fastticket.sparse.linear import masked_linear

        return masked_linear(x, self.weight, self.bias, self.mask, self.tile_map)

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def prune(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.mask, self.bias)

    def bsr_forward(self) -> Tuple[Optional[Callable[[torch.Tensor], torch.Tensor]], str]:
        """F.linear with a BSR weight, or (None, reason) where torch does not support the combination."""
        if self.mask_kind.startswith("block:"):
            r, c = (int(v) for v in self.mask_kind.split(":", 1)[1].split("x"))
        else:
            r = c = 64
        n, k = self.weight.shape
        if n % r or k % c:
            return None, f"n/a: BSR needs the weight shape {n}x{k} to be a multiple of the block {r}x{c}"
        try:
            w_bsr = self.weight.detach().to_sparse_bsr((r, c))
            with torch.no_grad():
                F.linear(self.xs[0].detach(), w_bsr, self.bias.detach())
        except Exception as exc:  # unsupported dtype / device / layout combination in this torch build
            return None, f"n/a: {type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
        bias = self.bias.detach()
        return (lambda x: F.linear(x, w_bsr, bias)), "ok (forward only: torch has no BSR weight gradient)"


def parity(layer: BenchLayer) -> Dict[str, Dict[str, float]]:
    """Relative errors of fastticket (forced tile skipping and dispatched) vs float64, per op."""
    from fastticket.kernels.masked_linear import reference_masked_linear, reference_masked_linear_grads

    x, g = layer.xs[0], layer.gs[0]
    ref_y = reference_masked_linear(x, layer.weight, layer.bias, layer.mask)
    ref_dx, ref_dw, ref_db = reference_masked_linear_grads(x, layer.weight, layer.bias, layer.mask, g)
    return skip_and_dispatch_parity(layer, forced_skip, (ref_y, ref_dx, ref_dw, ref_db))


def live_fraction(layer: BenchLayer) -> float:
    """Live-tile fraction of the layer's mask at the kernels' tile size: what the dispatch decides on."""
    return layer.tile_map(*layer.tile).live_fraction


@suite("linear")
def linear_suite(options: BenchOptions) -> List[BenchRow]:
    from fastticket.kernels.dispatch import use_tile_skipping

    timing = options.timing and options.torch_device.type == "cuda"
    rows: List[BenchRow] = []
    with tf32(options.dtype.lower() == "tf32"):
        for case, mask_kind, density, layer in grid_layers(options, grid, BenchLayer):
            live = live_fraction(layer)
            path = "skip" if use_tile_skipping(live, "linear") else "dense"
            errors = parity(layer)
            bsr_fn, bsr_note = layer.bsr_forward() if timing else (None, "not timed (no GPU)")
            for op in OPS:
                extra = {"live_fraction": live, "dispatch": path,
                         "actual_density": float(layer.mask.float().mean()),
                         "parity_skip": errors["skip"][op], "parity_dispatch": errors["dispatch"][op],
                         "bsr": bsr_note if op == "fwd" else "n/a: torch has no BSR weight gradient"}
                bsr = {"bsr": bsr_fn} if op == "fwd" and bsr_fn is not None else None
                rows.append(layer_op_row(
                    "linear", case.name, op, case.shape, mask_kind, density, options.dtype, layer, errors,
                    extra, timing, forced_skip, extra_impls=bsr))
            del layer  # freed before the next case's layer is built
        rows.extend(dw_program_rows(options))
    # From the large layers pooled: small layers are launch-bound and say little about the kernels.
    rows.append(crossover_row("linear", rows, options.dtype, timing, "large.", "the large layers"))
    return rows


# ------------------------------------------------------------------------------------------- dW programs

DW_MASKS = ("block:128x128", "block:64x64")  # quads full; random 64-tiles (quads part full)
DW_DENSITIES = (0.5, 0.1)
DW_IMPLS = ("dw-tiles", "dw-quads", "dense")


def dw_grid(options: BenchOptions) -> Tuple[List[LinearCase], Tuple[str, ...], Tuple[float, ...]]:
    """(cases, mask kinds, densities) of the dW program rows: the large square layer on a GPU; off it an
    interpreter-sized layer with odd tile counts, its masks at twice the 16 x 16 tile (full quads) and at it."""
    if options.torch_device.type != "cuda":
        return [LinearCase("odd", 70, 75, 70)], ("block:32x32", "block:16x16"), (0.5,)
    tokens = 2048 if options.quick else 8192
    return [LinearCase("large.4096x4096", tokens, 4096, 4096)], DW_MASKS, DW_DENSITIES


def iter_dw_program_rows(options: BenchOptions) -> Iterator[BenchRow]:
    """One op "dw" row per point of `dw_grid` (see the module docstring), as each is measured."""
    from fastticket.kernels.masked_linear import reference_masked_linear_grads
    from fastticket.kernels.masked_linear_dw import _dw_quads, linear_grad_weight
    from fastticket.sparse.testing import nan_max, rel_error

    timing = options.timing and options.torch_device.type == "cuda"
    for case, mask_kind, density, layer in grid_layers(options, dw_grid, BenchLayer):
        mask, tile_map = layer.mask, layer.tile_map(*layer.tile)
        sets = [(x.detach(), g) for x, g in zip(layer.xs, layer.gs)]
        impls = {"dw-tiles": lambda x, g: linear_grad_weight(g, x, mask, tile_map, tiles_per_program=1),
                 "dw-quads": lambda x, g: linear_grad_weight(g, x, mask, tile_map, tiles_per_program=2),
                 "dense": lambda x, g: (g.t() @ x).masked_fill_(~mask, 0.0)}
        x, g = sets[0]
        ref = reference_masked_linear_grads(x, layer.weight.detach(), None, mask, g)[1]
        quads = tile_map.quads()
        extra: Dict[str, object] = {
            "live_fraction": tile_map.live_fraction, "quad_fill": tile_map.n_live / max(1, 4 * quads.n_quads),
            "heuristic": "quads" if _dw_quads(tile_map, case.tokens, layer.weight.dtype, mask.device) else "tiles",
            "parity_tiles": rel_error(impls["dw-tiles"](x, g), ref),
            "parity_quads": rel_error(impls["dw-quads"](x, g), ref)}
        times = {name: time_ms(impls[name], sets) for name in DW_IMPLS} if timing else {}
        if times:
            extra["quads_vs_tiles"] = times["dw-tiles"] / times["dw-quads"]
        yield BenchRow(suite="linear", case=case.name, op="dw", shape=case.shape, dtype=options.dtype,
                       mask=mask_kind, density=density, times_ms=times,
                       ratio_vs_dense={k: times["dense"] / t for k, t in times.items() if k != "dense" and t > 0},
                       parity=nan_max(extra["parity_tiles"], extra["parity_quads"]), extra=extra)
        del layer


def dw_summary_row(rows: List[BenchRow], dtype: str) -> BenchRow:
    """The dW rows' closing row: per mask kind the range of quads_vs_tiles, and the rows where the heuristic
    picked the slower program shape (`summary`, one line); unmeasured without timings."""
    timed = [r for r in rows if r.op == "dw" and "quads_vs_tiles" in r.extra]
    extra: Dict[str, object] = {"parity": "n/a"}
    if not timed:
        extra["summary"] = "linear dW: quads vs tiles unmeasured (needs GPU timings)"
    else:
        ranges = {}
        for r in timed:
            lo, hi = ranges.get(r.mask, (r.extra["quads_vs_tiles"], r.extra["quads_vs_tiles"]))
            ranges[r.mask] = (min(lo, r.extra["quads_vs_tiles"]), max(hi, r.extra["quads_vs_tiles"]))
        wrong = [f"{r.mask}@{r.density}" for r in timed
                 if (r.extra["heuristic"] == "quads") != (r.extra["quads_vs_tiles"] > 1.0)]
        extra.update(quads_vs_tiles=ranges, heuristic_wrong=wrong)
        extra["summary"] = ("linear dW: tiles ms / quads ms " + ", ".join(
            f"{mask} {lo:.2f}-{hi:.2f}" for mask, (lo, hi) in ranges.items())
            + f"; _dw_quads picked the slower shape in {len(wrong)} of {len(timed)} rows")
    return BenchRow(suite="linear", case="dw-quads", op="dw", shape="-", dtype=dtype, mask="-",
                    density=float("nan"), parity=float("nan"), extra=extra)


def dw_program_rows(options: BenchOptions) -> List[BenchRow]:
    """The dW program rows and their closing row ([] when the grid is empty)."""
    rows = list(iter_dw_program_rows(options))
    return rows + [dw_summary_row(rows, options.dtype)] if rows else []
