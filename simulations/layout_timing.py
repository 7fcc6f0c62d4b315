"""Timing a real ``flwr run`` of Pollen (either layout) and the plain loop, for ``pollen bench scale``.

:func:`time_flwr_run` runs the app through :func:`fedserver.launcher.flwr_run` — the same path
as ``pollen run`` — and reads the per-round wall times the ServerApp wrote to
``metrics.jsonl`` (``wall_s``: sampling, messages, client training and aggregation of one round;
evaluation and checkpointing excluded). :func:`compare_with_plain_loop` puts that next to the
plain single-threaded PyTorch loop (:mod:`simulations.plain_loop`) on the same cohorts.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedserver.config import parse_run_config
from simulations.plain_loop import plain_fedavg


@dataclass
class RunTiming:
    """Round times of one ``flwr run``; the first round pays Ray's and the actors' start-up."""

    round_s: list[float] = field(default_factory=list)
    total_s: float = 0.0  # the whole command, SuperLink start and stop included
    clients_per_round: int = 0
    run_dir: str = ""
    status: str = ""

    @property
    def steady_round_s(self) -> float:
        """Median round time after the first."""
        steady = self.round_s[1:] or self.round_s
        return float(np.median(steady)) if steady else float("nan")

    @property
    def client_updates_per_s(self) -> float:
        return self.clients_per_round / self.steady_round_s


def time_flwr_run(
    run_config: dict,
    federation_config: dict,
    *,
    output_dir: Path,
    run_name: str,
    app_dir: Path | None = None,
    timeout: float | None = None,
    stream: bool = False,
) -> RunTiming:
    """Run Pollen once through ``flwr run`` and return its round times.

    Parameters
    ----------
    run_config : dict
        Run-config overrides (validated here first), e.g. ``{"virtual-clients": 10000, ...}``.
    federation_config : dict
        Simulation settings, e.g. ``{"num-supernodes": 2, "client-resources-num-cpus": 1}``.
    output_dir, run_name : Path, str
        Where the run directory goes (``output_dir/run_name``).
    app_dir : Path, optional
        The app (default: this Pollen checkout).
    """
    from fedserver.launcher import flwr_run

    overrides = {**run_config, "output-dir": str(Path(output_dir).resolve()), "run-name": run_name}
    cfg = parse_run_config(overrides)
    app = app_dir or Path(__file__).resolve().parent.parent
    started = time.perf_counter()
    outcome = flwr_run(
        app, run_config=overrides, federation_config=federation_config, timeout=timeout,
        stream=stream,
    )
    total = time.perf_counter() - started
    run_dir = Path(overrides["output-dir"]) / run_name
    metrics = run_dir / "metrics.jsonl"
    if not outcome.succeeded or not metrics.exists():
        raise RuntimeError(
            f"flwr run did not complete (status {outcome.status}): {outcome.details}\n"
            f"{outcome.log[-3000:]}"
        )
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return RunTiming(
        round_s=[float(r["wall_s"]) for r in rows],
        total_s=total,
        clients_per_round=cfg.clients_per_round,
        run_dir=str(run_dir),
        status=outcome.status,
    )


def compare_with_plain_loop(
    run_config: dict, federation_config: dict, *, output_dir: Path, run_name: str, **kwargs
) -> dict[str, object]:
    """A ``flwr run`` and the plain loop on the same cohorts: steady round times and ratio.

    ``ratio`` < 1 means the federated run's steady round is faster than the single-threaded
    loop (possible with several workers).
    """
    timing = time_flwr_run(
        run_config, federation_config, output_dir=output_dir, run_name=run_name, **kwargs
    )
    cfg = parse_run_config(run_config)
    population = cfg.virtual_clients or int(federation_config.get("num-supernodes", 10))
    plain = plain_fedavg(cfg, num_clients=population)
    return {
        "flwr_steady_round_s": timing.steady_round_s,
        "flwr_round_s": timing.round_s,
        "flwr_total_s": timing.total_s,
        "plain_steady_round_s": plain.steady_round_s,
        "plain_round_s": plain.round_s,
        "ratio": timing.steady_round_s / plain.steady_round_s,
        "client_updates_per_s": timing.client_updates_per_s,
    }
