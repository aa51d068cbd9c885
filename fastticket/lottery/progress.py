"""What a search reports while it runs (arms started and done, training steps, evaluations, messages)."""
from __future__ import annotations

import math
import sys
import time
from typing import IO, Dict, Optional


class Progress:
    """What a search reports while it runs. This base draws nothing and writes messages to stderr; the CLI
    passes a subclass with progress bars."""

    def search_started(self, total_arms: int) -> None:
        pass

    def arm_started(self, level: int, levels: int, arm: str, trial: int) -> None:
        """An arm starts training (finished arms of a resumed run are not announced)."""

    def arms_done(self, count: int = 1) -> None:
        """`count` arms are finished or skipped."""

    def search_finished(self) -> None:
        pass

    def training_started(self, label: str, total: int, initial: int) -> None:
        pass

    def step(self, iteration: int, loss: float) -> None:
        """Training has reached `iteration` (steps taken, counted from 0). Called a few times per second,
        not per step; `loss` is the last evaluated train loss (NaN before the first evaluation)."""

    def evaluated(self, iteration: int, loss: float, val_acc: float, val_loss: float = math.nan,
                  arm: str = "") -> None:
        """An arm (`arm`: its label and trial, e.g. "reinit trial 0") was evaluated at `iteration`."""

    def training_finished(self) -> None:
        pass

    def message(self, text: str) -> None:
        print(text, file=sys.stderr)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class LogLines(Progress):
    """Progress for a log file (output not a terminal): one flushed line when arms start training and one per
    arm and evaluation (level i/N, arm, iteration, losses, elapsed time and an ETA from the work done so far)."""

    def __init__(self, stream: Optional[IO[str]] = None) -> None:
        self.stream = stream
        self.t0 = time.perf_counter()
        self.total = self.done = 0
        self.base: Optional[int] = None  # arms already done when this session's first training started
        self.level, self.iterations, self.initial = "", 1, 0
        self.partial: Dict[str, float] = {}  # fraction trained of each arm in training

    def _line(self, text: str) -> None:
        print(text, file=self.stream or sys.stderr, flush=True)

    def search_started(self, total_arms: int) -> None:
        self.t0, self.total = time.perf_counter(), total_arms

    def arm_started(self, level: int, levels: int, arm: str, trial: int) -> None:
        self.level = f"level {level}/{levels}"
        self._line(f"{self.level} {arm} trial {trial}: training ({self.done}/{self.total} arms done)")

    def arms_done(self, count: int = 1) -> None:
        self.done += count
        self.partial.clear()

    def training_started(self, label: str, total: int, initial: int) -> None:
        self.iterations, self.initial = total, initial
        if self.base is None:
            self.base = self.done

    def evaluated(self, iteration: int, loss: float, val_acc: float, val_loss: float = math.nan,
                  arm: str = "") -> None:
        elapsed = time.perf_counter() - self.t0
        base = self.base or 0
        self.partial[arm] = (iteration - self.initial) / max(1, self.iterations - self.initial)
        fraction = (self.done - base + sum(self.partial.values())) / max(1, self.total - base)
        eta = _duration(elapsed * (1 - fraction) / fraction) if fraction > 0 else "?"
        self._line(f"{self.level} {arm} | iteration {iteration}/{self.iterations} | train loss {loss:.4f} | "
                   f"val loss {val_loss:.4f} | val acc {100 * val_acc:.2f}% | elapsed {_duration(elapsed)} | "
                   f"ETA {eta}")

    def search_finished(self) -> None:
        self._line(f"search finished: {self.done}/{self.total} arms in {_duration(time.perf_counter() - self.t0)}")

    def message(self, text: str) -> None:
        self._line(text)
