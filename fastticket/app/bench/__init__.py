"""Benchmark harness shared by the linear, conv and optimizer suites (`fastticket bench`, `bench/`).

A suite is a function `BenchOptions -> list[BenchRow]` registered with `@suite("name")` in a module
`fastticket.app.bench.<name>`; `run_suites` imports those modules lazily, so a missing suite is skipped with
a note instead of failing the others. Every row carries a parity column (relative error against a float64
reference), so the same suites are useful on a machine without a GPU: there they run the Triton kernels in
the interpreter on small shapes and report parity only (timings need a GPU; a number that was not measured
on one is never reported).

Timing (docs/architecture.md, "The front ends"): median of `triton.testing.do_bench` after warm-up, with several
input sets rotated so a working set that fits in L2 does not flatter the kernel. `time_ms`, `op_step` and
`rotating` are the one timing path: `fastticket bench` and the pytest-benchmark suites in bench/ both use them.
Parity uses fastticket.sparse.testing; running the suites and writing results: runner.py.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import math
import os
import platform
import re
import statistics
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from fastticket._lazy import lazy_attributes
from fastticket.sparse.testing import nan_max

__all__ = [
    "BenchOptions", "BenchRow", "SUITES", "suite", "environment", "time_ms", "run_suites",
    "format_table", "write_results", "run_cli", "KNOWN_SUITES", "device_slug", "summaries", "parse_dtype",
    "env_override", "make_mask", "time_impls", "crossover", "op_step", "rotating", "options_from_env",
    "QUICK_ENV", "DTYPE_ENV", "layer_op_row", "crossover_row",
]

# Running and writing (fastticket.app.bench.runner) load on first use: the suites import this package, and
# the runner imports the suites.
__getattr__, __dir__ = lazy_attributes(__name__, {name: f"runner:{name}" for name in
                                                  ("run_suites", "summaries", "format_table", "write_results",
                                                   "run_cli")})

# Suites the CLI knows about; each lives in fastticket.app.bench.<name> (written by different helpers).
KNOWN_SUITES = ("linear", "conv", "optim", "search")

OPS = ("fwd", "bwd", "fwd+bwd", "step")


# Environment of the pytest-benchmark suites in bench/ (`fastticket bench` takes flags instead).
QUICK_ENV = "FASTTICKET_BENCH_QUICK"  # "1": the small case grid (a smoke run of the harness on a GPU)
DTYPE_ENV = "FASTTICKET_BENCH_DTYPE"  # bf16 (default) | fp16 | fp32 | tf32


@dataclass
class BenchOptions:
    """What a suite is asked to do.

    quick:  small shape set (CI smoke runs, and always on CPU, where the Triton interpreter is slow).
    dtype:  "bf16" | "fp16" | "fp32" | "tf32" ("bf16" default on a GPU, "fp32" on CPU: the interpreter has
            no bf16 arithmetic).
    timing: True iff a CUDA device is present; False means parity only, `times_ms` stays empty.
    device: where tensors live ("cuda" or "cpu").
    """

    quick: bool = False
    dtype: str = field(default_factory=lambda: "bf16" if torch.cuda.is_available() else "fp32")
    timing: bool = field(default_factory=torch.cuda.is_available)
    device: str = field(default_factory=lambda: "cuda" if torch.cuda.is_available() else "cpu")

    @property
    def torch_dtype(self) -> torch.dtype:
        return parse_dtype(self.dtype)

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)


def options_from_env(environ: Optional[Dict[str, str]] = None) -> BenchOptions:
    """The options of a pytest-benchmark run (bench/), from FASTTICKET_BENCH_QUICK and FASTTICKET_BENCH_DTYPE:
    the one place those variables are read. Always a GPU run (bench/ skips every benchmark without CUDA), so
    collecting the suites on a CPU lists the cases a GPU would run."""
    environ = os.environ if environ is None else environ
    quick = environ.get(QUICK_ENV, "0").strip() not in ("", "0")
    dtype = environ.get(DTYPE_ENV, "bf16").strip().lower() or "bf16"
    parse_dtype(dtype)  # fail early on a bad name
    return BenchOptions(quick=quick, dtype=dtype, timing=True, device="cuda")


def parse_dtype(name: str) -> torch.dtype:
    """"fp32"/"tf32" -> float32 (tf32 is float32 storage with TF32 matmuls), "bf16", "fp16"."""
    table = {"fp32": torch.float32, "float32": torch.float32, "tf32": torch.float32,
             "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
    try:
        return table[name.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use one of fp32, tf32, bf16, fp16") from None


@dataclass
class BenchRow:
    """One measured (or, without a GPU, parity-only) case of a suite.

    times_ms:       implementation name -> median milliseconds (empty when not timed).
    ratio_vs_dense: implementation name -> dense_ms / impl_ms, i.e. > 1 means faster than dense.
    parity:         ||out - ref|| / ||ref|| of fastticket's result against a float64 reference (nan = NaN seen,
                    which fails `fastticket bench`). A row with no reference sets extra["parity"] = "n/a".
    extra:          anything suite-specific (live-tile fraction, "n/a" reasons, config, ...).
    """

    suite: str
    case: str
    op: str
    shape: str
    dtype: str
    mask: str
    density: float
    times_ms: Dict[str, float] = field(default_factory=dict)
    ratio_vs_dense: Dict[str, float] = field(default_factory=dict)
    parity: float = float("nan")
    extra: Dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


SuiteFn = Callable[[BenchOptions], List[BenchRow]]
SUITES: Dict[str, SuiteFn] = {}


def suite(name: str) -> Callable[[SuiteFn], SuiteFn]:
    """Register a suite function under `name` (decorator)."""

    def register(fn: SuiteFn) -> SuiteFn:
        SUITES[name] = fn
        return fn

    return register


# --------------------------------------------------------------------------------------------- environment

def _git_commit() -> Optional[str]:
    try:
        repo = Path(__file__).resolve().parents[2]
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except Exception:  # no git, not a checkout, ...: the commit is informative, not required
        return None


def environment() -> Dict[str, Any]:
    """Where the numbers come from: device, library versions, commit, time."""
    try:
        import triton

        triton_version: Optional[str] = triton.__version__
    except Exception:
        triton_version = None
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    else:
        device = "cpu (no GPU: timings skipped)"
    return {
        "device": device,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "commit": _git_commit(),
        "timestamp_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
    }


def device_slug(env: Optional[Dict[str, Any]] = None) -> str:
    """"NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"; "cpu" without a GPU."""
    env = env or environment()
    name = env.get("device", "cpu")
    if not torch.cuda.is_available() or str(name).startswith("cpu"):
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", str(name).lower()).strip("-") or "gpu"


# --------------------------------------------------------------------------------------------- measuring

def time_ms(fn: Callable[..., Any], inputs: Optional[Sequence[Any]] = None) -> float:
    """Median milliseconds of `fn` on the GPU, after warm-up.

    inputs: optional list of argument tuples (or single arguments); the calls rotate through them so each
    timed call touches a different working set and a small case cannot live in L2 between calls. Without
    inputs, `fn()` is timed. Raises RuntimeError without CUDA: a CPU time of an interpreted kernel means
    nothing and must never be reported.
    """
    if not torch.cuda.is_available():
        raise RuntimeError("time_ms needs a CUDA device; on CPU only parity is measured")
    call = rotating(fn, inputs)
    try:
        from triton.testing import do_bench

        # return_mode="median" is accepted by triton >= 2.2; do_bench flushes L2 between calls as well.
        return float(do_bench(call, warmup=25, rep=100, return_mode="median"))
    except ImportError:
        pass
    # Fallback without triton: CUDA events around each call.
    for _ in range(10):
        call()
    torch.cuda.synchronize()
    samples = []
    for _ in range(50):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end))
    return float(statistics.median(samples))


def rotating(fn: Callable[..., Any], inputs: Optional[Sequence[Any]] = None) -> Callable[[], Any]:
    """A zero-argument call of `fn` that takes the next of `inputs` (argument tuples or single arguments) each
    time, round robin, so consecutive timed calls touch different working sets; `fn` itself without inputs."""
    if not inputs:
        return fn
    sets = [a if isinstance(a, tuple) else (a,) for a in inputs]
    state = {"i": 0}

    def call() -> Any:
        args = sets[state["i"] % len(sets)]
        state["i"] += 1
        return fn(*args)

    return call


def op_step(op: str, fn: Callable[[Any], Any], sets: Sequence[Tuple[Any, Any]],
            grads: Callable[[Any, Any, Any, bool], Any]) -> Callable[[Any, Any], Any]:
    """The timed work of one layer op as a function of an (x, g) input set: "fwd" runs fn(x); "bwd" builds
    each set's graph once, here, and runs `grads(y, x, g, True)` alone (retain_graph, so it can repeat);
    "fwd+bwd" runs both. Call it inside the dispatch context the timing needs (e.g. forced tile skipping)."""
    if op == "fwd":
        return lambda x, g: fn(x)
    if op == "bwd":
        ys = {id(x): fn(x) for x, _ in sets}
        return lambda x, g: grads(ys[id(x)], x, g, True)
    if op == "fwd+bwd":
        return lambda x, g: grads(fn(x), x, g, False)
    raise ValueError(f"unknown op {op!r}: use fwd, bwd or fwd+bwd")


def time_impls(op: str, impls: Dict[str, Callable[[Any], Any]], sets: Sequence[Tuple[Any, Any]],
               grads: Callable[[Any, Any, Any, bool], Any],
               forced_skip: Callable[[], contextlib.AbstractContextManager]) -> Dict[str, float]:
    """Median ms (`time_ms`) of each layer implementation (name -> fn(x) -> y) for one op (`op_step`),
    rotating the (x, g) `sets`. The implementation named "fastticket-skip" runs under `forced_skip()` (tile
    skipping forced on), every other one as is."""
    times: Dict[str, float] = {}
    for name, fn in impls.items():
        ctx = forced_skip if name == "fastticket-skip" else contextlib.nullcontext
        with ctx():
            times[name] = time_ms(op_step(op, fn, sets, grads), sets)
    return times


# --------------------------------------------------------------------------------------------- cases

@contextlib.contextmanager
def env_override(name: str, value: Optional[str]) -> Iterator[None]:
    """Set (or, with None, unset) environment variable `name` inside a `with` block; restored afterwards.
    The suites force a dispatch path with it (e.g. FASTTICKET_DENSE_THRESHOLD_LINEAR=1.01)."""
    old = os.environ.get(name)
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def make_mask(shape: Sequence[int], kind: str, density: float, generator: torch.Generator, *,
              keep_one_block: bool = False) -> torch.Tensor:
    """A bool mask of `shape` on the generator's device.

    "element": iid Bernoulli(density). "block:RxC": whole R x C blocks of the 2-D view
    [shape[0], prod(shape[1:])] (a conv filter as [C_out, C_in*kh*kw]) alive with probability `density`
    (what block pruning produces), all entries of a live block kept. keep_one_block: at a density > 0, make
    the first block live when the draw left none (the linear and conv suites want a non-empty layer).
    """
    shape = tuple(int(v) for v in shape)
    if kind == "element":
        return torch.rand(shape, generator=generator, device=generator.device) < density
    if not kind.startswith("block:"):
        raise ValueError(f"unknown mask kind {kind!r}: use element or block:RxC")
    r, c = (int(v) for v in kind.split(":", 1)[1].lower().split("x"))
    rows, cols = shape[0], math.prod(shape[1:])
    live = torch.rand((-(-rows // r), -(-cols // c)), generator=generator, device=generator.device) < density
    if keep_one_block and density > 0 and not live.any():
        live.view(-1)[0] = True
    return live.repeat_interleave(r, 0).repeat_interleave(c, 1)[:rows, :cols].reshape(shape).contiguous()


# --------------------------------------------------------------------------------------------- crossover

def _crossover_of(points: List[Tuple[float, bool]]) -> Dict[str, object]:
    points = sorted(points)
    any_win = [f for f, w in points if w]
    last_win, first_loss = None, None
    for f, w in points:
        if w:
            last_win = f
        else:
            first_loss = f
            break
    if first_loss is None:
        suggested = 1.01  # skipping won at every measured point
    elif last_win is None:
        suggested = 0.0   # skipping lost even at the sparsest point
    else:
        suggested = (last_win + first_loss) / 2
    return {"largest_winning_live_fraction": max(any_win) if any_win else None,
            "crossover_live_fraction": last_win, "first_loss": first_loss, "suggested_threshold": suggested,
            "points": len(points)}


def crossover(rows: Sequence[BenchRow], op: str = "fwd+bwd", pooled_prefix: str = "large."
              ) -> Dict[str, Dict[str, object]]:
    """Where forced tile skipping stops beating dense, from the timed rows of `op`.

    Per case family (case/mask) and pooled over the cases whose name starts with `pooled_prefix` (key
    "pooled"): `crossover_live_fraction` walks up from the sparsest point and stops at the first loss (a win
    above a loss is treated as noise), `largest_winning_live_fraction` is the largest win anywhere, and
    `suggested_threshold` is the midpoint between the last win and the first loss: the value for
    kernels/dispatch.py (tile skipping runs when live_fraction < threshold).
    """
    families: Dict[str, List[Tuple[float, bool]]] = {}
    pooled: List[Tuple[float, bool]] = []
    for r in rows:
        if r.op != op or "fastticket-skip" not in r.times_ms or "dense" not in r.times_ms:
            continue
        point = (float(r.extra["live_fraction"]), r.times_ms["fastticket-skip"] < r.times_ms["dense"])
        families.setdefault(f"{r.case}/{r.mask}", []).append(point)
        if r.case.startswith(pooled_prefix):
            pooled.append(point)
    result = {fam: _crossover_of(points) for fam, points in families.items()}
    if pooled:
        result["pooled"] = _crossover_of(pooled)
    return result


def layer_op_row(suite_name: str, case: str, op: str, shape: str, mask: str, density: float, dtype: str, layer,
                 parity: Dict[str, Dict[str, float]], extra: Dict[str, object], timing: bool,
                 forced_skip, extra_impls: Optional[Dict[str, Callable]] = None) -> BenchRow:
    """One row of a layer suite: on a GPU, `op` timed for fastticket (dispatched and forced tile skipping),
    dense and the prune-style path (plus `extra_impls`) in the same run; always the parity of both paths.
    `layer` is a suite's BenchLayer: input sets `xs`/`gs`, implementations `dense`/`fastticket`/`prune`
    (x -> y) and `grads(y, x, g, retain)`."""
    times: Dict[str, float] = {}
    if timing:
        impls = {"dense": layer.dense, "fastticket": layer.fastticket, "fastticket-skip": layer.fastticket,
                 "prune": layer.prune, **(extra_impls or {})}
        times = time_impls(op, impls, list(zip(layer.xs, layer.gs)), layer.grads, forced_skip)
    ratios = {name: times["dense"] / t for name, t in times.items() if name != "dense" and t > 0}
    return BenchRow(suite=suite_name, case=case, op=op, shape=shape, dtype=dtype, mask=mask, density=density,
                    times_ms=times, ratio_vs_dense=ratios,
                    parity=nan_max(parity["skip"][op], parity["dispatch"][op]), extra=extra)


def crossover_row(suite_name: str, rows: Sequence[BenchRow], dtype: str, timing: bool, pooled_prefix: str,
                  pooled_what: str) -> BenchRow:
    """A layer suite's closing row: where tile skipping stops beating dense on fwd+bwd (`crossover`, pooled over
    the cases named `pooled_prefix*`, described as `pooled_what`), and the kernels/dispatch.py threshold that
    suggests, with a one-line `summary`. Without timings it says the crossover is unmeasured."""
    threshold_key = {"linear": "linear", "conv": "conv2d"}[suite_name]
    extra: Dict[str, object] = {"parity": "n/a", "crossover_live_fraction": None, "suggested_threshold": None,
                                "note": "unmeasured: the crossover needs GPU timings"}
    if timing:
        per_family = crossover(rows, pooled_prefix=pooled_prefix)
        pooled = per_family.get("pooled", {})
        extra.update(crossover=per_family, crossover_live_fraction=pooled.get("crossover_live_fraction"),
                     suggested_threshold=pooled.get("suggested_threshold"),
                     note=f"set kernels/dispatch.py DENSE_THRESHOLDS[{threshold_key!r}] from suggested_threshold")
    if extra["suggested_threshold"] is not None:
        extra["summary"] = (f"{suite_name}: tile skipping beats dense (fwd+bwd, {pooled_what}) up to a live-tile "
                            f"fraction of {extra['crossover_live_fraction']}; suggested "
                            f"DENSE_THRESHOLDS[{threshold_key!r}] = {extra['suggested_threshold']:.3f}")
    else:
        extra["summary"] = f"{suite_name}: dispatch crossover unmeasured (needs GPU timings of {pooled_what})"
    return BenchRow(suite=suite_name, case="crossover", op="fwd+bwd", shape="-", dtype=dtype, mask="-",
                    density=float("nan"), parity=float("nan"), extra=extra)
