"""Compressed AMSGrad with error feedback (COMP-AMS / FedCAMS) end to end through the ClientApp.

``strategy=amsgrad`` with a lossy ``codec`` and ``error-feedback=true`` must be exactly FedCAMS:
client i sends ``C(Δ_i + e_i)`` and keeps ``e_i ← Δ_i + e_i − C(Δ_i + e_i)`` (also across rounds
it is not sampled), the server averages what it decodes (weighted by examples, as every Pollen
round) and takes an AMSGrad step ``x ← x + η m / (√v̂ + ε)`` on that average.

The references here are written from those formulas in NumPy: AMSGrad in float64, top-k and
scaled sign on the concatenation of the tensors in sorted-name order. The clients' raw deltas
Δ_i come from re-running their local training (the same seeded generator the ClientApp uses)
from the point the server sent, so compression, error feedback, the wire and the server
optimizer are what is under test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import Context, Message, MessageType

from fedclient.client_app import app as client_app
from fedclient.components import data_spec, federated_data, local_training, new_model
from fedclient.pipeline import client_update
from fedclient.state import state_store
from fedclient.training import as_tensors, get_params, seeded_generator
from fedserver.config import parse_run_config
from strategies import wire
from strategies.factory import build_strategy
from strategies.server_optimizers.adaptive import AMSGradOptimizer
from strategies.strategy import to_params
from strategies.sync_driver import run_sync
from tests.support.inprocess_grid import InProcessGrid

Params = dict[str, np.ndarray]

NUM_NODES = 4
BASE = {
    "device": "cpu",
    "model": "logreg",
    "strategy": "amsgrad",
    "server-lr": 0.05,
    "server-beta1": 0.9,
    "server-beta2": 0.99,
    "server-eps": 1e-3,
    "local-steps": 3,
    "batch-size": 32,
    "lr": 0.1,
    "momentum": 0.0,
    "partitioner": "dirichlet",
    "dirichlet-alpha": 0.5,
    "clients-per-round": 2,
    "run-name": "comp-ams",
}


class ReferenceAMSGrad:
    """AMSGrad on the mean update, float64, no bias correction (FedAMS / Reddi et al. form)."""

    def __init__(self, lr: float, beta1: float, beta2: float, eps: float) -> None:
        self.lr, self.beta1, self.beta2, self.eps = lr, beta1, beta2, eps
        self.m: Params = {}
        self.v: Params = {}
        self.v_hat: Params = {}

    def step(self, x: Params, g: Params) -> Params:
        new = {}
        for k in x:
            m = self.m.get(k, 0.0)
            v = self.v.get(k, 0.0)
            self.m[k] = self.beta1 * m + (1 - self.beta1) * g[k]
            self.v[k] = self.beta2 * v + (1 - self.beta2) * g[k] ** 2
            self.v_hat[k] = np.maximum(self.v_hat.get(k, 0.0), self.v[k])
            new[k] = x[k] + self.lr * self.m[k] / (np.sqrt(self.v_hat[k]) + self.eps)
        return new


def reference_topk(a: Params, ratio: float) -> Params:
    """Keep the ⌈ratio·d⌉ largest |a| over all tensors (sorted-name concatenation)."""
    names = sorted(a)
    flat = np.concatenate([a[k].ravel() for k in names])
    k = max(1, math.ceil(ratio * flat.size))
    kept = np.zeros_like(flat)
    top = np.argsort(-np.abs(flat), kind="stable")[:k]
    kept[top] = flat[top]
    out, start = {}, 0
    for name in names:
        out[name] = kept[start : start + a[name].size].reshape(a[name].shape)
        start += a[name].size
    return out


def reference_sign(a: Params) -> Params:
    """Per tensor: mean|a| · sign(a), with sign(0) = +1."""
    return {
        k: np.float32(np.abs(v.astype(np.float64)).mean()) * np.where(v >= 0, 1, -1).astype(np.float32)
        for k, v in a.items()
    }


class RecordingApp:
    """The real ClientApp; records each train call (round, client, sent point, state after)."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def __call__(self, msg: Message, context: Context) -> Message:
        reply = client_app(msg, context)
        if msg.metadata.message_type == MessageType.TRAIN:
            assert not reply.has_error(), reply.error.reason
            client = int(context.node_config["partition-id"])
            self.calls.append(
                {
                    "round": int(msg.content[wire.CONFIG]["server-round"]),
                    "client": client,
                    "sent": to_params(msg.content[wire.ARRAYS]),
                    "state": state_store(context, client, BASE["run-name"], "").load(),
                }
            )
        return reply


class Clients:
    """The clients' data and a model to recompute their raw deltas Δ_i(x, round)."""

    def __init__(self, cfg) -> None:
        self.cfg = cfg
        data = federated_data(data_spec(cfg), NUM_NODES)
        self.model = new_model(cfg, data.input_shape, data.num_classes)
        self.initial = get_params(self.model)
        self.parts = [data.partition(i) for i in range(NUM_NODES)]
        self.tensors = [as_tensors(p.x, p.y, "cpu") for p in self.parts]

    def raw_delta(self, sent: Params, server_round: int, client: int) -> Params:
        x, y = self.tensors[client]
        generator = seeded_generator(self.cfg.seed, server_round, client)
        return client_update(self.model, sent, x, y, local_training(self.cfg), generator).payload

    def weight(self, client: int) -> float:
        return float(len(self.parts[client]))


def _run(overrides: dict, rounds: int) -> tuple[object, Clients, RecordingApp, Params]:
    raw = {**BASE, **overrides}
    cfg = parse_run_config(raw)
    clients = Clients(cfg)
    app = RecordingApp()
    grid = InProcessGrid(app, NUM_NODES, run_config=raw)
    strategy = build_strategy(cfg)
    assert isinstance(strategy.optimizer, AMSGradOptimizer)
    final = run_sync(grid, strategy, dict(clients.initial), num_rounds=rounds)
    return cfg, clients, app, final


def _weighted_mean(updates: dict[int, Params], clients: Clients) -> Params:
    total = sum(clients.weight(i) for i in updates)
    names = next(iter(updates.values())).keys()
    return {
        k: sum(clients.weight(i) * u[k].astype(np.float64) for i, u in updates.items()) / total
        for k in names
    }


def _reference_optimizer(cfg) -> ReferenceAMSGrad:
    return ReferenceAMSGrad(cfg.server_lr, cfg.server_beta1, cfg.server_beta2, cfg.server_eps)


def _sent_in_round(app: RecordingApp, t: int) -> Params:
    """The point the server sent in round t (its model after round t − 1), checked to be one."""
    sent = [c["sent"] for c in app.calls if c["round"] == t]
    assert all(np.array_equal(s[k], sent[0][k]) for s in sent for k in sent[0])
    return sent[0]


def _cohorts(app: RecordingApp, rounds: int) -> list[list[int]]:
    cohorts = [sorted(c["client"] for c in app.calls if c["round"] == t) for t in range(1, rounds + 1)]
    assert all(len(c) == BASE["clients-per-round"] for c in cohorts)
    return cohorts


@pytest.mark.parametrize(
    "overrides",
    [
        {"codec": "none"},
        # Top-k keeping every coordinate is the identity through the error-feedback path.
        {"codec": "topk", "topk-ratio": 1.0, "error-feedback": True},
    ],
    ids=["none", "topk-all-with-ef"],
)
def test_identity_codec_is_server_amsgrad_on_the_mean_raw_delta(overrides):
    rounds = 6
    cfg, clients, app, final = _run(overrides, rounds)
    optimizer = _reference_optimizer(cfg)
    x = {k: v.astype(np.float64) for k, v in clients.initial.items()}
    for t, cohort in enumerate(_cohorts(app, rounds), start=1):
        sent = {k: v.astype(np.float32) for k, v in x.items()}
        deltas = {i: clients.raw_delta(sent, t, i) for i in cohort}
        x = optimizer.step(x, _weighted_mean(deltas, clients))
    moved = max(float(np.abs(x[k] - clients.initial[k]).max()) for k in x)
    assert moved > 3 * cfg.server_lr  # several AMSGrad steps of size ~η were taken
    for k in x:
        np.testing.assert_allclose(final[k], x[k], rtol=0, atol=3e-7)
    for call in app.calls:  # nothing is lost, so no residual is ever carried
        assert all(not np.any(v) for v in call["state"].values())


@pytest.mark.parametrize(
    "codec, compress, error_feedback",
    [
        ("topk", lambda a: reference_topk(a, 0.05), True),
        ("topk", lambda a: reference_topk(a, 0.05), False),
        ("sign", reference_sign, True),
    ],
    ids=["topk-ef", "topk-no-ef", "sign-ef"],
)
def test_compressed_amsgrad_with_error_feedback_is_fedcams(codec, compress, error_feedback):
    """Each round, from the point the server actually sent: FedCAMS's update and memories."""
    rounds = 7
    cfg, clients, app, final = _run(
        {"codec": codec, "topk-ratio": 0.05, "error-feedback": error_feedback}, rounds
    )
    optimizer = _reference_optimizer(cfg)
    memory: dict[int, Params] = {}
    cohorts = _cohorts(app, rounds)
    sat_out = False
    for t, cohort in enumerate(cohorts, start=1):
        calls = {c["client"]: c for c in app.calls if c["round"] == t}
        sent = _sent_in_round(app, t)
        compressed = {}
        for i in cohort:
            raw = clients.raw_delta(sent, t, i)
            sat_out |= i in memory and i not in cohorts[t - 2]
            a = {k: raw[k] + memory[i][k] for k in raw} if i in memory else raw
            compressed[i] = compress(a)
            if error_feedback:
                memory[i] = {k: a[k] - compressed[i][k] for k in a}
                state = calls[i]["state"]
                assert sorted(state) == sorted(f"ef/{k}" for k in a)
                for k in a:
                    np.testing.assert_allclose(state[f"ef/{k}"], memory[i][k], rtol=1e-6, atol=1e-9)
            else:
                assert calls[i]["state"] == {}
        x_next = optimizer.step(
            {k: v.astype(np.float64) for k, v in sent.items()}, _weighted_mean(compressed, clients)
        )
        actual = _sent_in_round(app, t + 1) if t < rounds else final
        for k in x_next:
            np.testing.assert_allclose(actual[k], x_next[k], rtol=0, atol=1e-7)
    # Memory was carried over at least one round its client was not sampled in.
    assert sat_out or not error_feedback
