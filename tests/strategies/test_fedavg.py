"""FedAvg / Local SGD through the real ClientApp: exactness against centralized references."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from fedclient.client_app import app as client_app
from fedclient.components import data_spec, federated_data, new_model
from fedclient.training import get_params
from fedserver.config import parse_run_config
from strategies.factory import build_strategy
from strategies.sync_driver import run_sync
from tests.support.inprocess_grid import InProcessGrid


def _setup(overrides: dict, num_nodes: int):
    raw = {"device": "cpu", "model": "logreg", "momentum": 0.0, **overrides}
    cfg = parse_run_config(raw)
    grid = InProcessGrid(client_app, num_nodes, run_config=raw)
    data = federated_data(data_spec(cfg), num_nodes)
    model = new_model(cfg, data.input_shape, data.num_classes)
    return cfg, grid, data, model


def _full_batch_steps(model, x, y, lr, steps):
    """Hand-written full-batch gradient descent on cross-entropy (the centralized reference)."""
    model = copy.deepcopy(model).double()
    x = torch.as_tensor(x, dtype=torch.float64)
    y = torch.as_tensor(y, dtype=torch.long)
    for _ in range(steps):
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= lr * p.grad
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def test_one_client_one_full_batch_step_equals_centralized_sgd():
    cfg, grid, data, model = _setup(
        {"clients-per-round": 1, "local-steps": 1, "batch-size": 100_000, "lr": 0.5, "server-lr": 1.0},
        num_nodes=1,
    )
    part = data.partition(0)
    start = get_params(model)
    final = run_sync(grid, build_strategy(cfg), start, num_rounds=1)
    expected = _full_batch_steps(model, part.x, part.y, lr=0.5, steps=1)
    for k in expected:
        np.testing.assert_allclose(final[k], expected[k], rtol=1e-5, atol=1e-6)
    assert not np.allclose(final["1.weight" if "1.weight" in final else next(iter(final))], start[next(iter(start))])


@pytest.mark.parametrize("server_lr", [1.0, 0.5])
def test_local_sgd_matches_reference_loop(server_lr):
    """K full-batch steps on each client, example-weighted averaging, several rounds."""
    num_nodes, steps, lr, rounds = 3, 4, 0.3, 3
    cfg, grid, data, model = _setup(
        {
            "clients-per-round": num_nodes,
            "local-steps": steps,
            "batch-size": 100_000,
            "lr": lr,
            "server-lr": server_lr,
            "partitioner": "dirichlet",
            "dirichlet-alpha": 0.5,
        },
        num_nodes=num_nodes,
    )
    params = get_params(model)
    final = run_sync(grid, build_strategy(cfg), params, num_rounds=rounds)

    reference = {k: v.astype(np.float64) for k, v in params.items()}
    for _ in range(rounds):
        deltas, weights = [], []
        for i in range(num_nodes):
            part = data.partition(i)
            local = copy.deepcopy(model)
            local.load_state_dict({k: torch.as_tensor(v, dtype=torch.float32) for k, v in reference.items()})
            trained = _full_batch_steps(local, part.x, part.y, lr=lr, steps=steps)
            deltas.append({k: trained[k] - reference[k] for k in reference})
            weights.append(len(part))
        total = sum(weights)
        reference = {
            k: reference[k] + server_lr * sum(w * d[k] for d, w in zip(deltas, weights)) / total
            for k in reference
        }
    for k in reference:
        np.testing.assert_allclose(final[k], reference[k], rtol=1e-4, atol=1e-5)
