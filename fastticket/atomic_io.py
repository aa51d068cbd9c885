"""Atomic file writes: every file fastticket publishes (run directories, reports, benchmark results) is
written to a unique temp file beside its destination, fsynced, then renamed over it, so a reader (or a
resumed run) sees either the old complete file or the new complete one, never a torn write.

Temp names carry the writer's pid and a random suffix so two processes never share one; they start with a
dot and end in `.tmp`, which `remove_stale_temps` recognises after a crash.
"""
from __future__ import annotations

import glob
import json
import os
import tempfile
from typing import IO, Any, Callable

import torch

TEMP_SUFFIX = ".tmp"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()


def fsync_dir(path: str) -> None:
    """Make a rename in `path` durable (best effort: some filesystems refuse to open directories)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str, write: Callable[[IO[bytes]], Any]) -> None:
    """Write through `write(fileobj)` to a temp file beside `path`, fsync it, then rename over `path`.
    On any failure the temp file is removed and the exception propagates; `path` is left untouched."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.{os.getpid()}.", suffix=TEMP_SUFFIX, dir=directory)
    try:
        os.fchmod(fd, _FILE_MODE)  # mkstemp makes 0600 files; published files get the usual umask-based mode
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    fsync_dir(directory)


def atomic_save(obj: Any, path: str) -> None:
    """torch.save, atomically."""
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: str, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def atomic_write_json(path: str, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def remove_stale_temps(directory: str) -> None:
    """Delete temp files a killed writer left in `directory`. Call only while holding the directory (a live
    writer's temp file would be deleted too); a temp file never holds the only copy of anything."""
    for tmp in glob.glob(os.path.join(directory, f".*{TEMP_SUFFIX}")):
        try:
            os.remove(tmp)
        except OSError:
            pass
