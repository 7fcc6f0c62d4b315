"""Pollen on an existing multi-node Ray cluster: ``pollen run --ray-address`` against ``ray start``.

The end-to-end test starts a two-node Ray cluster on this machine (``ray start --head`` and
``ray start --address``), runs a two-round Pollen simulation on it and then reads Ray's own
records — the GCS job and actor tables — to show that the run's Ray driver was Flower's
``flwr-simulation``, that its ClientApp actors ran on *both* nodes, and that the cluster
outlived the run.

Two things the test deliberately does not do:

- It does not rely on Ray flags to stay on loopback: Ray 2.55 cannot be confined that way.
  ``--node-ip-address 127.0.0.1`` is rewritten to the machine's outward address
  (``ray._private.services.resolve_ip_for_localhost``), and GCS and raylets then listen on
  0.0.0.0 (observed with ``ss -ltn``). Everything the test starts runs instead in a fresh
  network namespace whose only interface is ``lo`` (``unshare --user --map-root-user --net``,
  entered with ``nsenter``); it also keeps the cluster's ports apart from other Ray instances
  on the machine. Without namespaces the test is skipped and says why.
- It does not call ``ray stop``: that kills every Ray process of the user on the machine, by
  name, other people's simulations included. The test stops its own process groups and then
  checks, by a marker variable every process it started inherits, that none is left.

Ray's public state API (``ray list actors``, ``ray.util.state``) needs the dashboard that
``ray[default]`` brings and ``flwr[simulation]`` does not, so the tables are read from the GCS
through ``ray._private.state``, the backend of ``ray.nodes()``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fedserver.cli import main as pollen_main
from fedserver.launcher import (
    LaunchError,
    ProcessTree,
    check_ray_address,
    child_env,
    free_port,
    log_tail,
    spawn_process_group,
)

REPO = Path(__file__).resolve().parents[2]
HEAD_PORT = 6379  # Ray's default GCS port; always free in the test's own network namespace
NODE_START_TIMEOUT_S = 120.0
MARKER = "POLLEN_RAY_TEST_MARKER"  # inherited by every process the e2e test starts

# Read the cluster's job, actor and node tables from the GCS (run inside the namespace).
QUERY_CLUSTER = """
import json, sys
import ray
from ray._private import state
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
print(json.dumps({
    "jobs": [{"id": j["JobID"], "dead": j["IsDead"], "entrypoint": j["Entrypoint"]}
             for j in state.jobs()],
    "actors": [{"cls": a["ActorClassName"], "job": a["JobID"], "state": a["State"],
                "node": a["Address"]["NodeID"]} for a in state.actors().values()],
    "nodes": [{"id": n["NodeID"], "alive": n["Alive"], "cpus": n["Resources"].get("CPU", 0)}
              for n in ray.nodes()],
}))
"""


# --------------------------------------------------------------------------------------
# Fast checks of the address and option handling (no Ray, no SuperLink)


@pytest.mark.parametrize(
    "address", ["", "6379", "localhost", "host:0", "host:65536", "host:port", "ray://head:10001"]
)
def test_malformed_ray_addresses_are_refused(address):
    with pytest.raises(ValueError, match="ray_address must be 'auto' or HOST:PORT"):
        check_ray_address(address)


def test_ray_address_must_answer_and_auto_is_left_to_ray():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        address = f"127.0.0.1:{listener.getsockname()[1]}"
        assert check_ray_address(f" {address} ") == address
    closed = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(LaunchError, match=f"no Ray cluster answers at {closed}"):
        check_ray_address(closed)
    assert time.monotonic() - started < 6  # not Ray's minutes of retries
    assert check_ray_address("auto") == "auto"


def test_flower_processes_get_a_private_ray_unless_an_address_is_given(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    # "local": ray.init() starts a new Ray even if `ray start` recorded a cluster here
    assert child_env(tmp_path, None)["RAY_ADDRESS"] == "local"
    assert child_env(tmp_path, {"RAY_ADDRESS": "10.0.0.5:6379"})["RAY_ADDRESS"] == "10.0.0.5:6379"
    monkeypatch.setenv("RAY_ADDRESS", "auto")  # the caller's own choice is kept
    assert child_env(tmp_path, None)["RAY_ADDRESS"] == "auto"


def test_pollen_run_refuses_a_bad_cluster_before_starting_anything(tmp_path, capsys):
    closed = f"127.0.0.1:{free_port()}"
    flwr_home = tmp_path / "flwr"
    assert pollen_main(["run", "--ray-address", closed, "--flwr-home", str(flwr_home)]) == 2
    assert f"pollen: error: no Ray cluster answers at {closed}" in capsys.readouterr().err
    assert pollen_main(["run", "--ray-address", "ray://head:10001"]) == 2
    assert "--ray-address must be 'auto' or HOST:PORT" in capsys.readouterr().err
    with socket.socket() as listener:  # a reachable address: the federation keys are at fault
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        code = pollen_main([
            "run", "--ray-address", f"127.0.0.1:{listener.getsockname()[1]}",
            "-f", "init-args-num-cpus=4", "--flwr-home", str(flwr_home),
        ])
    assert code == 2
    assert "['init-args-num-cpus'] size a private Ray" in capsys.readouterr().err
    assert not flwr_home.exists()  # no SuperLink was started


def test_proc_net_tcp_addresses_are_decoded():
    # as the kernel prints them: IPv4 and IPv6 addresses in host-order (little-endian) words
    assert _decode_proc_address("0100007F:18EB") == ("127.0.0.1", 6379)
    assert _decode_proc_address("020011AC:0050") == ("172.17.0.2", 80)
    assert _decode_proc_address("0000000000000000FFFF00000100007F:18EB") == ("127.0.0.1", 6379)
    assert _decode_proc_address("00000000000000000000000001000000:0016") == ("::1", 22)
    assert _decode_proc_address("00000000000000000000000000000000:0016") == ("::", 22)


# --------------------------------------------------------------------------------------
# End to end on a real two-node cluster


@dataclass
class LoopbackNamespace:
    """A network namespace with only ``lo``, and the processes the test started in it."""

    env: dict[str, str]
    logs: Path
    trees: list[ProcessTree] = field(default_factory=list)
    holder_pid: int = 0

    def command(self, argv: list[str]) -> list[str]:
        """``argv`` run inside the namespace."""
        return ["nsenter", f"--target={self.holder_pid}", "--user", "--net", *argv]

    def spawn(self, name: str, argv: list[str]) -> ProcessTree:
        tree = spawn_process_group(self.command(argv), self.env, self.logs / f"{name}.log")
        self.trees.append(tree)
        return tree

    def interfaces(self) -> set[str]:
        lines = Path(f"/proc/{self.holder_pid}/net/dev").read_text().splitlines()[2:]
        return {line.split(":")[0].strip() for line in lines}

    def listening(self) -> set[tuple[str, int]]:
        """(address, port) of every listening TCP socket in the namespace."""
        found = set()
        for name in ("tcp", "tcp6"):
            for line in Path(f"/proc/{self.holder_pid}/net/{name}").read_text().splitlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                if state == "0A":  # LISTEN
                    found.add(_decode_proc_address(local))
        return found


def _decode_proc_address(text: str) -> tuple[str, int]:
    """``/proc/net/tcp{,6}`` local address (little-endian 32-bit words) → (ip, port)."""
    hex_ip, hex_port = text.split(":")
    words = [bytes.fromhex(hex_ip[i : i + 8])[::-1] for i in range(0, len(hex_ip), 8)]
    ip = ipaddress.ip_address(b"".join(words))
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return str(ip), int(hex_port, 16)


def _marked_processes(marker: str) -> list[int]:
    """Living processes whose environment carries ``MARKER=marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        zombie = stat[stat.rfind(")") + 2] == "Z"
        if f"{MARKER}={marker}".encode() in environ and not zombie:
            found.append(int(entry.name))
    return found


def _namespaces_unavailable() -> str | None:
    """Why a loopback-only network namespace cannot be made here, or ``None``."""
    for tool in ("unshare", "nsenter", "ip"):
        if shutil.which(tool) is None:
            return f"`{tool}` (util-linux / iproute2) is not installed"
    probe = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--net", "ip", "link", "set", "lo", "up"],
        capture_output=True, text=True, timeout=30, check=False,
    )
    if probe.returncode != 0:
        return f"cannot create a user + network namespace: {probe.stderr.strip()}"
    return None


@pytest.fixture
def loopback_namespace(tmp_path) -> Iterator[LoopbackNamespace]:
    reason = _namespaces_unavailable()
    if reason:
        pytest.skip(f"Ray cannot be kept on loopback without a network namespace; {reason}")
    marker = uuid.uuid4().hex
    env = child_env(tmp_path / "flwr", None)  # venv scripts on PATH, Ray usage stats off
    env.pop("RAY_ADDRESS")
    env[MARKER] = marker
    ns = LoopbackNamespace(env=env, logs=tmp_path / "logs")
    holder = spawn_process_group(
        ["unshare", "--user", "--map-root-user", "--net",
         "sh", "-c", "ip link set lo up && exec sleep 900"],
        env, ns.logs / "namespace.log",
    )
    ns.trees.append(holder)
    ns.holder_pid = holder.proc.pid
    try:
        deadline = time.monotonic() + 10
        while Path(f"/proc/{ns.holder_pid}/cmdline").read_bytes().split(b"\0")[0] != b"sleep":
            assert holder.proc.poll() is None, log_tail(ns.logs / "namespace.log")
            assert time.monotonic() < deadline, "the namespace did not come up"
            time.sleep(0.05)
        yield ns
    finally:
        for tree in reversed(ns.trees):  # Ray nodes before the namespace holder
            tree.stop()
        leftovers = _marked_processes(marker)
        for pid in leftovers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert not leftovers, f"processes of this test outlived it: {leftovers}"


def _start_ray_node(ns: LoopbackNamespace, name: str, argv: list[str]) -> float:
    """Start ``ray start ... --block`` in the namespace; seconds until Ray says it is up."""
    started = time.monotonic()
    tree = ns.spawn(name, [str(Path(sys.executable).parent / "ray"), "start", "--block", *argv])
    log = ns.logs / f"{name}.log"
    while "Ray runtime started" not in log.read_text(errors="replace"):
        assert tree.proc.poll() is None, f"`ray start` ({name}) exited:\n{log_tail(log, 40)}"
        assert time.monotonic() - started < NODE_START_TIMEOUT_S, log_tail(log, 40)
        time.sleep(0.2)
    tree.record()
    return time.monotonic() - started


@pytest.mark.e2e
def test_pollen_run_on_a_two_node_ray_cluster(loopback_namespace, tmp_path):
    ns = loopback_namespace
    node_ip = socket.gethostbyname(socket.gethostname())
    if not ipaddress.ip_address(node_ip).is_loopback:
        pytest.skip(
            f"inside a namespace without routes Ray advertises what the host name resolves to "
            f"({node_ip}), which is not on its only interface, lo"
        )
    head = f"{node_ip}:{HEAD_PORT}"
    run_config = (
        "num-server-rounds=2 clients-per-round=4 local-epochs=1 model=logreg dataset=digits "
        f"output-dir={tmp_path} run-name=cluster"
    )
    ray_tmp = Path(tempfile.mkdtemp(prefix="pollen-ray-"))  # short: Ray's socket paths < 108 B
    try:
        head_s = _start_ray_node(ns, "head", [
            "--head", "--port", str(HEAD_PORT), "--num-cpus", "1", "--temp-dir", str(ray_tmp),
            "--object-store-memory", str(100 * 2**20), "--include-dashboard", "false",
            "--disable-usage-stats",
        ])
        worker_s = _start_ray_node(ns, "worker", [
            "--address", head, "--num-cpus", "1", "--object-store-memory", str(100 * 2**20),
            "--disable-usage-stats",
        ])
        assert ns.interfaces() == {"lo"}
        listening = ns.listening()
        assert (node_ip, HEAD_PORT) in listening  # the view is of the cluster's namespace
        assert all(ipaddress.ip_address(ip).is_loopback for ip, _ in listening), listening

        started = time.monotonic()
        run = subprocess.run(
            ns.command([
                sys.executable, "-m", "fedserver.cli", "run", "--ray-address", head,
                "-c", run_config,
                "-f", "num-supernodes=4 client-resources-num-cpus=1",
                "--flwr-home", str(tmp_path / "flwr"), "--timeout", "300",
            ]),
            cwd=REPO, env=ns.env, capture_output=True, text=True, timeout=360, check=False,
        )
        run_s = time.monotonic() - started
        out = run.stdout + run.stderr
        assert run.returncode == 0, out[-4000:]
        assert f"on the Ray cluster at {head}" in out and "pollen: finished" in out
        rows = [json.loads(line) for line in (tmp_path / "cluster/metrics.jsonl").read_text().splitlines()]
        assert [(r["round"], r["clients"]) for r in rows] == [(1, 4), (2, 4)]

        query = subprocess.run(
            ns.command([sys.executable, "-c", QUERY_CLUSTER, head]),
            env=ns.env, capture_output=True, text=True, timeout=120, check=True,
        )
        tables = json.loads(query.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)

    # Both nodes are still there: the run joined the cluster and left it running.
    nodes = {n["id"]: n for n in tables["nodes"] if n["alive"]}
    assert len(nodes) == 2 and all(n["cpus"] == 1 for n in nodes.values()), tables["nodes"]
    # The run's Ray driver was Flower's simulation process; it disconnected at the end.
    simulations = [j for j in tables["jobs"] if "flwr-simulation" in j["entrypoint"]]
    assert len(simulations) == 1 and simulations[0]["dead"], tables["jobs"]
    # Its ClientApp actors: one per node (1 CPU each, 1 CPU per client), on both nodes.
    actors = [a for a in tables["actors"] if a["job"] == simulations[0]["id"]]
    assert sorted(a["cls"] for a in actors) == ["ClientAppActor", "ClientAppActor"], actors
    assert {a["node"] for a in actors} == set(nodes)
    print(f"ray head {head_s:.1f} s, worker node {worker_s:.1f} s, pollen run {run_s:.1f} s")
