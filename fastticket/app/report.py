"""Tables and paper-style plots from a search's run directory.

Reads the results (result.json + metrics.jsonl of every arm) of a run directory (fastticket.lottery.rundir) and
writes run_dir/report/: results.csv, results.md, accuracy_vs_weights.png, early_stop_vs_weights.png, curves.png
(PNGs at 200 dpi, each with a PDF beside it), each atomically (fastticket.lottery.atomic_io): a killed report
leaves the previous file or the new one.
Accuracies are stored as fractions in [0, 1]; every table and plot shows them in percent.
"""
from __future__ import annotations

import csv
import io
import math
import os
import statistics
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from fastticket.lottery.atomic_io import atomic_write_text, remove_stale_temps
from fastticket.errors import DamagedFileError
from fastticket.lottery import arms as registry
from fastticket.lottery.rundir import RunDir
from fastticket.app.report_plots import plot_curves, plot_vs_weights, read_metrics

CSV_COLUMNS = ("level", "arm", "weights_remaining_pct", "test_acc_at_early_stop_mean", "test_acc_at_early_stop_std",
               "final_test_acc_mean", "final_test_acc_std", "early_stop_iter_mean", "early_stop_iter_std",
               "n_trials", "n_diverged")
# Written only by runs that use the method: --refill (element_density_pct), --early-bird, --stability
# (instability: points of test error, fastticket.lottery.stability) and a user's loss (no accuracy: the
# validation loss at the early stop instead).
METHOD_COLUMNS = ("element_density_pct", "early_bird_iter_mean", "iterations_saved_mean", "instability",
                  "instability_std", "early_stop_val_loss_mean")


def collect_results(run_dir: str, problems: Optional[List[str]] = None) -> List[Dict[str, Any]]:
    """Every verified result.json under run_dir (one dict per level x arm x trial), sorted by level, arm, trial.

    Each dict also carries "path": the directory it came from (where metrics.jsonl lives). A result.json that
    cannot be read or fails verification is left out; with `problems` given, a line naming it is added.
    """
    if not os.path.isdir(run_dir):
        raise ValueError(f"no run directory at {run_dir}: run `fastticket search --out {run_dir}` first")
    root = _enclosing_run(run_dir)
    if root is not None:
        raise ValueError(f"{run_dir} is a folder inside the run directory {root}: run `fastticket report {root}`")
    results = RunDir(run_dir).results(problems, require_final=False)
    # --stability's twins are measured through their arm's instability, not as arms of their own.
    results = [r for r in results if registry.twin_base(str(r["arm"])) is None]
    results.sort(key=lambda r: (r["level"], registry.order_key(r["arm"]), r["trial"]))
    return results


def _enclosing_run(path: str) -> Optional[str]:
    """The run directory (holding config.json) that `path` lies inside, when `path` itself is not one."""
    if os.path.isfile(os.path.join(path, "config.json")):
        return None
    here = os.path.abspath(path)
    while os.path.dirname(here) != here:
        here = os.path.dirname(here)
        if os.path.isfile(os.path.join(here, "config.json")) and os.path.isdir(os.path.join(here, "levels")):
            return os.path.relpath(here) if not os.path.isabs(path) else here
    return None


ArmKey = Tuple[int, str, int, int]  # (level, arm, trial, replica)


def expected_arms(config: Dict[str, Any]) -> List[ArmKey]:
    """(level, arm, trial, replica) of every arm a finished run with `config` holds, --reinits replicas
    included ([] when config.json says too little to know)."""
    try:
        levels, trials = int(config["levels"]), int(config["trials"])
        controls = [str(c) for c in config.get("controls", ())]
        reinits = int(config.get("reinits", 1))
        per_level = [registry.level_arms(controls, reinits, level) for level in range(levels + 1)]
    except (KeyError, TypeError, ValueError):
        return []
    return [(level, arm, trial, replica) for level in range(levels + 1) for trial in range(trials)
            for arm, replica in per_level[level]]


def missing_arms(results: Sequence[Dict[str, Any]], config: Dict[str, Any]) -> List[ArmKey]:
    """The expected arms with no verified result (unfinished, skipped, or unreadable)."""
    have = {(int(r["level"]), str(r["arm"]), int(r["trial"]), int(r.get("replica", 0))) for r in results}
    return [key for key in expected_arms(config) if key not in have]


def _missing_note(missing: Sequence[ArmKey], total: int) -> str:
    if not missing:
        return ""
    listed = ", ".join(f"L{level} {registry.arm_name(arm, replica)} t{trial}"
                       for level, arm, trial, replica in missing[:8])
    more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
    return f"unfinished run: {len(missing)} of {total} arms missing ({listed}{more})"


def _mean_std(values: Sequence[float]) -> Tuple[float, float]:
    if not values:
        return math.nan, math.nan
    # Sample std over trials; undefined (NaN, shown blank) for a single trial.
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else math.nan)


def _values(trials: Sequence[Dict[str, Any]], key: str, scale: float) -> List[float]:
    # None (a run with no evaluation) and NaN carry no measurement; skip them rather than poison the mean.
    values = [scale * float(t[key]) for t in trials if t.get(key) is not None]
    return [v for v in values if math.isfinite(v)]


def aggregate(results: Iterable[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One row per (level, arm): means and stds over trials, accuracies in percent.

    Diverged trials are counted in n_diverged and left out of the means: their accuracies measure the blow-up,
    not the subnetwork.
    """
    groups: Dict[Tuple[int, str], List[Dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((int(r["level"]), str(r["arm"])), []).append(r)
    rows = []
    for (level, arm), trials in sorted(groups.items(), key=lambda kv: (kv[0][0], registry.order_key(kv[0][1]))):
        ok = [t for t in trials if t.get("status", "ok") == "ok"]
        acc_es = _mean_std(_values(ok, "test_acc_at_early_stop", 100.0))
        acc_final = _mean_std(_values(ok, "final_test_acc", 100.0))
        es_iter = _mean_std(_values(ok, "early_stop_iter", 1.0))
        methods = {"element_density_pct": _mean_std(_values(trials, "element_density", 100.0))[0],
                   "early_bird_iter_mean": _mean_std(_values(ok, "early_bird_iter", 1.0))[0],
                   "iterations_saved_mean": _mean_std(_values(ok, "iterations_saved", 1.0))[0],
                   "early_stop_val_loss_mean": (_mean_std(_values(ok, "early_stop_val_loss", 1.0))[0]
                                                if math.isnan(acc_es[0]) else math.nan)}
        methods["instability"], methods["instability_std"] = _mean_std(_values(ok, "instability", 1.0))
        rows.append({**methods,
            "level": level, "arm": arm,
            "weights_remaining_pct": 100.0 * statistics.fmean(float(t["density"]) for t in trials),
            "test_acc_at_early_stop_mean": acc_es[0], "test_acc_at_early_stop_std": acc_es[1],
            "final_test_acc_mean": acc_final[0], "final_test_acc_std": acc_final[1],
            "early_stop_iter_mean": es_iter[0], "early_stop_iter_std": es_iter[1],
            "n_trials": len(ok), "n_diverged": len(trials) - len(ok),
        })
    return rows


def _fmt(mean: float, std: float, digits: int) -> str:
    if math.isnan(mean):
        return "-"
    text = f"{mean:.{digits}f}"
    return text if math.isnan(std) else f"{text} ± {std:.{digits}f}"


def _rows_of(rows: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    # Accept per-trial results (collect_results) as well as aggregated rows.
    return list(rows) if not rows or "n_trials" in rows[0] else aggregate(rows)


def summary_table(rows: Sequence[Dict[str, Any]]) -> str:
    """A plain-text table, one line per level, a column group per arm (test accuracy at early stop, its
    iteration). `rows`: the output of collect_results or of aggregate."""
    rows = _rows_of(rows)
    if not rows:
        return "(no finished levels)"
    arms = sorted({r["arm"] for r in rows}, key=registry.order_key)
    by_key = {(r["level"], r["arm"]): r for r in rows}
    levels = sorted({r["level"] for r in rows})
    header = ["level", "weights %"]
    for arm in arms:
        header += [f"{arm} acc@stop %", f"{arm} stop iter"]
    table = [header]
    for level in levels:
        density = next(by_key[(level, a)]["weights_remaining_pct"] for a in arms if (level, a) in by_key)
        line = [str(level), f"{density:.1f}"]
        for arm in arms:
            r = by_key.get((level, arm))
            if r is None:
                line += ["", ""]
            else:
                line += [_fmt(r["test_acc_at_early_stop_mean"], r["test_acc_at_early_stop_std"], 2),
                         _fmt(r["early_stop_iter_mean"], r["early_stop_iter_std"], 0)]
        table.append(line)
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_csv(path: str, columns: Sequence[str], rows: Sequence[Dict[str, Any]]) -> None:
    """`rows` as CSV (NaN as an empty cell, floats to 4 places), written atomically."""
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(columns)
    for r in rows:
        writer.writerow(["" if isinstance(r[c], float) and math.isnan(r[c]) else
                         (round(r[c], 4) if isinstance(r[c], float) else r[c]) for c in columns])
    atomic_write_text(path, text.getvalue())


def _write_csv(rows: Sequence[Dict[str, Any]], path: str) -> None:
    write_csv(path, CSV_COLUMNS + _method_columns(rows), rows)


def _method_columns(rows: Sequence[Dict[str, Any]]) -> Tuple[str, ...]:
    """The METHOD_COLUMNS some row has a value for."""
    return tuple(c for c in METHOD_COLUMNS
                 if any(isinstance(r.get(c), float) and not math.isnan(r[c]) for r in rows))


METHOD_HEADERS = {"element_density_pct": "element ticket weights %", "early_bird_iter_mean": "early-bird iteration",
                  "iterations_saved_mean": "iterations saved", "instability": "instability (pts)",
                  "instability_std": "instability std", "early_stop_val_loss_mean": "val loss at early stop"}
METHOD_DIGITS = {"element_density_pct": 1, "instability": 2, "instability_std": 2, "early_stop_val_loss_mean": 4}


def _write_markdown(rows: Sequence[Dict[str, Any]], path: str, config: Dict[str, Any],
                    notes: Sequence[str] = ()) -> None:
    extra = _method_columns(rows)
    lines = ["# Lottery-ticket search results", ""]
    lines += [f"**{note}**" for note in notes] + ([""] if notes else [])
    if config:
        keys = ("model", "dataset", "iterations", "batch_size", "optimizer", "lr", "scope", "rate", "rewind_iter",
                "rewind", "refill", "early_bird", "lr_scheduler", "loss", "trials", "seed")
        lines += [", ".join(f"{k}={config[k]}" for k in keys if config.get(k) is not None), ""]
    lines += ["Test accuracy in percent, mean ± std over trials; early stop = iteration of minimum validation loss.",
              "",
              "| level | arm | weights remaining % | test acc at early stop % | final test acc % "
              "| early-stop iteration | trials |" + "".join(f" {METHOD_HEADERS[c]} |" for c in extra),
              "|---:|---|---:|---:|---:|---:|---:|" + "---:|" * len(extra)]
    for r in rows:
        trials = str(r["n_trials"]) + (f" (+{r['n_diverged']} diverged)" if r["n_diverged"] else "")
        lines.append(f"| {r['level']} | {r['arm']} | {r['weights_remaining_pct']:.1f} "
                     f"| {_fmt(r['test_acc_at_early_stop_mean'], r['test_acc_at_early_stop_std'], 2)} "
                     f"| {_fmt(r['final_test_acc_mean'], r['final_test_acc_std'], 2)} "
                     f"| {_fmt(r['early_stop_iter_mean'], r['early_stop_iter_std'], 0)} | {trials} |"
                     + "".join(f" {_fmt(r[c], math.nan, METHOD_DIGITS.get(c, 0))} |" for c in extra))
    atomic_write_text(path, "\n".join(lines) + "\n")


def _validation_note(results: Sequence[Dict[str, Any]]) -> List[str]:
    """A user's data without a validation split evaluates no validation loss (NaN): say what early stop means."""
    ok = [r for r in results if r.get("status", "ok") == "ok" and r.get("early_stop_iter") is not None]
    if ok and not any(math.isfinite(float(r.get("early_stop_val_loss") or math.nan)) for r in ok):
        return ["no validation split: early stopping uses the last evaluation"]
    return []


def _stacking_note(results: Sequence[Dict[str, Any]]) -> List[str]:
    """Arms that trained one at a time where the engine stacks them by default: say why (result.json's
    why_not_stacked: a model vmap cannot trace, a user's optimizer / scheduler / loss)."""
    why = sorted({str(r["why_not_stacked"]) for r in results if r.get("arms_stacked") is False
                  and r.get("why_not_stacked")})
    return [f"arms trained one at a time, not stacked: {w}" for w in why]


def make_report(run_dir: str, problems: Optional[List[str]] = None, out_dir: Optional[str] = None) -> List[str]:
    """Write the tables and plots for `run_dir` into `out_dir` (default run_dir/report/) and return the paths
    written.

    `problems` (a list) receives one line per file that could not be read (it is left out of the report)
    and one for an unfinished run (missing arms, also marked in results.md and the plot titles)."""
    problems = [] if problems is None else problems
    results = collect_results(run_dir, problems)
    if not results:
        detail = f" ({'; '.join(problems)})" if problems else ""
        raise ValueError(f"no finished levels in {run_dir}: run `fastticket search` first{detail}")
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display

    run = RunDir(run_dir)
    try:
        config = run.read_config()
    except DamagedFileError as exc:
        problems.append(str(exc))
        config = {}
    missing = missing_arms(results, config)
    note = _missing_note(missing, len(expected_arms(config)))
    title_note = f"\n[{note.split(' (')[0]}]" if note else ""
    for r in results:  # metrics files too: every unreadable file is named before anything is written
        read_metrics(r, problems)
    file_problems = list(problems)
    if note:
        problems.append(f"{run_dir}: {note}")

    rows = aggregate(results)
    out = out_dir or run.report_dir
    os.makedirs(out, exist_ok=True)
    remove_stale_temps(out)  # of a killed report (a live writer's are kept)
    written = []

    def path(name: str) -> str:
        written.append(os.path.join(out, name))
        return written[-1]

    _write_csv(rows, path("results.csv"))
    _write_markdown(rows, path("results.md"), config, ([note] if note else []) + _validation_note(results) + _stacking_note(results)
                    + [f"left out, unreadable: {p}" for p in file_problems])
    name = f"{config.get('model', '')} on {config.get('dataset', '')}".strip() if config else ""
    suffix = f" ({name})" if name and name != "on" else ""
    plot_vs_weights(rows, "test_acc_at_early_stop", "test accuracy at early stop (%)",
                     f"Test accuracy vs % of weights remaining{suffix}{title_note}", path("accuracy_vs_weights.png"),
                     config, reference=True)
    plot_vs_weights(rows, "early_stop_iter", "early-stopping iteration",
                     f"Early-stopping iteration vs % of weights remaining{suffix}{title_note}",
                     path("early_stop_vs_weights.png"),
                     config)
    from fastticket.app.report_stability import plot_stability
    written += plot_stability(results, rows, out, config, suffix + title_note)
    curves = os.path.join(out, "curves.png")
    if plot_curves(results, rows, curves, None, title_note):
        written.append(curves)
    return written
