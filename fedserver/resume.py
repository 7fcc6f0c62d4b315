"""Resuming a killed run from its last checkpoint, on exactly the trajectory it was on.

What makes a resumed run equal an uninterrupted one with the same seed:

* the checkpoint (written atomically after each round's metrics row) holds the model, the
  strategy's state (server-optimizer buffers, adaptive clip norm, noise RNG), the driver's
  state (virtual clock, async model versions), the process-global torch/NumPy RNG states
  and the round number;
* every per-round random choice (cohort, local shuffling, faults, DP noise) is drawn from a
  generator derived from ``(seed, round)``, not from a process-global stream;
* clients' private state (error-feedback memory) survives only if it lives on disk
  (``client-state-dir``), since Flower's ``context.state`` is per Flower run.

A crash can land between a round's metrics row and its checkpoint; rows after the
checkpointed round are then dropped and that round is run again. Its DP release may already
be in the privacy ledger: the rerun draws the identical release (same noise generator state),
which the ledger records once. A run killed before its first checkpoint starts again at round 1.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch

from fedserver.config import ConfigError, RunConfig, key_name
from fedserver.run_dir import RunDirectory, atomic_write_bytes

# Keys that may change between the killed run and its resumption.
RESUMABLE_CHANGES = frozenset({"resume", "num-server-rounds", "round-timeout", "output-dir"})


@dataclass
class ResumePoint:
    """Where a resumed run continues; ``params`` is ``None`` when no round was checkpointed."""

    params: dict[str, np.ndarray] | None
    start_round: int
    rows: list[dict[str, Any]] = field(default_factory=list)
    strategy_state: dict[str, Any] = field(default_factory=dict)
    driver_state: dict[str, Any] | None = None
    rng_state: dict[str, Any] | None = None

    def restore_rng(self) -> None:
        """Put the process-global torch/NumPy generators back where the checkpoint left them."""
        if self.rng_state is not None:
            torch.set_rng_state(self.rng_state["torch"])
            np.random.set_state(self.rng_state["numpy"])


def rng_state() -> dict[str, Any]:
    """The process-global RNG states a checkpoint saves (see :meth:`ResumePoint.restore_rng`)."""
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state()}


def load_resume_point(run: RunDirectory, cfg: RunConfig) -> ResumePoint:
    """Read the checkpoint, check the config is the same run's, and trim metrics to it.

    Call it before the run directory's ``config.json`` is rewritten: without a checkpoint
    (killed in round 1) that file is what the config is checked against.
    """
    checkpoint = run.load_checkpoint()
    if checkpoint is not None:
        saved = checkpoint["run_config"]
    elif run.config_path.exists():
        saved = run.read_config()["run_config"]
    else:
        raise ConfigError(
            f"run-config key 'resume' is true but {run.path} holds no run to resume "
            "(no checkpoint.pt, no config.json)"
        )
    _check_same_run(run, saved, cfg)
    last_round = int(checkpoint["round"]) if checkpoint is not None else 0
    rows = [row for row in run.read_metrics() if row["round"] <= last_round]
    text = "".join(json.dumps(row, allow_nan=False) + "\n" for row in rows)
    atomic_write_bytes(run.metrics_path, text.encode())
    if checkpoint is None:
        return ResumePoint(params=None, start_round=1)
    return ResumePoint(
        params={k: v.numpy().astype(np.float32) for k, v in checkpoint["model"].items()},
        start_round=last_round + 1,
        rows=rows,
        strategy_state=checkpoint.get("strategy", {}),
        driver_state=checkpoint.get("driver"),
        rng_state=checkpoint.get("rng"),
    )


def _check_same_run(run: RunDirectory, saved: dict[str, Any], cfg: RunConfig) -> None:
    """Refuse a config that would not continue the saved run (keys it lacks take defaults)."""
    defaults = {key_name(f.name): f.default for f in fields(RunConfig)}
    current = cfg.to_dict()
    changed = sorted(
        k for k in current if k not in RESUMABLE_CHANGES and saved.get(k, defaults[k]) != current[k]
    )
    if changed:
        details = ", ".join(f"{k}: {saved.get(k, defaults[k])!r} -> {current[k]!r}" for k in changed)
        raise ConfigError(
            f"cannot resume {run.path}: run-config keys differ from the checkpointed run ({details})"
        )
