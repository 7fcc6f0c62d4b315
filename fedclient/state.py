"""Where a client's private state lives between rounds (error-feedback memory, DP accounting).

* Simulation, one SuperNode per client: Flower's ``context.state`` (kept per node, per run).
* Real devices: a state directory (``state-dir`` in the node config), written atomically, so
  the state survives a SuperNode restart and is never seen half-written.
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
        self.context.state[STATE_RECORD] = ArrayRecord(
            {k: Array(np.ascontiguousarray(v)) for k, v in state.items()}
        )


class DirectoryStateStore:
    """Client state in ``<state-dir>/<run id>/client-state.npz`` on the device."""

    def __init__(self, directory: str | Path, run_id: int | str) -> None:
        self.path = Path(directory).expanduser() / str(run_id) / "client-state.npz"

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
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)


def state_store(context: Context) -> ContextStateStore | DirectoryStateStore:
    """The store for this node: a state directory if the node config names one."""
    directory = str(context.node_config.get("state-dir", ""))
    if directory:
        return DirectoryStateStore(directory, context.run_id)
    return ContextStateStore(context)
