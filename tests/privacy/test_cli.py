"""Tests for privacy/cli.py: handlers print the budget module's numbers, reject bad input."""

import argparse
import json

import numpy as np
import pytest

from privacy.budget import epsilon_for, plan_noise_multiplier
from privacy.cli import add_privacy_commands
from privacy.ledger import PrivacyLedger
from privacy.mechanisms import CentralDpAggregator, DpSpec
from privacy.sampling import PoissonSampler


def run(argv, capsys):
    parser = argparse.ArgumentParser(prog="pollen")
    add_privacy_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    code = args.func(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


EPSILON = [
    "privacy",
    "epsilon",
    "--noise-multiplier",
    "1.0",
    "--sample-rate",
    "0.01",
    "--rounds",
    "1000",
    "--delta",
    "1e-5",
]


def test_epsilon_command_prints_the_accountants_value(capsys):
    code, out, _ = run(EPSILON + ["--json"], capsys)
    assert code == 0
    result = json.loads(out)
    assert result["epsilon"] == pytest.approx(epsilon_for(1.0, 0.01, 1000, 1e-5))
    assert result["epsilon"] == pytest.approx(2.1014, abs=1e-4)
    assert (result["accountant"], result["sampling"], result["rounds"]) == ("rdp", "poisson", 1000)
    code, out, _ = run(
        EPSILON + ["--sampling", "fixed", "--population", "1000", "--accountant", "prv"], capsys
    )
    assert code == 0
    expected = epsilon_for(1.0, 0.01, 1000, 1e-5, "fixed", "prv", 1000)
    assert out.startswith(f"epsilon = {expected:.6g}")


def test_plan_command_prints_a_noise_multiplier_that_meets_the_target(capsys):
    argv = [
        "privacy",
        "plan",
        "--target-epsilon",
        "2",
        "--delta",
        "1e-5",
        "--sample-rate",
        "0.02",
        "--rounds",
        "500",
    ]
    code, out, _ = run(argv + ["--json"], capsys)
    assert code == 0
    result = json.loads(out)
    assert result["noise_multiplier"] == pytest.approx(plan_noise_multiplier(2.0, 1e-5, 0.02, 500))
    assert result["epsilon"] <= 2.0
    code, out, _ = run(argv, capsys)
    assert code == 0 and out.startswith(f"noise_multiplier = {result['noise_multiplier']:.6g}")


@pytest.mark.parametrize(
    "replace, message",
    [
        ({"--noise-multiplier": "-0.5"}, "noise_multiplier (z) must be a finite number >= 0"),
        ({"--delta": "1"}, "delta must be in (0, 1)"),
        ({"--delta": "0"}, "delta must be in (0, 1)"),
        ({"--sample-rate": "0"}, "sample_rate (q) must be in (0, 1]"),
        ({"--sample-rate": "1.2"}, "sample_rate (q) must be in (0, 1]"),
        ({"--rounds": "0"}, "rounds (T) must be a whole number >= 1"),
    ],
)
def test_epsilon_command_rejects_bad_input(capsys, replace, message):
    argv = list(EPSILON)
    for flag, value in replace.items():
        argv[argv.index(flag) + 1] = value
    code, out, err = run(argv, capsys)
    assert code == 2 and out == ""
    assert err.startswith("pollen privacy epsilon: error: ") and message in err


def test_plan_and_fixed_sampling_errors(capsys):
    code, _, err = run(
        [
            "privacy",
            "plan",
            "--target-epsilon",
            "0.001",
            "--delta",
            "1e-5",
            "--sample-rate",
            "0.01",
            "--rounds",
            "100",
        ],
        capsys,
    )
    assert code == 2 and "target epsilon 0.001 is unreachable" in err
    code, _, err = run(EPSILON + ["--sampling", "fixed"], capsys)
    assert code == 2 and "needs population" in err


def test_report_command_writes_the_report(tmp_path, capsys):
    dp = CentralDpAggregator(
        DpSpec(mode="clip", noise_multiplier=1.0), PoissonSampler(0.2), population=20, seed=0
    )
    ledger = PrivacyLedger.for_run(tmp_path)
    rng = np.random.default_rng(0)
    for server_round in range(1, 4):
        ledger.append(
            dp.release(
                {"w": np.zeros(2, np.float32)}, dp.sampler.sample(20, rng), server_round
            ).event
        )
    code, out, _ = run(["privacy", "report", str(tmp_path), "--delta", "1e-4"], capsys)
    assert code == 0 and (tmp_path / "privacy" / "report.json").exists()
    assert out.startswith(
        f"epsilon = {epsilon_for(1.0, 0.2, 3, 1e-4):.6g} (delta=0.0001, rdp) after 3 rounds"
    )
    code, _, err = run(["privacy", "report", str(tmp_path / "missing")], capsys)
    assert code == 2 and "no privacy ledger" in err
