"""Tests for privacy/sampling.py: cohorts follow the sampling law their accounting assumes."""

import numpy as np
import pytest
from scipy import stats

from privacy.events import SampledGaussian
from privacy.sampling import FixedSizeSampler, PoissonSampler, build_sampler


def inclusion_counts(sampler, population, rounds, seed):
    rng = np.random.default_rng(seed)
    counts = np.zeros(population)
    sizes = []
    for _ in range(rounds):
        cohort = sampler.sample(population, rng)
        assert np.all(np.diff(cohort.members) > 0) and cohort.members.min(initial=0) >= 0
        assert cohort.members.max(initial=0) < population
        counts[cohort.members] += 1
        sizes.append(len(cohort.members))
    return counts, np.array(sizes)


def test_poisson_clients_join_independently_with_rate_q():
    population, rate, rounds = 200, 0.1, 2000
    counts, sizes = inclusion_counts(PoissonSampler(rate), population, rounds, seed=0)
    # each client's count ~ Binomial(rounds, q); the sum of standardized squares ~ χ²(N)
    expected, var = rounds * rate, rounds * rate * (1 - rate)
    statistic = np.sum((counts - expected) ** 2 / var)
    assert stats.chi2.ppf(0.001, population) < statistic < stats.chi2.ppf(0.999, population)
    # cohort sizes vary like Binomial(N, q)
    assert sizes.mean() == pytest.approx(population * rate, rel=0.02)
    assert sizes.var() == pytest.approx(population * rate * (1 - rate), rel=0.15)


def test_fixed_size_draws_exactly_m_distinct_clients_uniformly():
    population, m, rounds = 50, 7, 3000
    counts, sizes = inclusion_counts(FixedSizeSampler(m), population, rounds, seed=1)
    assert np.all(sizes == m)
    expected = rounds * m / population
    statistic = np.sum((counts - expected) ** 2 / expected)
    assert statistic < stats.chi2.ppf(0.999, population - 1)


def test_cohort_carries_its_accounting_parameters():
    rng = np.random.default_rng(2)
    poisson = PoissonSampler(0.05).sample(400, rng)
    assert (poisson.sampling, poisson.sample_rate, poisson.expected_size) == ("poisson", 0.05, 20.0)
    assert poisson.mechanism(1.1) == SampledGaussian.poisson(1.1, 0.05)
    fixed = FixedSizeSampler(8).sample(40, rng)
    assert (fixed.sampling, fixed.sample_rate, fixed.expected_size) == ("fixed", 0.2, 8.0)
    assert (
        fixed.mechanism(1.1)
        == SampledGaussian.fixed(1.1, 40, 8)
        == FixedSizeSampler(8).mechanism(40, 1.1)
    )


def test_seeded_sampling_is_reproducible():
    a = PoissonSampler(0.3).sample(100, np.random.default_rng(7)).members
    b = PoissonSampler(0.3).sample(100, np.random.default_rng(7)).members
    assert np.array_equal(a, b)


def test_build_sampler_and_errors():
    assert (
        build_sampler("fixed", sample_rate=0.1, population=25).cohort_size == 3
    )  # round(2.5) half up
    assert build_sampler("fixed", sample_rate=0.001, population=25).cohort_size == 1
    assert isinstance(build_sampler("poisson", sample_rate=0.1, population=25), PoissonSampler)
    with pytest.raises(ValueError, match="sampling must be"):
        build_sampler("shuffle", sample_rate=0.1, population=25)
    with pytest.raises(ValueError, match=r"sample_rate must be in \(0, 1\]"):
        PoissonSampler(0.0)
    with pytest.raises(ValueError, match="exceeds the population"):
        FixedSizeSampler(11).sample(10, np.random.default_rng())
