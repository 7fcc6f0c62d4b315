"""Staleness policy and model-version bookkeeping for the asynchronous driver."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from strategies.server_optimizers import FedAvgOptimizer, Params
from strategies.staleness import STALENESS_WEIGHTINGS, ModelVersions, StalenessPolicy

# ---------------------------------------------------------------- StalenessPolicy


def test_accept_is_inclusive_at_max_staleness():
    policy = StalenessPolicy(max_staleness=3)
    assert [policy.accept(s) for s in range(6)] == [True, True, True, True, False, False]
    assert StalenessPolicy(max_staleness=0).accept(0)
    assert not StalenessPolicy(max_staleness=0).accept(1)


def test_constant_weighting_is_one():
    policy = StalenessPolicy(max_staleness=5)
    assert [policy.weight(s) for s in range(10)] == [1.0] * 10


@pytest.mark.parametrize("exponent", [0.0, 0.5, 1.0, 2.5])
def test_polynomial_weighting(exponent):
    policy = StalenessPolicy(max_staleness=10, weighting="polynomial", exponent=exponent)
    weights = [policy.weight(s) for s in range(11)]
    np.testing.assert_allclose(weights, [(1.0 + s) ** -exponent for s in range(11)], rtol=1e-15)
    assert weights[0] == 1.0
    assert policy.weight(3) == pytest.approx(4.0**-exponent)
    if exponent > 0:
        assert all(a > b for a, b in itertools.pairwise(weights))


def test_negative_staleness_is_a_bug_not_a_rejection():
    policy = StalenessPolicy(max_staleness=2, weighting="polynomial")
    with pytest.raises(ValueError, match="staleness must be >= 0"):
        policy.accept(-1)
    with pytest.raises(ValueError, match="staleness must be >= 0"):
        policy.weight(-1)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"max_staleness": -1}, ValueError, "max_staleness must be >= 0"),
        ({"max_staleness": 1.5}, TypeError, "max_staleness must be an int"),
        ({"max_staleness": True}, TypeError, "max_staleness must be an int"),
        ({"max_staleness": 2, "weighting": "hinge"}, ValueError, "weighting must be one of"),
        ({"max_staleness": 2, "weighting": "polynomial", "exponent": -0.5}, ValueError, "exponent"),
        ({"max_staleness": 2, "exponent": float("inf")}, ValueError, "exponent"),
    ],
)
def test_policy_validation(kwargs, error, message):
    with pytest.raises(error, match=message):
        StalenessPolicy(**kwargs)


def test_unknown_weighting_lists_allowed():
    with pytest.raises(ValueError) as excinfo:
        StalenessPolicy(max_staleness=1, weighting="exponential")
    for name in STALENESS_WEIGHTINGS:
        assert repr(name) in str(excinfo.value)


# ---------------------------------------------------------------- ModelVersions


def params_of(value: float) -> Params:
    return {"w": np.full((2, 3), value, np.float32), "b": np.full(3, -value, np.float32)}


def test_versions_keep_last_max_staleness_plus_one():
    versions = ModelVersions(max_staleness=2)
    with pytest.raises(ValueError, match="no model version"):
        _ = versions.current_version
    ids = [versions.publish(params_of(float(i))) for i in range(6)]
    assert ids == [0, 1, 2, 3, 4, 5]
    assert versions.current_version == 5
    assert versions.held_versions == (3, 4, 5)
    assert 3 in versions and 2 not in versions
    np.testing.assert_array_equal(versions.get(3)["w"], np.full((2, 3), 3.0, np.float32))
    assert versions.staleness(3) == 2
    assert versions.staleness(0) == 5  # still computable after the model was dropped
    with pytest.raises(KeyError, match="staleness 3 exceeds max_staleness 2"):
        versions.get(2)
    with pytest.raises(KeyError, match="never published"):
        versions.get(6)
    with pytest.raises(ValueError, match=r"version must be in \[0, 5\]"):
        versions.staleness(6)


def test_zero_max_staleness_holds_only_current():
    versions = ModelVersions(max_staleness=0)
    for i in range(3):
        versions.publish(params_of(float(i)))
        assert versions.held_versions == (i,)


def test_published_versions_are_frozen_copies():
    versions = ModelVersions(max_staleness=1)
    params = params_of(1.0)
    version = versions.publish(params)
    params["w"][...] = 99.0  # the caller reuses its buffer
    held = versions.get(version)
    np.testing.assert_array_equal(held["w"], np.full((2, 3), 1.0, np.float32))
    with pytest.raises(ValueError, match="read-only"):
        held["w"][0, 0] = 5.0


def test_delta_is_relative_to_the_start_version():
    versions = ModelVersions(max_staleness=3)
    for i in range(3):
        versions.publish(params_of(float(10 * i)))
    client = {"w": np.full((2, 3), 12.5, np.float32), "b": np.full(3, -7.0, np.float64)}
    delta = versions.delta(1, client)  # started from version 1 (w = 10, b = −10)
    np.testing.assert_array_equal(delta["w"], np.full((2, 3), 2.5, np.float32))
    np.testing.assert_array_equal(delta["b"], np.full(3, 3.0, np.float32))
    assert delta["b"].dtype == np.float32
    with pytest.raises(ValueError, match="keys"):
        versions.delta(1, {"w": client["w"]})
    with pytest.raises(ValueError, match="shape"):
        versions.delta(1, {**client, "b": np.zeros(4, np.float32)})


def test_versions_validation():
    with pytest.raises(ValueError, match="max_staleness must be >= 0"):
        ModelVersions(-1)
    with pytest.raises(TypeError, match="max_staleness must be an int"):
        ModelVersions(2.0)


# ---------------------------------------------------------------- an asynchronous driver, scripted


def run_async(
    arrival_order: list[int],
    num_workers: int,
    policy: StalenessPolicy,
    worker_updates: list[Params],
) -> tuple[Params, list[dict]]:
    """Apply each arrival immediately (APAM/FedAsync-style) and re-dispatch to that worker.

    Worker ``i`` "trains" by returning ``start + worker_updates[i]``, so the correct delta is
    ``worker_updates[i]`` only if it is measured from the version the worker started from.
    """
    optimizer = FedAvgOptimizer(server_lr=1.0)
    versions = ModelVersions(policy.max_staleness)
    x = {k: np.zeros_like(v) for k, v in worker_updates[0].items()}
    versions.publish(optimizer.send_point(x))
    holding = [versions.current_version] * num_workers  # every worker starts from version 0
    arrivals: list[dict] = []
    for worker in arrival_order:
        started_from = holding[worker]
        server_version = versions.current_version
        staleness = versions.staleness(started_from)
        accepted = policy.accept(staleness)
        arrivals.append(
            {"k": server_version, "version": started_from, "tau": staleness, "accepted": accepted}
        )
        if accepted:
            client = {k: versions.get(started_from)[k] + worker_updates[worker][k] for k in x}
            weight = policy.weight(staleness)
            delta = {k: weight * d for k, d in versions.delta(started_from, client).items()}
            x = optimizer.step(x, delta)
            versions.publish(optimizer.send_point(x))
        assert len(versions.held_versions) <= policy.max_staleness + 1
        holding[worker] = versions.current_version
    return x, arrivals


def test_scripted_arrival_order_bookkeeping():
    """Three workers start from version 0 and arrive B, A, C, A, B, C with τ_max = 1.

    Hand-worked: B(v0)@k0 τ0 ✓→v1; A(v0)@k1 τ1 ✓→v2; C(v0)@k2 τ2 ✗; A(v2)@k2 τ0 ✓→v3;
    B(v1)@k3 τ2 ✗; C(v2)@k3 τ1 ✓→v4.
    """
    a, b, c = 0, 1, 2
    updates = [{"w": np.full(2, 2.0**i, np.float32)} for i in range(3)]  # A: 1, B: 2, C: 4
    policy = StalenessPolicy(max_staleness=1, weighting="polynomial", exponent=1.0)
    x, arrivals = run_async([b, a, c, a, b, c], 3, policy, updates)

    assert [r["tau"] for r in arrivals] == [0, 1, 2, 0, 2, 1]
    assert [r["k"] for r in arrivals] == [0, 1, 2, 2, 3, 3]
    assert [r["accepted"] for r in arrivals] == [True, True, False, True, False, True]
    for r in arrivals:
        assert r["version"] == r["k"] - r["tau"]
    # x = B·1 + A·½ + A·1 + C·½ with weights (1+τ)^-1
    np.testing.assert_array_equal(x["w"], np.full(2, 2.0 + 0.5 + 1.0 + 2.0, np.float32))


@settings(max_examples=60, deadline=None)
@given(
    num_workers=st.integers(1, 6),
    max_staleness=st.integers(0, 4),
    order_seed=st.lists(st.integers(0, 5), min_size=1, max_size=60),
)
def test_no_accepted_update_is_too_stale(num_workers, max_staleness, order_seed):
    order = [i % num_workers for i in order_seed]
    updates = [{"w": np.full(3, float(i + 1), np.float64)} for i in range(num_workers)]
    policy = StalenessPolicy(max_staleness=max_staleness)
    x, arrivals = run_async(order, num_workers, policy, updates)

    accepted = [r for r in arrivals if r["accepted"]]
    assert all(r["tau"] <= max_staleness for r in accepted)
    assert all(r["tau"] > max_staleness for r in arrivals if not r["accepted"])
    assert all(r["version"] == r["k"] - r["tau"] for r in arrivals)
    # Each accepted worker contributed exactly its own update, whatever version it started from.
    expected = sum(float(order[i] + 1) for i, r in enumerate(arrivals) if r["accepted"])
    np.testing.assert_allclose(x["w"], expected, rtol=1e-12)
    if num_workers == 1:  # one worker is always up to date: synchronous, nothing dropped
        assert all(r["tau"] == 0 and r["accepted"] for r in arrivals)
