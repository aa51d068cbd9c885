"""How `fastticket search` spells each SearchConfig field on the command line: the flags, their argparse types
(each a one-line error that says what was wrong), and the check that no field is forgotten."""
from __future__ import annotations

import argparse
import dataclasses
import math
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, get_args

from fastticket.errors import ConfigError
from fastticket.lottery.arms import CONTROLS
from fastticket.lottery.config import (REWIND_MODES, DistBackend, DistributedMode, SearchConfig, check_early_bird,
                                       check_rate, check_stability, parse_granularity, parse_refill)


def _positive_int(text: str) -> int:
    value = _int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _nonneg_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def _checked_number(check: Callable[[float], float]) -> Callable[[str], float]:
    """An argparse type: a number the config's own range check accepts (its message is the error)."""
    def parse(text: str) -> float:
        value = _float(text)
        try:
            return check(value)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return parse


_rate = _checked_number(lambda value: check_rate(value, "rate"))
_early_bird = _checked_number(check_early_bird)


def _positive_float(text: str) -> float:
    value = _float(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a finite positive number, got {text}")
    return value


def _controls(text: str) -> Tuple[str, ...]:
    if text.strip().lower() in ("none", ""):
        return ()
    items = [c.strip() for c in text.split(",") if c.strip()]
    bad = [c for c in items if c not in CONTROLS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown control(s) {bad}; use a comma list of {', '.join(CONTROLS)} "
                                         f"(e.g. reinit,random,snip) or none")
    return tuple(dict.fromkeys(items))


def _checked_by(parse: Callable[[str], Any]) -> Callable[[str], str]:
    """An argparse type that keeps the flag's text once the config's own parser accepts it."""
    def check(text: str) -> str:
        try:
            parse(text)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return text
    return check


_granularity = _checked_by(parse_granularity)


def _one_of(values: Sequence[str]) -> Callable[[str], str]:
    def check(text: str) -> str:
        if text not in values:
            raise argparse.ArgumentTypeError(f"must be one of {', '.join(values)}, got {text!r}")
        return text
    return check


_refill = _checked_by(parse_refill)


def _stability(text: str) -> int:
    try:
        return check_stability(int(text)) or 0
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number of interpolation points: {text!r}") from None
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


@dataclasses.dataclass(frozen=True)
class Flag:
    """How a SearchConfig field appears on the command line: --field-name METAVAR, parsed by `type`; the help
    text is the field's own (its `help` metadata)."""

    metavar: str
    type: Optional[Callable[[str], Any]] = None
    switch: bool = False  # a flag without a value (sets the field True)
    const: Any = None     # not None: the value may be left out (`--flag` alone takes this one)


# `fastticket search` flags, in --help order: config field -> flag. Every SearchConfig field is either here or in
# NOT_FLAGS (build_parser refuses a field in neither), so a new field cannot be forgotten by the CLI.
SEARCH_FLAGS: Dict[str, Flag] = {
    "model": Flag("NAME"), "dataset": Flag("NAME"), "data_dir": Flag("DIR"), "levels": Flag("N", _nonneg_int),
    "rate": Flag("R", _rate), "iterations": Flag("N", _positive_int), "batch_size": Flag("N", _positive_int),
    "lr": Flag("LR", _positive_float), "eval_every": Flag("N", _positive_int), "rewind_iter": Flag("K", _nonneg_int),
    "rewind": Flag("MODE", _one_of(REWIND_MODES)), "refill": Flag("block:RxC", _refill),
    "early_bird": Flag("EPS", _early_bird),
    "stability": Flag("N", _stability, const=30),
    "controls": Flag("LIST", _controls), "trials": Flag("T", _positive_int), "granularity": Flag("G", _granularity),
    "device": Flag("DEV"), "seed": Flag("S", _int), "reinits": Flag("R", _positive_int),
    "compile": Flag("", switch=True),
    "cuda_graph": Flag("", switch=True),
    "parallel_arms": Flag("N", _nonneg_int),
    "distributed": Flag("MODE", _one_of(get_args(DistributedMode))),
    "dist_backend": Flag("B", _one_of(get_args(DistBackend))),
    "dist_timeout": Flag("S", _positive_float),
    # --controls rigl,set (the range checks of the fractions are SearchConfig's)
    "dst_interval": Flag("N", _positive_int), "dst_drop_fraction": Flag("F", _positive_float),
    "dst_end": Flag("F", _positive_float),
}
# Fields only a preset sets (the paper's training recipe and pruning layout travel together in a preset), and
# the recorded ones.
NOT_FLAGS = frozenset({"val_size", "optimizer", "lr_scheduler", "loss", "momentum", "weight_decay", "lr_milestones", "lr_gamma",
                       "warmup_iters", "augment", "scope", "conv_rate", "output_rate", "exclude", "criterion",
                       # set through FASTTICKET_BACKEND / FASTTICKET_DENSE_THRESHOLD_<OP>, recorded by the search
                       "backend", "dense_thresholds", "sources"})


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def config_fields() -> Dict[str, dataclasses.Field]:
    fields = {f.name: f for f in dataclasses.fields(SearchConfig)}
    missing = sorted(set(fields) - set(SEARCH_FLAGS) - NOT_FLAGS)
    unknown = sorted((set(SEARCH_FLAGS) | NOT_FLAGS) - set(fields))
    if missing or unknown:
        raise RuntimeError(f"cli.SEARCH_FLAGS / NOT_FLAGS are out of date with SearchConfig: fields without a flag "
                           f"or a NOT_FLAGS entry {missing}, entries naming no field {unknown}")
    return fields
