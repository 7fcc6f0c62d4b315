"""Bounded staleness for the asynchronous driver: which late updates to accept, how to weight them,
and the recent model versions their deltas are measured against.

In asynchronous FL (APAM, Xu et al. 2020; FedAsync, Xie et al. 2019) the server applies each
client's update as it arrives. A client that started from model version ``j`` and arrives
when the server is at version ``k`` has staleness ``τ = k − j``. Convergence guarantees need
``τ ≤ τ_max``, so :class:`StalenessPolicy` drops anything staler, and may down-weight stale
updates. :class:`ModelVersions` keeps exactly the versions an acceptable update can have
started from, so the delta is ``x_client − x_j`` rather than ``x_client − x_k``.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

Params = dict[str, np.ndarray]

STALENESS_WEIGHTINGS: tuple[str, ...] = ("constant", "polynomial")
"""Allowed ``StalenessPolicy.weighting`` values."""


@dataclass(frozen=True)
class StalenessPolicy:
    """Accept updates with staleness ``≤ max_staleness`` and weight them by staleness.

    Parameters
    ----------
    max_staleness : int
        τ_max ≥ 0; updates staler than this are dropped. 0 accepts only updates computed
        on the current model (synchronous behaviour).
    weighting : str
        ``"constant"``: every accepted update has weight 1 (APAM). ``"polynomial"``:
        weight ``(1 + τ)^(−exponent)``, FedAsync's polynomial staleness function, which
        shrinks the step of stale updates.
    exponent : float
        The exponent ``a ≥ 0`` of the polynomial weighting (FedAsync uses 0.5).
    """

    max_staleness: int
    weighting: str = "constant"
    exponent: float = 0.5

    def __post_init__(self) -> None:
        if isinstance(self.max_staleness, bool) or not isinstance(self.max_staleness, int):
            raise TypeError(f"max_staleness must be an int, got {self.max_staleness!r}")
        if self.max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0, got {self.max_staleness}")
        if self.weighting not in STALENESS_WEIGHTINGS:
            raise ValueError(
                f"weighting must be one of {STALENESS_WEIGHTINGS}, got {self.weighting!r}"
            )
        if not (math.isfinite(self.exponent) and self.exponent >= 0):
            raise ValueError(f"exponent must be finite and >= 0, got {self.exponent}")

    def accept(self, staleness: int) -> bool:
        """Whether an update ``staleness`` versions old may be applied."""
        _check_staleness(staleness)
        return staleness <= self.max_staleness

    def weight(self, staleness: int) -> float:
        """Multiplier for an update's delta: 1, or ``(1 + staleness)^(−exponent)``.

        Defined for any staleness ≥ 0, so drivers can log the weight of a dropped update too.
        """
        _check_staleness(staleness)
        if self.weighting == "constant":
            return 1.0
        return float((1.0 + staleness) ** -self.exponent)


def _check_staleness(staleness: int) -> None:
    if staleness < 0:
        raise ValueError(
            f"staleness must be >= 0 (a client cannot start from a future model), got {staleness}"
        )


class ModelVersions:
    """Ring buffer of the last ``max_staleness + 1`` models sent to clients.

    Version ids count up from 0, one per :meth:`publish`. Publishing version ``k`` drops
    version ``k − max_staleness − 1``: an update started from it would have staleness
    ``> max_staleness`` and be rejected anyway, so the server holds at most
    ``max_staleness + 1`` models. Stored arrays are private read-only copies, so neither
    the caller nor a client-side consumer can change a version after it was sent.

    Publish the point clients actually start from (``ServerOptimizer.send_point``), since
    client deltas are measured against it.
    """

    def __init__(self, max_staleness: int) -> None:
        if isinstance(max_staleness, bool) or not isinstance(max_staleness, int):
            raise TypeError(f"max_staleness must be an int, got {max_staleness!r}")
        if max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0, got {max_staleness}")
        self.max_staleness = max_staleness
        self._versions: OrderedDict[int, Params] = OrderedDict()
        self._next_version = 0

    @property
    def current_version(self) -> int:
        """Id of the most recently published version."""
        if not self._versions:
            raise ValueError("no model version has been published yet")
        return self._next_version - 1

    @property
    def held_versions(self) -> tuple[int, ...]:
        """Ids of the versions still held, oldest first."""
        return tuple(self._versions)

    def publish(self, params: Params) -> int:
        """Store a copy of ``params`` as the next version; return its id."""
        frozen: Params = {}
        for key, value in params.items():
            array = np.array(value, copy=True)
            array.flags.writeable = False
            frozen[key] = array
        version = self._next_version
        self._versions[version] = frozen
        self._next_version += 1
        while len(self._versions) > self.max_staleness + 1:
            self._versions.popitem(last=False)
        return version

    def staleness(self, version: int) -> int:
        """``current_version − version``; valid also for versions already dropped."""
        current = self.current_version
        if not 0 <= version <= current:
            raise ValueError(f"version must be in [0, {current}], got {version}")
        return current - version

    def __contains__(self, version: object) -> bool:
        return version in self._versions

    def get(self, version: int) -> Params:
        """The (read-only) model published as ``version``."""
        if version not in self._versions:
            raise KeyError(
                f"model version {version} is not held (held: {self.held_versions}); "
                f"its staleness {self.staleness(version)} exceeds max_staleness "
                f"{self.max_staleness}"
                if 0 <= version < self._next_version
                else f"model version {version} was never published"
            )
        return self._versions[version]

    def delta(self, version: int, client_params: Params) -> Params:
        """``client_params − get(version)``: the client's update relative to where it started."""
        start = self.get(version)
        if client_params.keys() != start.keys():
            raise ValueError(
                f"client params keys {sorted(client_params)} differ from version {version}'s "
                f"keys {sorted(start)}"
            )
        delta: Params = {}
        for key, base in start.items():
            value = np.asarray(client_params[key])
            if value.shape != base.shape:
                raise ValueError(
                    f"client params[{key!r}] has shape {value.shape}, version {version} has "
                    f"{base.shape}"
                )
            delta[key] = value.astype(base.dtype, copy=False) - base
        return delta
