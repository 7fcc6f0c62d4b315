"""Privacy budget arithmetic: ε of a planned run, z for a target ε, and the run's budget stop."""

from __future__ import annotations

import copy
import math

from privacy.accountants.base import Accountant, Composable, as_mechanism, check_delta
from privacy.accountants.registry import build_accountant
from privacy.events import SampledGaussian

#: Largest z :func:`plan_noise_multiplier` tries before declaring a target unreachable.
MAX_NOISE_MULTIPLIER = 1000.0


def planned_mechanism(
    noise_multiplier: float,
    sample_rate: float,
    sampling: str = "poisson",
    population: int | None = None,
) -> SampledGaussian:
    """The per-round mechanism of a planned run.

    ``fixed`` needs ``population`` N, and q·N must be a whole number of clients m.
    """
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate (q) must be in (0, 1]; got {sample_rate}")
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise ValueError(
            f"noise_multiplier (z) must be a finite number >= 0; got {noise_multiplier}"
        )
    if sampling == "poisson":
        return SampledGaussian.poisson(noise_multiplier, sample_rate)
    if sampling != "fixed":
        raise ValueError(f"sampling must be 'poisson' or 'fixed'; got {sampling!r}")
    if population is None or population < 1:
        raise ValueError(f"sampling='fixed' needs population N >= 1; got {population}")
    cohort = sample_rate * population
    if abs(cohort - round(cohort)) > 1e-6 * max(1.0, cohort) or round(cohort) < 1:
        raise ValueError(
            "sampling='fixed' needs q·N to be a whole number of clients; "
            f"got {sample_rate}·{population}={cohort:g}"
        )
    return SampledGaussian.fixed(noise_multiplier, population, round(cohort))


def _check_rounds(rounds: int) -> None:
    if int(rounds) != rounds or rounds < 1:
        raise ValueError(f"rounds (T) must be a whole number >= 1; got {rounds}")


def epsilon_for(
    noise_multiplier: float,
    sample_rate: float,
    rounds: int,
    delta: float,
    sampling: str = "poisson",
    accountant: str = "rdp",
    population: int | None = None,
) -> float:
    """ε after ``rounds`` identical releases (z, q) at δ."""
    check_delta(delta)
    _check_rounds(rounds)
    mechanism = planned_mechanism(noise_multiplier, sample_rate, sampling, population)
    composed = build_accountant(accountant)
    composed.compose(mechanism, int(rounds))
    return composed.epsilon(delta)


def plan_noise_multiplier(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    rounds: int,
    sampling: str = "poisson",
    accountant: str = "rdp",
    population: int | None = None,
    rtol: float = 1e-3,
) -> float:
    """Smallest z (to relative tolerance ``rtol``) with ``epsilon_for(z, …) ≤ target_epsilon``.

    Bisection in log z; the returned z always meets the target (it is the upper end of the final
    bracket). Raises ``ValueError`` if even z = 1000 does not: RDP's conversion has an ε floor
    (≈ log(1/δ)/1023 for its largest order), and very small targets can be out of reach.
    """
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise ValueError(f"target_epsilon must be a finite number > 0; got {target_epsilon}")
    check_delta(delta)
    _check_rounds(rounds)
    planned_mechanism(1.0, sample_rate, sampling, population)  # validates q, sampling, N up front

    def eps(z: float) -> float:
        return epsilon_for(z, sample_rate, rounds, delta, sampling, accountant, population)

    high = 1.0
    while eps(high) > target_epsilon:
        if high >= MAX_NOISE_MULTIPLIER:
            raise ValueError(
                f"target epsilon {target_epsilon:g} is unreachable: even noise_multiplier={high:g} "
                f"gives epsilon={eps(high):.4g} (delta={delta:g}, q={sample_rate:g}, T={rounds}, "
                f"{accountant}, {sampling})"
            )
        high = min(2 * high, MAX_NOISE_MULTIPLIER)
    low = high / 2
    while eps(low) <= target_epsilon:
        high, low = low, low / 2
    while high / low - 1 > rtol:
        middle = math.sqrt(low * high)
        if eps(middle) <= target_epsilon:
            high = middle
        else:
            low = middle
    return high


class PrivacyBudgetExceeded(RuntimeError):
    """The next release would push ε above the run's ``dp-target-epsilon``."""


class BudgetGuard:
    """Stops a run **before** the release that would exceed ``target_epsilon``.

    Parameters
    ----------
    target_epsilon
        The budget ε (> 0).
    delta
        δ at which ε is measured.
    accountant
        An accountant with the run's releases so far (e.g. ``ledger.accountant(name)``), or a name
        for a fresh one. The guard composes later releases into it via :meth:`record`.
    """

    def __init__(
        self, target_epsilon: float, delta: float, accountant: Accountant | str = "rdp"
    ) -> None:
        if not (math.isfinite(target_epsilon) and target_epsilon > 0):
            raise ValueError(f"target_epsilon must be a finite number > 0; got {target_epsilon}")
        check_delta(delta)
        self.target_epsilon = target_epsilon
        self.delta = delta
        self.accountant = (
            build_accountant(accountant) if isinstance(accountant, str) else accountant
        )

    @property
    def spent(self) -> float:
        """ε of the releases recorded so far."""
        return self.accountant.epsilon(self.delta)

    def epsilon_after(self, next_event: Composable) -> float:
        """ε if ``next_event`` were released too (the guard's history is unchanged)."""
        trial = copy.deepcopy(self.accountant)
        trial.compose(as_mechanism(next_event))
        return trial.epsilon(self.delta)

    def would_exceed(self, next_event: Composable) -> bool:
        """Whether releasing ``next_event`` would push ε above the target."""
        return self.epsilon_after(next_event) > self.target_epsilon

    def check(self, next_event: Composable, server_round: int | None = None) -> None:
        """Raise :class:`PrivacyBudgetExceeded`, saying why, if the next release would exceed."""
        after = self.epsilon_after(next_event)
        if after > self.target_epsilon:
            which = f"round {server_round}" if server_round is not None else "the next round"
            raise PrivacyBudgetExceeded(
                f"privacy budget reached: {which} would raise epsilon from {self.spent:.4f} to "
                f"{after:.4f}, above dp-target-epsilon={self.target_epsilon:g} "
                f"(delta={self.delta:g}, {self.accountant.name} accountant, {len(self.accountant)} "
                "releases so far); stopping before it"
            )

    def record(self, release: Composable) -> None:
        """Compose a release that happened."""
        self.accountant.compose(release)
