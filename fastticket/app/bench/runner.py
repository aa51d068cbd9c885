"""Running the suites and writing their results: the body of `fastticket bench` (`run_cli`), `run_suites`
(each suite's module imported lazily, a missing one skipped with a note), the markdown table and the
JSON + markdown results files. Re-exported by fastticket.app.bench, which the suites import; this module
is loaded on first use of one of its names, so a suite module never imports it back."""
from __future__ import annotations

import datetime as _dt
import importlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from fastticket.app.bench import KNOWN_SUITES, SUITES, BenchOptions, BenchRow, device_slug, environment, parse_dtype
from fastticket.lottery.atomic_io import atomic_write_text
from fastticket.sparse.testing import parity_tolerance

__all__ = ["run_suites", "summaries", "format_table", "write_results", "run_cli"]

def run_suites(names: Sequence[str], options: BenchOptions) -> List[BenchRow]:
    """Import each `fastticket.app.bench.<name>` (registering its suite) and run it; missing modules are skipped
    with a note on stderr, so one unfinished suite does not stop the others."""
    rows: List[BenchRow] = []
    for name in names:
        if name not in SUITES:
            try:
                importlib.import_module(f"fastticket.app.bench.{name}")
            except ModuleNotFoundError as exc:
                if exc.name == f"fastticket.app.bench.{name}":
                    print(f"note: benchmark suite {name!r} is not available (no module fastticket.app.bench.{name}); "
                          "skipped", file=sys.stderr)
                    continue
                raise
        fn = SUITES.get(name)
        if fn is None:
            print(f"note: fastticket.app.bench.{name} registers no suite named {name!r}; skipped", file=sys.stderr)
            continue
        rows.extend(fn(options))
    return rows


def summaries(rows: Sequence[BenchRow]) -> List[str]:
    """One-line findings suites attach to a row as extra["summary"] (e.g. the linear dispatch crossover)."""
    return [str(r.extra["summary"]) for r in rows if r.extra.get("summary")]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if value != value:
            return "nan"
        if value == 0:
            return "0"
        if abs(value) < 1e-2 or abs(value) >= 1e4:
            return f"{value:.2e}"
        return f"{value:.3f}"
    return str(value)


def format_table(rows: Sequence[BenchRow]) -> str:
    """Markdown table: one line per row, a column per implementation's time and speed-up vs dense."""
    if not rows:
        return "(no benchmark rows)\n"
    impls: List[str] = []
    for row in rows:
        for name in list(row.times_ms) + list(row.ratio_vs_dense):
            if name not in impls:
                impls.append(name)
    ratio_impls = [i for i in impls if any(i in r.ratio_vs_dense for r in rows)]
    # The live-tile fraction explains most timings, so it gets a column when suites report it.
    show_live = any("live_fraction" in r.extra for r in rows)
    header = ["suite", "case", "op", "shape", "dtype", "mask", "density"] + (["live tiles"] if show_live else [])
    header += [f"{i} ms" for i in impls] + [f"{i} x dense" for i in ratio_impls] + ["parity"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r.suite, r.case, r.op, r.shape, r.dtype, r.mask, f"{r.density:.3g}"]
        if show_live:
            cells.append(_fmt(r.extra["live_fraction"]) if "live_fraction" in r.extra else "")
        cells += [_fmt(r.times_ms[i]) if i in r.times_ms else "" for i in impls]
        cells += [_fmt(r.ratio_vs_dense[i]) if i in r.ratio_vs_dense else "" for i in ratio_impls]
        cells += ["n/a" if r.extra.get("parity") == "n/a" else _fmt(r.parity)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_results(rows: Sequence[BenchRow], env: Dict[str, Any], out_dir: str | os.PathLike
                  ) -> Tuple[Path, Path]:
    """Write `<suites>-<device-slug>-<date>.json` and `.md` under out_dir atomically; returns both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    suites = sorted({r.suite for r in rows}) or ["empty"]
    date = str(env.get("timestamp_utc", ""))[:10] or _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
    stem = f"{'_'.join(suites)}-{device_slug(env)}-{date}"  # [A-Za-z0-9._-] only
    json_path, md_path = out / f"{stem}.json", out / f"{stem}.md"
    payload = {"environment": env, "rows": [r.to_dict() for r in rows]}
    atomic_write_text(str(json_path), json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n")
    md = [f"# fastticket benchmark: {', '.join(suites)}", ""]
    md += [f"- {k}: {v}" for k, v in env.items()]
    md += ["", format_table(rows)]
    md += [f"- {line}" for line in summaries(rows)] + [""]
    if not any(r.times_ms for r in rows):
        md += ["No timings: this run had no GPU, so only parity was measured.", ""]
    atomic_write_text(str(md_path), "\n".join(md))
    return json_path, md_path


def _prepare_interpreter() -> Optional[str]:
    """Without CUDA, the Triton kernels can only run in the interpreter, which must be switched on before
    triton is first imported. Returns a warning when that is no longer possible."""
    if torch.cuda.is_available():
        return None
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return None
    if "triton" in sys.modules:
        return ("warning: triton was imported before TRITON_INTERPRET=1 could be set, so the Triton kernels "
                "cannot run on CPU in this process; run `TRITON_INTERPRET=1 fastticket bench ...`")
    os.environ["TRITON_INTERPRET"] = "1"
    return None


def run_cli(suites: Sequence[str], out: Optional[str] = None, dtype: Optional[str] = None,
            quick: bool = False) -> int:
    """Body of `fastticket bench`: run the suites, print the table, optionally write results; exit code.

    Without a GPU the kernel suites run only their parity part (in the Triton interpreter, small shapes, fp32)
    and report no kernel timing; the search suite's rows are CPU wall-clock times, and the output says which
    before and after the table (no line may contradict the table it stands beside).
    """
    warning = _prepare_interpreter()
    has_gpu = torch.cuda.is_available()
    names = list(suites) or list(KNOWN_SUITES)
    unknown = [n for n in names if n not in KNOWN_SUITES and n not in SUITES]
    if unknown:
        print(f"error: unknown benchmark suite(s) {unknown}; known: {', '.join(KNOWN_SUITES)}", file=sys.stderr)
        return 2
    if has_gpu:
        options = BenchOptions(quick=quick, dtype=dtype or "bf16", timing=True, device="cuda")
    else:
        if dtype and parse_dtype(dtype) != torch.float32:
            print(f"note: {dtype} needs a GPU (the Triton interpreter has no bf16/fp16 matmul support worth "
                  "trusting); running fp32 parity instead", file=sys.stderr)
        options = BenchOptions(quick=True, dtype="fp32", timing=False, device="cpu")
    parse_dtype(options.dtype)  # fail early on a bad --dtype
    if warning:
        print(warning, file=sys.stderr)
    if not has_gpu:
        # Said before the table, so it must hold for every row below it: the search suite does time this CPU.
        cpu_timed = " (the search suite times this CPU)" if "search" in names else ""
        print("No CUDA GPU found: the kernel suites run their parity checks only, in the Triton interpreter on "
              f"small shapes{cpu_timed}.")
    env = environment()
    rows = run_suites(names, options)
    print(format_table(rows), end="")
    for line in summaries(rows):
        print(line)
    bad = [r for r in rows if r.extra.get("parity") != "n/a"
           and (not (r.parity == r.parity) or r.parity > parity_tolerance(r.dtype))]
    if out:
        json_path, md_path = write_results(rows, env, out)
        print(f"wrote {json_path} and {md_path}")
    if not has_gpu and not any(r.times_ms for r in rows):
        print("Timings need a GPU: none were measured on this machine.")
    elif not has_gpu:
        print("Kernel timings need a GPU; the search suite's rows are CPU wall-clock timings of this machine.")
    if bad:
        print(f"parity FAILED for {len(bad)} row(s): " + ", ".join(f"{r.suite}/{r.case}/{r.op}" for r in bad),
              file=sys.stderr)
        return 1
    return 0
