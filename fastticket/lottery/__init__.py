"""The experiment: config, arms, pruning criteria, the engine that trains K arms, the search, run directories,
data, models and the platform (ranks and devices). It builds on fastticket.sparse and never on fastticket.app."""
from fastticket._lazy import lazy_attributes

SUBMODULES = ("config", "arms", "presets", "models", "data", "datafiles", "sources", "recipe", "streams", "arm_state", "criteria", "nm", "prune", "pai", "early_bird", "progress",
              "train", "engine", "batched", "stacked_plan", "compiled", "plans", "search", "rundir", "atomic_io",
              "preflight", "platform", "peers", "stop", "armdir", "cuda_graph", "stability", "dst")

__getattr__, __dir__ = lazy_attributes(__name__, {name: name for name in SUBMODULES})
