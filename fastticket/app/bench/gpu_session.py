"""One command for a GPU session: `fastticket bench --gpu-session --out DIR`.

GPUs are lent rarely and for one call of at most 10 minutes, so the session fits a budget it enforces
(`SESSION_BUDGET_S`, 8 minutes; `--budget S` to change it) and runs its steps most valuable first: the
linear dispatch crossover, the real-size linear and optimizer checks, the linear dW's tile against quad
programs, the search bench, the conv crossover and real-size conv checks, then the rest (a search timing eager vs compiled, every suite's quick grid, the
test suite). Each step's budget is its share of the session's (`PLAN`); the budgets add up to the
session's. How steps run, stop and are written: fastticket/app/bench/session_run.py; the benchmark
steps' bodies: fastticket/app/bench/session_steps.py; the real-size checks are a pytest module inside the
package (fastticket/app/bench/real_sizes.py), so a plain `pip install .` runs the session; the test-suite
step runs `tests/` of the current directory when there is one (a checkout) and is skipped otherwise.

`--rehearse` runs the same plan on a CPU (the Triton interpreter, tiny shapes, a short budget) under the
same limits; `--dry-run` prints the plan and writes DIR with every number "unmeasured", running nothing.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional

from fastticket.app.bench.session_run import OUTPUT_FILES, output_problems, run_session, summary_table

__all__ = ["Step", "PLAN", "SESSION_BUDGET_S", "REHEARSAL_BUDGET_S", "plan", "session_cli"]

SESSION_BUDGET_S = 480    # 8 minutes of a 10-minute device call: the rest is start-up, install and return
REHEARSAL_BUDGET_S = 240  # the same plan on a CPU, tiny shapes

# (name, kind, share of the budget, what it does), most valuable first.
PLAN = [
    ("linear-crossover", "rows", 0.14, "dispatch crossover of the large linear layer (8192 tokens, 4096^2, "
     "block-64 masks, densities 100..2 %): the rows that set kernels/dispatch.py's linear threshold"),
    ("real-size-linear-optim", "pytest", 0.20, "linear fwd/dX/dW (4096^2 x 8192 tokens, a 262k head past "
     "2^31), optimizer steps on 16M elements and the fused dW+SGD against float64, bf16/fp16/fp32/tf32, one "
     "config per kernel (FASTTICKET_FIRST_CONFIG=1)"),
    ("linear-dw-quads", "rows", 0.05, "linear dW, 64 x 64 tile programs against 128 x 128 quads against cuBLAS "
     "(4096^2 x 8192 tokens, block:128x128 and block:64x64 masks): the rows that settle the _dw_quads heuristic"),
    ("search-bench", "rows", 0.10, "`fastticket bench --suite search`: one arm and K batched arms per step"),
    ("search-cuda-graph", "rows", 0.06, "the search bench's LeNet cases (1 and 8 stacked arms, MaskedAdam and "
     "MaskedSGD, an lr moving every step), the step captured as a CUDA graph (--cuda-graph) against eager: "
     "it/s, parity and captures"),
    ("conv-crossover", "rows", 0.12, "dispatch crossover of the ImageNet-sized conv layer (256->256, 56x56)"),
    ("real-size-conv", "pytest", 0.14, "VGG-19 and ResNet-20 conv layers against float64, every precision, "
     "one config per kernel"),
    ("search-timing", "timing", 0.08, "a LeNet-300-100 search (1 level x 300 iterations), eager and compiled"),
    ("benchmarks", "rows", 0.05, "every kernel suite on its quick grid (bf16)"),
    ("test-suite", "pytest", 0.06, "the test suite of ./tests on the GPU"),
]


@dataclasses.dataclass
class Step:
    """One step of the session: a command run in its own process, by a deadline."""

    name: str
    what: str
    budget_s: int
    command: List[str]
    kind: str = "rows"            # rows (rows.jsonl) | pytest (junit.xml) | timing (search-timing.json)
    env: Dict[str, str] = dataclasses.field(default_factory=dict)
    skip_reason: str = ""
    status: str = "planned"       # planned | ok | failed | timeout | skipped
    seconds: Optional[float] = None
    findings: Dict[str, Any] = dataclasses.field(default_factory=dict)
    rows: List[Dict[str, Any]] = dataclasses.field(default_factory=list)
    output_tail: str = ""


def budgets(total_s: int) -> List[int]:
    """Each step's whole seconds of `total_s` by its share; the last takes the rounding, so they add up."""
    parts = [int(share * total_s) for _, _, share, _ in PLAN]
    parts[-1] += total_s - sum(parts)
    return parts


def _pytest(target: List[str], work: Path, name: str, extra: List[str]) -> List[str]:
    workers = ["-n", "4"] if importlib.util.find_spec("xdist") is not None else []
    return [sys.executable, "-m", "pytest", *target, "-q", "-p", "no:cacheprovider", "-o", "addopts=", *workers,
            *extra, f"--junitxml={work / name / 'junit.xml'}"]


def _command(name: str, work: Path, rehearse: bool) -> List[str]:
    real_sizes = ["--pyargs", "fastticket.app.bench.real_sizes"]
    if name == "real-size-linear-optim":
        return _pytest(real_sizes, work, name, ["-k", "linear or optimizer or fused"])
    if name == "real-size-conv":
        return _pytest(real_sizes, work, name, ["-k", "conv"])
    if name == "test-suite":
        selection = ["tests/test_bench_harness.py"] if rehearse else ["tests",
                                                                     "--ignore=tests/test_gpu_real_sizes.py"]
        return _pytest(selection, work, name, [])
    return [sys.executable, "-m", "fastticket.app.bench.session_steps", name, str(work / name)] + (
        ["--tiny"] if rehearse else [])


def _skip_reason(kind: str, name: str) -> str:
    if kind == "pytest" and importlib.util.find_spec("pytest") is None:
        return "pytest is not installed (pip install pytest)"
    if name == "test-suite" and not (Path.cwd() / "tests" / "conftest.py").exists():
        return "no tests/ in the current directory (run from a checkout to include the test suite)"
    return ""


def plan(work: Path, budget_s: int = SESSION_BUDGET_S, rehearse: bool = False) -> List[Step]:
    """The steps in order, with budgets adding up to `budget_s`; their files go under `work`. Rehearsal:
    tiny shapes (FASTTICKET_REAL_SIZES=tiny), the interpreter without a GPU, one test file for the suite."""
    import torch

    env = {"FASTTICKET_FIRST_CONFIG": "1"}
    if rehearse:
        env["FASTTICKET_REAL_SIZES"] = "tiny"
    if rehearse and not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    steps = []
    for (name, kind, _, what), seconds in zip(PLAN, budgets(budget_s)):
        steps.append(Step(name, what, seconds, _command(name, work, rehearse), kind=kind, env=dict(env),
                          skip_reason=_skip_reason(kind, name)))
    return steps


def _environment(mode: str) -> Dict[str, Any]:
    from fastticket.app.bench import environment

    env = environment()
    env["session"] = mode
    return env


def _refusal(out: Path, dry_run: bool, rehearse: bool, budget_s: int) -> str:
    """One line saying why the session cannot start, or ""."""
    import torch

    if budget_s < 10:
        return f"error: --budget {budget_s} is too short; give at least 10 seconds"
    if not (dry_run or rehearse) and not torch.cuda.is_available():
        return "error: --gpu-session needs a CUDA GPU (none is visible); --rehearse runs it on the CPU, --dry-run plans it"
    foreign = sorted(p.name for p in out.iterdir() if p.name not in OUTPUT_FILES) if out.is_dir() else []
    if foreign:
        return (f"error: --out {out} already holds {', '.join(foreign[:3])}; give an empty directory (the session "
                f"writes only {', '.join(OUTPUT_FILES)})")
    return ""


def session_cli(out: Optional[str], dry_run: bool, rehearse: bool = False, budget_s: Optional[int] = None) -> int:
    """Body of `fastticket bench --gpu-session [--rehearse | --dry-run] [--budget S] --out DIR`; exit status."""
    if not out:
        print("error: --gpu-session needs --out DIR (where session.json, session.md and session-files.tar.gz go)",
              file=sys.stderr)
        return 2
    budget_s = budget_s or (REHEARSAL_BUDGET_S if rehearse else SESSION_BUDGET_S)
    directory = Path(out)
    refusal = _refusal(directory, dry_run, rehearse, budget_s)
    if refusal:
        print(refusal, file=sys.stderr)
        return 2
    mode = "dry run (nothing runs)" if dry_run else "rehearsal on this machine (tiny shapes)" if rehearse else "GPU"
    work = Path(tempfile.mkdtemp(prefix="fastticket-session-"))
    try:
        steps = plan(work, budget_s, rehearse)
        print(f"GPU session, {mode}: {len(steps)} steps within {budget_s} s, most valuable first; each step is "
              f"interrupted at its deadline and its results kept. Writes {', '.join(OUTPUT_FILES)} to {directory}.")
        for s in steps:
            note = f" [skipped: {s.skip_reason}]" if s.skip_reason else ""
            print(f"  {s.name} (<= {s.budget_s} s): {s.what}{note}")
        print(f"  budgets add up to {sum(s.budget_s for s in steps)} s", flush=True)
        run_session(steps, directory, work, budget_s, _environment(mode), dry_run=dry_run)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for problem in output_problems(directory):
        print(f"warning: {problem}", file=sys.stderr)
    print(summary_table(steps), end="")
    return 0 if all(s.status in ("ok", "planned", "skipped") for s in steps) else 1
