"""Test-suite set-up: on a machine without a GPU, Triton kernels run in its CPU interpreter.

TRITON_INTERPRET must be set before triton is first imported, so this runs before any test module loads.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def device() -> torch.device:
    """Where kernel tests run: the GPU when there is one, else CPU tensors under the Triton interpreter."""
    return DEVICE
