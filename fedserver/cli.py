"""The ``pollen`` command: everything that is not ``flwr run`` itself.

``pollen run`` validates the run config *before* anything starts (one clear line on bad
input), starts a private local SuperLink with Flower's per-run dependency installation off,
runs the app through ``flwr run --stream``, and stops the SuperLink when it is done — the
user never starts, finds or kills a SuperLink by hand.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from fedserver.certs import add_certs_command
from fedserver.config import ConfigError, parse_overrides, parse_run_config
from privacy.cli import add_privacy_commands
from simulations.bench import add_bench_commands

DEFAULT_FEDERATION = {"num-supernodes": 10, "client-resources-num-cpus": 1}


def _app_dir(path: str | None) -> Path:
    if path:
        return Path(path).resolve()
    here = Path(__file__).resolve().parent.parent
    if (here / "pyproject.toml").exists():
        return here
    return Path.cwd()


def _parse_federation(text: str) -> dict:
    try:
        return parse_overrides(text) if text else {}
    except ConfigError as err:
        raise ConfigError(str(err).replace("run-config", "federation-config")) from None


def resolve_run_config(overrides_text: str) -> dict:
    """Validated overrides with ``output-dir`` made absolute and ``run-name`` fixed.

    The ServerApp runs in another process with another working directory, so a relative
    ``output-dir`` is resolved here, against the directory the user typed the command in.
    """
    overrides = parse_overrides(overrides_text) if overrides_text else {}
    cfg = parse_run_config(overrides)
    overrides["output-dir"] = str(Path(cfg.output_dir).expanduser().resolve())
    if not cfg.run_name:
        overrides["run-name"] = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return overrides


def cmd_run(args: argparse.Namespace) -> int:
    from fedserver.launcher import flwr_run

    try:
        run_config = resolve_run_config(" ".join(args.run_config or []))
        federation = {**DEFAULT_FEDERATION, **_parse_federation(" ".join(args.federation_config or []))}
    except ConfigError as err:
        print(f"pollen: error: {err}", file=sys.stderr)
        return 2
    run_dir = Path(run_config["output-dir"]) / run_config["run-name"]
    print(f"pollen: running {_app_dir(args.app)} → {run_dir}", flush=True)
    outcome = flwr_run(
        _app_dir(args.app),
        run_config=run_config,
        federation_config=federation,
        flwr_home=Path(args.flwr_home) if args.flwr_home else None,
        timeout=args.timeout,
    )
    summary_path = run_dir / "summary.json"
    if not outcome.succeeded or not summary_path.exists():
        print(
            f"pollen: error: the run did not complete (status {outcome.status}); "
            f"see the log above and {run_dir}",
            file=sys.stderr,
        )
        return 1
    summary = json.loads(summary_path.read_text())
    print(
        f"pollen: finished: accuracy {summary['final_accuracy']:.4f} after {summary['rounds']} "
        f"rounds, {summary['wall_s']:.1f} s → {run_dir}"
    )
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from fedserver.config_docs import pyproject_block, readme_table

    if args.check is not None:
        try:
            cfg = parse_run_config(parse_overrides(" ".join(args.check)))
        except ConfigError as err:
            print(f"pollen: error: {err}", file=sys.stderr)
            return 2
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    print(readme_table() if args.format == "markdown" else pyproject_block())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pollen", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the Pollen app with flwr run on a private local SuperLink")
    run.add_argument(
        "-c", "--run-config", action="append",
        help='run-config overrides, e.g. "num-server-rounds=5 partitioner=dirichlet"',
    )
    run.add_argument(
        "-f", "--federation-config", action="append",
        help='simulation settings, e.g. "num-supernodes=20 client-resources-num-cpus=1"',
    )
    run.add_argument("--app", help="app directory (default: this Pollen checkout)")
    run.add_argument("--flwr-home", help="Flower home to use (default: a temporary one)")
    run.add_argument("--timeout", type=float, default=None, help="give up after this many seconds")
    run.set_defaults(func=cmd_run)

    config = sub.add_parser("config", help="print or check the run-config keys")
    config.add_argument("--format", choices=("toml", "markdown"), default="markdown")
    config.add_argument("--check", nargs="*", help="validate overrides and print the resolved config")
    config.set_defaults(func=cmd_config)

    add_certs_command(sub)
    add_privacy_commands(sub)
    add_bench_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
