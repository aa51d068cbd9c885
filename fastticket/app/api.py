"""`fastticket.search`: a ticket search on a researcher's own model and data, from Python.

    result = fastticket.search(make_model, (train, val, test), "runs/mine", levels=3, iterations=500)
    result.rows  # the rows of report/results.csv: one per (level, arm)

It runs the engine the CLI runs (fastticket.lottery.search.run_search): the objects are served by
fastticket.lottery.sources, for the search's duration, under names the config records, so resume, the lock,
the checksums and the settings check work as for the built-in presets, and `fastticket report` reads the run
directory.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
from typing import Any, Callable, Dict, List, Tuple, Union

import torch
from torch import nn

from fastticket.errors import ConfigError
from fastticket.lottery import sources
from fastticket.lottery.config import SearchConfig
from fastticket.lottery.recipe import RECIPE_FIELDS

DATA_PREFIX = "<python>:data"  # the data handed to `search` are served under this plus what they are (never imported)



@dataclasses.dataclass
class SearchResult:
    run_dir: str
    rows: List[Dict[str, Any]]  # report/results.csv: one per (level, arm), accuracies in percent
    arms: List[Dict[str, Any]]  # every arm's result.json, in run order
    report_files: List[str]


def _module_factory(module: nn.Module, base_seed: int) -> Callable[[], nn.Module]:
    """A fresh copy of `module` per arm: its own weights under the base seed (trial 0's ticket and random
    control); under any other seed (other trials, reinit controls) every layer's reset_parameters draws new
    ones."""
    def fresh() -> nn.Module:
        model = copy.deepcopy(module)
        if torch.initial_seed() != base_seed:  # build_masked_model seeds torch with the arm's init seed
            for m in model.modules():
                if hasattr(m, "reset_parameters"):
                    m.reset_parameters()
        return model
    return fresh


def _model_source(model: Any, base_seed: int) -> Tuple[str, Callable[[], nn.Module], str]:
    """(config name, source, hash) of the model: a zero-argument function or an nn.Module."""
    if isinstance(model, nn.Module):
        cls = type(model)
        h = hashlib.sha256(sources.source_hash(cls).encode())
        for value in model.state_dict().values():
            h.update(value.detach().cpu().contiguous().numpy().tobytes())
        return f"{cls.__module__}:{cls.__qualname__}()", _module_factory(model, base_seed), "sha256:" + h.hexdigest()
    if not callable(model):
        raise ConfigError(f"model must be a function returning a fresh nn.Module, or an nn.Module, got "
                          f"{type(model).__name__}")
    return _function_name(model), model, sources.source_hash(model)


def _function_name(fn: Callable[..., Any]) -> str:
    """What config.json calls a function handed to `search`: its module and qualified name."""
    return f"{getattr(fn, '__module__', None) or '<python>'}:{getattr(fn, '__qualname__', repr(fn))}"


def _describe(split: Any) -> str:
    """One split in a few words: a Dataset's class and length, or tensors' shape."""
    if split is None:
        return "None"
    if isinstance(split, tuple):
        return f"tensors{list(split[0].shape)}"
    return f"{type(split).__name__}(n={len(split)})"


def data_name(splits: sources.Splits, digest: str) -> str:
    """The config's dataset name for the API's data: what each split is and a prefix of their content hash, so
    two runs on different data read differently in config.json and the report (the full hash goes into
    config.sources, which a resume checks)."""
    return f"{DATA_PREFIX}[{', '.join(_describe(s) for s in splits)}]@{digest.split(':')[-1][:12]}"


def search(model: Union[Callable[[], nn.Module], nn.Module], data: Any, out_dir: str, *, resume: bool = False,
           progress: bool = True, **settings: Any) -> SearchResult:
    """Run (or, with resume=True, continue) a ticket search of `model` on `data` = (train, val, test) into
    `out_dir`, then write its report; `settings` are SearchConfig fields by name (see `fastticket search
    --help`). `val` None: early stopping takes the last evaluation. `progress`: one line per evaluation on
    stderr (False: only messages)."""
    from fastticket.lottery.progress import LogLines
    from fastticket.app.report import aggregate, collect_results, make_report
    from fastticket.lottery.search import run_search

    if "val_size" in settings:  # the built-in datasets' hold-out; a user's val split is theirs to give
        raise ConfigError("val_size= applies to the built-in datasets only; pass your validation split as "
                          "data=(train, val, test) (val=None: early stopping takes the last evaluation)")
    for key in ("dataset", "sources"):  # model= is the first argument (Python refuses it twice)
        if key in settings:
            raise ConfigError(f"{key}= is set by search() itself (model and data are its first arguments)")
    fields = {f.name for f in dataclasses.fields(SearchConfig)}
    unknown = sorted(set(settings) - fields)
    if unknown:
        raise ConfigError(f"unknown setting(s) {', '.join(unknown)}; settings are SearchConfig fields: "
                          f"{', '.join(sorted(fields - {'model', 'dataset', 'sources'}))}")
    # The recipe's functions (optimizer, lr_scheduler, loss: fastticket.lottery.recipe) are served by name.
    served = {}
    for key in RECIPE_FIELDS:
        fn = settings.get(key)
        if callable(fn):
            settings[key] = _function_name(fn)
            served[settings[key]] = (fn, sources.source_hash(fn))
    base = SearchConfig(**settings)
    splits = sources.split_tensors(data, class_labels=base.loss is None)  # converted (and checked) once, here
    name, source, digest = _model_source(model, base.seed)
    data_digest = sources.tensors_hash(splits)
    data_key = data_name(splits, data_digest)
    config = base.replace(model=name, dataset=data_key)
    with sources.serving({name: (source, digest), data_key: (lambda: splits, data_digest), **served}):
        arms = run_search(config, out_dir, resume=resume, progress=LogLines() if progress else None)
    files = make_report(out_dir)
    return SearchResult(out_dir, aggregate(collect_results(out_dir)), arms, files)
