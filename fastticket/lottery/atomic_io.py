"""Atomic file writes: every file fastticket publishes (run directories, reports, benchmark results) is
written to a unique temp file beside its destination, fsynced, then renamed over it, so a reader (or a
resumed run) sees either the old complete file or the new complete one, never a torn write.

Temp names carry the writer's pid and a random suffix so two processes never share one; they start with a
dot and end in `.tmp`, which `remove_stale_temps` recognises after a crash.

Fault injection (to prove crash consistency at every point, not at sampled ones): every atomic write passes
two fault points, "fsync" (the temp file written, not yet synced or renamed) and "rename" (the destination
replaced, its directory not yet synced). FASTTICKET_FAULT_AT=N sends SIGKILL to the process at its N-th
point; FASTTICKET_FAULT_LOG=FILE appends "N kind path" per point, which is how a test counts them. Points
are counted per process (a forked child counts from 1 again); FASTTICKET_FAULT_RANK=R limits both to the
process whose RANK (torchrun's) is R, so a multi-process search can be killed at one rank's N-th point.
"""
from __future__ import annotations

import errno
import io
import json
import os
import shutil
import signal
import tempfile
from typing import IO, Any, Callable, Optional

import torch

from fastticket.errors import OutputError

TEMP_SUFFIX = ".tmp"
FAULT_AT_ENV, FAULT_LOG_ENV, FAULT_RANK_ENV = "FASTTICKET_FAULT_AT", "FASTTICKET_FAULT_LOG", "FASTTICKET_FAULT_RANK"
_DISK_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()


_fault_count = {"pid": -1, "n": 0}


def fault_point(kind: str, path: str) -> None:
    """One fault point (see the module docstring): counted and logged when asked, SIGKILL at the chosen one."""
    at, log = os.environ.get(FAULT_AT_ENV), os.environ.get(FAULT_LOG_ENV)
    if not at and not log:
        return
    rank = os.environ.get(FAULT_RANK_ENV)
    if rank and rank != os.environ.get("RANK", "0"):
        return
    if _fault_count["pid"] != os.getpid():
        _fault_count.update(pid=os.getpid(), n=0)
    _fault_count["n"] += 1
    n = _fault_count["n"]
    if log:
        with open(log, "a") as f:
            f.write(f"{n} {kind} {path}\n")
    if at and int(at) == n:
        os.kill(os.getpid(), signal.SIGKILL)  # a real kill: no finally, no atexit, no flushed buffers


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


def free_bytes(directory: str) -> Optional[int]:
    """Free space on the filesystem holding `directory` (None when it cannot be asked)."""
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return None


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def output_error(path: str, exc: OSError, needed: Optional[int] = None) -> OutputError:
    """One line for a write that failed: disk full (how much was needed, how much is free, where), a
    read-only or unwritable place, or the OS's reason."""
    directory = os.path.dirname(os.path.abspath(path))
    if exc.errno in _DISK_FULL:
        free = free_bytes(directory)
        need = f"needed {'at least ' if needed is None else ''}{_gib(needed or 0)}" if needed is not None else \
            "needed more space"
        have = f", {_gib(free)} free" if free is not None else ""
        return OutputError(f"disk full writing {path}: {need}{have} on the filesystem of {directory}; nothing was "
                           f"half-written; free some space (or use a bigger disk) and rerun with --resume")
    if exc.errno in (errno.EROFS,):
        return OutputError(f"cannot write {path}: {directory} is on a read-only filesystem; choose another "
                           f"output directory")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return OutputError(f"cannot write {path}: permission denied in {directory}; choose a directory you can "
                           f"write to")
    return OutputError(f"cannot write {path}: {exc.strerror or exc}")


def ensure_writable_dir(path: str, what: str = "output directory") -> None:
    """Create `path` if needed and check a file can be written in it, or raise OutputError (one line): a path
    that is a file, a read-only filesystem, no permission. Writes nothing that stays behind."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise OutputError(f"{what} {path} is a file, not a directory; choose a directory")
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".fastticket-probe.", suffix=TEMP_SUFFIX, dir=path)
        os.close(fd)
        os.remove(probe)
    except OSError as exc:
        if isinstance(exc, (FileExistsError, NotADirectoryError)):
            raise OutputError(f"{what} {path}: a part of that path is a file, not a directory") from None
        raise output_error(os.path.join(path, "x"), exc) from None


def atomic_write(path: str, write: Callable[[IO[bytes]], Any], size: Optional[int] = None) -> None:
    """Write through `write(fileobj)` to a temp file beside `path`, fsync it, then rename over `path`.
    On any failure the temp file is removed and the exception propagates; `path` is left untouched. A full
    disk, a read-only filesystem or a refused permission become one OutputError line (`size`: the bytes to
    be written, when known, for the disk-full message)."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.{os.getpid()}.", suffix=TEMP_SUFFIX,
                                   dir=directory)
        os.fchmod(fd, _FILE_MODE)  # mkstemp makes 0600 files; published files get the usual umask-based mode
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            fault_point("fsync", path)
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fault_point("rename", path)
    except BaseException as exc:
        if tmp is not None:
            try:
                os.remove(tmp)
            except OSError:
                pass
        if isinstance(exc, OSError) and exc.errno in (*_DISK_FULL, errno.EROFS, errno.EACCES, errno.EPERM):
            raise output_error(path, exc, size) from None
        raise
    fsync_dir(directory)


def atomic_write_bytes(path: str, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data), size=len(data))


def torch_bytes(obj: Any) -> bytes:
    """torch.save into memory (to know the size and checksum before anything reaches the disk)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def atomic_save(obj: Any, path: str) -> None:
    """torch.save, atomically."""
    atomic_write_bytes(path, torch_bytes(obj))


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def is_temp(name: str) -> bool:
    """Whether `name` is an atomic write's temp file (never a published file: those do not start with a dot)."""
    return name.startswith(".") and name.endswith(TEMP_SUFFIX)


def _writer_alive(name: str) -> bool:
    # .{basename}.{pid}.{random}.tmp: the writer's pid is the second field from the end.
    try:
        pid = int(name[: -len(TEMP_SUFFIX)].rsplit(".", 2)[-2])
    except (ValueError, IndexError):
        return False
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # alive, someone else's
    return True


def remove_stale_temps(directory: str) -> None:
    """Delete temp files a killed writer left in `directory`. A temp file whose writer (on this host) still
    runs is kept, so a directory nobody holds a lock on (a report folder) can be cleaned too; a temp file
    never holds the only copy of anything."""
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        if not is_temp(name) or _writer_alive(name):
            continue
        try:
            os.remove(os.path.join(directory, name))
        except OSError:
            pass
