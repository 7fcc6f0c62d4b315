"""Tests for privacy/report.py: the report's numbers come from a run's ledger, config, metrics."""

import itertools
import json

import numpy as np
import pytest

from privacy.budget import epsilon_for
from privacy.ledger import PrivacyLedger
from privacy.mechanisms import CentralDpAggregator, DpSpec, prepare_client_update
from privacy.report import write_report
from privacy.sampling import build_sampler

REQUIRED_KEYS = {
    "epsilon",
    "delta",
    "rounds",
    "noise_multiplier",
    "sample_rate",
    "sampling",
    "accountant",
    "mode",
    "clip",
    "population",
    "cohort_size",
    "epsilon_per_round",
    "participation",
    "final_utility",
    "assumptions",
    "adjacency",
}


def simulate_run(run_dir, spec, population=60, rate=0.1, rounds=25):
    """Rounds of the real DP pipeline writing the ledger; returns the releases."""
    sampler = build_sampler(spec.sampling, sample_rate=rate, population=population)
    dp = CentralDpAggregator(spec, sampler, population=population, seed=0)
    ledger = PrivacyLedger.for_run(run_dir)
    rng = np.random.default_rng(1)
    for server_round in range(1, rounds + 1):
        cohort = sampler.sample(population, rng)
        total = {"w": np.zeros(4, np.float32)}
        for _ in cohort.members:
            update = {"w": rng.normal(0, 3.0, 4).astype(np.float32)}
            if spec.where == "client":
                update, unclipped = prepare_client_update(update, clip=dp.clip, mode=spec.mode)
                prepared = dp.prepare(update, client_unclipped=unclipped)
            else:
                prepared = dp.prepare(update)
            total = {"w": total["w"] + prepared["w"]}
        ledger.append(
            dp.release(total, cohort, server_round, participants=tuple(cohort.members)).event
        )
    return ledger.releases


def test_report_from_an_adaptive_fixed_size_run(tmp_path):
    spec = DpSpec(
        mode="clip", noise_multiplier=1.0, sampling="fixed", adaptive=True, clipped_count_stddev=3.0
    )
    releases = simulate_run(tmp_path, spec)
    (tmp_path / "config.json").write_text(
        json.dumps({"run": {"dp-delta": 1e-3, "dp-accountant": "prv"}, "dp-target-epsilon": 50})
    )
    with (tmp_path / "metrics.jsonl").open("w") as handle:
        for r in range(1, 26):
            handle.write(json.dumps({"round": r, "evaluate": {"accuracy": 0.5 + r / 100}}) + "\n")
        handle.write('{"round": 26, "evalu')  # torn by a kill

    report = write_report(tmp_path)
    out = tmp_path / "privacy"
    on_disk = json.loads((out / "report.json").read_text())
    assert REQUIRED_KEYS <= on_disk.keys()
    assert on_disk["epsilon"] == pytest.approx(report["epsilon"])
    assert (
        report["accountant"] == "prv" and report["delta"] == 1e-3 and report["target_epsilon"] == 50
    )
    assert report["epsilon"] == pytest.approx(
        epsilon_for(1.0, 0.1, 25, 1e-3, "fixed", "prv", 60), rel=1e-9
    )
    assert report["epsilon_by_accountant"]["rdp"] > report["epsilon"]
    assert (report["rounds"], report["sampling"], report["population"], report["sample_rate"]) == (
        25,
        "fixed",
        60,
        0.1,
    )
    assert report["adjacency"] == "replace one client"
    assert report["cohort_size"] == {"mean": 6.0, "min": 6, "max": 6}
    assert report["clip"]["first"] == 1.0 and report["clip"]["last"] == releases[-1].clip != 1.0
    curve = report["epsilon_per_round"]
    assert curve[-1] == [25, pytest.approx(report["epsilon"])]
    assert all(a[1] < b[1] for a, b in itertools.pairwise(curve))
    participation = report["participation"]
    assert sum(participation["per_client"].values()) == 25 * 6
    assert participation["clients_participated"] + participation["clients_never_participated"] == 60
    assert report["final_utility"] == {"metric": "accuracy", "value": 0.75, "round": 25}

    markdown = (out / "report.md").read_text()
    assert (
        "replace one client" in markdown
        and "Adaptive clipping" in markdown
        and "Trusted server" in markdown
    )
    assert (out / "epsilon.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_defaults_without_config_or_metrics(tmp_path):
    simulate_run(tmp_path, DpSpec(mode="normalize", noise_multiplier=1.5, where="client"), rounds=5)
    report = write_report(tmp_path)
    assert (report["accountant"], report["delta"]) == ("rdp", 1e-5)
    assert report["epsilon"] == pytest.approx(epsilon_for(1.5, 0.1, 5, 1e-5))
    assert [point[0] for point in report["epsilon_per_round"]] == [1, 2, 3, 4, 5]
    assert report["final_utility"] is None and report["clip"] == 1.0
    markdown = (tmp_path / "privacy" / "report.md").read_text()
    assert "add-or-remove one client" in markdown and "Client-side clipping" in markdown
    assert "exceeds 1/N" not in markdown
    write_report(tmp_path, delta=0.05)  # δ > 1/N = 1/60
    assert "exceeds 1/N" in (tmp_path / "privacy" / "report.md").read_text()


def test_missing_ledger_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no privacy ledger"):
        write_report(tmp_path)
