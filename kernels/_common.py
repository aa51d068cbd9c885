"""Small helpers shared by the Triton kernels (conv2d now; linear and optimizer may use them too).

Kept free of any kernel: only host-side decisions every launcher makes the same way.
"""
from __future__ import annotations

import functools
import os

import torch


def interpreter_active() -> bool:
    """True when Triton runs in its CPU interpreter (TRITON_INTERPRET=1): no autotune, small fixed tiles."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def dot_input_precision(dtype: torch.dtype, allow_tf32: bool) -> str:
    """`input_precision` for tl.dot on operands of `dtype`.

    fp32 operands follow the vendor library's flag (torch.backends.cudnn.allow_tf32 for conv,
    torch.backends.cuda.matmul.allow_tf32 for matmul), so the kernel and the dense path it replaces
    round the same way. Half types ignore the setting; "tf32" is Triton's default there and accepted by
    every Triton >= 3.1. The interpreter computes in fp32 regardless, so it always gets "ieee".
    """
    if dtype == torch.float32:
        return "tf32" if allow_tf32 and not interpreter_active() else "ieee"
    return "tf32"


@functools.lru_cache(maxsize=None)
def sm_count(device_index: int) -> int:
    """Streaming multiprocessors of a CUDA device (split-K heuristics size their grids with it)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()
