"""``pollen bench``: the benchmark registry (name → runner) behind ``make bench``.

Each benchmark is a module ``simulations/bench_<name>.py`` with
``run(out_dir: Path, quick: bool = False) -> dict`` that prints its table and writes JSON,
Markdown and plots under ``out_dir``.
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

BENCHMARKS: dict[str, str] = {
    "optimizers": "simulations.bench_optimizers",
    "compression": "simulations.bench_compression",
    "codecs": "simulations.bench_codecs",
}


def _run(name: str, out_dir: Path, quick: bool) -> dict:
    module = importlib.import_module(BENCHMARKS[name])
    return module.run(out_dir / name, quick=quick)


def cmd_bench(args: argparse.Namespace) -> int:
    names = list(BENCHMARKS) if args.name == "all" else [args.name]
    out_dir = Path(args.out)
    for name in names:
        print(f"== pollen bench {name} → {out_dir / name}", flush=True)
        _run(name, out_dir, args.quick)
    return 0


def add_bench_commands(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("bench", help="run benchmarks (tables, JSON and plots)")
    parser.add_argument("name", choices=["all", *BENCHMARKS], help="which benchmark")
    parser.add_argument("--out", default="bench-results", help="output directory")
    parser.add_argument("--quick", action="store_true", help="a small version (about a minute)")
    parser.set_defaults(func=cmd_bench)
    return parser
