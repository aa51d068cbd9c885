"""Host-side launch decisions every Triton launcher must get right, checked without a GPU: the device guard
(Triton launches on the *current* CUDA device, not the tensors'), and the TF32 switch read through torch's
precision API (kernels/_common.py)."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import pytest
import torch

from fastticket.kernels import (_common, linear_dw_sgd, masked_conv2d, masked_linear, masked_linear_dw,
                                masked_optim, rewind as rewind_kernels)
from fastticket.kernels.tile_map import build_tile_map


class _GuardRecorder:
    """Stands in for `device_guard`: records the tensor each launch guarded with."""

    def __init__(self) -> None:
        self.guarded = []

    def __call__(self, t: torch.Tensor):
        self.guarded.append(t)
        return contextlib.nullcontext()


@pytest.fixture
def guards(monkeypatch):
    recorder = _GuardRecorder()
    for module in (masked_linear, masked_linear_dw, linear_dw_sgd, masked_conv2d, masked_optim, rewind_kernels):
        # raising=True: a launcher module without a guard fails here, before anything runs.
        monkeypatch.setattr(module, "device_guard", recorder)
    return recorder


@pytest.mark.launches_triton
def test_every_launcher_enters_the_device_guard(guards, device) -> None:
    g = torch.Generator().manual_seed(0)
    n, k, m = 20, 24, 6
    mask = torch.rand(n, k, generator=g) > 0.3
    w = (torch.randn(n, k, generator=g) * mask).to(device)
    mask = mask.to(device)
    bn, bk = masked_linear.linear_tile_sizes(device, torch.float32)
    tile_map = build_tile_map(mask, bn, bk)
    x, dy = torch.randn(m, k, generator=g).to(device), torch.randn(m, n, generator=g).to(device)
    launches = {
        "linear forward": lambda: masked_linear.linear_forward(x, w, None, tile_map),
        "linear dX": lambda: masked_linear.linear_grad_input(dy, w, tile_map),
        "linear dW": lambda: masked_linear_dw.linear_grad_weight(dy, x, mask, tile_map),
        "linear dW quads": lambda: masked_linear_dw.linear_grad_weight(dy, x, mask, tile_map, tiles_per_program=2),
        "dW + SGD": lambda: linear_dw_sgd.linear_dw_sgd_(dy, x, w.clone(), mask, tile_map, None, lr=0.1,
                                                          momentum=0.9, dampening=0.0, nesterov=False,
                                                          weight_decay=0.0, maximize=False),
        "SGD step": lambda: masked_optim.sgd_step_([w.clone()], [dy.t() @ x], [mask], [None], lr=0.1, momentum=0.0,
                                                   dampening=0.0, nesterov=False, weight_decay=0.0,
                                                   maximize=False),
        "Adam step": lambda: masked_optim.adam_step_([w.clone()], [dy.t() @ x], [mask], [torch.zeros_like(w)],
                                                     [torch.zeros_like(w)], [None], [1], lr=0.1, beta1=0.9,
                                                     beta2=0.999, eps=1e-8, weight_decay=0.0, amsgrad=False,
                                                     maximize=False, decoupled=False),
        "rewind": lambda: rewind_kernels.rewind_and_zero_([w.clone()], [w], [mask], zero=[torch.ones_like(w)]),
    }
    for name, launch in launches.items():
        guards.guarded.clear()
        launch()
        assert guards.guarded, f"{name}: launched without entering device_guard"
        assert all(t.device == w.device for t in guards.guarded), name


def test_device_guard_selects_the_tensors_device() -> None:
    assert isinstance(_common.device_guard(torch.zeros(1)), contextlib.nullcontext)
    if torch.cuda.is_available():
        guard = _common.device_guard(torch.zeros(1, device="cuda"))
        assert isinstance(guard, torch.cuda.device)


# In a fresh process: once the new precision API is set, reading the legacy flags raises for the rest of that
# process ("mix of the legacy and new APIs"), which must not leak into the other tests.
_NEW_PRECISION_API = r"""
import os
os.environ.pop("TRITON_INTERPRET", None)
import torch
from fastticket.kernels._common import dot_input_precision, tf32_enabled, tf32_set
if not hasattr(torch.backends, "fp32_precision"):
    print("SKIP: torch", torch.__version__, "has no fp32_precision API")
    raise SystemExit(77)
torch.backends.fp32_precision = "tf32"
assert dot_input_precision(torch.bfloat16, "matmul") is None
assert dot_input_precision(torch.float32, "matmul") == "tf32", "matmul"
assert dot_input_precision(torch.float32, "cudnn") == "tf32", "cudnn"
torch.backends.cuda.matmul.fp32_precision = "ieee"
torch.backends.cudnn.conv.fp32_precision = "ieee"
assert dot_input_precision(torch.float32, "matmul") == "ieee"
assert dot_input_precision(torch.float32, "cudnn") == "ieee"
with tf32_set("matmul", True):
    assert tf32_enabled("matmul")
assert not tf32_enabled("matmul")
print("ok")
"""


def test_tf32_switch_read_through_the_new_precision_api() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _NEW_PRECISION_API], env=env, capture_output=True, text=True,
                          timeout=300)
    if proc.returncode == 77:
        pytest.skip(proc.stdout.strip())
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


def test_tf32_switch_follows_the_legacy_flags() -> None:
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        assert _common.tf32_enabled("matmul")
        torch.backends.cuda.matmul.allow_tf32 = False
        assert not _common.tf32_enabled("matmul")
        with _common.tf32_set("matmul", True):
            assert _common.tf32_enabled("matmul")
        assert not _common.tf32_enabled("matmul")
        torch.backends.cudnn.allow_tf32 = False
        assert not _common.tf32_enabled("cudnn")
        torch.backends.cudnn.allow_tf32 = True
        assert _common.tf32_enabled("cudnn")
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    with pytest.raises(ValueError, match="matmul"):
        _common.dot_input_precision(torch.float32, "cublas")
