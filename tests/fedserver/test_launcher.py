"""Tests for fedserver.launcher: private SuperLinks, `flwr run` outcomes, no leftovers.

Processes are observed with `ps`, independently of the launcher's own /proc reader.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import tomllib
import urllib.request
from pathlib import Path

import pytest
from flwr.common.config import parse_config_args

from fedserver.launcher import (
    LaunchError,
    SuperLinkPorts,
    _overrides_argument,
    flwr_run,
    local_superlink,
)
from tests.support.processes import process_tree, ps_table

REPO = Path(__file__).resolve().parents[2]


def _alive(pids: set[int] = frozenset(), groups: set[int] = frozenset()) -> list[str]:
    """Non-zombie processes among ``pids`` or in ``groups``, as 'pid args' strings."""
    return [
        f"{pid} {args}"
        for pid, (_, pgid, stat, args) in ps_table().items()
        if (pid in pids or pgid in groups) and not stat.startswith("Z")
    ]


def _connections(flwr_home: Path) -> dict:
    return tomllib.loads((flwr_home / "config.toml").read_text()).get("superlink", {})


def test_superlinks_sharing_a_home_run_side_by_side_and_are_stopped_on_error(tmp_path):
    flwr = str(Path(sys.executable).parent / "flwr")
    with pytest.raises(RuntimeError, match="boom"), local_superlink(tmp_path) as first:
        with local_superlink(tmp_path) as second:
            trees = {link.pid: process_tree(link.pid) for link in (first, second)}
            assert first.address != second.address
            for link in (first, second):
                with urllib.request.urlopen(f"http://{link.address}/health", timeout=5) as resp:
                    assert resp.status == 200
                assert _connections(tmp_path)[link.connection] == {
                    "address": link.address,
                    "insecure": True,
                }
            # the flwr CLI accepts the connection we wrote
            ls = subprocess.run(
                [flwr, "ls", second.connection, "--format", "json"],
                env=dict(second.env), capture_output=True, text=True, timeout=60, check=True,
            )
            assert json.loads(ls.stdout) == {"success": True, "runs": []}
        # leaving the inner block stopped the second SuperLink only
        assert _alive({second.pid}) == [] and _alive({first.pid}) != []
        assert set(_connections(tmp_path)) == {first.connection}
        raise RuntimeError("boom")
    for pid, tree in trees.items():
        superexec = [p for p, row in tree.items() if "flower-superexec" in row[3]]
        assert superexec, tree
        # SuperExec has its own process group: killing the SuperLink's group is not enough
        assert {tree[p][1] for p in superexec}.isdisjoint({pid})
        assert _alive(set(tree), {row[1] for row in tree.values()}) == []
    assert _connections(tmp_path) == {}


def test_fixed_port_already_in_use_is_a_clear_error(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with (
            pytest.raises(LaunchError, match=f"127.0.0.1:{port}"),
            local_superlink(tmp_path, ports=SuperLinkPorts(http=port)),
        ):
            pass
    leftovers = [
        f"{pid} {args}" for pid, (_, _, stat, args) in ps_table().items()
        if (f"--port {port}" in args or f"127.0.0.1:{port}" in args) and not stat.startswith("Z")
    ]
    assert leftovers == []


def test_sigterm_to_the_caller_stops_the_superlink(tmp_path):
    script = textwrap.dedent(
        f"""
        import sys, time
        from pathlib import Path
        from fedserver.launcher import local_superlink
        with local_superlink(Path({str(tmp_path)!r})) as link:
            print(link.pid, flush=True)
            time.sleep(60)
        """
    )
    caller = subprocess.Popen(
        [sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    superlink = int(caller.stdout.readline())
    tree = process_tree(superlink)
    assert any("flower-superexec" in row[3] for row in tree.values()), tree
    caller.send_signal(signal.SIGTERM)
    assert caller.wait(timeout=30) == 128 + signal.SIGTERM
    assert _alive(set(tree), {row[1] for row in tree.values()}) == []


def test_mapping_overrides_reach_flwr_unchanged(tmp_path):
    tricky = {
        "out-path": 'C:\\temp\\a b "q" \'s\' ü.json',
        "rounds": 3,
        "lr": 1e-3,
        "nesterov": False,
    }
    with _overrides_argument(tricky, "--run-config", tmp_path) as argument:
        assert parse_config_args([argument]) == tricky
    assert list(tmp_path.iterdir()) == []  # the temporary TOML file is removed
    with (
        pytest.raises(TypeError, match="'bad'"),
        _overrides_argument({"bad": [1, 2]}, "--run-config", tmp_path),
    ):
        pass


# --------------------------------------------------------------------------------------
# End to end: a toy Flower App through `flwr run`

TOY_PYPROJECT = """
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "toyapp"
version = "1.0.0"
description = "Pollen launcher test app"
license = "Apache-2.0"
dependencies = ["flwr[simulation]==1.42.0"]

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "pollen-tests"

[tool.flwr.app.components]
serverapp = "toyapp.server_app:app"
clientapp = "toyapp.client_app:app"

[tool.flwr.app.config]
out-path = "result.json"
fail = false
"""

TOY_SERVER = '''
import json
import os
import time

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    if context.run_config["fail"]:
        raise RuntimeError("toy failure")
    # simulated SuperNodes register concurrently with main(): wait for both
    deadline = time.monotonic() + 120
    while len(nodes := list(grid.get_node_ids())) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    messages = [
        Message(RecordDict({"config": ConfigRecord({"x": 1})}), dst_node_id=node,
                message_type=MessageType.TRAIN)
        for node in nodes
    ]
    replies = [r for r in grid.send_and_receive(messages, timeout=120) if r.has_content()]
    with open(context.run_config["out-path"], "w") as f:
        json.dump({
            "partitions": sorted(r.content["metrics"]["partition-id"] for r in replies),
            "client-marker": [r.content["metrics"]["marker"] for r in replies],
            "server-marker": os.environ.get("POLLEN_TOY_MARKER"),
        }, f)
'''

TOY_CLIENT = '''
import os

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    metrics = MetricRecord({
        "partition-id": context.node_config["partition-id"],
        "marker": float(os.environ.get("POLLEN_TOY_MARKER", "-1")),
        "num-examples": 1,
    })
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
'''


@pytest.fixture
def toy_app(tmp_path) -> Path:
    app = tmp_path / "toyapp"
    (app / "toyapp").mkdir(parents=True)
    (app / "pyproject.toml").write_text(TOY_PYPROJECT)
    (app / "toyapp" / "__init__.py").write_text("")
    (app / "toyapp" / "server_app.py").write_text(TOY_SERVER)
    (app / "toyapp" / "client_app.py").write_text(TOY_CLIENT)
    return app


def _watch_superlinks(stop: threading.Event, seen: dict[int, tuple[int, int, str, str]]) -> None:
    """Record every process under SuperLinks that are children of this test process."""
    while not stop.is_set():
        for pid, row in ps_table().items():
            if row[0] == os.getpid() and "flower-superlink" in row[3]:
                for member, member_row in process_tree(pid).items():
                    # keep the first sighting: an exited process shows as '[comm] <defunct>'
                    seen.setdefault(member, member_row)
        time.sleep(0.2)


@pytest.mark.e2e
def test_concurrent_runs_report_success_and_failure_and_leave_no_process(
    toy_app, tmp_path, monkeypatch
):
    # A relative out-path resolves against the caller's working directory
    monkeypatch.chdir(tmp_path)
    out_name = "result \"q\" 's'.json"
    outcomes, seen, stop = {}, {}, threading.Event()
    runs = {
        "ok": {"run_config": {"out-path": out_name}, "env": {"POLLEN_TOY_MARKER": "7"}},
        "fail": {"run_config": {"fail": True}},
    }

    def run(name: str) -> None:
        outcomes[name] = flwr_run(
            toy_app, federation_config={"num-supernodes": 2, "client-resources-num-cpus": 1},
            stream=False, timeout=240, **runs[name],
        )

    watcher = threading.Thread(target=_watch_superlinks, args=(stop, seen))
    threads = [threading.Thread(target=run, args=(name,)) for name in runs]
    watcher.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stop.set()
    watcher.join()

    ok, fail = outcomes["ok"], outcomes["fail"]
    assert ok.succeeded and ok.status == "finished:completed", ok.log
    result = json.loads((tmp_path / out_name).read_text())
    assert result == {"partitions": [0, 1], "client-marker": [7.0, 7.0], "server-marker": "7"}

    assert not fail.succeeded
    assert fail.status == "finished:failed"
    assert "toy failure" in fail.details and "RuntimeError: toy failure" in fail.log
    assert fail.returncode == 0  # what `flwr run --stream` reports for a failed run
    assert ok.run_id != fail.run_id

    commands = " ".join(row[3] for row in seen.values())
    assert commands.count("flower-superlink") == 2 and "flwr-simulation" in commands
    assert _alive(set(seen), {row[1] for row in seen.values()}) == []
