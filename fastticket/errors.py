"""User-facing errors: the CLI turns these (and other ValueErrors) into one line on stderr, never a traceback.

They subclass ValueError so library callers that already catch ValueError keep working.
"""
from __future__ import annotations


def first_line(exc: BaseException) -> str:
    """An error in one line, for a message that quotes it: its type and the first line of its text."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


class FastTicketError(Exception):
    """Base of every error fastticket raises for bad input or an unusable run directory."""


class ConfigError(FastTicketError, ValueError):
    """A search setting is invalid (rate outside (0, 1), bad granularity, unknown optimizer, ...)."""


class RunDirError(FastTicketError, ValueError):
    """The run directory cannot be used: not empty without --resume, or its config.json differs."""


class MaskError(FastTicketError, ValueError):
    """A saved mask does not fit the model (corrupted or foreign mask.pt)."""


class DamagedFileError(RunDirError, MaskError):
    """A run-directory file failed verification (checksum, the arm it belongs to, or its mask)."""


class OutputError(FastTicketError, OSError):
    """A file cannot be written: disk full, read-only filesystem, no permission, a file where a directory
    should be."""


class RunLockedError(RunDirError):
    """Another live process holds the run directory."""


class PeerLostError(FastTicketError):
    """Another rank of a multi-process search died, hangs or left it (fastticket.lottery.peers)."""


class StoppedError(FastTicketError):
    """The search was asked to stop (SIGTERM) and stopped at a safe point (fastticket.lottery.stop)."""
