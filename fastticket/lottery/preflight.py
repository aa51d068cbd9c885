"""Checks a search runs before its first write: everything that needs the dataset or the model.

The config checks itself (fastticket.lottery.config); what it cannot know without data and a model is checked here,
once, by `preflight`: the backend can run on the device, the model builds and runs on the dataset's images,
a batch fits the training split and (estimated) the device's memory, and the pruning schedule prunes
something at every level without emptying a layer. Each failure is one ConfigError line naming the flag to
change, raised before the run directory is touched, so the corrected command starts cleanly.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

import torch
from torch import nn

from fastticket.sparse.backend import resolve_backend
from fastticket.lottery.config import SearchConfig, parse_granularity
from fastticket.errors import ConfigError
from fastticket.sparse.nn import masked_modules
from fastticket.lottery.prune import layer_rates, remove_count
from fastticket.lottery.train import build_masked_model

if TYPE_CHECKING:
    from fastticket.lottery.data import DeviceData

# Bytes of training memory per byte of one forward pass's activations: the activations kept for backward,
# their gradients and the step's temporaries. A rough upper estimate, not a measurement: the check exists to
# refuse a batch that cannot fit by a wide margin (minutes before an out-of-memory), not to pack memory.
ACTIVATION_FACTOR = 3
# Bytes per parameter byte: weight, gradient, two Adam moments, the mask and a rewind copy.
PARAMETER_FACTOR = 6


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def available_memory(device: torch.device) -> Optional[int]:
    """Free memory on `device` in bytes (None: unknown)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def _check_model(config: SearchConfig, data: "DeviceData", device: torch.device) -> Tuple[nn.Module, int]:
    """The model built and run on two training images; returns it and its activation bytes per image."""
    shape = "x".join(map(str, data.info.in_shape))  # (C, H, W) for images; a user's data may have any shape
    try:
        model = build_masked_model(config, data.info, config.seed, device)
    except Exception as exc:  # noqa: BLE001 - a torchvision builder can fail in many ways
        raise ConfigError(f"model {config.model!r} cannot be built for {config.dataset} ({shape} inputs, "
                          f"{data.info.num_classes} classes): {_first_line(exc)}") from None
    sizes: List[int] = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: sizes.append(
        out.numel() * out.element_size() if isinstance(out, torch.Tensor) else 0))
        for m in model.modules() if not list(m.children())]
    x = data.train.x[:2]
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as exc:  # noqa: BLE001 - e.g. a 224x224 torchvision model on 28x28 images
        raise ConfigError(f"model {config.model!r} cannot run on {config.dataset} inputs ({shape}): "
                          f"{_first_line(exc)}; choose a model made for this input size") from None
    finally:
        for hook in hooks:
            hook.remove()
    # Class scores are checked for classification; with a user's loss (num_classes 0) any output tensor goes.
    if not isinstance(out, torch.Tensor) or (data.info.num_classes and
                                             tuple(out.shape) != (x.shape[0], data.info.num_classes)):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(f"model {config.model!r} gives outputs of shape {shape} on {config.dataset}; expected "
                          f"(batch, {data.info.num_classes}) class scores")
    return model, (sum(sizes) + x.numel() * x.element_size()) // x.shape[0]


def _check_batch(config: SearchConfig, data: "DeviceData", model: nn.Module, per_image: int,
                 device: torch.device) -> None:
    n_train = len(data.train)
    # A user's data (a name with ':') bring their own validation split; val_size holds out of built-in ones.
    held_out = "" if ":" in config.dataset else f" after holding out {config.val_size} for validation"
    if config.batch_size > n_train:
        raise ConfigError(f"--batch-size {config.batch_size} is larger than the training split of {config.dataset} "
                          f"({n_train} examples{held_out}); use "
                          f"--batch-size <= {n_train}")
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    need = PARAMETER_FACTOR * params + ACTIVATION_FACTOR * per_image * config.batch_size
    free = available_memory(device)
    if free is not None and need > free:
        fits = max(0, (free - PARAMETER_FACTOR * params) // max(1, ACTIVATION_FACTOR * per_image))
        raise ConfigError(f"--batch-size {config.batch_size} needs about {_gib(need)} on {device} (estimated "
                          f"from one forward pass of {config.model!r}), only {_gib(free)} is free; use "
                          f"--batch-size <= {fits}" + (" or a smaller model" if fits == 0 else ""))


def _units(weight: torch.Tensor, block: Optional[Tuple[int, int]]) -> int:
    if block is None:
        return weight.numel()
    rows, cols = weight.shape[0], weight[0].numel()
    return -(-rows // block[0]) * -(-cols // block[1])


def _check_pruning(config: SearchConfig, model: nn.Module) -> None:
    """Level 1 prunes something, no level empties a layer, and no level prunes nothing any more."""
    if config.levels == 0:
        return
    block = parse_granularity(config.granularity)
    rates = layer_rates(model, config.rate, scope=config.scope, conv_rate=config.conv_rate,
                        output_rate=config.output_rate, exclude=config.exclude)
    layers = {name: m.weight for name, m in masked_modules(model) if rates.get(name) is not None}
    if not layers:
        raise ConfigError("no layer is prunable (every layer is excluded); use --levels 0 or prune some layer")
    if block is not None:
        fits = [n for n, w in layers.items() if block[0] <= w.shape[0] and block[1] <= w[0].numel()]
        if not fits:
            largest = max(layers.values(), key=lambda w: w.numel())
            raise ConfigError(f"--granularity {config.granularity}: the tile is larger than every prunable layer "
                              f"(the largest is {largest.shape[0]} x {largest[0].numel()}), so nothing would be "
                              f"pruned; use a smaller block")
    # Pools of units pruned together: one per layer (layerwise) or one for all (global).
    if config.scope == "global":
        pools: Dict[str, Tuple[float, int]] = {"the global pool": (config.rate, sum(_units(w, block)
                                                                                   for w in layers.values()))}
    else:
        pools = {name: (float(rates[name]), _units(w, block)) for name, w in layers.items()}
    unit = "weights" if block is None else f"{block[0]}x{block[1]} tiles"
    alive = {name: units for name, (_, units) in pools.items()}
    for level in range(1, config.levels + 1):
        removed = {name: remove_count(pools[name][0], alive[name]) for name in pools}
        if not any(removed.values()):
            if level == 1:
                name = max(pools, key=lambda n: pools[n][1])
                rate, units = pools[name]
                raise ConfigError(f"--rate {config.rate:g} prunes nothing: {name} has {units} {unit} and "
                                  f"round({rate:g} x {units}) = 0; use --rate >= {0.5 / units:.3g}"
                                  + ("" if block is None else " or a smaller --granularity block"))
            raise ConfigError(f"--levels {config.levels}: from level {level} on nothing more is pruned (each "
                              f"layer's rate x its remaining {unit} rounds to 0); use --levels <= {level - 1}")
        for name in pools:
            alive[name] -= removed[name]
            if alive[name] == 0:
                raise ConfigError(f"--levels {config.levels}: level {level} would prune every one of the "
                                  f"{pools[name][1]} {unit} of {name}; use --levels <= {level - 1}")


def check_backend(device: torch.device) -> str:
    """The backend masked layers will use on `device`, or a ConfigError when the requested one cannot run."""
    try:
        return resolve_backend(device)
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(_first_line(exc)) from None


def preflight(config: SearchConfig, data: "DeviceData", device: torch.device) -> None:
    """Every check that needs the data or the model, before anything is written (see the module docstring)."""
    check_backend(device)
    model, per_image = _check_model(config, data, device)
    _check_batch(config, data, model, per_image, device)
    _check_pruning(config, model)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
