"""Assembles a :class:`PollenStrategy` from a run config: one place that maps keys to parts."""

from __future__ import annotations

from fedserver.config import RunConfig
from strategies.server_optimizers import ServerOptimizerSpec, build_server_optimizer
from strategies.strategy import PollenStrategy


def server_optimizer_spec(cfg: RunConfig) -> ServerOptimizerSpec:
    return ServerOptimizerSpec(
        name=cfg.strategy,
        server_lr=cfg.server_lr,
        block_momentum=cfg.block_momentum,
        nesterov=cfg.nesterov,
        beta1=cfg.server_beta1,
        beta2=cfg.server_beta2,
        eps=cfg.server_eps,
    )


def build_strategy(cfg: RunConfig) -> PollenStrategy:
    return PollenStrategy(
        optimizer=build_server_optimizer(server_optimizer_spec(cfg)),
        clients_per_round=cfg.clients_per_round,
        seed=cfg.seed,
        fraction_evaluate=cfg.fraction_evaluate,
    )
