"""A TLS-secured Flower 1.42 federation on one machine: SuperLink, registered SuperNodes, runs.

In a real deployment the SuperLink runs on a server, each SuperNode on its own device with
its own data, and a researcher starts runs with ``flwr run`` from a laptop; the README's
deployment walkthrough shows those commands. This module starts the same commands as
local processes so that the whole secured path — TLS on every connection, SuperNode
authentication with registered keys, per-node data (``data-path``) and on-disk client state
(``state-dir``), ``flwr run`` — can be tested end to end and tried out on one machine. Every
process it starts lives in a process group of its own and is stopped, with everything it
spawned, when the ``with`` block that started it ends (:mod:`fedserver.launcher` does the
process-group bookkeeping).

Facts about Flower 1.42 this module relies on (checked against the installed package):

- ``flower-superlink --ssl-ca-certfile CA --ssl-certfile CRT --ssl-keyfile KEY
  --enable-supernode-auth`` serves the Fleet, Control and Runtime APIs over HTTPS on one
  port. Its own SuperExec dials it over loopback with TLS, so the certificate must name
  ``127.0.0.1`` (``pollen certs`` always adds the loopback names).
- With ``--enable-supernode-auth`` a SuperNode's public key must be registered first
  (``flwr supernode register KEY.pub CONNECTION``). Registration assigns the node id, which
  stays the same when the SuperNode restarts; the ClientApp keys a device's on-disk state by
  it. An unregistered key is refused: the SuperNode exits with status 1 after logging
  ``Failed to activate SuperNode`` (API error 2004). A SuperLink certificate that the
  SuperNode's ``--root-certificates`` did not sign fails the handshake
  (``CERTIFICATE_VERIFY_FAILED``), also exit status 1.
- A SuperNode logs ``SuperNode ID: <id>`` once the SuperLink has accepted it.
- Every SuperNode serves a Runtime API for its ClientApp processes on ``--port`` (default
  9094, plain HTTP on loopback), so SuperNodes sharing a host need distinct ports.
- A SuperNode starts a fresh ``flwr-clientapp`` process for every message: nothing a
  ClientApp keeps in memory survives to the next round, hence ``state-dir`` for error-feedback
  memory and DP-SGD accounting.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import tomli_w

from fedserver.certs import CertificateBundle, generate_certificates
from fedserver.launcher import (
    LaunchError,
    ProcessTree,
    SuperLinkHandle,
    child_env,
    exit_on_termination_signals,
    find_executable,
    free_port,
    log_tail,
    managed_superlink,
    spawn_process_group,
)

__all__ = [
    "SecureFederation",
    "SuperNodeHandle",
    "SuperNodeSpec",
    "register_supernodes",
    "secure_federation",
    "start_supernode",
    "supernodes",
    "tls_superlink",
    "wait_connected",
    "write_node_config",
]

_NODE_ID_PATTERN = re.compile(r"SuperNode ID: (\d+)")
_REGISTER_TIMEOUT_S = 120.0


# --------------------------------------------------------------------------------------
# SuperLink


@contextlib.contextmanager
def tls_superlink(
    flwr_home: Path,
    certs: CertificateBundle,
    *,
    env: Mapping[str, str] | None = None,
    log_file: Path | None = None,
    startup_timeout: float = 60.0,
) -> Iterator[SuperLinkHandle]:
    """A SuperLink with TLS and SuperNode authentication on loopback, for a ``with`` block.

    Runs ``flower-superlink --ssl-ca-certfile ca.crt --ssl-certfile superlink.crt
    --ssl-keyfile superlink.key --enable-supernode-auth --isolation subprocess
    --disable-runtime-dependency-installation --host 127.0.0.1 --port PORT`` (deployment
    mode: no ``--simulation``, so runs are executed by the SuperNodes that connect) and
    writes the connection ``[superlink.pollen-PORT]`` with ``address`` and
    ``root-certificates`` to ``flwr_home/config.toml``. The health check goes over HTTPS
    and verifies the certificate against ``certs.ca_certificate``.

    Parameters
    ----------
    flwr_home : Path
        Flower home of the SuperLink and of the ``flwr`` CLI that talks to it.
    certs : CertificateBundle
        From :func:`fedserver.certs.generate_certificates` (``pollen certs``).
    env : Mapping[str, str], optional
        Extra environment variables for the SuperLink and hence the ServerApp.
    log_file : Path, optional
        SuperLink output (default ``flwr_home/superlink-PORT.log``).
    startup_timeout : float
        Seconds to wait for the health check.
    """
    mode_args = [
        "--ssl-ca-certfile", str(certs.ca_certificate.resolve()),
        "--ssl-certfile", str(certs.server_certificate.resolve()),
        "--ssl-keyfile", str(certs.server_key.resolve()),
        "--enable-supernode-auth",
    ]
    with managed_superlink(
        flwr_home, mode_args, {"root-certificates": str(certs.ca_certificate.resolve())},
        ca_certificate=certs.ca_certificate, log_file=log_file, env=env,
        startup_timeout=startup_timeout,
    ) as link:
        yield link


def register_supernodes(link: SuperLinkHandle, public_keys: Sequence[Path]) -> list[int]:
    """Register SuperNode public keys with the SuperLink; their node ids, in order.

    Runs ``flwr supernode register KEY.pub CONNECTION --format json`` for every key, all
    at once (each ``flwr`` call spends seconds starting up).

    Raises
    ------
    LaunchError
        If any registration fails (already registered, not a NIST-curve OpenSSH key,
        SuperLink unreachable); the message holds ``flwr``'s output.
    """
    flwr = find_executable("flwr", link.env)
    procs = [
        subprocess.Popen(
            [flwr, "supernode", "register", str(Path(key).resolve()), link.connection,
             "--format", "json"],
            env=dict(link.env), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True,
        )
        for key in public_keys
    ]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=_REGISTER_TIMEOUT_S)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    node_ids = []
    for key, output in zip(public_keys, outputs, strict=True):
        try:
            reply = json.loads(output[output.index("{"):])
            node_ids.append(int(reply["node-id"]))
        except (ValueError, KeyError) as err:
            raise LaunchError(
                f"`flwr supernode register {key}` failed:\n{output.strip()}"
            ) from err
    return node_ids


# --------------------------------------------------------------------------------------
# SuperNodes


@dataclass(frozen=True)
class SuperNodeSpec:
    """How to start one SuperNode.

    Attributes
    ----------
    name : str
        Label for directories and messages, e.g. ``supernode-1``.
    private_key : Path
        Its authentication key (OpenSSH format; ``pollen certs`` writes
        ``supernode-<i>.key``). The matching public key must be registered.
    root_certificate : Path
        The CA certificate it trusts to have signed the SuperLink's certificate.
    node_config : Mapping[str, object]
        ``--node-config`` values, e.g. ``{"data-path": "/data/x.npz", "state-dir": "/srv/st"}``,
        passed as a TOML file (:func:`write_node_config`).
    max_retries : int, optional
        Give up after this many failed connection attempts (Flower's default: retry
        forever, which is right for a device that waits for its server).
    """

    name: str
    private_key: Path
    root_certificate: Path
    node_config: Mapping[str, object] = field(default_factory=dict)
    max_retries: int | None = None


@dataclass(frozen=True)
class SuperNodeHandle:
    """A running ``flower-supernode`` started by :func:`start_supernode`.

    Attributes
    ----------
    name : str
        From its :class:`SuperNodeSpec`.
    port : int
        Its ClientApp Runtime API port.
    flwr_home : Path
        Its Flower home (installed apps); its output goes to ``flwr_home/supernode.log``.
    """

    name: str
    port: int
    flwr_home: Path
    tree: ProcessTree = field(repr=False)

    @property
    def log_file(self) -> Path:
        return self.flwr_home / "supernode.log"

    @property
    def pid(self) -> int:
        return self.tree.proc.pid

    def log(self) -> str:
        """Its output so far."""
        try:
            return self.log_file.read_text(errors="replace")
        except OSError:
            return ""

    def node_id(self) -> int | None:
        """The id the SuperLink accepted it under, once it has logged it."""
        match = _NODE_ID_PATTERN.search(self.log())
        return int(match.group(1)) if match else None

    def poll(self) -> int | None:
        """Its exit status, or ``None`` while it runs."""
        self.tree.record()
        return self.tree.proc.poll()

    def wait(self, timeout: float) -> int:
        """Wait for it to exit and return its status (``subprocess.TimeoutExpired`` if not)."""
        return self.tree.proc.wait(timeout=timeout)

    def stop(self) -> None:
        """Stop it and every process it started (ClientApps, SuperExec)."""
        self.tree.stop()


def write_node_config(path: Path, node_config: Mapping[str, object]) -> Path:
    """Write a SuperNode's node config as a TOML file for ``--node-config PATH.toml``.

    Flower reads ``--node-config 'k="v" ...'`` with a regular expression that cannot carry a
    string holding both quote characters and takes backslashes as escapes; a ``.toml`` path
    (which Flower also accepts) carries any path unchanged.
    """
    for key, value in node_config.items():
        if not isinstance(value, (bool, int, float, str)):
            raise TypeError(
                f"node_config[{key!r}] must be bool, int, float or str; got {type(value).__name__}"
            )
    path.write_text(tomli_w.dumps(dict(node_config)))
    return path


def start_supernode(
    link: SuperLinkHandle,
    spec: SuperNodeSpec,
    directory: Path,
    *,
    env: Mapping[str, str] | None = None,
) -> SuperNodeHandle:
    """Start ``flower-supernode`` for ``spec``, connecting to ``link``; stop it with ``.stop()``.

    Runs ``flower-supernode --superlink ADDRESS --root-certificates CA
    --auth-supernode-private-key KEY --isolation subprocess --port PORT --node-config ...``
    in a process group of its own with ``FLWR_HOME=directory/<name>`` (a device of its own:
    apps are installed there) and a free loopback ``PORT``. Returns at once; use
    :func:`wait_connected` to wait until the SuperLink has accepted it.
    """
    home = (Path(directory) / spec.name).resolve()
    home.mkdir(parents=True, exist_ok=True)
    node_env = child_env(home, env)
    port = free_port()
    command = [
        find_executable("flower-supernode", node_env),
        "--superlink", link.address,
        "--root-certificates", str(Path(spec.root_certificate).resolve()),
        "--auth-supernode-private-key", str(Path(spec.private_key).resolve()),
        "--isolation", "subprocess",
        "--port", str(port),
    ]
    if spec.node_config:
        config_file = write_node_config(home / "node-config.toml", spec.node_config)
        command += ["--node-config", str(config_file)]
    if spec.max_retries is not None:
        command += ["--max-retries", str(spec.max_retries)]
    tree = spawn_process_group(command, node_env, home / "supernode.log")
    return SuperNodeHandle(name=spec.name, port=port, flwr_home=home, tree=tree)


@contextlib.contextmanager
def supernodes(
    link: SuperLinkHandle,
    specs: Sequence[SuperNodeSpec],
    directory: Path,
    *,
    env: Mapping[str, str] | None = None,
) -> Iterator[list[SuperNodeHandle]]:
    """Start one SuperNode per spec for a ``with`` block; all are stopped on exit."""
    nodes: list[SuperNodeHandle] = []
    with exit_on_termination_signals():
        try:
            for spec in specs:
                nodes.append(start_supernode(link, spec, directory, env=env))
            yield nodes
        finally:
            for node in nodes:
                node.stop()


def wait_connected(nodes: Sequence[SuperNodeHandle], timeout: float = 60.0) -> dict[str, int]:
    """Wait until every SuperNode has been accepted; its name → node id.

    Raises
    ------
    LaunchError
        If one exits (refused key, TLS failure, port taken) or is not accepted within
        ``timeout`` seconds; the message holds the end of its log.
    """
    deadline = time.monotonic() + timeout
    accepted: dict[str, int] = {}
    while True:
        for node in nodes:
            if node.name in accepted:
                continue
            node_id = node.node_id()
            if node_id is not None:
                accepted[node.name] = node_id
            elif node.poll() is not None:
                raise LaunchError(
                    f"{node.name} exited with status {node.poll()} before the SuperLink "
                    f"accepted it; last lines of {node.log_file}:\n{log_tail(node.log_file)}"
                )
        if len(accepted) == len(nodes):
            return accepted
        if time.monotonic() > deadline:
            waiting = [node for node in nodes if node.name not in accepted]
            raise LaunchError(
                f"not accepted by the SuperLink within {timeout:.0f} s: "
                + ", ".join(node.name for node in waiting)
                + f"; last lines of {waiting[0].log_file}:\n{log_tail(waiting[0].log_file)}"
            )
        time.sleep(0.2)


# --------------------------------------------------------------------------------------
# Everything together


@dataclass(frozen=True)
class SecureFederation:
    """A running :func:`secure_federation`.

    Attributes
    ----------
    link : SuperLinkHandle
        The SuperLink; pass it to :func:`fedserver.launcher.run_app` to start runs
        (``flwr run APP CONNECTION --stream`` over TLS).
    certs : CertificateBundle
        CA, SuperLink certificate and the SuperNode keys (``supernode-1`` ...).
    nodes : list[SuperNodeHandle]
        The SuperNodes, in the order of the node configs.
    node_ids : dict[str, int]
        SuperNode name → node id assigned at registration.
    """

    link: SuperLinkHandle
    certs: CertificateBundle
    nodes: list[SuperNodeHandle]
    node_ids: dict[str, int]


@contextlib.contextmanager
def secure_federation(
    directory: Path,
    node_configs: Sequence[Mapping[str, object]],
    *,
    extra_keys: int = 0,
    env: Mapping[str, str] | None = None,
    connect_timeout: float = 90.0,
) -> Iterator[SecureFederation]:
    """Certificates, a TLS SuperLink with authentication and one SuperNode per node config.

    Creates ``directory/certs`` (CA, SuperLink certificate for loopback, and
    ``len(node_configs) + extra_keys`` SuperNode key pairs), starts :func:`tls_superlink`
    with ``FLWR_HOME=directory/superlink``, registers the first ``len(node_configs)`` keys,
    starts a SuperNode for each node config (``supernode-<i>`` with key ``i``, under
    ``directory/supernodes``) and waits until all are accepted. On exit the SuperNodes
    and the SuperLink are stopped with everything they started.

    Parameters
    ----------
    directory : Path
        Working directory (created); certificates, Flower homes and logs go here.
    node_configs : Sequence[Mapping[str, object]]
        ``--node-config`` of each SuperNode, e.g. ``{"data-path": ..., "state-dir": ...}``.
    extra_keys : int
        Further key pairs that are created but not registered (for testing refusal).
    env : Mapping[str, str], optional
        Extra environment variables for every process.
    connect_timeout : float
        Seconds the SuperNodes get to be accepted.
    """
    directory = Path(directory).resolve()
    certs = generate_certificates(
        directory / "certs", ["localhost"], num_nodes=len(node_configs) + extra_keys
    )
    with contextlib.ExitStack() as stack:
        link = stack.enter_context(tls_superlink(directory / "superlink", certs, env=env))
        registered = certs.nodes[: len(node_configs)]
        register_supernodes(link, [key.public_key for key in registered])
        specs = [
            SuperNodeSpec(key.name, key.private_key, certs.ca_certificate, config)
            for key, config in zip(registered, node_configs, strict=True)
        ]
        nodes = stack.enter_context(supernodes(link, specs, directory / "supernodes", env=env))
        node_ids = wait_connected(nodes, connect_timeout)
        yield SecureFederation(link=link, certs=certs, nodes=nodes, node_ids=node_ids)
