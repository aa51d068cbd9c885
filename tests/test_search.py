"""fastticket.lottery.search: the IMP driver on the embedded mnist5k data with tiny schedules."""
import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from fastticket.lottery.data import load_dataset
from fastticket.errors import ConfigError, RunDirError
from fastticket.sparse.nn import masked_modules
from fastticket.lottery.presets import get_preset
from fastticket.lottery.rundir import arm_dir
from fastticket.lottery.search import run_search
from fastticket.sparse.rewind import rewind_to
from fastticket.sparse.testing import rel_error
from fastticket.lottery.train import build_masked_model
from run_snapshot import ONE_THREAD_ENV, load, run_dir_snapshot

LAYERS = ("fc.0", "fc.1", "output")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny(**changes):
    base = dict(iterations=30, eval_every=10, levels=2, controls=["reinit", "random"], val_size=500)
    base.update(changes)
    return get_preset("lenet-mnist5k").replace(**base)


def result(run, level, arm, trial=0):
    with open(os.path.join(arm_dir(run, level, arm, trial), "result.json")) as f:
        return json.load(f)


def metrics(run, level, arm, trial=0):
    with open(os.path.join(arm_dir(run, level, arm, trial), "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def expected_alive(size, hundredths, level):
    alive = size
    for _ in range(level):
        alive -= (alive * hundredths + 50) // 100  # floor(rate * alive + 1/2), the documented rounding
    return alive


def _keeping_checkpoints(config, out):
    """run_search with finished arms keeping their rolling checkpoint (a real run drops it: see
    test_finished_arms_drop_their_checkpoint), so tests can inspect the optimizer state at the end."""
    from fastticket.lottery.armdir import ArmDir
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ArmDir, "drop_checkpoint", lambda self: None)
        return run_search(config, out, progress=False)


@pytest.fixture(scope="module")
def adam_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("adam") / "run")
    config = tiny()
    rows = _keeping_checkpoints(config, out)
    return config, out, rows


@pytest.fixture(scope="module")
def sgd_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("sgd") / "run")
    # Weight decay and momentum are what would revive pruned weights if the optimizer did not mask them.
    config = tiny(optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=1e-3, levels=1, controls=["random"])
    return config, out, _keeping_checkpoints(config, out)


def test_run_directory_layout(adam_run):
    config, out, rows = adam_run
    with open(os.path.join(out, "config.json")) as f:
        # "auto" is recorded as the device actually used.
        used = "cuda" if torch.cuda.is_available() else "cpu"
        assert json.load(f) == json.loads(config.replace(device=used).to_json())
    assert [(r["level"], r["arm"]) for r in rows] == [
        (0, "ticket"), (1, "ticket"), (1, "reinit"), (1, "random"), (2, "ticket"), (2, "reinit"), (2, "random")]
    for r in rows:
        d = arm_dir(out, r["level"], r["arm"], 0)
        expected_files = {"mask.pt", "metrics.jsonl", "checkpoint.pt", "final.pt", "result.json", "checksums.json"}
        if r["arm"] == "ticket":
            expected_files.add("rewind.pt")
        assert set(os.listdir(d)) == expected_files, d
        assert r == result(out, r["level"], r["arm"])
        assert r["status"] == "ok" and r["final_iter"] == 30 and r["wall_time_s"] > 0
        lines = metrics(out, r["level"], r["arm"])
        assert [m["iteration"] for m in lines] == [10, 20, 30]
        assert set(lines[0]) == {"iteration", "train_loss", "val_loss", "val_acc", "test_acc"}
        best = min(lines, key=lambda m: m["val_loss"])
        assert r["early_stop_iter"] == best["iteration"]
        assert r["early_stop_val_loss"] == best["val_loss"]
        assert r["test_acc_at_early_stop"] == best["test_acc"]
        assert r["final_test_acc"] == lines[-1]["test_acc"]
        assert 0.5 < r["final_test_acc"] <= 1.0  # it learned something in 30 steps
    # Atomic writes leave no temp files behind.
    assert not glob.glob(os.path.join(out, "**", "*.tmp"), recursive=True)
    assert glob.glob(os.path.join(out, "**", ".*"), recursive=True) == [os.path.join(out, ".lock")]


def test_ticket_densities_follow_the_layerwise_rates_exactly(adam_run):
    config, out, rows = adam_run
    sizes = {"fc.0": 784 * 300, "fc.1": 300 * 100, "output": 100 * 10}
    rates = {"fc.0": 20, "fc.1": 20, "output": 10}  # the preset: fc 20 %, output 10 %
    for level in range(3):
        masks = load(os.path.join(arm_dir(out, level, "ticket", 0), "mask.pt"))
        assert set(masks) == set(LAYERS)
        alive = {n: expected_alive(sizes[n], rates[n], level) for n in LAYERS}
        assert {n: int(m.sum()) for n, m in masks.items()} == alive
        r = result(out, level, "ticket")
        assert r["layer_density"] == pytest.approx({n: alive[n] / sizes[n] for n in LAYERS}, abs=0)
        assert r["density"] == sum(alive.values()) / sum(sizes.values())
        if level:
            prev = load(os.path.join(arm_dir(out, level - 1, "ticket", 0), "mask.pt"))
            assert all(not (masks[n] & ~prev[n]).any() for n in LAYERS), "masks only shrink"


def _check_pruned_stay_zero(out, rows):
    for r in rows:
        d = arm_dir(out, r["level"], r["arm"], 0)
        masks = load(os.path.join(d, "mask.pt"))
        final = load(os.path.join(d, "final.pt"))
        ckpt = load(os.path.join(d, "checkpoint.pt"))  # kept by the fixtures (_keeping_checkpoints)
        param_names = [k for k in final if not k.endswith("weight_mask")]
        for name in LAYERS:
            w, m = final[f"{name}.weight"], masks[name]
            assert torch.equal(final[f"{name}.weight_mask"], m)
            assert (w[~m] == 0).all(), f"{d}: a pruned weight of {name} moved"
            assert (w[m] != 0).float().mean() > 0.99
            # Optimizer state is zero on pruned entries too, so no later step can revive them.
            state = ckpt["optimizer"]["state"][param_names.index(f"{name}.weight")]
            for key, value in state.items():
                if key != "step" and value.shape == m.shape:
                    assert (value[~m] == 0).all(), f"{d}: optimizer state {key} of {name} nonzero where pruned"
        if r["level"] > 0:
            assert (~masks["fc.0"]).any()


def test_pruned_weights_stay_exactly_zero_with_adam(adam_run):
    _, out, rows = adam_run
    _check_pruned_stay_zero(out, rows)


def test_pruned_weights_stay_exactly_zero_with_sgd(sgd_run):
    _, out, rows = sgd_run
    assert [r["status"] for r in rows] == ["ok"] * 3
    _check_pruned_stay_zero(out, rows)


def test_rewind_point_is_the_init_and_rewinding_gives_init_times_mask(adam_run):
    config, out, _ = adam_run
    data = load_dataset(config.dataset, config.data_dir, "cpu", config.val_size, config.seed)
    init = build_masked_model(config, data.info, config.seed, torch.device("cpu")).state_dict()
    for level in range(3):
        rewind = load(os.path.join(arm_dir(out, level, "ticket", 0), "rewind.pt"))
        assert rewind.keys() == init.keys()
        assert all(torch.equal(rewind[k], init[k]) for k in init)

    # rewind_to on a trained, pruned model: exactly init * mask for weights, init for everything else.
    model = build_masked_model(config, data.info, 123, torch.device("cpu"))
    final = load(os.path.join(arm_dir(out, 2, "ticket", 0), "final.pt"))
    model.load_state_dict(final)
    rewind_to(model, init)
    state = model.state_dict()
    for name, layer in masked_modules(model):
        assert torch.equal(layer.weight_mask, final[f"{name}.weight_mask"])
        assert torch.equal(layer.weight, init[f"{name}.weight"] * layer.weight_mask)
        assert torch.equal(state[f"{name}.bias"], init[f"{name}.bias"])


def test_late_rewinding_uses_the_weights_of_iteration_k(tmp_path):
    late = str(tmp_path / "late")
    run_search(tiny(rewind_iter=10, levels=1, controls=["random"]), late, progress=False)
    short = str(tmp_path / "short")
    run_search(tiny(iterations=10, levels=0, controls=[]), short, progress=False)
    rewind = load(os.path.join(arm_dir(late, 0, "ticket", 0), "rewind.pt"))
    after_10 = load(os.path.join(arm_dir(short, 0, "ticket", 0), "final.pt"))
    assert rewind.keys() == after_10.keys()
    assert all(torch.equal(rewind[k], after_10[k]) for k in rewind)
    assert torch.equal(load(os.path.join(arm_dir(late, 1, "ticket", 0), "rewind.pt"))["fc.0.weight"],
                       rewind["fc.0.weight"])
    # Level 1 continues the clock from iteration k: evaluations at 20 and 30 only.
    for arm in ("ticket", "random"):
        assert [m["iteration"] for m in metrics(late, 1, arm)] == [20, 30]
        assert result(late, 1, arm)["final_iter"] == 30


def test_controls_use_the_documented_masks(adam_run):
    _, out, _ = adam_run
    for level in (1, 2):
        ticket = load(os.path.join(arm_dir(out, level, "ticket", 0), "mask.pt"))
        reinit = load(os.path.join(arm_dir(out, level, "reinit", 0), "mask.pt"))
        random = load(os.path.join(arm_dir(out, level, "random", 0), "mask.pt"))
        t_final = load(os.path.join(arm_dir(out, level, "ticket", 0), "final.pt"))
        r_final = load(os.path.join(arm_dir(out, level, "reinit", 0), "final.pt"))
        for n in LAYERS:
            assert torch.equal(reinit[n], ticket[n])
            assert int(random[n].sum()) == int(ticket[n].sum())
            assert not torch.equal(random[n], ticket[n])
        assert not torch.equal(r_final["fc.0.weight"], t_final["fc.0.weight"])
        assert result(out, level, "random")["layer_density"] == result(out, level, "ticket")["layer_density"]
        assert result(out, level, "reinit")["density"] == result(out, level, "ticket")["density"]
    # Different levels draw different random masks and different reinit seeds.
    assert not torch.equal(load(os.path.join(arm_dir(out, 1, "reinit", 0), "final.pt"))["output.weight"],
                           load(os.path.join(arm_dir(out, 2, "reinit", 0), "final.pt"))["output.weight"])


def test_nan_loss_marks_the_arm_diverged_and_the_search_ends_cleanly(tmp_path, capsys):
    out = str(tmp_path / "nan")
    rows = run_search(tiny(lr=1e30, levels=2, controls=["reinit"]), out, progress=False)
    assert len(rows) == 1
    r = rows[0]
    assert r["status"] == "diverged" and "loss became" in r["message"]
    assert r["final_test_acc"] is None
    d = arm_dir(out, 0, "ticket", 0)
    # The diverged state is final.pt; a finished arm drops its rolling checkpoint.
    assert {"final.pt", "mask.pt", "result.json", "metrics.jsonl"} <= set(os.listdir(d))
    assert "checkpoint.pt" not in os.listdir(d)
    assert not os.path.exists(arm_dir(out, 1, "ticket", 0))  # nothing to prune: later levels skipped
    err = capsys.readouterr().err
    assert "diverged" in err and "Traceback" not in err
    # Resuming a finished (diverged) search does not retrain or fail.
    assert run_search(tiny(lr=1e30, levels=2, controls=["reinit"]), out, resume=True, progress=False) == rows


def test_resume_skips_finished_arms_and_checks_the_config(adam_run, tmp_path):
    config, out, rows = adam_run
    # adam_run keeps finished arms' checkpoints for other tests; a resume drops them (what a kill between
    # result.json and the checkpoint's removal leaves), so the finished state is the one after that.
    assert run_search(config, out, resume=True, progress=False) == rows
    stamps = {p: os.stat(p).st_mtime_ns for p in glob.glob(os.path.join(out, "levels", "*", "*", "*"))}
    assert run_search(config, out, resume=True, progress=False) == rows
    assert stamps == {p: os.stat(p).st_mtime_ns for p in glob.glob(os.path.join(out, "levels", "*", "*", "*"))}
    with pytest.raises(RunDirError, match="pass --resume"):
        run_search(config, out, progress=False)
    with pytest.raises(RunDirError, match=r"differs .* in lr, rate"):
        run_search(config.replace(rate=0.3, lr=0.01), out, resume=True, progress=False)


def test_config_records_the_backend_and_threshold_overrides_and_resume_checks_them(tmp_path, monkeypatch):
    """config.json says how the numbers were computed: the backend used and any dispatch threshold set in
    the environment; resuming under another one is refused like any changed setting."""
    out = str(tmp_path / "run")
    monkeypatch.delenv("FASTTICKET_BACKEND", raising=False)
    monkeypatch.setenv("FASTTICKET_DENSE_THRESHOLD_LINEAR", "0.7")
    config = tiny(levels=0, controls=[], iterations=10)
    run_search(config, out, progress=False)
    with open(os.path.join(out, "config.json")) as f:
        saved = json.load(f)
    assert saved["backend"] == "auto" and saved["dense_thresholds"] == {"linear": 0.7}
    monkeypatch.setenv("FASTTICKET_DENSE_THRESHOLD_LINEAR", "0.6")
    with pytest.raises(RunDirError, match="dense_thresholds"):
        run_search(config, out, resume=True, progress=False)
    monkeypatch.setenv("FASTTICKET_DENSE_THRESHOLD_LINEAR", "0.7")
    monkeypatch.setenv("FASTTICKET_BACKEND", "triton")  # runs on CPU here: the tests' Triton interpreter
    with pytest.raises(RunDirError, match="backend"):
        run_search(config, out, resume=True, progress=False)
    monkeypatch.delenv("FASTTICKET_BACKEND")  # the run's own settings again: it resumes
    run_search(config, out, resume=True, progress=False)


def test_foreign_mask_on_resume_is_recomputed(tmp_path, capsys):
    """A mask.pt that fails verification is never used: it is recomputed (one line says so), same result."""
    out = str(tmp_path / "run")
    config = tiny(levels=1, controls=[], iterations=10)
    rows = run_search(config, out, progress=False)
    d = arm_dir(out, 1, "ticket", 0)
    for name in ("result.json", "final.pt"):
        os.remove(os.path.join(d, name))
    torch.save({"fc.0": torch.ones(3, 3, dtype=torch.bool)}, os.path.join(d, "mask.pt"))
    capsys.readouterr()
    again = run_search(config, out, resume=True, progress=False)
    assert [dict(r, wall_time_s=0) for r in again] == [dict(r, wall_time_s=0) for r in rows]
    err = capsys.readouterr().err
    assert "mask.pt failed verification" in err and "recomputing" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_cuda_without_gpu_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        run_search(tiny(device="cuda"), str(tmp_path / "x"), progress=False)
    assert not os.path.exists(tmp_path / "x")


@pytest.mark.parametrize("changes, match", [
    (dict(levels=-1), "levels"), (dict(iterations=0), "iterations"), (dict(rate=1.0), "rate"),
    (dict(granularity="block:0x2"), "granularity"), (dict(model="lenet9000"), "unknown model"),
    (dict(dataset="imagenet"), "unknown dataset"), (dict(optimizer="lion"), "optimizer"),
    (dict(controls=["shuffle"]), "control"), (dict(rewind_iter=30), "rewind_iter"),
])
def test_bad_settings_fail_before_anything_is_written(tmp_path, changes, match):
    with pytest.raises(ConfigError, match=match):
        run_search(tiny(**changes), str(tmp_path / "x"), progress=False)
    assert not os.path.exists(tmp_path / "x")


def _search_cmd(out, *extra):
    return [sys.executable, "-m", "fastticket", "search", "--levels", "1", "--iterations", "80",
            "--eval-every", "4", "--controls", "reinit", "--out", out, "--no-progress", *extra]


def test_resume_after_sigkill_equals_an_uninterrupted_run(tmp_path):
    env = ONE_THREAD_ENV
    # The uninterrupted reference runs in this process (one thread, like the subprocesses): same code, same
    # batches, same arithmetic, so any difference is the resume's fault.
    whole = str(tmp_path / "whole")
    run_search(get_preset("lenet-mnist5k").replace(levels=1, iterations=80, eval_every=4, controls=["reinit"]),
               whole, progress=False)

    cut = str(tmp_path / "cut")
    proc = subprocess.Popen(_search_cmd(cut), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def unfinished_level1_arms():
        # An arm of level 1 with a rolling checkpoint but no result.json: interrupted mid-level.
        return [d for d in glob.glob(os.path.join(cut, "levels", "level_01", "*"))
                if os.path.exists(os.path.join(d, "checkpoint.pt"))
                and not os.path.exists(os.path.join(d, "result.json"))]

    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            if unfinished_level1_arms():
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.002)
    finally:
        proc.kill()
        proc.wait()
    interrupted = unfinished_level1_arms()
    assert interrupted, "the run finished level 1 before it could be killed"
    ckpt = load(os.path.join(interrupted[0], "checkpoint.pt"))
    assert 0 < ckpt["iteration"] <= 80

    done = subprocess.run(_search_cmd(cut, "--resume"), env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr

    rows_a, tensors_a, lines_a = run_dir_snapshot(whole)
    rows_b, tensors_b, lines_b = run_dir_snapshot(cut)
    assert len(rows_a) == 3
    assert rows_a == rows_b
    assert lines_a == lines_b
    assert tensors_a.keys() == tensors_b.keys()
    for key in tensors_a:
        for name, t in tensors_a[key].items():
            assert torch.equal(t, tensors_b[key][name]), f"{key}:{name} differs after resume"
    assert not glob.glob(os.path.join(cut, "**", ".*.tmp"), recursive=True)


def test_global_block_search_with_exclusions_and_movement(tmp_path):
    out = str(tmp_path / "run")
    config = tiny(levels=1, iterations=10, eval_every=5, controls=["random"], scope="global", exclude=["output"],
                  granularity="block:10x16", criterion="movement")
    rows = run_search(config, out, progress=False)
    assert [r["status"] for r in rows] == ["ok"] * 3
    ticket = load(os.path.join(arm_dir(out, 1, "ticket", 0), "mask.pt"))
    random = load(os.path.join(arm_dir(out, 1, "random", 0), "mask.pt"))
    assert ticket["output"].all() and random["output"].all()  # excluded: stays dense in every arm
    tiles = {"fc.0": 30 * 49, "fc.1": 10 * 19}  # ceil(300/10) x ceil(784/16), ceil(100/10) x ceil(300/16)
    removed = 0
    for name, (rows_, cols) in (("fc.0", (300, 784)), ("fc.1", (100, 300))):
        for masks in (ticket, random):
            m = masks[name]
            padded = torch.zeros(-(-rows_ // 10) * 10, -(-cols // 16) * 16, dtype=torch.bool)
            padded[:rows_, :cols] = m
            per_tile = padded.view(-(-rows_ // 10), 10, -(-cols // 16), 16).sum(dim=(1, 3))
            full = torch.zeros_like(padded)
            full[:rows_, :cols] = True
            size = full.view_as(padded).view(per_tile.shape[0], 10, per_tile.shape[1], 16).sum(dim=(1, 3))
            assert ((per_tile == 0) | (per_tile == size)).all(), f"{name}: a tile is partly pruned"
        removed += int((ticket[name].reshape(rows_, cols)[::10, ::16] == 0).sum())
        assert int(random[name][::10, ::16].sum()) == int(ticket[name][::10, ::16].sum())  # same live tiles
    assert removed == round(0.2 * sum(tiles.values()))  # one global tile count across both layers
    assert result(out, 1, "ticket")["layer_density"]["output"] == 1.0


@pytest.mark.launches_triton
def test_search_on_the_triton_backend_matches_the_torch_backend(tmp_path, monkeypatch):
    """The IMP driver on the triton backend: a lone arm stacked (grouped masked-linear calls), fused Triton
    optimizer steps (here in the interpreter), the same numbers as the PyTorch backend within fp32 rounding, pruned weights exactly zero."""
    from fastticket.sparse.backend import use_backend
    from fastticket.kernels import masked_optim

    from fastticket.sparse import linear as grouped_linear

    launches, grouped = [], []
    real_sgd_step = masked_optim.sgd_step_
    monkeypatch.setattr(masked_optim, "sgd_step_", lambda *a, **k: launches.append(1) or real_sgd_step(*a, **k))
    real_grouped = grouped_linear.grouped_masked_linear
    monkeypatch.setattr(grouped_linear, "grouped_masked_linear",
                        lambda *a, **k: grouped.append(1) or real_grouped(*a, **k))
    config = tiny(iterations=6, eval_every=3, levels=1, controls=[], optimizer="sgd", lr=0.05, momentum=0.9,
                  weight_decay=1e-3, granularity="block:16x16", val_size=100)
    rows = {}
    for backend in ("torch", "triton"):
        with use_backend(backend):
            rows[backend] = run_search(config, str(tmp_path / backend), progress=False)
    assert len(launches) == 12  # 6 steps x 2 levels, one launch per step on the triton backend only
    # A level's lone arm trains stacked on the triton backend too: its 3 masked linear layers as grouped calls.
    assert len(grouped) == 3 * 12
    assert [r["density"] for r in rows["triton"]] == [r["density"] for r in rows["torch"]]
    _same_tickets(str(tmp_path / "triton"), str(tmp_path / "torch"),
                  lambda ours, ref, key: torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6))


def test_compiled_search_matches_the_eager_search(tmp_path, monkeypatch):
    """`--compile` (SearchConfig.compile): the training step compiled with fullgraph=True (aot_eager here: CPU
    CI cannot afford inductor's C++ builds) gives the eager search's weights within a relative 1e-5 (the
    compiled Adam step reorders a few float operations), pruned weights exactly zero."""
    monkeypatch.setenv("FASTTICKET_COMPILE_BACKEND", "aot_eager")
    config = tiny(iterations=6, eval_every=3, levels=1, controls=[], val_size=100)
    rows = {compiled: run_search(config.replace(compile=compiled), str(tmp_path / str(compiled)), progress=False)
            for compiled in (False, True)}
    torch._dynamo.reset()
    assert [r["density"] for r in rows[True]] == [r["density"] for r in rows[False]]
    for a, b in zip(rows[True], rows[False]):
        assert a["final_test_acc"] == pytest.approx(b["final_test_acc"], abs=2e-3)  # one image in 500 may flip
    def close(ours, ref, key):
        assert rel_error(ours, ref) < 1e-5, key

    _same_tickets(str(tmp_path / "True"), str(tmp_path / "False"), close)


def _same_tickets(run, reference, close):
    """The level 0 and 1 tickets' final.pt of `run` against `reference`: masks equal, pruned weights exactly
    zero, every other tensor checked by close(ours, ref, key)."""
    for level in (0, 1):
        ours = load(os.path.join(arm_dir(run, level, "ticket", 0), "final.pt"))
        ref = load(os.path.join(arm_dir(reference, level, "ticket", 0), "final.pt"))
        for key, value in ref.items():
            if key.endswith("weight_mask"):
                assert torch.equal(ours[key], value)
                assert torch.all(ours[key[:-len("_mask")]][~value] == 0)
            else:
                close(ours[key], value, key)


def test_config_validates_itself_and_round_trips_through_config_json():
    from fastticket.lottery.config import SearchConfig
    config = get_preset("resnet20-cifar10")
    assert isinstance(config.lr_milestones, tuple) and isinstance(config.exclude, tuple)
    # config.json holds lists; reading it back (as --resume does) gives the same config, with tuples.
    saved = json.loads(config.to_json())
    assert saved["lr_milestones"] == [20_000, 25_000] and saved["controls"] == ["reinit"]
    assert SearchConfig.from_dict(saved) == config
    # Building or replacing a config checks it: the same message the search and the CLI give.
    with pytest.raises(ConfigError, match=r"output_rate must be in \(0, 1\)"):
        config.replace(output_rate=1.5)
    with pytest.raises(ConfigError, match="scope"):
        SearchConfig(scope="everywhere")
    with pytest.raises(ConfigError, match="criterion"):
        SearchConfig(criterion="gradient")
