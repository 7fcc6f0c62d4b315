"""Server-optimizer benchmark: FedAvg, block momentum (+Nesterov), sync AMSGrad and async AMSGrad with stragglers.

Every method trains through the real ClientApp on an in-process grid
(:mod:`simulations.inprocess_grid`) and the same drivers ``pollen run`` uses, on two
non-IID tasks:

* ``mnist``: the 5,000-image MNIST subset, Dirichlet(0.3) label skew over 20 clients, MLP;
* ``synthetic``: FedProx Synthetic(1, 1), 30 clients, softmax regression.

Client speeds come from the seeded virtual clock with stragglers on (20% of the clients
5x slower, lognormal sigma 0.5 per job), so simulated time is where asynchrony pays off: a
synchronous round lasts as long as its slowest client, while the asynchronous driver
applies each update when it arrives and keeps ``concurrency = clients-per-round`` clients
busy. Every method trains for the same simulated time (so async finishes more client jobs:
that is its point); a job is a fixed number of local SGD steps, so it is one unit of
simulated work whatever the client's data size.

Reported per task and method, as medians over seeds (a seed that never reaches the target
counts as infinite): rounds (sync) or server steps (async), client jobs finished and
simulated time until the central test accuracy first reaches the target; how many seeds
reached it; the final accuracy; the simulated time of the whole budget and the wall time.
Written to ``<out>/optimizers.json``, ``<out>/optimizers.md`` and ``<out>/optimizers.png``
(accuracy against simulated time and against client jobs).

Run ``python -m simulations.bench_optimizers [--out DIR] [--quick]`` or ``pollen bench
optimizers``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedclient.client_app import app as client_app
from fedclient.components import data_spec, federated_data, new_model
from fedclient.training import as_tensors, evaluate, get_params, set_params
from fedserver.config import parse_run_config
from simulations.inprocess_grid import InProcessGrid
from strategies.factory import build_async_driver, build_strategy, build_virtual_clock
from strategies.sync_driver import run_sync

STRAGGLERS = {"straggler-fraction": 0.2, "straggler-slowdown": 5.0, "straggler-sigma": 0.5}
"""Virtual-clock settings shared by every run."""


@dataclass(frozen=True)
class Task:
    """A federated data set, model and local training, with the accuracy to reach."""

    name: str
    label: str
    num_nodes: int
    clients_per_round: int
    sim_budget: float  # simulated time every method trains for
    quick_sim_budget: float
    target: float
    config: dict[str, Any]


@dataclass(frozen=True)
class Method:
    """A server optimizer and driver, with its hyperparameters per task."""

    name: str
    config: dict[str, Any]
    per_task: dict[str, dict[str, Any]] = field(default_factory=dict)

    def settings(self, task: Task) -> dict[str, Any]:
        return {**self.config, **self.per_task.get(task.name, {})}


TASKS = (
    Task(
        name="mnist",
        label="MNIST (5k), Dirichlet 0.3, 20 clients, MLP",
        num_nodes=20,
        clients_per_round=5,
        sim_budget=200.0,
        quick_sim_budget=50.0,
        target=0.85,
        config={
            "dataset": "mnist", "partitioner": "dirichlet", "dirichlet-alpha": 0.3,
            "model": "mlp", "hidden-size": 64, "local-steps": 10, "batch-size": 32,
            "lr": 0.05, "momentum": 0.0,
        },
    ),
    Task(
        name="synthetic",
        label="Synthetic(1, 1), 30 clients, softmax regression",
        num_nodes=30,
        clients_per_round=5,
        sim_budget=200.0,
        quick_sim_budget=50.0,
        target=0.80,
        config={
            "dataset": "synthetic", "synthetic-alpha": 1.0, "synthetic-beta": 1.0,
            "samples-per-client": 100, "model": "logreg", "local-steps": 10,
            "batch-size": 10, "lr": 0.05, "momentum": 0.0,
        },
    ),
)

METHODS = (
    Method("fedavg", {"strategy": "fedavg", "server-lr": 1.0}),
    Method("block-momentum", {"strategy": "block-momentum", "server-lr": 1.0, "block-momentum": 0.8}),
    Method(
        "nesterov-bm",
        {"strategy": "block-momentum", "server-lr": 1.0, "block-momentum": 0.8, "nesterov": True},
    ),
    Method("amsgrad-sync", {"strategy": "amsgrad", "server-lr": 0.03, "server-eps": 1e-3}),
    Method(
        "amsgrad-async",
        {
            "strategy": "amsgrad", "driver": "async", "server-lr": 0.01, "server-eps": 1e-3,
            "max-staleness": 20, "staleness-weighting": "polynomial", "staleness-exponent": 0.5,
        },
    ),
)
"""Hyperparameters picked from a small grid on seeds 0 and 1 (see the README section)."""

_UNBOUNDED = 10**9  # rounds / steps: runs stop on the simulated-time budget

SEEDS = (0, 1, 2, 3, 4)
"""Seeds of the full run (data split, model init, stragglers, sampling); quick mode uses the first."""


def run_method(task: Task, method: Method, sim_budget: float, seed: int = 0) -> dict[str, Any]:
    """Train one method on one task until the simulated time reaches ``sim_budget``.

    Returns the settings and a trace with one point per round (sync) or per
    ``clients_per_round`` server steps (async): rounds or server steps, client jobs
    finished (applied or not), simulated time, test accuracy and loss.
    """
    raw = {
        "device": "cpu", "seed": seed, "clients-per-round": task.clients_per_round,
        "concurrency": task.clients_per_round, **STRAGGLERS, **task.config,
        **method.settings(task),
    }
    cfg = parse_run_config(raw)
    grid = InProcessGrid(client_app, task.num_nodes, run_config=raw)
    data = federated_data(data_spec(cfg), task.num_nodes)
    test = data.test_set()
    model = new_model(cfg, data.input_shape, data.num_classes)
    test_x, test_y = as_tensors(test.x, test.y, torch.device("cpu"))
    params = get_params(model)
    strategy = build_strategy(cfg)
    clock = build_virtual_clock(cfg, grid.get_node_ids())
    trace: list[dict[str, float]] = []
    started = time.perf_counter()

    def record(step: int, jobs: int, sim_time: float, result_params) -> bool:
        """Evaluate; ``False`` (stop) once the simulated-time budget is spent."""
        set_params(model, result_params)
        loss, accuracy = evaluate(model, test_x, test_y)
        trace.append(
            {"step": step, "jobs": jobs, "sim_time": sim_time, "accuracy": accuracy, "loss": loss}
        )
        return sim_time < sim_budget

    def jobs_so_far(new_jobs: int) -> int:
        return (trace[-1]["jobs"] if trace else 0) + new_jobs

    extra: dict[str, int] = {}
    if cfg.driver == "async":
        driver = build_async_driver(cfg, strategy, clock)
        driver.run(
            grid, params, num_steps=_UNBOUNDED,
            on_round=lambda r: record(
                r.server_round, jobs_so_far(len(r.arrivals)), r.sim_time, r.params
            ),
        )
        extra = {"dropped": driver.totals["dropped"], "dispatched": driver.dispatched}
    else:
        run_sync(
            grid, strategy, params, num_rounds=_UNBOUNDED,
            on_round=lambda r: record(
                r.server_round, jobs_so_far(len(r.stats.cohort)),
                clock.advance_round(r.stats.cohort, r.server_round), r.params,
            ),
        )
    return {
        "task": task.name,
        "method": method.name,
        "seed": seed,
        "settings": method.settings(task),
        "trace": trace,
        "wall_s": time.perf_counter() - started,
        **extra,
    }


def time_to_target(result: dict[str, Any], target: float) -> dict[str, Any]:
    """One run's first point at or above ``target`` (None if never reached), final and best accuracy."""
    trace = result["trace"]
    hit = next((p for p in trace if p["accuracy"] >= target), None)
    return {
        "seed": result["seed"],
        "steps_to_target": hit["step"] if hit else None,
        "jobs_to_target": hit["jobs"] if hit else None,
        "sim_time_to_target": hit["sim_time"] if hit else None,
        "final_accuracy": trace[-1]["accuracy"],
        "best_accuracy": max(p["accuracy"] for p in trace),
        "sim_time_total": trace[-1]["sim_time"],
        "wall_s": result["wall_s"],
    }


def _median(values: list[float | None]) -> float | None:
    """Median with "not reached" counted as +inf; None when that median is not reached."""
    median = float(np.median([math.inf if v is None else float(v) for v in values]))
    return None if math.isinf(median) else median


def summarize(task: Task, method: Method, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over seeds of the cost to reach the target; mean final accuracy."""
    per_seed = [time_to_target(r, task.target) for r in runs]
    finals = [p["final_accuracy"] for p in per_seed]
    return {
        "task": task.name,
        "method": method.name,
        "target": task.target,
        "seeds": len(per_seed),
        "reached": sum(p["sim_time_to_target"] is not None for p in per_seed),
        "steps_to_target": _median([p["steps_to_target"] for p in per_seed]),
        "jobs_to_target": _median([p["jobs_to_target"] for p in per_seed]),
        "sim_time_to_target": _median([p["sim_time_to_target"] for p in per_seed]),
        "final_accuracy": float(np.mean(finals)),
        "final_accuracy_std": float(np.std(finals)),
        "sim_time_total": float(np.median([p["sim_time_total"] for p in per_seed])),
        "wall_s": float(sum(p["wall_s"] for p in per_seed)),
        "per_seed": per_seed,
    }


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Medians over seeds; "not reached" when most seeds did not reach the target."""

    def fmt(value, spec: str) -> str:
        return "not reached" if value is None else format(value, spec)

    header = (
        "| task (target acc) | method | rounds / steps to target | client jobs to target "
        "| sim time to target | reached | final acc (mean ± sd) | sim time of budget | wall s |"
    )
    lines = [header, "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['task']} ({r['target']:.2f}) | {r['method']} | {fmt(r['steps_to_target'], '.0f')} "
            f"| {fmt(r['jobs_to_target'], '.0f')} | {fmt(r['sim_time_to_target'], '.1f')} "
            f"| {r['reached']}/{r['seeds']} | {r['final_accuracy']:.3f} ± {r['final_accuracy_std']:.3f} "
            f"| {r['sim_time_total']:.0f} | {r['wall_s']:.1f} |"
        )
    return "\n".join(lines)


def async_vs_sync(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per task: median simulated time to target of async AMSGrad against the best sync method."""
    verdicts = {}
    for task in sorted({r["task"] for r in rows}):
        times = {r["method"]: r["sim_time_to_target"] for r in rows if r["task"] == task}
        async_time = times.pop("amsgrad-async", None)
        reached = {m: t for m, t in times.items() if t is not None}
        best = min(reached, key=reached.get) if reached else None
        verdicts[task] = {
            "async_sim_time": async_time,
            "best_sync_method": best,
            "best_sync_sim_time": reached.get(best),
            "async_faster": async_time is not None and (best is None or async_time < reached[best]),
        }
    return verdicts


def plot(results: list[dict[str, Any]], tasks: tuple[Task, ...], path: Path) -> Path:
    """Test accuracy against simulated time (top) and client jobs (bottom), first seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seed = results[0]["seed"]
    fig, axes = plt.subplots(2, len(tasks), figsize=(6 * len(tasks), 8), squeeze=False)
    for column, task in enumerate(tasks):
        runs = [r for r in results if r["task"] == task.name and r["seed"] == seed]
        for row, (key, xlabel) in enumerate(
            (("sim_time", "simulated time (mean job of a normal client = 1)"),
             ("jobs", "client jobs finished"))
        ):
            ax = axes[row][column]
            for result in runs:
                trace = result["trace"]
                ax.plot([p[key] for p in trace], [p["accuracy"] for p in trace],
                        label=result["method"], lw=1.2)
            ax.axhline(task.target, color="grey", ls="--", lw=0.8)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("test accuracy")
            ax.set_ylim(max(0.0, task.target - 0.5), 1.0)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8, loc="lower right")
        axes[0][column].set_title(task.label, fontsize=10)
    fig.suptitle(
        f"Server optimizers with stragglers ({STRAGGLERS['straggler-fraction']:.0%} of clients "
        f"{STRAGGLERS['straggler-slowdown']:g}x slower), seed {seed}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(out_dir: Path, quick: bool = False) -> dict[str, Any]:
    """Run every method on every task; write the JSON, Markdown table and plot to ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)  # tiny models: threads only add overhead on a shared machine
    seeds = SEEDS[:1] if quick else SEEDS
    results, rows = [], []
    for task in TASKS:
        budget = task.quick_sim_budget if quick else task.sim_budget
        for method in METHODS:
            runs = [run_method(task, method, budget, seed=seed) for seed in seeds]
            results.extend(runs)
            rows.append(summarize(task, method, runs))
            print(markdown_table(rows[-1:]).splitlines()[-1], flush=True)
    verdicts = async_vs_sync(rows)
    report = {
        "quick": quick,
        "seeds": list(seeds),
        "stragglers": STRAGGLERS,
        "tasks": [
            {"name": t.name, "label": t.label, "num_nodes": t.num_nodes,
             "clients_per_round": t.clients_per_round, "target": t.target,
             "sim_budget": t.quick_sim_budget if quick else t.sim_budget, "config": t.config}
            for t in TASKS
        ],
        "methods": [{"name": m.name, "config": m.config, "per_task": m.per_task} for m in METHODS],
        "summary": rows,
        "async_vs_sync": verdicts,
        "runs": results,
    }
    (out_dir / "optimizers.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [markdown_table(rows), ""]
    for task, v in verdicts.items():
        lines.append(
            f"- {task}: async AMSGrad reaches the target in {_fmt_time(v['async_sim_time'])} "
            f"simulated time, the best synchronous method ({v['best_sync_method']}) in "
            f"{_fmt_time(v['best_sync_sim_time'])}: async faster = {v['async_faster']}"
        )
    (out_dir / "optimizers.md").write_text("\n".join(lines) + "\n")
    plot(results, TASKS, out_dir / "optimizers.png")
    return report


def _fmt_time(value: float | None) -> str:
    return "never" if value is None else f"{value:.1f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    parser.add_argument("--quick", action="store_true", help="a short budget, one seed (about a minute)")
    args = parser.parse_args(argv)
    run(args.out, quick=args.quick)
    print((args.out / "optimizers.md").read_text(), end="")


if __name__ == "__main__":
    main()
