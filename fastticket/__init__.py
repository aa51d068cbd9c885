"""fastticket: lottery-ticket search (iterative magnitude pruning) with Triton masked-training kernels.

Two wings and the front ends over them (docs/architecture.md):
- `fastticket.sparse`: the engine, masked layers, ops, dispatch, optimizers, rewinding; usable on its own;
- `fastticket.lottery`: the experiment, config, arms, pruning, training of K arms, the search, run directories;
- `fastticket.app`: the CLI, the report and the benchmarks.
`import fastticket` loads only the masked layers; everything else here is loaded on first use.
"""
from fastticket._lazy import lazy_attributes
from fastticket.sparse.nn import MaskedConv2d, MaskedLinear, densify, density, masked_modules, sparsify

__version__ = "0.1.0"

PUBLIC = {
    "sparse": "sparse", "lottery": "lottery", "app": "app", "kernels": "kernels", "errors": "errors",
    "MaskedSGD": "sparse.optim:MaskedSGD", "MaskedAdam": "sparse.optim:MaskedAdam",
    "MaskedAdamW": "sparse.optim:MaskedAdamW", "rewind_to": "sparse.rewind:rewind_to",
    "SearchConfig": "lottery.config:SearchConfig", "run_search": "lottery.search:run_search",
    "search": "app.api:search", "export": "app.export:export",
}

__all__ = ["MaskedLinear", "MaskedConv2d", "sparsify", "densify", "density", "masked_modules", "__version__",
           *PUBLIC]

__getattr__, __dir__ = lazy_attributes(__name__, PUBLIC)
