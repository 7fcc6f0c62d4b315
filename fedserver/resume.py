"""Resuming a killed run from its last checkpoint, on exactly the trajectory it was on.

What makes a resumed run equal an uninterrupted one with the same seed:

* the checkpoint (written atomically after each round's metrics row) holds the model, the
  strategy's state (server-optimizer buffers, adaptive clip norm, noise RNG), the driver's
  state (virtual clock, async model versions) and the round number;
* every per-round random choice (cohort, local shuffling, faults, DP noise) is drawn from a
  generator derived from ``(seed, round)``, not from a process-global stream;
* clients' private state (error-feedback memory) survives only if it lives on disk
  (``client-state-dir``), since Flower's ``context.state`` is per Flower run.

A crash can land between a round's metrics row and its checkpoint; rows after the
checkpointed round are then dropped and that round is run again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedserver.config import ConfigError, RunConfig
from fedserver.run_dir import RunDirectory, atomic_write_bytes

# Keys that may change between the killed run and its resumption.
RESUMABLE_CHANGES = frozenset({"resume", "num-server-rounds", "round-timeout", "output-dir"})


@dataclass
class ResumePoint:
    params: dict[str, np.ndarray]
    start_round: int
    rows: list[dict[str, Any]] = field(default_factory=list)
    strategy_state: dict[str, Any] = field(default_factory=dict)
    driver_state: dict[str, Any] | None = None


def load_resume_point(run: RunDirectory, cfg: RunConfig) -> ResumePoint:
    """Read the checkpoint, check the config is the same run's, and trim metrics to it."""
    checkpoint = run.load_checkpoint()
    if checkpoint is None:
        raise ConfigError(f"run-config key 'resume' is true but {run.checkpoint_path} does not exist")
    saved = checkpoint["run_config"]
    current = cfg.to_dict()
    changed = sorted(k for k in current if k not in RESUMABLE_CHANGES and saved.get(k) != current[k])
    if changed:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {current[k]!r}" for k in changed)
        raise ConfigError(
            f"cannot resume {run.path}: run-config keys differ from the checkpointed run ({details})"
        )
    last_round = int(checkpoint["round"])
    rows = [row for row in run.read_metrics() if row["round"] <= last_round]
    text = "".join(_json_line(row) for row in rows)
    atomic_write_bytes(run.metrics_path, text.encode())
    return ResumePoint(
        params={k: v.numpy().astype(np.float32) for k, v in checkpoint["model"].items()},
        start_round=last_round + 1,
        rows=rows,
        strategy_state=checkpoint.get("strategy", {}),
        driver_state=checkpoint.get("driver"),
    )


def _json_line(row: dict[str, Any]) -> str:
    import json

    return json.dumps(row, allow_nan=False) + "\n"
