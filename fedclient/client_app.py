"""Pollen's ClientApp: trains the global model on this node's data and replies with the update.

The same app runs as a simulated client (``partition-id``/``num-partitions`` in the node
config) and on a real device (``data-path`` in the node config). Everything heavy (config,
data partitions, tensors on the device, the model object) is cached per process, so repeated
rounds do not rebuild it.
"""

from __future__ import annotations

import functools
import logging

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedclient.components import cached_model, data_spec, federated_data, local_training
from fedclient.device import pick_device
from fedclient.encoding import UpdateEncoder, client_side_dp
from fedclient.faults import FaultPlan
from fedclient.pipeline import client_update
from fedclient.state import state_store
from fedclient.training import as_tensors, evaluate as evaluate_model, seeded_generator, set_params
from fedserver.config import RunConfig, parse_run_config
from strategies import wire
from strategies.codecs import build_error_feedback
from strategies.factory import build_codec_for, codec_spec
from strategies.strategy import to_arrayrecord, to_params

log = logging.getLogger("pollen")

app = ClientApp()


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


def _local_data(cfg: RunConfig, context: Context):
    client_id, num_partitions, data_path = client_identity(context)
    spec = data_spec(cfg, data_path or None)
    device = str(pick_device(cfg.device))
    x, y, num_classes = _device_tensors(spec, num_partitions if not spec.data_path else 1, client_id, device)
    model = cached_model(cfg.model, tuple(x.shape[1:]), num_classes, cfg.hidden_size, device)
    return client_id, x, y, model


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = run_config(context)
    client_id, x, y, model = _local_data(cfg, context)
    server_round = int(msg.content[wire.CONFIG].get("server-round", 0))
    round_config = msg.content[wire.CONFIG]
    sent = to_params(msg.content[wire.ARRAYS])
    transform = None
    if round_config.get("dp-where") == "client":
        transform = client_side_dp(float(round_config["dp-clip"]), str(round_config["dp-mode"]))
    faults = fault_plan(cfg)
    fault = faults.decide(server_round, client_id)
    faults.before_training(fault)
    store = state_store(context, client_id, cfg.run_name, cfg.client_state_dir)
    outcome = client_update(
        model,
        sent,
        x,
        y,
        local_training(cfg),
        seeded_generator(cfg.seed, server_round, client_id),
        encoder=_encoder(cfg),
        state=store.load(),
        transform=transform,
    )
    store.save(outcome.state)
    payload = faults.after_training(fault, outcome.payload, server_round, client_id)
    content = RecordDict(
        {
            wire.UPDATE: to_arrayrecord(payload),
            wire.CODEC: ConfigRecord(outcome.header),
            wire.METRICS: MetricRecord(outcome.metrics),
            "client-info": ConfigRecord({"device": str(x.device.type)}),
        }
    )
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Loss/accuracy of the global model on this client's local data (the federated objective)."""
    cfg = run_config(context)
    _, x, y, model = _local_data(cfg, context)
    set_params(model, to_params(msg.content[wire.ARRAYS]))
    loss, accuracy = evaluate_model(model, x, y)
    metrics = MetricRecord({"eval_loss": loss, "accuracy": accuracy, "num-examples": int(x.shape[0])})
    return Message(RecordDict({wire.METRICS: metrics}), reply_to=msg)

