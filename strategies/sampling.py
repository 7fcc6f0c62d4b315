"""Cohort sampling: which clients train in a round, deterministic for a seed and round."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def round_rng(seed: int, server_round: int, stream: int = 0) -> np.random.Generator:
    """An independent, reproducible generator per (seed, round, purpose).

    Deriving a fresh generator per round (rather than advancing one global generator) keeps
    a resumed run on exactly the trajectory of an uninterrupted one.
    """
    return np.random.default_rng([seed, server_round, stream])


class FixedSizeSampler:
    """Samples ``m`` of the available clients uniformly without replacement."""

    sampling = "fixed"

    def __init__(self, clients_per_round: int, seed: int) -> None:
        if clients_per_round < 1:
            raise ValueError(f"clients_per_round must be >= 1, got {clients_per_round}")
        self.clients_per_round = clients_per_round
        self.seed = seed

    def sample(self, server_round: int, clients: Sequence[int], attempt: int = 0) -> list[int]:
        """The round's cohort; a retry (``attempt`` > 0) draws an independent one.

        ``clients`` may be a ``range`` (the packed layout's virtual client ids), which is
        indexed as it is: no per-population list is built.
        """
        ordered = clients if isinstance(clients, range) and clients.step > 0 else sorted(clients)
        m = min(self.clients_per_round, len(ordered))
        rng = round_rng(self.seed, server_round) if attempt == 0 else np.random.default_rng(
            [self.seed, server_round, 0, attempt]
        )
        idx = rng.choice(len(ordered), size=m, replace=False)
        return [ordered[i] for i in sorted(idx)]
