"""Adaptive server optimizers on the mean client delta: FedAdam, FedYogi and FedAMS (AMSGrad).

All three follow the FedOpt template (Reddi et al., "Adaptive Federated Optimization",
ICLR 2021) with no bias correction, the form analysed in that paper and in FedAMS
(Wang, Lin & Chen, "Communication-Efficient Adaptive Federated Learning", ICML 2022)::

    m = β1 m + (1 − β1) Δ̄
    v = <second-moment rule>(v, Δ̄)
    x = x + η m / (√v_den + ε)

They differ only in the second-moment rule, so each subclass overrides just that.
Buffers start at zero. The denominator is ``√v + ε`` as in Reddi et al.; FedAMS writes
``v̂ = max(v̂, v, ε)`` and divides by ``√v̂``, which differs only in how ε floors the
denominator.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import ClassVar

import numpy as np

from strategies.server_optimizers.base import Params, ServerOptimizer


class AdaptiveServerOptimizer(ServerOptimizer):
    """Shared first moment, step and state handling of FedAdam, FedYogi and FedAMS.

    Parameters
    ----------
    server_lr : float
        Server learning rate ``η``. Unlike FedAvg's 1.0, adaptive steps have a per-coordinate
        magnitude of about ``η``, so ``η`` must be tuned per task (typically well below 1).
    beta1 : float
        First-moment decay β1 in [0, 1).
    beta2 : float
        Second-moment decay β2 in [0, 1).
    eps : float
        ε > 0 added to ``√v``; it bounds the step for coordinates that barely move.
        Reddi et al. find results sensitive to it and tune it (1e-3 is a common choice).
    """

    buffer_names: ClassVar[tuple[str, ...]] = ("m", "v")

    def __init__(self, server_lr: float, beta1: float, beta2: float, eps: float) -> None:
        super().__init__(server_lr)
        self.beta1 = float(beta1)
        self.beta2 = float(beta2)
        self.eps = float(eps)

    @abstractmethod
    def _second_moment(self, params: Params, delta: Params) -> Params:
        """Update the second-moment buffer(s); return the ``v`` that goes under the root."""

    def step(self, params: Params, mean_delta: Params) -> Params:
        delta = self._checked_delta(params, mean_delta)
        m = self._buffer("m", params)
        m = {k: self.beta1 * m[k] + (1.0 - self.beta1) * delta[k] for k in params}
        self._buffers["m"] = m
        denominator = self._second_moment(params, delta)
        self.num_steps += 1
        return {
            k: x + self.server_lr * m[k] / (np.sqrt(denominator[k]) + self.eps)
            for k, x in params.items()
        }

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(server_lr={self.server_lr}, beta1={self.beta1}, "
            f"beta2={self.beta2}, eps={self.eps}, num_steps={self.num_steps})"
        )


class AdamOptimizer(AdaptiveServerOptimizer):
    """FedAdam: ``v = β2 v + (1 − β2) Δ̄²`` (Reddi et al. 2021, no bias correction)."""

    name: ClassVar[str] = "adam"

    def _second_moment(self, params: Params, delta: Params) -> Params:
        v = self._buffer("v", params)
        v = {k: self.beta2 * v[k] + (1.0 - self.beta2) * np.square(delta[k]) for k in params}
        self._buffers["v"] = v
        return v


class YogiOptimizer(AdaptiveServerOptimizer):
    """FedYogi: ``v = v − (1 − β2) Δ̄² sign(v − Δ̄²)`` (Zaheer et al. 2018; Reddi et al. 2021).

    ``v`` moves towards ``Δ̄²`` by an additive amount rather than a multiplicative one, so a
    sudden large update raises the denominator more slowly than Adam would. It stays ≥ 0.
    """

    name: ClassVar[str] = "yogi"

    def _second_moment(self, params: Params, delta: Params) -> Params:
        v = self._buffer("v", params)
        squared = {k: np.square(delta[k]) for k in params}
        v = {k: v[k] - (1.0 - self.beta2) * squared[k] * np.sign(v[k] - squared[k]) for k in params}
        self._buffers["v"] = v
        return v


class AMSGradOptimizer(AdaptiveServerOptimizer):
    """FedAMS: Adam's ``v`` plus ``v̂ = max(v̂, v)``, and the step divides by ``√v̂``.

    The running maximum makes the effective per-coordinate learning rate
    ``η / (√v̂ + ε)`` non-increasing, which is what AMSGrad's (and FedAMS's, APAM's)
    convergence proofs rely on.
    """

    name: ClassVar[str] = "amsgrad"
    buffer_names: ClassVar[tuple[str, ...]] = ("m", "v", "v_hat")

    def _second_moment(self, params: Params, delta: Params) -> Params:
        v = self._buffer("v", params)
        v_hat = self._buffer("v_hat", params)
        v = {k: self.beta2 * v[k] + (1.0 - self.beta2) * np.square(delta[k]) for k in params}
        v_hat = {k: np.maximum(v_hat[k], v[k]) for k in params}
        self._buffers["v"] = v
        self._buffers["v_hat"] = v_hat
        return v_hat
