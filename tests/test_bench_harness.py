"""The benchmark harness's analysis: the dense-vs-skip crossover that sets kernels/dispatch.py's thresholds."""
import math

from fastticket.bench import BenchRow, crossover_row


def timed_row(case: str, live: float, skip_ms: float, dense_ms: float = 1.0, op: str = "fwd+bwd") -> BenchRow:
    return BenchRow(suite="linear", case=case, op=op, shape="s", dtype="bf16", mask="block:64x64", density=live,
                    times_ms={"dense": dense_ms, "fastticket-skip": skip_ms}, parity=1e-3,
                    extra={"live_fraction": live})


def test_crossover_row_reports_the_last_win_and_suggests_the_midpoint():
    rows = [timed_row("large.a", 0.05, 0.1), timed_row("large.a", 0.2, 0.3), timed_row("large.a", 0.5, 0.8),
            timed_row("large.a", 0.7, 1.2), timed_row("large.a", 0.9, 0.9),  # a win above a loss: noise
            timed_row("small.b", 0.1, 5.0),                                   # not pooled
            timed_row("large.a", 0.95, 0.1, op="fwd")]                       # other ops are ignored
    row = crossover_row("linear", rows, "bf16", timing=True, pooled_prefix="large.", pooled_what="the large layers")
    assert row.case == "crossover" and row.suite == "linear"
    assert row.extra["crossover_live_fraction"] == 0.5
    assert math.isclose(row.extra["suggested_threshold"], 0.6)
    assert row.extra["crossover"]["pooled"]["largest_winning_live_fraction"] == 0.9
    assert row.extra["crossover"]["small.b/block:64x64"]["suggested_threshold"] == 0.0  # lost everywhere
    assert "DENSE_THRESHOLDS['linear'] = 0.600" in row.extra["summary"]


def test_crossover_row_without_timings_says_unmeasured():
    row = crossover_row("conv", [timed_row("imagenet.x", 0.1, 0.5)], "fp32", timing=False,
                        pooled_prefix="imagenet.", pooled_what="the ImageNet-sized layer")
    assert row.extra["suggested_threshold"] is None and "crossover" not in row.extra
    assert row.extra["summary"] == "conv: dispatch crossover unmeasured (needs GPU timings of the ImageNet-sized layer)"
