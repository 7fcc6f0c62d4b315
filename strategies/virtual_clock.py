"""Simulated client compute times: a seeded virtual clock that makes client speeds heterogeneous.

In a simulation every client trains on the same machine, so real timing says nothing about
how a federation of phones or edge boxes would behave, and it is not reproducible. The
virtual clock gives each dispatched job a *simulated* duration instead, drawn from a
generator keyed only by ``(seed, node id, job index)``:

``duration = exp(σ z − σ²/2) × (slowdown if the node is a straggler else 1)``,  ``z ~ N(0, 1)``

The lognormal factor has mean 1, so one simulated time unit is the mean duration of a job
on a node that is not a straggler. A fixed ``straggler_fraction`` of the nodes (chosen by the
seed) is ``straggler_slowdown`` times slower on every job.

The drivers use it in two ways:

* synchronous rounds wait for the slowest client of the cohort, so a round takes
  ``max`` over the cohort's durations (:meth:`VirtualClock.advance_round`);
* the asynchronous driver gives every job a simulated finish time and applies replies in
  order of finish time, so its trajectory depends on the seed only, never on real timing.

Because durations do not depend on the order in which they are asked for, a resumed run
only needs :attr:`VirtualClock.now` (its :meth:`~VirtualClock.state_dict`) to continue
on the same simulated timeline.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

# Streams keep the clock's draws independent of every other seeded generator in Pollen.
_DURATION_STREAM = 7_001
_STRAGGLER_STREAM = 7_002


@dataclass(frozen=True)
class ClockSpec:
    """Distribution of simulated job durations; validated on construction.

    Parameters
    ----------
    sigma : float
        σ ≥ 0 of the lognormal per-job factor (0: every job of a normal node takes exactly
        one time unit).
    straggler_fraction : float
        Fraction in [0, 1] of the nodes that are stragglers; ``round(fraction × nodes)`` of
        them are chosen.
    straggler_slowdown : float
        Factor ≥ 1 by which every job of a straggler is slower.
    """

    sigma: float = 0.5
    straggler_fraction: float = 0.0
    straggler_slowdown: float = 5.0

    def __post_init__(self) -> None:
        for name, value in (
            ("sigma", self.sigma),
            ("straggler_fraction", self.straggler_fraction),
            ("straggler_slowdown", self.straggler_slowdown),
        ):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a real number, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"{name} must be finite, got {value!r}")
        if self.sigma < 0:
            raise ValueError(f"sigma must be >= 0, got {self.sigma}")
        if not 0.0 <= self.straggler_fraction <= 1.0:
            raise ValueError(f"straggler_fraction must be in [0, 1], got {self.straggler_fraction}")
        if self.straggler_slowdown < 1.0:
            raise ValueError(f"straggler_slowdown must be >= 1, got {self.straggler_slowdown}")


def choose_stragglers(seed: int, node_ids: Iterable[int], fraction: float) -> frozenset[int]:
    """The ``round(fraction × n)`` nodes with the smallest seeded uniform key.

    Each node's key depends only on ``(seed, node id)``, so the choice does not depend on
    the order nodes are listed in, and exactly the requested share is slow (a per-node coin
    flip would give anything from none to all of them in a small federation).
    """
    nodes = sorted({int(n) for n in node_ids})
    count = math.floor(fraction * len(nodes) + 0.5)
    keys = [np.random.default_rng([seed, node, _STRAGGLER_STREAM]).random() for node in nodes]
    ranked = sorted(zip(keys, nodes))
    return frozenset(node for _, node in ranked[:count])


class VirtualClock:
    """Seeded simulated durations for jobs, and the simulated time ``now`` of a run.

    Parameters
    ----------
    spec : ClockSpec
        Duration distribution and stragglers.
    seed : int
        The run's seed.
    node_ids : iterable of int
        The federation's nodes; the stragglers are chosen among them.
    """

    def __init__(self, spec: ClockSpec, seed: int, node_ids: Iterable[int]) -> None:
        self.spec = spec
        self.seed = int(seed)
        self.stragglers = choose_stragglers(self.seed, node_ids, spec.straggler_fraction)
        self.now = 0.0

    def duration(self, node_id: int, job_index: int) -> float:
        """Simulated duration of job ``job_index`` on ``node_id`` (a pure function of both and the seed)."""
        if job_index < 0:
            raise ValueError(f"job_index must be >= 0, got {job_index}")
        sigma = self.spec.sigma
        z = np.random.default_rng([self.seed, int(node_id), int(job_index), _DURATION_STREAM]).standard_normal()
        base = math.exp(sigma * z - 0.5 * sigma * sigma)
        return base * (self.spec.straggler_slowdown if node_id in self.stragglers else 1.0)

    def advance_to(self, time: float) -> None:
        """Move ``now`` forward to ``time`` (events are processed in time order)."""
        if time < self.now:
            raise ValueError(f"the virtual clock cannot go back from {self.now} to {time}")
        self.now = float(time)

    def round_duration(self, cohort: Iterable[int], server_round: int) -> float:
        """A synchronous round's duration: the slowest cohort member's job (0 for no cohort)."""
        return max((self.duration(node, server_round) for node in cohort), default=0.0)

    def advance_round(self, cohort: Iterable[int], server_round: int) -> float:
        """Advance ``now`` by :meth:`round_duration` and return the new ``now``."""
        self.now += self.round_duration(cohort, server_round)
        return self.now

    def state_dict(self) -> dict[str, float]:
        """What a checkpoint needs: the simulated time (durations are recomputed from the seed)."""
        return {"now": self.now}

    def load_state_dict(self, state: Mapping[str, float]) -> None:
        now = float(state["now"])
        if not math.isfinite(now) or now < 0:
            raise ValueError(f"virtual clock state 'now' must be finite and >= 0, got {now}")
        self.now = now

    def __repr__(self) -> str:
        return (
            f"VirtualClock(sigma={self.spec.sigma}, stragglers={len(self.stragglers)} "
            f"x{self.spec.straggler_slowdown}, now={self.now:.3f})"
        )
