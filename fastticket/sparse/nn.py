"""Drop-in masked layers: `MaskedLinear`, `MaskedConv2d`, and `sparsify` / `densify` / `density`.

The invariant (docs/architecture.md, "The invariant"): pruned weights are exactly zero in storage. `weight` stays an ordinary
Parameter; `weight_mask` is a bool buffer of the same shape saved in state dicts. Loading a state dict
checks the loaded masks (0/1 only) and re-applies them; `apply_mask_()` re-zeroes pruned entries after a user
edits weights by hand. Weights of other modules carry a `MaskedWeight` (fastticket.sparse.masked_weight): the
same calls, a gradient hook instead of the kernels.
"""
from __future__ import annotations

import fnmatch
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from fastticket.sparse import _mask_registry, functional
from fastticket.sparse.masked_weight import (MaskGradient, MaskOps, alive_in, check_loaded_masks, check_mask,
                                             mask_weight_, owned_masks, reapply_masks_after_load,
                                             refuse_foreign_mask, unmask_weight_, watch_loads)
from fastticket.errors import MaskError
from fastticket.kernels.tile_map import TileMap, TileMapCache

__all__ = ["MaskedLinear", "MaskedConv2d", "sparsify", "densify", "density", "masked_modules", "unmasked_weights",
           "check_mask"]


class MaskedLayer(MaskOps):
    """What MaskedLinear and MaskedConv2d share. Not a Module by itself: mixed into nn.Linear / nn.Conv2d."""

    def _init_mask(self) -> None:
        self.register_buffer("weight_mask", torch.ones_like(self.weight, dtype=torch.bool))
        self.mask_version = 0  # bumped on every mask change; tile maps and kernels key their caches on it
        self._tile_maps = TileMapCache()
        self._register_load_state_dict_pre_hook(check_loaded_masks, with_module=True)
        self.register_load_state_dict_post_hook(reapply_masks_after_load)
        self.hook_weight_()
        _mask_registry.register_layer(self)  # lets fastticket.sparse.optim find this weight's mask by itself

    def hook_weight_(self) -> None:
        """Mask the gradient of the current `weight` Parameter wherever it is used: modules that hand a layer's
        weight to a functional op without calling the layer (Swin's attention, MHA) bypass its forward."""
        self._grad_hook = self.weight.register_hook(MaskGradient(self))

    def __setstate__(self, state) -> None:
        # deepcopy, pickle and a whole-model torch.load rebuild the layer without __init__: register the copy
        # too, or the masked optimizers would not find its mask and would revive pruned weights after a mask
        # change.
        super().__setstate__(state)  # type: ignore[misc]
        self.hook_weight_()  # a copied Parameter comes without hooks
        _mask_registry.register_layer(self)

    def register_buffer(self, name: str, tensor, persistent: bool = True) -> None:
        # torch.nn.utils.prune re-registers `weight_mask` as its own float mask: refused (torch rolls back).
        if name == "weight_mask" and "weight_mask" in self.__dict__.get("_buffers", ()):
            refuse_foreign_mask(name, tensor)
        super().register_buffer(name, tensor, persistent)  # type: ignore[misc]

    def tile_map(self, block_n: int, block_k: int, k_order: str = "mask") -> TileMap:
        """Live-tile lists of the mask for (block_n x block_k) tiles, cached until the mask changes. k_order
        "tap_major" (conv filters) tiles the mask permuted to the conv kernels' K order; the buffer itself
        keeps its layout."""
        return self._tile_maps.get(self.weight_mask, block_n, block_k, self.mask_version, k_order)

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
_SWAPPED = {nn.Linear: MaskedLinear, nn.Conv2d: MaskedConv2d}  # exact types only: a subclass keeps its class


def entry_name(module_name: str, param_name: str) -> str:
    """A mask's name: its module's for a parameter called `weight` (so "{name}.weight_mask" is its state key),
    else the parameter's qualified name ("attn.in_proj_weight", state key "attn.in_proj_weight_mask")."""
    if param_name == "weight":
        return module_name
    return f"{module_name}.{param_name}" if module_name else param_name


def weight_key(name: str, layer: MaskOps) -> str:
    """The state-dict key of the weight a mask named `name` covers; its mask's key is this + "_mask"."""
    if layer.param_name != "weight":
        return name
    return f"{name}.weight" if name else "weight"


def masked_modules(model: nn.Module) -> Iterator[Tuple[str, MaskOps]]:
    """(name, mask) for every masked weight of `model` in registration order: masked layers, and the
    `MaskedWeight`s of other modules (named by `entry_name`). Each has `weight`, `weight_mask`, `set_mask_`."""
    for module_name, module in model.named_modules():
        for param_name, mask in owned_masks(module):
            yield entry_name(module_name, param_name), mask


def untied_masked_modules(model: nn.Module) -> Iterator[Tuple[str, MaskOps]]:
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


def _twin(module: nn.Module, cls: type) -> nn.Module:
    """A `cls` (MaskedLinear / nn.Linear, MaskedConv2d / nn.Conv2d) holding `module`'s very Parameter objects, so
    optimizers and hooks that hold them keep working."""
    kwargs = dict(device=module.weight.device, dtype=module.weight.dtype)
    if isinstance(module, nn.Linear):
        new = cls(module.in_features, module.out_features, bias=module.bias is not None, **kwargs)
    else:
        new = cls(module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                  module.dilation, module.groups, module.bias is not None, module.padding_mode, **kwargs)
    new.weight = module.weight
    new.bias = module.bias
    new.train(module.training)
    if isinstance(new, MaskedLayer):
        new.hook_weight_()
    else:
        module._grad_hook.remove()
    return new


def _is_weight(param_name: str) -> bool:
    return param_name == "weight" or param_name.endswith("_weight") or param_name.startswith("weight_")


def _weights(model: nn.Module, tied: bool = False) -> Iterator[Tuple[str, str, nn.Module, nn.Parameter]]:
    """(module name, parameter name, module, parameter) for every floating-point parameter of 2 or more
    dimensions (or not yet initialized): the tensors a mask could cover. Biases and norm scales are 1-D.
    A tied parameter comes once, or with `tied=True` once per module holding it."""
    seen = set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            lazy = isinstance(param, nn.parameter.UninitializedParameter)
            if (id(param) in seen and not tied) or not param.is_floating_point() or not (
                    (lazy and _is_weight(param_name)) or (not lazy and param.dim() >= 2)):
                continue
            seen.add(id(param))
            yield module_name, param_name, module, param


def unmasked_weights(model: nn.Module) -> Dict[str, str]:
    """{qualified parameter name: why} for every weight (see `_weights`) that carries no mask: what stays dense."""
    masked = {id(layer.weight) for _, layer in masked_modules(model)}
    out = {}
    for module_name, param_name, module, param in _weights(model):
        if id(param) in masked:
            continue
        key = f"{module_name}.{param_name}" if module_name else param_name
        if isinstance(param, nn.parameter.UninitializedParameter):
            out[key] = f"{type(module).__name__}: not initialized yet (lazy); run one forward, then sparsify again"
        elif not _is_weight(param_name):
            out[key] = (f"{type(module).__name__}: not named like a weight; mask it with "
                        f"fastticket.sparse.masked_weight.mask_weight_(module, {param_name!r})")
        else:
            out[key] = f"{type(module).__name__}: excluded or not masked yet"
    return out


def _plan(model: nn.Module, include: Optional[List[str]], exclude: Optional[List[str]]):
    """What sparsify masks: [(module name, parameter name, module)], refusing include patterns that match nothing."""
    masked = {id(layer.weight) for _, layer in masked_modules(model)}
    candidates = [(m, p, module) for m, p, module, param in _weights(model, tied=True)
                  if _is_weight(p) and id(param) not in masked
                  and not isinstance(param, nn.parameter.UninitializedParameter)]
    if include is not None:
        names = [n for m, p, _ in candidates for n in {m, entry_name(m, p)}]
        unmatched = [pat for pat in include if not any(fnmatch.fnmatchcase(n, pat) for n in names)]
        if unmatched:
            raise ValueError(f"sparsify(include=...) matched no Linear/Conv2d layer or other weight for {unmatched}; "
                             f"maskable weights are {sorted({entry_name(m, p) for m, p, _ in candidates})}")
    return [(m, p, module) for m, p, module in candidates
            if (include is None or _matches(m, include) or _matches(entry_name(m, p), include))
            and not (_matches(m, exclude) or _matches(entry_name(m, p), exclude))]


def sparsify(model: nn.Module, include: Optional[Iterable[str]] = None, exclude: Optional[Iterable[str]] = None,
             masks_from_zeros: bool = False, strict: bool = False) -> nn.Module:
    """Mask every weight of `model` in place (all-ones masks, or `weight != 0` with `masks_from_zeros=True`, to
    re-sparsify a model saved by `densify`); returns `model`.

    Exact nn.Linear / nn.Conv2d become MaskedLinear / MaskedConv2d (the Triton kernels; the same Parameter
    objects). Every other parameter named `weight`, `*_weight` or `weight_*` with 2 or more dimensions (Conv1d/3d,
    ConvTranspose, Embedding, Bilinear, MultiheadAttention, subclasses of Linear / Conv2d, user layers) gets a
    `MaskedWeight` and keeps its module, class and forward. include / exclude: fnmatch patterns over module names
    or mask names ("features.*", "attn.in_proj_weight"). What stays dense is listed by `unmasked_weights`;
    `strict=True` refuses it (excluded weights aside) with a line naming the module and its class.
    """
    include = list(include) if include is not None else None
    exclude = list(exclude) if exclude is not None else None
    if type(model) in _SWAPPED:
        raise MaskError(f"sparsify swaps the Linear/Conv2d layers inside a model, and this model is itself a bare "
                        f"{type(model).__name__}: build a {_SWAPPED[type(model)].__name__} "
                        f"instead, or wrap it (nn.Sequential(layer))")
    chosen = _plan(model, include, exclude)
    if not chosen and not any(True for _ in masked_modules(model)):
        raise MaskError(f"sparsify found no nn.Linear or nn.Conv2d layer nor any other weight in this "
                        f"{type(model).__name__}: nothing to mask")
    if strict:
        chosen_ids = {id(module._parameters[p]) for _, p, module in chosen}
        excluded = {f"{m}.{p}" if m else p for m, p, module, param in _weights(model)
                    if _matches(m, exclude) or _matches(entry_name(m, p), exclude)}
        left = {k: why for k, why in unmasked_weights(model).items()
                if k not in excluded and id(model.get_parameter(k)) not in chosen_ids}
        if left:
            key, why = next(iter(left.items()))
            raise MaskError(f"sparsify(strict=True): {key!r} ({why}) would stay dense"
                            f"{f' (and {len(left) - 1} more)' if len(left) > 1 else ''}; exclude it or drop strict")
    # Tied weights (one Parameter in two modules) would get two masks: one tensor pruned at two rates and counted
    # twice by density(). Refuse rather than guess which mask should win.
    owners: Dict[int, str] = {id(layer.weight): n for n, layer in masked_modules(model)}
    for module_name, param_name, module in chosen:
        name = entry_name(module_name, param_name)
        other = owners.setdefault(id(module._parameters[param_name]), name)
        if other != name:
            raise MaskError(f"layers {other!r} and {name!r} share one weight tensor (tied weights), which would get "
                            f"two masks; mask only one of them, e.g. sparsify(model, exclude=[{name!r}])")
    watch_loads(model)
    for module_name, param_name, module in chosen:
        if type(module) in _SWAPPED and param_name == "weight" and module_name:
            mask: MaskOps = _twin(module, _SWAPPED[type(module)])
            _replace_child(model, module_name, mask)
        else:
            mask = mask_weight_(module, param_name)
        if masks_from_zeros:
            mask.set_mask_(mask.weight.detach() != 0)
    return model


def densify(model: nn.Module) -> nn.Module:
    """Undo `sparsify` in place (pruned weights stay zero): masked layers back to nn.Linear / nn.Conv2d, other
    weights' masks removed; returns `model`. The state dict then has the plain model's keys, so e.g. a
    torchvision model loads it strictly."""
    for module_name, module in list(model.named_modules()):
        for param_name, mask in owned_masks(module):
            if isinstance(mask, MaskedLayer) and module_name:
                mask.apply_mask_()
                _replace_child(model, module_name, _twin(mask, nn.Linear if isinstance(mask, nn.Linear) else nn.Conv2d))
            elif not isinstance(mask, MaskedLayer):
                unmask_weight_(module, param_name)
    return model


def density(model: nn.Module) -> Dict[str, Union[int, float, dict]]:
    """Per masked weight and in total: alive weights, size, and density (alive / size). "dense" lists the
    weights without a mask ({name: size}, None while a lazy one is uninitialized): never counted as pruned."""
    layers = {}
    alive_total = size_total = 0
    for name, module in untied_masked_modules(model):
        alive, size = alive_in(module.weight_mask), module.weight_mask.numel()
        layers[name] = {"alive": alive, "size": size, "density": alive / size if size else 1.0}
        alive_total += alive
        size_total += size
    dense = {k: (None if isinstance(p, nn.parameter.UninitializedParameter) else p.numel())
             for k, p in ((k, model.get_parameter(k)) for k in unmasked_weights(model))}
    return {"layers": layers, "alive": alive_total, "size": size_total,
            "density": alive_total / size_total if size_total else 1.0, "dense": dense}


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


def masks_in_state(model: nn.Module, state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """{mask name: mask} for every masked weight of `model`, read from its state dict `state`."""
    return {name: state[weight_key(name, layer) + "_mask"] for name, layer in masked_modules(model)}


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
