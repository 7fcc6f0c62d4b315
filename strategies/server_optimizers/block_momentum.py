"""Block momentum (BMUF / SlowMo / FedAvgM): heavy-ball momentum on the averaged client displacement.

One rule serves four names. Clients run K local SGD steps from the send point; their
averaged displacement ``Δ̄`` is a "block gradient" step, and the server applies heavy-ball
momentum to it (Chen & Huo 2016, BMUF; Hsu, Qi & Brown 2019, FedAvgM; Wang et al. 2020,
SlowMo; Cong & Liu 2020, block momentum on K-step averaging).
"""

from __future__ import annotations

from typing import ClassVar

from strategies.server_optimizers.base import Params, ServerOptimizer


class BlockMomentumOptimizer(ServerOptimizer):
    r"""Classic (CBM) or Nesterov (NBM) block momentum.

    Canonical form, with block learning rate ``η`` (``server_lr``) and block momentum ``μ``::

        u_t = μ u_{t−1} + Δ̄_t            (u_0 = 0)
        x_t = x_{t−1} + η u_t

    **Classic (CBM).** Clients start from ``x_{t−1}``, so ``Δ̄_t = x̄_t − x_{t−1}``.
    Aliases: FedAvgM (Flower: ``pg = x − x̄; v = βv + pg; x = x − η v`` is this rule with
    ``v = −u``, ``β = μ``, ``η_s = η``) and SlowMo (``u ← βu + (x_0 − x̄)/γ; x ← x_0 − αγu``
    is this rule with ``u_SlowMo = −u/γ``, ``β = μ``, ``α = η``, for a constant local lr γ).
    ``μ = 0, η = 1`` is FedAvg / Local SGD.

    **Nesterov (NBM).** BMUF's Nesterov form (Chen & Huo 2016) is::

        G_t    = μ G_{t−1} + ζ (W̄_t − W_g(t−1))
        W_t    = W_{t−1} + G_t
        W_g(t) = W_t + μ G_t           ← clients of round t+1 start here

    Write ``G_t = η u_t`` with ``ζ = η`` and ``W_t = x_t``. Then ``u_t = μ u_{t−1} + Δ̄_t``
    with ``Δ̄_t = W̄_t − W_g(t−1)``, and ``x_t = x_{t−1} + η u_t``: the recurrence is the
    canonical one unchanged, and the only difference is where clients start,

        send_point(x_t) = W_g(t) = x_t + η μ u_t,

    with ``Δ̄`` measured from that look-ahead point. Eliminating ``x`` shows the send points
    follow ``s_t = s_{t−1} + η (Δ̄_t + μ u_t)``, which is PyTorch's
    ``SGD(momentum=μ, nesterov=True, lr=η)`` on the pseudo-gradient ``−Δ̄_t``. The model
    to evaluate or serve is ``x_t`` (``W_t``), the argument of :meth:`send_point`.

    Parameters
    ----------
    server_lr : float
        Block learning rate ``η`` (BMUF ζ, SlowMo α, FedAvgM η_s); 1.0 in the papers.
    momentum : float
        Block momentum ``μ`` in [0, 1). BMUF suggests ``1 − 1/N`` for N workers; SlowMo
        uses 0.4–0.8; under non-IID partial participation smaller values are safer. Tune it.
    nesterov : bool
        Send the look-ahead point ``x + η μ u`` (NBM) instead of ``x`` (CBM).
    """

    name: ClassVar[str] = "block-momentum"
    buffer_names: ClassVar[tuple[str, ...]] = ("momentum",)

    def __init__(self, server_lr: float, momentum: float, nesterov: bool = False) -> None:
        super().__init__(server_lr)
        self.momentum = float(momentum)
        self.nesterov = bool(nesterov)

    def send_point(self, params: Params) -> Params:
        if not self.nesterov or "momentum" not in self._buffers:
            return params
        u = self._buffer("momentum", params)
        look_ahead = self.server_lr * self.momentum
        return {k: x + look_ahead * u[k] for k, x in params.items()}

    def step(self, params: Params, mean_delta: Params) -> Params:
        delta = self._checked_delta(params, mean_delta)
        u = self._buffer("momentum", params)
        # New arrays rather than in-place updates: no buffer ever aliases a caller's array.
        u = {k: self.momentum * u[k] + delta[k] for k in params}
        self._buffers["momentum"] = u
        self.num_steps += 1
        return {k: x + self.server_lr * u[k] for k, x in params.items()}

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(server_lr={self.server_lr}, momentum={self.momentum}, "
            f"nesterov={self.nesterov}, num_steps={self.num_steps})"
        )
