"""Sample-level DP-SGD on clients (``dpsgd=true``) through the real ClientApp.

Checked against independent references: per-example clipping against a NumPy softmax-regression
gradient, the noise std against z·C/B, each client's ε against Opacus's and dp_accounting's RDP
for the steps it really took (across rounds, a state directory and a fresh grid), and the cached
model object against a plain FedAvg round after DP-SGD used it.
"""

from __future__ import annotations

import functools
import json
import math

import dp_accounting
import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant
from scipy import stats

from fedclient.client_app import app as client_app
from fedclient.components import cached_model, data_spec, federated_data, new_model
from fedclient.dpsgd_training import (
    DpSgdSpec,
    history_from_arrays,
    history_to_arrays,
    train_local_dpsgd,
)
from fedclient.training import LocalTraining, get_params
from fedserver.config import parse_run_config
from fedserver.server_app import run_pollen
from strategies.factory import build_strategy
from strategies.sync_driver import run_sync
from tests.support.inprocess_grid import InProcessGrid

BASE = {"device": "cpu", "model": "logreg", "momentum": 0.0, "dataset": "digits"}
FULL_BATCH = {"batch-size": 100_000, "local-steps": 1}  # Poisson rate q = 1: the whole partition



def _one_round(overrides: dict, num_nodes: int = 8):
    """One round, one client; returns (start params, that client's delta, its partition)."""
    raw = {**BASE, **FULL_BATCH, "clients-per-round": 1, **overrides}
    cfg = parse_run_config(raw)
    data = federated_data(data_spec(cfg), num_nodes)
    start = get_params(new_model(cfg, data.input_shape, data.num_classes))
    strategy = build_strategy(cfg)
    final = run_sync(InProcessGrid(client_app, num_nodes, run_config=raw), strategy, start, num_rounds=1)
    (node,) = strategy.last_round.cohort
    delta = {k: final[k].astype(np.float64) - start[k] for k in start}
    return start, delta, data.partition(node - 1001), strategy


def _clipped_mean_gradient(params: dict, x: np.ndarray, y: np.ndarray, clip: float) -> dict:
    """Σ_i min(1, C/‖g_i‖)·g_i / n for softmax regression, per-example gradients in NumPy."""
    w = params["linear.weight"].astype(np.float64)
    b = params["linear.bias"].astype(np.float64)
    features = x.reshape(len(x), -1).astype(np.float64)
    logits = features @ w.T + b
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    residual = p - np.eye(w.shape[0])[y]  # per-example bias gradient
    norms = np.sqrt(np.sum(residual**2, axis=1) * (1 + np.sum(features**2, axis=1)))
    scale = np.minimum(1.0, clip / norms)[:, None]
    return {
        "linear.weight": (scale * residual).T @ features / len(x),
        "linear.bias": (scale * residual).sum(axis=0) / len(x),
        "clipped": float(np.mean(norms > clip)),
    }


def test_dpsgd_step_is_the_mean_of_per_example_clipped_gradients():
    lr, clip = 0.5, 4.0
    start, delta, part, strategy = _one_round(
        {"dpsgd": True, "dpsgd-noise-multiplier": 0.0, "dpsgd-max-grad-norm": clip, "lr": lr}
    )
    reference = _clipped_mean_gradient(start, part.x, part.y, clip)
    assert 0.2 < reference["clipped"] < 1.0  # the bound is active for some examples, not all
    for k in start:
        np.testing.assert_allclose(delta[k], -lr * reference[k], rtol=1e-4, atol=1e-7)
    assert strategy.last_updates[0].metrics["dpsgd_epsilon"] == math.inf  # z = 0: no privacy


def test_dpsgd_noise_std_is_z_c_over_the_expected_batch():
    """Same batch (q = 1), z = 0 vs z > 0: the difference is lr · N(0, (zC)²) / B per coordinate."""
    lr, clip, z = 0.1, 1.0, 0.8
    common = {"model": "mlp", "hidden-size": 128, "lr": lr, "dpsgd": True,
              "dpsgd-max-grad-norm": clip}
    _, plain, part, _ = _one_round({**common, "dpsgd-noise-multiplier": 0.0})
    _, noised, part_noised, _ = _one_round({**common, "dpsgd-noise-multiplier": z})
    assert len(part) == len(part_noised)  # B = n, whichever client was drawn
    noise = np.concatenate([(noised[k] - plain[k]).ravel() for k in plain])
    std = lr * z * clip / len(part)
    statistic = np.sum(noise**2) / std**2  # ~ χ²(n) when the std is right
    assert stats.chi2.ppf(1e-4, noise.size) < statistic < stats.chi2.ppf(1 - 1e-4, noise.size)


@functools.cache
def _dp_accounting_epsilon(z: float, q: float, steps: int, delta: float) -> float:
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), steps
    )
    accountant = dp_accounting.rdp.RdpAccountant()
    accountant.compose(event)
    return accountant.get_epsilon(delta)


def test_each_client_epsilon_accumulates_over_its_rounds_and_reaches_the_metrics_row(tmp_path):
    """Clients report ε for all the steps they took, also after a resume with fresh contexts (the
    history is in client-state-dir); the row's max/mean are over the round's clients; central DP
    runs alongside."""
    num_nodes, batch, steps, z, delta = 4, 30, 3, 1.1, 1e-5
    raw = {
        **BASE, "num-server-rounds": 2, "clients-per-round": 2, "dp-sampling": "fixed",
        "batch-size": batch, "local-steps": steps, "lr": 0.1, "dpsgd": True,
        "dpsgd-noise-multiplier": z, "dpsgd-max-grad-norm": 1.0, "dp-delta": delta,
        "dp": "clip", "dp-noise-multiplier": 0.5, "client-state-dir": str(tmp_path / "clients"),
        "output-dir": str(tmp_path / "runs"), "run-name": "dpsgd",
    }
    run_pollen(InProcessGrid(client_app, num_nodes, run_config=raw), parse_run_config(raw))
    resumed = {**raw, "num-server-rounds": 4, "resume": True}  # a new grid: fresh context.state
    run = run_pollen(
        InProcessGrid(client_app, num_nodes, run_config=resumed), parse_run_config(resumed)
    )

    data = federated_data(data_spec(parse_run_config(raw)), num_nodes)
    ledger = (run.path / "privacy" / "ledger.jsonl").read_text().splitlines()
    cohorts = [json.loads(line)["participants"] for line in ledger]
    rows = run.read_metrics()
    assert len(rows) == len(cohorts) == 4
    joined = dict.fromkeys(range(num_nodes), 0)
    for row, cohort in zip(rows, cohorts):
        epsilons = []
        for node in cohort:
            client = node - 1001
            joined[client] += 1
            q = 1 / math.ceil(len(data.partition(client)) / batch)
            reference = RDPAccountant()
            reference.history = [(z, q, steps * joined[client])]
            epsilons.append(reference.get_epsilon(delta))
            assert epsilons[-1] == pytest.approx(
                _dp_accounting_epsilon(z, q, steps * joined[client], delta), rel=1e-4
            )
        assert row["dpsgd_epsilon_max"] == pytest.approx(max(epsilons), rel=1e-9)
        assert row["dpsgd_epsilon_mean"] == pytest.approx(np.mean(epsilons), rel=1e-9)
        assert row["epsilon"] > 0  # the server's user-level ε is reported alongside
    assert max(joined.values()) >= 2  # some client's ε really composed over several rounds


def test_a_retried_round_keeps_the_privacy_spent_by_its_first_attempt():
    """min-replies is never met, so round 1 runs twice on the same clients: the second attempt
    restarts from the pre-round state, but its ε must count both attempts' steps."""
    num_nodes, batch, steps, z, delta = 3, 40, 2, 1.0, 1e-5
    raw = {
        **BASE, "clients-per-round": num_nodes, "min-replies": num_nodes + 1,
        "short-round": "retry", "max-round-retries": 1, "batch-size": batch,
        "local-steps": steps, "dpsgd": True, "dpsgd-noise-multiplier": z, "dp-delta": delta,
    }
    cfg = parse_run_config(raw)
    data = federated_data(data_spec(cfg), num_nodes)
    strategy = build_strategy(cfg)
    grid = InProcessGrid(client_app, num_nodes, run_config=raw)
    run_sync(grid, strategy, get_params(new_model(cfg, data.input_shape, data.num_classes)),
             num_rounds=1, max_retries=1)
    assert grid.delivered == grid.get_node_ids() * 2 and not strategy.last_round.applied
    for update in strategy.last_updates:  # the second attempt's replies
        q = 1 / math.ceil(len(data.partition(update.node_id - 1001)) / batch)
        reference = RDPAccountant()
        reference.history = [(z, q, 2 * steps)]
        assert update.metrics["dpsgd_epsilon"] == pytest.approx(reference.get_epsilon(delta))


def test_cached_model_is_not_left_wrapped_by_opacus():
    """After DP-SGD on the process-wide cached model, a plain FedAvg round is exact again."""
    num_nodes, lr = 2, 0.5
    overrides = {**FULL_BATCH, "clients-per-round": num_nodes, "lr": lr}
    raw = {**BASE, **overrides, "dpsgd": True}
    cfg = parse_run_config(raw)
    data = federated_data(data_spec(cfg), num_nodes)
    start = get_params(new_model(cfg, data.input_shape, data.num_classes))
    run_sync(InProcessGrid(client_app, num_nodes, run_config=raw), build_strategy(cfg), start,
             num_rounds=1)

    model = cached_model(cfg.model, data.input_shape, data.num_classes, cfg.hidden_size, "cpu")
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
        assert not module._backward_hooks and not module._backward_pre_hooks
    for param in model.parameters():
        assert vars(param) == {} and param.grad is None

    plain_raw = {**BASE, **overrides}
    plain = parse_run_config(plain_raw)
    final = run_sync(InProcessGrid(client_app, num_nodes, run_config=plain_raw),
                     build_strategy(plain), start, num_rounds=1)
    # Full-batch FedAvg with one local step: x - lr · Σ n_i g_i / Σ n_i = x - lr · g(all data).
    parts = [data.partition(i) for i in range(num_nodes)]
    x = np.concatenate([p.x for p in parts])
    y = np.concatenate([p.y for p in parts])
    gradient = _clipped_mean_gradient(start, x, y, clip=math.inf)
    for k in start:
        np.testing.assert_allclose(final[k], start[k] - lr * gradient[k], rtol=1e-4, atol=1e-6)


def test_history_round_trip_and_direct_training():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    x, y = torch.randn(40, 4), torch.randint(0, 3, (40,))
    spec = LocalTraining(epochs=2, batch_size=10, lr=0.1, momentum=0.0)
    dp = DpSgdSpec(noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5)
    result, state, first = train_local_dpsgd(model, x, y, spec, dp, {})
    assert result.steps == 8 and history_from_arrays(state)["history"] == [[1.0, 0.25, 8]]
    _, state, second = train_local_dpsgd(model, x, y, spec, dp, {"ef/w": np.zeros(2), **state})
    assert history_from_arrays(state)["history"] == [[1.0, 0.25, 16]] and second > first
    assert history_to_arrays(history_from_arrays(state)).keys() == state.keys()
    with pytest.raises(ValueError, match="partial DP-SGD history"):
        history_from_arrays({"dpsgd/steps": np.array([3])})
    with pytest.raises(ValueError, match="max_grad_norm must be a finite number > 0"):
        train_local_dpsgd(model, x, y, spec, DpSgdSpec(max_grad_norm=-1.0), {})
