"""The ClientApp's process settings and its client-side evaluation."""

import numpy as np
import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from fedclient import client_app
from fedclient.components import data_spec, federated_data, new_model
from fedclient.device import set_torch_threads
from fedclient.training import as_tensors, evaluate, get_params
from fedserver.config import parse_run_config
from simulations.datasets import DataSpec, load_federated
from simulations.inprocess_grid import InProcessGrid
from strategies import wire
from strategies.strategy import to_arrayrecord


def test_torch_threads_default_to_one_in_simulation_and_torch_default_on_devices():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        set_torch_threads(0, simulated=False)
        assert torch.get_num_threads() == 2
        set_torch_threads(0, simulated=True)
        assert torch.get_num_threads() == 1
        set_torch_threads(3, simulated=True)
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


# --- client-side evaluation: the client's own held-out data where it has some ----------




def _evaluate(run_config: dict, node_config: dict):
    cfg = parse_run_config(run_config)
    spec = data_spec(cfg, node_config.get("data-path") or None)
    data = federated_data(spec, int(node_config.get("num-partitions", 1)))
    model = new_model(cfg, data.input_shape, data.num_classes)
    content = RecordDict({wire.ARRAYS: to_arrayrecord(get_params(model)),
                          wire.CONFIG: ConfigRecord({"server-round": 1})})
    grid = InProcessGrid(client_app.app, 1, run_config=run_config, node_configs=[node_config])
    msg = Message(content, dst_node_id=next(iter(grid.get_node_ids())),
                  message_type=MessageType.EVALUATE)
    (reply,) = grid.send_and_receive([msg])
    assert not reply.has_error(), reply.error
    return dict(reply.content[wire.METRICS]), model, data


def _expected(model, dataset) -> tuple[float, float]:
    x, y = as_tensors(dataset.x, dataset.y, torch.device("cpu"))
    return evaluate(model, x, y)


def test_synthetic_clients_evaluate_on_their_own_test_stream():
    run_config = {"dataset": "synthetic", "samples-per-client": 50, "model": "logreg", "device": "cpu"}
    metrics, model, data = _evaluate(run_config, {"partition-id": 7, "num-partitions": 20})
    held_out = data.client_test(7)
    assert metrics["holdout"] == 1 and metrics["num-examples"] == len(held_out) == 10
    # its own distribution, never its training examples
    assert not np.isin(held_out.x[:, 0], data.partition(7).x[:, 0]).any()
    loss, accuracy = _expected(model, held_out)
    assert metrics["eval_loss"] == loss and metrics["accuracy"] == accuracy


def test_partitions_of_a_shared_data_set_evaluate_on_their_training_partition():
    run_config = {"dataset": "digits", "model": "logreg", "device": "cpu"}
    metrics, model, data = _evaluate(run_config, {"partition-id": 2, "num-partitions": 5})
    assert data.client_test(2) is None
    assert metrics["holdout"] == 0 and metrics["num-examples"] == len(data.partition(2))
    assert (metrics["eval_loss"], metrics["accuracy"]) == _expected(model, data.partition(2))


def test_a_device_evaluates_on_the_hold_out_of_its_own_file(tmp_path):
    part = load_federated(DataSpec(dataset="digits", seed=0), 3).partition(0)
    np.savez(tmp_path / "node.npz", x=part.x, y=part.y)
    run_config = {"dataset": "files", "num-classes": 10, "model": "logreg", "device": "cpu"}
    metrics, model, data = _evaluate(run_config, {"data-path": str(tmp_path / "node.npz")})
    held_out = data.client_test(0)
    assert metrics["holdout"] == 1 and metrics["num-examples"] == len(held_out)
    assert len(held_out) + len(data.partition(0)) == len(part)
    assert (metrics["eval_loss"], metrics["accuracy"]) == _expected(model, held_out)
