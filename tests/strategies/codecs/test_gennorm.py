"""GenNorm moment fit, bin masses and expected quantization error, against scipy and Monte Carlo."""

from __future__ import annotations

import time

import numpy as np
import pytest
from scipy import stats

from strategies.codecs.co3_format import FloatFormat
from strategies.codecs.gennorm import (
    BETA_MAX,
    BETA_MIN,
    bin_masses,
    fit_gennorm,
    moment_ratio,
    quantization_mse,
)


def test_moment_ratio_known_values():
    np.testing.assert_allclose(moment_ratio(1.0), 1 / np.sqrt(2), rtol=1e-12)
    np.testing.assert_allclose(moment_ratio(2.0), np.sqrt(2 / np.pi), rtol=1e-12)
    betas = np.geomspace(BETA_MIN, BETA_MAX, 200)
    assert (np.diff(moment_ratio(betas)) > 0).all()


@pytest.mark.parametrize("beta", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("scale", [1e-4, 3.0])
def test_fit_recovers_shape_and_scale_within_5_percent(beta, scale):
    rng = np.random.default_rng(int(beta * 10))
    x = stats.gennorm.rvs(beta, scale=scale, size=100_000, random_state=rng).astype(np.float32)
    start = time.perf_counter()
    fit = fit_gennorm(x)
    elapsed = time.perf_counter() - start
    assert abs(fit.beta - beta) <= 0.05 * beta
    assert abs(fit.scale - scale) <= 0.05 * scale
    assert elapsed < 0.05  # moment matching: two passes, no iterative likelihood fit


def test_fit_clips_shape_for_degenerate_samples_and_rejects_zero():
    assert fit_gennorm(np.float32([2.0, -2.0, 2.0])).beta == pytest.approx(BETA_MAX)
    assert fit_gennorm(np.float32([5.0])).scale > 0
    for bad in (np.zeros(4, np.float32), np.zeros(0, np.float32)):
        with pytest.raises(ValueError):
            fit_gennorm(bad)


@pytest.mark.parametrize("beta", [0.3, 1.0, 2.0, 6.0])
def test_bin_masses_match_scipy_cdf(beta):
    edges = FloatFormat(2, 1).edges * 0.7
    masses = bin_masses(edges, beta, 1.3)
    cdf = stats.gennorm.cdf(edges, beta, scale=1.3)
    expected = np.diff(np.concatenate([[0.0], cdf, [1.0]]))
    np.testing.assert_allclose(masses, expected, rtol=1e-9, atol=1e-15)
    assert masses.sum() == pytest.approx(1.0, abs=1e-12)


def test_bin_masses_keep_tiny_tail_masses():
    masses = bin_masses(np.array([-20.0, 20.0]), 2.0, 1.0)
    assert masses[0] == masses[2] == pytest.approx(stats.gennorm.sf(20.0, 2.0), rel=1e-9)
    assert 0 < masses[2] < 1e-170


@pytest.mark.parametrize("beta", [0.7, 1.0, 2.0])
def test_quantization_mse_matches_monte_carlo(beta):
    fmt = FloatFormat(2, 1)
    rng = np.random.default_rng(3)
    y = stats.gennorm.rvs(beta, scale=0.8, size=400_000, random_state=rng)
    q = fmt.grid[np.searchsorted(fmt.edges, y)]  # independent: grid search, not the bit trick
    empirical = np.mean((y - q) ** 2)
    exact = quantization_mse(fmt.grid, fmt.edges, beta, 0.8)
    assert exact == pytest.approx(empirical, rel=0.02)
    vectorised = quantization_mse(fmt.grid, fmt.edges, beta, np.array([0.8, 1.6]))
    assert vectorised[0] == pytest.approx(exact, rel=1e-12)
