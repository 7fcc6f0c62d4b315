"""Client state stores, and error-feedback memory persisting per client through the real ClientApp.

The end-to-end tests run the real ClientApp on the in-process grid with ``codec=topk`` and
partial participation, record every client's state around each of its train calls, and check
that (a) a client starts each round from exactly the state it left in its previous round, however
many rounds it sat out, and (b) per client, Σ decoded updates + final memory = Σ raw deltas, the
error-feedback identity, which breaks by exactly the lost residual if memory is dropped.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from flwr.app import Context, Message, MessageType, RecordDict

from fedclient.client_app import app as client_app
from fedclient.components import data_spec, federated_data, local_training, new_model
from fedclient.pipeline import client_update
from fedclient.state import ContextStateStore, DirectoryStateStore, state_store
from fedclient.training import as_tensors, get_params, seeded_generator
from fedserver.config import parse_run_config
from strategies import wire
from strategies.factory import build_codec_for, build_strategy
from strategies.strategy import to_params
from strategies.sync_driver import run_sync
from tests.support.inprocess_grid import InProcessGrid


def _sample_state() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "ef/1.weight": rng.normal(size=(4, 3)).astype(np.float32),
        "ef/0.bias": rng.normal(size=5).astype(np.float32),
        "dp/steps": np.array(7, dtype=np.int64),  # a 0-d counter must stay 0-d
        "dp/rdp": rng.random(6),  # float64 stays float64
    }


def _assert_same_state(got: dict, expected: dict) -> None:
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        assert got[key].dtype == value.dtype, key
        assert got[key].shape == value.shape, key
        np.testing.assert_array_equal(got[key], value, err_msg=key)


def _context(node_config: dict | None = None) -> Context:
    return Context(
        run_id=5, node_id=1, node_config=node_config or {}, state=RecordDict(), run_config={}
    )


@pytest.mark.parametrize("kind", ["context", "directory"])
def test_store_round_trips_names_dtypes_shapes_and_values(kind, tmp_path):
    store = (
        ContextStateStore(_context())
        if kind == "context"
        else DirectoryStateStore(tmp_path, "run-a", client_id=3)
    )
    assert store.load() == {}
    state = _sample_state()
    store.save(state)
    _assert_same_state(store.load(), state)
    # A save replaces the whole state: keys that are gone stay gone.
    smaller = {"ef/0.bias": np.zeros(5, np.float32)}
    store.save(smaller)
    _assert_same_state(store.load(), smaller)


def test_directory_store_survives_a_restart_and_keeps_clients_and_runs_apart(tmp_path):
    state = _sample_state()
    DirectoryStateStore(tmp_path, "run-a", client_id=3).save(state)
    # A new store object, as after a SuperNode restart, reads it back.
    _assert_same_state(DirectoryStateStore(tmp_path, "run-a", client_id=3).load(), state)
    assert DirectoryStateStore(tmp_path, "run-a", client_id=4).load() == {}
    assert DirectoryStateStore(tmp_path, "run-b", client_id=3).load() == {}
    # The write is atomic (temporary file + rename): nothing but the state file is left.
    assert [p.name for p in (tmp_path / "run-a").iterdir()] == ["client-3.npz"]


def test_state_store_picks_the_node_directory_then_the_run_directory_then_context(tmp_path):
    node_dir, run_dir = tmp_path / "node", tmp_path / "run"
    store = state_store(_context({"state-dir": str(node_dir)}), 2, "r", str(run_dir))
    assert isinstance(store, DirectoryStateStore)
    assert store.path.is_relative_to(node_dir)
    store = state_store(_context(), 2, "r", str(run_dir))
    assert isinstance(store, DirectoryStateStore)
    assert store.path.is_relative_to(run_dir)
    assert isinstance(state_store(_context(), 2, "r", ""), ContextStateStore)


# --- end to end through the ClientApp ---------------------------------------------------------

NUM_NODES, PER_ROUND, ROUNDS = 4, 2, 7
RUN = {
    "device": "cpu",
    "model": "logreg",
    "codec": "topk",
    "topk-ratio": 0.05,
    "error-feedback": True,
    "clients-per-round": PER_ROUND,
    "local-steps": 2,
    "batch-size": 16,
    "lr": 0.1,
    "momentum": 0.0,
    "run-name": "ef-persistence",
}


class RecordingApp:
    """Runs the real ClientApp and records each train call's state before and after it."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def __call__(self, msg: Message, context: Context) -> Message:
        if msg.metadata.message_type != MessageType.TRAIN:
            return client_app(msg, context)
        client = int(context.node_config["partition-id"])
        store = state_store(context, client, RUN["run-name"], "")
        before = store.load()
        reply = client_app(msg, context)
        assert not reply.has_error(), reply.error.reason
        self.calls.append(
            {
                "round": int(msg.content[wire.CONFIG]["server-round"]),
                "client": client,
                "sent": to_params(msg.content[wire.ARRAYS]),
                "reply": reply,
                "before": before,
                "after": store.load(),
            }
        )
        return reply


def _grid(app: RecordingApp, state_dir: str | None) -> InProcessGrid:
    node_configs = [
        {"partition-id": i, "num-partitions": NUM_NODES}
        | ({"state-dir": f"{state_dir}/node-{i}"} if state_dir else {})
        for i in range(NUM_NODES)
    ]
    return InProcessGrid(app, NUM_NODES, run_config=RUN, node_configs=node_configs)


def _check_persistence(calls: list[dict]) -> None:
    cfg = parse_run_config(RUN)
    codec = build_codec_for(cfg)
    data = federated_data(data_spec(cfg), NUM_NODES)
    model = new_model(cfg, data.input_shape, data.num_classes)
    rounds_of: dict[int, list[int]] = {}
    for client in range(NUM_NODES):
        own = [c for c in calls if c["client"] == client]
        rounds_of[client] = [c["round"] for c in own]
        if not own:
            continue
        assert own[0]["before"] == {}
        for previous, current in itertools.pairwise(own):
            _assert_same_state(current["before"], previous["after"])
        # Error-feedback identity over this client's rounds: Σ decoded + memory = Σ raw delta.
        x, y = as_tensors(data.partition(client).x, data.partition(client).y, "cpu")
        decoded_sum = raw_sum = None
        for call in own:
            raw = client_update(
                model, call["sent"], x, y, local_training(cfg),
                seeded_generator(cfg.seed, call["round"], client),
            ).payload
            content = call["reply"].content
            decoded = codec.decode(
                {k: v.numpy() for k, v in content[wire.UPDATE].items()},
                dict(content[wire.CODEC]),
                {k: (v.shape, v.dtype) for k, v in raw.items()},
            )
            decoded_sum = decoded if decoded_sum is None else {
                k: decoded_sum[k] + decoded[k] for k in decoded
            }
            raw_sum = raw if raw_sum is None else {k: raw_sum[k] + raw[k] for k in raw}
        memory = own[-1]["after"]
        assert sorted(memory) == sorted(f"ef/{k}" for k in raw_sum)
        assert any(np.abs(v).max() > 1e-4 for v in memory.values())  # top-5% drops a lot
        for k in raw_sum:
            np.testing.assert_allclose(
                decoded_sum[k] + memory[f"ef/{k}"], raw_sum[k], rtol=1e-5, atol=1e-6
            )
    # The schedule really has clients that sat out rounds between two participations.
    gaps = [b - a for r in rounds_of.values() for a, b in itertools.pairwise(r)]
    assert max(gaps) >= 2, rounds_of


def _initial_params():
    cfg = parse_run_config(RUN)
    data = federated_data(data_spec(cfg), NUM_NODES)
    return cfg, get_params(new_model(cfg, data.input_shape, data.num_classes))


def test_memory_persists_in_context_state_across_skipped_rounds():
    cfg, params = _initial_params()
    app = RecordingApp()
    run_sync(_grid(app, None), build_strategy(cfg), params, num_rounds=ROUNDS)
    assert len(app.calls) == ROUNDS * PER_ROUND
    _check_persistence(app.calls)


def test_memory_persists_in_a_state_directory_across_skipped_rounds_and_a_restart(tmp_path):
    cfg, params = _initial_params()
    strategy = build_strategy(cfg)
    app = RecordingApp()
    params = run_sync(_grid(app, str(tmp_path)), strategy, params, num_rounds=3)
    # Every SuperNode restarts: new contexts with empty context.state, same state directories.
    run_sync(_grid(app, str(tmp_path)), strategy, params, num_rounds=ROUNDS, start_round=4)
    _check_persistence(app.calls)
    files = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("client-?.npz"))
    participants = sorted({c["client"] for c in app.calls})
    assert files == [f"node-{i}/ef-persistence/client-{i}.npz" for i in participants]


@pytest.mark.parametrize("kind", ["directory", "context"])
def test_a_rerun_round_starts_from_the_state_before_it(tmp_path, kind):
    """Retried or resumed rounds must not see the state their first attempt wrote."""
    from fedclient.state import ContextStateStore, DirectoryStateStore

    if kind == "directory":
        store = DirectoryStateStore(tmp_path, "run", 7)
    else:
        store = ContextStateStore(Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={}))
    assert store.load(1) == {}
    store.save({"ef/w": np.full(3, 1.0, np.float32)}, server_round=1)
    store.save({"ef/w": np.full(3, 2.0, np.float32)}, server_round=4)
    assert store.load(4)["ef/w"][0] == 1.0  # round 4 again: what round 1 left
    assert store.load(5)["ef/w"][0] == 2.0
    store.save({"ef/w": np.full(3, 3.0, np.float32)}, server_round=4)  # the re-run of round 4
    assert store.load(4)["ef/w"][0] == 1.0 and store.load(5)["ef/w"][0] == 3.0
    assert store.load()["ef/w"][0] == 3.0
