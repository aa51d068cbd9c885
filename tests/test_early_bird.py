"""Early-bird tickets (fastticket.lottery.early_bird): the tracker stops when the mask settles, and not before."""
import torch

from fastticket.lottery.early_bird import PATIENCE, EarlyBird, mask_distance


def masks_with_changes(seq):
    """Masks over 100 entries where evaluation i flips seq[i] entries relative to evaluation i-1."""
    current = torch.zeros(100, dtype=torch.bool)
    current[:50] = True
    out = [current.clone()]
    for flips in seq:
        current = current.clone()
        current[:flips] = ~current[:flips]
        out.append(current.clone())
    return [{"a": m[:60].reshape(6, 10), "b": m[60:]} for m in out]


def run(tracker, masks, every=10):
    it = iter(masks)
    tracker.draw_mask = lambda model: next(it)
    for i in range(len(masks)):
        if tracker(None, (i + 1) * every):
            return (i + 1) * every
    return None


def test_mask_distance_is_the_fraction_of_changed_entries():
    a = {"x": torch.tensor([True, False, True, True])}
    b = {"x": torch.tensor([True, True, False, True])}
    assert mask_distance(a, b) == 0.5


def test_stops_after_patience_settled_evaluations_not_before():
    assert PATIENCE == 3
    # distances: 0.2, 0.01, 0.01, 0.3 (streak broken), 0.01, 0.01, 0.01 -> stop at the 8th evaluation
    masks = masks_with_changes([20, 1, 1, 30, 1, 1, 1, 1, 1])
    tracker = EarlyBird(0.05, None, iterations=1000)
    assert run(tracker, masks) == 80
    assert tracker.result_fields()["early_bird_iter"] == 80
    assert tracker.result_fields()["iterations_saved"] == 920


def test_never_stops_while_the_mask_keeps_moving():
    tracker = EarlyBird(0.05, None, iterations=1000)
    assert run(tracker, masks_with_changes([10] * 9)) is None
    assert tracker.result_fields() == {**tracker.result_fields(), "early_bird_iter": None, "iterations_saved": 0}


def test_no_masks_before_min_iter_and_state_round_trips():
    calls = []
    tracker = EarlyBird(0.05, lambda m: calls.append(1) or {"a": torch.ones(3, dtype=torch.bool)},
                        iterations=100, min_iter=25)
    assert not tracker(None, 10) and not tracker(None, 20)
    assert not calls
    tracker(None, 30)
    tracker(None, 40)
    twin = EarlyBird(0.05, tracker.draw_mask, iterations=100, min_iter=25)
    twin.load_state_dict(tracker.state_dict())
    assert twin(None, 50) == tracker(None, 50)
    assert twin.stopped_at == tracker.stopped_at == None  # noqa: E711  two comparisons so far
    assert twin(None, 60) and tracker(None, 60)
