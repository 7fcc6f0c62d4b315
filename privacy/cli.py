"""``pollen privacy …`` commands: a run's privacy report, ε of a planned run, z for a target ε.

:func:`add_privacy_commands` adds the ``privacy`` command to the ``pollen`` argparse tree; every
leaf sets ``func`` to its handler, which takes the parsed namespace and returns an exit code
(0 ok, 2 bad input) after printing the result to stdout or the error to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys

from privacy.accountants.registry import ACCOUNTANTS
from privacy.budget import epsilon_for, plan_noise_multiplier
from privacy.events import SAMPLINGS
from privacy.report import write_report


def _fail(args: argparse.Namespace, message: str) -> int:
    print(f"pollen privacy {args.privacy_command}: error: {message}", file=sys.stderr)
    return 2


def _add_run_shape(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--delta", type=float, required=True, help="δ of the (ε, δ) guarantee, in (0, 1)"
    )
    parser.add_argument(
        "--sample-rate",
        type=float,
        required=True,
        help="per-round client sampling rate q in (0, 1]",
    )
    parser.add_argument("--rounds", type=int, required=True, help="number of rounds T")
    parser.add_argument(
        "--sampling", choices=SAMPLINGS, default="poisson", help="cohort sampling (default poisson)"
    )
    parser.add_argument(
        "--population",
        type=int,
        default=None,
        help="number of clients N (required for fixed sampling)",
    )
    parser.add_argument(
        "--accountant", choices=tuple(ACCOUNTANTS), default="rdp", help="accountant (default rdp)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _shape(args: argparse.Namespace) -> dict:
    return {
        "delta": args.delta,
        "sample_rate": args.sample_rate,
        "rounds": args.rounds,
        "sampling": args.sampling,
        "population": args.population,
        "accountant": args.accountant,
    }


def handle_epsilon(args: argparse.Namespace) -> int:
    """``pollen privacy epsilon``: ε of T rounds at (z, q, δ)."""
    try:
        epsilon = epsilon_for(
            args.noise_multiplier,
            args.sample_rate,
            args.rounds,
            args.delta,
            args.sampling,
            args.accountant,
            args.population,
        )
    except ValueError as error:
        return _fail(args, str(error))
    if args.json:
        print(
            json.dumps(
                {"epsilon": epsilon, "noise_multiplier": args.noise_multiplier, **_shape(args)}
            )
        )
    else:
        print(
            f"epsilon = {epsilon:.6g}  (delta={args.delta:g}, "
            f"noise_multiplier={args.noise_multiplier:g}, sample_rate={args.sample_rate:g}, "
            f"rounds={args.rounds}, sampling={args.sampling}, accountant={args.accountant})"
        )
    return 0


def handle_plan(args: argparse.Namespace) -> int:
    """``pollen privacy plan``: smallest z with ε ≤ target over T rounds."""
    try:
        z = plan_noise_multiplier(
            args.target_epsilon,
            args.delta,
            args.sample_rate,
            args.rounds,
            args.sampling,
            args.accountant,
            args.population,
        )
        epsilon = epsilon_for(
            z,
            args.sample_rate,
            args.rounds,
            args.delta,
            args.sampling,
            args.accountant,
            args.population,
        )
    except ValueError as error:
        return _fail(args, str(error))
    if args.json:
        print(
            json.dumps(
                {
                    "noise_multiplier": z,
                    "epsilon": epsilon,
                    "target_epsilon": args.target_epsilon,
                    **_shape(args),
                }
            )
        )
    else:
        print(
            f"noise_multiplier = {z:.6g}  (epsilon = {epsilon:.6g} <= target "
            f"{args.target_epsilon:g}; delta={args.delta:g}, sample_rate={args.sample_rate:g}, "
            f"rounds={args.rounds}, sampling={args.sampling}, accountant={args.accountant})"
        )
    return 0


def handle_report(args: argparse.Namespace) -> int:
    """``pollen privacy report RUN_DIR``: write report.json / report.md / epsilon.png."""
    try:
        report = write_report(args.run_dir, delta=args.delta, accountant=args.accountant)
    except (OSError, ValueError) as error:
        return _fail(args, str(error))
    out = f"{args.run_dir}/privacy"
    print(
        f"epsilon = {report['epsilon']:.6g} (delta={report['delta']:g}, {report['accountant']}) "
        f"after {report['rounds']} rounds; wrote {out}/report.json, {out}/report.md, "
        f"{out}/epsilon.png"
    )
    return 0


def add_privacy_commands(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``privacy {report,epsilon,plan}`` to ``pollen``'s subparsers; returns the new parser."""
    privacy = subparsers.add_parser(
        "privacy", help="differential-privacy reports and budget planning"
    )
    commands = privacy.add_subparsers(
        dest="privacy_command", required=True, metavar="{report,epsilon,plan}"
    )

    report = commands.add_parser("report", help="write a run's privacy report from its ledger")
    report.add_argument(
        "run_dir", metavar="RUN_DIR", help="run directory containing privacy/ledger.jsonl"
    )
    report.add_argument("--delta", type=float, default=None, help="δ (default: the run's dp-delta)")
    report.add_argument(
        "--accountant",
        choices=tuple(ACCOUNTANTS),
        default=None,
        help="default: the run's dp-accountant",
    )
    report.set_defaults(func=handle_report)

    epsilon = commands.add_parser("epsilon", help="ε of T rounds with noise multiplier z")
    epsilon.add_argument(
        "--noise-multiplier", type=float, required=True, help="z >= 0 (noise std on the sum / C)"
    )
    _add_run_shape(epsilon)
    epsilon.set_defaults(func=handle_epsilon)

    plan = commands.add_parser("plan", help="smallest noise multiplier meeting a target ε")
    plan.add_argument("--target-epsilon", type=float, required=True, help="target ε > 0")
    _add_run_shape(plan)
    plan.set_defaults(func=handle_plan)
    return privacy
