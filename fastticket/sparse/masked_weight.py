"""A mask on any floating-point weight of any module, and what every mask shares (checks, load hooks).

Exact nn.Linear / nn.Conv2d become MaskedLinear / MaskedConv2d (fastticket.sparse.nn), whose forward runs the
Triton kernels. Every other weight (Conv1d/Conv3d/ConvTranspose, Embedding, Bilinear, nn.MultiheadAttention's
`in_proj_weight`, the weight of a Linear subclass, a user layer's parameter) keeps its module, class and forward:
`mask_weight_(module, name)` registers the bool buffer `{name}_mask` beside the parameter and a gradient hook on
the Parameter itself. The gradient is thus masked wherever the parameter is used, whether or not the module's
own forward runs (MHA hands `out_proj.weight` to the functional attention without calling `out_proj`), and
pruned entries are exact zeros in storage, so the dense forward is exact (docs/architecture.md, "The
invariant"). A `MaskedWeight` handle carries the same `weight` / `weight_mask` / `set_mask_` / ... as a masked
layer, so pruning, counting, rewinding and the masked optimizers treat both alike.

Loading a state dict checks every mask it holds like `set_mask_` (0/1 only) and warns, once per load of a
sparsified model, when the loaded masks would revive pruned weights (rewind with `fastticket.rewind_to`).
`torch.nn.utils.prune` registers its own float `weight_mask` under the same name: that is refused in one line
(torch then rolls its re-parametrization back), so fastticket's mask is never silently overwritten.
"""
from __future__ import annotations

import warnings
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from fastticket.errors import MaskError
from fastticket.sparse import _mask_registry, _premasked
from fastticket.sparse.functional import optimizer_masks_gradients

MASKS_ATTR = "_fastticket_masks"  # in a module's __dict__: its _ModuleMasks


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
                        f"{bad[0] if bad else 'a complex value'} in {owner}; threshold it explicitly, e.g. mask > 0.5")
    return mask != 0


def refuse_foreign_mask(key: str, value: object) -> None:
    """A MaskError unless `value` may replace the mask buffer `key` (a bool tensor: `.to()`, functional_call)."""
    if not (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        raise MaskError(f"buffer {key!r} is fastticket's mask and would be replaced by a "
                        f"{getattr(value, 'dtype', type(value).__name__)} tensor (torch.nn.utils.prune uses the same "
                        f"name): prune with fastticket.lottery.prune or the layer's set_mask_, or densify first")


def alive_in(mask: torch.Tensor) -> int:
    """The number of kept entries of a mask."""
    if mask.is_meta:  # counting it would raise a bare NotImplementedError
        raise ValueError("a weight mask is on the meta device (shapes only, no values): materialise the model "
                         "(model.to_empty(device=...) and set its masks) before counting or training it")
    return int(mask.sum())


class MaskOps:
    """What every mask offers, over `weight`, `weight_mask` and `mask_version` (MaskedLayer, MaskedWeight)."""

    weight: torch.Tensor
    weight_mask: torch.Tensor
    mask_version: int
    param_name = "weight"

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
        self.weight_mask.copy_(check_mask(mask, tuple(self.weight.shape), type(self).__name__))
        return self.mask_changed_()

    def mask_changed_(self):
        """Call after editing `weight_mask` in place: re-zeroes weights and invalidates cached tile maps."""
        self.mask_version += 1
        return self.apply_mask_()

    def density(self) -> float:
        """Alive / size of the mask (1.0 for a zero-size weight: nothing in it is pruned)."""
        return alive_in(self.weight_mask) / self.weight_mask.numel() if self.weight_mask.numel() else 1.0


class MaskGradient:
    """The gradient hook of a masked Parameter (`handle`: anything with `weight_mask`): zeroes the gradient of
    pruned entries. Not serialized (torch warns for hooks it cannot save): a copy registers its own."""

    __torch_unserializable__ = True
    masks_gradient = True  # read by fastticket.sparse.linear: a dW is then masked once (here, or in the kernel)

    def __init__(self, handle: "MaskedWeight") -> None:
        self.handle = handle

    def __call__(self, grad: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        # None: the dW+update fusion applied the (masked) update inside the backward and left no gradient.
        if grad is None or optimizer_masks_gradients() or _premasked.take(grad):
            return grad
        return grad.masked_fill(~self.handle.weight_mask, 0)


class MaskedWeight(MaskOps):
    """The mask of one parameter `param_name` of `module` (see the module docstring); held by the module."""

    def __init__(self, module: nn.Module, param_name: str) -> None:
        self.module, self.param_name, self.mask_version = module, param_name, 0
        self._param = module._parameters[param_name]
        self._attach()

    def _attach(self) -> None:
        self._hook = self._param.register_hook(MaskGradient(self))
        _mask_registry.register_layer(self)  # lets fastticket.sparse.optim find this weight's mask by itself

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_hook"}

    def __setstate__(self, state: dict) -> None:
        # deepcopy, pickle and torch.load restore the handle before its module is complete, but with the very
        # Parameter object the copy will hold: hook that one.
        self.__dict__.update(state)
        self._attach()

    @property
    def weight(self) -> torch.Tensor:
        return self.module._parameters[self.param_name]

    @property
    def weight_mask(self) -> torch.Tensor:
        return self.module._buffers[self.param_name + "_mask"]

    def detach_(self) -> None:
        """Remove the gradient hook (the mask buffer is removed by `unmask_weight_`)."""
        self._hook.remove()

    def __repr__(self) -> str:
        return f"MaskedWeight({type(self.module).__name__}.{self.param_name}, density={self.density():.4f})"


class _MaskBuffers(dict):
    """The buffers of a module holding MaskedWeights: a mask may only be replaced by a bool tensor."""

    def __setitem__(self, key: str, value) -> None:
        if key in self.__dict__.get("masks", ()):
            refuse_foreign_mask(key, value)
        super().__setitem__(key, value)


class _ModuleMasks:
    """A module's MaskedWeights by parameter name, and the load hooks they share."""

    def __init__(self, module: nn.Module) -> None:
        self.weights: Dict[str, MaskedWeight] = {}
        self.hooks = [module._register_load_state_dict_pre_hook(check_loaded_masks, with_module=True),
                      module.register_load_state_dict_post_hook(reapply_masks_after_load)]


def owned_masks(module: nn.Module) -> List[Tuple[str, MaskOps]]:
    """(parameter name, mask) for every mask `module` itself holds (a MaskedLayer's, then its MaskedWeights)."""
    record = module.__dict__.get(MASKS_ATTR)
    own: List[Tuple[str, MaskOps]] = [("weight", module)] if isinstance(module, MaskOps) else []
    return own + (list(record.weights.items()) if record is not None else [])


def mask_weight_(module: nn.Module, name: str = "weight") -> MaskedWeight:
    """Mask the floating-point parameter `module.<name>` (all-ones mask `<name>_mask`); returns its handle."""
    param = module._parameters.get(name)
    if not isinstance(param, nn.Parameter) or not param.is_floating_point():
        raise MaskError(f"{type(module).__name__}.{name} is not a floating-point Parameter, so it cannot carry a mask")
    if isinstance(param, nn.parameter.UninitializedParameter):
        raise MaskError(f"{type(module).__name__}.{name} is not initialized yet (lazy module): run one forward, "
                        f"then mask it")
    if isinstance(module, MaskOps) and name == "weight":
        raise MaskError(f"{type(module).__name__}.weight is masked already (its own weight_mask)")
    record = module.__dict__.get(MASKS_ATTR)
    if record is None:
        record = module.__dict__[MASKS_ATTR] = _ModuleMasks(module)
        module._buffers = _MaskBuffers(module._buffers)
    if name in record.weights:
        return record.weights[name]
    module.register_buffer(name + "_mask", torch.ones_like(param, dtype=torch.bool))
    module._buffers.masks = {*module._buffers.__dict__.get("masks", ()), name + "_mask"}
    handle = record.weights[name] = MaskedWeight(module, name)
    return handle


def unmask_weight_(module: nn.Module, name: str) -> None:
    """Undo `mask_weight_` (pruned weights stay zero): the buffer, the hook and, with the last mask, the hooks."""
    record = module.__dict__[MASKS_ATTR]
    handle = record.weights.pop(name)
    handle.apply_mask_()
    handle.detach_()
    module._buffers.masks = module._buffers.masks - {name + "_mask"}
    del module._buffers[name + "_mask"]
    if not record.weights:
        for hook in record.hooks:
            hook.remove()
        module._buffers = dict(module._buffers)
        del module.__dict__[MASKS_ATTR]


# ------------------------------------------------------------------------------------------ loading state dicts

# While the load_state_dict of a sparsified model runs: how many pruned weights its loaded masks revive (one
# warning for the whole load); None outside such a load (a lone masked layer warns by itself).
_revived: Optional[List[int]] = None


def _warn_revived(count: int) -> None:
    warnings.warn(f"load_state_dict revived {count} pruned weight(s): the loaded masks keep weights the current masks "
                  f"prune. To rewind weights and keep the masks use fastticket.rewind_to(model, state)", stacklevel=4)


def begin_load(*args) -> None:
    global _revived
    _revived = [0]


def end_load(module: nn.Module, incompatible_keys) -> None:
    global _revived
    count, _revived = (_revived or [0])[0], None
    if count:
        _warn_revived(count)


def check_loaded_masks(module: nn.Module, state_dict, prefix: str, *args) -> None:
    """Load pre-hook: the loaded masks of `module` as bool (MaskError for anything but 0/1), counting revivals.
    Wrong shapes and missing keys are left to load_state_dict's own report."""
    global _revived
    for name, mask in owned_masks(module):
        key = f"{prefix}{name}_mask"
        loaded = state_dict.get(key)
        if not isinstance(loaded, torch.Tensor) or tuple(loaded.shape) != tuple(mask.weight_mask.shape):
            continue
        try:
            loaded = state_dict[key] = check_mask(loaded, tuple(loaded.shape), f"the loaded state's {key!r}")
        except MaskError:
            _revived = None
            raise
        revived = int((loaded.to(mask.weight_mask.device) & ~mask.weight_mask).sum())
        if revived and _revived is not None:
            _revived[0] += revived
        elif revived:
            _warn_revived(revived)


def reapply_masks_after_load(module: nn.Module, incompatible_keys) -> None:
    for _, mask in owned_masks(module):
        mask.mask_changed_()


def watch_loads(model: nn.Module) -> None:
    """Count the revivals of one `model.load_state_dict` together (registered once, by sparsify)."""
    if not model.__dict__.get("_fastticket_watches_loads"):
        model._register_load_state_dict_pre_hook(begin_load)
        model.register_load_state_dict_post_hook(end_load)
        model.__dict__["_fastticket_watches_loads"] = True
