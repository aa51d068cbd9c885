"""Small helpers shared by the Triton kernels (linear, conv2d, the fused dW + SGD update).

Kept free of any kernel and of triton itself (fastticket.sparse.backend imports `interpreter_active` from here
before triton may be imported): only host-side decisions every launcher makes the same way, and the
masked-gradient identity the dense fallbacks share with the library's torch backend.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
from typing import Optional

import torch

__all__ = ["interpreter_active", "dot_input_precision", "sm_count", "next_power_of_2", "device_guard",
           "mask_gradient", "live_bucket", "tf32_enabled", "tf32_set"]


def interpreter_active() -> bool:
    """True when Triton runs in its CPU interpreter (TRITON_INTERPRET=1): CPU tensors can take the triton
    backend, and the kernels' launchers use small fixed tiles and no autotuning. The one definition, read by
    the backend choice (fastticket.sparse.backend) and the launchers alike."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _precision_node(library: str):
    """torch's precision switch of the vendor library a kernel stands in for (cuBLAS matmul, cuDNN conv)."""
    if library == "matmul":
        return torch.backends.cuda.matmul, torch.backends.cuda.matmul
    if library == "cudnn":
        # New API (torch >= 2.9): per operator, cudnn.conv; legacy: the one cudnn.allow_tf32.
        return getattr(torch.backends.cudnn, "conv", None), torch.backends.cudnn
    raise ValueError(f"library must be 'matmul' or 'cudnn', got {library!r}")


def tf32_enabled(library: str) -> bool:
    """Whether torch lets `library` ("matmul": cuBLAS, "cudnn": cuDNN conv) compute fp32 products in TF32.

    Read through the new precision API (`...fp32_precision`, torch >= 2.9) where it exists: once a user has
    set it (`torch.backends.fp32_precision = "tf32"`), reading the legacy `allow_tf32` raises RuntimeError
    ("mix of the legacy and new APIs"). "none" means the new API was never set: the legacy flag decides."""
    node, legacy = _precision_node(library)
    precision = getattr(node, "fp32_precision", None)
    if precision == "tf32":
        return True
    if precision == "ieee":
        return False
    try:
        return bool(legacy.allow_tf32)
    except RuntimeError:  # mixed settings torch itself refuses to interpret: the exact (IEEE) reading
        return False


@contextlib.contextmanager
def tf32_set(library: str, enabled: bool):
    """Within the block, `library` computes fp32 products in TF32 (`enabled`) or IEEE fp32; the previous
    setting comes back after. Writes through the API `tf32_enabled` reads (benchmarks time both modes)."""
    node, legacy = _precision_node(library)
    if getattr(node, "fp32_precision", None) is not None:
        old = node.fp32_precision
        node.fp32_precision = "tf32" if enabled else "ieee"
        try:
            yield
        finally:
            node.fp32_precision = old
        return
    old = legacy.allow_tf32
    legacy.allow_tf32 = enabled
    try:
        yield
    finally:
        legacy.allow_tf32 = old


def dot_input_precision(dtype: torch.dtype, library: str) -> Optional[str]:
    """`input_precision` for tl.dot on operands of `dtype`, read from torch's TF32 switch at launch time.

    fp32 operands follow the switch of the vendor library the kernel stands in for (`tf32_enabled`), so the
    kernel and the dense path it replaces round the same way: `library="matmul"` for cuBLAS (the linear
    kernels), `library="cudnn"` for cuDNN convolutions (the conv kernels). "tf32" when TF32 is allowed,
    "ieee" otherwise. 16-bit operands get None without reading any switch, Triton's default (tensor cores
    compute their products exactly; on CUDA the default is "tf32", and naming it would be rejected by
    backends that do not list it, e.g. AMD). The interpreter computes in fp32 regardless, so it always
    gets "ieee" for fp32.
    """
    if dtype != torch.float32:
        return None
    if library not in ("matmul", "cudnn"):
        raise ValueError(f"library must be 'matmul' or 'cudnn', got {library!r}")
    if interpreter_active():
        return "ieee"
    return "tf32" if tf32_enabled(library) else "ieee"


@functools.lru_cache(maxsize=None)
def sm_count(device_index: int) -> int:
    """Streaming multiprocessors of a CUDA device (split-K heuristics size their grids with it)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def device_guard(t: torch.Tensor):
    """Triton launches on the current CUDA device, which need not be the tensors' device: make it `t`'s."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


class _MaskGradient(torch.autograd.Function):
    """Identity on the weight; multiplies the weight's gradient by the mask. Written in the setup_context
    form with a generated vmap rule, so a stacked group of arms (fastticket.lottery.batched: vmap over per-arm
    weights and masks) masks each arm's gradient by its own mask."""

    generate_vmap_rule = True

    @staticmethod
    def forward(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return weight.view_as(weight)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (mask,) = ctx.saved_tensors
        # Traced (torch.compile: dynamo before torch 2.6 cannot trace the batched-tensor query) or inside vmap
        # (wrappers have no bit views): the plain op.
        if torch.compiler.is_compiling() or _is_batched(grad) or _is_batched(mask):
            return grad.masked_fill(~mask, 0.0), None
        return zero_pruned_(grad.clone(), mask), None


def _is_batched(t: torch.Tensor) -> bool:
    return bool(torch._C._functorch.is_batchedtensor(t))


def mask_gradient(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`weight` unchanged in the forward pass; its gradient arrives multiplied by `mask`. The dense (vendor
    op) paths use it: exact under the zero invariant, with no optimizer able to revive a pruned weight."""
    # Not `weight.requires_grad`: inside vmap (fastticket.lottery.batched) the per-arm weight is a wrapper that reports
    # False even though the stacked weight it views needs a gradient.
    if torch.is_grad_enabled():
        return _MaskGradient.apply(weight, mask)
    return weight


FIRST_CONFIG_ENV = "FASTTICKET_FIRST_CONFIG"


def first_config_only(configs: list) -> list:
    """An autotuner's pruned `configs`, or only the first of them when FASTTICKET_FIRST_CONFIG=1: correctness
    runs (the GPU session's real-size checks) then compile one variant per kernel and shape and time none
    (triton benchmarks nothing when one config is left), where autotuning compiles every config."""
    if os.environ.get(FIRST_CONFIG_ENV, "0").strip() in ("", "0"):
        return configs
    return list(configs)[:1]


def live_bucket(live_fraction: float) -> int:
    """Autotune key for sparsity: floor(-log2(live fraction)), capped at 7 (<= 1/128 live). IMP levels that
    prune 20% each stay ~3 levels in a bucket, so a layer is re-tuned a few times per search, not per level."""
    if live_fraction >= 1.0:
        return 0
    if live_fraction <= 0.0:
        return 7
    return min(7, int(math.floor(-math.log2(live_fraction))))


_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_keep_bits: "WeakIdKeyDictionary" = None  # type: ignore[assignment]


def zero_pruned_(t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """t[~mask] = +0.0 in place, exact even where t holds NaN/inf, as a bitwise AND of t's bits with an
    all-ones/all-zeros integer mask (cached per mask, rebuilt when the mask is edited in place): on CPU it is
    ~10x faster than masked_fill_, which does not vectorise."""
    global _keep_bits
    if torch.compiler.is_compiling():  # traced (torch.compile): the compiler fuses a plain fill; no Python cache
        return t.masked_fill_(~mask, 0.0)
    if _keep_bits is None:
        from torch.utils.weak import WeakIdKeyDictionary
        _keep_bits = WeakIdKeyDictionary()
    int_dtype = _INT_OF_SIZE.get(t.element_size())
    if int_dtype is None or t.is_complex() or mask.shape != t.shape or t.device != mask.device:
        return t.masked_fill_(~mask, 0.0)
    entry = _keep_bits.get(mask)
    key = (mask._version, int_dtype)
    if entry is None or entry[0] != key:
        entry = (key, mask.to(int_dtype).neg_())  # True -> -1 (all bits set), False -> 0
        _keep_bits[mask] = entry
    t.view(int_dtype).bitwise_and_(entry[1])
    return t


def autocast_inputs(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]):
    """Under autocast, the compute dtype F.linear / F.conv2d would use (the casts are differentiable; custom
    autograd Functions and custom ops are not autocast themselves)."""
    dev = x.device.type
    if dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev):
        dtype = torch.get_autocast_dtype(dev)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    return x, weight, bias
