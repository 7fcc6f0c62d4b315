"""Local training with sample-level DP-SGD (Opacus), and the client's accountant state.

With ``dpsgd=true`` a client trains its round with :func:`train_local_dpsgd` instead of
:func:`fedclient.training.train_local`: Poisson-sampled batches, per-example gradients clipped
to ``dpsgd-max-grad-norm``, Gaussian noise on every batch sum (:mod:`privacy.dpsgd`). This
protects each *training example* of the client against everyone who sees its updates — the
server included — independently of any central (user-level) DP on the server.

Each client's ε composes over every round it trains in. Opacus's RDP history
``[(z, q, steps), …]`` is kept in the client's private state (``context.state`` or a
state directory, both dict-of-arrays stores) under the ``dpsgd/`` keys, and the client reports
its own ε at ``dp-delta`` as the metric ``dpsgd_epsilon``.

Why the noise is not seeded from the run's ``seed``: the seed is in the run config, which the
server knows, and noise that the server can regenerate protects nothing against it. Batches and
noise come from a generator seeded from OS entropy; the rest of the process's random streams
are left as they were (``torch.random.fork_rng``). DP-SGD runs are therefore not bit-for-bit
reproducible. That generator is PyTorch's Mersenne Twister, not a cryptographic one (Opacus's
``secure_mode`` needs ``torchcsprng``): fine for research, not for an adversary who can attack
the generator itself.

The model object is trained in place and unwrapped afterwards (Opacus's hooks and per-sample
attributes removed), so a model cached per process can serve the next client or round, with or
without DP-SGD.
"""

from __future__ import annotations

import math
import secrets
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedclient.training import LocalTraining, TrainResult

Params = dict[str, np.ndarray]

#: Prefix of the client-state keys that hold the DP-SGD accountant history.
STATE_PREFIX = "dpsgd/"
_HISTORY_KEYS = ("noise_multiplier", "sample_rate", "steps")


@dataclass(frozen=True)
class DpSgdSpec:
    """How a client runs DP-SGD (the ``dpsgd-*`` keys, and ``dp-delta`` for its ε).

    Parameters
    ----------
    noise_multiplier
        z ≥ 0: noise std on each batch's clipped gradient sum is z·``max_grad_norm``.
    max_grad_norm
        L2 bound of each example's gradient (> 0).
    delta
        δ in (0, 1) at which the client's ε is reported; choose it below 1/(its examples).
    """

    noise_multiplier: float = 1.0
    max_grad_norm: float = 1.0
    delta: float = 1e-5

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid setting and what is allowed."""
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0):
            raise ValueError(
                f"dpsgd noise_multiplier must be a finite number >= 0; got {self.noise_multiplier}"
            )
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise ValueError(
                f"dpsgd max_grad_norm must be a finite number > 0; got {self.max_grad_norm}"
            )
        if not 0 < self.delta < 1:
            raise ValueError(f"dpsgd delta must be in (0, 1); got {self.delta}")


def history_to_arrays(accountant_state: dict) -> Params:
    """Opacus RDP history (``PrivateTraining.accountant_state()``) → client-state arrays."""
    history = accountant_state["history"]
    columns = list(zip(*history)) if history else [(), (), ()]
    return {
        STATE_PREFIX + "noise_multiplier": np.asarray(columns[0], dtype=np.float64),
        STATE_PREFIX + "sample_rate": np.asarray(columns[1], dtype=np.float64),
        STATE_PREFIX + "steps": np.asarray(columns[2], dtype=np.int64),
    }


def history_from_arrays(state: Params) -> dict | None:
    """The accountant state stored by :func:`history_to_arrays` (``None`` if there is none)."""
    keys = [STATE_PREFIX + name for name in _HISTORY_KEYS]
    if not any(key in state for key in keys):
        return None
    missing = [key for key in keys if key not in state]
    if missing:
        raise ValueError(f"client state holds a partial DP-SGD history: {missing} missing")
    z, q, steps = (np.asarray(state[key]).reshape(-1) for key in keys)
    if not len(z) == len(q) == len(steps):
        raise ValueError(
            f"client state DP-SGD history columns differ in length: {len(z)}, {len(q)}, {len(steps)}"
        )
    history = [[float(a), float(b), int(c)] for a, b, c in zip(z, q, steps)]
    return {"mechanism": "rdp", "history": history}


def with_spent_history(state: Params, latest: Params) -> Params:
    """``state`` with its DP-SGD history replaced by the one in ``latest`` (newest saved state).

    The client state store hands a round that runs again (a retry after too few replies, or a
    re-run after the server crashed) the state from *before* that round, so that error feedback
    restarts identically. The privacy accountant must not go back with it: the first attempt's
    update was sent, so its steps are spent, and ε has to keep them.
    """
    kept = {k: v for k, v in state.items() if not k.startswith(STATE_PREFIX)}
    return kept | {k: v for k, v in latest.items() if k.startswith(STATE_PREFIX)}


def client_dpsgd_epsilon(state: Params, delta: float) -> float:
    """ε of the DP-SGD history in a client's state at ``delta`` (0 before its first step)."""
    from privacy.dpsgd import client_epsilon

    return client_epsilon(history_from_arrays(state), delta)


def _devices(device: torch.device) -> list[int]:
    """CUDA devices whose RNG state ``fork_rng`` must save and restore."""
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


def train_local_dpsgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    spec: LocalTraining,
    dp: DpSgdSpec,
    state: Params | None = None,
) -> tuple[TrainResult, Params, float]:
    """DP-SGD on (x, y) in place, continuing the client's accountant history.

    The round runs ``spec.steps`` optimizer steps if that is positive, else ``spec.epochs``
    passes of ``⌈n / batch_size⌉`` Poisson batches (expected size ``batch_size``, sample rate
    q = 1/⌈n / batch_size⌉). SGD with ``lr``, ``momentum`` and ``weight_decay`` as in
    :func:`fedclient.training.train_local`, on the clipped, noised mean gradient.

    Returns
    -------
    (TrainResult, state, epsilon)
        ``state`` holds only the ``dpsgd/`` arrays (merge it into the client's state);
        ``epsilon`` is the client's ε at ``dp.delta`` over all its rounds so far.
    """
    from privacy.dpsgd import make_private

    dp.validate()
    n = int(x.shape[0])
    if n == 0:
        raise ValueError("cannot train on an empty partition")
    loader = DataLoader(TensorDataset(x, y), batch_size=spec.batch_size)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay
    )
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    own_attributes = {param: set(vars(param)) for param in model.parameters()}
    with torch.random.fork_rng(devices=_devices(x.device)):
        torch.manual_seed(secrets.randbits(63))
        with warnings.catch_warnings():
            # Said once in this module's docstring instead of on every client and round.
            warnings.filterwarnings("ignore", message="Secure RNG turned off")
            training = make_private(
                model,
                optimizer,
                loader,
                noise_multiplier=dp.noise_multiplier,
                max_grad_norm=dp.max_grad_norm,
                accountant_state=history_from_arrays(state or {}),
            )
        try:
            per_epoch = len(training.data_loader)
            steps = spec.steps if spec.steps > 0 else spec.epochs * per_epoch
            total, losses = 0.0, 0
            batches = iter(training.data_loader)
            for _ in range(steps):
                try:
                    features, labels = next(batches)
                except StopIteration:
                    batches = iter(training.data_loader)
                    features, labels = next(batches)
                training.optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(training.module(features), labels)
                with warnings.catch_warnings():
                    # Opacus's backward hooks fire on the first layer, whose input needs no
                    # gradient; PyTorch warns about that, harmlessly, on every model.
                    warnings.filterwarnings("ignore", message="Full backward hook is firing")
                    loss.backward()
                # An empty Poisson batch still takes its (pure-noise) step: the accountant
                # counts every step, and skipping one would reveal the batch was empty.
                training.optimizer.step()
                if features.shape[0] > 0:
                    total += float(loss.detach())
                    losses += 1
        finally:
            # Leave the (possibly cached) model object as it was: no Opacus hooks, and no
            # per-sample or summed gradients left on its parameters.
            training.module.cleanup()
            for param, attributes in own_attributes.items():
                for name in set(vars(param)) - attributes:
                    delattr(param, name)
                param.grad = None
    accountant = training.accountant_state()
    result = TrainResult(loss=total / losses if losses else math.nan, num_examples=n, steps=steps)
    return result, history_to_arrays(accountant), training.epsilon(dp.delta)
