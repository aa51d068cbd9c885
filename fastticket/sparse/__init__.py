"""The engine: masked layers, their ops and dispatch, masked optimizers and rewinding. It imports nothing from
fastticket.lottery or fastticket.app, so it serves any training loop on its own."""
from fastticket._lazy import lazy_attributes

SUBMODULES = ("nn", "masked_weight", "functional", "backend", "linear", "conv", "ops", "optim", "fused_update", "rewind", "testing")

__getattr__, __dir__ = lazy_attributes(__name__, {name: name for name in SUBMODULES})
