"""The plain single-threaded PyTorch loop that federated rounds are timed against.

:func:`plain_fedavg` trains a cohort of clients one after another with nothing but PyTorch:
load the global weights, mini-batch SGD over the client's examples, add the example-weighted
delta to a running sum, and take the FedAvg step. It is what a researcher would write without
any framework, so "round time / plain-loop time" measures what a layout costs on top of the
training itself (``pollen bench scale``).

It does the same work as a Pollen round of FedAvg without DP or compression: the same
lazily generated client data (:meth:`simulations.datasets.FederatedData.partition`), the same
model and initialisation, the same cohorts (:class:`strategies.sampling.FixedSizeSampler`
over the client ids) and the same batch order (seeded per round and client), so its model
also serves as an independent reference for the packed layout's result.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from fedclient.components import data_spec, federated_data, new_model
from fedclient.training import PlainSGD, seeded_generator
from fedserver.config import RunConfig
from strategies.sampling import FixedSizeSampler


@dataclass
class PlainLoopResult:
    """Per-round wall times (seconds) and the final global model of :func:`plain_fedavg`."""

    round_s: list[float] = field(default_factory=list)
    params: dict[str, np.ndarray] = field(default_factory=dict)
    clients_per_round: int = 0

    @property
    def steady_round_s(self) -> float:
        """Median round time after the first (which pays one-off warm-up)."""
        steady = self.round_s[1:] or self.round_s
        return float(np.median(steady))


def plain_fedavg(
    cfg: RunConfig,
    *,
    num_clients: int,
    num_rounds: int | None = None,
    threads: int = 1,
    sgd: str = "torch",
) -> PlainLoopResult:
    """Run FedAvg rounds as a plain PyTorch loop and time each round.

    Parameters
    ----------
    cfg : RunConfig
        Data, model, local training (``local-epochs``/``local-steps``, ``lr``, ``momentum``,
        ``weight-decay``, ``batch-size``), ``clients-per-round``, ``server-lr`` and ``seed``
        are used; ``strategy`` must be ``fedavg`` (other keys are ignored).
    num_clients : int
        Population the cohorts are drawn from.
    num_rounds : int, optional
        Defaults to ``cfg.num_server_rounds``.
    threads : int
        torch intra-op threads for the loop (1: single-threaded; restored afterwards).
    sgd : {"torch", "plain"}
        ``"torch"``: a fresh ``torch.optim.SGD`` per client, as a researcher would write it
        (the baseline of ``pollen bench scale``'s goal). ``"plain"``: Pollen's
        :class:`fedclient.training.PlainSGD` (the same update, bitwise), which both of
        Pollen's layouts train with — it separates what the lighter optimizer step buys
        from what the layout buys.
    """
    if cfg.strategy != "fedavg":
        raise ValueError(f"plain_fedavg implements strategy='fedavg' only, got {cfg.strategy!r}")
    if sgd not in ("torch", "plain"):
        raise ValueError(f"sgd must be 'torch' or 'plain', got {sgd!r}")
    rounds = cfg.num_server_rounds if num_rounds is None else num_rounds
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        data = federated_data(data_spec(cfg), num_clients)
        model = new_model(cfg, data.input_shape, data.num_classes)
        global_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        sampler = FixedSizeSampler(cfg.clients_per_round, cfg.seed)
        result = PlainLoopResult(clients_per_round=min(cfg.clients_per_round, num_clients))
        loss_fn = nn.CrossEntropyLoss()
        for server_round in range(1, rounds + 1):
            started = time.perf_counter()
            total = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in global_state.items()}
            weight = 0
            for client in sampler.sample(server_round, range(num_clients)):
                part = data.partition(client)
                x = torch.as_tensor(part.x, dtype=torch.float32)
                y = torch.as_tensor(part.y, dtype=torch.long)
                model.load_state_dict(global_state)
                optimizer = (torch.optim.SGD if sgd == "torch" else PlainSGD)(
                    model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                    weight_decay=cfg.weight_decay,
                )
                model.train()
                generator = seeded_generator(cfg.seed, server_round, client)
                for batch in _batches(len(y), cfg, generator):
                    optimizer.zero_grad()
                    loss_fn(model(x[batch]), y[batch]).backward()
                    optimizer.step()
                n = len(y)
                with torch.no_grad():
                    for k, v in model.state_dict().items():
                        total[k] += (v - global_state[k]).to(torch.float64) * n
                weight += n
            with torch.no_grad():
                for k, value in global_state.items():
                    step = (total[k] / weight).to(value.dtype)
                    global_state[k] = value + cfg.server_lr * step
            result.round_s.append(time.perf_counter() - started)
        result.params = {k: v.numpy().copy() for k, v in global_state.items()}
        return result
    finally:
        torch.set_num_threads(previous_threads)


def _batches(n: int, cfg: RunConfig, generator: torch.Generator):
    """``local-epochs`` reshuffled passes in batches, or exactly ``local-steps`` batches."""
    steps = 0
    epoch = 0
    while True:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, cfg.batch_size):
            yield order[start : start + cfg.batch_size]
            steps += 1
            if cfg.local_steps and steps == cfg.local_steps:
                return
        epoch += 1
        if not cfg.local_steps and epoch == cfg.local_epochs:
            return
