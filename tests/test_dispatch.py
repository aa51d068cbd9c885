"""kernels/dispatch.py: the per-precision linear thresholds, their overrides, and bad values."""
import os

import pytest
import torch

from fastticket.kernels import _common, dispatch


@pytest.fixture(autouse=True)
def _no_overrides(monkeypatch):
    for name in [n for n in os.environ if n.startswith("FASTTICKET_DENSE_THRESHOLD_")]:
        monkeypatch.delenv(name)


@pytest.mark.parametrize("dtype, tf32, threshold", [
    (torch.bfloat16, False, 0.35), (torch.float16, False, 0.35), (torch.float32, True, 0.35),
    (torch.float32, False, 0.25)])
def test_linear_decision_per_precision(monkeypatch, dtype, tf32, threshold):
    monkeypatch.setattr(_common, "tf32_enabled", lambda library: tf32)
    assert dispatch.use_tile_skipping(threshold - 0.01, "linear", dtype)
    assert not dispatch.use_tile_skipping(threshold, "linear", dtype)
    assert not dispatch.use_tile_skipping(1.0, "linear", dtype)
    assert not dispatch.use_tile_skipping(0.0, "linear", torch.float64)  # exact dense for float64


def test_overrides_op_wide_and_per_precision(monkeypatch):
    monkeypatch.setattr(_common, "tf32_enabled", lambda library: False)
    monkeypatch.setenv("FASTTICKET_DENSE_THRESHOLD_LINEAR", "0.6")
    assert dispatch.use_tile_skipping(0.5, "linear", torch.float32)
    assert dispatch.use_tile_skipping(0.5, "linear", torch.bfloat16)
    monkeypatch.setenv("FASTTICKET_DENSE_THRESHOLD_LINEAR_BF16", "0.1")  # the per-precision one wins
    assert not dispatch.use_tile_skipping(0.2, "linear", torch.bfloat16)
    assert dispatch.use_tile_skipping(0.5, "linear", torch.float32)
    assert dispatch.dense_threshold("linear") == 0.6  # grouped kernels / no precision: the op-wide value


def test_grouped_and_conv_keep_their_op_thresholds():
    assert dispatch.dense_threshold("linear") == dispatch.DENSE_THRESHOLDS["linear"]
    assert not dispatch.use_tile_skipping(0.01, "conv2d", torch.float32)  # conv: cuDNN until measured


def test_bad_values_say_what_to_do(monkeypatch):
    monkeypatch.setenv("FASTTICKET_DENSE_THRESHOLD_LINEAR_IEEE", "half")
    with pytest.raises(ValueError, match="LINEAR_IEEE='half' is not a number"):
        dispatch.dense_threshold("linear", "ieee")
    with pytest.raises(ValueError, match="precision must be one of"):
        dispatch.dense_threshold("linear", "fp8")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_unpipelined_16bit_rows_run_dense_on_a_gpu(monkeypatch, dtype):
    """A 16-bit layer whose in_features is not a multiple of 16 (LeNet's 300, 100) compiles with no pipelining
    (the sm_90 checks of tests/test_masked_linear_kernels.py): dense on a GPU, the kernels elsewhere and when
    a threshold override asks for them; fp32 and aligned rows keep the live-fraction rule."""
    live = 0.05
    for k in (300, 100, 296):
        assert not dispatch.use_tile_skipping(live, "linear", dtype, row_elements=k, cuda=True)
        assert dispatch.use_tile_skipping(live, "linear", dtype, row_elements=k, cuda=False)
    assert dispatch.use_tile_skipping(live, "linear", dtype, row_elements=304, cuda=True)
    monkeypatch.setattr(_common, "tf32_enabled", lambda library: True)
    assert dispatch.use_tile_skipping(live, "linear", torch.float32, row_elements=300, cuda=True)
    precision = "bf16" if dtype == torch.bfloat16 else "fp16"
    for name in ("FASTTICKET_DENSE_THRESHOLD_LINEAR", f"FASTTICKET_DENSE_THRESHOLD_LINEAR_{precision.upper()}"):
        monkeypatch.setenv(name, "1.01")
        assert dispatch.use_tile_skipping(live, "linear", dtype, row_elements=300, cuda=True)
        monkeypatch.delenv(name)
