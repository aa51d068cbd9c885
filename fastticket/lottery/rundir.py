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
read back is verified first (an arm's files: fastticket.lottery.armdir); a file that fails raises
DamagedFileError naming it, and nothing is computed from it. Nothing outside this module and armdir builds a
path into a run directory.
"""
from __future__ import annotations

import errno
import fcntl
import glob
import json
import re
import os
import socket
import time
from typing import Any, Dict, List, Optional

from fastticket.errors import DamagedFileError, RunDirError, RunLockedError, first_line
from fastticket.lottery.armdir import CHECKSUMS_FILE, MASK, REWIND, ArmDir
from fastticket.lottery.arms import arm_name
from fastticket.lottery.atomic_io import atomic_write_text, ensure_writable_dir, is_temp, remove_stale_temps
from fastticket.lottery.config import USER_FIELDS, SearchConfig, field_defaults, run_only_fields

CONFIG_FILE = "config.json"
LOCK_FILE = ".lock"


def _config_dict(config: SearchConfig) -> Dict[str, Any]:
    # Through JSON so tuples/lists and ints/floats compare the way they will after a reload.
    return json.loads(config.to_json())


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
                raise RunDirError(f"cannot resume {out_dir}: config.json is unreadable ({first_line(exc)})") from None
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
            if "sources" in differ and not set(USER_FIELDS) & set(differ):
                changed = [k for k in USER_FIELDS if saved["sources"].get(k) != current["sources"].get(k)]
                which = " and the ".join(f"{'data' if k == 'dataset' else k} function {current[k]}" for k in changed)
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
            raise DamagedFileError(f"cannot read {self.config_path}: {first_line(exc)}") from None
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
