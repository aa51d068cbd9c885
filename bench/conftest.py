"""pytest-benchmark suites: `pytest bench/` on a machine with a CUDA GPU (not part of CI).

Without CUDA every benchmark is skipped with a reason: a CPU time of a kernel run in the Triton interpreter
says nothing about the GPU, and DESIGN.md section 8 forbids reporting it. Parity on CPU is covered by
tests/ and by `fastticket bench` (which prints parity without timings).

FASTTICKET_BENCH_QUICK=1 limits the suites to a small subset (a smoke run of the harness on a GPU).
"""
from __future__ import annotations

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
QUICK = os.environ.get("FASTTICKET_BENCH_QUICK", "0") not in ("", "0")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="benchmarks need a CUDA GPU; on CPU run `fastticket bench` for parity only")
    for item in items:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def bench_dtype() -> torch.dtype:
    """FASTTICKET_BENCH_DTYPE=bf16|fp16|fp32|tf32 (default bf16, the precision the targets are stated in)."""
    from fastticket.bench import parse_dtype

    name = os.environ.get("FASTTICKET_BENCH_DTYPE", "bf16")
    if name.lower() == "tf32":
        torch.backends.cuda.matmul.allow_tf32 = True
    return parse_dtype(name)
