"""Aggregation of client updates with a running sum, so server memory is O(model), not O(cohort)."""

from __future__ import annotations

import numpy as np

Params = dict[str, np.ndarray]


class RunningWeightedSum:
    """Accumulates ``Σ w_i Δ_i`` and ``Σ w_i`` one update at a time.

    Updates are summed in float64 so the result does not depend on arrival order beyond
    float64 rounding, and each update can be released as soon as it has been added.
    """

    def __init__(self) -> None:
        self._sum: dict[str, np.ndarray] | None = None
        self.total_weight = 0.0
        self.count = 0

    def add(self, update: Params, weight: float = 1.0) -> None:
        if weight < 0 or not np.isfinite(weight):
            raise ValueError(f"aggregation weight must be finite and >= 0, got {weight}")
        if self._sum is None:
            self._sum = {k: np.asarray(v, dtype=np.float64) * weight for k, v in update.items()}
        else:
            if update.keys() != self._sum.keys():
                raise ValueError("update keys differ from the first update's keys")
            for k, v in update.items():
                self._sum[k] += np.multiply(v, weight, dtype=np.float64)
        self.total_weight += weight
        self.count += 1

    @classmethod
    def from_sum(cls, total: Params, total_weight: float, count: int) -> RunningWeightedSum:
        """A partial sum computed elsewhere (a packed worker's reply): ``Σ w_i Δ_i``, ``Σ w_i``, count."""
        if count < 1 or not (np.isfinite(total_weight) and total_weight >= 0):
            raise ValueError(
                f"a partial sum needs count >= 1 and a finite weight >= 0; got count={count}, "
                f"total_weight={total_weight}"
            )
        part = cls()
        part._sum = {k: np.array(v, dtype=np.float64) for k, v in total.items()}
        part.total_weight = float(total_weight)
        part.count = int(count)
        return part

    def sum64(self) -> Params:
        """The weighted sum in float64, as accumulated (for shipping a partial sum exactly)."""
        if self._sum is None:
            raise ValueError("no update was added")
        return dict(self._sum)

    def merge(self, other: RunningWeightedSum) -> None:
        """Add another partial sum (e.g. one pre-aggregated by a packed worker)."""
        if other._sum is None:
            return
        if self._sum is None:
            self._sum = {k: v.copy() for k, v in other._sum.items()}
        else:
            for k, v in other._sum.items():
                self._sum[k] += v
        self.total_weight += other.total_weight
        self.count += other.count

    def sum(self) -> Params:
        """The weighted sum as float32 arrays."""
        if self._sum is None:
            raise ValueError("no update was added")
        return {k: v.astype(np.float32) for k, v in self._sum.items()}

    def mean(self, denominator: float | None = None) -> Params:
        """``Σ w_i Δ_i / denominator`` (default ``Σ w_i``) as float32 arrays."""
        if self._sum is None:
            raise ValueError("no update was added")
        denom = self.total_weight if denominator is None else denominator
        if denom <= 0:
            raise ValueError(f"aggregation denominator must be > 0, got {denom}")
        return {k: (v / denom).astype(np.float32) for k, v in self._sum.items()}


def weighted_mean(updates: list[Params], weights: list[float]) -> Params:
    """Reference list aggregation (holds every update): ``Σ w_i Δ_i / Σ w_i``."""
    total = float(sum(weights))
    return {
        k: (sum(np.asarray(u[k], np.float64) * w for u, w in zip(updates, weights)) / total).astype(
            np.float32
        )
        for k in updates[0]
    }


class WeightedScalars:
    """Example-weighted means of per-client scalar metrics (losses, accuracies, timings)."""

    def __init__(self) -> None:
        self._sums: dict[str, float] = {}
        self._weights: dict[str, float] = {}

    def add(self, metrics: dict, weight: float) -> None:
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v):
                self._sums[k] = self._sums.get(k, 0.0) + float(v) * weight
                self._weights[k] = self._weights.get(k, 0.0) + weight

    def means(self) -> dict[str, float]:
        return {k: self._sums[k] / self._weights[k] for k in self._sums if self._weights[k] > 0}
