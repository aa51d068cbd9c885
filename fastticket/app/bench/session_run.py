"""Running a GPU session's plan (fastticket/app/bench/gpu_session.py) within its budget, and writing what it
found as a device call can return it.

Each step runs in its own process group, its output to a log, in a scratch directory outside DIR. A step
must end by its deadline: the session's start plus the budgets of it and every step before it, so time an
early step leaves is the next one's and no step can eat a later one's share. At the deadline minus a grace
the step gets SIGINT (pytest then writes its junit, a bench body has already appended its rows), at the
deadline SIGKILL. After every step DIR is rewritten whole: `session.json` (environment, plan, every
step's status, seconds, findings and rows), `session.md` and `session-files.tar.gz` (each step's own
files and log) — three files named [A-Za-z0-9._-], never more, so a session killed from outside still
leaves everything up to its last finished step.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import signal
import subprocess
import tarfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence

from fastticket.lottery.atomic_io import atomic_write, atomic_write_text

__all__ = ["OUTPUT_FILES", "MAX_FILES", "SAFE_NAME", "run_session", "write_session", "output_problems",
           "junit_counts", "summary_table", "step_findings"]

OUTPUT_FILES = ("session.json", "session.md", "session-files.tar.gz")
MAX_FILES = 8  # what one device call returns
SAFE_NAME = re.compile(r"[A-Za-z0-9._-]+")
UNMEASURED = "unmeasured"
TAIL_CHARS = 3000


def _grace_s(budget_s: float) -> float:
    """Seconds between SIGINT and SIGKILL: room for pytest to write its junit, never most of a short step."""
    return max(1.0, min(15.0, budget_s / 8))


def _stop(proc: subprocess.Popen, grace_s: float) -> None:
    """SIGINT to the step's leader (pytest or a bench body), SIGKILL to its whole group after `grace_s`."""
    try:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # workers (pytest-xdist) and anything the leader left behind
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _run_step(step, work: Path, limit_s: float, env: Dict[str, str], clock: Callable[[], float]) -> None:
    work.mkdir(parents=True, exist_ok=True)
    log_path = work / "output.log"
    t0 = clock()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(step.command, stdout=log, stderr=subprocess.STDOUT, env={**env, **step.env},
                                start_new_session=True)
        try:
            code = proc.wait(timeout=max(0.1, limit_s - _grace_s(limit_s)))
            step.status = "ok" if code == 0 else "failed"
        except subprocess.TimeoutExpired:
            _stop(proc, _grace_s(limit_s))
            step.status = "timeout"
    step.seconds = round(clock() - t0, 1)
    step.output_tail = log_path.read_bytes()[-TAIL_CHARS:].decode(errors="replace")


def run_session(steps: Sequence, out: Path, work: Path, budget_s: float, environment: Dict[str, Any],
                dry_run: bool = False, clock: Callable[[], float] = time.monotonic) -> List:
    """Run `steps` in order, each by its deadline (see the module docstring), writing DIR after each."""
    steps = list(steps)
    write_session(steps, environment, out, work, budget_s, dry_run)
    if dry_run:
        return steps
    env = dict(os.environ)
    start, deadline = clock(), 0.0
    for step in steps:
        deadline += step.budget_s
        left = deadline - (clock() - start)
        if step.skip_reason:
            step.status, step.findings = "skipped", {"reason": step.skip_reason}
        elif left < 2:
            step.status, step.findings = "skipped", {"reason": "no time left in the session budget"}
        else:
            print(f"[gpu-session] {step.name}: up to {left:.0f} s", flush=True)
            _run_step(step, work / step.name, left, env, clock)
            step.findings, step.rows = step_findings(step, work / step.name)
            print(f"[gpu-session] {step.name}: {step.status} in {step.seconds} s", flush=True)
        write_session(steps, environment, out, work, budget_s, dry_run)
    return steps


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


def _bench_findings(rows: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Crossover summaries and the fastest / slowest ratio vs dense of each suite's implementations."""
    found: Dict[str, Any] = {"rows": len(rows), "summaries": [], "ratios": {}}
    for row in rows:
        summary = row.get("extra", {}).get("summary")
        if summary:
            found["summaries"].append(summary)
        for impl, ratio in row.get("ratio_vs_dense", {}).items():
            key = f"{row['suite']}:{impl}"
            lo, hi = found["ratios"].get(key, (ratio, ratio))
            found["ratios"][key] = (min(lo, ratio), max(hi, ratio))
    timed = [r for r in rows if r.get("times_ms") and r.get("case") != "crossover"]
    if timed and not any(r.get("case") == "crossover" for r in rows):
        # A crossover step stopped before its closing row: the densities it timed still bound the threshold.
        from fastticket.app.bench import BenchRow, crossover

        prefix = timed[0]["case"].split(".")[0] + "."
        found["partial_crossover"] = crossover([BenchRow(**r) for r in timed], pooled_prefix=prefix).get("pooled")
    return found


def step_findings(step, directory: Path):
    """(findings, rows) of a finished, failed or stopped step from the files it left in `directory`."""
    from fastticket.app.bench.session_steps import TIMING_FILE, read_rows

    if step.kind == "pytest":
        return junit_counts(directory / "junit.xml"), []
    if step.kind == "timing":
        path = directory / TIMING_FILE
        return (json.loads(path.read_text()) if path.exists() else {}), []
    rows = read_rows(directory)
    return _bench_findings(rows), rows


# ------------------------------------------------------------------------------------------- writing

def _headline(step) -> str:
    f = step.findings
    if step.status == "planned":
        return UNMEASURED
    if "tests" in f:
        text = f"{f['passed']} passed, {f['failures'] + f['errors']} failed, {f['skipped']} skipped"
        return text + (f" (first failure: {f['failing'][0]})" if f.get("failing") else "")
    if "summaries" in f:
        return "; ".join(f["summaries"]) or f"{f['rows']} rows, no crossover summary"
    if "eager_s" in f:
        return ", ".join(f"{k} {v}" for k, v in f.items() if k.endswith("_s"))
    return str(f.get("reason", "no results"))


def summary_table(steps: Sequence) -> str:
    lines = ["| step | status | seconds (budget) | result |", "|---|---|---|---|"]
    for s in steps:
        seconds = UNMEASURED if s.seconds is None else s.seconds
        lines.append(f"| {s.name} | {s.status} | {seconds} ({s.budget_s}) | {_headline(s)} |")
    return "\n".join(lines) + "\n"


def _markdown(steps: Sequence, env: Dict[str, Any], dry_run: bool) -> str:
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
    return "\n".join(md)


def _bundle(work: Path) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path in sorted(p for p in work.rglob("*") if p.is_file()) if work.exists() else []:
            tar.add(str(path), arcname=str(path.relative_to(work)))
    return buffer.getvalue()


def write_session(steps: Sequence, env: Dict[str, Any], out: Path, work: Path, budget_s: float,
                  dry_run: bool) -> List[Path]:
    """session.json, session.md and session-files.tar.gz under `out`, each atomically."""
    out.mkdir(parents=True, exist_ok=True)
    payload = {"environment": env, "dry_run": dry_run, "budget_s": budget_s,
               "steps": [dataclasses.asdict(s) for s in steps]}
    paths = [out / name for name in OUTPUT_FILES]
    atomic_write_text(str(paths[0]), json.dumps(payload, indent=2, default=str) + "\n")
    atomic_write_text(str(paths[1]), _markdown(steps, env, dry_run))
    archive = _bundle(work)
    atomic_write(str(paths[2]), lambda f: f.write(archive))
    return paths


def output_problems(out: Path) -> List[str]:
    """What breaks the device call's file rules in `out` (at most 8 plain files, names [A-Za-z0-9._-]);
    empty when it returns whole."""
    entries = sorted(out.rglob("*")) if out.exists() else []
    problems = [f"{p.relative_to(out)}: not a plain file" for p in entries if not p.is_file()]
    problems += [f"{p.relative_to(out)}: name outside [A-Za-z0-9._-]" for p in entries
                 if not SAFE_NAME.fullmatch(p.name)]
    files = [p for p in entries if p.is_file()]
    if len(files) > MAX_FILES:
        problems.append(f"{len(files)} files (at most {MAX_FILES} come back)")
    return problems
