"""fastticket.app.compare and `fastticket report RUN_DIR RUN_DIR --out DIR`: several runs in one table and one set
of plots; the single-run report shows the methods' fields (refill, early-bird, rewind mode)."""
import csv
import json
import os

import pytest

import fastticket.app.compare as compare
from fastticket.app.cli import main
from fastticket.app.report import make_report
from fastticket.app.report_plots import arm_label
from fastticket.lottery.armdir import ArmDir

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(root, config, arms=("ticket",), levels=(0, 1, 2), trials=(0, 1), acc0=0.95, extra=None):
    os.makedirs(root, exist_ok=True)
    base = {"model": "lenet300", "dataset": "mnist5k", "iterations": 300, "refill": None, "rewind": "weights",
            "controls": [], "seed": 0}
    with open(os.path.join(root, "config.json"), "w") as f:
        json.dump({**base, **config}, f)
    for level in levels:
        for arm in arms:
            if arm != "ticket" and level == 0:
                continue
            for trial in trials:
                d = os.path.join(root, "levels", f"level_{level:02d}", f"{arm}_trial{trial}")
                os.makedirs(d)
                acc = acc0 - 0.01 * level + 0.002 * trial - (0.02 if arm != "ticket" else 0.0)
                result = {"level": level, "arm": arm, "trial": trial, "density": 0.8 ** level,
                          "layer_density": {}, "early_stop_iter": 100 + 50 * trial, "early_stop_val_loss": 0.1,
                          "test_acc_at_early_stop": acc, "final_test_acc": acc, "final_iter": 300,
                          "wall_time_s": 1.0, "status": "ok", **((extra or {}) if arm == "ticket" else {})}
                ArmDir(d, level, arm, trial).write_result(result)  # with its checksum, as the search writes it


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_two_runs_in_one_table_and_plot(tmp_path, monkeypatch):
    element, refill = str(tmp_path / "element"), str(tmp_path / "refill")
    write_run(element, {}, arms=("ticket", "reinit"), acc0=0.95)
    write_run(refill, {"refill": "block:16x16"}, acc0=0.93, extra={"element_density": 0.5})
    drawn = []
    real_plot = compare._plot
    monkeypatch.setattr(compare, "_plot", lambda *a, **k: drawn.append(real_plot(*a, **k)))
    out = str(tmp_path / "cmp")
    paths = compare.make_comparison([element, refill], out)
    assert sorted(os.path.basename(p) for p in paths) == ["accuracy_vs_weights.png", "early_stop_vs_weights.png",
                                                          "results.csv", "results.md"]
    for p in paths:
        if p.endswith(".png"):
            with open(p, "rb") as f:
                assert f.read(8) == PNG_MAGIC
    rows = read_csv(os.path.join(out, "results.csv"))
    assert [(r["run"], r["arm"], r["level"]) for r in rows] == [
        ("refill=None", "ticket", "0"), ("refill=None", "ticket", "1"), ("refill=None", "reinit", "1"),
        ("refill=None", "ticket", "2"), ("refill=None", "reinit", "2"),
        ("refill=block:16x16", "ticket", "0"), ("refill=block:16x16", "ticket", "1"),
        ("refill=block:16x16", "ticket", "2")]
    by = {(r["run"], r["arm"], r["level"]): r for r in rows}
    # mean over the two trials (acc0 - 0.01 L + 0.001), in percent
    assert float(by[("refill=None", "ticket", "2")]["test_acc_at_early_stop_mean"]) == pytest.approx(93.1)
    assert float(by[("refill=block:16x16", "ticket", "2")]["test_acc_at_early_stop_mean"]) == pytest.approx(91.1)
    assert float(by[("refill=block:16x16", "ticket", "1")]["element_density_pct"]) == pytest.approx(50.0)
    assert float(by[("refill=None", "ticket", "1")]["early_stop_iter_std"]) > 0  # error bars over trials
    assert drawn[0] == ["refill=None: winning ticket (IMP)", "refill=None: random reinit",
                        "refill=block:16x16: winning ticket (IMP)"]
    with open(os.path.join(out, "results.md")) as f:
        md = f.read()
    assert "| refill=block:16x16 | ticket | 2 | 64.0 | 91.10 ± 0.14 |" in md


def test_same_settings_are_told_apart_by_directory(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    write_run(a, {})
    write_run(b, {})
    configs = [{"model": "m", "dataset": "d", "controls": ["reinit"]}, {"model": "m", "dataset": "d", "controls": []}]
    assert compare.run_labels(configs, [a, b]) == ["a", "b"]  # controls are arms, not run labels


def run_cli(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr()


def test_cli_compares_and_refuses_different_datasets(tmp_path, capsys):
    a, b, c = str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "c")
    write_run(a, {})
    write_run(b, {"rewind": "lr"})
    write_run(c, {"dataset": "cifar10"})
    code, cap = run_cli(["report", a, b, "--out", str(tmp_path / "out")], capsys)
    assert code == 0 and "| rewind=lr | ticket |" in cap.out
    assert os.path.exists(tmp_path / "out" / "accuracy_vs_weights.png")
    code, cap = run_cli(["report", a, c, "--out", str(tmp_path / "out2")], capsys)
    assert code == 2 and "different datasets cannot be compared" in cap.err
    assert len(cap.err.strip().splitlines()) == 1 and "Traceback" not in cap.err
    code, cap = run_cli(["report", a, b], capsys)
    assert code == 2 and "pass --out DIR" in cap.err and len(cap.err.strip().splitlines()) == 1


def test_single_report_shows_early_bird_and_rewind_mode(tmp_path):
    run = str(tmp_path / "eb")
    write_run(run, {"early_bird": 0.05, "rewind": "none"}, extra={"early_bird_iter": 200, "iterations_saved": 100})
    make_report(run)
    rows = read_csv(os.path.join(run, "report", "results.csv"))
    assert rows[0]["early_bird_iter_mean"] == "200.0" and rows[0]["iterations_saved_mean"] == "100.0"
    with open(os.path.join(run, "report", "results.md")) as f:
        md = f.read()
    assert "early-bird iteration | iterations saved |" in md and "rewind=none" in md
    assert arm_label("ticket", {"rewind": "lr"}) == "winning ticket (IMP) (rewind lr)"
    assert arm_label("snip", {"rewind": "lr"}) == "SNIP at init"
    plain = str(tmp_path / "plain")
    write_run(plain, {})
    make_report(plain)
    assert "early_bird_iter_mean" not in read_csv(os.path.join(plain, "report", "results.csv"))[0]
