"""Pollen's ClientApp: trains the global model on this node's data and replies with the update.

The same app runs as a simulated client (``partition-id``/``num-partitions`` in the node
config) and on a real device (``data-path`` in the node config). Everything heavy (config,
data partitions, tensors on the device, the model object) is cached per process, so repeated
rounds do not rebuild it. In the packed layout (``virtual-clients`` > 0) a node is a worker
that hosts many virtual clients; its TRAIN messages go to :mod:`fedclient.packed_worker`.
"""

from __future__ import annotations

import functools
import logging

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedclient.components import cached_model, data_spec, federated_data, local_training
from fedclient.device import pick_device, set_torch_threads
from fedclient.dpsgd_training import DpSgdSpec, with_spent_history
from fedclient.encoding import UpdateEncoder, client_side_dp
from fedclient.faults import FaultPlan
from fedclient.packed_worker import train_share
from fedclient.pipeline import client_update
from fedclient.state import state_store
from fedclient.training import as_tensors, seeded_generator, set_params
from fedclient.training import evaluate as evaluate_model
from fedserver.config import RunConfig, parse_run_config
from simulations.datasets import DataSpec
from strategies import wire
from strategies.client_ids import CLIENT_ID_KEY, CLIENT_ID_QUERY, DESCRIBE_DATA_KEY, QUERY_KEY
from strategies.codecs import build_error_feedback
from strategies.factory import build_codec_for, codec_spec
from strategies.packed_layout import ShareAssignment
from strategies.strategy import CLIENT_INFO, to_arrayrecord, to_params

log = logging.getLogger("pollen")

app = ClientApp()

DATA_INFO = "data-info"
"""Record of a ``query.data_info`` reply: ``input-shape`` and ``num-examples`` of the data."""


@functools.lru_cache(maxsize=8)
def _config(items: tuple) -> RunConfig:
    return parse_run_config(dict(items))


def run_config(context: Context) -> RunConfig:
    return _config(tuple(sorted(context.run_config.items())))


@functools.lru_cache(maxsize=8)
def _encoder(cfg: RunConfig) -> UpdateEncoder:
    codec = build_codec_for(cfg)
    return UpdateEncoder(codec, build_error_feedback(codec_spec(cfg), codec))


def fault_plan(cfg: RunConfig) -> FaultPlan:
    return FaultPlan(
        dropout_rate=cfg.fault_dropout_rate,
        crash_rate=cfg.fault_crash_rate,
        corrupt_rate=cfg.fault_corrupt_rate,
        slow_rate=cfg.fault_slow_rate,
        slow_seconds=cfg.fault_slow_seconds,
        seed=cfg.seed,
    )


def dpsgd_spec(cfg: RunConfig) -> DpSgdSpec | None:
    """This client's DP-SGD settings, or ``None`` without ``dpsgd``; its ε is at ``dp-delta``."""
    if not cfg.dpsgd:
        return None
    return DpSgdSpec(cfg.dpsgd_noise_multiplier, cfg.dpsgd_max_grad_norm, cfg.dp_delta)


def round_transform(round_config: ConfigRecord):
    """This round's pre-encoding transform: client-side DP clipping to the server's current C."""
    if round_config.get("dp-where") != "client":
        return None
    return client_side_dp(float(round_config["dp-clip"]), str(round_config["dp-mode"]))


def client_identity(context: Context) -> tuple[int, int, str]:
    """(client id, number of partitions, data path) for this node.

    Simulation gives ``partition-id``/``num-partitions``; a real device gives ``data-path``
    (and optionally ``partition-id`` for a stable id in logs and seeds).
    """
    node = context.node_config
    data_path = str(node.get("data-path", ""))
    if "partition-id" in node:
        return int(node["partition-id"]), int(node.get("num-partitions", 1)), data_path
    return int(context.node_id % (2**31)), 1, data_path


@functools.lru_cache(maxsize=64)
def _device_tensors(spec, num_partitions: int, partition: int, device: str):
    data = federated_data(spec, num_partitions).partition(partition if not spec.data_path else 0)
    x, y = as_tensors(data.x, data.y, torch.device(device))
    return x, y, data.num_classes


def _data_source(cfg: RunConfig, context: Context) -> tuple[int, DataSpec, int, str]:
    """(client id, data spec, number of partitions, device) of this node's data."""
    client_id, num_partitions, data_path = client_identity(context)
    spec = data_spec(cfg, data_path or None)
    # A node's own `device` (node config) wins over the run's, e.g. a device with broken CUDA.
    device = str(pick_device(str(context.node_config.get("device", cfg.device))))
    return client_id, spec, num_partitions if not spec.data_path else 1, device


def _local_data(cfg: RunConfig, context: Context):
    client_id, spec, num_partitions, device = _data_source(cfg, context)
    try:
        x, y, num_classes = _device_tensors(spec, num_partitions, client_id, device)
    except FileNotFoundError as err:
        if context.node_config.get("data-path") or cfg.dataset != "files":
            raise
        raise FileNotFoundError(
            f"{err} (the run config's data-path: this node has none in its node config; start "
            "its SuperNode with --node-config 'data-path=\"/path/to/data.npz\"')"
        ) from err
    model = cached_model(cfg.model, tuple(x.shape[1:]), num_classes, cfg.hidden_size, device)
    return client_id, x, y, model


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = run_config(context)
    set_torch_threads(cfg.worker_threads, simulated="num-partitions" in context.node_config)
    round_config = msg.content[wire.CONFIG]
    transform = round_transform(round_config)
    if ShareAssignment.from_message(msg) is not None:  # packed layout: this node is a worker
        return train_share(
            msg, context, cfg, encoder=_encoder(cfg), transform=transform,
            faults=fault_plan(cfg), dpsgd=dpsgd_spec(cfg),
        )
    client_id, x, y, model = _local_data(cfg, context)
    server_round = int(round_config.get("server-round", 0))
    sent = to_params(msg.content[wire.ARRAYS])
    faults = fault_plan(cfg)
    fault = faults.decide(server_round, client_id)
    faults.before_training(fault)
    store = state_store(context, client_id, cfg.run_name, cfg.client_state_dir)
    state = store.load(server_round)
    if cfg.dpsgd:  # a re-run round restarts from its old state, but not its privacy spending
        state = with_spent_history(state, store.load())
    outcome = client_update(
        model,
        sent,
        x,
        y,
        local_training(cfg),
        seeded_generator(cfg.seed, server_round, client_id),
        encoder=_encoder(cfg),
        state=state,
        transform=transform,
        dpsgd=dpsgd_spec(cfg),
    )
    store.save(outcome.state, server_round)
    payload = faults.after_training(fault, outcome.payload, server_round, client_id)
    content = RecordDict(
        {
            wire.UPDATE: to_arrayrecord(payload),
            wire.CODEC: ConfigRecord(outcome.header),
            wire.METRICS: MetricRecord(outcome.metrics),
            CLIENT_INFO: ConfigRecord({"device": str(x.device.type)}),
        }
    )
    return Message(content, reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Answers the server's start-up question: which client is this node?"""
    config = msg.content.config_records.get("config", ConfigRecord())
    if config.get(QUERY_KEY) != CLIENT_ID_QUERY:
        raise ValueError(f"unknown query {dict(config)!r}")
    client_id, _, _ = client_identity(context)
    content = RecordDict({wire.METRICS: MetricRecord({CLIENT_ID_KEY: client_id})})
    if config.get(DESCRIBE_DATA_KEY, False):  # the same answer as data_info, in this one reply
        try:
            content[DATA_INFO] = _describe_data(context)
        except Exception as err:  # noqa: BLE001 - the id still counts; the server logs why
            content[DATA_INFO] = ConfigRecord({"error": f"{type(err).__name__}: {err}"})
    return Message(content, reply_to=msg)


@functools.lru_cache(maxsize=64)
def _device_test_tensors(spec, num_partitions: int, partition: int, device: str):
    """This client's own held-out examples on ``device``, or ``None`` (see ``client_test``)."""
    data = federated_data(spec, num_partitions).client_test(partition if not spec.data_path else 0)
    return None if data is None else as_tensors(data.x, data.y, torch.device(device))


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Loss/accuracy of the global model on this client's held-out data, else its training data.

    Held-out where the client has some of its own (a device's hold-out of its file, a
    Synthetic client's test stream); otherwise the training partition — the federated
    objective. ``holdout`` (1 or 0) says which, so the server's example-weighted mean is the
    fraction of evaluated examples that were held out.
    """
    cfg = run_config(context)
    _, x, y, model = _local_data(cfg, context)
    client_id, spec, num_partitions, device = _data_source(cfg, context)
    held_out = _device_test_tensors(spec, num_partitions, client_id, device)
    if held_out is not None:
        x, y = held_out
    set_params(model, to_params(msg.content[wire.ARRAYS]))
    loss, accuracy = evaluate_model(model, x, y)
    metrics = MetricRecord({
        "eval_loss": loss, "accuracy": accuracy, "num-examples": int(x.shape[0]),
        "holdout": int(held_out is not None),
    })
    return Message(RecordDict({wire.METRICS: metrics}), reply_to=msg)


@app.query("data_info")
def data_info(msg: Message, context: Context) -> Message:
    """Describe this node's training data: the shape of one example and the number of examples.

    The ServerApp asks when it holds no data itself (``dataset=files`` without a server-side
    ``data-path``), so that it builds the same model as the nodes. A node whose data cannot be
    loaded raises here, and the server learns which one and why before the first round.
    """
    return Message(RecordDict({DATA_INFO: _describe_data(context)}), reply_to=msg)


def _describe_data(context: Context) -> ConfigRecord:
    """``input-shape`` and ``num-examples`` of this node's training data (raises if unloadable)."""
    _, x, _, _ = _local_data(run_config(context), context)
    return ConfigRecord(
        {"input-shape": [int(d) for d in x.shape[1:]], "num-examples": int(x.shape[0])}
    )
