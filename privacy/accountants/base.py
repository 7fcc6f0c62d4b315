"""The accountant interface: compose released events, report ε for a δ, checkpoint as plain data.

Shaped like Opacus's ``IAccountant`` (``opacus/accountants/accountant.py``): a tiny ABC, one module
per method, a name registry. Unlike Opacus, an accountant composes
:class:`~privacy.events.SampledGaussian` mechanisms (one per server round), so the ledger's
events can be replayed into any accountant.

Composition is commutative, so the history is a count per distinct mechanism; rounds that differ
only in clip norm, cohort or participants share one entry, which keeps ε for thousands of rounds
cheap to recompute.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from typing import ClassVar

from privacy.events import RoundRelease, SampledGaussian

Composable = RoundRelease | SampledGaussian


def check_delta(delta: float) -> None:
    """Raise ``ValueError`` unless 0 < δ < 1."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1); got {delta}")


def as_mechanism(event: Composable) -> SampledGaussian:
    """Accounting content of a ledger record or a bare mechanism."""
    if isinstance(event, RoundRelease):
        return event.mechanism
    if isinstance(event, SampledGaussian):
        return event
    raise TypeError(f"expected RoundRelease or SampledGaussian; got {type(event).__name__}")


class Accountant(ABC):
    """Composes sampled-Gaussian releases and converts them to (ε, δ).

    Subclasses implement :meth:`_epsilon` over ``self._counts``; everything else (history,
    adjacency checks, state) lives here.
    """

    name: ClassVar[str]
    #: Most rounds :meth:`epsilon_curve` evaluates by default (``None``: every round).
    curve_points: ClassVar[int | None] = None

    def __init__(self) -> None:
        self._counts: dict[SampledGaussian, int] = {}

    @property
    def sampling(self) -> str | None:
        """Sampling mode of the composed releases (``None`` before the first)."""
        return next(iter(self._counts)).sampling if self._counts else None

    def compose(self, event: Composable, count: int = 1) -> None:
        """Add ``count`` releases of ``event``.

        Raises ``ValueError`` when ``event`` uses another sampling mode than earlier releases:
        add/remove and replace-one guarantees are different statements and do not compose.
        """
        mechanism = as_mechanism(event)
        if count < 0:
            raise ValueError(f"count must be >= 0; got {count}")
        if self.sampling not in (None, mechanism.sampling):
            raise ValueError(
                f"cannot compose a sampling={mechanism.sampling!r} release with earlier "
                f"sampling={self.sampling!r} releases: their adjacency notions differ"
            )
        if count:
            self._counts[mechanism] = self._counts.get(mechanism, 0) + count
            self._history_changed()

    def epsilon(self, delta: float) -> float:
        """ε such that the composed releases are (ε, δ)-DP; 0 before any release, inf if z = 0."""
        check_delta(delta)
        if not self._counts:
            return 0.0
        if any(m.noise_multiplier == 0 for m in self._counts):
            return math.inf
        return float(self._epsilon(delta))

    @abstractmethod
    def _epsilon(self, delta: float) -> float:
        """ε of ``self._counts`` (non-empty, all multipliers > 0) at a valid δ."""

    def _history_changed(self) -> None:
        """Hook for subclasses that cache results derived from ``self._counts``."""

    def __len__(self) -> int:
        """Number of composed releases."""
        return sum(self._counts.values())

    def epsilon_curve(
        self, events: Sequence[Composable], delta: float, at: Iterable[int] | None = None
    ) -> list[tuple[int, float]]:
        """ε after the first k of ``events`` for each k in ``at`` (1-based; see :attr:`curve_points`).

        Evaluated on fresh accountants of the same kind; ``self``'s history is left untouched.
        """
        points = (
            sorted(set(at))
            if at is not None
            else default_curve_points(len(events), self.curve_points)
        )
        if points and not 1 <= points[0] <= points[-1] <= len(events):
            raise ValueError(
                f"curve points must lie in [1, {len(events)}]; got {points[0]}..{points[-1]}"
            )
        curve = []
        fresh = self._fresh()
        done = 0
        for k in points:
            for event in events[done:k]:
                fresh.compose(event)
            done = k
            curve.append((k, fresh.epsilon(delta)))
        return curve

    def _fresh(self) -> Accountant:
        """An empty accountant with this one's settings."""
        return type(self)()

    def state_dict(self) -> dict:
        """Plain JSON-able state: the accountant name and the composed history."""
        return {
            "accountant": self.name,
            "history": [[mechanism.to_dict(), count] for mechanism, count in self._counts.items()],
        }

    def load_state_dict(self, state: dict) -> None:
        """Replace the history with ``state`` from :meth:`state_dict`."""
        if state.get("accountant") != self.name:
            raise ValueError(
                f"state is for accountant {state.get('accountant')!r}, not {self.name!r}"
            )
        self._counts = {}
        for mechanism, count in state["history"]:
            self.compose(SampledGaussian.from_dict(mechanism), int(count))
        self._history_changed()


def default_curve_points(rounds: int, limit: int | None) -> list[int]:
    """All of 1..rounds, or ``limit`` evenly spaced ones that always include the last round."""
    if limit is None or rounds <= limit:
        return list(range(1, rounds + 1))
    step = rounds / limit
    return sorted({max(1, round(step * (i + 1))) for i in range(limit)} | {rounds})
