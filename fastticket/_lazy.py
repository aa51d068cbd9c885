"""Lazy attributes for a package: a submodule (or a name in one) is imported on first access, so
`import fastticket` stays light and `fastticket.lottery.search` still works without its own import."""
import importlib
from typing import Any, Callable, Dict, List, Tuple


def lazy_attributes(package: str, names: Dict[str, str]) -> Tuple[Callable[[str], Any], Callable[[], List[str]]]:
    """`__getattr__` and `__dir__` for `package`: `names` maps an attribute to "module" (the attribute is that
    submodule of the package) or "module:name" (a name defined in that submodule)."""
    module = importlib.import_module(package)

    def __getattr__(name: str) -> Any:
        if name not in names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        where, _, attr = names[name].partition(":")
        value = importlib.import_module(f"{package}.{where}")
        value = getattr(value, attr) if attr else value
        setattr(module, name, value)
        return value

    def __dir__() -> List[str]:
        return sorted(set(vars(module)) | set(names))

    return __getattr__, __dir__
