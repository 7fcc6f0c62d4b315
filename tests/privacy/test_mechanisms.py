"""Tests for privacy/mechanisms.py: norm bounds, sensitivity, noise, adaptive clipping, spec."""

import math

import numpy as np
import pytest
from scipy import stats

from privacy.mechanisms import (
    CentralDpAggregator,
    DpSpec,
    NormBoundExceeded,
    add_gaussian_noise,
    clip_update,
    global_l2_norm,
    normalize_update,
    prepare_client_update,
    split_noise_multiplier,
)
from privacy.sampling import FixedSizeSampler, PoissonSampler


def random_update(rng, scale=1.0):
    return {
        "w": (scale * rng.standard_normal((7, 5))).astype(np.float32),
        "b": (scale * rng.standard_normal(5)).astype(np.float32),
    }


def flat(update):
    return np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in update.values()])


def zeros_like(update):
    return {k: np.zeros_like(v) for k, v in update.items()}


def add(total, update):
    return {k: total[k] + update[k] for k in total}


def test_global_norm_matches_numpy_over_all_arrays():
    rng = np.random.default_rng(0)
    update = random_update(rng, 3.0)
    assert global_l2_norm(update) == pytest.approx(np.linalg.norm(flat(update)), rel=1e-12)


@pytest.mark.parametrize("scale", [1e-6, 1e-2, 1.0, 1e3, 1e6])
def test_normalized_norm_is_exactly_clip(scale):
    rng = np.random.default_rng(1)
    for clip in (0.1, 1.0, 7.5):
        update = random_update(rng, scale)
        normalized, norm = normalize_update(update, clip)
        assert norm == pytest.approx(np.linalg.norm(flat(update)), rel=1e-12)
        assert all(a.dtype == np.float32 for a in normalized.values())
        assert global_l2_norm(normalized) == pytest.approx(clip, rel=1e-6)
        # direction is preserved
        cosine = flat(normalized) @ flat(update) / (np.linalg.norm(flat(normalized)) * norm)
        assert cosine == pytest.approx(1.0, abs=1e-6)


def test_normalize_zero_update_gives_zeros():
    update = {"w": np.zeros((3, 2), np.float32)}
    normalized, norm = normalize_update(update, 2.0)
    assert norm == 0.0
    assert np.array_equal(normalized["w"], np.zeros((3, 2), np.float32))


def test_clip_bounds_long_updates_and_keeps_short_ones_bit_for_bit():
    rng = np.random.default_rng(2)
    for _ in range(50):
        update = random_update(rng, rng.uniform(0.01, 5.0))
        clip = rng.uniform(0.5, 3.0)
        clipped, norm = clip_update(update, clip)
        assert global_l2_norm(clipped) <= clip * (1 + 1e-6)
        if norm <= clip:
            assert all(np.array_equal(clipped[k], update[k]) for k in update)
            assert all(clipped[k] is not update[k] for k in update)
        else:
            assert global_l2_norm(clipped) == pytest.approx(clip, rel=1e-6)


def test_non_finite_updates_and_bad_clip_are_rejected():
    with pytest.raises(ValueError, match="NaN or infinite"):
        clip_update({"w": np.array([np.nan, 1.0], np.float32)}, 1.0)
    with pytest.raises(ValueError, match="clip norm must be"):
        normalize_update({"w": np.ones(2, np.float32)}, 0.0)
    with pytest.raises(ValueError, match="noise std"):
        add_gaussian_noise({"w": np.ones(2, np.float32)}, -1.0, np.random.default_rng())


def aggregator(mode="clip", sampling="poisson", population=100, rate=0.1, z=0.0, seed=0, **spec):
    sampler = (
        PoissonSampler(rate)
        if sampling == "poisson"
        else FixedSizeSampler(round(rate * population))
    )
    dp_spec = DpSpec(mode=mode, noise_multiplier=z, sampling=sampling, **spec)
    return CentralDpAggregator(dp_spec, sampler, population=population, seed=seed)


def average_of(dp, updates, cohort):
    total = zeros_like(updates[0])
    for update in updates:
        total = add(total, dp.prepare(update))
    return dp.release(total, cohort, server_round=1).average


@pytest.mark.parametrize("mode", ["clip", "normalize"])
def test_add_remove_sensitivity_of_average_is_clip_over_m(mode):
    """Poisson / add-or-remove: ‖avg(D) − avg(D')‖ ≤ C/m with the fixed denominator m = q·N."""
    rng = np.random.default_rng(3)
    clip, population, rate = 1.5, 200, 0.05
    m = rate * population
    dp = aggregator(mode, "poisson", population, rate, clip=clip)
    worst = 0.0
    for trial in range(100):
        cohort = dp.sampler.sample(population, rng)
        while len(cohort.members) < 2:
            cohort = dp.sampler.sample(population, rng)
        # tiny and huge updates; the neighbour drops (by symmetry: adds) one random client
        updates = [random_update(rng, rng.choice([0.01, 1.0, 100.0])) for _ in cohort.members]
        dropped = rng.integers(len(updates))
        neighbour = updates[:dropped] + updates[dropped + 1 :]
        difference = flat(average_of(dp, updates, cohort)) - flat(average_of(dp, neighbour, cohort))
        worst = max(worst, np.linalg.norm(difference))
    assert worst <= clip / m * (1 + 1e-6)
    assert worst > 0.5 * clip / m  # the bound is attained up to a constant, not vacuous


def test_replace_one_sensitivity_with_fixed_size_cohorts_is_two_clip_over_m():
    rng = np.random.default_rng(4)
    clip, population, m = 1.0, 50, 10
    dp = aggregator("normalize", "fixed", population, m / population, clip=clip)
    worst = 0.0
    for _ in range(100):
        cohort = dp.sampler.sample(population, rng)
        updates = [random_update(rng) for _ in range(m)]
        replaced = list(updates)
        replaced[0] = {
            k: -v for k, v in updates[0].items()
        }  # the worst replacement: opposite direction
        difference = flat(average_of(dp, updates, cohort)) - flat(average_of(dp, replaced, cohort))
        worst = max(worst, np.linalg.norm(difference))
    assert worst <= 2 * clip / m * (1 + 1e-6)
    assert worst == pytest.approx(2 * clip / m, rel=1e-5)


def test_noise_std_of_average_is_z_clip_over_m_chi_square():
    z, clip, population, rate = 1.3, 0.7, 100, 0.1
    m = rate * population
    dp = aggregator("clip", "poisson", population, rate, z=z, clip=clip, seed=5)
    cohort = dp.sampler.sample(population, np.random.default_rng(6))
    total = {"w": np.zeros((1000, 1000), np.float32)}
    result = dp.release(total, cohort, server_round=1)
    noise = result.average["w"].astype(np.float64).ravel()
    n, sigma = noise.size, z * clip / m
    statistic = np.sum(noise**2) / sigma**2  # ~ χ²(n) when the std is exactly σ and the mean 0
    assert stats.chi2.ppf(0.0005, n) < statistic < stats.chi2.ppf(0.9995, n)
    assert abs(noise.mean()) < 5 * sigma / math.sqrt(n)
    assert np.std(noise) == pytest.approx(sigma, rel=0.01)
    assert result.metrics["dp_noise_std"] == pytest.approx(sigma)


def test_release_event_describes_the_round():
    dp = aggregator("normalize", "fixed", 40, 0.25, z=0.8, clip=2.0)
    cohort = dp.sampler.sample(40, np.random.default_rng(7))
    rng = np.random.default_rng(8)
    total = zeros_like(random_update(rng))
    for _ in range(3):
        total = add(total, dp.prepare(random_update(rng)))
    result = dp.release(total, cohort, server_round=4, participants=(1, 5, 9))
    event = result.event
    assert (event.round, event.sampling, event.population, event.cohort_size) == (
        4,
        "fixed",
        40,
        10,
    )
    assert (event.sample_rate, event.expected_cohort_size, event.clip, event.mode) == (
        0.25,
        10.0,
        2.0,
        "normalize",
    )
    assert event.noise_multiplier == 0.8 and event.participants == (1, 5, 9)
    assert event.mechanism == cohort.mechanism(0.8) == dp.next_mechanism()


def test_release_rejects_inconsistent_rounds():
    dp = aggregator("clip", "fixed", 10, 0.2)
    rng = np.random.default_rng(9)
    cohort = dp.sampler.sample(10, rng)
    total = zeros_like(random_update(rng))
    for _ in range(3):
        dp.prepare(random_update(rng))
    with pytest.raises(ValueError, match="3 updates were prepared for a cohort of 2"):
        dp.release(total, cohort, 1)
    other = aggregator("clip", "poisson", 10, 0.2)
    with pytest.raises(ValueError, match="does not match"):
        other.release(total, cohort, 1)


def run_adaptive_rounds(dp, norms_per_round, rng, dim=6):
    clips = []
    for norms in norms_per_round:
        cohort = dp.sampler.sample(dp.population, rng)
        total = {"w": np.zeros(dim, np.float32)}
        for norm in norms:
            direction = rng.standard_normal(dim)
            update = {"w": (norm * direction / np.linalg.norm(direction)).astype(np.float32)}
            total = add(total, dp.prepare(update))
        dp.release(total, cohort, server_round=len(clips) + 1)
        clips.append(dp.clip)
    return clips


@pytest.mark.parametrize("quantile", [0.5, 0.8])
def test_adaptive_clip_tracks_target_quantile_of_lognormal_norms(quantile):
    rng = np.random.default_rng(10)
    m, mu, s = 100, 0.0, 0.5
    dp = aggregator(
        "clip",
        "fixed",
        1000,
        m / 1000,
        z=0.0,
        clip=0.05,
        adaptive=True,
        target_quantile=quantile,
        clipped_count_stddev=0.0,
    )
    norms = [rng.lognormal(mu, s, size=m) for _ in range(300)]
    clips = run_adaptive_rounds(dp, norms, rng)
    truth = math.exp(mu + s * stats.norm.ppf(quantile))
    settled = math.exp(np.mean(np.log(clips[-100:])))
    assert settled == pytest.approx(truth, rel=0.10)


@pytest.mark.parametrize("quantile, lr", [(0.5, 0.2), (0.9, 0.05)])
def test_adaptive_clip_moves_by_exact_factors(quantile, lr):
    rng = np.random.default_rng(11)
    m = 8
    dp = aggregator(
        "clip",
        "fixed",
        80,
        m / 80,
        clip=1.0,
        adaptive=True,
        target_quantile=quantile,
        clip_lr=lr,
        clipped_count_stddev=0.0,
    )
    clips = run_adaptive_rounds(dp, [np.full(m, 50.0)], rng)  # every update clipped: b̄ = 0
    assert clips[0] == pytest.approx(math.exp(lr * quantile), rel=1e-12)
    clips = run_adaptive_rounds(dp, [np.full(m, 1e-3)], rng)  # none clipped: b̄ = 1
    assert clips[0] == pytest.approx(
        math.exp(lr * quantile) * math.exp(-lr * (1 - quantile)), rel=1e-12
    )


def test_noise_split_for_adaptive_clipping():
    z, stddev = 1.0, 2.0
    expected = (z**-2 - (2 * stddev) ** -2) ** -0.5
    assert split_noise_multiplier(z, stddev) == pytest.approx(expected)
    # composing the two Gaussian queries gives back the accounted multiplier z
    assert (expected**-2 + (2 * stddev) ** -2) ** -0.5 == pytest.approx(z)
    dp = aggregator("clip", "fixed", 1000, 0.1, z=z, adaptive=True)  # σ_b defaults to m/20 = 5
    assert dp.clipped_count_stddev == 5.0
    assert dp.update_noise_multiplier == pytest.approx((1 - 0.01) ** -0.5)
    with pytest.raises(ValueError, match=r"needs m > 10·z"):
        aggregator("clip", "fixed", 100, 0.1, z=1.0, adaptive=True)  # m = 10, σ_b = 0.5, 2σ_b = z


def test_adaptive_noised_count_std_is_sigma_b_over_m():
    rng = np.random.default_rng(12)
    m, stddev, lr, quantile = 10, 3.0, 0.2, 0.5
    fractions = []
    for seed in range(400):
        dp = aggregator(
            "clip",
            "fixed",
            100,
            m / 100,
            z=1.0,
            clip=1.0,
            adaptive=True,
            clipped_count_stddev=stddev,
            clip_lr=lr,
            seed=seed,
        )
        run_adaptive_rounds(dp, [np.full(m, 0.5)], rng, dim=2)  # all unclipped: b̄ = 1
        fractions.append(-math.log(dp.clip) / lr + quantile)
    assert np.mean(fractions) == pytest.approx(1.0, abs=4 * stddev / m / math.sqrt(400))
    assert np.std(fractions) == pytest.approx(stddev / m, rel=0.15)


def test_client_side_mode_verifies_norms_and_needs_bits_when_adaptive():
    rng = np.random.default_rng(13)
    dp = aggregator("normalize", "poisson", 100, 0.1, clip=1.0, where="client")
    client_update, unclipped = prepare_client_update(
        random_update(rng, 10.0), clip=1.0, mode="normalize"
    )
    assert not unclipped
    prepared = dp.prepare(client_update)
    assert global_l2_norm(prepared) <= 1.0
    with pytest.raises(NormBoundExceeded, match="exceeds the clip norm"):
        dp.prepare(random_update(rng, 10.0))
    with pytest.raises(ValueError, match="only used with where='client'"):
        aggregator("clip").prepare(random_update(rng), client_unclipped=True)
    adaptive = aggregator("clip", "fixed", 1000, 0.1, z=1.0, where="client", adaptive=True)
    with pytest.raises(ValueError, match="client_unclipped"):
        adaptive.prepare(client_update)


def test_state_dict_resumes_noise_stream_and_clip():
    rng = np.random.default_rng(14)
    first = aggregator("clip", "fixed", 1000, 0.1, z=1.0, adaptive=True, seed=15)
    run_adaptive_rounds(first, [np.full(100, 5.0)], rng)
    state = first.state_dict()
    second = aggregator("clip", "fixed", 1000, 0.1, z=1.0, adaptive=True, seed=99)
    second.load_state_dict(state)
    assert second.clip == first.clip != 1.0
    cohort = first.sampler.sample(1000, rng)
    total = {"w": np.zeros(50, np.float32)}
    a, b = first.release(total, cohort, 2), second.release(total, cohort, 2)
    assert np.array_equal(a.average["w"], b.average["w"])
    assert a.metrics == b.metrics
    first.prepare({"w": np.ones(50, np.float32)})
    with pytest.raises(RuntimeError, match="mid-round"):
        first.state_dict()


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"clip": 0.0}, "clip"),
        ({"clip": -1.0}, "clip"),
        ({"noise_multiplier": -0.1}, "noise_multiplier"),
        ({"delta": 1.0}, "delta"),
        ({"delta": 0.0}, "delta"),
        ({"mode": "gaussian"}, "mode"),
        ({"where": "edge"}, "where"),
        ({"sampling": "shuffle"}, "sampling"),
        ({"accountant": "gdp"}, "accountant"),
        ({"target_quantile": 1.0}, "target_quantile"),
        ({"clip_lr": 0.0}, "clip_lr"),
        ({"population": -1}, "population"),
        ({"target_epsilon": -1.0}, "target_epsilon"),
        ({"mode": "normalize", "adaptive": True}, "adaptive clipping needs mode='clip'"),
        ({"mode": "clip", "adaptive": True, "clipped_count_stddev": 0.0}, "voids the guarantee"),
    ],
)
def test_spec_validation_names_the_bad_setting(settings, message):
    with pytest.raises(ValueError, match=message):
        DpSpec(**settings).validate()


def test_aggregator_refuses_off_mode_and_mismatched_sampler():
    with pytest.raises(ValueError, match="'off'"):
        CentralDpAggregator(DpSpec(), PoissonSampler(0.1), population=10)
    with pytest.raises(ValueError, match="sampler draws 'fixed'"):
        CentralDpAggregator(DpSpec(mode="clip"), FixedSizeSampler(2), population=10)
