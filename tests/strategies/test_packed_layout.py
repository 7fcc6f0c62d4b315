"""The packed layout: same model as one SuperNode per client, state on the home worker, O(cohort)."""

from __future__ import annotations

import itertools
import shutil
import tracemalloc

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedclient.client_app import app as client_app
from fedclient.components import data_spec, federated_data, new_model
from fedclient.state import DirectoryStateStore
from fedclient.training import get_params
from fedserver.config import ConfigError, parse_run_config
from fedserver.server_app import client_sizes
from privacy.mechanisms import DpSpec
from simulations.plain_loop import plain_fedavg
from strategies import wire
from strategies.aggregation import RunningWeightedSum, weighted_mean
from strategies.codecs import CodecSpec, build_codec
from strategies.factory import build_strategy
from strategies.packed_layout import (
    FAILED,
    OK,
    REJECTED,
    ClientRecord,
    PackedLayout,
    PayloadSizer,
    ShareReport,
    assign_cohort,
)
from strategies.private_aggregation import PrivateAggregation
from strategies.strategy import to_arrayrecord
from strategies.sync_driver import run_sync
from strategies.updates import UpdateRejected
from tests.support.inprocess_grid import InProcessGrid

BASE = {
    "device": "cpu",
    "dataset": "synthetic",
    "samples-per-client": 20,
    "model": "mlp",
    "hidden-size": 16,
    "local-epochs": 1,
    "batch-size": 8,
}
POPULATION, WORKERS = 10, 3



@pytest.fixture(autouse=True)
def _sender_identity():
    """Flower messages read their sender from the process-wide TaskIdentity (as InProcessGrid sets it)."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0


def _run(raw: dict, num_nodes: int, rounds: int):
    cfg = parse_run_config(raw)
    grid = InProcessGrid(client_app, num_nodes, run_config=raw)
    data = federated_data(data_spec(cfg), cfg.virtual_clients or num_nodes)
    model = new_model(cfg, data.input_shape, data.num_classes)
    strategy = build_strategy(cfg, num_examples=client_sizes(cfg, data))
    history = []
    final = run_sync(
        grid, strategy, get_params(model), num_rounds=rounds, on_round=history.append
    )
    return final, history, grid


def _both_layouts(overrides: dict, tmp_path, rounds: int = 3):
    raw = {**BASE, **overrides}
    one = _run({**raw, "client-state-dir": str(tmp_path / "one")}, POPULATION, rounds)
    packed = _run(
        {**raw, "virtual-clients": POPULATION, "client-state-dir": str(tmp_path / "packed")},
        WORKERS,
        rounds,
    )
    return one, packed


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({"clients-per-round": 6}, id="fedavg"),
        pytest.param(
            {"clients-per-round": 4, "codec": "topk", "topk-ratio": 0.05}, id="lossy-codec-with-ef"
        ),
        pytest.param(
            {"clients-per-round": 5, "dp": "clip", "dp-clip": 0.3, "dp-noise-multiplier": 0.5,
             "dp-sampling": "fixed"},
            id="dp-server-clip",
        ),
        pytest.param(
            {"clients-per-round": 5, "dp": "normalize", "dp-where": "client", "dp-clip": 0.2,
             "dp-noise-multiplier": 0.5, "codec": "sign"},
            id="dp-client-normalize-lossy-codec",
        ),
        pytest.param(
            {"clients-per-round": 6, "fault-dropout-rate": 0.2, "fault-corrupt-rate": 0.3,
             "max-update-norm": 50.0},
            id="faults",
        ),
        pytest.param(
            {"clients-per-round": 5, "dataset": "digits", "model": "logreg",
             "partitioner": "dirichlet", "dirichlet-alpha": 0.3},
            id="unequal-partitions",
        ),
    ],
)
def test_both_layouts_train_the_same_clients_to_the_same_model(overrides, tmp_path):
    (one, one_rounds, _), (packed, packed_rounds, _) = _both_layouts(overrides, tmp_path)
    for a, b in zip(one_rounds, packed_rounds, strict=True):
        # Sampled index i is node 1001 + i in the in-process grid, and client i when packed.
        assert [n - 1001 for n in a.stats.cohort] == b.stats.cohort
        assert (a.stats.clients, a.stats.rejected, a.stats.failed) == (
            b.stats.clients, b.stats.rejected, b.stats.failed
        )
        assert a.stats.payload_bytes == b.stats.payload_bytes
        assert a.stats.bytes_down == b.stats.bytes_down
        assert b.stats.train_loss == pytest.approx(a.stats.train_loss, rel=1e-9)
        assert a.stats.privacy_metrics.keys() == b.stats.privacy_metrics.keys()
        # each worker reports the time its share took; one-client replies have none
        assert not a.stats.worker_s and b.stats.worker_s and min(b.stats.worker_s) > 0
    if "fault" in str(overrides):
        assert sum(r.stats.rejected + r.stats.failed for r in one_rounds) > 0
    for name in one:
        np.testing.assert_allclose(packed[name], one[name], rtol=1e-6, atol=1e-7)


def test_client_state_lives_on_the_home_worker_and_carries_over(tmp_path):
    """Error-feedback memory is saved under worker slot ``id mod W`` and used next time."""
    raw = {
        **BASE, "clients-per-round": 6, "codec": "topk", "topk-ratio": 0.05,
        "virtual-clients": POPULATION, "run-name": "ef",
    }
    state_dir = tmp_path / "state"
    final, rounds, _ = _run({**raw, "client-state-dir": str(state_dir)}, WORKERS, 2)
    seen = {c for r in rounds for c in r.stats.cohort}
    for client in range(POPULATION):
        homes = [
            w for w in range(WORKERS)
            if DirectoryStateStore(state_dir / "packed" / f"worker-{w}-of-{WORKERS}", "ef", client).path.exists()
        ]
        assert homes == ([client % WORKERS] if client in seen else [])
    memory = DirectoryStateStore(
        state_dir / "packed" / f"worker-{min(seen) % WORKERS}-of-{WORKERS}", "ef", min(seen)
    ).load()
    assert memory and any(np.abs(v).sum() > 0 for k, v in memory.items() if k.startswith("ef/"))

    # Negative control: the same run with the state wiped after round 1 ends elsewhere,
    # so round 2 really read the memory that round 1 wrote.
    wiped_dir = tmp_path / "wiped"

    def wipe_after_round_one(result):
        if result.server_round == 1:
            shutil.rmtree(wiped_dir)

    cfg = parse_run_config({**raw, "client-state-dir": str(wiped_dir)})
    data = federated_data(data_spec(cfg), POPULATION)
    wiped = run_sync(
        InProcessGrid(client_app, WORKERS, run_config={**raw, "client-state-dir": str(wiped_dir)}),
        build_strategy(cfg),
        get_params(new_model(cfg, data.input_shape, data.num_classes)),
        num_rounds=2,
        on_round=wipe_after_round_one,
    )
    assert set(rounds[0].stats.cohort) & set(rounds[1].stats.cohort), "need a client in both rounds"
    assert any(not np.allclose(final[k], wiped[k]) for k in final)


def _optimal_makespan(sizes: list[int], workers: int) -> int:
    """Brute force over every assignment (tiny cases only): the reference for the LPT bound."""
    best = sum(sizes)
    for choice in itertools.product(range(workers), repeat=len(sizes)):
        loads = [0] * workers
        for size, w in zip(sizes, choice, strict=True):
            loads[w] += size
        best = min(best, max(loads))
    return best


@pytest.mark.parametrize("seed", range(30))
def test_sticky_assignment_is_a_fixed_home_and_balanced_assignment_is_near_optimal(seed):
    rng = np.random.default_rng(seed)
    workers = int(rng.integers(1, 4))
    small = seed % 2 == 0
    size = int(rng.integers(1, 8 if small else 60))
    cohort = sorted(rng.choice(1000, size=size, replace=False).tolist())
    sizes = {c: int(rng.integers(1, 100)) for c in cohort}

    sticky = assign_cohort(cohort, workers, sticky=True)
    assert all(c % workers == w for w, share in enumerate(sticky) for c in share)

    for size_of in (None, sizes.__getitem__):
        shares = assign_cohort(cohort, workers, sticky=False, num_examples=size_of)
        assert sorted(c for share in shares for c in share) == cohort
        weights = [1 if size_of is None else size_of(c) for c in cohort]
        load_of = dict(zip(cohort, weights, strict=True))
        loads = [sum(load_of[c] for c in share) for share in shares]
        # List scheduling: makespan <= mean load + largest job.
        assert max(loads) <= sum(weights) / workers + max(weights)
        if small:  # Graham (1969): LPT <= (4/3 - 1/(3W)) * optimum
            optimum = _optimal_makespan(weights, workers)
            assert max(loads) <= (4 / 3 - 1 / (3 * workers)) * optimum + 1e-9
        if size_of is None:
            assert max(loads) - min(loads) <= 1


class _Nodes:
    """The only part of a Grid that configure_train uses."""

    def __init__(self, ids):
        self.ids = ids

    def get_node_ids(self):
        return list(self.ids)


@pytest.mark.parametrize("dp", [False, True])
def test_building_a_round_for_100k_clients_touches_only_the_cohort(dp):
    population, cohort_size = 100_000, 10
    raw = {**BASE, "virtual-clients": population, "clients-per-round": cohort_size}
    if dp:
        raw.update({"dp": "clip", "dp-sampling": "fixed", "dp-delta": 1e-6})
    strategy = build_strategy(parse_run_config(raw))
    params = {"w": np.zeros((4, 4), np.float32)}
    grid = _Nodes([7, 3])
    strategy.configure_train(1, to_arrayrecord(params), ConfigRecord(), grid)  # set-up, warm-up
    tracemalloc.start()
    messages = list(strategy.configure_train(2, to_arrayrecord(params), ConfigRecord(), grid))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # A list of 100,000 ids alone would take ~800 kB (plus ~2.8 MB of int objects).
    assert peak < 200_000, f"peak allocation {peak} bytes"
    assert sum(len(m.content["packed"]["client-ids"]) for m in messages) == cohort_size


def _report(sent, *, clients, total_weight=None, tamper=None):
    total = RunningWeightedSum()
    for c in clients:
        if c.status == OK:
            total.add({k: np.full_like(v, 0.01) for k, v in sent.items()}, c.num_examples)
    content = ShareReport(clients, total).to_content()
    if tamper is not None:
        tamper(content)
    if total_weight is not None:
        content[wire.METRICS]["total-weight"] = total_weight
    return content


def test_worker_replies_are_validated_before_they_are_merged():
    sent = {"w": np.zeros((3, 2), np.float32), "b": np.zeros(2, np.float32)}
    layout = PackedLayout(10, sticky=False)
    [message] = layout.train_messages([1, 4, 6], [5], RecordDict())
    good = [ClientRecord(1, OK, 3), ClientRecord(4, REJECTED, reason="client 4: bad"),
            ClientRecord(6, FAILED, reason="client 6 failed")]

    def reply(content):
        return Message(content, reply_to=_delivered(message))

    report = layout.read_reply(reply(_report(sent, clients=good)), sent, private=False)
    assert [c.status for c in report.clients] == [OK, REJECTED, FAILED]
    assert report.total.count == 1 and report.total.total_weight == 3
    assert report.clients[1].reason == "client 4: bad"

    def nan_sum(content):
        content["packed-sum"]["w"] = to_arrayrecord({"w": np.full((3, 2), np.nan)})["w"]

    def wrong_shape(content):
        content["packed-sum"]["b"] = to_arrayrecord({"b": np.zeros(3)})["b"]

    bad = {
        "non-finite": _report(sent, clients=good, tamper=nan_sum),
        "shape": _report(sent, clients=good, tamper=wrong_shape),
        "total weight": _report(sent, clients=good, total_weight=30.0),
        "share was": _report(sent, clients=good[:2]),  # a client of the share is missing
    }
    for reason, content in bad.items():
        with pytest.raises(UpdateRejected, match=reason):
            layout.read_reply(reply(content), sent, private=False)


def _delivered(message: Message) -> Message:
    """``message`` as a SuperLink would deliver it (with a message id)."""
    message.metadata.__dict__["_message_id"] = "m0"
    return message


def test_a_dp_batch_longer_than_count_times_c_is_rejected():
    aggregation = PrivateAggregation(
        DpSpec(mode="clip", clip=1.0, noise_multiplier=0.0, sampling="fixed"),
        clients_per_round=3, seed=0,
    )
    aggregation.setup(range(10))
    aggregation.cohort(1)
    ok = {"w": np.array([1.0, 1.0], np.float64)}  # norm 1.41 <= 2 * C
    aggregation.add_batch(ok, count=2, unclipped=1, participants=[1, 2])
    with pytest.raises(UpdateRejected):
        aggregation.add_batch({"w": np.array([3.0, 0.0])}, count=1, unclipped=0, participants=[3])
    average, metrics = aggregation.release(1, ok)
    np.testing.assert_allclose(average["w"], ok["w"] / 3)  # fixed denominator m = 3
    assert metrics["dp_updates"] == 2


@pytest.mark.parametrize("codec", ["none", "fp16", "topk", "sign", "co3"])
def test_payload_sizer_counts_what_a_one_client_reply_carries(codec):
    rng = np.random.default_rng(1)
    delta = {"a.weight": rng.normal(size=(40, 30)).astype(np.float32),
             "a.bias": rng.normal(size=30).astype(np.float32)}
    payload, header, _ = build_codec(CodecSpec(name=codec, topk_ratio=0.1)).encode(delta, {})
    expected = wire.serialized_size(to_arrayrecord(payload)) + wire.serialized_size(
        ConfigRecord(header)
    )
    sizer = PayloadSizer()
    assert sizer(payload, header) == expected
    assert sizer(payload, header) == expected  # from the cached layout


def test_partial_sums_from_workers_merge_to_the_list_aggregation():
    rng = np.random.default_rng(3)
    updates = [{"w": rng.normal(size=(2, 3)).astype(np.float32)} for _ in range(7)]
    weights = [float(w) for w in rng.integers(1, 50, size=7)]
    merged = RunningWeightedSum()
    for share in ([0, 3], [1, 2, 6], [4, 5]):
        part = RunningWeightedSum()
        for i in share:
            part.add(updates[i], weights[i])
        merged.merge(RunningWeightedSum.from_sum(part.sum64(), part.total_weight, part.count))
    np.testing.assert_allclose(merged.mean()["w"], weighted_mean(updates, weights)["w"], rtol=1e-6)
    assert merged.count == 7


def test_config_rules_of_the_packed_layout():
    with pytest.raises(ConfigError, match="clients-per-round"):
        parse_run_config({"virtual-clients": 5, "clients-per-round": 6})
    with pytest.raises(ConfigError, match="fraction-evaluate"):
        parse_run_config({"virtual-clients": 50, "fraction-evaluate": 0.1})
    with pytest.raises(ConfigError, match="driver"):
        parse_run_config({"virtual-clients": 50, "driver": "async"})
    assert parse_run_config({"virtual-clients": 50}).worker_threads == 0  # automatic: 1 thread in simulation
    # A message type routed to the worker carries the share; a one-client message does not.
    layout = PackedLayout(50, sticky=True)
    messages = layout.train_messages([3, 4, 8], [20, 10], RecordDict())
    assert [m.metadata.dst_node_id for m in messages] == [10, 20]
    assert [list(m.content["packed"]["client-ids"]) for m in messages] == [[4, 8], [3]]
    assert all(m.metadata.message_type == MessageType.TRAIN for m in messages)
    assert layout.unanswered([10]) == 1


def test_packed_layout_equals_a_plain_pytorch_fedavg_loop():
    """An independent reference: the framework-free loop of simulations.plain_loop."""
    raw = {**BASE, "virtual-clients": 40, "clients-per-round": 8, "momentum": 0.5, "server-lr": 0.7}
    packed, _, _ = _run(raw, WORKERS, rounds=3)
    plain = plain_fedavg(parse_run_config(raw), num_clients=40, num_rounds=3)
    assert len(plain.round_s) == 3
    for name in packed:
        np.testing.assert_allclose(packed[name], plain.params[name], rtol=1e-6, atol=1e-7)
    # the loop with Pollen's PlainSGD step (the bench's second baseline) is the same loop, bitwise
    lean = plain_fedavg(parse_run_config(raw), num_clients=40, num_rounds=3, sgd="plain")
    for name, value in plain.params.items():
        np.testing.assert_array_equal(lean.params[name], value)
    with pytest.raises(ValueError, match="sgd"):
        plain_fedavg(parse_run_config(raw), num_clients=40, num_rounds=1, sgd="adam")
