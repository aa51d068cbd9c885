"""The report's plots: accuracy and early-stop iteration against % of weights remaining, training curves.

Each figure is written as a 200 dpi PNG with a vector PDF beside it, atomically (fastticket.lottery.atomic_io).
Used by fastticket.app.report (which decides what to plot), report_stability and compare.
"""
from __future__ import annotations

import math
import os
import statistics
from typing import Any, Dict, List, Optional, Sequence, Tuple

from fastticket.errors import DamagedFileError
from fastticket.lottery import arms as registry
from fastticket.lottery.arms import TICKET
from fastticket.lottery.armdir import ArmDir
from fastticket.lottery.atomic_io import atomic_write


def arm_label(arm: str, config: Dict[str, Any]) -> str:
    """The legend label of an arm, naming the run's rewind mode / refill where they are not the defaults."""
    label = registry.label(arm)
    if arm == TICKET and config:
        extras = []
        if config.get("rewind", "weights") != "weights":
            extras.append(f"rewind {config['rewind']}")
        if config.get("refill"):
            extras.append(f"refill {config['refill']}")
        if config.get("early_bird") is not None:
            extras.append(f"early-bird {config['early_bird']:g}")
        if extras:
            label += " (" + ", ".join(extras) + ")"
    return label


PLOT_DPI = 200  # print resolution for the PNGs; the PDF beside each is vector


def save_figure(fig: Any, path: str, dpi: int = PLOT_DPI) -> None:
    """A matplotlib figure as PNG at `path` and as PDF beside it (same name, .pdf), each written atomically."""
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi))
    # No creation date: the same run gives the same bytes (a rerun after a crash is checked byte for byte).
    atomic_write(os.path.splitext(path)[0] + ".pdf",
                 lambda f: fig.savefig(f, format="pdf", metadata={"CreationDate": None}))


def density_axis(ax, densities: Sequence[float]) -> None:
    """Log-scale x in percent remaining, reversed so that sparser networks are to the right, as in the paper."""
    from matplotlib.ticker import FixedLocator, NullLocator

    ax.set_xscale("log")
    ticks = sorted(set(round(d, 1) for d in densities if d > 0), reverse=True)
    if len(ticks) > 8:  # keep labels legible: every k-th level, always including the densest and sparsest
        step = math.ceil(len(ticks) / 8)
        ticks = sorted(set(ticks[::step]) | {ticks[-1]}, reverse=True)
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([f"{t:g}" for t in ticks])
    lo, hi = min(densities), max(densities)
    ax.set_xlim(hi * 1.15, lo / 1.15)
    ax.set_xlabel("percent of weights remaining")
    ax.grid(True, alpha=0.3)


def plot_vs_weights(rows: Sequence[Dict[str, Any]], key: str, ylabel: str, title: str, path: str,
                     config: Optional[Dict[str, Any]] = None, reference: bool = False) -> None:
    """`key`'s mean per arm against % of weights remaining, error bars (the std) where n > 1; `reference`: the
    dense network's (level 0) value as a dashed line."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    dense = [r[f"{key}_mean"] for r in rows if r["level"] == 0 and r["arm"] == TICKET]
    if reference and dense and not math.isnan(dense[0]):
        ax.axhline(dense[0], color="0.5", linestyle="--", linewidth=1, label=f"dense (level 0): {dense[0]:.2f}")
    arms = sorted({r["arm"] for r in rows}, key=registry.order_key)
    any_bars = False
    for i, arm in enumerate(arms):
        pts = [r for r in rows if r["arm"] == arm and not math.isnan(r[f"{key}_mean"])]
        if not pts:
            continue
        # Arms share densities (reinit and random use the ticket's): a small multiplicative offset per arm
        # (the axis is logarithmic) keeps their error bars apart.
        shift = 1.0 + 0.015 * (i - (len(arms) - 1) / 2)
        xs = [r["weights_remaining_pct"] * shift for r in pts]
        ys = [r[f"{key}_mean"] for r in pts]
        errs = [0.0 if math.isnan(r[f"{key}_std"]) else r[f"{key}_std"] for r in pts]
        n = sorted({int(r["n_trials"]) for r in pts})
        n_text = f"n={n[0]}" if len(n) == 1 else f"n={n[0]}-{n[-1]}"
        any_bars = any_bars or any(errs)
        ax.errorbar(xs, ys, yerr=errs if any(errs) else None, marker="o", markersize=4, capsize=3,
                    color=registry.color(arm), label=f"{arm_label(arm, config or {})} ({n_text})")
    density_axis(ax, [r["weights_remaining_pct"] for r in rows])
    several = any(int(r["n_trials"]) > 1 for r in rows)
    ax.set_ylabel(ylabel + ("\nmean ± std over n trials" if several else ""))
    ax.set_title(title)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    if any_bars:
        ax.annotate("points: mean over n trials; error bars: sample std over n trials", (0.01, 0.01),
                    xycoords="axes fraction", fontsize=7, alpha=0.8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def read_metrics(result: Dict[str, Any], problems: Optional[List[str]] = None) -> List[Dict[str, Any]]:
    try:
        entries = ArmDir(result["path"], result["level"], result["arm"], result["trial"],
                         result.get("replica", 0)).read_metrics()
    except DamagedFileError as exc:
        if problems is not None:
            problems.append(str(exc))
        return []
    return [e for e in entries if isinstance(e.get("test_acc"), (int, float)) and isinstance(e.get("iteration"), int)]


def mean_curve(results: Sequence[Dict[str, Any]], problems: Optional[List[str]] = None
                ) -> Tuple[List[int], List[float]]:
    """Test accuracy (percent) per iteration, averaged over the trials that recorded that iteration."""
    per_iter: Dict[int, List[float]] = {}
    for r in results:
        for e in read_metrics(r, problems):
            per_iter.setdefault(int(e["iteration"]), []).append(100.0 * float(e["test_acc"]))
    its = sorted(per_iter)
    return its, [statistics.fmean(per_iter[i]) for i in its]


def curve_levels(levels: Sequence[int], count: int = 5) -> List[int]:
    """About `count` levels spread over the search, always the dense level 0 and the last."""
    if len(levels) <= count:
        return list(levels)
    picks = {levels[round(i * (len(levels) - 1) / (count - 1))] for i in range(count)}
    return sorted(picks)


def plot_curves(results: Sequence[Dict[str, Any]], rows: Sequence[Dict[str, Any]], path: str,
                 problems: Optional[List[str]] = None, title_note: str = "") -> bool:
    import matplotlib.pyplot as plt

    density = {(r["level"], r["arm"]): r["weights_remaining_pct"] for r in rows}
    ticket_levels = sorted({r["level"] for r in results if r["arm"] == TICKET})
    if not ticket_levels:
        return False
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    cmap = plt.get_cmap("viridis")
    picks = curve_levels(ticket_levels)
    drew = False
    for i, level in enumerate(picks):
        color = cmap(i / max(1, len(picks) - 1) * 0.9)
        for arm in sorted({r["arm"] for r in results if r["level"] == level}, key=registry.order_key):
            style = registry.curve_style(arm)
            its, accs = mean_curve([r for r in results if r["level"] == level and r["arm"] == arm], problems)
            if not its:
                continue
            label = f"{density[(level, arm)]:.1f}%" + ("" if arm == TICKET else f" {arm}")
            ax.plot(its, accs, style, color=color, label=label, linewidth=1.4)
            drew = True
    if not drew:
        plt.close(fig)
        return False
    ax.set_xlabel("training iteration")
    ax.set_ylabel("test accuracy (%)")
    arms = sorted({r["arm"] for r in results}, key=registry.order_key)
    styles = {"-": "solid", "--": "dashed", ":": "dotted", "-.": "dash-dot"}
    key = ", ".join(f"{styles[registry.curve_style(a)]}: {a}" for a in arms)
    ax.set_title(f"Test accuracy during training ({key}){title_note}", fontsize=9)
    ax.grid(True, alpha=0.3)
    shown = ("" if len(picks) == len(ticket_levels)
             else f"\n(levels {', '.join(map(str, picks))} of 0-{ticket_levels[-1]})")
    ax.legend(title=f"weights remaining{shown}", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return True
