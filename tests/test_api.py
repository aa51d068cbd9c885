"""fastticket.search and `fastticket search --model/--data PKG.MODULE:FUNCTION`: a search on a user's own model
(a small CNN with BatchNorm and a residual connection, tests/user_sources.py) and data (generated, learnable)."""
import csv
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import fastticket
from fastticket.app import cli
from fastticket.errors import ConfigError, RunDirError
from fastticket.lottery.presets import get_preset
from fastticket.lottery.rundir import arm_dir
from fastticket.lottery.search import run_search
from run_snapshot import ONE_THREAD_ENV, load, run_dir_snapshot
from test_crash_sweep import FAULT_AT_ENV, forked, same_run
import user_sources
from user_sources import branchy, learnable_data, small_resnet

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TESTS = os.path.dirname(os.path.abspath(__file__))
ENV = dict(ONE_THREAD_ENV, PYTHONPATH=os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")]))
TINY = dict(levels=2, iterations=30, eval_every=10, batch_size=32, device="cpu")


def _layer_densities(run, level):
    return {name: m.float().mean().item() for name, m in load(os.path.join(arm_dir(run, level, "ticket", 0),
                                                                           "mask.pt")).items()}


def test_api_search_on_own_model_and_data(tmp_path):
    out = str(tmp_path / "run")
    result = fastticket.search(small_resnet, learnable_data(), out, **TINY)
    assert result.run_dir == out
    tickets = [r for r in result.rows if r["arm"] == "ticket"]
    assert [r["level"] for r in tickets] == [0, 1, 2]
    assert {r["arm"] for r in result.rows if r["level"] > 0} == {"ticket", "reinit"}
    assert tickets[0]["weights_remaining_pct"] == 100.0
    assert tickets[0]["test_acc_at_early_stop_mean"] > 60.0  # learned: chance is 50 %
    for level in (1, 2):  # every conv and linear layer loses 20 % of its surviving weights per level
        for name, d in _layer_densities(out, level).items():
            n = load(os.path.join(arm_dir(out, level, "ticket", 0), "mask.pt"))[name].numel()
            assert abs(d - 0.8 ** level) <= 1.5 / n, (level, name, d)
        assert tickets[level]["weights_remaining_pct"] == pytest.approx(100 * 0.8 ** level, abs=1.0)
    final = load(os.path.join(arm_dir(out, 2, "ticket", 0), "final.pt"))
    masks = [k for k in final if k.endswith("weight_mask")]
    assert len(masks) == 3
    for key in masks:
        weight, mask = final[key.replace("weight_mask", "weight")], final[key]
        assert (mask == 0).any() and torch.all(weight[mask == 0] == 0)
        assert torch.count_nonzero(weight[mask == 1]) > 0
    assert os.path.join(out, "report", "results.csv") in result.report_files
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["model"] == "user_sources:small_resnet"
    assert config["sources"]["model"].startswith("sha256:") and config["sources"]["dataset"].startswith("sha256:")
    # The same call again resumes: every arm is finished, the numbers are read back.
    again = fastticket.search(small_resnet, learnable_data(), out, resume=True, **TINY)
    assert again.rows == result.rows


def test_api_takes_modules_datasets_and_no_validation_split(tmp_path):
    torch.manual_seed(3)
    model = small_resnet()
    (xt, yt), _, test = learnable_data()
    train = torch.utils.data.TensorDataset(xt, yt)  # a map-style Dataset, converted to tensors once
    out = str(tmp_path / "run")
    result = fastticket.search(model, (train, None, test), out, **dict(TINY, levels=1, controls=()))
    # The module's weights are the init (deep-copied, not trained in place).
    rewind = load(os.path.join(arm_dir(out, 0, "ticket", 0), "rewind.pt"))
    assert torch.equal(rewind["0.weight"], model[0].weight.detach())
    # No validation split: early stopping takes the last evaluation.
    assert [r["early_stop_iter_mean"] for r in result.rows] == [30.0, 30.0]
    assert "no validation split" in open(os.path.join(out, "report", "results.md")).read()


def test_unstackable_model_trains_one_arm_at_a_time_and_says_so(tmp_path, capsys):
    out = str(tmp_path / "run")
    result = fastticket.search(branchy, learnable_data(), out, **dict(TINY, levels=1))
    assert "cannot be stacked" in capsys.readouterr().err
    for r in result.arms:
        assert r["arms_stacked"] is False and r["why_not_stacked"]


def test_api_refuses_what_it_cannot_do(tmp_path):
    data = learnable_data()
    for settings, match in [(dict(levles=2), "unknown setting"), (dict(dataset="mnist5k"), "set by search"),
                            (dict(optimizer=user_sources.noisy_sgd, compile=True), "drop compile"),
                            (dict(lr_scheduler=user_sources.step_lr, lr_milestones=[10]), "replaces lr_milestones"),
                            (dict(loss="mse"), "loss must be PKG.MODULE:FUNCTION")]:
        with pytest.raises(ConfigError, match=match):
            fastticket.search(small_resnet, data, str(tmp_path / "x"), **settings)
    with pytest.raises(ConfigError, match="val"):
        fastticket.search(small_resnet, (data[0], (data[1][0], data[1][0]), data[2]), str(tmp_path / "x"))
    with pytest.raises(ConfigError, match="val_size= applies to the built-in datasets only; pass your validation"):
        fastticket.search(small_resnet, data, str(tmp_path / "x"), val_size=100)
    with pytest.raises(ConfigError, match=r"larger than the training split of <python>:data\[tensors\[400, 1, 8, 8\], "
                                          r"tensors\[100, 1, 8, 8\], tensors\[100, 1, 8, 8\]\]@[0-9a-f]{12} \(400 examples\); "
                                          r"use --batch-size <= 400"):
        fastticket.search(small_resnet, data, str(tmp_path / "x"), batch_size=401, device="cpu")
    assert not os.path.exists(tmp_path / "x")


def test_resume_with_a_changed_function_is_refused_naming_it(tmp_path):
    out = str(tmp_path / "run")
    fastticket.search(small_resnet, learnable_data(), out, **dict(TINY, levels=0, iterations=10))

    def small_resnet_changed():
        return small_resnet()
    small_resnet_changed.__module__, small_resnet_changed.__qualname__ = "user_sources", "small_resnet"
    with pytest.raises(RunDirError, match="model function user_sources:small_resnet changed"):
        fastticket.search(small_resnet_changed, learnable_data(), out, resume=True, **dict(TINY, levels=0,
                                                                                           iterations=10))


def test_api_data_are_named_by_what_they_are_and_a_resume_on_other_data_is_refused(tmp_path):
    out = str(tmp_path / "run")
    settings = dict(TINY, levels=0, iterations=10)
    fastticket.search(small_resnet, learnable_data(), out, progress=False, **settings)
    with open(os.path.join(out, "config.json")) as f:
        recorded = json.load(f)
    assert recorded["dataset"].startswith("<python>:data[tensors[400, 1, 8, 8], tensors[100, 1, 8, 8], ")
    assert recorded["sources"]["dataset"].split(":")[1].startswith(recorded["dataset"].rsplit("@", 1)[1])
    train, val, test = learnable_data()
    names = {fastticket.app.api.data_name(s, "sha256:" + "ab" * 32) for s in [
        ((train[0], train[1]), val, test),
        (torch.utils.data.TensorDataset(*train), None, test)]}
    assert len(names) == 2 and any("TensorDataset(n=400), None, tensors" in n for n in names)
    other = learnable_data(seed=1)  # same shapes, other values: only the hash tells them apart
    with pytest.raises(RunDirError, match=r"cannot resume .* differs from its config.json in dataset, sources"):
        fastticket.search(small_resnet, other, out, resume=True, progress=False, **settings)


def _cli(out, *extra):
    return [sys.executable, "-m", "fastticket", "search", "--model", "user_sources:small_resnet", "--data",
            "user_sources:learnable_data", "--levels", "1", "--iterations", "40", "--eval-every", "4",
            "--controls", "reinit", "--device", "cpu", "--out", out, "--no-progress", *extra]


def test_cli_own_model_and_data_resume_after_kill_report_and_comparison(tmp_path, capsys):
    whole = str(tmp_path / "whole")  # the uninterrupted reference, in this process (one thread, as the CLI's)
    run_search(get_preset("lenet-mnist5k").replace(model="user_sources:small_resnet",
                                                   dataset="user_sources:learnable_data", levels=1, iterations=40,
                                                   eval_every=4, controls=("reinit",), device="cpu"),
               whole, progress=False)
    cut = str(tmp_path / "cut")
    proc = subprocess.Popen(_cli(cut), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def unfinished():
        return [d for d in glob.glob(os.path.join(cut, "levels", "level_01", "*"))
                if os.path.exists(os.path.join(d, "checkpoint.pt"))
                and not os.path.exists(os.path.join(d, "result.json"))]

    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            if unfinished():
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.002)
    finally:
        proc.kill()
        _, err = proc.communicate()
    assert unfinished(), f"the run finished level 1 before it could be killed: {err.decode()[-500:]}"
    # Resumed, reported and compared through the CLI, in this process (one subprocess start is enough).
    assert cli.main([a for a in _cli(cut, "--resume")[3:] if a != "--no-progress"]) == 0
    out, err = capsys.readouterr()
    assert f"run directory: {cut}" in out
    # stderr is no terminal: lines, not bars; one per arm and evaluation, the arms of a group named
    assert "level 1/1 ticket trial 0 | iteration 40/40 |" in err and "level 1/1 reinit trial 0 | iteration 40/40" in err
    rows_a, tensors_a, lines_a = run_dir_snapshot(whole)
    rows_b, tensors_b, lines_b = run_dir_snapshot(cut)
    assert len(rows_a) == 3 and rows_a == rows_b and lines_a == lines_b
    for key in tensors_a:
        for name, t in tensors_a[key].items():
            assert torch.equal(t, tensors_b[key][name]), f"{key}:{name} differs after resume"
    assert os.path.getsize(os.path.join(cut, "report", "results.csv")) > 0
    assert cli.main(["report", whole, cut, "--out", str(tmp_path / "cmp")]) == 0
    assert os.path.exists(tmp_path / "cmp" / "results.csv") and os.path.exists(tmp_path / "cmp" / "results.md")


def test_readme_own_model_and_data_search_runs(tmp_path, monkeypatch, capsys):
    readme = open(os.path.join(TESTS, "..", "README.md")).read()
    snippet = readme.split("### Your own model and data: a whole search\n\n```python\n", 1)[1].split("```", 1)[0]
    assert len(snippet.strip().splitlines()) <= 15
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    exec(compile(snippet, "README.md", "exec"), {})
    printed = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert [(p[0], p[1], p[2]) for p in printed] == [("0", "ticket", "100.0"), ("1", "ticket", "80.0"),
                                                     ("1", "reinit", "80.0"), ("2", "ticket", "64.0"),
                                                     ("2", "reinit", "64.0")]
    assert float(printed[0][3]) > 60.0  # it learned (chance: 50 %)
    assert os.path.exists(tmp_path / "runs" / "mine" / "report" / "results.csv")


def test_progress_in_a_log_is_one_line_per_evaluation(tmp_path, capsys):
    fastticket.search(small_resnet, learnable_data(), str(tmp_path / "run"), **dict(TINY, levels=1, controls=(),
                                                                                    iterations=20))
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "level 0/1 ticket trial 0: training (0/2 arms done)"
    evaluations = [line for line in lines if "| iteration" in line]
    assert [line.split(" | ")[:2] for line in evaluations] == [
        ["level 0/1 ticket trial 0", "iteration 10/20"], ["level 0/1 ticket trial 0", "iteration 20/20"],
        ["level 1/1 ticket trial 0", "iteration 10/20"], ["level 1/1 ticket trial 0", "iteration 20/20"]]
    assert all("val loss" in line and "elapsed" in line and "ETA" in line for line in evaluations)
    assert evaluations[-1].endswith("ETA 0s") and lines[-1].startswith("search finished: 2/2 arms in ")


def _write_pngs(root, per_class=6, size=8, seed=0):
    """An ImageFolder tree root/{train,val,test}/{dark,light}/*.png of tiny learnable RGB images."""
    from PIL import Image
    g = torch.Generator().manual_seed(seed)
    for split, n in (("train", per_class), ("val", 2), ("test", 2)):
        for label, base in (("dark", 60), ("light", 190)):
            os.makedirs(os.path.join(root, split, label))
            for i in range(n):
                pixels = (base + torch.randint(-50, 50, (size, size, 3), generator=g)).clamp(0, 255).to(torch.uint8)
                Image.fromarray(pixels.numpy()).save(os.path.join(root, split, label, f"{i}.png"))


def test_readme_torchvision_model_on_an_image_folder_runs(tmp_path, monkeypatch, capsys):
    readme = open(os.path.join(TESTS, "..", "README.md")).read()
    snippet = readme.split("### A torchvision model on an image folder\n\n```python\n", 1)[1].split("```", 1)[0]
    assert len(snippet.strip().splitlines()) <= 15
    _write_pngs(str(tmp_path / "pngs"))
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    exec(compile(snippet, "<README.md>", "exec"), {})
    out = capsys.readouterr().out.strip().splitlines()[-1]
    assert out == "runs/resnet18 [(0, 'ticket', 100.0), (1, 'ticket', 80.0)]", out
    with open(tmp_path / "runs" / "resnet18" / "config.json") as f:
        config = json.load(f)
    assert config["dataset"].startswith("<python>:data[ImageFolder(n=12), tensors[4, 3, 8, 8], tensors[4, 3, 8, 8]]@")
    ticket = load(os.path.join(arm_dir(str(tmp_path / "runs" / "resnet18"), 1, "ticket", 0), "final.pt"))
    masks = load(os.path.join(arm_dir(str(tmp_path / "runs" / "resnet18"), 1, "ticket", 0), "mask.pt"))
    assert len(masks) == 21, sorted(masks)  # resnet18: 20 convolutions and fc
    for name, mask in masks.items():  # the ticket's pruned weights are exact zeros in its stored weights
        weight = ticket[name + ".weight"]
        assert torch.count_nonzero(weight[~mask.bool()]) == 0, name


RECIPE = dict(TINY, levels=1, iterations=24, eval_every=8, optimizer=user_sources.noisy_sgd,
              lr_scheduler=user_sources.step_lr, progress=False)


def test_own_optimizer_and_scheduler_keep_the_invariant_and_resume_after_a_kill(tmp_path):
    whole = str(tmp_path / "whole")
    result = fastticket.search(small_resnet, learnable_data(), whole, **RECIPE)
    config = json.load(open(os.path.join(whole, "config.json")))
    assert config["optimizer"] == "user_sources:noisy_sgd" and config["lr_scheduler"] == "user_sources:step_lr"
    assert {"optimizer", "lr_scheduler"} <= set(config["sources"])
    for r in result.arms:  # they trained one at a time, and say why (the report too)
        assert r["arms_stacked"] is False and "optimizer user_sources:noisy_sgd" in r["why_not_stacked"]
    assert "arms trained one at a time, not stacked: trained with your optimizer user_sources:noisy_sgd" in \
        open(os.path.join(whole, "report", "results.md")).read()
    assert result.rows[0]["test_acc_at_early_stop_mean"] > 60.0  # learned: chance is 50 %
    final = load(os.path.join(arm_dir(whole, 1, "ticket", 0), "final.pt"))
    for key in [k for k in final if k.endswith("weight_mask")]:  # the noise never reached a pruned weight
        weight, mask = final[key.replace("weight_mask", "weight")], final[key]
        assert (mask == 0).any() and torch.all(weight[mask == 0] == 0) and torch.all(weight[mask == 1] != 0)
    # The scheduler ran: without it (the same optimizer at its own lr throughout) the weights differ.
    plain = fastticket.search(small_resnet, learnable_data(), str(tmp_path / "plain"),
                              **dict(RECIPE, lr_scheduler=None))
    assert plain.rows != result.rows
    # Killed at durable writes 8, 12 and 16 (checkpoints inside both levels' training), resumed: the same run.
    cut = str(tmp_path / "cut")
    run = lambda resume: fastticket.search(small_resnet, learnable_data(), cut, resume=resume, **RECIPE)  # noqa: E731
    for n in (8, 12, 16):
        assert forked(lambda: run(False), {FAULT_AT_ENV: str(n)}) == -signal.SIGKILL
        assert forked(lambda: run(True)) == 0
        assert same_run(cut, whole), n
        shutil.rmtree(cut)
    # A changed optimizer function is refused on resume, naming it.
    def noisy_sgd():
        return None
    noisy_sgd.__module__, noisy_sgd.__qualname__ = "user_sources", "noisy_sgd"
    with pytest.raises(RunDirError, match="optimizer function user_sources:noisy_sgd changed"):
        fastticket.search(small_resnet, learnable_data(), whole, resume=True, **dict(RECIPE, optimizer=noisy_sgd))


def test_own_loss_on_float_targets_reports_loss_without_accuracy(tmp_path):
    out = str(tmp_path / "run")
    result = fastticket.search(small_resnet, user_sources.one_hot_data(), out,
                               **dict(TINY, levels=1, loss=user_sources.one_hot_mse, progress=False))
    assert json.load(open(os.path.join(out, "config.json")))["loss"] == "user_sources:one_hot_mse"
    for r in result.arms:
        assert r["early_stop_val_loss"] < 0.3  # MSE on one-hot targets: it learned (a constant 0.5 gives 0.25)
        assert r["test_acc_at_early_stop"] is None or r["test_acc_at_early_stop"] != r["test_acc_at_early_stop"]
    with open(os.path.join(out, "report", "results.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [r["test_acc_at_early_stop_mean"] for r in rows] == ["", "", ""]  # no accuracy on float targets ...
    assert all(0 < float(r["early_stop_val_loss_mean"]) < 0.3 for r in rows)  # ... the loss instead
    other = str(tmp_path / "other")
    fastticket.search(small_resnet, user_sources.one_hot_data(), other,
                      **dict(TINY, levels=1, rate=0.5, loss=user_sources.one_hot_mse, progress=False))
    assert cli.main(["report", out, other, "--out", str(tmp_path / "cmp")]) == 0
    assert os.path.exists(tmp_path / "cmp" / "results.csv")
