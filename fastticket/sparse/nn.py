"""Drop-in masked layers: `MaskedLinear`, `MaskedConv2d`, and `sparsify` / `densify` / `density`.

The invariant (docs/architecture.md, "The invariant"): pruned weights are exactly zero in storage. `weight` stays an ordinary
Parameter; `weight_mask` is a bool buffer of the same shape saved in state dicts. Loading a state dict
re-applies the mask; `apply_mask_()` re-zeroes pruned entries after a user edits weights by hand.
"""
from __future__ import annotations

import fnmatch
from typing import Dict, Iterable, Iterator, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from fastticket.sparse import _mask_registry, functional
from fastticket.errors import MaskError
from fastticket.kernels.tile_map import TileMap, TileMapCache


def _reapply_mask_after_load(module: "MaskedLayer", incompatible_keys) -> None:
    module.mask_changed_()


def check_mask(mask: object, shape: Tuple[int, ...], owner: str = "weight") -> torch.Tensor:
    """`mask` as a bool tensor, or a MaskError: only bool tensors and numeric tensors holding nothing but 0
    and 1 are masks (0.3, NaN, 2 or -1 would otherwise silently mean "keep"); lists and numpy arrays are
    refused rather than guessed at."""
    if not isinstance(mask, torch.Tensor):
        raise MaskError(f"a mask must be a torch.Tensor (bool, or 0/1 values), got {type(mask).__name__}; "
                        f"convert it with torch.as_tensor(mask).bool()")
    if tuple(mask.shape) != tuple(shape):
        raise MaskError(f"mask shape {tuple(mask.shape)} does not match weight shape {tuple(shape)} of {owner}")
    if mask.dtype == torch.bool:
        return mask
    if mask.is_complex() or not bool(((mask == 0) | (mask == 1)).all()):
        bad = mask[~((mask == 0) | (mask == 1))].flatten()[:1].tolist()
        raise MaskError(f"a {mask.dtype} mask must hold only 0 and 1 (1 keeps a weight, 0 prunes it), found "
                        f"{bad[0] if bad else 'a complex value'}; threshold it explicitly, e.g. mask > 0.5")
    return mask != 0


class MaskedLayer:
    """What MaskedLinear and MaskedConv2d share. Not a Module by itself: mixed into nn.Linear / nn.Conv2d."""

    weight: nn.Parameter
    weight_mask: torch.Tensor

    def _init_mask(self) -> None:
        self.register_buffer("weight_mask", torch.ones_like(self.weight, dtype=torch.bool))
        self.mask_version = 0  # bumped on every mask change; tile maps and kernels key their caches on it
        self._tile_maps = TileMapCache()
        self.register_load_state_dict_post_hook(_reapply_mask_after_load)
        _mask_registry.register_layer(self)  # lets fastticket.sparse.optim find this weight's mask by itself

    def __setstate__(self, state) -> None:
        # deepcopy, pickle and a whole-model torch.load rebuild the layer without __init__: register the copy
        # too, or the masked optimizers would not find its mask and would revive pruned weights after a mask
        # change.
        super().__setstate__(state)  # type: ignore[misc]
        _mask_registry.register_layer(self)

    @torch.no_grad()
    def apply_mask_(self):
        """Zero the pruned weights in place (exact zeros, NaN/inf included)."""
        self.weight.masked_fill_(~self.weight_mask, 0.0)
        return self

    @torch.no_grad()
    def set_mask_(self, mask: torch.Tensor):
        """Replace the mask (bool or 0/1 tensor of the weight's shape) and zero the newly pruned weights.

        After a mask change mid-training, an optimizer's state (momentum, Adam moments) is not zero on the
        newly pruned entries: fastticket.sparse.optim's masked optimizers handle that themselves; for a torch.optim
        optimizer call `fastticket.sparse.optim.mask_optimizer_state_(optimizer)` after this."""
        self.weight_mask.copy_(check_mask(mask, tuple(self.weight.shape), self.__class__.__name__))
        return self.mask_changed_()

    def mask_changed_(self):
        """Call after editing `weight_mask` in place: re-zeroes weights and invalidates cached tile maps."""
        self.mask_version += 1
        return self.apply_mask_()

    def tile_map(self, block_n: int, block_k: int, k_order: str = "mask") -> TileMap:
        """Live-tile lists of the mask for (block_n x block_k) tiles, cached until the mask changes. k_order
        "tap_major" (conv filters) tiles the mask permuted to the conv kernels' K order; the buffer itself
        keeps its layout."""
        return self._tile_maps.get(self.weight_mask, block_n, block_k, self.mask_version, k_order)

    def density(self) -> float:
        """Alive / size of the mask (1.0 for a zero-size layer: nothing in it is pruned)."""
        return _alive(self.weight_mask) / self.weight_mask.numel() if self.weight_mask.numel() else 1.0

    def _density_repr(self) -> str:
        return f"density={self.density():.4f}"


class MaskedLinear(MaskedLayer, nn.Linear):
    """nn.Linear with a weight mask; same constructor arguments as nn.Linear."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None) -> None:
        nn.Linear.__init__(self, in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_mask()
        # Set by fastticket.sparse.optim's dW+update fusion: a callable(grad_out_2d, x_2d) that applies the optimizer
        # update to `weight` inside the backward pass instead of producing weight.grad (triton backend only).
        self.fused_update = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return functional.masked_linear(x, self.weight, self.bias, self.weight_mask, self.tile_map,
                                        self.fused_update)

    def extra_repr(self) -> str:
        return f"{nn.Linear.extra_repr(self)}, {self._density_repr()}"


class MaskedConv2d(MaskedLayer, nn.Conv2d):
    """nn.Conv2d with a weight mask; same constructor arguments as nn.Conv2d."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", device=None, dtype=None) -> None:
        nn.Conv2d.__init__(self, in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                           dilation=dilation, groups=groups, bias=bias, padding_mode=padding_mode,
                           device=device, dtype=dtype)
        self._init_mask()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padding = self.padding
        if self.padding_mode != "zeros":
            # Non-zero padding modes pad explicitly first, as nn.Conv2d does, then convolve unpadded.
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = (0, 0)
        return functional.masked_conv2d(x, self.weight, self.bias, self.weight_mask, self.tile_map,
                                        self.stride, padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return f"{nn.Conv2d.extra_repr(self)}, {self._density_repr()}"


MASKED_TYPES = (MaskedLinear, MaskedConv2d)


def masked_modules(model: nn.Module) -> Iterator[Tuple[str, MaskedLayer]]:
    """(qualified name, layer) for every masked layer of `model`, in registration order."""
    for name, module in model.named_modules():
        if isinstance(module, MASKED_TYPES):
            yield name, module


def untied_masked_modules(model: nn.Module) -> Iterator[Tuple[str, MaskedLayer]]:
    """`masked_modules`, refusing (MaskError) two masked layers that share one weight tensor: each would
    prune it at its own rate and density() would count it twice."""
    seen: Dict[int, str] = {}
    for name, module in list(masked_modules(model)):
        other = seen.setdefault(id(module.weight), name)
        if other != name:
            raise MaskError(f"masked layers {other!r} and {name!r} share one weight tensor (tied weights); keep "
                            f"one of them a plain layer (fastticket.sparsify(model, exclude=[{name!r}]))")
        yield name, module


def _matches(name: str, patterns: Optional[Iterable[str]]) -> bool:
    return patterns is not None and any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _replace_child(model: nn.Module, qualified_name: str, new: nn.Module) -> None:
    parent_name, _, child_name = qualified_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child_name, new)


def _masked_twin(module: nn.Module) -> MaskedLayer:
    kwargs = dict(device=module.weight.device, dtype=module.weight.dtype)
    if isinstance(module, nn.Linear):
        new = MaskedLinear(module.in_features, module.out_features, bias=module.bias is not None, **kwargs)
    else:
        new = MaskedConv2d(module.in_channels, module.out_channels, module.kernel_size, module.stride,
                           module.padding, module.dilation, module.groups, module.bias is not None,
                           module.padding_mode, **kwargs)
    # The same Parameter objects: optimizers and hooks that hold them keep working.
    new.weight = module.weight
    new.bias = module.bias
    new.train(module.training)
    return new


def _dense_twin(module: MaskedLayer) -> nn.Module:
    kwargs = dict(device=module.weight.device, dtype=module.weight.dtype)
    if isinstance(module, MaskedLinear):
        new = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, **kwargs)
    else:
        new = nn.Conv2d(module.in_channels, module.out_channels, module.kernel_size, module.stride,
                        module.padding, module.dilation, module.groups, module.bias is not None,
                        module.padding_mode, **kwargs)
    module.apply_mask_()
    new.weight = module.weight
    new.bias = module.bias
    new.train(module.training)
    return new


def sparsify(model: nn.Module, include: Optional[Iterable[str]] = None, exclude: Optional[Iterable[str]] = None,
             masks_from_zeros: bool = False) -> nn.Module:
    """Swap nn.Linear / nn.Conv2d layers of `model` for their masked versions, in place; returns `model`.

    include / exclude: qualified module names or fnmatch patterns ("features.*"); by default every
    Linear and Conv2d is swapped. Weights are kept (the same Parameter objects). Masks start all-ones, or
    with `masks_from_zeros=True` as `weight != 0` (to re-sparsify a model saved by `densify`).
    """
    include = list(include) if include is not None else None
    exclude = list(exclude) if exclude is not None else None
    if isinstance(model, (nn.Linear, nn.Conv2d)) and not isinstance(model, MASKED_TYPES):
        raise MaskError(f"sparsify swaps the Linear/Conv2d layers inside a model, and this model is itself a bare "
                        f"{type(model).__name__}: build a {'MaskedLinear' if isinstance(model, nn.Linear) else 'MaskedConv2d'} "
                        f"instead, or wrap it (nn.Sequential(layer))")
    candidates = [(n, m) for n, m in model.named_modules()
                  if isinstance(m, (nn.Linear, nn.Conv2d)) and not isinstance(m, MASKED_TYPES) and n]
    if not candidates and not any(True for _ in masked_modules(model)):
        raise MaskError(f"sparsify found no nn.Linear or nn.Conv2d layer in this {type(model).__name__}: nothing to "
                        f"mask")
    if include is not None:
        names = [n for n, _ in candidates]
        unmatched = [p for p in include if not any(fnmatch.fnmatchcase(n, p) for n in names)]
        if unmatched:
            raise ValueError(f"sparsify(include=...) matched no Linear/Conv2d layer for {unmatched}; "
                             f"layers are {names}")
    chosen = [(n, m) for n, m in candidates
              if (include is None or _matches(n, include)) and not _matches(n, exclude)]
    # Tied weights (one Parameter in two layers) would get two masks: one tensor pruned at two layers' rates
    # and counted twice by density(). Refuse rather than guess which layer's mask should win.
    owners: Dict[int, str] = {id(m.weight): n for n, m in masked_modules(model)}
    for name, module in chosen:
        other = owners.setdefault(id(module.weight), name)
        if other != name:
            raise MaskError(f"layers {other!r} and {name!r} share one weight tensor (tied weights), which would get "
                            f"two masks; mask only one of them, e.g. sparsify(model, exclude=[{name!r}])")
    for name, module in chosen:
        twin = _masked_twin(module)
        if masks_from_zeros:
            twin.set_mask_(module.weight.detach() != 0)
        _replace_child(model, name, twin)
    return model


def densify(model: nn.Module) -> nn.Module:
    """Swap masked layers back to nn.Linear / nn.Conv2d in place (pruned weights stay zero); returns `model`.

    The result's state dict has the keys of the plain model, so e.g. a torchvision model loads it strictly.
    """
    for name, module in list(masked_modules(model)):
        if name:
            _replace_child(model, name, _dense_twin(module))
    return model


def _alive(mask: torch.Tensor) -> int:
    if mask.is_meta:  # counting it would raise a bare NotImplementedError
        raise ValueError("a weight mask is on the meta device (shapes only, no values): materialise the model "
                         "(model.to_empty(device=...) and set its masks) before counting or training it")
    return int(mask.sum())


def density(model: nn.Module) -> Dict[str, Union[int, float, dict]]:
    """Per masked layer and in total: alive weights, size, and density (alive / size)."""
    layers = {}
    alive_total = size_total = 0
    for name, module in untied_masked_modules(model):
        alive, size = _alive(module.weight_mask), module.weight_mask.numel()
        layers[name] = {"alive": alive, "size": size, "density": alive / size if size else 1.0}
        alive_total += alive
        size_total += size
    return {"layers": layers, "alive": alive_total, "size": size_total,
            "density": alive_total / size_total if size_total else 1.0}


def densities(model: nn.Module, prunable: Sequence[str]) -> Tuple[float, Dict[str, float]]:
    """(total density over the `prunable` layers, {layer: density} over all masked layers), from `density`."""
    d = density(model)
    per_layer = {name: float(v["density"]) for name, v in d["layers"].items()}
    alive = sum(d["layers"][n]["alive"] for n in prunable)
    size = sum(d["layers"][n]["size"] for n in prunable)
    return (alive / size if size else 1.0), per_layer


def model_masks(model: nn.Module) -> Dict[str, torch.Tensor]:
    """{layer name: a CPU copy of its bool mask} for every masked layer."""
    return {name: layer.weight_mask.detach().to("cpu", copy=True) for name, layer in masked_modules(model)}


def install_masks(model: nn.Module, masks: Dict[str, torch.Tensor]) -> None:
    """Set every masked layer's mask from {layer name: mask} (`set_mask_`: newly pruned weights become zero)."""
    for name, layer in masked_modules(model):
        layer.set_mask_(masks[name].to(layer.weight.device))


def load_mask_file(path: str, model: nn.Module) -> Dict[str, torch.Tensor]:
    """Read a saved {layer name: mask} file and check it fits `model` (same layers, same shapes), else a
    MaskError naming the file."""
    try:
        masks = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file can fail in many ways inside torch.load
        raise MaskError(f"cannot read mask file {path}: {type(exc).__name__}: {exc}".replace("\n", " ")) from None
    return check_mask_file(masks, path, model)


def check_mask_file(masks: object, path: str, model: nn.Module) -> Dict[str, torch.Tensor]:
    """A loaded {layer name: mask} (from `path`) checked against `model`, as bool masks; else a MaskError."""
    layers = dict(masked_modules(model))
    if not isinstance(masks, dict) or set(masks) != set(layers):
        got = sorted(masks) if isinstance(masks, dict) else type(masks).__name__
        raise MaskError(f"mask file {path} does not fit the model: it has layers {got}, the model has "
                        f"{sorted(layers)} (corrupted or from another run)")
    for name, layer in layers.items():
        m = masks[name]
        if not isinstance(m, torch.Tensor) or tuple(m.shape) != tuple(layer.weight.shape):
            shape = tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__
            raise MaskError(f"mask file {path}: layer {name!r} has a mask of shape {shape} but the model's "
                            f"weight has shape {tuple(layer.weight.shape)} (corrupted or from another run)")
    return {name: check_mask(masks[name], tuple(layer.weight.shape), f"layer {name!r} in {path}")
            for name, layer in layers.items()}
