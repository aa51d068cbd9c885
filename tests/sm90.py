"""Offline Hopper (sm_90) compilation of the Triton kernels, with the specialisation a real launch gets, and
the performance properties of what comes out. No GPU needed: triton's own compiler and bundled ptxas.

Why the specialisation matters: at launch, triton's JIT turns an integer argument equal to 1 into a
constant and marks pointers and integers divisible by 16 (`tt.divisibility`), and the compiler builds a
different kernel from that (16-byte async copies instead of scalar loads, a fraction of the registers).
`compile_launch` runs the JIT's own binder (`create_function_from_signature` + `JITFunction._pack_args`)
on stand-in arguments, so the compile sees exactly what a launch with those shapes would. Pointers are
stand-in tensors at address 0 (16-byte aligned, as the caching allocator's blocks are).

Properties read from the compiled kernel (`properties`):
- `mma`: "wgmma" (Hopper warp-group MMA, `wgmma.mma_async` in the PTX), "mma.sync" (Ampere-style tensor
  cores), or "fma" (no tensor core);
- `buffers`: the pipelining depth: the leading dimension of the multi-buffered shared-memory operand
  allocations in the TTGIR (`!ttg.memdesc<3x128x64xbf16 ...>` is 3 buffers; 0 when nothing is staged);
- `async16`: 16-byte `cp.async` copies (global -> shared) in the PTX; `load_bytes` / `store_bytes`: the
  widest vector global load / store (16 for `.v4.b32`, 8 for `.v2.b32`, 0 when all are scalar); `atomics`:
  atomic and reduction instructions (`atom.` / `red.`);
- `spills`: bytes of register spill stores + loads reported by `ptxas -v` (the compiled kernel's `n_spills`
  is only filled in when a GPU driver loads it, so offline the ptxas report is the source); `registers`;
- `shared`: bytes of shared memory per block (the compiled kernel's metadata), checked against
  SMEM_LIMIT_SM90.

Used by the kernel test modules through the `sm90_compiled` fixture (tests/conftest.py): a module defines
SM90_BODY, a script body calling `check(name, kernel, *launch_args, **launch_kwargs)` per configuration,
run once per module in a fresh process without TRITON_INTERPRET; and a table of `Expect`s, one per
configuration, that `problems` compares against. Whoever changes a kernel's configs updates that table.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Dict, List, Optional

SMEM_LIMIT_SM90 = 232448  # 227 KiB: the most shared memory one block may use on sm_90
RESULT_MARK = "SM90-PROPERTIES "
SKIP_CODE = 77  # the script's exit code for "cannot check here" (old triton, no ptxas)


@dataclass(frozen=True)
class Expect:
    """What one kernel configuration must compile to on sm_90 (besides no spills and shared memory in limit)."""

    mma: Optional[str] = "wgmma"  # "wgmma", "mma.sync", "fma", or None for kernels without a dot
    buffers: int = 0              # pipelining depth: shared-memory buffers of the staged operands (at least)
    async16: bool = False         # 16-byte cp.async copies present
    load_bytes: int = 0           # widest vector global load at least this many bytes (elementwise kernels)
    store_bytes: int = 0          # widest vector global store at least this many bytes (vectorized epilogues)
    no_atomics: bool = False      # no atomic / reduction instructions (deterministic, no read-modify-write)


def problems(props: dict, expect: Expect) -> List[str]:
    """What about a compiled configuration differs from `expect`; empty when it is as designed."""
    found = []
    if expect.mma is not None and props["mma"] != expect.mma:
        found.append(f"MMA {props['mma']!r}, expected {expect.mma!r}")
    if props["buffers"] < expect.buffers:
        found.append(f"{props['buffers']} shared-memory buffers, expected {expect.buffers} (pipelining lost)")
    if expect.async16 and not props["async16"]:
        found.append("no 16-byte cp.async copies")
    if props["load_bytes"] < expect.load_bytes:
        found.append(f"widest global load {props['load_bytes']} bytes, expected {expect.load_bytes}")
    if props.get("store_bytes", 0) < expect.store_bytes:
        found.append(f"widest global store {props.get('store_bytes', 0)} bytes, expected {expect.store_bytes}")
    if expect.no_atomics and props.get("atomics", 0):
        found.append(f"{props['atomics']} atomic instructions, expected none")
    if props["spills"]:
        found.append(f"{props['spills']} bytes of register spills ({props['registers']} registers)")
    if props["shared"] > SMEM_LIMIT_SM90:
        found.append(f"{props['shared']} bytes of shared memory, over the {SMEM_LIMIT_SM90} per-block limit")
    return found


def assert_properties(compiled: Dict[str, dict], name: str, expect: Expect) -> None:
    """One configuration of a module's expectation table against what it compiled to (a pytest assertion)."""
    import pytest

    props = compiled[name]
    if props["specialisation"] != "launch":
        pytest.skip(f"this triton has no launch binder to specialise with: {name} compiled, properties unchecked")
    found = problems(props, expect)
    assert not found, f"{name} on sm_90: " + "; ".join(found) + f" (compiled: {props})"


def run_body(body: str, timeout: float = 600) -> Dict[str, dict]:
    """Run a module's SM90_BODY in a fresh process (no interpreter, a private triton cache so every kernel
    really compiles and ptxas reports on it); returns {name: properties}. Raises on a failed compile;
    `SystemExit(SKIP_CODE)` in the child becomes `CannotCheck`."""
    script = (f"import sys\nsys.path.insert(0, {str(pathlib.Path(__file__).parent)!r})\n"
              "from sm90 import *\n" + body + "\nreport()\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    with tempfile.TemporaryDirectory(prefix="sm90-cache-") as cache:
        env["TRITON_CACHE_DIR"] = cache
        proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                              timeout=timeout)
    if proc.returncode == SKIP_CODE:
        raise CannotCheck(proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else "cannot check")
    if proc.returncode != 0:
        raise AssertionError(f"sm_90 compile failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}")
    line = next(l for l in proc.stdout.splitlines() if l.startswith(RESULT_MARK))
    return json.loads(line[len(RESULT_MARK):])


class CannotCheck(Exception):
    """The compile checks cannot run with this triton (too old for the offline API, or no ptxas)."""


# ---------------------------------------------------------------------------------------------------------
# The child process's side: everything below runs only inside `run_body`'s script.
# ---------------------------------------------------------------------------------------------------------

_RESULTS: Dict[str, dict] = {}
_TYPE_NAMES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "float64": "fp64", "int8": "i8",
               "uint8": "u8", "int32": "i32", "int64": "i64"}


class ptr:
    """A stand-in tensor argument: dtype and a 16-byte-aligned address, as a real CUDA tensor would have.
    `ptr(torch.bfloat16)`; `ptr(torch.bfloat16, aligned=False)` for an offset view."""

    def __init__(self, dtype, aligned: bool = True) -> None:
        self.dtype = dtype
        self._address = 0 if aligned else 2

    def data_ptr(self) -> int:
        return self._address


class Arg:
    """A stand-in tensor argument for an autotuner's config pruning (it reads dtype, device, element size)."""

    def __init__(self, dtype):
        import torch
        self.dtype, self.device = dtype, torch.device("cpu")

    def element_size(self):
        import torch
        return torch.empty((), dtype=self.dtype).element_size()


def _type_name(arg) -> str:
    if isinstance(arg, ptr):
        return "*" + _TYPE_NAMES[str(arg.dtype).replace("torch.", "")]
    if isinstance(arg, bool):
        return "i1"
    if isinstance(arg, int):
        return "i32" if -2 ** 31 <= arg < 2 ** 31 else "i64"
    if isinstance(arg, float):
        return "fp32"
    raise TypeError(f"no stand-in for launch argument {arg!r}")


def _target():
    from triton.backends.compiler import GPUTarget
    return GPUTarget("cuda", 90, 32)


def _launch_binder_available(fn) -> bool:
    try:
        from triton.compiler.compiler import make_backend  # noqa: F401
        from triton.runtime.jit import create_function_from_signature  # noqa: F401
    except ImportError:
        return False
    return hasattr(fn, "_pack_args") and hasattr(fn, "params") and hasattr(fn, "signature")


def _compile_as_launched(fn, args, kwargs):
    """The JIT's own path from launch arguments to a compiled kernel, minus the device (the binder API of
    triton 3.3 and later; a launch-argument mismatch raises here just as a real launch would)."""
    import triton
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    target = _target()
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(kwargs, debug=False)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)


def _compile_typed(fn, args, kwargs):
    """Older triton: every runtime argument typed plainly (no constant-1 or divisibility specialisation). It
    still proves the kernel compiles for sm_90, but not what a launch would get: no properties are checked."""
    import triton
    from triton.compiler import ASTSource

    names = fn.arg_names
    options = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
    constexprs = {k: v for k, v in kwargs.items() if k in names}
    signature = {name: "constexpr" if name in constexprs else _type_name(arg)
                 for name, arg in zip(names, list(args) + [constexprs.get(n) for n in names[len(args):]])}
    try:
        src = ASTSource(fn, signature, constexprs=constexprs)
    except TypeError:  # triton 3.1-3.2: constexprs as `constants`, the signature names runtime arguments only
        src = ASTSource(fn, {k: v for k, v in signature.items() if k != "constexpr"}, constants=constexprs)
    return triton.compile(src, target=_target(), options=options)


@contextlib.contextmanager
def _ptxas_log():
    """Capture the `ptxas -v` report triton prints while compiling, where this triton can print it
    (`knobs.nvidia.dump_ptxas_log`); otherwise the caller runs ptxas once more itself."""
    captured = io.StringIO()
    try:
        from triton import knobs
        knobs.nvidia.dump_ptxas_log = True
    except (ImportError, AttributeError):
        yield captured
        return
    with contextlib.redirect_stdout(captured):
        yield captured


def _ptxas_report(ptx: str) -> str:
    """`ptxas -v` on the kernel's PTX: registers and spill bytes."""
    import triton
    binary = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    with tempfile.TemporaryDirectory() as tmp:
        src = pathlib.Path(tmp) / "k.ptx"
        src.write_text(ptx)
        proc = subprocess.run([str(binary), "-v", "--gpu-name=sm_90a", str(src), "-o", str(src) + ".o"],
                              capture_output=True, text=True)
    return proc.stdout + proc.stderr


def _width(vector: str, bits: str) -> int:
    return int(vector) * int(bits) // 8


def properties(kernel, ptxas_log: str) -> dict:
    ptx, ttgir = kernel.asm["ptx"], kernel.asm.get("ttgir", "")
    mma = "wgmma" if "wgmma.mma_async" in ptx else "mma.sync" if "mma.sync" in ptx else "fma"
    depths = [int(d) for d in re.findall(r"!ttg\.memdesc<(\d+)x\d+x\d+x", ttgir)]
    spills = sum(int(a) + int(b) for a, b in
                 re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", ptxas_log))
    registers = max([int(r) for r in re.findall(r"Used (\d+) registers", ptxas_log)] or [0])
    return {
        "mma": mma,
        "buffers": max(depths, default=0),
        "async16": bool(re.search(r"cp\.async\.\w+\.shared\.global[^;]*, (?:16|0x10)[,;]", ptx)),
        "load_bytes": max((_width(v, bits) for v, bits in
                           re.findall(r"ld\.global(?:\.[a-z]+)*?\.v(\d)\.[bufs](\d+)\b", ptx)), default=0),
        "store_bytes": max((_width(v, bits) for v, bits in
                            re.findall(r"st\.global(?:\.[a-z0-9]+)*?\.v(\d)\.[bufs](\d+)\b", ptx)), default=0),
        "atomics": len(re.findall(r"^\s*(?:@%\w+\s+)?(?:atom|red)\.", ptx, flags=re.M)),
        "spills": spills,
        "registers": registers,
        "shared": int(getattr(kernel.metadata, "shared", 0)),
        "specialisation": "launch",
    }


def check(name: str, fn, *args, **kwargs) -> None:
    """Compile `fn` for sm_90 as `fn[grid](*args, **kwargs)` would be on a GPU, and record its properties."""
    try:
        import triton  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
    except Exception as exc:
        print(f"SKIP: this triton lacks the offline compile API: {exc}")
        raise SystemExit(SKIP_CODE)
    try:
        with _ptxas_log() as captured:
            if _launch_binder_available(fn):
                kernel, specialisation = _compile_as_launched(fn, args, kwargs), "launch"
            else:
                kernel, specialisation = _compile_typed(fn, args, kwargs), "typed"
        log = captured.getvalue() if "spill" in captured.getvalue() else None
    except FileNotFoundError as exc:
        print(f"SKIP: no ptxas: {exc}")
        raise SystemExit(SKIP_CODE)
    props = properties(kernel, log if log is not None else _ptxas_report(kernel.asm["ptx"]))
    props["specialisation"] = specialisation
    _RESULTS[name] = props


def report() -> None:
    print(RESULT_MARK + json.dumps(_RESULTS))
