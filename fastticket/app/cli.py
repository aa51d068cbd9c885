"""The `fastticket` command: `search` (an IMP ticket search), `report` (plots and tables), `bench`.

Bad input never shows a traceback: errors fastticket raises for the user (fastticket.errors, and the
ValueErrors of presets/models/data) become one line on stderr and exit status 2 (bad arguments or settings)
or 1 (the run directory, the data or a saved file cannot be used, a peer rank was lost); a search stopped by
SIGTERM at a safe point exits with 143.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn, Optional, Sequence

from fastticket.app.cli_flags import SEARCH_FLAGS, config_fields, flag_name
from fastticket.errors import (ConfigError, FastTicketError, MaskError, OutputError, PeerLostError, RunDirError,
                               StoppedError)

EXIT_RUNTIME, EXIT_USAGE, EXIT_STOPPED = 1, 2, 128 + 15  # 143: stopped by SIGTERM, resumable

SEARCH_EPILOG = """\
examples:
  fastticket search                                  # default preset lenet-mnist5k: 10 levels + reinit, minutes on CPU
  fastticket search --levels 3 --iterations 300 --out runs/quick
  fastticket search --preset conv2-cifar10 --device cuda --data-dir ~/data --controls reinit,random --trials 3
  fastticket search --preset resnet20-cifar10 --rewind-iter 500 --granularity block:16x16 --device cuda
  fastticket search --out runs/quick --levels 3 --iterations 300 --resume   # continue an interrupted run
  fastticket search --controls reinit,random,snip,grasp,synflow   # pruning-at-init baselines as controls
  fastticket search --rewind lr --rewind-iter 100     # lr rewinding (Renda et al. 2020); none: fine-tuning
  fastticket search --refill block:16x16              # structured tickets by refilling (Chen et al. 2022)
  fastticket search --early-bird 0.02                 # stop a level once its mask settles (You et al. 2020)

Flags override the preset's fields. --rate R sets the per-level rate of fc layers (layerwise) or of the global
pool, and scales the preset's conv and output-layer rates by the same factor (R / preset rate), so their
ratios to the fc rate stay as in the paper (e.g. lenet: fc 20%, output 10%; --rate 0.4 gives 40% / 20%).
The run directory defaults to runs/<preset> (deterministic, so --resume finds it again without --out).
"""

REPORT_EPILOG = """\
examples:
  fastticket report runs/lenet-mnist5k     # writes runs/lenet-mnist5k/report/{results.csv,results.md,*.png}
  fastticket report runs/element runs/refill --out runs/compare   # runs side by side: one table, one set of plots
Several runs must share the model and dataset; each is labelled by the settings in which the runs differ.
"""

BENCH_EPILOG = """\
examples:
  fastticket bench --quick                          # every suite, small shapes
  fastticket bench --suite linear,conv --dtype bf16 --out bench/results
  fastticket bench --gpu-session --out bench/results/session   # the whole GPU validation, < 8 min
  fastticket bench --gpu-session --rehearse --out /tmp/session # the same plan on a CPU, tiny shapes
Without a GPU only the parity checks run (Triton interpreter); timings need a GPU.
"""


class _OneLineArgumentParser(argparse.ArgumentParser):
    """argparse, but its usage errors are one line (argparse prints the usage block first otherwise)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineArgumentParser(
        prog="fastticket",
        description="Lottery-ticket search: iterative magnitude pruning with rewinding (Frankle & Carbin, ICLR "
                    "2019), with random-reinit and random-pruning controls, and fast masked training.",
        epilog="Run `fastticket <command> --help` for a command's options.",
    )
    sub = parser.add_subparsers(dest="command", metavar="{search,report,bench,export}", parser_class=_OneLineArgumentParser)

    s = sub.add_parser("search", help="run (or resume) an IMP ticket search",
                       description="Run iterative magnitude pruning: train, prune, rewind, repeat for levels "
                                   "0..N, with controls; write results under --out and draw the report.",
                       epilog=SEARCH_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    from fastticket.lottery.presets import DEFAULT_PRESET, get_preset, list_presets
    defaults = get_preset(DEFAULT_PRESET)
    s.add_argument("--preset", metavar="NAME", default=None, help=f"named settings to start from (default {DEFAULT_PRESET}): "
                                                  f"{', '.join(list_presets())}")
    fields = config_fields()
    for name, flag in SEARCH_FLAGS.items():
        text = f"{fields[name].metadata['help']} (default: {getattr(defaults, name)})"
        if flag.switch:  # default None: an absent switch leaves the preset's value
            s.add_argument(flag_name(name), dest=name, action="store_true", default=None, help=text)
            continue
        # --data is the short spelling for a user's PKG.MODULE:FUNCTION (--dataset for the built-in names).
        spellings = [flag_name(name)] + (["--data"] if name == "dataset" else [])
        optional = {} if flag.const is None else {"nargs": "?", "const": flag.const}
        s.add_argument(*spellings, dest=name, metavar=flag.metavar, type=flag.type, help=text, **optional)
    s.add_argument("--out", metavar="DIR", help="run directory (default runs/<preset>); must be empty unless --resume")
    s.add_argument("--resume", action="store_true", help="continue the run in --out (same settings required)")
    s.add_argument("--no-progress", action="store_true", help="no progress bars (on a terminal) or lines (in a log)")

    r = sub.add_parser("report", help="draw plots and tables of a run directory",
                       description="Plots (test accuracy and early-stopping iteration vs % weights remaining, "
                                   "tickets against controls with error bars over trials) and CSV/markdown "
                                   "tables, written to RUN_DIR/report/.",
                       epilog=REPORT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("run_dirs", metavar="RUN_DIR", nargs="+", help="directories written by `fastticket search`")
    r.add_argument("--out", metavar="DIR", help="where to write (default RUN_DIR/report; required for several runs)")

    b = sub.add_parser("bench", help="kernel benchmarks with parity checks against dense PyTorch",
                       description="Benchmark the masked kernels against dense PyTorch (timings on a GPU; "
                                   "parity everywhere).",
                       epilog=BENCH_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("--suite", default="", help="comma list of suites: linear, conv, optim, search (default: all)")
    b.add_argument("--out", help="directory to write JSON + markdown results into")
    b.add_argument("--dtype", help="fp32, tf32, bf16 or fp16")
    b.add_argument("--quick", action="store_true", help="fewer, smaller shapes")
    b.add_argument("--gpu-session", action="store_true",
                   help="the whole GPU validation in one call, within a budget (default 8 min): dispatch "
                        "crossovers, real-size kernel checks, the search bench, the rest; needs --out")
    b.add_argument("--dry-run", action="store_true", help="with --gpu-session: print the plan, run nothing")
    b.add_argument("--rehearse", action="store_true",
                   help="with --gpu-session: run the same plan on this machine (tiny shapes, 4 min budget)")
    b.add_argument("--budget", type=int, metavar="S", help="with --gpu-session: the session's budget in seconds")
    from fastticket.app.export import add_parser as add_export_parser
    add_export_parser(sub)
    return parser


def config_from_args(args: argparse.Namespace):
    """The preset with the command line's overrides applied (see SEARCH_EPILOG for --rate)."""
    from fastticket.lottery.presets import DEFAULT_PRESET, get_preset
    config = get_preset(args.preset or DEFAULT_PRESET)
    changes = {name: getattr(args, name) for name in SEARCH_FLAGS
               if name != "rate" and getattr(args, name) is not None}
    if args.rate is not None:
        factor = args.rate / config.rate
        changes["rate"] = args.rate
        # Keep the preset's conv/output rates in proportion to the fc rate (the paper's ratios).
        for field in ("conv_rate", "output_rate"):
            preset_value = getattr(config, field)
            if preset_value is not None:
                scaled = preset_value * factor
                if not 0.0 < scaled < 1.0:
                    raise ConfigError(f"--rate {args.rate} scales the preset's {field} {preset_value} to "
                                      f"{scaled:.3g}, outside (0, 1); choose a smaller --rate")
                changes[field] = round(scaled, 12) or scaled  # rounding must not turn a tiny rate into 0
    return config.replace(**changes)


def _search(args: argparse.Namespace) -> int:
    from fastticket.app.bars import progress_bars
    from fastticket.lottery.progress import LogLines
    from fastticket.lottery.platform import env_rank
    from fastticket.lottery.presets import DEFAULT_PRESET
    from fastticket.app.report import summary_table
    from fastticket.lottery.search import run_search
    config = config_from_args(args)
    out = args.out or os.path.join("runs", args.preset or DEFAULT_PRESET)
    # Bars only on a terminal: in a log file their carriage returns would bury the messages; a log gets lines.
    main = env_rank() == 0  # under torchrun, rank 0 draws the bars and writes the summary and the report
    show = not args.no_progress and main
    progress = (progress_bars() if sys.stderr.isatty() else LogLines()) if show else None
    rows = run_search(config, out, resume=args.resume, progress=progress)
    if not main:
        return 0 if any(r.get("status") == "ok" for r in rows) else EXIT_RUNTIME
    print(summary_table(rows))
    print(f"run directory: {out}")
    for path in _report_files(out):
        print(f"wrote {path}")
    if rows and all(r.get("status") != "ok" for r in rows):
        print(f"fastticket: error: every arm diverged (loss became NaN/inf); nothing was learned: lower --lr "
              f"(now {config.lr:g})", file=sys.stderr)
        return EXIT_RUNTIME
    return 0


def _report_files(run_dir: str, out_dir: Optional[str] = None):
    """make_report (into `out_dir`, default RUN_DIR/report), naming on stderr every file it could not read and
    an unfinished run."""
    from fastticket.app.report import make_report
    problems: list = []
    try:
        return make_report(run_dir, problems, out_dir)
    finally:
        for line in problems:
            print(f"fastticket: warning: {line}", file=sys.stderr)


def _report(args: argparse.Namespace) -> int:
    from fastticket.app.report import collect_results, summary_table
    for run_dir in args.run_dirs:
        if not os.path.isdir(run_dir):
            raise RunDirError(f"no run directory at {run_dir}")
    if len(args.run_dirs) > 1:
        from fastticket.app.compare import comparison_rows, comparison_table, make_comparison
        if not args.out:
            raise ConfigError("several runs are compared into one new directory: pass --out DIR")
        problems: list = []
        try:
            paths = make_comparison(args.run_dirs, args.out, problems)
        finally:
            for line in dict.fromkeys(problems):
                print(f"fastticket: warning: {line}", file=sys.stderr)
        print(comparison_table(comparison_rows(args.run_dirs, [])[0]))
    else:
        paths = _report_files(args.run_dirs[0], args.out)
        print(summary_table(collect_results(args.run_dirs[0])))
    for path in paths:
        print(f"wrote {path}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from fastticket.lottery.atomic_io import ensure_writable_dir
    from fastticket.app.bench import run_cli
    if args.out:
        ensure_writable_dir(args.out, "--out")  # before minutes of benchmarks, not after
    if args.gpu_session:
        from fastticket.app.bench.gpu_session import session_cli
        return session_cli(args.out, args.dry_run, args.rehearse, args.budget)
    if args.dry_run or args.rehearse or args.budget is not None:
        print("error: --dry-run, --rehearse and --budget go with --gpu-session", file=sys.stderr)
        return EXIT_USAGE
    suites = [s.strip() for s in args.suite.split(",") if s.strip()]
    return run_cli(suites, out=args.out, dtype=args.dtype, quick=args.quick)


def _export(args: argparse.Namespace) -> int:
    from fastticket.app.export import run_cli
    return run_cli(args)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the `fastticket` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    handler = {"search": _search, "report": _report, "bench": _bench, "export": _export}[args.command]
    try:
        return handler(args)
    except KeyboardInterrupt:
        print("fastticket: interrupted; continue with the same command plus --resume", file=sys.stderr)
        return 130
    except StoppedError as exc:  # SIGTERM: the status a process ended by it has
        print(f"fastticket: {_one_line(exc)}", file=sys.stderr)
        return EXIT_STOPPED
    except (RunDirError, MaskError, OutputError, PeerLostError) as exc:
        print(f"fastticket: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_RUNTIME
    except (FastTicketError, ValueError) as exc:
        # ValueError: unknown preset/model/dataset (presets, models, data) and DatasetUnavailableError.
        from fastticket.lottery.data import DatasetUnavailableError
        code = EXIT_RUNTIME if isinstance(exc, DatasetUnavailableError) else EXIT_USAGE
        print(f"fastticket: error: {_one_line(exc)}", file=sys.stderr)
        return code
    except OSError as exc:  # a file or directory the command needs cannot be read or written
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        print(f"fastticket: error: {exc.strerror or _one_line(exc)}{where}", file=sys.stderr)
        return EXIT_RUNTIME
    except MemoryError:
        print("fastticket: error: out of memory; lower --batch-size or use a smaller model, then rerun the same "
              "command (an interrupted run continues with --resume)", file=sys.stderr)
        return EXIT_RUNTIME
    except RuntimeError as exc:
        if "out of memory" not in str(exc).lower():  # torch.cuda.OutOfMemoryError is a RuntimeError
            raise
        print(f"fastticket: error: out of memory on the GPU ({_one_line(exc)[:160]}); lower --batch-size or use a "
              f"smaller model, then rerun the same command (an interrupted run continues with --resume)",
              file=sys.stderr)
        return EXIT_RUNTIME


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
