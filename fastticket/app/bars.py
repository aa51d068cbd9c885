"""The search's progress bars on stderr (tqdm), for `fastticket search` on a terminal (in a log: one line per
evaluation, fastticket.lottery.progress.LogLines)."""
from __future__ import annotations

import math
import sys

from fastticket.lottery.progress import Progress


def progress_bars():
    """A Progress that draws tqdm bars on stderr: one over the search's arms, one per training."""
    from tqdm import tqdm

    class Bars(Progress):
        def __init__(self) -> None:
            self.arms = self.bar = None

        def search_started(self, total_arms: int) -> None:
            self.arms = tqdm(total=total_arms, desc="arms", dynamic_ncols=True, file=sys.stderr)

        def arm_started(self, level: int, levels: int, arm: str, trial: int) -> None:
            self.arms.set_description(f"level {level}/{levels} {arm} trial {trial}")

        def arms_done(self, count: int = 1) -> None:
            self.arms.update(count)

        def search_finished(self) -> None:
            self.arms.close()

        def training_started(self, label: str, total: int, initial: int) -> None:
            self.bar = tqdm(total=total, initial=initial, desc=label, leave=False, dynamic_ncols=True,
                            mininterval=0.5, file=sys.stderr)

        def step(self, iteration: int, loss: float) -> None:
            self.bar.update(iteration - self.bar.n)  # called a few times per second, not per step

        def evaluated(self, iteration: int, loss: float, val_acc: float, val_loss: float = math.nan,
                      arm: str = "") -> None:
            self.bar.set_postfix(loss=f"{loss:.4f}", val_acc=f"{val_acc:.4f}", refresh=False)

        def training_finished(self) -> None:
            self.bar.close()

        def message(self, text: str) -> None:
            tqdm.write(text, file=sys.stderr)  # keeps an active bar intact

    return Bars()
