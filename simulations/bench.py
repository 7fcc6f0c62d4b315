"""``pollen bench``: a name → benchmark registry and the subcommands that run them.

Each benchmark is a function ``run(out_dir: Path, quick: bool) -> dict`` that writes its
tables and plots under ``out_dir`` and returns its report. Register a new one by adding it
to :data:`BENCHMARKS`; ``pollen bench <name>`` and ``pollen bench all`` pick it up.
"""

from __future__ import annotations

import argparse
import importlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

Benchmark = Callable[[Path, bool], dict[str, Any]]


def _lazy(module: str) -> Benchmark:
    """The ``run`` of ``module``, imported only when the benchmark runs (keeps the CLI fast)."""

    def run(out_dir: Path, quick: bool) -> dict[str, Any]:
        return importlib.import_module(module).run(out_dir, quick=quick)

    run.__doc__ = f"{module}.run"
    return run


BENCHMARKS: dict[str, Benchmark] = {
    "optimizers": _lazy("simulations.bench_optimizers"),
    "compression": _lazy("simulations.bench_compression"),
    "privacy": _lazy("simulations.bench_privacy"),
    "codecs": _lazy("simulations.bench_codecs"),
    "scale": _lazy("simulations.bench_scale"),
}
"""Benchmark name → runner; ``all`` runs them in this order."""


def run_benchmarks(names: list[str], out_dir: Path, quick: bool) -> dict[str, dict[str, Any]]:
    """Run the named benchmarks, each into ``out_dir / name``; return their reports."""
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise ValueError(f"unknown benchmark(s) {unknown}; allowed: {', '.join(BENCHMARKS)}")
    reports = {}
    for name in names:
        started = time.perf_counter()
        print(f"pollen bench {name} → {out_dir / name}", flush=True)
        reports[name] = BENCHMARKS[name](out_dir / name, quick)
        print(f"pollen bench {name}: done in {time.perf_counter() - started:.0f} s", flush=True)
    return reports


def _cmd_bench(args: argparse.Namespace) -> int:
    names = list(BENCHMARKS) if args.benchmark == "all" else [args.benchmark]
    run_benchmarks(names, Path(args.out), args.quick)
    return 0


def add_bench_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``pollen bench {all,<name>...} [--out DIR] [--quick]``."""
    bench = subparsers.add_parser("bench", help="run benchmarks and write tables and plots")
    bench.add_argument("benchmark", choices=["all", *BENCHMARKS], help="benchmark to run")
    bench.add_argument("--out", default="bench-results", help="output directory (default: %(default)s)")
    bench.add_argument("--quick", action="store_true", help="short budgets, for a smoke test")
    bench.set_defaults(func=_cmd_bench)
