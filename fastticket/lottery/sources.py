"""A researcher's own model and data in a search: user functions and datasets behind the config's names.

A config's `model` or `dataset` that contains ':' (and is not `torchvision:<name>`) names a user source:
`PKG.MODULE:FUNCTION`, imported on use, or a name the Python API (fastticket.app.api) serves here for an
object it was handed (a lambda, an nn.Module, tensors), looked up first. A model function takes no
arguments and returns a fresh nn.Module (called under the arm's seed); a data function returns
`(train, val, test)`, each a `(inputs, labels)` pair of tensors or a map-style Dataset of (input, label)
pairs, `val` may be None. The data go to the device once, as the built-in datasets do (`to_device_data`),
except a training Dataset with a transform or too large for the device, which streams through a DataLoader
(fastticket.lottery.streams) with its transforms run per batch.

Resume safety: `recorded` puts a hash of each user source into the config's `sources` field (config.json),
so a resume with a changed function is refused (fastticket.lottery.rundir names it).
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
import os
import tokenize
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import torch
from torch import nn

from fastticket.errors import ConfigError
from fastticket.lottery.config import USER_FIELDS
from fastticket.lottery.data import DatasetInfo, DeviceData, Split
from fastticket.lottery.models import TORCHVISION_PREFIX
from fastticket.lottery.streams import seeded_item

# What may go to the device whole (float32 inputs): a larger training set streams (fastticket.lottery.streams).
MAX_DEVICE_BYTES = 4 << 30

_REGISTERED: Dict[str, Tuple[Callable[[], Any], str]] = {}  # name -> (source, its hash)


def is_user(name: str) -> bool:
    """Does a config's model or dataset name a user source (`PKG.MODULE:FUNCTION` or a name being served)?"""
    return ":" in name and not name.startswith(TORCHVISION_PREFIX)


@contextlib.contextmanager
def serving(served: Dict[str, Tuple[Callable[[], Any], str]]) -> Iterator[None]:
    """Within the block, serve each name from its (source, hash) (the Python API's objects): looked up before
    any import, and gone afterwards, so no later search of this process finds them."""
    before = {name: _REGISTERED.get(name) for name in served}
    _REGISTERED.update(served)
    try:
        yield
    finally:
        for name, old in before.items():
            if old is None:
                _REGISTERED.pop(name, None)
            else:
                _REGISTERED[name] = old


def source_hash(obj: Any) -> str:
    """sha256 of a function's (or class's) source; of its code when the source is not on disk or is a lambda's
    (whose source is the whole line around it)."""
    code = getattr(obj, "__code__", None)
    try:
        if code is not None and obj.__name__ == "<lambda>":
            raise TypeError("a lambda")
        text = inspect.getsource(obj).encode()
    except (OSError, TypeError, SyntaxError, tokenize.TokenError):  # the file on disk is not the code's source
        text = (code.co_code + repr((code.co_consts, code.co_names)).encode()) if code is not None else \
            repr(obj).encode()
    return "sha256:" + hashlib.sha256(text).hexdigest()


def resolve(name: str) -> Tuple[Callable[[], Any], str]:
    """(the source's function, its hash) for a user name; ConfigError (one line) when it cannot be found."""
    if name in _REGISTERED:
        return _REGISTERED[name]
    module_name, _, attr = name.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"cannot import {module_name!r} for {name!r} ({exc}); give PKG.MODULE:FUNCTION with the "
                          f"module on PYTHONPATH") from None
    for part in attr.split("."):
        obj = getattr(obj, part, None)
    if not callable(obj):
        raise ConfigError(f"{name!r}: {module_name} has no function {attr!r}; give PKG.MODULE:FUNCTION")
    return obj, source_hash(obj)


def recorded(config: Any) -> Any:
    """`config` with the hash of each user source in `sources` ({"model": ..., "dataset": ..., "loss": ...})."""
    hashes = {key: resolve(getattr(config, key))[1] for key in USER_FIELDS
              if getattr(config, key) is not None and is_user(getattr(config, key))}
    return config.replace(sources=hashes) if hashes != config.sources else config


def build_user_model(name: str) -> nn.Module:
    """A fresh model from the user's function (the caller seeds torch's RNG)."""
    fn, _ = resolve(name)
    model = fn()
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model function {name} returned {type(model).__name__}, not an nn.Module")
    return model


# ---- data ---------------------------------------------------------------------------------------------------

Splits = Tuple[Any, Optional[Tuple[torch.Tensor, torch.Tensor]], Tuple[torch.Tensor, torch.Tensor]]


def _as_tensors(split: Any, what: str, may_stream: bool = False, class_labels: bool = True) -> Any:
    """A split as (inputs float32, labels int64) on the CPU; with `may_stream` (the training split) a Dataset
    with a transform (it may augment: run it per batch) or too large for the device stays the Dataset.
    `class_labels` False (a user's loss): labels may be any tensors with one row per input, kept as they are."""
    if isinstance(split, (tuple, list)) and len(split) == 2 and all(torch.is_tensor(t) for t in split):
        x, y = split
    elif hasattr(split, "__getitem__") and hasattr(split, "__len__"):
        n = len(split)
        if n == 0:
            raise ConfigError(f"the {what} split is empty")
        first = seeded_item(split, 0, 0)
        if not (isinstance(first, (tuple, list)) and len(first) == 2 and torch.is_tensor(first[0])):
            raise ConfigError(f"the {what} dataset's items must be (input tensor, label) pairs, got "
                              f"{type(first).__name__}")
        large = n * first[0].numel() * 4 > MAX_DEVICE_BYTES
        if may_stream and (large or getattr(split, "transform", None) is not None):
            return split
        if large:
            raise ConfigError(f"the {what} dataset ({n} examples of {tuple(first[0].shape)}) is too large to hold on "
                              f"the device (only the training split streams): pass a smaller one")
        # Converted once, each item under its own seed: a random transform gives the same tensors every time.
        items = [seeded_item(split, i, i) for i in range(n)]
        x = torch.stack([torch.as_tensor(a) for a, _ in items])
        y = (torch.as_tensor([int(b) for _, b in items]) if class_labels
             else torch.stack([torch.as_tensor(b) for _, b in items]))
    else:
        raise ConfigError(f"the {what} split must be (inputs, labels) tensors or a map-style Dataset of "
                          f"(input, label) pairs, got {type(split).__name__}")
    if not class_labels:
        if y.dim() == 0 or x.shape[0] != y.shape[0]:
            raise ConfigError(f"the {what} split needs one label per input (labels' first dimension = the inputs'), "
                              f"got inputs {tuple(x.shape)} and labels {tuple(y.shape)}")
        return x.float().cpu(), (y.float() if y.is_floating_point() else y.long()).cpu()
    if y.dim() != 1 or x.shape[0] != y.shape[0] or y.is_floating_point():
        raise ConfigError(f"the {what} split needs integer class labels of shape [N] matching the inputs' first "
                          f"dimension (or a loss= function for other targets), got inputs {tuple(x.shape)} and "
                          f"labels {tuple(y.shape)} ({y.dtype})")
    return x.float().cpu(), y.long().cpu()


def split_tensors(data: Any, class_labels: bool = True) -> Splits:
    """`(train, val, test)` as CPU tensor pairs (val None stays None; train may stay a Dataset to stream);
    `class_labels` as in `_as_tensors`."""
    if not (isinstance(data, (tuple, list)) and len(data) == 3):
        raise ConfigError(f"data must be (train, val, test) (val may be None), got {type(data).__name__}"
                          f"{'' if not isinstance(data, (tuple, list)) else f' of {len(data)} items'}")
    train, val, test = data
    return (_as_tensors(train, "train", True, class_labels),
            None if val is None else _as_tensors(val, "val", False, class_labels),
            _as_tensors(test, "test", False, class_labels))


def tensors_hash(splits: Splits) -> str:
    """sha256 over the splits' values (the Python API's data: the data are the source); of a streamed
    Dataset, over its class's source, length and transform."""
    h = hashlib.sha256()
    for split in splits:
        if split is not None and not isinstance(split, tuple):
            h.update(f"{source_hash(type(split))} {len(split)} {getattr(split, 'transform', None)!r}".encode())
            continue
        for t in split or ():
            h.update(str(tuple(t.shape)).encode())
            h.update(t.contiguous().numpy().tobytes())
    return "sha256:" + h.hexdigest()


def to_device_data(name: str, device: torch.device, class_labels: bool = True) -> DeviceData:
    """The user's data, from their function (or the API's tensors), held whole on `device`; `class_labels` as
    in `_as_tensors` (False: the class count is 0, models come from the user anyway)."""
    from fastticket.lottery.streams import Head, StreamData
    fn, _ = resolve(name)
    train, val, (xs, ys) = split_tensors(fn(), class_labels)
    streamed = not isinstance(train, tuple)
    # A streamed set's first examples (for the checks before training), drawn seeded: the global RNG is left alone.
    xt, yt = (_as_tensors([seeded_item(train, i, i) for i in range(2)], "train", False, class_labels) if streamed
              else train)
    if val is None:  # no validation split: every val loss is NaN, so early stopping takes the last evaluation
        val = (xt[:0], yt[:0])
    classes = 0
    if class_labels:
        labels = [yt.max(), ys.max(), val[1].max() if len(val[1]) else 0]
        if streamed and hasattr(train, "targets"):  # torchvision datasets list their labels
            labels.append(max(int(t) for t in train.targets))
        classes = int(max(labels)) + 1
    info = DatasetInfo(name, tuple(xt.shape[1:]), classes)  # type: ignore[arg-type]
    splits = Split(val[0].to(device), val[1].to(device)), Split(xs.to(device), ys.to(device))
    if streamed:
        # Workers on CUDA (the host prepares batches while the GPU trains); on a CPU they would compete.
        workers = min(4, (os.cpu_count() or 1) // 2) if device.type == "cuda" else 0
        return StreamData(info, Head(xt.to(device), yt.to(device), n=len(train)), *splits, augment=False,
                          dataset=train, workers=workers)
    return DeviceData(info, Split(xt.to(device), yt.to(device)), *splits, augment=False)

