"""The ``pollen`` command: everything that is not ``flwr run`` itself.

``pollen run`` validates the run config *before* anything starts (one clear line on bad
input), starts a private local SuperLink with Flower's per-run dependency installation off,
runs the app through ``flwr run --stream``, and stops the SuperLink when it is done — the
user never starts, finds or kills a SuperLink by hand. ``pollen resume RUN_DIR`` does the
same with the run's own config and ``resume=true``, continuing it from its last checkpoint.
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
    try:
        overrides["output-dir"] = str(Path(cfg.output_dir).expanduser().resolve())
    except (OSError, RuntimeError, ValueError) as err:  # e.g. "~nosuchuser/runs"
        raise ConfigError(f"run-config key 'output-dir' {cfg.output_dir!r} is not a usable path: {err}") from None
    if not cfg.run_name:
        overrides["run-name"] = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return overrides


def resume_run_config(run_dir: Path, overrides_text: str = "") -> tuple[dict, int]:
    """The run config that continues ``run_dir``, and the number of nodes it ran with.

    It is the killed run's own config (``run_dir/config.json``) with ``resume=true`` and
    ``output-dir``/``run-name`` pointing at ``run_dir`` (so a moved directory resumes too).
    Overrides may only change what a resumption may change (e.g. ``num-server-rounds``);
    anything else would not continue the same run and is refused here, before anything starts.
    """
    from fedserver.resume import RESUMABLE_CHANGES

    run_dir = run_dir.expanduser().resolve()
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise ConfigError(f"{run_dir} is not a Pollen run directory: it has no config.json")
    try:
        written = json.loads(config_path.read_text())
        saved, num_nodes = dict(written["run_config"]), int(written.get("num_nodes") or 0)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"cannot read the run config in {config_path}: {err}") from None
    overrides = parse_overrides(overrides_text) if overrides_text else {}
    changeable = RESUMABLE_CHANGES - {"resume", "output-dir"}  # those two are set here
    fixed = sorted(k for k in overrides if k not in changeable)
    if fixed:
        raise ConfigError(
            f"run-config keys {fixed} cannot change when resuming (a resumed run must stay the same "
            f"run); allowed: {sorted(changeable)}"
        )
    run_config = {**saved, **overrides, "resume": True, "output-dir": str(run_dir.parent), "run-name": run_dir.name}
    parse_run_config(run_config)
    return run_config, num_nodes


def check_ray_cluster(ray_address: str | None, federation: dict) -> None:
    """Refuse a bad ``--ray-address`` before anything starts, as one ``ConfigError`` line.

    The address must be ``auto`` or a reachable ``HOST:PORT``
    (:func:`fedserver.launcher.check_ray_address`). ``init-args-num-cpus/gpus`` size the
    private Ray a run starts; Ray refuses them when joining a cluster ("When connecting to
    an existing cluster, num_cpus and num_gpus must not be provided"), deep in the run.
    """
    if ray_address is None:
        return
    from fedserver.launcher import LaunchError, check_ray_address

    private_only = sorted(key for key in federation if key.startswith("init-args-num-"))
    if private_only:
        raise ConfigError(
            f"federation-config keys {private_only} size a private Ray and cannot be used with "
            "--ray-address; the cluster's nodes declare their resources with "
            "`ray start --num-cpus N --num-gpus N`"
        )
    try:
        check_ray_address(ray_address)
    except (ValueError, LaunchError) as err:
        raise ConfigError(str(err).replace("ray_address", "--ray-address")) from None


def cmd_run(args: argparse.Namespace) -> int:
    try:
        run_config = resolve_run_config(" ".join(args.run_config or []))
        federation = {**DEFAULT_FEDERATION, **_parse_federation(" ".join(args.federation_config or []))}
        check_ray_cluster(args.ray_address, federation)
    except ConfigError as err:
        print(f"pollen: error: {err}", file=sys.stderr)
        return 2
    return _launch(args, run_config, federation)


def cmd_resume(args: argparse.Namespace) -> int:
    try:
        run_config, num_nodes = resume_run_config(Path(args.run_dir), " ".join(args.run_config or []))
        nodes = {"num-supernodes": num_nodes} if num_nodes else {}
        federation = {
            **DEFAULT_FEDERATION, **nodes, **_parse_federation(" ".join(args.federation_config or []))
        }
        check_ray_cluster(args.ray_address, federation)
    except ConfigError as err:
        print(f"pollen: error: {err}", file=sys.stderr)
        return 2
    return _launch(args, run_config, federation)


def _launch(args: argparse.Namespace, run_config: dict, federation: dict) -> int:
    """``flwr run`` the app on a private SuperLink, then report from the run directory."""
    from fedserver.launcher import flwr_run

    run_dir = Path(run_config["output-dir"]) / run_config["run-name"]
    verb = "resuming" if run_config.get("resume") else "running"
    where = f" on the Ray cluster at {args.ray_address}" if args.ray_address else ""
    print(f"pollen: {verb} {_app_dir(args.app)}{where} → {run_dir}", flush=True)
    outcome = flwr_run(
        _app_dir(args.app),
        run_config=run_config,
        federation_config=federation,
        flwr_home=Path(args.flwr_home) if args.flwr_home else None,
        timeout=args.timeout,
        ray_address=args.ray_address,
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


def _add_launch_arguments(
    parser: argparse.ArgumentParser, *, run_config_help: str, federation_help: str
) -> None:
    """The options shared by the commands that launch a run (`run`, `resume`)."""
    parser.add_argument("-c", "--run-config", action="append", help=run_config_help)
    parser.add_argument("-f", "--federation-config", action="append", help=federation_help)
    parser.add_argument("--app", help="app directory (default: this Pollen checkout)")
    parser.add_argument("--flwr-home", help="Flower home to use (default: a temporary one)")
    parser.add_argument("--timeout", type=float, default=None, help="give up after this many seconds")
    parser.add_argument(
        "--ray-address", metavar="ADDR",
        help="run the ClientApps on this existing Ray cluster: HOST:PORT of its head "
        "(`ray start --head --port PORT`), or 'auto' for the cluster this machine joined; "
        "default: a private Ray for this run",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pollen", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the Pollen app with flwr run on a private local SuperLink")
    _add_launch_arguments(
        run,
        run_config_help='run-config overrides, e.g. "num-server-rounds=5 partitioner=dirichlet"',
        federation_help='simulation settings, e.g. "num-supernodes=20 client-resources-num-cpus=1"',
    )
    run.set_defaults(func=cmd_run)

    resume = sub.add_parser(
        "resume", help="continue a killed or finished run from its last checkpoint (same trajectory)"
    )
    resume.add_argument("run_dir", help="the run directory (<output-dir>/<run-name>)")
    _add_launch_arguments(
        resume,
        run_config_help='what may change, e.g. "num-server-rounds=40" (more rounds) or "round-timeout=300"',
        federation_help="simulation settings (default: as many supernodes as the run had)",
    )
    resume.set_defaults(func=cmd_resume)

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
