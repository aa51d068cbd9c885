"""The report's --stability plots (fastticket.lottery.stability): instability against % of weights remaining,
and the test error along the linear path between an arm and its twin for a few levels.

Written only for runs whose results carry an instability; `plot_stability` returns the paths it wrote.
"""
from __future__ import annotations

import math
import os
import statistics
from typing import Any, Dict, List, Sequence

from fastticket.app.report_plots import arm_label, curve_levels, plot_vs_weights, save_figure
from fastticket.lottery import arms as registry


def has_stability(rows: Sequence[Dict[str, Any]]) -> bool:
    return any(isinstance(r.get("instability"), float) and not math.isnan(r["instability"]) for r in rows)


def plot_stability(results: Sequence[Dict[str, Any]], rows: Sequence[Dict[str, Any]], out: str,
                   config: Dict[str, Any], title_suffix: str) -> List[str]:
    """The two plots into `out`."""
    if not has_stability(rows):
        return []
    written = [os.path.join(out, "instability_vs_weights.png"), os.path.join(out, "stability_paths.png")]
    # plot_vs_weights reads KEY_mean / KEY_std.
    plotted = [{**r, "instability_mean": r.get("instability", math.nan)} for r in rows]
    plot_vs_weights(plotted, "instability", "instability (points of test error)\nmax on path - mean of endpoints",
                     f"Instability vs % of weights remaining{title_suffix}", written[0], config)
    _plot_paths(results, written[1], config, title_suffix)
    return written


def _plot_paths(results: Sequence[Dict[str, Any]], path: str, config: Dict[str, Any], title_suffix: str) -> None:
    """Mean test error over trials at each interpolation point, one colour per level, one style per arm kind."""
    import matplotlib.pyplot as plt

    paths: Dict[tuple, List[List[float]]] = {}
    alphas: Dict[tuple, List[float]] = {}
    density: Dict[int, List[float]] = {}
    for r in results:
        if r.get("stability_errors") and r.get("status", "ok") == "ok":
            key = (int(r["level"]), str(r["arm"]))
            paths.setdefault(key, []).append([float(e) for e in r["stability_errors"]])
            alphas[key] = [float(a) for a in r["stability_alphas"]]
            if r["arm"] == registry.TICKET:
                density.setdefault(int(r["level"]), []).append(float(r["density"]))
    levels = curve_levels(sorted({level for level, _ in paths}), count=4)
    cmap = plt.get_cmap("viridis")
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, level in enumerate(levels):
        colour = cmap(i / max(1, len(levels) - 1))
        for (lvl, arm), runs in sorted(paths.items(), key=lambda kv: registry.order_key(kv[0][1])):
            if lvl != level:
                continue
            mean = [statistics.fmean(v) for v in zip(*runs)]
            weights = f", {100 * statistics.fmean(density[level]):.1f}% weights" if level in density else ""
            ax.plot(alphas[(lvl, arm)], mean, registry.curve_style(arm), color=colour, marker=".", markersize=3,
                    label=f"L{level} {arm_label(arm, config)}{weights}")
    ax.set_xlabel("interpolation a: (1 - a) arm + a twin")
    ax.set_ylabel("test error (%)" + ("\nmean over trials" if any(len(v) > 1 for v in paths.values()) else ""))
    ax.set_title(f"Test error on the line between arm and twin{title_suffix}", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
