"""Tests for simulations.synthetic: FedProx Synthetic(alpha, beta) statistics and determinism."""

import numpy as np
import pytest

from simulations.datasets import DataSpec, load_federated
from simulations.synthetic import FEATURE_VARIANCE, NUM_FEATURES, SyntheticFederation


def test_client_data_depend_only_on_seed_and_client_id():
    spec = DataSpec(dataset="synthetic", samples_per_client=30, seed=7)
    small = load_federated(spec, 10, cache_size=1)
    huge = load_federated(spec, 100_000, cache_size=1)
    forward = [small.partition(i) for i in range(10)]
    for i in [9, 3, 0, 3, 7, 1, 2, 8, 6, 5, 4]:  # other order, repeats, evicted cache
        assert np.array_equal(huge.partition(i).x, forward[i].x)
        assert np.array_equal(huge.partition(i).y, forward[i].y)
    assert not np.array_equal(forward[0].x, forward[1].x)
    other_seed = load_federated(DataSpec(dataset="synthetic", samples_per_client=30, seed=8), 10)
    assert not np.array_equal(other_seed.partition(0).x, forward[0].x)


def test_labels_are_the_argmax_of_the_clients_softmax_model():
    federation = SyntheticFederation(alpha=0.5, beta=0.5, seed=1)
    x, y = federation.train_data(4, 500)
    params = federation.distribution(4)
    logits = x.astype(np.float64) @ params.weights + params.bias
    probabilities = np.exp(logits - logits.max(1, keepdims=True))
    probabilities /= probabilities.sum(1, keepdims=True)
    assert x.shape == (500, NUM_FEATURES) and x.dtype == np.float32 and y.dtype == np.int64
    assert np.array_equal(y, probabilities.argmax(1))


def test_inputs_follow_normal_with_mean_v_and_covariance_j_to_the_minus_1_2():
    federation = SyntheticFederation(alpha=1.0, beta=1.0, seed=0)
    params = federation.distribution(2)
    x = params.sample(np.random.default_rng(123), 40_000)[0].astype(np.float64)
    variance = x.var(0)
    assert np.allclose(variance, FEATURE_VARIANCE, rtol=0.04)
    assert np.all(np.abs(x.mean(0) - params.input_mean) < 4 * np.sqrt(FEATURE_VARIANCE / 40_000))
    off_diagonal = np.corrcoef(x[:, :10].T)[np.triu_indices(10, 1)]
    assert np.abs(off_diagonal).max() < 0.03


def test_alpha_and_beta_are_standard_deviations_of_the_client_means():
    federation = SyntheticFederation(alpha=0.5, beta=2.0, seed=0)
    draws = [federation.distribution(k) for k in range(3000)]
    model_means = np.array([d.model_mean for d in draws])
    input_shifts = np.array([d.input_shift for d in draws])
    assert model_means.std() == pytest.approx(0.5, rel=0.05)
    assert input_shifts.std() == pytest.approx(2.0, rel=0.05)
    # W_k, b_k ~ N(u_k, 1) and v_k ~ N(B_k, 1): the entries centre on the client's means.
    weight_offsets = np.array([d.weights.mean() - d.model_mean for d in draws])
    input_offsets = np.array([d.input_mean.mean() - d.input_shift for d in draws])
    assert weight_offsets.std() == pytest.approx(1 / np.sqrt(600), rel=0.1)
    assert input_offsets.std() == pytest.approx(1 / np.sqrt(60), rel=0.1)


def test_beta_adds_label_skew_while_alpha_leaves_the_data_unchanged():
    def mean_majority_share(alpha: float, beta: float) -> float:
        federation = SyntheticFederation(alpha, beta, seed=0)
        return float(np.mean([np.bincount(federation.train_data(k, 200)[1]).max() / 200
                              for k in range(150)]))

    # u_k shifts every logit of client k equally, so labels cannot depend on alpha.
    same_noise = [SyntheticFederation(a, 1.0, seed=3).train_data(5, 100) for a in (0.0, 2.0)]
    assert np.array_equal(same_noise[0][0], same_noise[1][0])
    assert np.array_equal(same_noise[0][1], same_noise[1][1])
    assert mean_majority_share(0.0, 3.0) > mean_majority_share(0.0, 0.0) + 0.04


def test_test_set_is_held_out_from_the_first_hundred_clients():
    spec = DataSpec(dataset="synthetic", samples_per_client=50, test_fraction=0.2, seed=2)
    few, many = load_federated(spec, 30), load_federated(spec, 5000)
    assert len(few.test_set()) == 30 * 10 and len(many.test_set()) == 100 * 10
    assert np.array_equal(many.test_set().x[:300], few.test_set().x)
    federation = SyntheticFederation(1.0, 1.0, seed=2)
    assert np.array_equal(many.test_set().x[990:], federation.test_data(99, 10)[0])
    train_rows = {row.tobytes() for row in many.partition(99).x}
    assert not train_rows & {row.tobytes() for row in many.test_set().x[990:]}


def test_invalid_parameters_are_rejected():
    with pytest.raises(ValueError, match="alpha and beta must be >= 0"):
        SyntheticFederation(alpha=-1.0)
    with pytest.raises(ValueError, match="client_id must be >= 0"):
        SyntheticFederation().train_data(-1, 5)
