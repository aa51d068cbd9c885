"""The comparison methods inside a search: rewind modes, pruning-at-init controls, refilled tickets, early-bird."""
import json
import os

import pytest
import torch

import fastticket.lottery.search as search_mod
import fastticket.lottery.train as train_mod
from fastticket.app.cli import main
from fastticket.lottery.presets import get_preset
from fastticket.lottery.rundir import arm_dir
from fastticket.lottery.search import run_search
from fastticket.lottery.arm_state import lr_at
from fastticket.lottery.train import cpu_state

pytestmark = pytest.mark.usefixtures("one_torch_thread")
PRUNED = ("fc.0", "fc.1", "output")


def tiny(**changes):
    base = dict(iterations=12, eval_every=4, levels=1, controls=(), val_size=500)
    base.update(changes)
    return get_preset("lenet-mnist5k").replace(**base)


def result(run, level, arm, trial=0):
    with open(os.path.join(arm_dir(run, level, arm, trial), "result.json")) as f:
        return json.load(f)


def load(run, level, arm, name):
    return torch.load(os.path.join(arm_dir(run, level, arm, 0), name), map_location="cpu", weights_only=True)


@pytest.fixture
def spy(monkeypatch):
    """Records the lr of every step ((level, arm) -> [(iteration, lr)]) and each arm's starting weights."""
    lrs, starts = {}, {}
    real_lr, real_train = train_mod.arm_lr, search_mod.train_arms

    def arm_lr(config, spec, iteration):
        # The training loop asks once per step for a group of arms sharing their start and lr rule (these
        # tests train the ticket alone), with the group's first arm.
        value = real_lr(config, spec, iteration)
        lrs.setdefault((spec.level, spec.arm), []).append((iteration, value))
        return value

    def train_arms(config, jobs, *args, **kwargs):
        for job in jobs:
            starts[(job.spec.level, job.spec.arm)] = cpu_state(job.model)
        return real_train(config, jobs, *args, **kwargs)

    monkeypatch.setattr(train_mod, "arm_lr", arm_lr)
    monkeypatch.setattr(search_mod, "train_arms", train_arms)
    return lrs, starts


SCHEDULE = dict(lr_milestones=(4, 8), lr_gamma=0.1, rewind_iter=2, optimizer="sgd", lr=0.1)


@pytest.mark.parametrize("mode", ["weights", "lr", "none"])
def test_rewind_modes_lr_at_each_iteration_and_starting_weights(tmp_path, spy, mode):
    lrs, starts = spy
    config = tiny(rewind=mode, **SCHEDULE)
    run = str(tmp_path / mode)
    run_search(config, run)
    steps = lrs[(1, "ticket")]
    assert [i for i, _ in steps] == list(range(2, 12))  # iterations k..end in every mode
    final_lr = lr_at(config, 11)
    assert final_lr == pytest.approx(0.001)
    expected = [final_lr] * 10 if mode == "none" else [lr_at(config, i) for i in range(2, 12)]
    assert [v for _, v in steps] == pytest.approx(expected)
    assert [v for _, v in lrs[(0, "ticket")]] == pytest.approx([lr_at(config, i) for i in range(12)])
    mask = load(run, 1, "ticket", "mask.pt")
    source = load(run, 0, "ticket", "rewind.pt") if mode == "weights" else load(run, 0, "ticket", "final.pt")
    for layer in PRUNED:
        start = starts[(1, "ticket")][f"{layer}.weight"]
        assert torch.equal(start, source[f"{layer}.weight"] * mask[layer]), layer
    assert result(run, 1, "ticket")["rewind"] == mode
    with open(os.path.join(run, "config.json")) as f:
        assert json.load(f)["rewind"] == mode


def test_pai_controls_match_the_ticket_density_and_train_from_init(tmp_path, spy):
    _, starts = spy
    run = str(tmp_path / "pai")
    run_search(tiny(controls=("snip", "grasp", "synflow")), run)
    ticket_mask = load(run, 1, "ticket", "mask.pt")
    alive = sum(int(ticket_mask[n].sum()) for n in PRUNED)
    init = load(run, 0, "ticket", "rewind.pt")
    seen = []
    for arm in ("snip", "grasp", "synflow"):
        mask = load(run, 1, arm, "mask.pt")
        assert sum(int(mask[n].sum()) for n in PRUNED) == alive, arm
        assert result(run, 1, arm)["density"] == result(run, 1, "ticket")["density"]
        assert any(not torch.equal(mask[n], ticket_mask[n]) for n in PRUNED), arm
        for n in PRUNED:  # the trial's init, pruned
            assert torch.equal(starts[(1, arm)][f"{n}.weight"], init[f"{n}.weight"] * mask[n])
        with open(os.path.join(arm_dir(run, 1, arm, 0), "metrics.jsonl")) as f:
            assert json.loads(f.readline())["iteration"] == 4
        seen.append(torch.cat([mask[n].reshape(-1) for n in PRUNED]))
    assert not torch.equal(seen[0], seen[2])  # SNIP and SynFlow choose differently


def test_refilled_tickets_are_whole_tiles_and_record_both_densities(tmp_path):
    run = str(tmp_path / "refill")
    run_search(tiny(refill="block:4x4", levels=2), run)
    previous = None
    for level in (1, 2):
        mask = load(run, level, "ticket", "mask.pt")
        res = result(run, level, "ticket")
        assert res["refill"] == "block:4x4"
        assert abs(res["element_density"] - res["density"]) < 0.01
        for n in ("fc.0", "fc.1"):  # full 4x4 tiles: density within half a tile of the element ticket
            m = mask[n].reshape(mask[n].shape[0] // 4, 4, -1, 4)
            per_tile = m.sum(dim=(1, 3))
            assert bool(((per_tile == 0) | (per_tile == 16)).all()), n
            if previous is not None:
                assert not bool((mask[n] & ~previous[n]).any())  # masks only shrink
        previous = mask


def test_early_bird_stops_the_ticket_and_prunes_its_mask(tmp_path):
    run = str(tmp_path / "eb")
    run_search(tiny(early_bird=0.5, iterations=40, eval_every=4, levels=1), run)
    res = result(run, 0, "ticket")
    # evaluations at 4, 8, 12, 16: three comparisons below 0.5 -> stop at 16
    assert res["early_bird_iter"] == 16 and res["final_iter"] == 16 and res["iterations_saved"] == 24
    assert len(res["mask_distances"]) == 3
    res1 = result(run, 1, "ticket")
    assert res1["early_bird_iter"] == 16  # level 1 trains iterations 0..40 and stops at 16 too
    never = str(tmp_path / "never")
    run_search(tiny(early_bird=1e-9, iterations=16, eval_every=4, levels=1), never)
    assert result(never, 0, "ticket")["early_bird_iter"] is None
    assert result(never, 0, "ticket")["final_iter"] == 16


def test_early_bird_resume_continues_the_tracker_from_the_checkpoint(tmp_path):
    from fastticket.lottery.progress import Progress

    class Interrupt(Progress):
        def evaluated(self, iteration, loss, val_acc, val_loss=None, arm=""):
            if iteration == 12:  # after the checkpoint at 12: two comparisons recorded, one to go
                raise KeyboardInterrupt

    config = tiny(early_bird=0.5, iterations=40, eval_every=4, levels=1)
    run = str(tmp_path / "eb")
    with pytest.raises(KeyboardInterrupt):
        run_search(config, run, progress=Interrupt())
    run_search(config, run, resume=True)
    resumed = result(run, 0, "ticket")
    # a tracker restarted empty would need three fresh comparisons (stop at 28); the checkpointed one stops at 16
    assert resumed["early_bird_iter"] == 16 and resumed["final_iter"] == 16
    straight = str(tmp_path / "straight")
    run_search(config, straight)
    for key in ("early_bird_iter", "test_acc_at_early_stop", "mask_distances"):
        assert resumed[key] == result(straight, 0, "ticket")[key], key


@pytest.mark.parametrize("argv, needle", [
    (["--early-bird", "0"], "early_bird eps must be in (0, 1)"),
    (["--early-bird", "1"], "early_bird eps must be in (0, 1)"),
    (["--refill", "block:16x16", "--granularity", "block:4x4"], "needs granularity element"),
    (["--refill", "block:200x200"], "larger than layer 'output'"),
    (["--refill", "16x16"], "refill must be 'block:RxC'"),
    (["--rewind", "late"], "must be one of weights, lr, none"),
    (["--controls", "snip,magic"], "unknown control(s) ['magic']"),
])
def test_bad_method_flags_are_one_clear_line(tmp_path, capsys, argv, needle):
    try:
        code = main(["search", "--levels", "1", "--iterations", "10", "--out", str(tmp_path / "r"), "--no-progress",
                     *argv])
    except SystemExit as exc:  # argparse's own exit for a bad flag value
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2
    assert needle in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not os.path.exists(tmp_path / "r")
