"""What a search reports while it runs (arms started and done, training steps, evaluations, messages)."""
from __future__ import annotations

import sys


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

    def evaluated(self, iteration: int, loss: float, val_acc: float) -> None:
        pass

    def training_finished(self) -> None:
        pass

    def message(self, text: str) -> None:
        print(text, file=sys.stderr)
