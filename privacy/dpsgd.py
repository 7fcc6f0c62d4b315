"""Sample-level DP-SGD on one client with Opacus, and that client's own ε across FL rounds.

Central DP (:mod:`privacy.mechanisms`) protects a whole client; DP-SGD protects each training
example of a client against everyone else, the server included. Each round the client wraps its
freshly loaded model with :func:`make_private`, trains, and keeps Opacus's RDP accountant history
in its per-client state (``context.state`` or a state directory) as plain lists, so its ε keeps
composing across the rounds it joins. ε uses Opacus's RDP accountant (Poisson-sampled batches,
add/remove-one example adjacency).
"""

from __future__ import annotations

from dataclasses import dataclass

from opacus import PrivacyEngine
from opacus.accountants import RDPAccountant
from opacus.optimizers import DPOptimizer
from torch import nn, optim
from torch.utils.data import DataLoader

_MECHANISM = RDPAccountant.mechanism()


def _history(state: dict | None) -> list[tuple[float, float, int]]:
    """Opacus history ``[(noise_multiplier, sample_rate, steps), …]`` from a plain-list state."""
    if not state:
        return []
    if state.get("mechanism") != _MECHANISM:
        raise ValueError(
            f"DP-SGD accountant state is for {state.get('mechanism')!r}, expected {_MECHANISM!r}"
        )
    return [(float(z), float(q), int(steps)) for z, q, steps in state["history"]]


@dataclass
class PrivateTraining:
    """The Opacus-wrapped training objects of one round, plus the client's accountant.

    Train with ``module``, ``optimizer`` and ``data_loader`` as usual (``module`` shares its
    parameters with the model passed to :func:`make_private`).
    """

    module: nn.Module
    optimizer: DPOptimizer
    data_loader: DataLoader
    engine: PrivacyEngine

    def epsilon(self, delta: float) -> float:
        """The client's ε over all its DP-SGD steps so far, this round's included."""
        return client_epsilon(self.accountant_state(), delta)

    def accountant_state(self) -> dict:
        """JSON-able accountant state to keep in the client's state between rounds."""
        return {
            "mechanism": _MECHANISM,
            "history": [
                [float(z), float(q), int(steps)] for z, q, steps in self.engine.accountant.history
            ],
        }


def make_private(
    model: nn.Module,
    optimizer: optim.Optimizer,
    data_loader: DataLoader,
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    accountant_state: dict | None = None,
    poisson_sampling: bool = True,
    secure_mode: bool = False,
) -> PrivateTraining:
    """Wrap model, optimizer and loader for DP-SGD, resuming the client's accountant history.

    Parameters
    ----------
    noise_multiplier
        Std of the per-batch noise divided by ``max_grad_norm``.
    max_grad_norm
        Per-example gradient L2 clip.
    accountant_state
        What :meth:`PrivateTraining.accountant_state` returned in the client's previous round.
    poisson_sampling
        Poisson batches, as Opacus's RDP analysis assumes; turn off only for debugging.
    secure_mode
        Cryptographically secure noise (Opacus's ``secure_mode``; slower, needs ``torchcsprng``).
    """
    if not noise_multiplier >= 0:
        raise ValueError(f"noise_multiplier must be >= 0; got {noise_multiplier}")
    if not max_grad_norm > 0:
        raise ValueError(f"max_grad_norm must be > 0; got {max_grad_norm}")
    engine = PrivacyEngine(accountant=_MECHANISM, secure_mode=secure_mode)
    engine.accountant.history = _history(accountant_state)
    module, dp_optimizer, dp_loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=data_loader,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        poisson_sampling=poisson_sampling,
    )
    return PrivateTraining(module, dp_optimizer, dp_loader, engine)


def client_epsilon(accountant_state: dict | None, delta: float) -> float:
    """ε of a client's DP-SGD history (0 before its first step)."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1); got {delta}")
    history = _history(accountant_state)
    if not history:
        return 0.0
    accountant = RDPAccountant()
    accountant.history = history
    return float(accountant.get_epsilon(delta))
