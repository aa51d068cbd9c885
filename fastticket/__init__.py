"""fastticket: lottery-ticket search (iterative magnitude pruning) with Triton masked-training kernels.

`import fastticket` loads only the masked layers; every public submodule (fastticket.optim, .prune,
.search, ...) is importable from it by attribute and is loaded on first use, so the import stays light.
The layers and what may import what: docs/architecture.md, "Layers".
"""
import importlib as _importlib
from typing import Any as _Any
from typing import List as _List

from fastticket.nn import MaskedConv2d, MaskedLinear, densify, density, masked_modules, sparsify

__version__ = "0.1.0"

# Public submodules reachable as attributes after a plain `import fastticket` (loaded lazily).
SUBMODULES = ("atomic_io", "backend", "bench", "compare", "compiled", "config", "data", "early_bird", "models", "nn",
              "ops", "optim", "pai", "presets", "prune", "report", "rewind", "search", "testing")

__all__ = ["MaskedLinear", "MaskedConv2d", "sparsify", "densify", "density", "masked_modules", "__version__",
           *SUBMODULES]


def __getattr__(name: str) -> _Any:
    if name in SUBMODULES:
        module = _importlib.import_module(f"{__name__}.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> _List[str]:
    return sorted(set(globals()) | set(SUBMODULES))
