"""Bounded waits between the ranks of a search: a rank that dies or hangs ends the others within `dist_timeout`
seconds (SearchConfig.dist_timeout, --dist-timeout), each in one line, instead of leaving them blocked.

- A peer on the same machine whose process has ended is known dead at once (its pid, in the store).
- Every collective of the process group has that timeout (torch.distributed's own): the short waits
  (Context.agree, data-mode gradients) end there at the latest; gloo reports a dead peer's closed connection
  at once.
- The waits for another rank's work (trials mode: a level's end, which can take hours) never block in a
  collective. Each rank's watcher thread bumps a heartbeat counter in the rendezvous store every few seconds
  while its process lives; `PeerWatch.barrier` polls the store and gives up once a rank it waits for has not
  beaten for the timeout, has left the search, or the store cannot be reached (its host is gone).
- While this rank trains, the watcher watches too: a silent peer interrupts the main thread (a KeyboardInterrupt
  at its next Python instruction, turned into PeerLostError by platform.session), so no rank trains on for
  hours towards a barrier nobody else will reach. Files stay consistent: the same as a kill at that moment.
"""
from __future__ import annotations

import _thread
import itertools
import os
import socket
import threading
import time
from typing import Callable, Dict, Optional

import torch.distributed as dist

from fastticket.errors import PeerLostError, first_line

DEFAULT_TIMEOUT_S = 600.0  # the longest a rank waits for a silent peer: a dataset download, a compile
_POLL_S = 0.2
_sessions = itertools.count()  # every rank opens the same sequence of sessions: one key namespace each


def resume_hint() -> str:
    return "continue with the same command plus --resume once every rank can run"


class PeerWatch:
    """One rank's heartbeat and its watch over the other ranks, through the process group's store."""

    def __init__(self, rank: int, world: int, timeout_s: float, store: Optional[dist.Store] = None,
                 stopping: Callable[[], None] = lambda: None) -> None:
        self.rank, self.world, self.timeout_s = rank, world, float(timeout_s)
        self.store = store if store is not None else dist.distributed_c10d._get_default_store()
        self.prefix = f"fastticket/{next(_sessions)}/"
        self.stopping = stopping  # raises when this rank was asked to stop (fastticket.lottery.stop)
        self.beat_s = min(5.0, self.timeout_s / 5)
        port = os.environ.get("MASTER_PORT")
        self.address = (os.environ.get("MASTER_ADDR", "127.0.0.1"), int(port)) if port else None
        self.lost: Optional[str] = None
        self._barriers = 0
        self._seen: Dict[int, int] = {}
        self._pids: Dict[int, Optional[int]] = {}
        self._heard: Dict[int, float] = {r: time.monotonic() for r in range(world) if r != rank}
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="fastticket-peers", daemon=True)

    def start(self) -> "PeerWatch":
        self._beat()
        if _PROCESS_SPACE is not None:
            self._store(lambda: self.store.set(self._key("pid", self.rank), f"{_PROCESS_SPACE} {os.getpid()}"))
        self._thread.start()
        return self

    def quiet(self) -> None:
        """Stop interrupting the main thread (it is leaving the search already)."""
        self._done.set()

    def close(self, why: str) -> None:
        """Leave the search (`why`: done, stopped, failed): peers waiting for this rank give up at once. Rank 0
        leaves last: without torchrun it hosts the store, and a peer still in the search would take the
        store's end for rank 0's death."""
        self.quiet()
        self._thread.join(timeout=self.beat_s + 1)
        try:
            self._store(lambda: self.store.set(self._key("left", self.rank), why))
            waiting = list(range(1, self.world)) if self.rank == 0 else []
            while waiting:
                waiting = [r for r in waiting if self._left(r) is None]
                for r in waiting:
                    self._silent(r)
                    self.raise_lost()
                time.sleep(_POLL_S if waiting else 0)
        except PeerLostError:
            pass  # the store's host is gone, or a peer is: nobody is left to wait for

    # ------------------------------------------------------------------------------------- waiting
    def barrier(self) -> None:
        """Wait until every rank has reached this barrier, or raise PeerLostError (see the module doc)."""
        n, self._barriers = self._barriers, self._barriers + 1
        self._store(lambda: self.store.set(self._key(f"at{n}", self.rank), "1"))
        waiting = [r for r in range(self.world) if r != self.rank]
        while waiting:
            self._probe()
            waiting = [r for r in waiting if not self._store(lambda r=r: self.store.check([self._key(f"at{n}", r)]))]
            self.stopping()
            for r in waiting:
                self._check(r)
            if waiting:
                time.sleep(_POLL_S)

    def raise_lost(self) -> None:
        if self.lost is not None:
            raise PeerLostError(f"rank {self.rank}: {self.lost}; this rank stops too; {resume_hint()}")

    def lost_error(self, exc: BaseException) -> Optional[PeerLostError]:
        """The PeerLostError `exc` stands for (the watcher's interrupt, a collective that failed or timed out),
        or None for any other error."""
        if isinstance(exc, PeerLostError):
            return exc
        if self.lost is not None and isinstance(exc, (KeyboardInterrupt, RuntimeError)):
            return PeerLostError(f"rank {self.rank}: {self.lost}; this rank stops too; {resume_hint()}")
        if isinstance(exc, dist.DistError):
            return PeerLostError(f"rank {self.rank}: a collective with the other ranks failed ({first_line(exc)}): "
                                 f"a rank died or hangs; {resume_hint()}")
        return None

    # ------------------------------------------------------------------------------------ internals
    def _key(self, what: str, rank: int) -> str:
        return f"{self.prefix}{what}/{rank}"

    def _store(self, op: Callable[[], object]) -> object:
        self.raise_lost()  # a store already lost is not asked again (each failed call logs a C++ trace)
        try:
            return op()
        except (RuntimeError, ValueError) as exc:
            self.lost = f"lost the rendezvous store (rank 0's or torchrun's): {first_line(exc)}"
        self.raise_lost()
        return None

    def _probe(self) -> None:
        """Is the store's host still there? Asked with a plain connection first: a store call to a dead host
        logs a C++ stack trace before it raises."""
        if self.address is None:
            return
        try:
            socket.create_connection(self.address, timeout=max(1.0, self.beat_s)).close()
        except OSError as exc:
            self.lost = self.lost or f"lost the rendezvous store at {self.address[0]}:{self.address[1]} (rank " \
                                     f"0's or torchrun's): {exc.strerror or exc}"
        self.raise_lost()

    def _beat(self) -> None:
        self._store(lambda: self.store.add(self._key("beat", self.rank), 1))

    def _left(self, rank: int) -> Optional[str]:
        """Why `rank` left the search (done, stopped, failed), or None while it is in it."""
        if not self._store(lambda: self.store.check([self._key("left", rank)])):
            return None
        return self._store(lambda: self.store.get(self._key("left", rank))).decode()  # type: ignore[union-attr]

    def _check(self, rank: int) -> None:
        """Raise PeerLostError if `rank`, which this rank waits for, left the search or is silent."""
        self.raise_lost()
        why = self._left(rank)
        if why is not None:
            self.lost = f"rank {rank} left the search ({why}) while this rank waited for it"
        else:
            self._silent(rank)
        self.raise_lost()

    def _silent(self, rank: int) -> None:
        if self._died(rank):
            self.lost = f"rank {rank} died (its process {self._pids[rank]} on this machine is gone)"
            return
        count = int(self._store(lambda: self.store.add(self._key("beat", rank), 0)))  # type: ignore[arg-type]
        now = time.monotonic()
        if count != self._seen.get(rank):
            self._seen[rank], self._heard[rank] = count, now
        elif now - self._heard[rank] > self.timeout_s:
            self.lost = f"rank {rank} has not answered for {self.timeout_s:g} s (--dist-timeout): it died or hangs"

    def _died(self, rank: int) -> bool:
        """Is `rank` a process of this machine (and pid namespace) that has ended? Known at once, not after the
        timeout; a peer elsewhere is judged by its heartbeat alone."""
        if rank not in self._pids:
            if not self._store(lambda: self.store.check([self._key("pid", rank)])):
                return False
            entry = self._store(lambda: self.store.get(self._key("pid", rank)))
            space, pid = entry.decode().rsplit(" ", 1)  # type: ignore[union-attr]
            self._pids[rank] = int(pid) if space == _PROCESS_SPACE else None
        pid = self._pids[rank]
        if pid is None:
            return False
        try:
            os.kill(pid, 0)
            with open(f"/proc/{pid}/stat") as f:  # a zombie (killed, not yet reaped by its launcher) is dead too
                return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
        except ProcessLookupError:
            return True
        except OSError:
            return False

    def _watch(self) -> None:
        """Beat, and watch the ranks still in the search: one that left it done is no longer watched (this
        rank may have nothing more to wait for); one that stopped or failed ends the search."""
        watched = set(self._heard)
        while not self._done.wait(self.beat_s):
            try:
                self._probe()
                self._beat()
                for rank in sorted(watched):
                    why = self._left(rank)
                    if why == "done":
                        watched.discard(rank)
                    elif why is not None:
                        self.lost = f"rank {rank} left the search ({why})"
                    else:
                        self._silent(rank)
                self.raise_lost()
            except PeerLostError:
                if not self._done.is_set():
                    _thread.interrupt_main()  # platform.session turns it into this PeerLostError
                return


def _process_space() -> Optional[str]:
    """This machine's boot and pid namespace: peers with the same one see each other's pids."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f"{f.read().strip()}/{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return None


_PROCESS_SPACE = _process_space()
