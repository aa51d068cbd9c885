"""Stopping a search cleanly on SIGTERM (what schedulers send before they kill a job): the handler only notes
the request; training stops at its next safe point, right after an evaluation has written every live arm's
checkpoint (fastticket.lottery.train), and the search raises StoppedError. The same command plus `--resume`
then continues from those checkpoints to the results of an uninterrupted run. Under torchrun every rank gets
the signal; a rank waiting for the others at a level's end stops there (fastticket.lottery.peers)."""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, Iterator

from fastticket.errors import StoppedError

_requested = threading.Event()


def _note(signum: int, frame: Any) -> None:
    _requested.set()


@contextlib.contextmanager
def on_sigterm() -> Iterator[None]:
    """While the search runs, SIGTERM asks it to stop at the next safe point (only the main thread can set a
    handler; a search run from another thread keeps the process's own)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _requested.clear()
    previous = signal.signal(signal.SIGTERM, _note)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        _requested.clear()


def check(where: str = "") -> None:
    """A safe point: raise StoppedError if SIGTERM has arrived."""
    if _requested.is_set():
        at = f" {where}" if where else ""
        raise StoppedError(f"stopped on SIGTERM{at}, every arm's progress saved; continue with the same command "
                           f"plus --resume")
