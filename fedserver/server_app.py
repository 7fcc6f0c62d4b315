"""Pollen's ServerApp: run config → data, model, strategy → rounds → run directory.

Each round ends with central evaluation on held-out test data, one progress line, one
fsynced row in ``metrics.jsonl``, the model and a full checkpoint (atomic), in that order.
"""

from __future__ import annotations

import logging
import math
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import flwr
import numpy as np
import torch
from flwr.app import Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedclient.client_app import DATA_INFO
from fedclient.components import data_spec, federated_data, new_model
from fedclient.training import as_tensors, evaluate, get_params, set_params
from fedserver.config import ConfigError, RunConfig, parse_run_config
from fedserver.plots import plot_metrics
from fedserver.resume import load_resume_point, rng_state
from fedserver.run_dir import RunDirectory
from privacy.report import write_report
from strategies.async_driver import AsyncRoundResult
from strategies.client_ids import DESCRIBE_DATA_KEY, discover_client_ids, wait_for_nodes
from strategies.exchange import send_and_receive
from strategies.factory import build_async_driver, build_strategy, build_virtual_clock
from strategies.sync_driver import RoundResult, run_sync

log = logging.getLogger("pollen")

app = ServerApp()


def _setup_logging() -> None:
    if not log.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(levelname)s pollen: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


class CentralEvaluator:
    """Evaluates the global model on the central held-out test set."""

    def __init__(self, cfg: RunConfig, test_x: np.ndarray, test_y: np.ndarray, model: torch.nn.Module):
        self.model = model
        self.x, self.y = as_tensors(test_x, test_y, torch.device("cpu"))

    def __call__(self, params: dict[str, np.ndarray]) -> tuple[float, float]:
        set_params(self.model, params)
        return evaluate(self.model, self.x, self.y)


def _format_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} GB"


def progress_line(row: dict, num_rounds: int) -> str:
    def num(key: str, fmt: str) -> str:
        value = row.get(key)
        return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)

    return (
        f"round {row['round']:>3}/{num_rounds} | acc {num('accuracy', '.4f')} | "
        f"eval_loss {num('eval_loss', '.4f')} | train_loss {num('train_loss', '.4f')} | "
        + (f"client_acc {num('client_accuracy', '.4f')} | " if "client_accuracy" in row else "")
        + f"clients {row['clients']}"
        + (" (skipped: too few replies, model unchanged)" if row.get("skipped") else "")
        + (f" (retries {row['retries']})" if row.get("retries") else "")
        + (f" (rejected {row['rejected']})" if row.get("rejected") else "")
        + (f" (failed {row['failed']})" if row.get("failed") else "")
        + f" | up {_format_bytes(row['bytes_up'])} down {_format_bytes(row['bytes_down'])}"
        + (f" | eps {row['epsilon']:.3g}" if row.get("epsilon") is not None else "")
        + f" | {row['wall_s']:.2f} s"
    )


def client_sizes(cfg: RunConfig, data) -> Callable[[int], int] | None:
    """Client id → training examples, for balancing the packed layout's shares.

    ``None`` when all clients are known to be the same size (synthetic data), so that the
    server builds no client's data; otherwise a client's partition is looked up (lazily,
    only for sampled clients).
    """
    if not cfg.virtual_clients or cfg.dataset == "synthetic":
        return None
    return lambda client_id: len(data.partition(client_id))


def nodes_hold_the_data(cfg: RunConfig) -> bool:
    """Whether only the SuperNodes have data: ``dataset=files`` and no run-config ``data-path``.

    In a deployment every SuperNode names its own file (``--node-config data-path=...``).
    A run-config ``data-path`` is a file on the server, used for the model's shape and for
    central evaluation on its ``test-fraction`` hold-out. Without one the server asks the
    nodes for the input shape (:func:`input_shape_from_nodes`), takes ``num-classes`` from
    the run config, and accuracy comes from client evaluation (``fraction-evaluate``).
    """
    return cfg.dataset == "files" and not cfg.data_path


def input_shape_from_nodes(grid: Grid, node_ids: list[int], timeout: float) -> tuple[int, ...]:
    """The shape of one training example, as the connected nodes describe their data.

    Sends every node a ``query.data_info`` message (the ClientApp's :func:`data_info`). When
    the server also needs the nodes' client ids, :func:`run_pollen` asks both in one query
    instead and hands the replies to :func:`input_shape_from_replies`.
    """
    _require_nodes(node_ids)
    messages = [
        Message(RecordDict(), dst_node_id=node, message_type=f"{MessageType.QUERY}.data_info")
        for node in node_ids
    ]
    return input_shape_from_replies(send_and_receive(grid, messages, timeout=timeout),
                                    node_ids, timeout)


def input_shape_from_replies(replies, node_ids: list[int], timeout: float) -> tuple[int, ...]:
    """The example shape the nodes' replies describe (a ``data-info`` record each).

    A node that cannot load its data says so (an error reply, or an ``error`` entry), which
    is logged. All nodes that could describe their data must agree, or the federation could
    not train one model.

    Raises
    ------
    RuntimeError
        If no node is connected, none could describe its data, or their shapes differ.
    """
    _require_nodes(node_ids)
    shapes: dict[tuple[int, ...], list[int]] = {}
    failures = []
    for reply in replies:
        node = reply.metadata.src_node_id
        info = None if reply.has_error() else reply.content.config_records.get(DATA_INFO)
        reason = reply.error.reason if reply.has_error() else (
            "no data description in its reply" if info is None else info.get("error")
        )
        if reason:
            failures.append(f"node {node}: {reason}")
            log.warning("node %d could not describe its data: %s", node, reason)
        else:
            shapes.setdefault(tuple(int(d) for d in info["input-shape"]), []).append(node)
    if not shapes:
        raise RuntimeError(
            "dataset=files without a server-side data-path: no SuperNode could describe its "
            "data (" + ("; ".join(failures) or f"no reply within {timeout:g} s") + ")"
        )
    if len(shapes) > 1:
        raise RuntimeError(
            "the SuperNodes' data files have different example shapes: "
            + "; ".join(f"{list(shape)} on nodes {nodes}" for shape, nodes in shapes.items())
        )
    (shape, nodes), = shapes.items()
    log.info("example shape %s, as described by %d of %d nodes", list(shape), len(nodes),
             len(node_ids))
    return shape


def _require_nodes(node_ids: list[int]) -> None:
    if not node_ids:
        raise RuntimeError(
            "dataset=files without a server-side data-path: the input shape comes from the "
            "SuperNodes, but none is connected"
        )


@app.main()
def main(grid: Grid, context: Context) -> None:
    _setup_logging()
    try:
        cfg = parse_run_config(context.run_config)
        run_pollen(grid, cfg, run_id=context.run_id)
    except (ConfigError, FileExistsError) as err:
        log.error("%s", err)
        raise SystemExit(2) from None


def run_pollen(grid: Grid, cfg: RunConfig, *, run_id: int | str = 0) -> RunDirectory:
    """Run a whole federated training as configured and return its run directory."""
    started = time.perf_counter()
    torch.manual_seed(cfg.seed)
    run = RunDirectory.create(cfg.output_dir, cfg.run_name, run_id, exist_ok=cfg.resume)
    # Before config.json is rewritten: it is what a run without a checkpoint is checked against.
    point = load_resume_point(run, cfg) if cfg.resume else None
    node_ids = wait_for_nodes(grid)
    num_nodes = len(node_ids)
    log.info("run directory: %s (%d nodes connected)", run.path.resolve(), num_nodes)
    run.write_config(
        {
            "run_config": cfg.to_dict(),
            "flower_run_id": run_id,
            "num_nodes": num_nodes,
            "versions": {
                "python": platform.python_version(),
                "flwr": flwr.__version__,
                "torch": torch.__version__,
                "numpy": np.__version__,
            },
        }
    )

    # Packed layout: the clients are virtual (0..N-1) and the nodes are workers hosting them.
    num_clients = cfg.virtual_clients or max(num_nodes, 1)
    client_ids = None
    if nodes_hold_the_data(cfg):
        data = test = None
        if cfg.virtual_clients:
            shape = input_shape_from_nodes(grid, node_ids, cfg.round_timeout)
        else:  # one start-up message per node asks for its client id and its data's shape
            replies: list[Message] = []
            client_ids = discover_client_ids(
                grid, node_ids, timeout=cfg.round_timeout, ask={DESCRIBE_DATA_KEY: True},
                on_reply=replies.append,
            )
            shape = input_shape_from_replies(replies, node_ids, cfg.round_timeout)
        model = new_model(cfg, shape, cfg.num_classes)
        if cfg.fraction_evaluate == 0:
            log.warning(
                "dataset=files without a server-side data-path: no central evaluation, and "
                "with fraction-evaluate=0 no client evaluation either; only train_loss is "
                "measured"
            )
    else:
        data = federated_data(data_spec(cfg), num_clients)
        test = data.test_set()
        model = new_model(cfg, data.input_shape, data.num_classes)
    params = get_params(model)
    num_params = int(sum(v.size for v in params.values()))
    evaluator = None if test is None else CentralEvaluator(cfg, test.x, test.y, model)
    strategy = build_strategy(cfg, run.path, num_examples=client_sizes(cfg, data))
    if not cfg.virtual_clients:
        if client_ids is None:
            client_ids = discover_client_ids(grid, node_ids, timeout=cfg.round_timeout)
        strategy.set_client_ids(client_ids)
    strategy.summary()
    clock = build_virtual_clock(cfg, range(cfg.virtual_clients) if cfg.virtual_clients else node_ids)
    driver = build_async_driver(cfg, strategy, clock) if cfg.driver == "async" else None
    log.info(
        "dataset=%s (%d test examples), model=%s (%d parameters), %d rounds, %d clients/round",
        cfg.dataset, 0 if test is None else len(test), cfg.model, num_params, cfg.num_server_rounds, cfg.clients_per_round,
    )

    rows: list[dict] = []
    start_round = 1
    if point is not None and point.params is None:
        log.info("resuming %s: no round was checkpointed, starting at round 1", run.path)
    elif point is not None:
        params, start_round, rows = point.params, point.start_round, point.rows
        strategy.load_state_dict(point.strategy_state)
        point.restore_rng()
        if point.driver_state is not None:
            if driver is not None:
                driver.load_state_dict(point.driver_state)
            elif clock is not None and point.driver_state.get("clock") is not None:
                clock.load_state_dict(point.driver_state["clock"])
        log.info("resuming %s at round %d", run.path, start_round)

    def on_round(result: RoundResult) -> None:
        eval_loss, accuracy = (None, None) if evaluator is None else evaluator(result.params)
        stats = result.stats
        row = {
            "round": result.server_round,
            "train_loss": stats.train_loss,
            "eval_loss": eval_loss,
            "accuracy": accuracy,
            "clients": stats.clients,
            "sampled": stats.sampled,
            "rejected": stats.rejected,
            "failed": stats.failed,
            "missing": stats.missing,
            "bytes_up": stats.bytes_up,
            "bytes_down": stats.bytes_down,
            "bits_per_param": stats.bits_per_param,
            "wall_s": result.wall_s,
        }
        if not isinstance(result, AsyncRoundResult):  # short-round policy: what happened
            row["retries"], row["skipped"] = stats.attempt, not stats.applied
        if isinstance(result, AsyncRoundResult):
            row.update(result.metrics())
        elif clock is not None:
            row["sim_time"] = clock.advance_round(stats.cohort, result.server_round)
        row.update(stats.privacy_metrics)
        if stats.devices:  # accepted updates per client device, e.g. {"cuda": 2, "cpu": 1}
            row["devices"] = dict(stats.devices)
        if "train_time_s" in stats.client_metrics:  # example-weighted mean over the clients
            row["train_time_s"] = stats.client_metrics["train_time_s"]
        if stats.worker_s:  # packed layout: the slowest and fastest worker's share
            row["worker_s_max"], row["worker_s_min"] = max(stats.worker_s), min(stats.worker_s)
        if result.client_eval is not None:
            row["client_eval_loss"] = result.client_eval.get("eval_loss")
            row["client_accuracy"] = result.client_eval.get("accuracy")
            # fraction of the evaluated examples that were the clients' own held-out data
            row["client_eval_holdout"] = result.client_eval.get("holdout")
        run.append_metrics(row)
        rows.append(row)
        state_dict = {k: torch.from_numpy(v.copy()) for k, v in result.params.items()}
        run.save_model(state_dict)
        run.save_checkpoint(
            {
                "round": result.server_round,
                "model": state_dict,
                "strategy": strategy.state_dict(),
                "driver": driver.state_dict() if driver is not None else {
                    "clock": clock.state_dict() if clock is not None else None
                },
                "rng": rng_state(),
                "run_config": cfg.to_dict(),
            }
        )
        log.info("%s", progress_line(row, cfg.num_server_rounds))

    if driver is not None:
        driver.run(grid, params, num_steps=cfg.num_server_rounds, on_round=on_round)
    else:
        run_sync(
            grid,
            strategy,
            params,
            num_rounds=cfg.num_server_rounds,
            start_round=start_round,
            timeout=cfg.round_timeout,
            on_round=on_round,
            max_retries=cfg.max_round_retries if cfg.short_round == "retry" else 0,
        )
    plot_metrics(rows, run.path / "metrics.png", title=f"Pollen {run.path.name}")
    if cfg.dp != "off":
        report = write_report(run.path)
        log.info(
            "privacy: epsilon %.4g at delta %g after %d releases → %s",
            report["epsilon"], report["delta"], report["rounds"], run.path / "privacy" / "report.md",
        )
    final = rows[-1] if rows else {}
    summary = {
        "run_name": run.path.name,
        "rounds": len(rows),
        "final_accuracy": final.get("accuracy"),
        "best_accuracy": max((r["accuracy"] for r in rows if r["accuracy"] is not None),
                             default=None),
        "final_eval_loss": final.get("eval_loss"),
        "num_params": num_params,
        "wall_s": time.perf_counter() - started,
        "bytes_up_total": sum(r["bytes_up"] for r in rows),
        "bytes_down_total": sum(r["bytes_down"] for r in rows),
    }
    run.write_summary(summary)
    log.info(
        "done: final accuracy %.4f after %d rounds in %.1f s → %s",
        summary["final_accuracy"] or float("nan"), summary["rounds"], summary["wall_s"], Path(run.path).resolve(),
    )
    return run
