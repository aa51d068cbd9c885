"""Test-suite set-up: on a machine without a GPU, Triton kernels run in its CPU interpreter.

TRITON_INTERPRET must be set before triton is first imported, so this runs before any test module loads.
"""
import os
import subprocess
import sys

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
    (tests using the `compile_for_sm90` fixture) never use the interpreter and always run, marked or not."""
    if not _interpreter_too_old():
        return
    import triton

    skip = pytest.mark.skip(reason=f"the Triton {triton.__version__} interpreter cannot run data-dependent loop "
                                   "bounds; run these on a GPU or with triton >= 3.7")
    for item in items:
        if item.get_closest_marker("launches_triton") is None or "compile_for_sm90" in item.fixturenames:
            continue
        item.add_marker(skip)


@pytest.fixture
def device() -> torch.device:
    """Where kernel tests run: the GPU when there is one, else CPU tensors under the Triton interpreter."""
    return DEVICE


# Prelude of the sm_90 compile checks: `compile_kernel(fn, pointers, constexprs, num_warps=8)` compiles one
# jitted kernel for Hopper with triton's bundled ptxas (pointer types by argument name, every other runtime
# argument i32); exit code 77 means "cannot check here" (old triton, no ptxas) and becomes a skip.
_SM90_PRELUDE = r"""
import os, sys
os.environ.pop("TRITON_INTERPRET", None)
try:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except Exception as exc:  # older triton without this API
    print(f"SKIP: triton {getattr(triton, '__version__', '?')} lacks the offline compile API: {exc}")
    sys.exit(77)

def compile_kernel(fn, pointers, constexprs, num_warps=8):
    signature = {name: "constexpr" if name in constexprs else pointers.get(name, "i32") for name in fn.arg_names}
    try:
        src = ASTSource(fn, signature, constexprs=constexprs)
    except TypeError:
        # triton 3.1-3.2: constexprs are passed as `constants` and the signature names runtime arguments only
        runtime = {name: kind for name, kind in signature.items() if kind != "constexpr"}
        src = ASTSource(fn, runtime, constants=constexprs)
    try:
        return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "num_stages": 3})
    except FileNotFoundError as exc:
        print(f"SKIP: no ptxas: {exc}")
        sys.exit(77)
"""


@pytest.fixture
def compile_for_sm90():
    """Compile kernels for Hopper (sm_90) the way a GPU run would, without a GPU, in a fresh process without
    TRITON_INTERPRET: the interpreter accepts code the compiler rejects (it once let a non-constexpr global
    through), so CPU-only CI would otherwise never see a GPU compile error. Call it with a script body that
    imports the kernels and calls `compile_kernel(...)` (see _SM90_PRELUDE) for each; it must print "compiled"."""

    def run(body: str) -> None:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
        proc = subprocess.run([sys.executable, "-c", _SM90_PRELUDE + body], env=env, capture_output=True,
                              text=True, timeout=600)
        if proc.returncode == 77:
            pytest.skip(proc.stdout.strip())
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert "compiled" in proc.stdout

    return run


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for modules that train small models: on a shared 2-core machine oversubscribed
    threads slow tiny models down many-fold, and runs compared bit for bit must use the same thread count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
