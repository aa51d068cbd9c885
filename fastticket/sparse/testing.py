"""Parity helpers shared by the unit tests and the benchmark suites: how far a result is from its float64
reference, with NaN never passing (see docs/architecture.md, "Tests")."""
from __future__ import annotations

import torch


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; nan if `out` holds any NaN (NaN never passes); 0 when both are zero."""
    out64 = out.detach().to(torch.float64).cpu()
    ref64 = ref.detach().to(torch.float64).cpu()
    if out64.shape != ref64.shape:
        raise ValueError(f"shape mismatch: {tuple(out64.shape)} vs reference {tuple(ref64.shape)}")
    if torch.isnan(out64).any() or torch.isnan(ref64).any():
        return float("nan")
    diff = torch.linalg.vector_norm(out64 - ref64).item()
    norm = torch.linalg.vector_norm(ref64).item()
    if norm == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return diff / norm


def nan_max(*values: float) -> float:
    """max() of relative errors in which a NaN wins (a NaN error must never hide behind a finite one)."""
    return max(values, key=lambda v: float("inf") if v != v else v)


# The one tolerance table: ||out - ref|| / ||ref|| against a float64 reference, by compute precision.
PARITY_TOLERANCES = {"fp32": 1e-5, "tf32": 1e-3, "bf16": 1e-2, "fp16": 1e-2}
_DTYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def parity_tolerance(precision: str) -> float:
    """The tolerance for a precision name ("fp32", "tf32", "bf16", "fp16"; torch dtype names work too)."""
    name = str(precision).lower().replace("torch.", "")
    name = _DTYPE_NAMES.get(name, name)
    if name not in PARITY_TOLERANCES:
        raise ValueError(f"no parity tolerance for precision {precision!r}; known: {sorted(PARITY_TOLERANCES)}")
    return PARITY_TOLERANCES[name]
