"""Tests for privacy/accountants: agreement with dp_accounting/Opacus, analytic sanity, state."""

import json
import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting import dp_event
from dp_accounting.pld import PLDAccountant
from opacus.accountants import PRVAccountant as OpacusPrv
from opacus.accountants import RDPAccountant as OpacusRdp
from scipy import optimize, stats

from privacy.accountants import ACCOUNTANTS, PrvAccountant, RdpAccountant, build_accountant
from privacy.budget import epsilon_for
from privacy.events import SampledGaussian

NR = dp_accounting.NeighboringRelation
SETTINGS = [  # (q, z, T, δ)
    (0.01, 1.0, 1000, 1e-5),
    (0.05, 0.8, 200, 1e-6),
    (0.1, 2.0, 50, 1e-5),
    (0.5, 4.0, 20, 1e-3),
]


def direct(accountant, event, rounds, delta):
    accountant.compose(dp_event.SelfComposedDpEvent(event, rounds))
    return accountant.get_epsilon(delta)


@pytest.mark.parametrize("q, z, rounds, delta", SETTINGS)
def test_rdp_poisson_matches_dp_accounting_and_opacus(q, z, rounds, delta):
    ours = epsilon_for(z, q, rounds, delta, "poisson", "rdp")
    reference = direct(
        dp_accounting.rdp.RdpAccountant(),
        dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(z)),
        rounds,
        delta,
    )
    assert ours == pytest.approx(reference, rel=1e-3)
    opacus = OpacusRdp()
    opacus.history = [(z, q, rounds)]
    assert ours == pytest.approx(opacus.get_epsilon(delta), rel=1e-3)


@pytest.mark.parametrize("q, z, rounds, delta", SETTINGS[1:3])
def test_rdp_fixed_matches_dp_accounting_sampled_without_replacement(q, z, rounds, delta):
    population = 1000
    m = round(q * population)
    ours = epsilon_for(z, q, rounds, delta, "fixed", "rdp", population)
    event = dp_event.SampledWithoutReplacementDpEvent(
        population, m, dp_event.GaussianDpEvent(z / 2)
    )
    reference = direct(
        dp_accounting.rdp.RdpAccountant(neighboring_relation=NR.REPLACE_ONE), event, rounds, delta
    )
    assert ours == pytest.approx(reference, rel=1e-3)


@pytest.mark.parametrize("q, z, rounds, delta", [(0.01, 1.0, 300, 1e-5), (0.1, 2.0, 50, 1e-5)])
def test_prv_matches_dp_accounting_pld_and_opacus_prv(q, z, rounds, delta):
    ours = epsilon_for(z, q, rounds, delta, "poisson", "prv")
    reference = direct(
        PLDAccountant(),
        dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(z)),
        rounds,
        delta,
    )
    assert ours == pytest.approx(reference, rel=1e-3)
    opacus = OpacusPrv()  # independent implementation (Gopi et al. PRV), eps_error 0.01
    opacus.history = [(z, q, rounds)]
    assert ours == pytest.approx(opacus.get_epsilon(delta), rel=0.03)
    assert ours < epsilon_for(z, q, rounds, delta, "poisson", "rdp")  # PLD is tighter than RDP


def analytic_rdp_epsilon(rdp_of_order, delta):
    """min over dp_accounting's orders of the Balle et al. (2020) RDP → (ε, δ) conversion."""
    orders = np.array(
        [a for a in dp_accounting.rdp.rdp_privacy_accountant.DEFAULT_RDP_ORDERS if a > 1.01]
    )
    return float(
        np.min(rdp_of_order(orders) + np.log1p(-1 / orders) - np.log(delta * orders) / (orders - 1))
    )


def gaussian_epsilon(r, delta):
    """Exact ε at δ of the Gaussian mechanism (Balle & Wang 2018) with ‖μ−μ'‖/σ = r."""

    def excess(eps):
        return (
            stats.norm.cdf(r / 2 - eps / r)
            - math.exp(eps) * stats.norm.cdf(-r / 2 - eps / r)
            - delta
        )

    return optimize.brentq(excess, 1e-9, 100)


@pytest.mark.parametrize("z", [0.7, 1.0, 3.0])
def test_full_participation_single_round_matches_analytic_gaussian(z):
    delta = 1e-5
    # RDP of the Gaussian: α/(2z²) (add/remove, sensitivity C) and α/(2(z/2)²) (replace-one, 2C)
    assert epsilon_for(z, 1.0, 1, delta, "poisson", "rdp") == pytest.approx(
        analytic_rdp_epsilon(lambda a: a / (2 * z**2), delta), rel=1e-6
    )
    assert epsilon_for(z, 1.0, 1, delta, "fixed", "rdp", population=20) == pytest.approx(
        analytic_rdp_epsilon(lambda a: 2 * a / z**2, delta), rel=1e-6
    )
    # the PLD accountant is near-exact for the Gaussian mechanism itself
    assert epsilon_for(z, 1.0, 1, delta, "poisson", "prv") == pytest.approx(
        gaussian_epsilon(1 / z, delta), rel=1e-3
    )
    assert epsilon_for(z, 1.0, 1, delta, "fixed", "prv", population=20) == pytest.approx(
        gaussian_epsilon(2 / z, delta), rel=1e-3
    )


def witness_epsilon(q, z, delta):
    """Exact ε of one fixed-size round on a concrete worst-case pair of datasets (C = 1, σ = z).

    D holds N clients whose updates all equal u (‖u‖ = 1); D' replaces one by −u. Every sampled
    cohort of D sums to m·u; of D' it sums to m·u − 2u when the replaced client is sampled
    (probability q). Up to a shift, the outputs are P = N(0, σ²) and Q = (1−q)N(0, σ²) + qN(−2, σ²)
    along u, so ε must be at least this pair's ε in both orders.
    """
    sigma, mu = z, 2.0

    def delta_remove(
        eps,
    ):  # H_ε(Q‖P): mixture vs Gaussian; region x > x* (shifted to mean +2 by symmetry)
        if math.exp(eps) <= 1 - q:
            return 1.0
        x = sigma**2 / mu * math.log((math.exp(eps) - (1 - q)) / q) + mu / 2
        return (
            (1 - q) * stats.norm.sf(x / sigma)
            + q * stats.norm.sf((x - mu) / sigma)
            - math.exp(eps) * stats.norm.sf(x / sigma)
        )

    def delta_add(eps):  # H_ε(P‖Q): Gaussian vs mixture; region x < x**
        ratio = (math.exp(-eps) - (1 - q)) / q
        if ratio <= 0:
            return 0.0
        x = sigma**2 / mu * math.log(ratio) + mu / 2
        return stats.norm.cdf(x / sigma) - math.exp(eps) * (
            (1 - q) * stats.norm.cdf(x / sigma) + q * stats.norm.cdf((x - mu) / sigma)
        )

    def epsilon_at_delta(profile):
        if profile(1e-9) <= delta:
            return 0.0
        return optimize.brentq(lambda eps: profile(eps) - delta, 1e-9, 50)

    return max(epsilon_at_delta(delta_remove), epsilon_at_delta(delta_add))


@pytest.mark.parametrize("q, z", [(0.1, 1.0), (0.05, 0.8)])
def test_fixed_size_accounting_is_not_below_a_concrete_attack(q, z):
    delta, population = 1e-5, 100
    witness = witness_epsilon(q, z, delta)
    prv = epsilon_for(z, q, 1, delta, "fixed", "prv", population)
    rdp = epsilon_for(z, q, 1, delta, "fixed", "rdp", population)
    assert witness <= prv * (1 + 1e-6) and prv <= rdp
    assert prv == pytest.approx(witness, rel=0.01)  # and the PLD pair is the tight one
    # dp_accounting's REPLACE_ONE sampled-Gaussian pair would under-report ε for fixed-size cohorts
    naive = direct(
        PLDAccountant(NR.REPLACE_ONE, value_discretization_interval=1e-3),
        dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(z)),
        1,
        delta,
    )
    assert naive < 0.95 * witness


@pytest.mark.parametrize("name", ["rdp", "prv"])
@pytest.mark.parametrize("sampling", ["poisson", "fixed"])
def test_epsilon_is_monotone_in_rounds_rate_and_noise(name, sampling):
    population, delta = 200, 1e-5

    def eps(z=1.0, q=0.05, rounds=20):
        return epsilon_for(z, q, rounds, delta, sampling, name, population)

    assert eps(rounds=5) < eps(rounds=20) < eps(rounds=80)
    assert eps(q=0.05) < eps(q=0.2)
    assert eps(z=3.0) < eps(z=1.0)


def test_composing_rounds_one_by_one_equals_self_composition():
    mechanism = SampledGaussian.poisson(1.1, 0.02)
    for name in ACCOUNTANTS:
        one_by_one, at_once = build_accountant(name), build_accountant(name)
        for _ in range(30):
            one_by_one.compose(mechanism)
        at_once.compose(mechanism, 30)
        assert len(one_by_one) == 30
        assert one_by_one.epsilon(1e-5) == at_once.epsilon(1e-5)


def test_heterogeneous_rounds_compose_additively_in_rdp():
    first, second = SampledGaussian.poisson(1.0, 0.01), SampledGaussian.poisson(2.0, 0.05)
    accountant = RdpAccountant()
    accountant.compose(first, 10)
    accountant.compose(second, 5)
    reference = dp_accounting.rdp.RdpAccountant()
    reference.compose(dp_event.SelfComposedDpEvent(first.to_dp_accounting_event(), 10))
    reference.compose(dp_event.SelfComposedDpEvent(second.to_dp_accounting_event(), 5))
    assert accountant.epsilon(1e-5) == pytest.approx(reference.get_epsilon(1e-5), rel=1e-9)


def test_state_dict_round_trips_through_json():
    for name in ACCOUNTANTS:
        accountant = build_accountant(name)
        accountant.compose(SampledGaussian.fixed(1.5, 10, 10), 7)
        accountant.compose(SampledGaussian.fixed(2.0, 10, 10), 3)
        restored = build_accountant(name)
        restored.load_state_dict(json.loads(json.dumps(accountant.state_dict())))
        assert len(restored) == 10
        assert restored.epsilon(1e-5) == accountant.epsilon(1e-5)
    with pytest.raises(ValueError, match="not 'prv'"):
        PrvAccountant().load_state_dict(RdpAccountant().state_dict())


def test_edge_cases_and_errors():
    accountant = RdpAccountant()
    assert accountant.epsilon(1e-5) == 0.0
    accountant.compose(SampledGaussian.poisson(1.0, 0.1))
    with pytest.raises(ValueError, match="adjacency notions differ"):
        accountant.compose(SampledGaussian.fixed(1.0, 10, 1))
    with pytest.raises(ValueError, match=r"delta must be in \(0, 1\)"):
        accountant.epsilon(1.0)
    for name in ACCOUNTANTS:
        non_private = build_accountant(name)
        non_private.compose(SampledGaussian.poisson(0.0, 0.1))
        assert non_private.epsilon(1e-5) == math.inf
    with pytest.raises(ValueError, match="accountant must be one of 'rdp', 'prv'"):
        build_accountant("gdp")


def test_epsilon_curve_matches_prefix_epsilons():
    mechanisms = [SampledGaussian.poisson(1.0, 0.05)] * 6 + [SampledGaussian.poisson(0.8, 0.05)] * 4
    for name in ACCOUNTANTS:
        curve = build_accountant(name).epsilon_curve(mechanisms, 1e-5, at=[1, 6, 10])
        assert [k for k, _ in curve] == [1, 6, 10]
        assert curve[1][1] == pytest.approx(
            epsilon_for(1.0, 0.05, 6, 1e-5, accountant=name), rel=1e-9
        )
        assert curve[0][1] < curve[1][1] < curve[2][1]
    long_run = [SampledGaussian.poisson(1.0, 0.01)] * 1000
    prv_points = [k for k, _ in PrvAccountant().epsilon_curve(long_run[:100], 1e-5)]
    assert len(prv_points) == 50 and prv_points[-1] == 100
    rdp_curve = RdpAccountant().epsilon_curve(long_run, 1e-5)
    assert len(rdp_curve) == 1000
    assert rdp_curve[-1][1] == pytest.approx(epsilon_for(1.0, 0.01, 1000, 1e-5), rel=1e-12)
