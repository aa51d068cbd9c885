"""The run directory of a search: its layout, the resume checks, and every file read or written in it.

    root/config.json
    root/levels/level_{L:02d}/{arm}_trial{t}/
        mask.pt         {layer name: bool mask}
        rewind.pt       (ticket arm) the rewind-point state dict
        metrics.jsonl   one line per evaluation: iteration, train_loss, val_loss, val_acc, test_acc
        checkpoint.pt   rolling (every eval_every iterations): model, optimizer, iteration, metrics so far
        final.pt        the final state dict (weights and masks)
        result.json     written last: the arm is finished
    root/report/        tables and plots (fastticket.report)

Every write is atomic (fastticket.atomic_io): a reader or a resumed run sees a whole file or none. Nothing
outside this module builds a path into a run directory.
"""
from __future__ import annotations

import glob
import json
import os
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from fastticket.atomic_io import atomic_save, atomic_write_json, atomic_write_text, remove_stale_temps
from fastticket.config import SearchConfig
from fastticket.errors import MaskError, RunDirError
from fastticket.nn import load_mask_file

CONFIG_FILE = "config.json"


def _load(path: str) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)


def _config_dict(config: SearchConfig) -> Dict[str, Any]:
    # Through JSON so tuples/lists and ints/floats compare the way they will after a reload.
    return json.loads(config.to_json())


class ArmDir:
    """One arm's directory: levels/level_LL/ARM_trialT."""

    def __init__(self, path: str, level: int, arm: str, trial: int) -> None:
        self.path, self.level, self.arm, self.trial = path, level, arm, trial

    def _file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def open(self) -> "ArmDir":
        """Create the directory (if needed) and drop temp files a killed writer left in it."""
        os.makedirs(self.path, exist_ok=True)
        remove_stale_temps(self.path)
        return self

    # masks
    def has_mask(self) -> bool:
        return os.path.exists(self._file("mask.pt"))

    def save_mask(self, masks: Dict[str, torch.Tensor]) -> None:
        atomic_save(masks, self._file("mask.pt"))

    def load_mask(self, model: nn.Module) -> Dict[str, torch.Tensor]:
        """The saved mask, checked against `model` (a MaskError names the file if it does not fit)."""
        return load_mask_file(self._file("mask.pt"), model)

    # rewind point
    def has_rewind(self) -> bool:
        return os.path.exists(self._file("rewind.pt"))

    def save_rewind(self, state: Dict[str, torch.Tensor]) -> None:
        atomic_save(state, self._file("rewind.pt"))

    def load_rewind(self) -> Dict[str, torch.Tensor]:
        return _load(self._file("rewind.pt"))

    # metrics
    def write_metrics(self, metrics: List[Dict[str, float]]) -> None:
        atomic_write_text(self._file("metrics.jsonl"), "".join(json.dumps(m, sort_keys=True) + "\n" for m in metrics))

    def read_metrics(self) -> List[Dict[str, Any]]:
        """The evaluations recorded so far; a torn last line (a killed writer) is skipped."""
        entries: List[Dict[str, Any]] = []
        path = self._file("metrics.jsonl")
        if not os.path.exists(path):
            return entries
        with open(path) as f:
            for line in f:
                try:
                    entries.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return entries

    # checkpoint
    def has_checkpoint(self) -> bool:
        return os.path.exists(self._file("checkpoint.pt"))

    def save_checkpoint(self, state: Dict[str, Any]) -> None:
        atomic_save(state, self._file("checkpoint.pt"))

    def load_checkpoint(self) -> Dict[str, Any]:
        return _load(self._file("checkpoint.pt"))

    def checkpoint_error(self, exc: BaseException) -> MaskError:
        """The error for a checkpoint that does not fit the model."""
        first = str(exc).splitlines()[0] if str(exc) else ""
        return MaskError(f"checkpoint {self._file('checkpoint.pt')} does not fit the model ({type(exc).__name__}: "
                         f"{first}); corrupted or from another run".replace("\n", " "))

    # final weights
    def save_final(self, state: Dict[str, torch.Tensor]) -> None:
        atomic_save(state, self._file("final.pt"))

    def load_final_into(self, model: nn.Module) -> None:
        path = self._file("final.pt")
        try:
            model.load_state_dict(_load(path))
        except RuntimeError as exc:
            raise MaskError(f"{path} does not fit the model ({str(exc).splitlines()[0]}); corrupted or from "
                            f"another run") from None

    # result
    def write_result(self, result: Dict[str, Any]) -> None:
        atomic_write_json(self._file("result.json"), result)

    def read_result(self) -> Optional[Dict[str, Any]]:
        """result.json, or None while the arm is unfinished."""
        path = self._file("result.json")
        if not os.path.exists(path):
            return None
        with open(path) as f:
            return json.load(f)


class RunDir:
    """A search's output directory (see the module docstring for its layout)."""

    def __init__(self, root: str) -> None:
        self.root = root

    @property
    def config_path(self) -> str:
        return os.path.join(self.root, CONFIG_FILE)

    @property
    def report_dir(self) -> str:
        return os.path.join(self.root, "report")

    def arm(self, level: int, arm: str, trial: int) -> ArmDir:
        return ArmDir(os.path.join(self.root, "levels", f"level_{level:02d}", f"{arm}_trial{trial}"), level, arm,
                      trial)

    def prepare(self, config: SearchConfig, resume: bool, create: bool = True) -> None:
        """Create the directory with config.json, or check that an existing run matches `config` (resume).

        create=False only checks (nothing is written), so a search that fails later (missing data) leaves no
        half-made run directory that a corrected command would then refuse.
        """
        out_dir, config_path = self.root, self.config_path
        if os.path.isdir(out_dir) and os.listdir(out_dir):
            if not resume:
                raise RunDirError(f"output directory {out_dir} is not empty; pass --resume to continue that run "
                                  f"or choose another --out")
            if not os.path.exists(config_path):
                raise RunDirError(f"cannot resume {out_dir}: it has no config.json, so it is not a fastticket run "
                                  f"directory; choose another --out")
            try:
                with open(config_path) as f:
                    saved = json.load(f)
            except (OSError, ValueError) as exc:
                raise RunDirError(f"cannot resume {out_dir}: config.json is unreadable ({exc})") from None
            current = _config_dict(config)
            differ = sorted(k for k in set(saved) | set(current)
                            if saved.get(k, "<absent>") != current.get(k, "<absent>"))
            if differ:
                details = "; ".join(f"{k}: run has {saved.get(k, '<absent>')!r}, now {current.get(k, '<absent>')!r}"
                                    for k in differ)
                raise RunDirError(f"cannot resume {out_dir}: the configuration differs from its config.json in "
                                  f"{', '.join(differ)} ({details}); use the run's settings or choose another --out")
            return
        if create:
            os.makedirs(out_dir, exist_ok=True)
            atomic_write_text(config_path, config.to_json() + "\n")

    def read_config(self) -> Dict[str, Any]:
        """config.json as a plain dict ({} when there is none)."""
        if not os.path.exists(self.config_path):
            return {}
        with open(self.config_path) as f:
            return json.load(f)

    def results(self) -> List[Dict[str, Any]]:
        """Every readable result.json (finished arms), unsorted; each also carries "path": its arm directory."""
        results = []
        for path in glob.glob(os.path.join(self.root, "levels", "level_*", "*", "result.json")):
            try:
                with open(path) as f:
                    result = json.load(f)
            except (OSError, json.JSONDecodeError):
                continue  # a level still being written by a live search is simply not finished yet
            result["path"] = os.path.dirname(path)
            results.append(result)
        return results


def arm_dir(out_dir: str, level: int, arm: str, trial: int) -> str:
    """The path of one arm's directory in the run directory `out_dir`."""
    return RunDir(out_dir).arm(level, arm, trial).path
