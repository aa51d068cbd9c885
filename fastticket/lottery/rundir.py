"""The run directory of a search: its layout, the resume checks, and every file read or written in it.

    root/config.json
    root/levels/level_{L:02d}/{arm}_trial{t}/     ({arm}{r+1}_trial{t} for the r-th extra control, r >= 1)
        mask.pt         {layer name: bool mask}
        rewind.pt       (ticket arm) the rewind-point state dict
        metrics.jsonl   one line per evaluation: iteration, train_loss, val_loss, val_acc, test_acc
        checkpoint.pt   rolling (every eval_every iterations): model, optimizer, iteration, metrics so far
        final.pt        the final state dict (weights and masks)
        result.json     written last: the arm is finished (its checkpoint.pt is then dropped)
        checksums.json  per file above (metrics.jsonl aside): sha256, size and the arm it belongs to
    root/.lock          held (flock) by the process working in the directory
    root/report/        tables and plots (fastticket.app.report)

Every write is atomic (fastticket.lottery.atomic_io): a reader or a resumed run sees a whole file or none. Every file
read back is verified first: its checksum, and that checksums.json files it under this very arm (a file
copied in from another arm fails), and a checkpoint's masks must equal mask.pt. A file that fails raises
DamagedFileError naming it; nothing is computed from it. checksums.json is updated before the file it
describes, so a crash in between leaves a file that fails verification or no file, never a wrong one that
passes (a rolling checkpoint keeps its previous checksum accepted too). Nothing outside this module builds a
path into a run directory.
"""
from __future__ import annotations

import errno
import fcntl
import glob
import hashlib
import io
import json
import re
import os
import socket
import time
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from fastticket.lottery.atomic_io import (atomic_write_bytes, atomic_write_json, atomic_write_text, ensure_writable_dir,
                                  is_temp, remove_stale_temps, torch_bytes)
from fastticket.lottery.arms import arm_name
from fastticket.lottery.config import SearchConfig, field_defaults, run_only_fields
from fastticket.errors import DamagedFileError, MaskError, RunDirError, RunLockedError
from fastticket.sparse.nn import check_mask_file

CONFIG_FILE = "config.json"
LOCK_FILE = ".lock"
CHECKSUMS_FILE = "checksums.json"
MASK, REWIND, CHECKPOINT, FINAL, RESULT = "mask.pt", "rewind.pt", "checkpoint.pt", "final.pt", "result.json"


def _config_dict(config: SearchConfig) -> Dict[str, Any]:
    # Through JSON so tuples/lists and ints/floats compare the way they will after a reload.
    return json.loads(config.to_json())


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


class ArmDir:
    """One arm's directory: levels/level_LL/ARM_trialT. Writes go through checksums.json; reads verify."""

    def __init__(self, path: str, level: int, arm: str, trial: int, replica: int = 0, writes: bool = True) -> None:
        self.path, self.level, self.arm, self.trial, self.replica = path, level, arm, trial, replica
        # writes=False: a data-parallel rank other than 0 holds the same state as rank 0, which writes every
        # file; its own writes are skipped (fastticket.lottery.platform), its reads work as usual.
        self.writes = writes

    def _file(self, name: str) -> str:
        return os.path.join(self.path, name)

    @property
    def identity(self) -> Dict[str, Any]:
        # "replica" only for the extra controls (r >= 1): the first keeps the identity it always had.
        extra = {"replica": self.replica} if self.replica else {}
        return {"level": self.level, "arm": self.arm, "trial": self.trial, **extra}

    def open(self) -> "ArmDir":
        """Create the directory (if needed) and drop what a killed writer left in it: temp files, and the
        rolling checkpoint of an arm that finished (killed between result.json and the checkpoint's removal;
        result.json is written after final.pt, so the checkpoint holds nothing resume needs)."""
        if not self.writes:
            return self
        os.makedirs(self.path, exist_ok=True)
        remove_stale_temps(self.path)
        if os.path.exists(self._file(RESULT)) and (self.has_checkpoint() or CHECKPOINT in self._checksums()):
            self.drop_checkpoint()
        return self

    # ---------------------------------------------------------------------------- checksums and verification
    def _checksums(self) -> Dict[str, Any]:
        path = self._file(CHECKSUMS_FILE)
        try:
            with open(path, "rb") as f:
                entries = json.loads(f.read().decode("utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            return {}  # every file it describes then fails verification, by name
        return entries if isinstance(entries, dict) else {}

    def _publish(self, name: str, data: bytes) -> None:
        """Record `data`'s checksum under this arm, then write it as `name` (both atomically)."""
        if not self.writes:
            return
        entries = self._checksums()
        old = entries.get(name) if isinstance(entries.get(name), dict) else None
        entry = {"sha256": _sha256(data), "bytes": len(data), **self.identity}
        if name == CHECKPOINT and old is not None and old.get("sha256"):
            # Crash between the two writes: the previous checkpoint is still the one on disk and still good.
            entry["previous_sha256"], entry["previous_bytes"] = old["sha256"], old.get("bytes")
        entries[name] = entry
        atomic_write_json(self._file(CHECKSUMS_FILE), entries)
        atomic_write_bytes(self._file(name), data)

    def _forget(self, name: str) -> None:
        if not self.writes:
            return
        entries = self._checksums()
        if name in entries:
            del entries[name]
            atomic_write_json(self._file(CHECKSUMS_FILE), entries)

    def verified_bytes(self, name: str) -> bytes:
        """The bytes of `name` after checking them against checksums.json and this arm's identity, or a
        DamagedFileError naming the file and what failed. The recorded size is compared before the body is
        read: a huge junk file is refused without reading it."""
        path = self._file(name)
        entry = self._checksums().get(name)
        if not isinstance(entry, dict) or "sha256" not in entry:
            raise DamagedFileError(f"{path} failed verification: {os.path.join(self.path, CHECKSUMS_FILE)} has no "
                                   f"checksum for it (not written by fastticket here, or damaged)")
        owner = {k: entry.get(k) for k in self.identity}
        if owner != self.identity:
            raise DamagedFileError(f"{path} failed verification: it belongs to level {owner['level']} "
                                   f"{owner['arm']} trial {owner['trial']}, not to this arm (copied in from "
                                   f"another arm?)")
        try:
            size = os.path.getsize(path)
            sizes = {entry.get("bytes"), entry.get("previous_bytes")}
            if "previous_sha256" in entry and entry.get("previous_bytes") is None:
                sizes = {size}  # written before previous sizes were recorded: the checksum decides
            if isinstance(entry.get("bytes"), int) and size not in sizes:
                raise DamagedFileError(f"{path} failed verification: it holds {size} bytes, {entry['bytes']} "
                                       f"were written (damaged or replaced); not read")
            with open(path, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise DamagedFileError(f"cannot read {path}: {exc.strerror or exc}") from None
        digest = _sha256(data)
        if digest != entry["sha256"] and digest != entry.get("previous_sha256"):
            raise DamagedFileError(f"{path} failed verification: its checksum does not match (damaged: "
                                   f"{len(data)} bytes, {entry.get('bytes')} written)")
        return data

    def _load_verified(self, name: str) -> Any:
        data = self.verified_bytes(name)
        try:
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - a file that passed its checksum but does not load
            raise DamagedFileError(f"cannot load {self._file(name)}: {_first_line(exc)}") from None

    def discard(self, name: str) -> None:
        """Remove `name` and its checksum (a damaged file about to be recomputed, a finished arm's checkpoint)."""
        if not self.writes:
            return
        self._forget(name)
        try:
            os.remove(self._file(name))
        except FileNotFoundError:
            pass

    # masks
    def has_mask(self) -> bool:
        return os.path.exists(self._file(MASK))

    def save_mask(self, masks: Dict[str, torch.Tensor]) -> None:
        self._publish(MASK, torch_bytes(masks))

    def load_mask(self, model: nn.Module) -> Dict[str, torch.Tensor]:
        """The saved mask, verified and checked against `model` (a MaskError names the file if it does not fit)."""
        return check_mask_file(self._load_verified(MASK), self._file(MASK), model)

    # rewind point
    def has_rewind(self) -> bool:
        return os.path.exists(self._file(REWIND))

    def save_rewind(self, state: Dict[str, torch.Tensor]) -> None:
        self._publish(REWIND, torch_bytes(state))

    def load_rewind(self) -> Dict[str, torch.Tensor]:
        return self._load_state_dict(REWIND)

    def _load_state_dict(self, name: str) -> Dict[str, torch.Tensor]:
        """A verified file that must hold a state dict (a DamagedFileError naming it otherwise)."""
        state = self._load_verified(name)
        if not isinstance(state, dict):
            raise DamagedFileError(f"{self._file(name)} holds a {type(state).__name__}, not a state dict")
        return state

    # metrics
    def write_metrics(self, metrics: List[Dict[str, float]]) -> None:
        if not self.writes:
            return
        atomic_write_text(self._file("metrics.jsonl"), "".join(json.dumps(m, sort_keys=True) + "\n" for m in metrics))

    def read_metrics(self) -> List[Dict[str, Any]]:
        """The evaluations recorded so far; a torn last line (a killed writer) is skipped. A file that is not
        UTF-8 text raises DamagedFileError naming it."""
        entries: List[Dict[str, Any]] = []
        path = self._file("metrics.jsonl")
        if not os.path.exists(path):
            return entries
        try:
            with open(path, "rb") as f:
                text = f.read().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DamagedFileError(f"cannot read {path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        for line in text.splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(entry, dict):
                entries.append(entry)
        return entries

    # checkpoint
    def has_checkpoint(self) -> bool:
        return os.path.exists(self._file(CHECKPOINT))

    def save_checkpoint(self, state: Dict[str, Any]) -> None:
        self._publish(CHECKPOINT, torch_bytes(state))

    def load_checkpoint(self, masks: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, Any]:
        """The verified checkpoint. `masks` ({layer: mask}, e.g. from mask.pt): the checkpoint's model masks
        must equal them, else DamagedFileError (a checkpoint must not override the arm's mask)."""
        path = self._file(CHECKPOINT)
        ckpt = self._load_verified(CHECKPOINT)
        if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
            raise DamagedFileError(f"{path} is not a checkpoint (no model state)")
        for name, mask in (masks or {}).items():
            saved = ckpt["model"].get(f"{name}.weight_mask", ckpt["model"].get(f"{name}_mask"))  # nn.entry_name
            if not isinstance(saved, torch.Tensor) or not torch.equal(saved.cpu().bool(), mask.cpu().bool()):
                raise DamagedFileError(f"{path} failed verification: its mask of layer {name!r} differs from "
                                       f"{self._file(MASK)}")
        return ckpt

    def drop_checkpoint(self) -> None:
        """A finished arm needs no rolling checkpoint (final.pt and result.json hold what resume needs)."""
        self.discard(CHECKPOINT)

    def checkpoint_error(self, exc: BaseException) -> MaskError:
        """The error for a checkpoint that does not fit the model."""
        return DamagedFileError(f"checkpoint {self._file(CHECKPOINT)} does not fit the model ({_first_line(exc)}); "
                                f"corrupted or from another run")

    # final weights
    def has_final(self) -> bool:
        return os.path.exists(self._file(FINAL))

    def save_final(self, state: Dict[str, torch.Tensor]) -> None:
        self._publish(FINAL, torch_bytes(state))

    def load_final(self) -> Dict[str, torch.Tensor]:
        return self._load_state_dict(FINAL)

    def load_final_into(self, model: nn.Module) -> None:
        path = self._file(FINAL)
        try:
            model.load_state_dict(self.load_final())
        except (RuntimeError, KeyError, ValueError) as exc:
            if isinstance(exc, DamagedFileError):
                raise
            raise DamagedFileError(f"{path} does not fit the model ({_first_line(exc)}); corrupted or from "
                                   f"another run") from None

    # result
    def write_result(self, result: Dict[str, Any]) -> None:
        self._publish(RESULT, (json.dumps(result, indent=2, sort_keys=True, default=str) + "\n").encode("utf-8"))

    def read_result(self, require_final: bool = True) -> Optional[Dict[str, Any]]:
        """result.json, verified with final.pt (a finished arm), or None while the arm is unfinished. A
        result.json or final.pt that fails verification raises DamagedFileError. require_final=False: the
        result alone (a report needs no weights)."""
        if not os.path.exists(self._file(RESULT)):
            return None
        data = self.verified_bytes(RESULT)
        try:
            result = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise DamagedFileError(f"cannot read {self._file(RESULT)}: {_first_line(exc)}") from None
        if not isinstance(result, dict) or {k: result.get(k) for k in self.identity} != self.identity:
            raise DamagedFileError(f"{self._file(RESULT)} failed verification: it is not this arm's result")
        if not require_final:
            return result
        if not self.has_final():
            raise DamagedFileError(f"{self._file(FINAL)} is missing although {self._file(RESULT)} exists")
        self.verified_bytes(FINAL)
        return result

    def discard_result(self) -> None:
        """Forget a finished arm whose files failed verification, so that it is trained again."""
        self.discard(RESULT)
        self.discard(FINAL)


class RunDir:
    """A search's output directory (see the module docstring for its layout)."""

    def __init__(self, root: str, writes: bool = True) -> None:
        self.root = root
        self.writes = writes  # False: this process writes nothing here (ArmDir.writes)
        self._lock_fd: Optional[int] = None

    @property
    def config_path(self) -> str:
        return os.path.join(self.root, CONFIG_FILE)

    @property
    def report_dir(self) -> str:
        return os.path.join(self.root, "report")

    def arm(self, level: int, arm: str, trial: int, replica: int = 0) -> ArmDir:
        """The r-th control of a kind (replica r >= 1, e.g. reinit x R) lives in {arm}{r+1}_trial{t}; the first
        keeps {arm}_trial{t}, so run directories written before replicas existed read the same."""
        name = arm_name(arm, replica)
        return ArmDir(os.path.join(self.root, "levels", f"level_{level:02d}", f"{name}_trial{trial}"), level, arm,
                      trial, replica, self.writes)

    # ----------------------------------------------------------------------------------------------- lock
    def lock(self) -> None:
        """Create the directory if needed and hold its exclusive lock until `unlock` (or the process ends: the
        kernel drops an flock with its holder, so a crashed run never leaves a stale lock). A second process
        gets RunLockedError naming the holder (pid, host, start time)."""
        ensure_writable_dir(self.root, "--out")
        path = os.path.join(self.root, LOCK_FILE)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise RunLockedError(f"run directory {self.root} is in use by {self._holder(path)}; wait for that "
                                 f"search to finish (or stop it) before starting another one here") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        self._lock_fd = fd

    @staticmethod
    def _holder(path: str) -> str:
        try:
            with open(path) as f:
                info = json.load(f)
            return f"pid {info['pid']} on {info['host']} (since {info['started']})"
        except (OSError, ValueError, KeyError, TypeError):
            return "another process"

    def unlock(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    # -------------------------------------------------------------------------------------------- config
    def _entries(self) -> List[str]:
        # A killed writer's temp file is not content: counted, a kill while the first config.json was written
        # would make the directory neither startable (not empty) nor resumable (no config.json).
        if not os.path.isdir(self.root):
            return []
        return [e for e in os.listdir(self.root) if e != LOCK_FILE and not is_temp(e)]

    # What a start that failed before any training finished a step can have written: its config, the level 0
    # arms' masks and rewind points, their checksums, empty metrics. Nothing in them is worth keeping.
    _START_FILES = frozenset({MASK, REWIND, CHECKSUMS_FILE, "metrics.jsonl"})

    def _failed_start(self) -> bool:
        """Only a config.json and set-up files of a start that failed before any checkpoint: reusable."""
        if not set(self._entries()) <= {CONFIG_FILE, "levels"}:
            return False
        for _, _, files in os.walk(os.path.join(self.root, "levels")):
            if any(f not in self._START_FILES and not is_temp(f) for f in files):
                return False
        return True

    def _clear_failed_start(self) -> None:
        levels = os.path.join(self.root, "levels")
        if os.path.isdir(levels):
            import shutil
            shutil.rmtree(levels)

    def prepare(self, config: SearchConfig, resume: bool, create: bool = True) -> None:
        """Create the directory with config.json, or check that an existing run matches `config` (resume).

        create=False only checks (nothing is written), so a search that fails later (missing data) leaves no
        half-made run directory that a corrected command would then refuse. A directory holding only the
        config.json of a start that failed before training is reused as if empty. Resuming with more
        `levels` than the run has extends it (config.json then records the new count).
        """
        out_dir, config_path = self.root, self.config_path
        if os.path.exists(out_dir) and not os.path.isdir(out_dir):
            raise RunDirError(f"--out {out_dir} is a file, not a directory; choose a directory")
        if create and self.writes:
            remove_stale_temps(out_dir)  # e.g. of a first config.json whose writer was killed
        if self._entries() and (resume or not self._failed_start()):
            if not resume:
                raise RunDirError(f"output directory {out_dir} is not empty; pass --resume to continue that run "
                                  f"or choose another --out")
            if not os.path.exists(config_path):
                raise RunDirError(f"cannot resume {out_dir}: it has no config.json, so it is not a fastticket run "
                                  f"directory; choose another --out")
            try:
                with open(config_path, "rb") as f:
                    saved = json.loads(f.read().decode("utf-8"))
                if not isinstance(saved, dict):
                    raise ValueError("not a JSON object")
            except (OSError, ValueError) as exc:
                raise RunDirError(f"cannot resume {out_dir}: config.json is unreadable ({_first_line(exc)})") from None
            current = _config_dict(config)
            if saved.get("device") == "auto":  # written by hand: any device the run resolves to matches
                saved["device"] = current.get("device")
            # Fields a run's config.json predates count as their defaults (old run directories stay
            # resumable); run-only fields (how to run, e.g. parallel_arms) may change on resume.
            defaults = json.loads(json.dumps(field_defaults()))
            for k in set(current) - set(saved):
                saved[k] = defaults.get(k, "<absent>")
            differ = sorted(k for k in set(saved) | set(current)
                            if k not in run_only_fields() and saved.get(k, "<absent>") != current.get(k, "<absent>"))
            extend = differ == ["levels"] and isinstance(saved.get("levels"), int) and \
                current["levels"] > saved["levels"]
            # A user's model or data function (fastticket.lottery.sources) changed: say which.
            if "sources" in differ and not {"model", "dataset"} & set(differ):
                changed = [k for k in ("model", "dataset") if saved["sources"].get(k) != current["sources"].get(k)]
                which = " and the ".join(f"{'model' if k == 'model' else 'data'} function {current[k]}"
                                         for k in changed)
                raise RunDirError(f"cannot resume {out_dir}: the {which} changed since the run began (its source "
                                  f"hash differs from config.json's); restore it or choose another --out")
            if differ and not extend:
                details = "; ".join(f"{k}: run has {saved.get(k, '<absent>')!r}, now {current.get(k, '<absent>')!r}"
                                    for k in differ)
                hint = " (--levels can only grow: a resume extends a run)" if "levels" in differ else ""
                raise RunDirError(f"cannot resume {out_dir}: the configuration differs from its config.json in "
                                  f"{', '.join(differ)} ({details}){hint}; use the run's settings or choose another "
                                  f"--out")
            if extend and create:
                atomic_write_text(config_path, config.to_json() + "\n")
            return
        if create:
            os.makedirs(out_dir, exist_ok=True)
            self._clear_failed_start()  # its masks / rewind points may come from other settings
            atomic_write_text(config_path, config.to_json() + "\n")

    def read_config(self) -> Dict[str, Any]:
        """config.json as a plain dict ({} when there is none; DamagedFileError naming it when unreadable)."""
        if not os.path.exists(self.config_path):
            return {}
        try:
            with open(self.config_path, "rb") as f:
                config = json.loads(f.read().decode("utf-8"))
        except (OSError, ValueError) as exc:
            raise DamagedFileError(f"cannot read {self.config_path}: {_first_line(exc)}") from None
        if not isinstance(config, dict):
            raise DamagedFileError(f"cannot read {self.config_path}: not a JSON object")
        return config

    def arm_dirs(self) -> List[ArmDir]:
        """Every arm directory present, parsed from its path."""
        found = []
        for path in glob.glob(os.path.join(self.root, "levels", "level_*", "*_trial*")):
            level_name, arm_name = os.path.basename(os.path.dirname(path)), os.path.basename(path)
            arm, _, trial = arm_name.rpartition("_trial")
            replica = 0
            numbered = re.fullmatch(r"(.*?)(\d+)", arm)
            if numbered and int(numbered.group(2)) >= 2:  # reinit2 = reinit replica 1 (RunDir.arm)
                arm, replica = numbered.group(1), int(numbered.group(2)) - 1
            try:
                found.append(ArmDir(path, int(level_name[len("level_"):]), arm, int(trial), replica))
            except ValueError:
                continue
        return found

    def results(self, problems: Optional[List[str]] = None, require_final: bool = True) -> List[Dict[str, Any]]:
        """Every verified result.json (finished arms), unsorted; each also carries "path": its arm directory.
        Files that fail verification are left out; with `problems` given, one line per such file is added."""
        results = []
        for arm_dir in self.arm_dirs():
            try:
                result = arm_dir.read_result(require_final)
            except DamagedFileError as exc:
                if problems is not None:
                    problems.append(str(exc))
                continue
            if result is None:
                continue
            result["path"] = arm_dir.path
            results.append(result)
        return results


def arm_dir(out_dir: str, level: int, arm: str, trial: int, replica: int = 0) -> str:
    """The path of one arm's directory in the run directory `out_dir`."""
    return RunDir(out_dir).arm(level, arm, trial, replica).path
