"""Where a client's private state lives between rounds (error-feedback memory, DP accounting).

* Simulation, one SuperNode per client: Flower's ``context.state`` (kept per node, per run).
* Real devices (``state-dir`` in the node config) and simulations that must survive a resume
  (``client-state-dir`` run-config key): a directory, one file per client and run name,
  written atomically, so the state survives a restart and is never seen half-written.

Both stores keep two versions tagged with the round that wrote them, and ``load(r)`` returns
the newest one written *before* round ``r``. A round that is run again — retried after too
few replies, or re-run after the server crashed before checkpointing it — therefore starts
from exactly the state it started from the first time, so the trajectory is unchanged.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Context

Params = dict[str, np.ndarray]

STATE_RECORD = "pollen-client-state"
ROUND_KEY = "__round__"  # the round that wrote a state version
LATEST = 2**62  # load(): any version, however recent


def _pick(versions: list[Params], server_round: int) -> Params:
    """The newest version written before ``server_round``, without its round tag."""
    usable = [v for v in versions if int(v[ROUND_KEY]) < server_round]
    if not usable:
        return {}
    newest = max(usable, key=lambda v: int(v[ROUND_KEY]))
    return {k: v for k, v in newest.items() if k != ROUND_KEY}


class ContextStateStore:
    """Client state in Flower's ``context.state`` (ArrayRecords, current and previous)."""

    def __init__(self, context: Context) -> None:
        self.context = context

    def _versions(self) -> list[Params]:
        records = self.context.state.array_records
        return [
            {k: v.numpy() for k, v in records[name].items()}
            for name in (STATE_RECORD, STATE_RECORD + "-prev")
            if name in records
        ]

    def load(self, server_round: int = LATEST) -> Params:
        return _pick(self._versions(), server_round)

    def save(self, state: Params, server_round: int = 0) -> None:
        records = self.context.state.array_records
        current = records.get(STATE_RECORD)
        if current is not None and int(current[ROUND_KEY].numpy()) < server_round:
            self.context.state[STATE_RECORD + "-prev"] = current
        # Not np.ascontiguousarray: it turns a 0-d array (a counter) into shape (1,).
        tagged = {**state, ROUND_KEY: np.asarray(server_round, dtype=np.int64)}
        self.context.state[STATE_RECORD] = ArrayRecord(
            {k: Array(np.asarray(v, order="C")) for k, v in tagged.items()}
        )


class DirectoryStateStore:
    """Client state in ``<directory>/<run>/client-<id>.npz``.

    Writes are atomic (a temporary file renamed into place), so a reader never sees a
    half-written state. ``durable=True`` also fsyncs each file before the rename, so the state
    survives a power loss, not only a crash; packed workers, which write thousands of client
    states per round, turn that off (a crashed process still leaves whole files behind).
    """

    def __init__(
        self, directory: str | Path, run: str, client_id: int, *, durable: bool = True
    ) -> None:
        self.path = Path(directory).expanduser() / run / f"client-{client_id}.npz"
        self.previous = self.path.with_name(f"client-{client_id}.prev.npz")
        self.durable = durable

    @staticmethod
    def _round_of(path: Path) -> int | None:
        """The round that wrote ``path`` (reads only that entry), or None if absent."""
        if not path.exists():
            return None
        with np.load(path, allow_pickle=False) as data:
            return int(data[ROUND_KEY]) if ROUND_KEY in data.files else 0

    def load(self, server_round: int = LATEST) -> Params:
        rounds = {p: self._round_of(p) for p in (self.path, self.previous)}
        usable = [(r, p) for p, r in rounds.items() if r is not None and r < server_round]
        if not usable:
            return {}
        _, newest = max(usable)
        with np.load(newest, allow_pickle=False) as data:
            return {k: data[k] for k in data.files if k != ROUND_KEY}

    def save(self, state: Params, server_round: int = 0) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        current_round = self._round_of(self.path)
        if current_round is not None and current_round < server_round:
            os.replace(self.path, self.previous)
        buffer = io.BytesIO()
        np.savez(buffer, **state, **{ROUND_KEY: np.asarray(server_round, dtype=np.int64)})
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        with open(tmp, "wb") as fh:
            fh.write(buffer.getvalue())
            if self.durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, self.path)


def state_store(
    context: Context, client_id: int, run_name: str = "", state_dir: str = ""
) -> ContextStateStore | DirectoryStateStore:
    """The store for this client: a directory if the node or run config names one.

    The run name (stable across a resume, unlike Flower's run id) keys the directory.
    """
    directory = str(context.node_config.get("state-dir", "")) or state_dir
    if directory:
        return DirectoryStateStore(directory, run_name or str(context.run_id), client_id)
    return ContextStateStore(context)
