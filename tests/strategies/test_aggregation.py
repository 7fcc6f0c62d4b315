"""Running-sum aggregation equals aggregating the full list of updates."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from strategies.aggregation import RunningWeightedSum, WeightedScalars, weighted_mean


@settings(max_examples=50, deadline=None)
@given(
    n=st.integers(1, 12),
    seed=st.integers(0, 2**31 - 1),
)
def test_running_sum_equals_list_aggregation(n, seed):
    rng = np.random.default_rng(seed)
    updates = [{"w": rng.normal(size=(3, 4)).astype(np.float32), "b": rng.normal(size=4).astype(np.float32)} for _ in range(n)]
    weights = list(rng.integers(1, 100, size=n).astype(float))
    running = RunningWeightedSum()
    for u, w in zip(updates, weights):
        running.add(u, w)
    expected = weighted_mean(updates, weights)
    got = running.mean()
    for k in expected:
        np.testing.assert_allclose(got[k], expected[k], rtol=1e-6, atol=1e-7)
    assert running.count == n and running.total_weight == sum(weights)


def test_merge_of_partial_sums_equals_one_sum():
    rng = np.random.default_rng(0)
    updates = [{"w": rng.normal(size=5).astype(np.float32)} for _ in range(6)]
    whole, a, b = RunningWeightedSum(), RunningWeightedSum(), RunningWeightedSum()
    for i, u in enumerate(updates):
        whole.add(u, i + 1)
        (a if i % 2 else b).add(u, i + 1)
    a.merge(b)
    np.testing.assert_allclose(a.mean()["w"], whole.mean()["w"], rtol=1e-7)


def test_mismatched_keys_and_bad_weights_are_errors():
    s = RunningWeightedSum()
    s.add({"w": np.ones(2, np.float32)}, 1.0)
    with pytest.raises(ValueError, match="keys"):
        s.add({"v": np.ones(2, np.float32)}, 1.0)
    with pytest.raises(ValueError, match="weight"):
        s.add({"w": np.ones(2, np.float32)}, float("nan"))


def test_weighted_scalars_ignore_non_finite():
    w = WeightedScalars()
    w.add({"loss": 1.0, "acc": float("nan")}, 1)
    w.add({"loss": 3.0, "acc": 0.5}, 3)
    assert w.means() == {"loss": 2.5, "acc": 0.5}
