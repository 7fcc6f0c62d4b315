"""Tests for privacy/budget.py: planning inverts ε, unreachable targets, stop-before-exceeding."""

import numpy as np
import pytest

from privacy.accountants import RdpAccountant
from privacy.budget import BudgetGuard, PrivacyBudgetExceeded, epsilon_for, plan_noise_multiplier
from privacy.events import SampledGaussian
from privacy.ledger import PrivacyLedger
from privacy.mechanisms import CentralDpAggregator, DpSpec
from privacy.sampling import PoissonSampler


@pytest.mark.parametrize(
    "target, q, rounds, sampling, accountant, population",
    [
        (3.0, 0.01, 1000, "poisson", "rdp", None),
        (1.0, 0.1, 30, "poisson", "prv", None),
        (8.0, 1.0, 5, "fixed", "rdp", 20),
        (8.0, 0.2, 10, "fixed", "prv", 50),
    ],
)
def test_plan_inverts_epsilon_for(target, q, rounds, sampling, accountant, population):
    delta = 1e-5
    z = plan_noise_multiplier(target, delta, q, rounds, sampling, accountant, population)
    achieved = epsilon_for(z, q, rounds, delta, sampling, accountant, population)
    assert achieved <= target
    assert achieved == pytest.approx(target, rel=0.01)
    # minimal: slightly less noise would overshoot the target
    assert epsilon_for(z * (1 - 2e-3), q, rounds, delta, sampling, accountant, population) > target


def test_unreachable_and_invalid_plans_fail_clearly():
    with pytest.raises(ValueError, match="unreachable: even noise_multiplier=1000"):
        plan_noise_multiplier(1e-3, 1e-5, 0.01, 100)
    with pytest.raises(ValueError, match="target_epsilon must be"):
        plan_noise_multiplier(0.0, 1e-5, 0.01, 100)
    with pytest.raises(ValueError, match="needs population"):
        plan_noise_multiplier(1.0, 1e-5, 0.1, 10, sampling="fixed")
    with pytest.raises(ValueError, match="whole number of clients"):
        epsilon_for(1.0, 0.15, 10, 1e-5, sampling="fixed", population=10)
    with pytest.raises(ValueError, match=r"rounds \(T\)"):
        epsilon_for(1.0, 0.1, 0, 1e-5)
    with pytest.raises(ValueError, match=r"sample_rate \(q\) must be in \(0, 1\]"):
        epsilon_for(1.0, 1.5, 10, 1e-5)


def test_guard_stops_before_the_round_that_would_exceed():
    mechanism = SampledGaussian.poisson(1.0, 0.05)
    target = epsilon_for(1.0, 0.05, 10, 1e-5) * (1 + 1e-9)  # exactly ten rounds fit
    guard = BudgetGuard(target, 1e-5, "rdp")
    released = 0
    with pytest.raises(PrivacyBudgetExceeded) as stop:
        for server_round in range(1, 100):
            guard.check(mechanism, server_round)
            guard.record(mechanism)
            released += 1
    assert released == 10
    assert guard.spent <= target
    message = str(stop.value)
    assert "round 11 would raise epsilon" in message and "stopping before it" in message
    assert guard.would_exceed(mechanism) and len(guard.accountant) == 10  # asking does not compose


def test_guard_resumes_from_a_ledger_with_the_aggregators_next_release(tmp_path):
    spec = DpSpec(mode="clip", noise_multiplier=1.2, target_epsilon=2.0)
    population = 200
    dp = CentralDpAggregator(spec, PoissonSampler(0.05), population=population, seed=0)
    ledger = PrivacyLedger.for_run(tmp_path)
    rng = np.random.default_rng(1)
    guard = BudgetGuard(spec.target_epsilon, spec.delta, ledger.accountant(spec.accountant))
    server_round = 0
    while not guard.would_exceed(dp.next_mechanism()):
        server_round += 1
        cohort = dp.sampler.sample(population, rng)
        result = dp.release({"w": np.zeros(3, np.float32)}, cohort, server_round)
        ledger.append(result.event)
        guard.record(result.event)
    resumed = BudgetGuard(
        spec.target_epsilon, spec.delta, PrivacyLedger.for_run(tmp_path).accountant("rdp")
    )
    assert resumed.spent == pytest.approx(guard.spent) and resumed.spent <= spec.target_epsilon
    assert resumed.would_exceed(dp.next_mechanism())
    assert (
        epsilon_for(1.2, 0.05, server_round + 1, spec.delta)
        > spec.target_epsilon
        >= epsilon_for(1.2, 0.05, server_round, spec.delta)
    )


def test_guard_rejects_bad_settings():
    with pytest.raises(ValueError, match="target_epsilon"):
        BudgetGuard(0.0, 1e-5)
    with pytest.raises(ValueError, match="delta"):
        BudgetGuard(1.0, 1.0, RdpAccountant())
