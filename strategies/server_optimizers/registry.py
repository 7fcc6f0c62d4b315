"""Server-optimizer configuration (:class:`ServerOptimizerSpec`) and the name → optimizer registry."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from numbers import Real

from strategies.server_optimizers.adaptive import (
    AdamOptimizer,
    AMSGradOptimizer,
    YogiOptimizer,
)
from strategies.server_optimizers.base import ServerOptimizer
from strategies.server_optimizers.block_momentum import BlockMomentumOptimizer
from strategies.server_optimizers.fedavg import FedAvgOptimizer

_MOMENTUM_NAMES = ("block-momentum", "bmuf", "slowmo", "fedavgm")


@dataclass(frozen=True)
class ServerOptimizerSpec:
    """What a run's config says about the server optimizer; validated on construction.

    Parameters
    ----------
    name : str
        One of :data:`SERVER_OPTIMIZERS`. ``"bmuf"``, ``"slowmo"`` and ``"fedavgm"`` are
        aliases of ``"block-momentum"`` (one rule, see :class:`BlockMomentumOptimizer`).
    server_lr : float
        Server learning rate η > 0. 1.0 is FedAvg and the block-momentum papers' block lr;
        adaptive optimizers need a tuned, usually much smaller, value.
    block_momentum : float
        Block momentum μ in [0, 1); only for the block-momentum names.
    nesterov : bool
        Nesterov block momentum (BMUF NBM); only for the block-momentum names.
    beta1, beta2 : float
        Moment decays in [0, 1) for adam/amsgrad/yogi. Defaults 0.9 / 0.99 are those of
        Reddi et al. (2021) and Flower's FedAdam/FedYogi.
    eps : float
        ε > 0 in ``√v + ε`` for adam/amsgrad/yogi. The default 1e-8 keeps the step close to
        the pure ``m/√v`` direction; raise it (e.g. 1e-3) to damp coordinates whose
        updates are tiny, as Reddi et al. do after tuning.
    """

    name: str = "fedavg"
    server_lr: float = 1.0
    block_momentum: float = 0.0
    nesterov: bool = False
    beta1: float = 0.9
    beta2: float = 0.99
    eps: float = 1e-8

    def __post_init__(self) -> None:
        if self.name not in SERVER_OPTIMIZERS:
            raise ValueError(
                f"server optimizer name must be one of {SERVER_OPTIMIZERS}, got {self.name!r}"
            )
        _check_real("server_lr", self.server_lr)
        if self.server_lr <= 0:
            raise ValueError(f"server_lr must be > 0, got {self.server_lr}")
        for field, value in (
            ("block_momentum", self.block_momentum),
            ("beta1", self.beta1),
            ("beta2", self.beta2),
        ):
            _check_real(field, value)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{field} must be in [0, 1), got {value}")
        _check_real("eps", self.eps)
        if self.eps <= 0:
            raise ValueError(f"eps must be > 0, got {self.eps}")
        if not isinstance(self.nesterov, bool):
            raise TypeError(f"nesterov must be a bool, got {self.nesterov!r}")
        if self.name not in _MOMENTUM_NAMES and (self.block_momentum != 0.0 or self.nesterov):
            raise ValueError(
                f"block_momentum and nesterov apply only to {_MOMENTUM_NAMES}; "
                f"server optimizer {self.name!r} would ignore them"
            )


def _check_real(field: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{field} must be a real number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{field} must be finite, got {value!r}")


def _block_momentum(spec: ServerOptimizerSpec) -> ServerOptimizer:
    return BlockMomentumOptimizer(spec.server_lr, spec.block_momentum, spec.nesterov)


_BUILDERS: dict[str, Callable[[ServerOptimizerSpec], ServerOptimizer]] = {
    "fedavg": lambda spec: FedAvgOptimizer(spec.server_lr),
    **{name: _block_momentum for name in _MOMENTUM_NAMES},
    "amsgrad": lambda spec: AMSGradOptimizer(spec.server_lr, spec.beta1, spec.beta2, spec.eps),
    "adam": lambda spec: AdamOptimizer(spec.server_lr, spec.beta1, spec.beta2, spec.eps),
    "yogi": lambda spec: YogiOptimizer(spec.server_lr, spec.beta1, spec.beta2, spec.eps),
}

SERVER_OPTIMIZERS: tuple[str, ...] = tuple(_BUILDERS)
"""Every accepted ``ServerOptimizerSpec.name``, aliases included."""


def build_server_optimizer(spec: ServerOptimizerSpec) -> ServerOptimizer:
    """A fresh optimizer (no state) for ``spec``."""
    return _BUILDERS[spec.name](spec)
