"""Which implementation runs a masked layer: the PyTorch reference or the Triton kernels.

`FASTTICKET_BACKEND=torch|triton|auto` (default auto) overrides; `use_backend(...)` does the same for a
block of code. auto picks triton for CUDA tensors when triton imports, torch otherwise. On CPU tensors the
triton backend runs only under the Triton interpreter (`TRITON_INTERPRET=1`), which the tests use.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
from typing import Dict, Iterator, List, Optional, Sequence

import torch

# triton-free: the interpreter decision lives with the kernels' launchers, which read it the same way.
from fastticket.kernels._common import interpreter_active as triton_interpreter_active

BACKENDS = ("torch", "triton", "auto")
_override: Optional[str] = None


# Looked up once, without importing triton: importing it here would fix TRITON_INTERPRET before a test suite
# or `fastticket bench` sets it. A plain module constant also keeps torch.compile from tracing a cache wrapper.
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_importable() -> bool:
    return _TRITON_INSTALLED


def requested_backend() -> str:
    name = _override or os.environ.get("FASTTICKET_BACKEND", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"FASTTICKET_BACKEND={name!r} is not one of {', '.join(BACKENDS)}")
    return name


def triton_supports(device: torch.device) -> bool:
    if not triton_importable():
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and triton_interpreter_active()


def resolve_backend(device: torch.device) -> str:
    """The backend a masked layer on `device` uses now: "torch" or "triton"."""
    name = requested_backend()
    if name == "torch":
        return "torch"
    if name == "triton":
        if not triton_supports(device):
            raise RuntimeError(
                f"FASTTICKET_BACKEND=triton but triton cannot run on {device}: it needs a CUDA device "
                "(or TRITON_INTERPRET=1 for CPU tensors) and an importable triton; use FASTTICKET_BACKEND=torch"
            )
        return "triton"
    return "triton" if device.type == "cuda" and triton_importable() else "torch"


def indices_by_backend(devices: Sequence[torch.device]) -> Dict[str, List[int]]:
    """{backend: indices into `devices`} for the backend each device resolves to now (first-seen order), so
    a multi-tensor operation runs once per backend over its share of the tensors."""
    buckets: Dict[str, List[int]] = {}
    for i, device in enumerate(devices):
        buckets.setdefault(resolve_backend(device), []).append(i)
    return buckets


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force a backend inside a `with` block (takes precedence over FASTTICKET_BACKEND)."""
    global _override
    if name not in BACKENDS:
        raise ValueError(f"backend {name!r} is not one of {', '.join(BACKENDS)}")
    previous, _override = _override, name
    try:
        yield
    finally:
        _override = previous
