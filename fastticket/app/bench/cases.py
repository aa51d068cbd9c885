"""What the layer suites (linear, conv) share about their cases: walking a suite's grid and the parity of a
case with tile skipping forced on and under the default dispatch."""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, Tuple

import torch

from fastticket.sparse.testing import nan_max, rel_error

if TYPE_CHECKING:
    from fastticket.app.bench import BenchOptions


def grid_layers(options: "BenchOptions", grid: Callable, make_layer: Callable) -> Iterator[Tuple[Any, str, float, Any]]:
    """(case, mask kind, density, layer) for every point of a suite's `grid(options)`, the layer built by
    `make_layer(case, mask_kind, density, dtype, device, seed=...)` with a seed from its place in the grid. The
    caller drops its layer before the next is built (the CUDA cache is emptied in between)."""
    cases, masks, densities = grid(options)
    for ci, case in enumerate(cases):
        for mi, mask_kind in enumerate(masks):
            for di, density in enumerate(densities):
                yield case, mask_kind, density, make_layer(case, mask_kind, density, options.torch_dtype,
                                                           options.torch_device, seed=1000 * ci + 100 * mi + di)
                if options.torch_device.type == "cuda":
                    torch.cuda.empty_cache()


def skip_and_dispatch_parity(layer: Any, forced_skip: Callable, reference: Tuple[torch.Tensor, ...]
                             ) -> Dict[str, Dict[str, float]]:
    """fwd / bwd / fwd+bwd relative errors of a bench layer's first input set against `reference` = (y, dX, dW,
    db) in float64, with the tile-skipping kernels forced on ("skip") and under the default dispatch."""
    x, g = layer.xs[0], layer.gs[0]
    ref_y, ref_dx, ref_dw, ref_db = reference
    out: Dict[str, Dict[str, float]] = {}
    for label, ctx in (("skip", forced_skip), ("dispatch", contextlib.nullcontext)):
        with ctx():
            y = layer.fastticket(x)
            dx, dw, db = layer.grads(y, x, g, retain=False)
        fwd = rel_error(y, ref_y)
        bwd = nan_max(rel_error(dx, ref_dx), rel_error(dw, ref_dw), rel_error(db, ref_db))
        out[label] = {"fwd": fwd, "bwd": bwd, "fwd+bwd": nan_max(fwd, bwd)}
    return out
