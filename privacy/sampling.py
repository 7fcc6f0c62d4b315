"""Cohort samplers whose accounting parameters come from the same object that draws the cohort.

A DP guarantee with amplification by sampling holds only if the cohort really was drawn the way
the accountant assumes. Each sampler therefore returns a :class:`Cohort` that carries both the
members and the parameters (``sampling``, ``sample_rate``, fixed denominator) that
:class:`~privacy.mechanisms.CentralDpAggregator` writes into the round's
:class:`~privacy.events.RoundRelease`, so the two cannot disagree. The randomness must stay
hidden from the adversary (a seeded ``numpy.random.Generator`` private to the server).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from privacy.events import SampledGaussian


@dataclass(frozen=True)
class Cohort:
    """One round's sampled clients and the sampling parameters to account them with.

    Parameters
    ----------
    members
        Sorted client indices in ``[0, population)``.
    sampling
        ``"poisson"`` or ``"fixed"``.
    sample_rate
        q (poisson) or m/N (fixed).
    population
        N.
    expected_size
        The fixed denominator of the DP average: q·N (poisson) or m (fixed).
    """

    members: np.ndarray
    sampling: str
    sample_rate: float
    population: int
    expected_size: float

    def mechanism(self, noise_multiplier: float) -> SampledGaussian:
        """The accounting content of a Gaussian sum release over this cohort."""
        if self.sampling == "fixed":
            return SampledGaussian.fixed(noise_multiplier, self.population, len(self.members))
        return SampledGaussian.poisson(noise_multiplier, self.sample_rate)


class CohortSampler(ABC):
    """Draws a cohort from ``population`` clients and states how it was drawn."""

    sampling: ClassVar[str]

    @abstractmethod
    def sample_rate(self, population: int) -> float:
        """Per-client inclusion probability."""

    @abstractmethod
    def expected_size(self, population: int) -> float:
        """Fixed denominator m of the DP average."""

    @abstractmethod
    def _draw(self, population: int, rng: np.random.Generator) -> np.ndarray:
        """Sorted member indices."""

    def sample(self, population: int, rng: np.random.Generator) -> Cohort:
        """Draw one round's cohort."""
        if population < 1:
            raise ValueError(f"population must be >= 1; got {population}")
        return Cohort(
            members=self._draw(population, rng),
            sampling=self.sampling,
            sample_rate=self.sample_rate(population),
            population=population,
            expected_size=self.expected_size(population),
        )

    def mechanism(self, population: int, noise_multiplier: float) -> SampledGaussian:
        """Accounting content of the next release, known before its cohort is drawn."""
        if self.sampling == "fixed":
            return SampledGaussian.fixed(
                noise_multiplier, population, int(self.expected_size(population))
            )
        return SampledGaussian.poisson(noise_multiplier, self.sample_rate(population))


class PoissonSampler(CohortSampler):
    """Each client joins independently with probability ``sample_rate`` (cohort size is random)."""

    sampling = "poisson"

    def __init__(self, sample_rate: float) -> None:
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1]; got {sample_rate}")
        self.rate = float(sample_rate)

    def sample_rate(self, population: int) -> float:
        return self.rate

    def expected_size(self, population: int) -> float:
        return self.rate * population

    def _draw(self, population: int, rng: np.random.Generator) -> np.ndarray:
        return np.flatnonzero(rng.random(population) < self.rate)


class FixedSizeSampler(CohortSampler):
    """Exactly ``cohort_size`` clients, uniformly without replacement."""

    sampling = "fixed"

    def __init__(self, cohort_size: int) -> None:
        if cohort_size < 1:
            raise ValueError(f"cohort_size must be >= 1; got {cohort_size}")
        self.cohort_size = int(cohort_size)

    def _check(self, population: int) -> None:
        if self.cohort_size > population:
            raise ValueError(
                f"cohort_size={self.cohort_size} exceeds the population of {population} clients"
            )

    def sample_rate(self, population: int) -> float:
        self._check(population)
        return self.cohort_size / population

    def expected_size(self, population: int) -> float:
        self._check(population)
        return float(self.cohort_size)

    def _draw(self, population: int, rng: np.random.Generator) -> np.ndarray:
        self._check(population)
        return np.sort(rng.choice(population, size=self.cohort_size, replace=False))


def build_sampler(sampling: str, *, sample_rate: float, population: int) -> CohortSampler:
    """Sampler for a config: ``poisson`` at rate q, or ``fixed`` with m = round(q·N) ≥ 1 clients.

    For ``fixed`` the accounted rate is m/N, the rate actually used.
    """
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1]; got {sample_rate}")
    if sampling == "poisson":
        return PoissonSampler(sample_rate)
    if sampling == "fixed":
        return FixedSizeSampler(max(1, math.floor(sample_rate * population + 0.5)))
    raise ValueError(f"sampling must be 'poisson' or 'fixed'; got {sampling!r}")
