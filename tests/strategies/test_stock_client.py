"""Pollen's strategy as a library: Flower's own ``Strategy.start`` loop with stock-style clients."""

from __future__ import annotations

import numpy as np
from flwr.app import Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from strategies.server_optimizers import ServerOptimizerSpec, build_server_optimizer
from strategies.strategy import PollenStrategy, to_arrayrecord, to_params
from strategies.updates import UpdateLimits
from tests.support.inprocess_grid import InProcessGrid

SHIFT = {0: 0.01, 1: -0.03, 2: 0.05}


def _stock_app(index: int) -> ClientApp:
    """A stock Flower ClientApp: replies with its full model in `arrays` + num-examples."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context) -> Message:
        arrays = msg.content["arrays"].to_numpy_ndarrays()
        keys = list(msg.content["arrays"].keys())
        trained = {k: a + SHIFT[index] for k, a in zip(keys, arrays)}
        reply = RecordDict(
            {
                "arrays": to_arrayrecord(trained),
                "metrics": MetricRecord({"num-examples": index + 1, "train_loss": float(index)}),
            }
        )
        return Message(reply, reply_to=msg)

    return app


def test_strategy_start_with_stock_clients_is_weighted_fedavg():
    grid = InProcessGrid([_stock_app(i) for i in range(3)], 3)
    initial = {"w": np.zeros((2, 3), np.float32), "b": np.ones(3, np.float32)}
    strategy = PollenStrategy(
        optimizer=build_server_optimizer(ServerOptimizerSpec(name="fedavg")),
        clients_per_round=3,
    )
    result = strategy.start(grid=grid, initial_arrays=to_arrayrecord(initial), num_rounds=2)
    final = to_params(result.arrays)
    mean_shift = sum((i + 1) * SHIFT[i] for i in range(3)) / 6.0
    for k, v in initial.items():
        np.testing.assert_allclose(final[k], v + 2 * mean_shift, rtol=1e-6, atol=1e-7)
    metrics = result.train_metrics_clientapp[2]
    assert metrics["clients"] == 3 and metrics["rejected"] == 0
    assert abs(metrics["train_loss"] - (0 * 1 + 1 * 2 + 2 * 3) / 6) < 1e-9
    assert metrics["bytes_up"] > 3 * 9 * 4  # at least the float32 payloads of 3 replies


def _bad_app(kind: str) -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(msg: Message, context) -> Message:
        params = to_params(msg.content["arrays"])
        if kind == "nan":
            params["w"][0, 0] = np.nan
        elif kind == "shape":
            params["w"] = np.zeros((3, 3), np.float32)
        elif kind == "raise":
            raise RuntimeError("client crashed")
        elif kind == "huge":
            params = {k: v + 1e6 for k, v in params.items()}
        elif kind == "oversized":
            params["w"] = np.zeros((2, 3), np.float32)
            params["pad"] = np.zeros(100_000, np.float32)
        elif kind == "good":
            params = {k: v + 1.0 for k, v in params.items()}
        return Message(
            RecordDict({"arrays": to_arrayrecord(params), "metrics": MetricRecord({"num-examples": 5})}),
            reply_to=msg,
        )

    return app


def test_bad_updates_are_rejected_and_the_round_goes_on():
    kinds = ["nan", "shape", "raise", "huge", "oversized", "good"]
    grid = InProcessGrid([_bad_app(k) for k in kinds], len(kinds))
    strategy = PollenStrategy(
        optimizer=build_server_optimizer(ServerOptimizerSpec(name="fedavg")),
        clients_per_round=len(kinds),
        limits=UpdateLimits(max_update_norm=100.0, max_payload_bytes=10_000),
    )
    initial = {"w": np.zeros((2, 3), np.float32)}
    result = strategy.start(grid=grid, initial_arrays=to_arrayrecord(initial), num_rounds=1)
    np.testing.assert_array_equal(to_params(result.arrays)["w"], np.ones((2, 3), np.float32))
    stats = strategy.last_round
    assert stats.clients == 1 and stats.rejected == 4 and stats.failed == 1
    joined = " | ".join(stats.rejections)
    for reason in ("non-finite", "shape", "client crashed", "exceeds max-update-norm", "exceeds the limit"):
        assert reason in joined


def test_too_few_valid_updates_leave_the_model_unchanged():
    grid = InProcessGrid([_bad_app(k) for k in ["nan", "good"]], 2)
    strategy = PollenStrategy(
        optimizer=build_server_optimizer(ServerOptimizerSpec(name="fedavg")),
        clients_per_round=2,
        min_replies=2,
    )
    initial = {"w": np.zeros((2, 3), np.float32)}
    strategy.start(grid=grid, initial_arrays=to_arrayrecord(initial), num_rounds=1)
    np.testing.assert_array_equal(strategy.global_params["w"], initial["w"])
    assert strategy.last_round.clients == 1 and not strategy.last_round.applied
