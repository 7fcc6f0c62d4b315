"""FedAvg / Local SGD as a server optimizer: ``x ← x + η Δ̄`` (server SGD on the pseudo-gradient)."""

from __future__ import annotations

from typing import ClassVar

from strategies.server_optimizers.base import Params, ServerOptimizer


class FedAvgOptimizer(ServerOptimizer):
    """Plain server SGD on the mean client delta, ``x ← x + η Δ̄``.

    With ``server_lr = 1`` the new model is the (weighted) average of the client models,
    i.e. FedAvg (McMahan et al. 2017) or Local SGD / K-step averaging; it is the baseline
    every other server optimizer must reduce to. ``server_lr ≠ 1`` is FedOpt's
    SERVEROPT = SGD (Reddi et al. 2021). Stateless apart from the step count.
    """

    name: ClassVar[str] = "fedavg"

    def step(self, params: Params, mean_delta: Params) -> Params:
        delta = self._checked_delta(params, mean_delta)
        self.num_steps += 1
        return {k: x + self.server_lr * delta[k] for k, x in params.items()}
