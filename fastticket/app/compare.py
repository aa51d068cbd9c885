"""Several runs side by side: one table and one set of plots over run directories of one model and dataset.

`make_comparison([RUN_DIR, ...], out_dir)` writes out_dir/results.csv and results.md (a `run` column naming
each run) and accuracy_vs_weights.png / early_stop_vs_weights.png (one line per run and arm, error bars over
trials). Runs are labelled from their config.json: by the settings in which they differ (e.g.
"refill=block:16x16" against "refill=None"), or by directory name where they differ in none. Runs of
different models or datasets are refused: their accuracies are not comparable.
"""
from __future__ import annotations

import math
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

from fastticket.errors import ConfigError
from fastticket.app.report import (CSV_COLUMNS, METHOD_DIGITS, METHOD_HEADERS, _fmt, _method_columns, aggregate,
                                   collect_results, write_csv)
from fastticket.app.report_plots import density_axis, save_figure
from fastticket.lottery import arms as registry
from fastticket.lottery.atomic_io import atomic_write_text
from fastticket.lottery.rundir import RunDir

# Settings that never tell runs apart in a label: where they were run, not what was run; and the controls,
# which are arms (lines of their own) rather than a property of the run.
_NOT_LABELS = ("data_dir", "device", "controls")


def _describe(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value) or "none"
    return str(value)


def run_labels(configs: Sequence[Dict[str, Any]], dirs: Sequence[str]) -> List[str]:
    """A short label per run: the config fields whose values differ between the runs."""
    keys = sorted({k for c in configs for k in c} - set(_NOT_LABELS))
    differ = [k for k in keys if len({_describe(c.get(k)) for c in configs}) > 1]
    labels = []
    for config, path in zip(configs, dirs):
        parts = [f"{k}={_describe(config.get(k))}" for k in differ]
        labels.append(", ".join(parts) if parts else os.path.basename(os.path.normpath(path)))
    if len(set(labels)) < len(labels):  # the same settings twice: the directory names tell them apart
        labels = [f"{label} [{os.path.basename(os.path.normpath(p))}]" for label, p in zip(labels, dirs)]
    return labels


def check_comparable(configs: Sequence[Dict[str, Any]], dirs: Sequence[str]) -> None:
    for key in ("dataset", "model"):
        values = {_describe(c.get(key)) for c in configs}
        if len(values) > 1:
            listing = ", ".join(f"{d}: {_describe(c.get(key))}" for c, d in zip(configs, dirs))
            raise ConfigError(f"runs with different {key}s cannot be compared in one report ({listing}); "
                              f"compare runs of one model on one dataset")


def comparison_rows(run_dirs: Sequence[str], problems: Optional[List[str]] = None
                    ) -> Tuple[List[Dict[str, Any]], List[str], List[Dict[str, Any]]]:
    """(rows with a "run" label, the labels, the configs) of several run directories. `problems` receives one
    line per file that could not be read (left out, as in fastticket.app.report)."""
    if len(set(os.path.normpath(d) for d in run_dirs)) < len(run_dirs):
        raise ConfigError(f"a run directory is given twice: {list(run_dirs)}")
    configs = []
    for d in run_dirs:
        config = RunDir(d).read_config() if os.path.isdir(d) else None
        if not config:
            raise ConfigError(f"{d} is not a fastticket run directory (no config.json); run `fastticket search "
                              f"--out {d}` first")
        configs.append(config)
    check_comparable(configs, run_dirs)
    labels = run_labels(configs, run_dirs)
    rows = []
    for d, label in zip(run_dirs, labels):
        results = collect_results(d, problems)
        if not results:
            raise ConfigError(f"no finished levels in {d}: nothing to compare")
        rows += [{"run": label, **r} for r in aggregate(results)]
    return rows, labels, configs


def _write_csv(rows: Sequence[Dict[str, Any]], path: str) -> None:
    write_csv(path, ("run",) + CSV_COLUMNS + _method_columns(rows), rows)


def comparison_table(rows: Sequence[Dict[str, Any]]) -> str:
    """A markdown table, one line per run, level and arm."""
    extra = _method_columns(rows)
    lines = ["| run | arm | level | weights remaining % | test acc at early stop % | early-stop iteration | trials |"
             + "".join(f" {METHOD_HEADERS[c]} |" for c in extra),
             "|---|---|---:|---:|---:|---:|---:|" + "---:|" * len(extra)]
    for r in rows:
        lines.append(f"| {r['run']} | {r['arm']} | {r['level']} | {r['weights_remaining_pct']:.1f} "
                     f"| {_fmt(r['test_acc_at_early_stop_mean'], r['test_acc_at_early_stop_std'], 2)} "
                     f"| {_fmt(r['early_stop_iter_mean'], r['early_stop_iter_std'], 0)} | {r['n_trials']} |"
                     + "".join(f" {_fmt(r[c], math.nan, METHOD_DIGITS.get(c, 0))} |" for c in extra))
    return "\n".join(lines)


def _plot(rows: Sequence[Dict[str, Any]], labels: Sequence[str], key: str, ylabel: str, title: str,
          path: str) -> List[str]:
    """Draw one line per run and arm; returns the legend labels drawn."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.2, 4.6))
    drawn: List[str] = []
    styles = ["-", "--", ":", "-."]
    markers = ["o", "s", "^", "D", "v", "P"]
    cmap = plt.get_cmap("tab10")
    lines = [(label, arm) for label in labels
             for arm in sorted({r["arm"] for r in rows if r["run"] == label}, key=registry.order_key)]
    for i, (label, arm) in enumerate(lines):
        pts = [r for r in rows if r["run"] == label and r["arm"] == arm and not math.isnan(r[f"{key}_mean"])]
        if not pts:
            continue
        errs = [0.0 if math.isnan(r[f"{key}_std"]) else r[f"{key}_std"] for r in pts]
        run_index = labels.index(label)
        drawn.append(f"{label}: {registry.label(arm)}" if len(labels) > 1 else registry.label(arm))
        ax.errorbar([r["weights_remaining_pct"] for r in pts], [r[f"{key}_mean"] for r in pts],
                    yerr=errs if any(errs) else None, color=cmap(i % 10), linestyle=styles[run_index % len(styles)],
                    marker=markers[run_index % len(markers)], markersize=4, capsize=3,
                    label=drawn[-1])
    density_axis(ax, [r["weights_remaining_pct"] for r in rows])
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return drawn


def make_comparison(run_dirs: Sequence[str], out_dir: str, problems: Optional[List[str]] = None) -> List[str]:
    """Write the comparison of `run_dirs` into `out_dir`; returns the paths written."""
    rows, labels, configs = comparison_rows(run_dirs, problems)
    import matplotlib

    matplotlib.use("Agg")
    os.makedirs(out_dir, exist_ok=True)
    written = [os.path.join(out_dir, n) for n in ("results.csv", "results.md", "accuracy_vs_weights.png",
                                                  "early_stop_vs_weights.png")]
    _write_csv(rows, written[0])
    name = f"{configs[0].get('model', '')} on {configs[0].get('dataset', '')}"
    header = ["# Runs compared", "", f"{name}. Runs: " + "; ".join(f"{label} ({d})" for label, d
                                                                  in zip(labels, run_dirs)), "",
              "Test accuracy in percent, mean ± std over trials; early stop = iteration of minimum validation loss.",
              ""]
    atomic_write_text(written[1], "\n".join(header + [comparison_table(rows)]) + "\n")
    _plot(rows, labels, "test_acc_at_early_stop", "test accuracy at early stop (%)",
          f"Test accuracy vs % of weights remaining ({name})", written[2])
    _plot(rows, labels, "early_stop_iter", "early-stopping iteration",
          f"Early-stopping iteration vs % of weights remaining ({name})", written[3])
    from fastticket.app.report_stability import has_stability
    if has_stability(rows):  # --stability runs: e.g. rewinding to 0 against rewinding to k
        written.append(os.path.join(out_dir, "instability_vs_weights.png"))
        _plot([{**r, "instability_mean": r.get("instability", math.nan)} for r in rows], labels, "instability",
              "instability (points of test error)", f"Instability vs % of weights remaining ({name})", written[-1])
    return written
