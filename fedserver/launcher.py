"""A private, throw-away Flower SuperLink per command, and ``flwr run`` against it.

Why not let ``flwr run`` start its own local SuperLink (connection address ``:local:``)?
In Flower 1.42 that SuperLink is detached, listens on fixed ports (39091), outlives the
command, is silently reused by later runs (with whatever environment and settings it was
started with) and there is no ``flwr`` command to stop it. Pollen instead starts
``flower-superlink`` itself, on a free loopback port, in its own process group, with
Flower's per-run dependency installation off (otherwise every run ``uv sync``\\s the app's
dependencies into a fresh environment, which downloaded a CUDA build of torch), writes a
named connection for it into ``$FLWR_HOME/config.toml`` and stops it, with everything it
spawned, when the ``with`` block ends — also on errors and Ctrl-C.

Facts about Flower 1.42 this module relies on (checked against the installed package):

- All SuperLink APIs (Runtime, Control, Fleet) are served over HTTP on ``--host``/``--port``;
  ``--control-api-address`` is deprecated, so one port per SuperLink suffices.
- With ``--isolation subprocess`` the SuperLink spawns ``flower-superexec`` *in a new session*
  (its own process group); SuperExec runs ``flwr-simulation`` and Ray in *that* group. Killing
  the SuperLink's group alone leaves the simulation and Ray running (and if the SuperLink
  dies, they are orphaned), so the groups are recorded while the tree is intact and all
  of them are stopped.
- ServerApp and ClientApp processes inherit the SuperLink's environment and working
  directory, not those of the ``flwr run`` process. Extra environment variables for the apps
  must therefore be given to :func:`local_superlink`, and relative paths in the run config
  resolve against the directory the SuperLink was started from (the caller's).
- ``flwr run --stream`` exits with 0 even when the ServerApp raised; the outcome is read
  afterwards with ``flwr ls --run-id ID --format json`` (``finished:completed``,
  ``finished:failed``, ``finished:stopped``).
- SuperLink, SuperExec and the simulation start ``flower-superexec``/``flwr-simulation`` by
  name from ``PATH``; the directory of the running interpreter is put first on ``PATH`` so
  this works without an activated virtual environment.
- The simulation's Ray backend calls ``ray.init()`` without an address, so Ray's own rules
  pick the cluster: ``RAY_ADDRESS`` if set, else the cluster recorded by the last
  ``ray start`` on this machine (``/tmp/ray/ray_current_cluster``), else a new private Ray.
  Pollen sets ``RAY_ADDRESS=local`` unless told otherwise (``ray_address``, or the caller's
  own ``RAY_ADDRESS``), so a ``ray start`` cluster nobody asked for is never joined.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import tomli_w

__all__ = [
    "LaunchError",
    "RunOutcome",
    "SuperLinkHandle",
    "SuperLinkPorts",
    "check_ray_address",
    "flwr_run",
    "local_superlink",
    "run_app",
]

LOOPBACK = "127.0.0.1"
STATUS_COMPLETED = "finished:completed"
STATUS_UNKNOWN = "unknown"

_STARTUP_ATTEMPTS = 3  # free-port races: another process may grab the port we picked
_STOP_GRACE_S = 5.0  # time SuperLink/SuperExec/Ray get after SIGTERM before SIGKILL
_CLI_TIMEOUT_S = 60.0  # `flwr ls` / `flwr stop`
_RUN_ID_PATTERN = re.compile(r"Successfully started run (\d+)")
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_TOML_SCALARS = (bool, int, float, str)
_TOKEN_VARIABLE = "POLLEN_SUPERLINK_TOKEN"  # marks every process a SuperLink of ours spawned
RAY_ADDRESS_VARIABLE = "RAY_ADDRESS"  # read by ray.init() in the simulation (Ray's convention)
_RAY_CONNECT_TIMEOUT_S = 5.0  # pre-flight TCP check of a Ray head's GCS port


class LaunchError(RuntimeError):
    """The SuperLink could not be started, or ``flwr run`` could not start the run."""


@dataclass(frozen=True)
class SuperLinkPorts:
    """Ports of a SuperLink. Flower 1.42 serves Runtime, Control and Fleet API on one port."""

    http: int


@dataclass(frozen=True)
class SuperLinkHandle:
    """A running SuperLink started by :func:`local_superlink`.

    Attributes
    ----------
    pid : int
        Process id of ``flower-superlink``; also the id of its process group.
    address : str
        ``host:port`` of its HTTP APIs (what the ``flwr`` CLI talks to).
    connection : str
        Name of the connection written to ``flwr_home/config.toml``; pass it as the second
        positional argument of ``flwr run``/``flwr ls``/``flwr log``.
    flwr_home : Path
        The ``FLWR_HOME`` the SuperLink and the CLI use (config, installed apps).
    log_file : Path
        Where the SuperLink's output goes.
    env : Mapping[str, str]
        Environment of the SuperLink (and hence of ServerApp and ClientApps); the ``flwr``
        CLI is run with it too.
    """

    pid: int
    address: str
    connection: str
    flwr_home: Path
    log_file: Path
    env: Mapping[str, str] = field(repr=False)


@dataclass(frozen=True)
class RunOutcome:
    """What one ``flwr run`` ended with.

    Attributes
    ----------
    run_id : int
        Flower's run id.
    status : str
        Flower's run status text, e.g. ``finished:completed``, ``finished:failed``,
        ``finished:stopped``; ``unknown`` when the SuperLink could not be asked.
    details : str
        Flower's status details, e.g. ``Simulation failed with exception: ...``.
    returncode : int
        Exit code of ``flwr run`` — 0 also for a failed run, so use :attr:`succeeded`.
    log : str
        Output of ``flwr run --stream`` (ServerApp log), ANSI colour codes removed.
    """

    run_id: int
    status: str
    details: str
    returncode: int
    log: str

    @property
    def succeeded(self) -> bool:
        """True only if the run finished and the ServerApp returned normally."""
        return self.returncode == 0 and self.status == STATUS_COMPLETED


# --------------------------------------------------------------------------------------
# SuperLink lifecycle


@contextlib.contextmanager
def local_superlink(
    flwr_home: Path,
    *,
    ports: SuperLinkPorts | None = None,
    log_file: Path | None = None,
    env: Mapping[str, str] | None = None,
    startup_timeout: float = 30.0,
) -> Iterator[SuperLinkHandle]:
    """Run a simulation SuperLink for the duration of a ``with`` block.

    Starts ``flower-superlink --insecure --simulation --isolation subprocess
    --disable-runtime-dependency-installation --host 127.0.0.1 --port PORT`` in a new
    process group with ``FLWR_HOME=flwr_home`` and
    ``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1``, adds the connection
    ``[superlink.pollen-PORT]`` (``address``, ``insecure = true``) to
    ``flwr_home/config.toml``, waits until ``/health`` answers and yields a handle. On
    exit — normal, exception, Ctrl-C, or SIGTERM/SIGHUP while this runs in the main
    thread — every process group the SuperLink created gets SIGTERM, then SIGKILL after
    a grace period, and the connection is removed again.

    Parameters
    ----------
    flwr_home : Path
        Flower home directory (created if missing). Separate homes keep concurrent
        SuperLinks' installed apps apart; sharing one is safe for ``config.toml``.
    ports : SuperLinkPorts, optional
        Fixed port; by default a free loopback port is picked (and re-picked if another
        process grabbed it first), so concurrent commands do not collide.
    log_file : Path, optional
        File for the SuperLink's stdout/stderr (default ``flwr_home/superlink-PORT.log``).
    env : Mapping[str, str], optional
        Extra environment variables. They reach the ServerApp and ClientApp processes;
        the environment of a later ``flwr run`` does not.
    startup_timeout : float
        Seconds to wait for the SuperLink to answer its health check.

    Notes
    -----
    Flower's telemetry and update check and Ray's usage statistics are turned off unless
    the caller's environment sets ``FLWR_TELEMETRY_ENABLED``, ``FLWR_DISABLE_UPDATE_CHECK``
    or ``RAY_USAGE_STATS_ENABLED``. If this Python process is killed with SIGKILL no
    cleanup can run; the log file names the process groups to ``kill -- -PGID``.
    """
    with managed_superlink(
        flwr_home, ["--insecure", "--simulation"], {"insecure": True},
        ports=ports, log_file=log_file, env=env, startup_timeout=startup_timeout,
    ) as link:
        yield link


@contextlib.contextmanager
def managed_superlink(
    flwr_home: Path,
    mode_args: Sequence[str],
    connection_fields: Mapping[str, object],
    *,
    ca_certificate: Path | None = None,
    ports: SuperLinkPorts | None = None,
    log_file: Path | None = None,
    env: Mapping[str, str] | None = None,
    startup_timeout: float = 30.0,
) -> Iterator[SuperLinkHandle]:
    """A loopback SuperLink in the mode ``mode_args`` selects, for a ``with`` block.

    What :func:`local_superlink` (simulation) and :mod:`fedserver.deployment` (TLS with
    SuperNode authentication) share: ``flower-superlink MODE_ARGS --isolation subprocess
    --disable-runtime-dependency-installation --host 127.0.0.1 --port PORT`` in a new
    process group (port re-picked if another process took it), a health check, the
    connection ``[superlink.pollen-PORT]`` with ``address`` and ``connection_fields`` in
    ``flwr_home/config.toml``, and on exit every process group stopped and the connection
    removed.

    Parameters
    ----------
    mode_args : Sequence[str]
        Flags that select the mode, e.g. ``["--insecure", "--simulation"]``.
    connection_fields : Mapping[str, object]
        The connection's other fields, e.g. ``{"insecure": True}`` or
        ``{"root-certificates": "/path/ca.crt"}``.
    ca_certificate : Path, optional
        For a TLS SuperLink: the CA that signed its certificate. The health check then
        uses HTTPS and verifies the certificate for ``127.0.0.1``.
    flwr_home, ports, log_file, env, startup_timeout
        As for :func:`local_superlink`.
    """
    flwr_home = Path(flwr_home).expanduser().resolve()
    flwr_home.mkdir(parents=True, exist_ok=True)
    env = child_env(flwr_home, env)
    executable = find_executable("flower-superlink", env)
    ssl_context = None if ca_certificate is None else ssl.create_default_context(
        cafile=str(ca_certificate)
    )

    with exit_on_termination_signals():
        for attempt in range(1, _STARTUP_ATTEMPTS + 1):
            port = ports.http if ports is not None else free_port()
            log_path = Path(log_file) if log_file else flwr_home / f"superlink-{port}.log"
            command = [
                executable, *mode_args, "--isolation", "subprocess",
                "--disable-runtime-dependency-installation", "--host", LOOPBACK, "--port", str(port),
            ]
            tree = _start_superlink(command, port, log_path, env, startup_timeout, ssl_context)
            if tree is not None:
                break
            if ports is not None or attempt == _STARTUP_ATTEMPTS:
                raise LaunchError(
                    f"flower-superlink did not start on {LOOPBACK}:{port}; "
                    f"last lines of {log_path}:\n{log_tail(log_path)}"
                )
        connection = f"pollen-{port}"
        try:
            address = f"{LOOPBACK}:{port}"
            _edit_flower_config(flwr_home, connection, {"address": address, **connection_fields})
            yield SuperLinkHandle(
                pid=tree.proc.pid,
                address=address,
                connection=connection,
                flwr_home=flwr_home,
                log_file=log_path,
                env=env,
            )
        finally:
            try:
                tree.stop()
            finally:
                _edit_flower_config(flwr_home, connection, None)


def spawn_process_group(
    command: Sequence[str], env: Mapping[str, str], log_path: Path
) -> ProcessTree:
    """Start ``command`` in a new process group, output appended to ``log_path``.

    The process and everything it spawns inherit a fresh marker variable, so
    :meth:`ProcessTree.stop` can later tell its orphaned process groups from unrelated
    ones that reuse a group id.
    """
    env = dict(env)
    env[_TOKEN_VARIABLE] = uuid.uuid4().hex
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"# pollen: {' '.join(command)}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            list(command), env=env, stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )
    return ProcessTree(proc, env[_TOKEN_VARIABLE])


def _start_superlink(
    command: list[str], port: int, log_path: Path, env: Mapping[str, str],
    startup_timeout: float, ssl_context: ssl.SSLContext | None,
) -> ProcessTree | None:
    """Start one SuperLink and wait until it is healthy; ``None`` if it exited (port taken)."""
    tree = spawn_process_group(command, env, log_path)
    proc = tree.proc
    try:
        deadline = time.monotonic() + startup_timeout
        while not _healthy(port, ssl_context):
            tree.record()
            if proc.poll() is not None:
                tree.stop()
                return None
            if time.monotonic() > deadline:
                raise LaunchError(
                    f"flower-superlink on {LOOPBACK}:{port} not healthy after "
                    f"{startup_timeout:.0f} s; last lines of {log_path}:\n{log_tail(log_path)}"
                )
            time.sleep(0.1)
        tree.record()
        with open(log_path, "ab") as log:
            log.write(f"# pollen: process groups {sorted(tree.groups)}\n".encode())
        return tree
    except BaseException:
        tree.stop()
        raise


_NO_PROXY_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _healthy(port: int, ssl_context: ssl.SSLContext | None = None) -> bool:
    # never via an http_proxy from the environment
    if ssl_context is None:
        url, opener = f"http://{LOOPBACK}:{port}/health", _NO_PROXY_OPENER
    else:
        url = f"https://{LOOPBACK}:{port}/health"
        opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=ssl_context)
        )
    try:
        with opener.open(url, timeout=0.5) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def child_env(flwr_home: Path, extra: Mapping[str, str] | None) -> dict[str, str]:
    """The environment for Flower processes: ours plus ``extra``, with ``FLWR_HOME``, no
    dependency installation or telemetry, this interpreter's scripts first on ``PATH``, and
    a private Ray for simulations unless ``RAY_ADDRESS`` names a cluster."""
    env = dict(os.environ)
    env.update(extra or {})
    env["FLWR_HOME"] = str(flwr_home)
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    env.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    env.setdefault(RAY_ADDRESS_VARIABLE, "local")
    scripts = str(Path(sys.executable).parent)
    path = env.get("PATH", "")
    if path.split(os.pathsep)[0] != scripts:
        env["PATH"] = os.pathsep.join(p for p in (scripts, path) if p)
    return env


def find_executable(name: str, env: Mapping[str, str]) -> str:
    """Path of the Flower command ``name`` on ``env``'s ``PATH``, or a clear LaunchError."""
    found = shutil.which(name, path=env.get("PATH"))
    if found is None:
        raise LaunchError(
            f"`{name}` not found next to {sys.executable} or on PATH; "
            'install Flower with `pip install "flwr[simulation]==1.42.0"`'
        )
    return found


def log_tail(path: Path, lines: int = 20) -> str:
    """The last ``lines`` lines of a log file, colour codes removed."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(_ANSI_ESCAPE.sub("", text).splitlines()[-lines:])


@contextlib.contextmanager
def exit_on_termination_signals() -> Iterator[None]:
    """Turn SIGTERM/SIGHUP into ``SystemExit`` so ``finally`` blocks stop the SuperLink.

    Python's default for these signals is to die without unwinding. Only done in the main
    thread (where handlers can be set) and only for signals nobody else handles.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = {}
    for signum in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(signum) is signal.SIG_DFL:
            previous[signum] = signal.signal(signum, _raise)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


# --------------------------------------------------------------------------------------
# Process groups


@dataclass(frozen=True)
class _ProcessInfo:
    ppid: int
    pgid: int
    zombie: bool


def _process_table() -> dict[int, _ProcessInfo]:
    """Parent, process group and zombie flag of every visible process."""
    table: dict[int, _ProcessInfo] = {}
    proc_root = Path("/proc")
    if proc_root.is_dir():
        for entry in proc_root.iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:  # exited while we looked
                continue
            # "pid (comm) state ppid pgrp ..."; comm may contain spaces and parentheses
            fields = stat[stat.rfind(")") + 2 :].split()
            table[int(entry.name)] = _ProcessInfo(int(fields[1]), int(fields[2]), fields[0] == "Z")
        return table
    out = subprocess.run(
        ["ps", "-A", "-o", "pid=,ppid=,pgid=,stat="], capture_output=True, text=True, check=True
    ).stdout
    for line in out.splitlines():
        pid, ppid, pgid, stat = line.split(maxsplit=3)
        table[int(pid)] = _ProcessInfo(int(ppid), int(pgid), stat.startswith("Z"))
    return table


def _process_groups_of_tree(root: int) -> set[int]:
    """Process groups of ``root`` and all its living descendants (never our own group)."""
    table = _process_table()
    children: dict[int, list[int]] = {}
    for pid, info in table.items():
        children.setdefault(info.ppid, []).append(pid)
    groups, stack = {root}, [root]
    while stack:
        for child in children.get(stack.pop(), []):
            groups.add(table[child].pgid)
            stack.append(child)
    groups.discard(os.getpgrp())
    return groups


def _live_members(groups: set[int]) -> list[int]:
    table = _process_table()
    return [pid for pid, info in table.items() if info.pgid in groups and not info.zombie]


def _signal_groups(groups: set[int], signum: int) -> None:
    for pgid in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signum)


def _carries_token(pid: int, token: str) -> bool:
    """Whether a process inherited our SuperLink's marker variable (Linux: /proc environ)."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False
    return f"{_TOKEN_VARIABLE}={token}".encode() in environ.split(b"\0")


@dataclass
class ProcessTree:
    """A SuperLink process and the process groups it and its descendants created.

    SuperExec runs in a session of its own; if the SuperLink dies first, SuperExec's group
    (with the simulation and Ray in it) is orphaned and no longer found by walking the
    tree, so groups are recorded while the tree is intact. A recorded group is signalled
    later only if it still holds a process carrying this SuperLink's marker variable —
    after all its members exit a group id can be reused by an unrelated process.
    """

    proc: subprocess.Popen[bytes]
    token: str
    groups: set[int] = field(default_factory=set)

    def record(self) -> None:
        self.groups |= _process_groups_of_tree(self.proc.pid)

    def stop(self) -> None:
        """SIGTERM every group, SIGKILL what is left after a grace period, reap.

        A second Ctrl-C during the grace period skips straight to SIGKILL.
        """
        groups = _process_groups_of_tree(self.proc.pid)
        orphaned = self.groups - groups
        if orphaned and Path("/proc").is_dir():  # elsewhere ownership cannot be checked
            orphaned = {
                info.pgid
                for pid, info in _process_table().items()
                if info.pgid in orphaned and _carries_token(pid, self.token)
            }
        groups |= orphaned
        groups.discard(os.getpgrp())
        try:
            self._signal_and_wait(groups, signal.SIGTERM)
        except KeyboardInterrupt:
            _signal_groups(groups, signal.SIGKILL)
            self.proc.wait()
            raise
        if _live_members(groups):
            self._signal_and_wait(groups, signal.SIGKILL)
        self.proc.wait()

    def _signal_and_wait(self, groups: set[int], signum: int) -> None:
        _signal_groups(groups, signum)
        deadline = time.monotonic() + _STOP_GRACE_S
        while _live_members(groups) and time.monotonic() < deadline:
            self.proc.poll()  # reap the SuperLink (our child) as soon as it exits
            time.sleep(0.1)


# --------------------------------------------------------------------------------------
# Flower config file


def _edit_flower_config(flwr_home: Path, name: str, connection: dict[str, object] | None) -> None:
    """Add (or with ``None`` remove) ``[superlink.<name>]`` in ``flwr_home/config.toml``.

    Other connections are kept. The read-modify-write is serialised with a lock file,
    since concurrent commands may share a Flower home, and the file is replaced
    atomically so ``flwr`` never reads half of it.
    """
    path = flwr_home / "config.toml"
    with open(flwr_home / ".pollen-config.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        config = tomllib.loads(path.read_text()) if path.exists() else {}
        superlinks = config.setdefault("superlink", {})
        if connection is None:
            if superlinks.pop(name, None) is None:
                return
        else:
            superlinks[name] = connection
        tmp = path.with_name(f".config.toml.{uuid.uuid4().hex}")
        tmp.write_text(tomli_w.dumps(config))
        os.replace(tmp, path)


# --------------------------------------------------------------------------------------
# flwr run


def flwr_run(
    app_dir: Path,
    *,
    run_config: Mapping[str, object] | str | None = None,
    federation_config: Mapping[str, object] | str | None = None,
    flwr_home: Path | None = None,
    timeout: float | None = None,
    stream: bool = True,
    env: Mapping[str, str] | None = None,
    ray_address: str | None = None,
) -> RunOutcome:
    """Run one Flower App to completion on a private SuperLink, then stop the SuperLink.

    Parameters
    ----------
    app_dir : Path
        Directory with the app's ``pyproject.toml``.
    run_config, federation_config : Mapping or str, optional
        Overrides for ``[tool.flwr.app.config]`` and the simulation (``num-supernodes``,
        ``client-resources-num-cpus``, ...). A mapping is written to a TOML file, so any
        string value (quotes, backslashes, spaces) arrives unchanged; a string is passed
        to ``flwr`` as is (``'k=1 name="x"'`` or a path to a ``.toml`` file).
    flwr_home : Path, optional
        Flower home; by default a temporary directory that is removed afterwards.
    timeout : float, optional
        Seconds to wait for the run; on expiry it is stopped and ``TimeoutError`` raised.
    stream : bool
        Echo the run's log to stdout while it runs (it is returned either way).
    env : Mapping[str, str], optional
        Extra environment variables for the ServerApp and, with a private Ray, the
        ClientApps. Ray workers of an existing cluster have the environment of the
        ``ray start`` that started their node instead.
    ray_address : str, optional
        Run the ClientApps on this existing Ray cluster (``HOST:PORT`` of its head, or
        ``auto``; see :func:`check_ray_address`) instead of a private Ray started for the
        run. This machine must be a node of that cluster. The actor pool is sized once,
        at the start of the run, from the nodes' resources and ``client-resources-*``.

    Returns
    -------
    RunOutcome
        Check :attr:`RunOutcome.succeeded`; a ServerApp that raised gives
        ``status == "finished:failed"``.
    """
    if ray_address is not None:
        env = {**(env or {}), RAY_ADDRESS_VARIABLE: check_ray_address(ray_address)}
    with contextlib.ExitStack() as stack:
        if flwr_home is None:
            temporary = tempfile.TemporaryDirectory(prefix="pollen-flwr-")
            flwr_home = Path(stack.enter_context(temporary))
        link = stack.enter_context(local_superlink(flwr_home, env=env))
        return run_app(
            link, app_dir, run_config=run_config, federation_config=federation_config,
            timeout=timeout, stream=stream,
        )


def check_ray_address(address: str) -> str:
    """``address`` if it can name the Ray cluster a simulation joins, else a clear error.

    Accepted are ``auto`` (the cluster this machine joined with ``ray start``, which Ray
    finds in its default temporary directory) and ``HOST:PORT`` of the head node (the
    ``--port`` of ``ray start --head``, 6379 by default). ``HOST:PORT`` must accept a TCP
    connection now: Ray retries an unreachable address for minutes inside the simulation
    (measured: over 3 minutes) before the run fails.

    Raises
    ------
    ValueError
        ``address`` is neither ``auto`` nor ``HOST:PORT``; this includes Ray Client
        addresses (``ray://``): the simulation's Ray driver must run on a node of the
        cluster, which ``ray start --address HEAD:PORT`` on the SuperLink's machine makes it.
    LaunchError
        Nothing accepts connections at ``HOST:PORT``.
    """
    address = address.strip()
    if address == "auto":
        return address
    host, sep, port = address.rpartition(":")
    if "://" in address or not (sep and host and port.isdigit() and 0 < int(port) < 65536):
        raise ValueError(
            "ray_address must be 'auto' or HOST:PORT of the Ray head node (the --port of "
            f"`ray start --head`; Ray Client addresses ray://... are not supported); got {address!r}"
        )
    try:
        socket.create_connection((host.strip("[]"), int(port)), _RAY_CONNECT_TIMEOUT_S).close()
    except OSError as err:
        raise LaunchError(
            f"no Ray cluster answers at {address} ({err}); start its head with "
            f"`ray start --head --port {port}` or correct the address"
        ) from None
    return address


def run_app(
    link: SuperLinkHandle,
    app_dir: Path,
    *,
    run_config: Mapping[str, object] | str | None = None,
    federation_config: Mapping[str, object] | str | None = None,
    timeout: float | None = None,
    stream: bool = True,
) -> RunOutcome:
    """Run one app on an already running SuperLink; see :func:`flwr_run` for parameters.

    Runs ``flwr run APP CONNECTION --stream [--run-config FILE] [--federation-config FILE]``
    and then ``flwr ls CONNECTION --run-id ID --format json`` for the final status.
    Several runs may use one SuperLink one after another (saves its start-up).
    """
    app_dir = Path(app_dir).expanduser().resolve()
    if not (app_dir / "pyproject.toml").is_file():
        raise ValueError(f"app_dir must contain a pyproject.toml; got {app_dir}")
    flwr = find_executable("flwr", link.env)
    with contextlib.ExitStack() as stack:
        command = [flwr, "run", str(app_dir), link.connection, "--stream"]
        flags = (("--run-config", run_config), ("--federation-config", federation_config))
        for flag, overrides in flags:
            if overrides is not None:
                argument = _overrides_argument(overrides, flag, link.flwr_home)
                command += [flag, stack.enter_context(argument)]
        returncode, output = _run_streaming(command, link, timeout, stream)
    log = _ANSI_ESCAPE.sub("", output)
    match = _RUN_ID_PATTERN.search(log)
    if match is None:
        raise LaunchError(
            f"`flwr run` did not start a run (exit code {returncode}):\n{log[-4000:]}"
        )
    run_id = int(match.group(1))
    status, details = _run_status(link, run_id)
    return RunOutcome(run_id=run_id, status=status, details=details, returncode=returncode, log=log)


@contextlib.contextmanager
def _overrides_argument(
    overrides: Mapping[str, object] | str, flag: str, directory: Path
) -> Iterator[str]:
    """The value for ``--run-config``/``--federation-config``: the string, or a TOML file.

    ``flwr`` splits ``k=v`` strings with a regex that cannot carry a string containing
    both quote characters and reads backslashes as escapes; a TOML file has no such limits
    (``flwr`` accepts a single ``.toml`` path for either flag).
    """
    if isinstance(overrides, str):
        yield overrides
        return
    for key, value in overrides.items():
        if not isinstance(value, _TOML_SCALARS):
            raise TypeError(
                f"{flag} value for {key!r} must be bool, int, float or str; "
                f"got {type(value).__name__}"
            )
    path = directory / f"pollen-{flag.strip('-')}-{uuid.uuid4().hex}.toml"
    path.write_text(tomli_w.dumps(dict(overrides)))
    try:
        yield str(path)
    finally:
        path.unlink(missing_ok=True)


def _run_streaming(
    command: list[str], link: SuperLinkHandle, timeout: float | None, stream: bool
) -> tuple[int, str]:
    """Run ``flwr run``, collect (and optionally echo) its output; enforce ``timeout``."""
    proc = subprocess.Popen(
        command, env=dict(link.env), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, errors="replace",
    )
    lines: list[str] = []
    reader = threading.Thread(target=_pump, args=(proc.stdout, lines, stream), daemon=True)
    reader.start()
    try:
        returncode = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        match = _RUN_ID_PATTERN.search(_ANSI_ESCAPE.sub("", "".join(lines)))
        if match is not None:
            flwr_cli(link, "stop", match.group(1), link.connection)
        raise TimeoutError(
            f"the run did not finish within {timeout} s and was stopped: {' '.join(command)}"
        ) from None
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        reader.join(timeout=5)
    return returncode, "".join(lines)


def _pump(pipe: IO[str], lines: list[str], echo: bool) -> None:
    for line in pipe:
        lines.append(line)
        if echo:
            sys.stdout.write(line)
            sys.stdout.flush()


def flwr_cli(link: SuperLinkHandle, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``flwr ARGS`` with the SuperLink's environment (its ``FLWR_HOME``); output captured."""
    return subprocess.run(
        [find_executable("flwr", link.env), *args], env=dict(link.env), stdin=subprocess.DEVNULL,
        capture_output=True, text=True, timeout=_CLI_TIMEOUT_S, check=False,
    )


def _run_status(link: SuperLinkHandle, run_id: int) -> tuple[str, str]:
    """``(status, details)`` of a run from ``flwr ls --format json``."""
    done = flwr_cli(link, "ls", link.connection, "--run-id", str(run_id), "--format", "json")
    try:
        runs = json.loads(done.stdout)["runs"]
        run = next(r for r in runs if r["run-id"] == str(run_id))
    except (json.JSONDecodeError, KeyError, StopIteration):
        return STATUS_UNKNOWN, f"`flwr ls` gave no status: {(done.stdout + done.stderr).strip()}"
    return run["status"], run["status-details"]
