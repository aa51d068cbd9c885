"""fastticket.app.report on a synthetic run directory in the search's on-disk format."""
import csv
import json
import math
import os

import pytest

from fastticket.app.report import collect_results, expected_arms, make_report, missing_arms, summary_table
from fastticket.lottery.armdir import ArmDir

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DENSITY = {0: 1.0, 1: 0.8, 2: 0.64}


def _acc(level, arm, trial):
    # Tickets hold up, reinit falls behind; trials differ by 0.01 so means and stds are easy to check.
    base = 0.98 - (0.0 if arm == "ticket" else 0.02 * level)
    return base + 0.01 * trial


def _write_run(root, levels=(0, 1, 2), arms=("ticket", "reinit"), trials=(0, 1)):
    with open(os.path.join(root, "config.json"), "w") as f:
        json.dump({"model": "lenet300", "dataset": "mnist5k", "iterations": 300, "trials": len(trials)}, f)
    for level in levels:
        for arm in arms:
            if arm != "ticket" and level == 0:
                continue  # controls start at level 1, as the search writes them
            for trial in trials:
                d = os.path.join(root, "levels", f"level_{level:02d}", f"{arm}_trial{trial}")
                os.makedirs(d)
                acc = _acc(level, arm, trial)
                result = {"level": level, "arm": arm, "trial": trial, "density": DENSITY[level],
                          "layer_density": {"fc.0": DENSITY[level]}, "early_stop_iter": 100 * (level + 1) + 100 * trial,
                          "early_stop_val_loss": 0.1, "test_acc_at_early_stop": acc, "final_test_acc": acc - 0.005,
                          "final_iter": 300, "wall_time_s": 1.0, "status": "ok"}
                ArmDir(d, level, arm, trial).write_result(result)  # with its checksum, as the search writes it
                with open(os.path.join(d, "metrics.jsonl"), "w") as f:
                    for it in (0, 100, 200, 300):
                        f.write(json.dumps({"iteration": it, "train_loss": 1.0 / (it + 1), "val_loss": 0.2,
                                            "val_acc": 0.9, "test_acc": acc * it / 300}) + "\n")
                    f.write('{"iteration": 4')  # a torn line from a killed search must be ignored


def test_report_tables_and_plots(tmp_path):
    _write_run(str(tmp_path))
    paths = make_report(str(tmp_path))
    names = sorted(os.path.basename(p) for p in paths)
    assert names == ["accuracy_vs_weights.png", "curves.png", "early_stop_vs_weights.png", "results.csv",
                     "results.md"]
    for p in paths:
        assert os.path.dirname(p) == os.path.join(str(tmp_path), "report")
        if p.endswith(".png"):
            with open(p, "rb") as f:
                assert f.read(8) == PNG_MAGIC
            assert os.path.getsize(p) > 5000

    with open(os.path.join(str(tmp_path), "report", "results.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [(r["level"], r["arm"]) for r in rows] == [("0", "ticket"), ("1", "ticket"), ("1", "reinit"),
                                                      ("2", "ticket"), ("2", "reinit")]
    r = rows[4]  # level 2 reinit: accs 0.94 and 0.95
    assert float(r["weights_remaining_pct"]) == pytest.approx(64.0)
    assert float(r["test_acc_at_early_stop_mean"]) == pytest.approx(94.5)
    assert float(r["test_acc_at_early_stop_std"]) == pytest.approx(math.sqrt(0.5), abs=1e-3)  # sample std of 94, 95
    assert float(r["final_test_acc_mean"]) == pytest.approx(94.0)
    assert float(r["early_stop_iter_mean"]) == pytest.approx(350.0)
    assert int(r["n_trials"]) == 2 and int(r["n_diverged"]) == 0

    md = open(os.path.join(str(tmp_path), "report", "results.md")).read()
    assert "| 2 | reinit | 64.0 | 94.50 ± 0.71 | 94.00 ± 0.71 | 350 ± 71 | 2 |" in md
    assert "| 0 | ticket | 100.0 | 98.50 ± 0.71 |" in md


def test_single_trial_missing_arm_and_diverged(tmp_path):
    _write_run(str(tmp_path), arms=("ticket",), trials=(0,))
    d = tmp_path / "levels" / "level_02" / "ticket_trial0" / "result.json"
    result = json.loads(d.read_text())
    result["status"] = "diverged"
    ArmDir(str(d.parent), 2, "ticket", 0).write_result(result)
    paths = make_report(str(tmp_path))
    assert len(paths) == 5
    rows = list(csv.DictReader(open(os.path.join(str(tmp_path), "report", "results.csv"))))
    assert rows[0]["test_acc_at_early_stop_std"] == ""  # one trial: no std
    assert rows[2]["n_diverged"] == "1" and rows[2]["test_acc_at_early_stop_mean"] == ""
    assert "0 (+1 diverged)" in open(os.path.join(str(tmp_path), "report", "results.md")).read()


def test_summary_table(tmp_path):
    _write_run(str(tmp_path))
    text = summary_table(collect_results(str(tmp_path)))
    lines = text.splitlines()
    assert "ticket acc@stop %" in lines[0] and "reinit stop iter" in lines[0]
    assert len(lines) == 2 + 3
    assert "64.0" in lines[4] and "98.50 ± 0.71" in lines[4] and "94.50 ± 0.71" in lines[4]
    assert summary_table([]) == "(no finished levels)"


def test_empty_run_dir_errors(tmp_path):
    with pytest.raises(ValueError, match="no finished levels"):
        make_report(str(tmp_path))
    with pytest.raises(ValueError, match="fastticket search"):
        make_report(str(tmp_path / "missing"))


def test_summary_table_of_search_rows_with_missing_values():
    # The search passes its own result dicts (no "path"); a diverged arm has None accuracies.
    rows = [{"level": 0, "arm": "ticket", "trial": 0, "density": 1.0, "early_stop_iter": 300,
             "test_acc_at_early_stop": 0.9512, "final_test_acc": 0.95, "status": "ok"},
            {"level": 1, "arm": "ticket", "trial": 0, "density": 0.8, "early_stop_iter": None,
             "test_acc_at_early_stop": None, "final_test_acc": None, "status": "diverged"},
            {"level": 1, "arm": "random", "trial": 0, "density": 0.8, "early_stop_iter": 200,
             "test_acc_at_early_stop": 0.9, "final_test_acc": 0.89, "status": "ok"}]
    lines = summary_table(rows).splitlines()
    assert "random acc@stop %" in lines[0] and lines[0].index("ticket") < lines[0].index("random")
    assert "95.12" in lines[2] and "300" in lines[2]
    assert lines[3].split()[:4] == ["1", "80.0", "-", "-"] and "90.00" in lines[3]


def _record(monkeypatch, method):
    import matplotlib.axes
    calls = []
    real = getattr(matplotlib.axes.Axes, method)

    def spy(self, *args, **kwargs):
        calls.append((args, kwargs, self))
        return real(self, *args, **kwargs)
    monkeypatch.setattr(matplotlib.axes.Axes, method, spy)
    return calls


def test_unreadable_files_are_named_and_the_rest_is_reported(tmp_path):
    _write_run(str(tmp_path))
    truncated = tmp_path / "levels" / "level_01" / "reinit_trial1" / "result.json"
    truncated.write_text(truncated.read_text()[:40])
    empty_object = tmp_path / "levels" / "level_02" / "ticket_trial1" / "result.json"
    empty_object.write_text("{}")
    (tmp_path / "levels" / "level_02" / "reinit_trial0" / "metrics.jsonl").write_bytes(b"\xff\xfe\x00garbage")
    problems = []
    paths = make_report(str(tmp_path), problems)
    assert len(paths) == 5
    text = "\n".join(problems)
    assert str(truncated) in text and str(empty_object) in text and "reinit_trial0/metrics.jsonl" in text
    assert "not UTF-8" in text
    md = open(os.path.join(str(tmp_path), "report", "results.md")).read()
    assert str(truncated) in md and str(empty_object) in md
    rows = list(csv.DictReader(open(os.path.join(str(tmp_path), "report", "results.csv"))))
    assert [r["n_trials"] for r in rows if (r["level"], r["arm"]) == ("1", "reinit")] == ["1"]


def test_unfinished_run_and_missing_arms_are_marked(tmp_path, monkeypatch):
    _write_run(str(tmp_path), levels=(0, 1), trials=(0, 1))
    with open(tmp_path / "config.json", "w") as f:  # the run was asked for 2 levels, 2 trials, reinit
        json.dump({"model": "lenet300", "dataset": "mnist5k", "levels": 2, "trials": 2, "controls": ["reinit"]}, f)
    titles = _record(monkeypatch, "set_title")
    problems = []
    make_report(str(tmp_path), problems)
    assert any("unfinished run: 4 of 10 arms missing" in p and "L2 ticket t0" in p for p in problems)
    md = open(os.path.join(str(tmp_path), "report", "results.md")).read()
    assert "unfinished run: 4 of 10 arms missing" in md
    assert all("unfinished run: 4 of 10 arms missing" in args[0] for args, _, _ in titles), titles


def test_a_missing_reinit_replica_is_reported():
    """--reinits 2 trains reinit and reinit2 per ticket: a run missing reinit2 is unfinished."""
    config = {"levels": 1, "trials": 1, "controls": ["reinit"], "reinits": 2}
    assert expected_arms(config) == [(0, "ticket", 0, 0), (1, "ticket", 0, 0), (1, "reinit", 0, 0),
                                     (1, "reinit", 0, 1)]
    results = [{"level": 0, "arm": "ticket", "trial": 0}, {"level": 1, "arm": "ticket", "trial": 0},
               {"level": 1, "arm": "reinit", "trial": 0}]
    assert missing_arms(results, config) == [(1, "reinit", 0, 1)]
    assert missing_arms(results + [{"level": 1, "arm": "reinit", "trial": 0, "replica": 1}], config) == []


def test_error_bars_are_labelled_offset_and_curves_show_every_arm(tmp_path, monkeypatch):
    _write_run(str(tmp_path), arms=("ticket", "reinit", "random"))
    bars = _record(monkeypatch, "errorbar")
    lines = _record(monkeypatch, "plot")
    labels = _record(monkeypatch, "set_ylabel")
    make_report(str(tmp_path))
    acc_bars = [(args, kwargs) for args, kwargs, _ in bars[:3]]  # accuracy plot: one errorbar call per arm
    xs = {kwargs["label"]: list(args[0]) for args, kwargs in acc_bars}
    assert set(xs) == {"winning ticket (IMP) (n=2)", "random reinit (n=2)", "random pruning (n=2)"}
    # At level 1 all three arms share 80 % density: their points (and bars) sit at different x.
    at_80 = [min(v, key=lambda x: abs(x - 80)) for v in xs.values()]
    assert len(set(at_80)) == 3 and all(abs(x - 80) < 3 for x in at_80)
    assert any("std over n trials" in args[0] for args, _, _ in labels)
    curve_labels = {kwargs.get("label") for _, kwargs, _ in lines if kwargs.get("label")}
    assert {"80.0%", "80.0% reinit", "80.0% random"} <= curve_labels


@pytest.mark.parametrize("trials", [(0,), (0, 1)])
def test_plots_for_a_paper(tmp_path, monkeypatch, trials):
    """200 dpi PNG with a PDF beside; titles in % of weights remaining; "mean ± std" and error bars only where
    n > 1; the dense accuracy as a reference line."""
    from PIL import Image

    from fastticket.app import report_plots
    _write_run(str(tmp_path), trials=trials)
    figures = {}
    real = report_plots.save_figure
    monkeypatch.setattr(report_plots, "save_figure", lambda fig, path: (figures.update({os.path.basename(path): fig}),
                                                                  real(fig, path)))
    paths = make_report(str(tmp_path))
    for p in (p for p in paths if p.endswith(".png")):
        assert Image.open(p).info["dpi"] == pytest.approx((200, 200), abs=0.5)
        with open(p[:-4] + ".pdf", "rb") as f:
            assert f.read(5) == b"%PDF-"
    ax = figures["accuracy_vs_weights.png"].axes[0]
    assert "% of weights remaining" in ax.get_title() and "sparsity" not in ax.get_title()
    assert ("mean ± std over n trials" in ax.get_ylabel()) == (len(trials) > 1)
    dense = [line for line in ax.get_lines() if line.get_label().startswith("dense (level 0)")]
    assert len(dense) == 1 and dense[0].get_ydata()[0] == pytest.approx(100 * _acc(0, "ticket", 0) + 0.5 *
                                                                         (len(trials) - 1))
    has_bars = any(c.__class__.__name__ == "LineCollection" for c in ax.collections)
    assert has_bars == (len(trials) > 1)


def test_report_on_a_folder_inside_a_run_says_where_the_run_is(tmp_path):
    _write_run(str(tmp_path))
    inner = os.path.join(str(tmp_path), "levels", "level_01")
    with pytest.raises(ValueError, match=f"inside the run directory {tmp_path}: run `fastticket report {tmp_path}`"):
        make_report(inner)
    assert make_report(str(tmp_path))  # the run directory itself reports as before


def test_curves_name_the_levels_they_show(tmp_path, monkeypatch):
    from fastticket.app import report_plots
    _write_run(str(tmp_path), levels=(0, 1, 2), trials=(0,))
    figures = {}
    monkeypatch.setattr(report_plots, "save_figure", lambda fig, path: figures.update({os.path.basename(path): fig}))
    make_report(str(tmp_path))
    assert figures["curves.png"].axes[0].get_legend().get_title().get_text() == "weights remaining"  # all 3
    monkeypatch.setattr(report_plots, "curve_levels", lambda levels: [levels[0], levels[-1]])
    make_report(str(tmp_path))
    assert figures["curves.png"].axes[0].get_legend().get_title().get_text() == \
        "weights remaining\n(levels 0, 2 of 0-2)"
