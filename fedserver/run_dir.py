"""The run directory: everything a run leaves behind, written so that a crash loses nothing.

Layout (``<output-dir>/<run-name>/``)::

    config.json      resolved run config (+ Flower run id, versions)
    metrics.jsonl    one JSON object per round, appended, flushed and fsynced
    model.pt         latest global model as a torch state dict (atomic replace each round)
    checkpoint.pt    latest full server state: model, strategy/driver state, RNG states, round (atomic)
    summary.json     final numbers of the run
    metrics.png      accuracy and losses per round

Files that are replaced are written to a temporary file in the same directory and renamed
over the old one (``os.replace`` is atomic on POSIX), so a reader or a resumed run sees the
old or the new version, never half of one.
"""

from __future__ import annotations

import io
import json
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a synced temporary file and an atomic rename."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(_jsonable(obj), indent=2, sort_keys=False) + "\n").encode())


def atomic_torch_save(path: Path, obj: Any) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        value = float(obj)
        return value if math.isfinite(value) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    return obj


class RunDirectory:
    """One run's directory; created once, appended to every round."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @classmethod
    def create(cls, output_dir: str, run_name: str, run_id: int | str, *, exist_ok: bool = False) -> RunDirectory:
        name = run_name or f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{run_id}"
        path = Path(output_dir).expanduser() / name
        if path.exists() and not exist_ok and (path / "metrics.jsonl").exists():
            raise FileExistsError(
                f"run directory {path} already holds a run; choose another run-name "
                "(or resume it)"
            )
        path.mkdir(parents=True, exist_ok=True)
        return cls(path)

    # --- files --------------------------------------------------------------------------
    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def checkpoint_path(self) -> Path:
        return self.path / "checkpoint.pt"

    @property
    def config_path(self) -> Path:
        return self.path / "config.json"

    def write_config(self, config: dict[str, Any]) -> None:
        atomic_write_json(self.config_path, config)

    def read_config(self) -> dict[str, Any]:
        return json.loads(self.config_path.read_text(encoding="utf-8"))

    def append_metrics(self, row: dict[str, Any]) -> None:
        """Append one round's metrics; durable before the call returns."""
        line = json.dumps(_jsonable(row), allow_nan=False) + "\n"
        with open(self.metrics_path, "a", encoding="utf-8") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())

    def read_metrics(self) -> list[dict[str, Any]]:
        """All complete metric rows (a torn last line from a crash is ignored)."""
        return list(_read_jsonl(self.metrics_path))

    def save_model(self, state_dict: dict[str, torch.Tensor]) -> None:
        atomic_torch_save(self.path / "model.pt", state_dict)

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        atomic_torch_save(self.checkpoint_path, state)

    def load_checkpoint(self) -> dict[str, Any] | None:
        if not self.checkpoint_path.exists():
            return None
        return torch.load(self.checkpoint_path, map_location="cpu", weights_only=False)

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic_write_json(self.path / "summary.json", summary)


def _read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    if not path.exists():
        return
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if not line.endswith("\n"):
                break  # torn write from a crash: the row was never complete
            line = line.strip()
            if line:
                yield json.loads(line)
