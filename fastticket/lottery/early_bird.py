"""Early-bird tickets (You et al., ICLR 2020): stop a level's training once its pruning mask has settled.

At every evaluation the tracker draws the mask that pruning the current weights would give (the same
pruning the next level applies) and measures the fraction of mask entries that changed since the previous
evaluation (normalised Hamming distance over the pruned layers). When that fraction stays below `eps` for
`patience` consecutive evaluations, the tracker asks the training loop to stop: the weights at that
iteration are the arm's final weights, so the next level prunes exactly the mask drawn there.

The tracker is a per-evaluation hook (`__call__(model, iteration) -> stop?`) with a state_dict, which the
arm's checkpoint carries, so a resumed arm stops at the same iteration as an uninterrupted one.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import torch
from torch import nn

Masks = Dict[str, torch.Tensor]

PATIENCE = 3  # consecutive evaluations below eps before stopping ("a few in a row")


def mask_distance(a: Masks, b: Masks) -> float:
    """Fraction of entries that differ between two mask sets over the same layers."""
    if set(a) != set(b):
        raise ValueError(f"mask sets cover different layers: {sorted(a)} vs {sorted(b)}")
    changed = sum(int((a[n].bool().cpu() != b[n].bool().cpu()).sum()) for n in a)
    total = sum(a[n].numel() for n in a)
    return changed / total if total else 0.0


class EarlyBird:
    """The mask-distance tracker of one arm."""

    def __init__(self, eps: float, draw_mask: Callable[[nn.Module], Masks], iterations: int,
                 patience: int = PATIENCE, min_iter: int = 0) -> None:
        self.eps, self.draw_mask, self.iterations = eps, draw_mask, iterations
        self.patience, self.min_iter = patience, min_iter
        self.previous: Optional[Masks] = None
        self.distances: list = []   # (iteration, distance) of every comparison
        self.streak = 0
        self.stopped_at: Optional[int] = None

    @property
    def stopped(self) -> bool:
        return self.stopped_at is not None

    def __call__(self, model: nn.Module, iteration: int) -> bool:
        """Record the mask at this evaluation; True when training should stop here."""
        if self.stopped:
            return True
        if iteration < self.min_iter:  # late rewinding: the rewind point does not exist yet
            return False
        masks = {n: m.detach().to("cpu", copy=True).bool() for n, m in self.draw_mask(model).items()}
        if self.previous is not None:
            distance = mask_distance(self.previous, masks)
            self.distances.append((iteration, distance))
            self.streak = self.streak + 1 if distance < self.eps else 0
            if self.streak >= self.patience and iteration < self.iterations:
                self.stopped_at = iteration
        self.previous = masks
        return self.stopped

    def result_fields(self) -> Dict[str, Any]:
        """What the arm's result.json records: where the mask was drawn and the iterations saved."""
        return {"early_bird_iter": self.stopped_at,
                "iterations_saved": 0 if self.stopped_at is None else self.iterations - self.stopped_at,
                "mask_distances": [[int(i), float(d)] for i, d in self.distances]}

    def state_dict(self) -> Dict[str, Any]:
        return {"previous": self.previous, "distances": list(self.distances), "streak": self.streak,
                "stopped_at": self.stopped_at}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.previous = state["previous"]
        self.distances = [tuple(d) for d in state["distances"]]
        self.streak, self.stopped_at = int(state["streak"]), state["stopped_at"]
