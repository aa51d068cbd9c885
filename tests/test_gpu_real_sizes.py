"""The kernels at the sizes they are built for, against float64 references: GPU only (skipped without CUDA).

The checks live in the package (fastticket/app/bench/real_sizes.py) so an installed fastticket's
`bench --gpu-session` runs them without this directory; the suite collects the same tests from here. The
interpreter tests elsewhere run tiny shapes; tests/test_gpu_session.py runs these at tiny scale (the
session's rehearsal)."""
import pytest

from fastticket.app.bench.real_sizes import *  # noqa: F401,F403  (the tests and their fixture)
from fastticket.app.bench.real_sizes import DEVICE, TINY

pytestmark = [pytest.mark.skipif(not TINY and DEVICE != "cuda", reason="real-size kernel checks need a CUDA GPU"),
              pytest.mark.launches_triton]
