"""The package layout holds: kernels/ never imports the library above it, and `import fastticket` reaches
every public submodule (docs/architecture.md, "Layers")."""
import ast
import pathlib
import subprocess
import sys
from typing import List

import pytest

import fastticket

ROOT = pathlib.Path(__file__).resolve().parents[1]
KERNELS = ROOT / "kernels"
KERNELS_PACKAGE = "fastticket.kernels"


def _allowed(module: str) -> bool:
    return module == KERNELS_PACKAGE or module.startswith(KERNELS_PACKAGE + ".")


def _is_library(module: str) -> bool:
    return module == "fastticket" or module.startswith("fastticket.")


def forbidden_imports(source: str, package: str = KERNELS_PACKAGE) -> List[str]:
    """Imports of fastticket.* outside fastticket.kernels.* in `source`, a module of `package`: absolute
    (`import fastticket.nn`, `from fastticket.nn import x`), from the package (`from fastticket import nn`),
    relative (`from .. import nn`, `from ..nn import x`) and `importlib.import_module("fastticket.nn")`,
    at any depth (imports inside functions count too)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names if _is_library(alias.name) and not _allowed(alias.name)]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                if node.level - 1 > len(parts):
                    found.append("." * node.level + (node.module or ""))
                    continue
                base = parts[:len(parts) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if not _is_library(module) or _allowed(module):
                continue
            if module == "fastticket":  # `from fastticket import kernels` is fine, any other name is not
                found += [f"fastticket.{a.name}" for a in node.names if not _allowed(f"fastticket.{a.name}")]
            else:
                found.append(module)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            target = node.args[0].value
            if called == "import_module" and isinstance(target, str) and _is_library(target) \
                    and not _allowed(target):
                found.append(target)
    return found


@pytest.mark.parametrize("source,bad", [
    ("import fastticket.nn", ["fastticket.nn"]),
    ("import fastticket", ["fastticket"]),
    ("def f():\n    from fastticket.optim import MaskedSGD", ["fastticket.optim"]),
    ("from fastticket import nn, kernels", ["fastticket.nn"]),
    ("from .. import backend", ["fastticket.backend"]),
    ("from ..functional import mask_gradient", ["fastticket.functional"]),
    ("import importlib\nimportlib.import_module('fastticket.nn')", ["fastticket.nn"]),
    ("from fastticket.kernels.tile_map import TileMap\nfrom . import _common\nfrom .dispatch import x\n"
     "import fastticket.kernels.masked_linear\nfrom fastticket import kernels\nimport torch, triton", []),
])
def test_the_import_checker_sees_every_form(source, bad):
    assert forbidden_imports(source) == bad


def test_kernels_import_only_torch_triton_and_themselves():
    modules = sorted(KERNELS.rglob("*.py"))
    assert modules, f"no kernel modules under {KERNELS}"
    offences = {}
    for path in modules:
        rel = path.relative_to(KERNELS).with_suffix("")
        package = ".".join([KERNELS_PACKAGE, *rel.parts[:-1]])  # the package a relative import starts from
        bad = forbidden_imports(path.read_text(), package)
        if bad:
            offences[str(path.relative_to(ROOT))] = bad
    assert not offences, f"kernels/ must not import the library above it: {offences}"


def test_import_fastticket_reaches_every_public_submodule():
    """In a fresh interpreter: after a plain `import fastticket`, every public submodule is an attribute,
    and the import itself did not load the heavy ones (the driver, the report's plotting)."""
    reach = "; ".join(["fastticket.optim.MaskedAdam", "fastticket.prune.prune", "fastticket.search.run_search",
                       "fastticket.nn.MaskedLinear", "fastticket.data", "fastticket.models", "fastticket.presets",
                       "fastticket.report", "fastticket.config", "fastticket.testing.rel_error",
                       "fastticket.atomic_io.atomic_write", "fastticket.rewind", "fastticket.bench.time_ms",
                       "fastticket.backend"])
    code = ("import sys, fastticket\n"
            "light = [m for m in ('fastticket.search', 'fastticket.report', 'fastticket.bench', 'matplotlib')"
            " if m in sys.modules]\n"
            "assert not light, f'import fastticket loaded {light}'\n"
            f"{reach}\n"
            "assert set(fastticket.SUBMODULES) <= set(dir(fastticket)) and set(fastticket.SUBMODULES) <= "
            "set(fastticket.__all__)\n"
            "print('ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def test_every_public_submodule_is_listed():
    on_disk = {p.stem for p in (ROOT / "fastticket").glob("*.py") if not p.stem.startswith("_")}
    on_disk |= {p.name for p in (ROOT / "fastticket").iterdir() if (p / "__init__.py").exists()}
    internal = {"batched", "cli", "distributed", "errors", "functional", "fused_update", "preflight", "rundir",
                "stacked_plan", "train"}
    assert on_disk - internal <= set(fastticket.SUBMODULES), on_disk - internal - set(fastticket.SUBMODULES)
    with pytest.raises(AttributeError, match="no_such_module"):
        fastticket.no_such_module
