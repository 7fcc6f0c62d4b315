"""Secured deployment: TLS SuperLink with SuperNode authentication, SuperNodes with their own data.

The in-process tests run the real ClientApp and ServerApp code on an in-process grid; the
``e2e`` scenario runs real Flower 1.42 processes on loopback, once per module, and the tests
below it check what it produced. Processes are observed with ``ps``, independently of the
launcher's own /proc reader.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Message, MessageType, RecordDict
from flwr.common.config import parse_config_args

from fedclient import client_app
from fedclient.device import pick_device
from fedserver.certs import generate_certificates
from fedserver.config import ConfigError, parse_run_config
from fedserver.deployment import (
    SuperNodeSpec,
    secure_federation,
    start_supernode,
    write_node_config,
)
from fedserver.launcher import RunOutcome, run_app
from fedserver.server_app import input_shape_from_nodes, input_shape_from_replies, run_pollen
from simulations.datasets import DataSpec, load_federated
from simulations.inprocess_grid import InProcessGrid
from strategies.client_ids import DESCRIBE_DATA_KEY, discover_client_ids
from tests.support.processes import process_tree, ps_table

REPO = Path(__file__).resolve().parents[2]
NUM_CLASSES = 10


def _write_digits(directory: Path, num_nodes: int) -> tuple[list[Path], Path]:
    """Each node's own .npz (a digits partition) and the server's evaluation file."""
    data = load_federated(DataSpec(dataset="digits", seed=0), num_nodes)
    paths = []
    for i in range(num_nodes):
        part = data.partition(i)
        paths.append(directory / f"node-{i + 1}.npz")
        np.savez(paths[-1], x=part.x, y=part.y)
    test = data.test_set()
    np.savez(directory / "server.npz", x=test.x, y=test.y)
    return paths, directory / "server.npz"


def _write_malformed(directory: Path) -> Path:
    path = directory / "broken.npz"
    path.write_bytes(b"this is not a NumPy archive\n")
    return path


# --------------------------------------------------------------------------------------
# In process


def test_node_config_file_carries_any_path_through_flowers_parser(tmp_path):
    config = {"data-path": "/data/it's my \"device\"/x.npz", "state-dir": r"C:\pollen\state",
              "device": "cpu", "partition-id": 3, "scale": 0.5, "debug": True}
    path = write_node_config(tmp_path / "node.toml", config)
    assert parse_config_args([str(path)]) == config  # what flower-supernode does with it
    with pytest.raises(TypeError, match="node_config\\['shape'\\] must be"):
        write_node_config(tmp_path / "bad.toml", {"shape": [1, 2]})


def test_files_without_server_data_needs_num_classes():
    with pytest.raises(ConfigError, match="'num-classes'"):
        parse_run_config({"dataset": "files"})
    assert parse_run_config({"dataset": "files", "num-classes": 10}).data_path == ""


def test_nodes_only_run_takes_the_shape_from_the_nodes_and_goes_on_without_a_broken_node(tmp_path):
    """dataset=files, no server file: the input shape comes from the nodes, accuracy from client
    evaluation; a malformed file fails its node in every round while the others train."""
    good, _ = _write_digits(tmp_path, 3)
    bad = _write_malformed(tmp_path)
    run_config = {
        "dataset": "files", "num-classes": NUM_CLASSES, "num-server-rounds": 2,
        "clients-per-round": 4, "local-steps": 10, "fraction-evaluate": 1.0,
        "output-dir": str(tmp_path / "runs"), "run-name": "nodes-only",
    }
    node_configs = [{"data-path": str(p), "state-dir": str(tmp_path / "state")} for p in good]
    node_configs.append({"data-path": str(bad)})
    grid = InProcessGrid(client_app.app, 4, run_config=run_config, node_configs=node_configs)
    sent_types: list[str] = []
    push = grid.push_messages
    grid.push_messages = lambda messages: push(  # record what the server sends
        [m for m in messages if not sent_types.append(m.metadata.message_type)]
    )
    run = run_pollen(grid, parse_run_config(run_config))
    # one start-up query per node asks for its client id and its data's shape together (on a
    # device each message starts a ClientApp process); then 2 rounds of train + evaluate
    assert sent_types[:4] == [MessageType.QUERY] * 4
    assert sent_types.count(MessageType.QUERY) == 4 and len(sent_types) == 4 + 2 * (4 + 4)

    rows = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    for row in rows:
        assert (row["clients"], row["failed"]) == (3, 1)
        assert row["devices"] == {pick_device().type: 3}
        assert row["train_time_s"] > 0
        assert row["accuracy"] is None and row["eval_loss"] is None
        assert 0.0 <= row["client_accuracy"] <= 1.0
        assert row["client_eval_holdout"] == 1.0  # each device's hold-out of its own file
    assert rows[1]["client_accuracy"] > rows[0]["client_accuracy"]
    summary = json.loads((run.path / "summary.json").read_text())
    assert summary["best_accuracy"] is None and summary["rounds"] == 2
    # shape (1, 8, 8) learnt from the nodes: the digits MLP 64-128-128-10
    assert summary["num_params"] == 26_122
    saved = json.loads((run.path / "config.json").read_text())
    assert saved["run_config"]["data-path"] == ""


def test_nodes_with_different_example_shapes_are_refused(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i, features in enumerate((4, 4, 5)):
        paths.append(tmp_path / f"n{i}.npz")
        np.savez(paths[-1], x=rng.normal(size=(20, features)), y=rng.integers(0, 2, 20))
    run_config = {"dataset": "files", "num-classes": 2}
    grid = InProcessGrid(client_app.app, 3, run_config=run_config,
                         node_configs=[{"data-path": str(p)} for p in paths])
    with pytest.raises(RuntimeError, match=r"different example shapes: \[4\] on nodes \[1001, 1002\]; \[5\] on nodes \[1003\]"):
        input_shape_from_nodes(grid, list(grid.get_node_ids()), timeout=30)
    assert input_shape_from_nodes(grid, [1001, 1002], timeout=30) == (4,)
    # the same answer when the question rides on the client-id query
    replies: list = []
    ids = discover_client_ids(grid, [1001, 1002, 1003], ask={DESCRIBE_DATA_KEY: True},
                              on_reply=replies.append)
    assert ids == {1001: 1001, 1002: 1002, 1003: 1003}  # devices: node id when no partition-id
    with pytest.raises(RuntimeError, match=r"\[4\] on nodes \[1001, 1002\]; \[5\] on nodes \[1003\]"):
        input_shape_from_replies(replies, [1001, 1002, 1003], timeout=30)
    assert input_shape_from_replies(replies[:2], [1001, 1002], timeout=30) == (4,)


def test_a_node_that_cannot_load_its_data_still_reports_its_client_id(tmp_path):
    good = tmp_path / "good.npz"
    np.savez(good, x=np.zeros((10, 3)), y=np.arange(10) % 2)
    run_config = {"dataset": "files", "num-classes": 2}
    grid = InProcessGrid(client_app.app, 2, run_config=run_config, node_configs=[
        {"data-path": str(good), "partition-id": 5},
        {"data-path": str(_write_malformed(tmp_path)), "partition-id": 6},
    ])
    replies: list = []
    ids = discover_client_ids(grid, [1001, 1002], ask={DESCRIBE_DATA_KEY: True},
                              on_reply=replies.append)
    assert ids == {1001: 5, 1002: 6}  # the broken node stays a client: its rounds fail visibly
    assert input_shape_from_replies(replies, [1001, 1002], timeout=30) == (3,)
    with pytest.raises(RuntimeError, match="no SuperNode could describe its data.*broken.npz"):
        input_shape_from_replies(replies[1:], [1002], timeout=30)


def test_node_without_data_path_is_told_to_set_one(tmp_path):
    run_config = {"dataset": "files", "data-path": str(tmp_path / "on-the-server.npz")}
    grid = InProcessGrid(client_app.app, 1, run_config=run_config, node_configs=[{}])
    message = Message(RecordDict(), dst_node_id=1001, message_type=f"{MessageType.QUERY}.data_info")
    (reply,) = grid.send_and_receive([message])
    assert reply.has_error()
    assert "on-the-server.npz: no such file" in reply.error.reason
    assert "--node-config 'data-path=" in reply.error.reason


# --------------------------------------------------------------------------------------
# End to end: real processes on loopback


@dataclass
class Scenario:
    directory: Path
    outcome: RunOutcome
    node_logs: dict[str, str]
    node_ids: dict[str, int]
    wrong_ca: tuple[int, str]  # exit status, log
    unregistered: tuple[int, str]
    superlink_log: str
    started: dict[int, tuple[int, int, str, str]]  # every process alive before teardown
    survivors: list[str]
    seconds: float


@pytest.fixture(scope="module")
def scenario(tmp_path_factory) -> Scenario:
    """Three SuperNodes with their own digits files and one with a malformed file, over TLS with
    SuperNode authentication; `flwr run` for 2 rounds. While it runs, a SuperNode that trusts
    another CA and one whose key is not registered try to join."""
    began = time.monotonic()
    root = tmp_path_factory.mktemp("deployment")
    good, server_file = _write_digits(root, 3)
    node_configs = [
        {"data-path": str(path), "state-dir": str(root / f"state-{i + 1}")}
        for i, path in enumerate(good)
    ]
    node_configs.append({"data-path": str(_write_malformed(root)), "state-dir": str(root / "state-4")})
    other_ca = generate_certificates(root / "other-ca", ["localhost"])
    run_config = {
        "dataset": "files", "data-path": str(server_file), "num-classes": NUM_CLASSES,
        "output-dir": str(root / "runs"), "run-name": "tls", "num-server-rounds": 2,
        "clients-per-round": 4, "local-epochs": 1, "round-timeout": 120.0,
        "codec": "topk", "topk-ratio": 0.1, "error-feedback": True,
        "dp": "clip", "dp-where": "client", "dp-clip": 1.0, "dp-noise-multiplier": 1.0,
        "dp-sampling": "fixed",
        "dpsgd": True, "dpsgd-noise-multiplier": 0.5, "dpsgd-max-grad-norm": 1.0,
    }
    with secure_federation(root, node_configs, extra_keys=1) as fed:
        negative = root / "negative"
        wrong_ca = start_supernode(fed.link, SuperNodeSpec(
            "wrong-ca", fed.certs.nodes[0].private_key, other_ca.ca_certificate, max_retries=0,
        ), negative)
        unregistered = start_supernode(fed.link, SuperNodeSpec(
            "unregistered", fed.certs.nodes[4].private_key, fed.certs.ca_certificate,
            max_retries=0,
        ), negative)
        try:
            outcome = run_app(fed.link, REPO, run_config=run_config, timeout=240, stream=False)
            statuses = (wrong_ca.wait(timeout=60), unregistered.wait(timeout=60))
        finally:
            wrong_ca.stop()
            unregistered.stop()
        started = process_tree(os.getpid(), include_root=False)
        node_logs = {node.name: node.log() for node in fed.nodes}
        superlink_log = fed.link.log_file.read_text(errors="replace")
        node_ids = fed.node_ids
    groups = {row[1] for row in started.values()} - {os.getpgrp()}
    survivors = [
        f"{pid} {row[3]}" for pid, row in ps_table().items()
        if (pid in started or row[1] in groups) and not row[2].startswith("Z")
    ]
    return Scenario(
        directory=root, outcome=outcome, node_logs=node_logs, node_ids=node_ids,
        wrong_ca=(statuses[0], wrong_ca.log()), unregistered=(statuses[1], unregistered.log()),
        superlink_log=superlink_log, started=started, survivors=survivors,
        seconds=time.monotonic() - began,
    )


@pytest.mark.e2e
def test_two_rounds_over_tls_write_the_expected_metrics(scenario):
    outcome = scenario.outcome
    assert outcome.succeeded, (outcome.status, outcome.details, outcome.log[-3000:])
    run = scenario.directory / "runs" / "tls"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    for row in rows:
        # three good nodes trained; the malformed file failed its node, the round went on
        assert (row["sampled"], row["clients"], row["failed"], row["rejected"]) == (4, 3, 1, 0)
        assert row["devices"] == {pick_device().type: 3}
        assert 0 < row["train_time_s"] < 60
        assert 0.0 <= row["accuracy"] <= 1.0  # central evaluation on the server's own file
        assert row["bits_per_param"] < 16  # top-k 10 %: values + indices, not 32-bit dense
        assert row["epsilon"] > 0 and row["dpsgd_epsilon_max"] > 0
    # both accountants compose over the rounds: the server's (user level) and each client's
    assert rows[1]["epsilon"] > rows[0]["epsilon"]
    assert rows[1]["dpsgd_epsilon_max"] > rows[0]["dpsgd_epsilon_max"]
    config = json.loads((run / "config.json").read_text())
    assert config["num_nodes"] == 4
    assert (run / "model.pt").exists() and (run / "summary.json").exists()
    assert "round   2/2" in outcome.log


@pytest.mark.e2e
def test_client_state_persists_on_each_device_across_rounds(scenario):
    """Every round runs in a fresh ClientApp process, so error-feedback memory and the Opacus
    accountant history reach round 2 only through the node's state-dir."""
    for i, node_id in enumerate(scenario.node_ids[f"supernode-{k}"] for k in (1, 2, 3)):
        # keyed by the node id fixed at registration: the same file after a restart
        state_file = scenario.directory / f"state-{i + 1}" / "tls" / f"client-{node_id % 2**31}.npz"
        train = load_federated(DataSpec(dataset="files", data_path=str(
            scenario.directory / f"node-{i + 1}.npz"), num_classes=NUM_CLASSES), 1).partition(0)
        with np.load(state_file) as state:
            assert any(key.startswith("ef/") for key in state.files)
            # the accountant has both rounds' steps: ⌈n / batch_size⌉ per epoch and round
            assert int(state["dpsgd/steps"].sum()) == 2 * math.ceil(len(train) / 32)
    assert not (scenario.directory / "state-4" / "tls").exists()  # never got to train


@pytest.mark.e2e
def test_malformed_data_file_fails_only_its_node_with_a_clear_error(scenario):
    broken = str(scenario.directory / "broken.npz")
    assert f"{broken}: not a readable .npz archive" in scenario.node_logs["supernode-4"]
    assert scenario.outcome.log.count(f"{broken}: not a readable .npz archive") >= 2  # per round
    for name in ("supernode-1", "supernode-2", "supernode-3"):
        assert "raised an exception" not in scenario.node_logs[name]


@pytest.mark.e2e
def test_supernode_with_the_wrong_root_certificate_cannot_connect(scenario):
    status, log = scenario.wrong_ca
    assert status != 0
    assert "CERTIFICATE_VERIFY_FAILED" in log
    assert "SuperNode ID" not in log


@pytest.mark.e2e
def test_supernode_with_an_unregistered_key_is_refused(scenario):
    status, log = scenario.unregistered
    assert status != 0
    assert "Failed to activate SuperNode" in log and "SuperNode ID" not in log
    assert "No SuperNode found with the given public key" in scenario.superlink_log


@pytest.mark.e2e
def test_every_process_is_stopped(scenario):
    names = " ".join(row[3] for row in scenario.started.values())
    for program in ("flower-superlink", "flower-supernode", "flower-superexec"):
        assert program in names  # the snapshot saw the federation's processes
    assert scenario.survivors == []
    print(f"deployment scenario: {scenario.seconds:.0f} s")  # ~140 s on 2 busy cores
