"""Small helpers shared by the Triton kernels (linear, conv2d, the fused dW + SGD update).

Kept free of any kernel: only host-side decisions every launcher makes the same way.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

# One definition of "running in the Triton interpreter" for the backend choice and the kernels' launchers.
from fastticket.backend import triton_interpreter_active as interpreter_active

__all__ = ["interpreter_active", "dot_input_precision", "sm_count", "next_power_of_2"]


def _tf32_flag(library: str) -> bool:
    if library == "matmul":
        return torch.backends.cuda.matmul.allow_tf32
    if library == "cudnn":
        return torch.backends.cudnn.allow_tf32
    raise ValueError(f"library must be 'matmul' or 'cudnn', got {library!r}")


def dot_input_precision(dtype: torch.dtype, library: str) -> Optional[str]:
    """`input_precision` for tl.dot on operands of `dtype`, read from torch's TF32 switch at launch time.

    fp32 operands follow the flag of the vendor library the kernel stands in for, so the kernel and the
    dense path it replaces round the same way: `library="matmul"` reads torch.backends.cuda.matmul.allow_tf32
    (cuBLAS; the linear kernels), `library="cudnn"` reads torch.backends.cudnn.allow_tf32 (the conv kernels).
    "tf32" when the flag is set, "ieee" otherwise. 16-bit operands get None, Triton's default (tensor cores
    compute their products exactly; on CUDA the default is "tf32", and naming it would be rejected by
    backends that do not list it, e.g. AMD). The interpreter computes in fp32 regardless, so it always
    gets "ieee" for fp32.
    """
    allow_tf32 = _tf32_flag(library)
    if dtype != torch.float32:
        return None
    return "tf32" if allow_tf32 and not interpreter_active() else "ieee"


@functools.lru_cache(maxsize=None)
def sm_count(device_index: int) -> int:
    """Streaming multiprocessors of a CUDA device (split-K heuristics size their grids with it)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()
