"""The client pipeline: load global → local training → delta → encode, on plain arrays.

One function, :func:`client_update`, that knows nothing about Flower messages or which
simulation layout runs it. The ClientApp calls it for its one client; anything that hosts
many virtual clients can call it per client. Per-client state (error-feedback memory, codec
statistics) goes in and comes out as a plain dict of arrays.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from fedclient.dpsgd_training import STATE_PREFIX as DPSGD_PREFIX
from fedclient.dpsgd_training import DpSgdSpec, train_local_dpsgd
from fedclient.training import LocalTraining, params_delta, set_params, train_local

Params = dict[str, np.ndarray]


@dataclass
class ClientOutcome:
    """What one client sends back, plus its updated private state."""

    payload: dict[str, np.ndarray]  # arrays that go on the wire (encoded delta)
    header: dict[str, int | float | str | bool]  # codec header
    metrics: dict[str, float]  # includes "num-examples"
    state: Params = field(default_factory=dict)


def client_update(
    model: nn.Module,
    sent: Params,
    x: torch.Tensor,
    y: torch.Tensor,
    spec: LocalTraining,
    generator: torch.Generator,
    *,
    encoder=None,
    state: Params | None = None,
    transform=None,
    dpsgd: DpSgdSpec | None = None,
) -> ClientOutcome:
    """Train from ``sent`` and return the encoded delta ``trained − sent``.

    Parameters
    ----------
    encoder : UpdateEncoder, optional
        Client-side update transform (clipping/normalization for client-side DP, then codec
        with error feedback). ``None`` sends the float32 delta as is.
    state : dict, optional
        This client's private state from earlier rounds (``{}`` the first time).
    transform : callable, optional
        This round's pre-encoding transform (client-side DP clipping to the current C).
    dpsgd : DpSgdSpec, optional
        Train with sample-level DP-SGD (:mod:`fedclient.dpsgd_training`); the client's
        accountant history lives in ``state`` and its ε is reported as ``dpsgd_epsilon``.
        ``generator`` is then unused: DP-SGD draws batches and noise from OS entropy.
    """
    start = time.perf_counter()
    set_params(model, sent)
    state = dict(state or {})
    extra: dict[str, float] = {}
    if dpsgd is None:
        result = train_local(model, x, y, spec, generator)
    else:
        result, history, extra["dpsgd_epsilon"] = train_local_dpsgd(model, x, y, spec, dpsgd, state)
        state = {k: v for k, v in state.items() if not k.startswith(DPSGD_PREFIX)} | history
    delta = params_delta(model, sent)
    train_time = time.perf_counter() - start
    metrics = {
        "num-examples": result.num_examples,
        "train_loss": result.loss,
        "local_steps": result.steps,
        "train_time_s": train_time,
        **extra,
    }
    if encoder is None:
        return ClientOutcome(payload=delta, header={}, metrics=metrics, state=state)
    payload, header, new_state, encoded = encoder.encode(delta, state, transform)
    metrics.update(encoded)
    return ClientOutcome(payload=payload, header=header, metrics=metrics, state=new_state)
