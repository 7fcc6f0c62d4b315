"""The synchronous driver: rounds with a barrier, over Flower's ``Grid``.

Unlike ``Strategy.start`` it can begin at any round (resume) and hands every finished round
to an observer that evaluates, records metrics and checkpoints *before* the next round
starts, so nothing that happened is lost if the process dies afterwards.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from flwr.app import ConfigRecord, MetricRecord
from flwr.serverapp import Grid

from strategies.strategy import PollenStrategy, RoundStats, to_arrayrecord, to_params

Params = dict[str, np.ndarray]


@dataclass
class RoundResult:
    server_round: int
    params: Params
    stats: RoundStats
    client_eval: MetricRecord | None
    wall_s: float


def run_sync(
    grid: Grid,
    strategy: PollenStrategy,
    params: Params,
    *,
    num_rounds: int,
    start_round: int = 1,
    timeout: float = 600.0,
    on_round: Callable[[RoundResult], bool | None] | None = None,
) -> Params:
    """Run rounds ``start_round..num_rounds``; ``on_round`` returning ``False`` stops early."""
    for server_round in range(start_round, num_rounds + 1):
        started = time.perf_counter()
        arrays = to_arrayrecord(params)
        messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(), grid))
        replies = grid.send_and_receive(messages, timeout=timeout) if messages else []
        new_arrays, _ = strategy.aggregate_train(server_round, replies)
        if new_arrays is not None:
            params = to_params(new_arrays)
        client_eval = None
        eval_messages = list(
            strategy.configure_evaluate(server_round, to_arrayrecord(params), ConfigRecord(), grid)
        )
        if eval_messages:
            client_eval = strategy.aggregate_evaluate(
                server_round, grid.send_and_receive(eval_messages, timeout=timeout)
            )
        result = RoundResult(
            server_round=server_round,
            params=params,
            stats=strategy.last_round or RoundStats(server_round=server_round),
            client_eval=client_eval,
            wall_s=time.perf_counter() - started,
        )
        if on_round is not None and on_round(result) is False:
            break
    return params
