"""Server-optimizer benchmark: FedAvg, block momentum (+Nesterov), sync AMSGrad and async AMSGrad with stragglers.

Every method trains through the real ClientApp on an in-process grid
(:mod:`simulations.inprocess_grid`) and the same drivers ``pollen run`` uses, on two
non-IID tasks:

* ``mnist``: the 5,000-image MNIST subset, Dirichlet(0.3) label skew over 20 clients, MLP;
* ``synthetic``: FedProx Synthetic(1, 1), 30 clients, softmax regression.

Client speeds come from the seeded virtual clock with stragglers on (20% of the clients
5× slower, lognormal σ = 0.5 per job), so simulated time is where asynchrony pays off: a
synchronous round lasts as long as its slowest client, while the asynchronous driver
applies each update when it arrives. Every method does the same client work (sync:
``rounds × clients-per-round`` jobs; async: as many server steps), with a fixed number of
local SGD steps per job so that one job is one unit of simulated work.

Reported per task and method: rounds (sync) or server steps (async) and client updates
to the target test accuracy, the simulated time to the target, the final and best
accuracy, the simulated time of the whole budget and the wall time. Written to
``<out>/optimizers.json``, ``<out>/optimizers.md`` and ``<out>/optimizers.png`` (accuracy
against simulated time).

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
    rounds: int  # sync rounds in the full budget; async gets rounds × clients_per_round steps
    quick_rounds: int
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
        rounds=60,
        quick_rounds=12,
        target=0.80,
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
        rounds=60,
        quick_rounds=12,
        target=0.60,
        config={
            "dataset": "synthetic", "synthetic-alpha": 1.0, "synthetic-beta": 1.0,
            "samples-per-client": 100, "model": "logreg", "local-steps": 10,
            "batch-size": 10, "lr": 0.05, "momentum": 0.0,
        },
    ),
)

METHODS = (
    Method("fedavg", {"strategy": "fedavg", "server-lr": 1.0}),
    Method("block-momentum", {"strategy": "block-momentum", "server-lr": 1.0, "block-momentum": 0.6}),
    Method(
        "nesterov-bm",
        {"strategy": "block-momentum", "server-lr": 1.0, "block-momentum": 0.6, "nesterov": True},
    ),
    Method("amsgrad-sync", {"strategy": "amsgrad", "server-lr": 0.01, "server-eps": 1e-3}),
    Method(
        "amsgrad-async",
        {
            "strategy": "amsgrad", "driver": "async", "server-lr": 0.003, "server-eps": 1e-3,
            "max-staleness": 20,
        },
    ),
)


def run_method(task: Task, method: Method, rounds: int, seed: int = 0) -> dict[str, Any]:
    """Train one method on one task for ``rounds`` rounds' worth of client jobs.

    Returns the settings, and a trace with one point per round (sync) or per
    ``clients_per_round`` server steps (async): steps, client updates, simulated time,
    test accuracy.
    """
    raw = {
        "device": "cpu", "seed": seed, "clients-per-round": task.clients_per_round,
        "concurrency": task.clients_per_round, "num-server-rounds": rounds,
        **STRAGGLERS, **task.config, **method.settings(task),
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

    def record(step: int, updates: int, sim_time: float, result_params) -> None:
        set_params(model, result_params)
        loss, accuracy = evaluate(model, test_x, test_y)
        trace.append(
            {"step": step, "updates": updates, "sim_time": sim_time, "accuracy": accuracy, "loss": loss}
        )

    if cfg.driver == "async":
        driver = build_async_driver(cfg, strategy, clock)
        steps = rounds * task.clients_per_round
        driver.run(
            grid, params, num_steps=steps,
            on_round=lambda r: record(r.server_round, r.server_round, r.sim_time, r.params),
        )
        extra = {"dropped": driver.totals["dropped"], "dispatched": driver.dispatched}
    else:
        run_sync(
            grid, strategy, params, num_rounds=rounds,
            on_round=lambda r: record(
                r.server_round, r.server_round * task.clients_per_round,
                clock.advance_round(r.stats.cohort, r.server_round), r.params,
            ),
        )
        extra = {}
    return {
        "task": task.name,
        "method": method.name,
        "settings": method.settings(task),
        "trace": trace,
        "wall_s": time.perf_counter() - started,
        **extra,
    }


def summarize(result: dict[str, Any], target: float) -> dict[str, Any]:
    """First point at or above ``target`` (None if never reached), final and best accuracy."""
    trace = result["trace"]
    hit = next((p for p in trace if p["accuracy"] >= target), None)
    return {
        "task": result["task"],
        "method": result["method"],
        "target": target,
        "steps_to_target": hit["step"] if hit else None,
        "updates_to_target": hit["updates"] if hit else None,
        "sim_time_to_target": hit["sim_time"] if hit else None,
        "final_accuracy": trace[-1]["accuracy"],
        "best_accuracy": max(p["accuracy"] for p in trace),
        "sim_time_total": trace[-1]["sim_time"],
        "wall_s": result["wall_s"],
    }


def markdown_table(rows: list[dict[str, Any]]) -> str:
    def fmt(value, spec: str) -> str:
        return "not reached" if value is None else format(value, spec)

    lines = [
        "| task | method | rounds / steps to target | client updates to target | sim time to target "
        "| final acc | best acc | sim time (budget) | wall s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['task']} (≥ {r['target']:.2f}) | {r['method']} | {fmt(r['steps_to_target'], 'd')} "
            f"| {fmt(r['updates_to_target'], 'd')} | {fmt(r['sim_time_to_target'], '.1f')} "
            f"| {r['final_accuracy']:.4f} | {r['best_accuracy']:.4f} | {r['sim_time_total']:.1f} "
            f"| {r['wall_s']:.1f} |"
        )
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], tasks: tuple[Task, ...], path: Path) -> Path:
    """Test accuracy against simulated time, one panel per task, target as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for result in results:
            if result["task"] != task.name:
                continue
            trace = result["trace"]
            ax.plot(
                [p["sim_time"] for p in trace], [p["accuracy"] for p in trace],
                label=result["method"], marker="o", ms=2, lw=1.2,
            )
        ax.axhline(task.target, color="grey", ls="--", lw=0.8)
        ax.set_title(task.label, fontsize=10)
        ax.set_xlabel("simulated time (mean job of a normal client = 1)")
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(
        f"Server optimizers with stragglers ({STRAGGLERS['straggler-fraction']:.0%} of clients "
        f"{STRAGGLERS['straggler-slowdown']:g}x slower)"
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
    results, rows = [], []
    for task in TASKS:
        rounds = task.quick_rounds if quick else task.rounds
        for method in METHODS:
            result = run_method(task, method, rounds)
            results.append(result)
            rows.append(summarize(result, task.target))
            print(markdown_table(rows[-1:]).splitlines()[-1], flush=True)
    table = markdown_table(rows)
    report = {
        "quick": quick,
        "stragglers": STRAGGLERS,
        "tasks": [
            {"name": t.name, "label": t.label, "num_nodes": t.num_nodes,
             "clients_per_round": t.clients_per_round, "target": t.target,
             "rounds": t.quick_rounds if quick else t.rounds, "config": t.config}
            for t in TASKS
        ],
        "methods": [{"name": m.name, "config": m.config, "per_task": m.per_task} for m in METHODS],
        "summary": rows,
        "runs": results,
    }
    (out_dir / "optimizers.json").write_text(json.dumps(report, indent=2, default=_json_default) + "\n")
    (out_dir / "optimizers.md").write_text(table + "\n")
    plot(results, TASKS, out_dir / "optimizers.png")
    return report


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    parser.add_argument("--quick", action="store_true", help="a short budget (about a minute)")
    args = parser.parse_args(argv)
    report = run(args.out, quick=args.quick)
    print(markdown_table(report["summary"]))
    print(f"wrote {args.out / 'optimizers.md'}, .json and .png")
    if any(math.isnan(r["final_accuracy"]) for r in report["summary"]):
        raise SystemExit("a run ended with a NaN accuracy")


if __name__ == "__main__":
    main()
