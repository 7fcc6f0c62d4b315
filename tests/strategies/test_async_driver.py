"""Asynchronous bounded-staleness driver through the real ClientApp: reductions, bounds, bookkeeping, resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from fedclient.client_app import app as client_app
from fedclient.components import data_spec, federated_data, new_model
from fedclient.training import get_params
from fedserver import config as run_config
from fedserver.config import ConfigError, parse_run_config
from simulations.inprocess_grid import InProcessGrid
from strategies import staleness, wire
from strategies.async_driver import ACCEPTED, DROPPED, REJECTED, AsyncDriver
from strategies.factory import build_async_driver, build_strategy, build_virtual_clock
from strategies.staleness import StalenessPolicy
from strategies.strategy import to_arrayrecord, to_params
from strategies.sync_driver import run_sync

BASE = {"device": "cpu", "model": "logreg", "dataset": "digits", "local-steps": 2, "batch-size": 16}


def _setup(overrides: dict, num_nodes: int, grid_cls=InProcessGrid, **grid_kwargs):
    raw = {**BASE, **overrides}
    cfg = parse_run_config(raw)
    grid = grid_cls(client_app, num_nodes, run_config=raw, **grid_kwargs)
    data = federated_data(data_spec(cfg), num_nodes)
    params = get_params(new_model(cfg, data.input_shape, data.num_classes))
    return cfg, grid, params


def _driver(cfg, strategy, clock, **kwargs) -> AsyncDriver:
    policy = StalenessPolicy(cfg.max_staleness, cfg.staleness_weighting, cfg.staleness_exponent)
    return AsyncDriver(
        strategy, concurrency=cfg.concurrency, policy=policy, clock=clock, poll_interval=0.0,
        timeout=30.0, **kwargs,
    )


def _run(overrides: dict, num_nodes: int, num_steps: int, grid_cls=InProcessGrid, **grid_kwargs):
    """A fresh async run; returns (final params, per-report results, driver, strategy)."""
    cfg, grid, params = _setup({"driver": "async", **overrides}, num_nodes, grid_cls, **grid_kwargs)
    strategy = build_strategy(cfg)
    clock = build_virtual_clock(cfg, grid.get_node_ids())
    driver = _driver(cfg, strategy, clock)
    results = []
    final = driver.run(grid, params, num_steps=num_steps, on_round=results.append)
    return final, results, driver, strategy


def _arrivals(results):
    return [a for r in results for a in r.arrivals]


class ScriptedGrid(InProcessGrid):
    """Replies become available one at a time, in a scripted order of dispatch indices."""

    def __init__(self, *args, order, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._order = list(order)

    def pull_messages(self, message_ids):
        for message_id in message_ids:
            msg = self._pending.get(message_id)
            if self._order and msg is not None and msg.content[wire.CONFIG]["server-round"] == self._order[0]:
                self._order.pop(0)
                return super().pull_messages([message_id])
        return []


class ShuffledGrid(InProcessGrid):
    """Each pull returns a random subset of the replies asked for (clients finish in a random real order)."""

    def __init__(self, *args, seed: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._rng = np.random.default_rng(seed)

    def pull_messages(self, message_ids):
        ready = [m for m in message_ids if self._rng.random() < 0.3]
        return super().pull_messages(list(reversed(ready)))


# ---------------------------------------------------------------- reduction to the sync driver


def test_tau0_concurrency1_equals_sync_amsgrad_with_one_client_per_round():
    common = {
        "strategy": "amsgrad", "server-lr": 0.05, "clients-per-round": 1, "concurrency": 1,
        "max-staleness": 0, "straggler-fraction": 0.25, "straggler-slowdown": 4.0,
    }
    rounds, num_nodes = 8, 5
    cfg, sync_grid, start = _setup(common, num_nodes)
    sync_strategy = build_strategy(cfg)
    sync_clock = build_virtual_clock(cfg, sync_grid.get_node_ids())
    sync_times: list[float] = []
    expected = run_sync(
        sync_grid, sync_strategy, start, num_rounds=rounds,
        on_round=lambda r: sync_times.append(sync_clock.advance_round(r.stats.cohort, r.server_round)),
    )

    cfg_async, async_grid, start_async = _setup({**common, "driver": "async"}, num_nodes)
    strategy = build_strategy(cfg_async)
    driver = build_async_driver(
        cfg_async, strategy, build_virtual_clock(cfg_async, async_grid.get_node_ids())
    )
    results = []
    got = driver.run(async_grid, start_async, num_steps=rounds, on_round=results.append)

    assert async_grid.delivered == sync_grid.delivered  # same client each round/step
    assert len(set(sync_grid.delivered)) > 1
    assert not all(np.allclose(got[k], start[k]) for k in start)
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key])
    for key, value in sync_strategy.optimizer.state_dict().items():
        np.testing.assert_array_equal(strategy.optimizer.state_dict()[key], value)
    assert [r.server_round for r in results] == list(range(1, rounds + 1))
    assert [r.sim_time for r in results] == pytest.approx(sync_times, rel=1e-12)
    assert all(a.staleness == 0 and a.outcome == ACCEPTED for a in _arrivals(results))


# ---------------------------------------------------------------- bounded staleness


@pytest.mark.parametrize("weighting", ["constant", "polynomial"])
def test_no_accepted_update_is_staler_than_tau(weighting):
    tau, steps = 2, 40
    overrides = {
        "strategy": "amsgrad", "server-lr": 0.03, "concurrency": 4, "max-staleness": tau,
        "staleness-weighting": weighting, "staleness-exponent": 0.5,
        "straggler-fraction": 0.25, "straggler-slowdown": 4.0,
    }
    _, results, driver, _ = _run(overrides, num_nodes=8, num_steps=steps)
    arrivals = _arrivals(results)
    accepted = [a for a in arrivals if a.outcome == ACCEPTED]
    dropped = [a for a in arrivals if a.outcome == DROPPED]
    assert max(a.staleness for a in accepted) == tau
    assert dropped and min(a.staleness for a in dropped) > tau  # the bound was exercised
    assert [a.server_step for a in accepted] == list(range(1, steps + 1))
    for a in accepted:
        assert a.version == a.server_step - 1 - a.staleness
        expected_weight = 1.0 if weighting == "constant" else (1.0 + a.staleness) ** -0.5
        assert a.weight == pytest.approx(expected_weight, rel=1e-12)
    for a in dropped:
        assert a.version == a.server_step - a.staleness
    assert driver.totals == {ACCEPTED: steps, DROPPED: len(dropped), REJECTED: 0}

    hist = np.sum([r.staleness_hist for r in results], axis=0)
    assert hist.tolist() == [sum(a.staleness == s for a in accepted) for s in range(tau + 1)] + [len(dropped)]
    assert [r.server_round for r in results] == list(range(4, steps + 1, 4))
    sim_times = [a.sim_time for a in arrivals]
    assert sim_times == sorted(sim_times)
    assert [r.sim_time for r in results] == [r.arrivals[-1].sim_time for r in results]
    busy = [job.node_id for job in driver.in_flight]  # no new job after the last step
    assert len(busy) == len(set(busy)) == 3


# ---------------------------------------------------------------- version bookkeeping


def test_scripted_arrival_order_gives_the_expected_versions_and_deltas():
    """Real arrival order (no virtual clock); replies come back in a scripted dispatch order.

    τ = 2, concurrency 3. Version ids must equal k − τ_k, dispatch 4 (sent at version 1,
    back at version 4) must be dropped, and every applied delta must be measured from the
    model the client was sent, which an independent replay through the ClientApp checks.
    """
    order = [2, 3, 1, 5, 4, 6, 8, 7, 9]
    overrides = {"concurrency": 3, "max-staleness": 2, "virtual-clock": False, "server-lr": 1.0}
    final, results, driver, _ = _run(overrides, num_nodes=5, num_steps=8, grid_cls=ScriptedGrid, order=order)
    table = [(a.dispatch, a.version, a.staleness, a.outcome, a.server_step) for a in _arrivals(results)]
    assert table == [
        (2, 0, 0, ACCEPTED, 1),
        (3, 0, 1, ACCEPTED, 2),
        (1, 0, 2, ACCEPTED, 3),
        (5, 2, 1, ACCEPTED, 4),
        (4, 1, 3, DROPPED, 4),
        (6, 3, 1, ACCEPTED, 5),
        (8, 4, 1, ACCEPTED, 6),
        (7, 4, 2, ACCEPTED, 7),
        (9, 5, 2, ACCEPTED, 8),
    ]
    assert [(j.dispatch, j.version) for j in driver.in_flight] == [(10, 6), (11, 7)]
    assert all(np.isnan(a.sim_time) for a in _arrivals(results))
    assert all(r.sim_time is None and "sim_time" not in r.metrics() for r in results)

    # Replay: x_{k+1} = x_k + (client(x_j) − x_j) with FedAvg at server lr 1.
    _, replay_grid, start = _setup(overrides, num_nodes=5)
    models = [start]
    for a in _arrivals(results):
        if a.outcome != ACCEPTED:
            continue
        sent = models[a.version]
        config = ConfigRecord({"server-round": a.dispatch})
        msg = Message(
            RecordDict({wire.ARRAYS: to_arrayrecord(sent), wire.CONFIG: config}),
            dst_node_id=a.node_id, message_type=MessageType.TRAIN,
        )
        (reply,) = replay_grid.send_and_receive([msg])
        trained_delta = to_params(reply.content[wire.UPDATE])
        models.append({k: models[-1][k] + trained_delta[k] for k in start})
    for key in final:
        np.testing.assert_allclose(final[key], models[-1][key], rtol=0, atol=1e-6)


# ---------------------------------------------------------------- determinism and resume


def test_virtual_clock_order_does_not_depend_on_real_arrival_order():
    overrides = {
        "strategy": "amsgrad", "server-lr": 0.03, "concurrency": 4, "max-staleness": 3,
        "straggler-fraction": 0.25,
    }
    plain, plain_results, _, _ = _run(overrides, num_nodes=8, num_steps=24)
    shuffled, shuffled_results, _, _ = _run(
        overrides, num_nodes=8, num_steps=24, grid_cls=ShuffledGrid, seed=5
    )
    assert _arrivals(shuffled_results) == _arrivals(plain_results)
    for key in plain:
        np.testing.assert_array_equal(shuffled[key], plain[key])


def test_resume_from_a_checkpoint_continues_the_same_trajectory(tmp_path):
    overrides = {
        "strategy": "amsgrad", "server-lr": 0.03, "concurrency": 3, "max-staleness": 1,
        "straggler-fraction": 0.34, "straggler-slowdown": 4.0,
    }
    total, stop = 18, 8

    def fresh():
        cfg, grid, start = _setup({"driver": "async", **overrides}, 6)
        strategy = build_strategy(cfg)
        driver = _driver(cfg, strategy, build_virtual_clock(cfg, grid.get_node_ids()), report_every=2)
        return grid, start, strategy, driver

    grid, start, strategy, driver = fresh()
    full_results = []
    full = driver.run(grid, start, num_steps=total, on_round=full_results.append)

    grid, start, strategy, driver = fresh()
    path = tmp_path / "checkpoint.pt"
    partial_results = []

    def save_and_stop(result):
        partial_results.append(result)
        if result.server_round == stop:
            torch.save(
                {"model": result.params, "strategy": strategy.state_dict(), "driver": driver.state_dict()},
                path,
            )
            return False
        return None

    driver.run(grid, start, num_steps=total, on_round=save_and_stop)
    checkpoint = torch.load(path, weights_only=False)
    doomed = [j for j in checkpoint["driver"]["jobs"] if j["version"] < stop - 1]
    assert doomed, "the checkpoint should hold a job that can only be dropped"

    grid, _, strategy, driver = fresh()
    strategy.load_state_dict(checkpoint["strategy"])
    driver.load_state_dict(checkpoint["driver"])
    resumed_results = []
    resumed = driver.run(grid, checkpoint["model"], num_steps=total, on_round=resumed_results.append)

    for key in full:
        np.testing.assert_array_equal(resumed[key], full[key])
    assert _arrivals(partial_results) + _arrivals(resumed_results) == _arrivals(full_results)
    assert driver.totals == {
        k: sum(a.outcome == k for a in _arrivals(full_results)) for k in (ACCEPTED, DROPPED, REJECTED)
    }


def test_load_state_dict_rejects_inconsistent_states():
    cfg, grid, start = _setup({"driver": "async", "concurrency": 2, "max-staleness": 1}, 3)
    strategy = build_strategy(cfg)
    driver = _driver(cfg, strategy, build_virtual_clock(cfg, grid.get_node_ids()))
    driver.run(grid, start, num_steps=4)
    state = driver.state_dict()
    assert sorted(state["versions"]) == [3, 4]
    gap = {**state, "versions": {2: state["versions"][3], 4: state["versions"][4]}}
    with pytest.raises(ValueError, match="consecutive model versions ending at 4"):
        _driver(cfg, strategy, None).load_state_dict(gap)
    with pytest.raises(ValueError, match="disagree on the virtual clock"):
        _driver(cfg, strategy, None).load_state_dict(state)


# ---------------------------------------------------------------- failures


def test_failing_node_is_rejected_and_training_goes_on():
    def broken(msg, context):
        raise RuntimeError("device unplugged")

    raw = {**BASE, "driver": "async", "concurrency": 3, "max-staleness": 4}
    cfg = parse_run_config(raw)
    grid = InProcessGrid([broken, client_app, client_app, client_app], 4, run_config=raw)
    data = federated_data(data_spec(cfg), 4)
    start = get_params(new_model(cfg, data.input_shape, data.num_classes))
    strategy = build_strategy(cfg)
    driver = _driver(cfg, strategy, build_virtual_clock(cfg, grid.get_node_ids()))
    results = []
    driver.run(grid, start, num_steps=12, on_round=results.append)
    arrivals = _arrivals(results)
    broken_node = min(grid.get_node_ids())
    rejected = [a for a in arrivals if a.outcome == REJECTED]
    assert rejected and all(a.node_id == broken_node for a in rejected)
    assert "device unplugged" in rejected[0].reason
    assert all(a.node_id != broken_node for a in arrivals if a.outcome == ACCEPTED)
    assert sum(r.stats.rejected for r in results) == len(rejected)


# ---------------------------------------------------------------- configuration


def test_config_names_match_the_parts_they_select():
    assert run_config.STALENESS_WEIGHTINGS == staleness.STALENESS_WEIGHTINGS


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"driver": "async", "fraction-evaluate": 0.5}, "'fraction-evaluate' must be 0 with driver='async'"),
        ({"virtual-clock": False, "straggler-fraction": 0.2}, "'straggler-fraction' needs virtual-clock=true"),
        ({"driver": "later"}, "unknown value 'later'"),
        ({"staleness-weighting": "exponential"}, "allowed: constant | polynomial"),
        ({"max-staleness": -1}, "'max-staleness' must be an integer >= 0"),
        ({"straggler-slowdown": 0.5}, "'straggler-slowdown' must be a number >= 1"),
    ],
)
def test_config_rejects_bad_async_settings(overrides, message):
    with pytest.raises(ConfigError, match=message):
        parse_run_config(overrides)
