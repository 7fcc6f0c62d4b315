"""The synchronous driver: rounds with a barrier, over Flower's ``Grid``.

Unlike ``Strategy.start`` it can begin at any round (resume) and hands every finished round
to an observer that evaluates, records metrics and checkpoints *before* the next round
starts, so nothing that happened is lost if the process dies afterwards.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from flwr.app import ConfigRecord, MetricRecord
from flwr.serverapp import Grid

from privacy.budget import PrivacyBudgetExceeded
from strategies.exchange import send_and_receive
from strategies.strategy import PollenStrategy, RoundStats, to_arrayrecord, to_params

log = logging.getLogger("pollen")

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
    max_retries: int = 0,
) -> Params:
    """Run rounds ``start_round..num_rounds``; ``on_round`` returning ``False`` stops early.

    A round whose valid updates are fewer than the strategy's ``min_replies`` is retried with
    a freshly sampled cohort up to ``max_retries`` times, then skipped (model unchanged). The
    bytes of failed attempts are still counted in the round's traffic.
    """
    for server_round in range(start_round, num_rounds + 1):
        started = time.perf_counter()
        arrays = to_arrayrecord(params)
        total_up = total_down = 0
        for attempt in range(max_retries + 1):
            strategy.attempt = attempt
            try:
                messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(), grid))
            except PrivacyBudgetExceeded as stop:
                log.warning("stopping before round %d: %s", server_round, stop)
                return params
            replies = send_and_receive(grid, messages, timeout=timeout) if messages else []
            new_arrays, _ = strategy.aggregate_train(server_round, replies)
            stats = strategy.last_round or RoundStats(server_round=server_round)
            total_up += stats.bytes_up
            total_down += stats.bytes_down
            if new_arrays is not None:
                params = to_params(new_arrays)
                break
        strategy.attempt = 0
        stats.bytes_up, stats.bytes_down = total_up, total_down
        client_eval = None
        eval_messages = list(
            strategy.configure_evaluate(server_round, to_arrayrecord(params), ConfigRecord(), grid)
        )
        if eval_messages:
            client_eval = strategy.aggregate_evaluate(
                server_round, send_and_receive(grid, eval_messages, timeout=timeout)
            )
        result = RoundResult(
            server_round=server_round,
            params=params,
            stats=stats,
            client_eval=client_eval,
            wall_s=time.perf_counter() - started,
        )
        if on_round is not None and on_round(result) is False:
            break
    return params
