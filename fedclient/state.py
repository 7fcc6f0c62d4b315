"""Where a client's private state lives between rounds (error-feedback memory, DP accounting).

* Simulation, one SuperNode per client: Flower's ``context.state`` (kept per node, per run).
* Real devices (``state-dir`` in the node config) and simulations that must survive a resume
  (``client-state-dir`` run-config key): a directory, one file per client and run name,
  written atomically, so the state survives a restart and is never seen half-written.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Context

Params = dict[str, np.ndarray]

STATE_RECORD = "pollen-client-state"


class ContextStateStore:
    """Client state in Flower's ``context.state`` (an ArrayRecord)."""

    def __init__(self, context: Context) -> None:
        self.context = context

    def load(self) -> Params:
        record = self.context.state.array_records.get(STATE_RECORD)
        return {} if record is None else {k: v.numpy() for k, v in record.items()}

    def save(self, state: Params) -> None:
        # Not np.ascontiguousarray: it turns a 0-d array (a counter) into shape (1,).
        self.context.state[STATE_RECORD] = ArrayRecord(
            {k: Array(np.asarray(v, order="C")) for k, v in state.items()}
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
        self.durable = durable

    def load(self) -> Params:
        if not self.path.exists():
            return {}
        with np.load(self.path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}

    def save(self, state: Params) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        np.savez(buffer, **state)
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
