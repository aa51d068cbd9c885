"""The benchmark harness's analysis: the dense-vs-skip crossover that sets kernels/dispatch.py's thresholds."""
import json
import math

import pytest
import torch

from fastticket.app.bench import BenchRow, crossover_row


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


def test_options_from_env_is_the_one_reader_of_the_bench_variables():
    from fastticket.app.bench import DTYPE_ENV, QUICK_ENV, options_from_env

    assert options_from_env({}).quick is False and options_from_env({}).dtype == "bf16"
    opts = options_from_env({QUICK_ENV: "1", DTYPE_ENV: "TF32"})
    assert (opts.quick, opts.dtype, opts.device, opts.timing) == (True, "tf32", "cuda", True)
    assert options_from_env({QUICK_ENV: "0"}).quick is False
    with pytest.raises(ValueError, match="fp64"):
        options_from_env({DTYPE_ENV: "fp64"})


def test_bench_suites_and_cli_share_one_case_grid():
    from fastticket.app.bench import BenchOptions, conv, linear, optim

    gpu_quick, gpu_full = (BenchOptions(quick=q, dtype="bf16", timing=True, device="cuda") for q in (True, False))
    assert [c.name for c in linear.grid(gpu_quick)[0]] == [c.name for c in linear.quick_gpu_cases()]
    assert linear.grid(gpu_full)[1:] == (linear.GPU_MASKS, linear.DENSITIES)
    assert conv.grid(gpu_full)[2] == conv.DENSITIES and len(conv.grid(gpu_quick)[0]) == 2
    sets, pairs = optim.step_grid(gpu_full)
    assert [s.name for s in sets] == ["vgg19", "synthetic-1b"]
    assert ("block:64x64", 1.0) not in pairs and ("element", 1.0) in pairs  # 100 % once, not per mask kind
    cpu = BenchOptions(quick=False, dtype="fp32", timing=False, device="cpu")
    assert [s.name for s in optim.step_grid(cpu)[0]] == ["tiny"] and optim.dw_grid(cpu)[0][0][0] == "tiny"


def test_op_step_builds_the_timed_work_of_each_op():
    from fastticket.app.bench import op_step, rotating

    w = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    sets = [(torch.randn(2, 4, dtype=torch.float64, requires_grad=True), torch.randn(2, 3, dtype=torch.float64))
            for _ in range(2)]
    fn = lambda x: x @ w.t()  # noqa: E731
    grads = lambda y, x, g, retain: torch.autograd.grad(y, [x, w], g, retain_graph=retain)  # noqa: E731
    x, g = sets[1]
    assert torch.equal(op_step("fwd", fn, sets, grads)(x, g), fn(x))
    bwd = op_step("bwd", fn, sets, grads)
    for _ in range(2):  # the graph is built once and kept, so the backward can be timed repeatedly
        dx, dw = bwd(x, g)
        assert torch.allclose(dx, g @ w) and torch.allclose(dw, g.t() @ x)
    assert torch.allclose(op_step("fwd+bwd", fn, sets, grads)(x, g)[1], g.t() @ x)
    with pytest.raises(ValueError, match="op"):
        op_step("step", fn, sets, grads)
    seen = []
    call = rotating(lambda *args: seen.append(args), [(1, 2), 3])
    for _ in range(3):
        call()
    assert seen == [(1, 2), (3,), (1, 2)]


def test_write_results_is_atomic_and_complete(tmp_path):
    from fastticket.app.bench import environment, write_results

    rows = [timed_row("large.a", 0.1, 0.5)]
    json_path, md_path = write_results(rows, environment(), tmp_path / "results")
    assert json.loads(json_path.read_text())["rows"][0]["case"] == "large.a"
    assert "| linear | large.a |" in md_path.read_text()
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == sorted([json_path.name, md_path.name])


def test_cli_fails_a_row_outside_the_shared_tolerance(monkeypatch, capsys):
    import fastticket.app.bench as bench
    from fastticket.sparse.testing import parity_tolerance

    def fake(options):
        tol = parity_tolerance(options.dtype)
        return [BenchRow(suite="fake", case="ok", op="fwd", shape="s", dtype=options.dtype, mask="element",
                         density=1.0, parity=tol),
                BenchRow(suite="fake", case="bad", op="fwd", shape="s", dtype=options.dtype, mask="element",
                         density=1.0, parity=tol * 1.5)]

    monkeypatch.setitem(bench.SUITES, "fake", fake)
    assert bench.run_cli(["fake"]) == 1
    assert "parity FAILED for 1 row(s): fake/bad/fwd" in capsys.readouterr().err


def _cpu_run_output(monkeypatch, capsys, rows, suite="search"):
    import fastticket.app.bench as bench

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setitem(bench.SUITES, suite, lambda options: rows)
    assert bench.run_cli([suite]) == 0
    return capsys.readouterr().out


def test_cpu_run_never_says_timings_need_a_gpu_above_a_cpu_timing_table(monkeypatch, capsys):
    # The search suite times the CPU: no line before or after its table may say no timings were taken.
    row = BenchRow(suite="search", case="lenet", op="search", shape="s", dtype="fp32", mask="element",
                   density=1.0, times_ms={"search": 12.5}, extra={"parity": "n/a"})
    out = _cpu_run_output(monkeypatch, capsys, [row])
    before, table, after = out.partition("| search |")
    assert table, out
    assert "Timings need a GPU" not in before and "none were measured" not in out
    assert "the search suite times this CPU" in before
    assert "the search suite's rows are CPU wall-clock timings" in after


def test_cpu_parity_only_run_says_no_timings_after_the_table(monkeypatch, capsys):
    row = BenchRow(suite="fake", case="c", op="fwd", shape="s", dtype="fp32", mask="element", density=1.0,
                   parity=0.0)
    out = _cpu_run_output(monkeypatch, capsys, [row], suite="fake")
    assert "Timings need a GPU" not in out.partition("| fake |")[0] and "search suite" not in out
    assert out.rstrip().endswith("Timings need a GPU: none were measured on this machine.")


def test_dw_program_rows_and_their_session_step(tmp_path):
    """The linear suite's dW rows (64 x 64 tiles against 128 x 128 quads against cuBLAS), run by their GPU-session
    step at tiny scale: on a CPU parity only (both program shapes against float64), the quads' fill (full on the
    mask of twice the tile), the heuristic's pick, and a closing row that says the comparison is unmeasured."""
    from fastticket.app.bench import session_steps
    from fastticket.sparse.testing import parity_tolerance

    if torch.cuda.is_available():
        pytest.skip("the GPU session times these rows itself")
    assert session_steps.main(["linear-dw-quads", str(tmp_path), "--tiny"]) == 0
    rows = session_steps.read_rows(tmp_path)
    *measured, summary = rows
    assert [r["mask"] for r in measured] == ["block:32x32", "block:16x16"]
    for r in measured:
        assert r["op"] == "dw" and r["parity"] < parity_tolerance("fp32") and r["extra"]["heuristic"] == "tiles"
        assert r["extra"]["parity_quads"] < parity_tolerance("fp32") and not r["times_ms"]
    # 5 x 5 tiles: the 32 x 32 blocks fill every quad but the edge ones (half outside the weight).
    assert measured[0]["extra"]["quad_fill"] > 0.7 > measured[1]["extra"]["quad_fill"]
    assert summary["case"] == "dw-quads" and "unmeasured" in summary["extra"]["summary"]


def test_dw_summary_row_reports_ratios_and_the_heuristics_misses():
    from fastticket.app.bench.linear import dw_summary_row

    def row(mask, density, tiles_ms, quads_ms, pick):
        return BenchRow(suite="linear", case="large.x", op="dw", shape="s", dtype="bf16", mask=mask, density=density,
                        times_ms={"dw-tiles": tiles_ms, "dw-quads": quads_ms, "dense": 1.0},
                        extra={"quads_vs_tiles": tiles_ms / quads_ms, "heuristic": pick})
    rows = [row("block:128x128", 0.5, 2.0, 1.0, "quads"), row("block:128x128", 0.1, 1.5, 1.0, "quads"),
            row("block:64x64", 0.5, 1.0, 2.0, "quads"), row("block:64x64", 0.1, 1.0, 1.25, "tiles")]
    summary = dw_summary_row(rows, "bf16").extra
    assert summary["quads_vs_tiles"] == {"block:128x128": (1.5, 2.0), "block:64x64": (0.5, 0.8)}
    assert summary["heuristic_wrong"] == ["block:64x64@0.5"]
    assert summary["summary"] == ("linear dW: tiles ms / quads ms block:128x128 1.50-2.00, block:64x64 0.50-0.80; "
                                  "_dw_quads picked the slower shape in 1 of 4 rows")
