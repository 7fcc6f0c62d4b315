"""Virtual clock: seeded per-job durations, exact straggler share, round times and checkpoint state."""

from __future__ import annotations

import math

import numpy as np
import pytest

from strategies.virtual_clock import ClockSpec, VirtualClock, choose_stragglers

NODES = list(range(1001, 1021))


def test_duration_is_a_pure_function_of_seed_node_and_job():
    clock = VirtualClock(ClockSpec(sigma=0.7, straggler_fraction=0.2), seed=3, node_ids=NODES)
    keys = [(node, job) for node in NODES[:5] for job in range(8)]
    forward = [clock.duration(n, j) for n, j in keys]
    backward = [clock.duration(n, j) for n, j in reversed(keys)][::-1]
    assert forward == backward
    other = VirtualClock(ClockSpec(sigma=0.7, straggler_fraction=0.2), seed=3, node_ids=NODES)
    assert [other.duration(n, j) for n, j in keys] == forward
    reseeded = VirtualClock(ClockSpec(sigma=0.7, straggler_fraction=0.2), seed=4, node_ids=NODES)
    assert [reseeded.duration(n, j) for n, j in keys] != forward
    assert len(set(forward)) == len(forward)  # every job gets its own draw


def test_lognormal_durations_have_mean_one_and_log_std_sigma():
    sigma = 0.5
    clock = VirtualClock(ClockSpec(sigma=sigma), seed=0, node_ids=NODES)
    draws = np.array([clock.duration(node, job) for node in NODES for job in range(1000)])
    # E = 1 with std exp(σ²) − 1 ≈ 0.28 per draw: 5 standard errors over 20,000 draws.
    std = math.sqrt(math.exp(sigma**2) - 1)
    assert abs(draws.mean() - 1.0) < 5 * std / math.sqrt(draws.size)
    assert abs(np.log(draws).std() - sigma) < 0.02
    assert abs(np.log(draws).mean() + sigma**2 / 2) < 0.02


def test_stragglers_are_an_exact_share_slowed_by_the_factor():
    spec = ClockSpec(sigma=0.3, straggler_fraction=0.2, straggler_slowdown=5.0)
    clock = VirtualClock(spec, seed=1, node_ids=NODES)
    assert len(clock.stragglers) == 4 and clock.stragglers <= set(NODES)
    plain = VirtualClock(ClockSpec(sigma=0.3), seed=1, node_ids=NODES)
    for node in NODES:
        factor = 5.0 if node in clock.stragglers else 1.0
        for job in range(5):
            assert clock.duration(node, job) == pytest.approx(factor * plain.duration(node, job), rel=1e-12)


def test_no_spread_gives_unit_jobs():
    clock = VirtualClock(ClockSpec(sigma=0.0, straggler_fraction=0.5, straggler_slowdown=3.0), 0, NODES)
    assert sorted({clock.duration(n, 7) for n in NODES}) == [1.0, 3.0]


@pytest.mark.parametrize(("fraction", "count"), [(0.0, 0), (0.1, 2), (0.24, 5), (0.5, 10), (1.0, 20)])
def test_straggler_choice_count_and_order_independence(fraction, count):
    chosen = choose_stragglers(9, NODES, fraction)
    assert len(chosen) == count
    assert choose_stragglers(9, list(reversed(NODES)), fraction) == chosen
    # Nested: a larger share keeps the nodes a smaller share chose.
    assert choose_stragglers(9, NODES, fraction / 2) <= chosen


def test_sync_round_takes_the_slowest_cohort_member_and_time_accumulates():
    clock = VirtualClock(ClockSpec(sigma=0.4, straggler_fraction=0.25), seed=2, node_ids=NODES)
    cohorts = [NODES[:5], NODES[5:12], NODES[12:]]
    expected, now = [], 0.0
    for rnd, cohort in enumerate(cohorts, start=1):
        now += max(clock.duration(n, rnd) for n in cohort)
        expected.append(now)
    assert [clock.advance_round(c, r) for r, c in enumerate(cohorts, start=1)] == pytest.approx(expected)
    assert clock.round_duration([], 4) == 0.0


def test_clock_never_goes_back_and_state_round_trips():
    clock = VirtualClock(ClockSpec(), seed=0, node_ids=NODES)
    clock.advance_to(2.5)
    with pytest.raises(ValueError, match="cannot go back"):
        clock.advance_to(1.0)
    restored = VirtualClock(ClockSpec(), seed=0, node_ids=NODES)
    restored.load_state_dict(clock.state_dict())
    assert restored.now == 2.5
    with pytest.raises(ValueError, match="'now' must be finite and >= 0"):
        restored.load_state_dict({"now": -1.0})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sigma": -0.1}, "sigma must be >= 0"),
        ({"straggler_fraction": 1.5}, r"straggler_fraction must be in \[0, 1\]"),
        ({"straggler_slowdown": 0.5}, "straggler_slowdown must be >= 1"),
        ({"sigma": float("nan")}, "sigma must be finite"),
    ],
)
def test_clock_spec_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ClockSpec(**kwargs)
