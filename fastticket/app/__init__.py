"""The front ends: the `fastticket` command line, the Python API (`fastticket.search`), the report and
comparison of run directories, the benchmarks."""
from fastticket._lazy import lazy_attributes

SUBMODULES = ("cli", "cli_flags", "api", "bars", "report", "report_plots", "compare", "export", "bench", "report_stability")

__getattr__, __dir__ = lazy_attributes(__name__, {name: name for name in SUBMODULES})
