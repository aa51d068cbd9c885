"""The package layout holds (docs/architecture.md, "The house"): the import graph of the library, counting every
import form and imports inside functions, has no circle; kernels/ imports only itself; the engine
(fastticket.sparse) never imports the experiment or the front ends, the experiment (fastticket.lottery) never
imports the front ends; `import fastticket` stays light and reaches the public names."""
import ast
import pathlib
import subprocess
import sys
from typing import Dict, List, Set

import pytest

import fastticket

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE_DIRS = {"fastticket": ROOT / "fastticket", "fastticket.kernels": ROOT / "kernels"}

# Each wing may import only the wings listed for it (and itself); the shared leaves are open to all.
SHARED = {"fastticket.errors", "fastticket._lazy"}
WINGS = ["fastticket.kernels", "fastticket.sparse", "fastticket.lottery", "fastticket.app"]
MAY_IMPORT = {
    "fastticket.kernels": {"fastticket.kernels"},
    "fastticket.sparse": {"fastticket.kernels", "fastticket.sparse"},
    "fastticket.lottery": {"fastticket.kernels", "fastticket.sparse", "fastticket.lottery"},
    "fastticket.app": {"fastticket.kernels", "fastticket.sparse", "fastticket.lottery", "fastticket.app"},
}


def _is_library(module: str) -> bool:
    return module == "fastticket" or module.startswith("fastticket.")


def library_modules() -> Dict[str, pathlib.Path]:
    """Every module of the installed library by dotted name (packages by their own name)."""
    modules = {}
    for package, directory in PACKAGE_DIRS.items():
        for path in sorted(directory.rglob("*.py")):
            rel = path.relative_to(directory).with_suffix("")
            parts = list(rel.parts[:-1]) if rel.name == "__init__" else list(rel.parts)
            name = ".".join([package, *parts])
            if package == "fastticket" and name.startswith("fastticket.kernels"):
                continue
            modules[name] = path
    return modules


def imports_of(source: str, package: str, known: Set[str]) -> List[str]:
    """The library modules `source` (a module of `package`) imports: `import a.b`, `from a.b import x` (x itself
    when it is a module), relative forms, and `importlib.import_module("a.b")`, at any depth."""
    found = []

    def add(module: str, names=()):
        if not _is_library(module):
            return
        submodules = [f"{module}.{n}" for n in names if f"{module}.{n}" in known]
        found.extend(submodules)
        if not names or len(submodules) < len(names):
            found.append(module)

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                parts = package.split(".")
                if node.level - 1 >= len(parts):
                    found.append("." * node.level + module)
                    continue
                module = ".".join(parts[:len(parts) - (node.level - 1)] + ([module] if module else []))
            add(module, [a.name for a in node.names])
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if called == "import_module" and isinstance(node.args[0].value, str):
                add(node.args[0].value)
    return found


def import_graph() -> Dict[str, Set[str]]:
    modules = library_modules()
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        graph[name] = {m for m in imports_of(path.read_text(), package, set(modules)) if m != name}
    return graph


def wing_of(module: str) -> str:
    return next((w for w in WINGS if module == w or module.startswith(w + ".")), "")


def circles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """One circle through each strongly connected group of modules (Tarjan), as a path that returns to its start."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return groups


# Package __init__ modules only re-export lazily (fastticket._lazy); the edges that count are the modules'.
def _module_graph() -> Dict[str, Set[str]]:
    graph = import_graph()
    packages = {m for m, p in library_modules().items() if p.name == "__init__.py"}
    return {m: {t for t in targets if t not in packages or t in SHARED} for m, targets in graph.items()
            if m not in packages}


@pytest.mark.parametrize("source,found", [
    ("import fastticket.sparse.nn", ["fastticket.sparse.nn"]),
    ("def f():\n    from fastticket.sparse.optim import MaskedSGD", ["fastticket.sparse.optim"]),
    ("from fastticket.sparse import nn, Missing", ["fastticket.sparse.nn", "fastticket.sparse"]),
    ("from .. import backend", ["fastticket.sparse.backend"]),
    ("from ..functional import mask_gradient", ["fastticket.sparse.functional"]),
    ("import importlib\nimportlib.import_module('fastticket.sparse.nn')", ["fastticket.sparse.nn"]),
    ("import torch, triton", []),
])
def test_the_import_reader_sees_every_form(source, found):
    known = {"fastticket.sparse.nn", "fastticket.sparse.backend", "fastticket.sparse.functional",
             "fastticket.sparse.optim"}
    assert imports_of(source, "fastticket.sparse.x", known) == found


def test_the_circle_finder_finds_a_function_level_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_the_library_has_no_import_circle():
    assert circles(_module_graph()) == []


def test_each_wing_imports_only_the_wings_below_it():
    offences = {}
    for module, targets in _module_graph().items():
        wing = wing_of(module)
        allowed = MAY_IMPORT.get(wing, set(WINGS))
        bad = sorted(t for t in targets if t not in SHARED and wing_of(t) not in allowed)
        if module in SHARED:
            bad = sorted(t for t in targets)  # the shared leaves import nothing of the library
        if bad:
            offences[module] = bad
    assert not offences, f"imports against the layer order (docs/architecture.md): {offences}"


def test_every_module_belongs_to_a_wing():
    loose = sorted(m for m in library_modules() if not wing_of(m) and m not in SHARED
                   and m not in {"fastticket", "fastticket.__main__"})
    assert not loose, f"modules outside the wings: {loose}"


def test_import_fastticket_is_light_and_reaches_the_public_names():
    """In a fresh interpreter: a plain `import fastticket` loads only the masked layers, and every public name
    and wing submodule is reachable by attribute from it."""
    reach = "; ".join(["fastticket.MaskedSGD", "fastticket.rewind_to", "fastticket.SearchConfig",
                       "fastticket.run_search", "fastticket.sparse.optim.MaskedAdam",
                       "fastticket.lottery.prune.prune", "fastticket.lottery.search.run_search",
                       "fastticket.sparse.nn.MaskedLinear", "fastticket.lottery.data",
                       "fastticket.app.report", "fastticket.sparse.testing.rel_error",
                       "fastticket.lottery.atomic_io.atomic_write", "fastticket.app.bench.time_ms",
                       "fastticket.kernels", "fastticket.errors"])
    code = ("import sys, fastticket\n"
            "light = [m for m in ('fastticket.lottery.search', 'fastticket.app.report', 'fastticket.app.bench',"
            " 'matplotlib') if m in sys.modules]\n"
            "assert not light, f'import fastticket loaded {light}'\n"
            f"{reach}\n"
            "assert set(fastticket.__all__) <= set(dir(fastticket))\n"
            "print('ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def test_every_wing_lists_its_submodules():
    for wing in ("sparse", "lottery", "app"):
        package = getattr(fastticket, wing)
        on_disk = {p.stem for p in (ROOT / "fastticket" / wing).glob("*.py") if not p.stem.startswith("_")}
        on_disk |= {p.name for p in (ROOT / "fastticket" / wing).iterdir() if (p / "__init__.py").exists()}
        assert on_disk == set(package.SUBMODULES), (wing, on_disk ^ set(package.SUBMODULES))
    with pytest.raises(AttributeError, match="no_such_module"):
        fastticket.no_such_module
