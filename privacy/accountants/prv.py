"""Privacy-loss-distribution (PRV) accountant backed by Google's ``dp_accounting.pld``.

A privacy random variable (Gopi, Lee & Wutschitz 2021) and a privacy loss distribution are the
same object; ε is read off the composed distribution's hockey-stick curve, so it is near-tight.
The discretisation is pessimistic (ε stays an upper bound); its default interval 1e-3 is 10× faster
than dp_accounting's 1e-4 and moved ε by under 0.05% in our checks (e.g. 1.82893 vs 1.82824 for
q = 0.01, z = 1, T = 1000, δ = 1e-5). We use ``dp_accounting.pld`` rather than the
``prv-accountant`` package because dp_accounting is maintained (0.6, Google) and offers the
dominating pairs both sampling modes need, whereas ``prv-accountant`` (0.2, 2022) covers only
Poisson-subsampled Gaussians.

Dominating pairs (σ = zC noise on the sum, clip C):

- ``poisson``, add/remove one client: ``PoissonSampledDpEvent(q, GaussianDpEvent(z))`` under
  ``ADD_OR_REMOVE_ONE`` (both the add and the remove direction; ε is the worse one).
- ``fixed`` m-of-N without replacement, replace one client: the pair of Zhu, Dong & Wang (AISTATS
  2022) for sampling without replacement under substitution, ``(q·N(2C) + (1−q)·N(0), N(0))`` and
  its swap, i.e. the Poisson pair with sensitivity 2C: ``PoissonSampledDpEvent(m/N,
  GaussianDpEvent(z/2))`` under ``ADD_OR_REMOVE_ONE``. dp_accounting's ``REPLACE_ONE`` sampled
  Gaussian (``q·N(C) + (1−q)·N(0)`` vs ``q·N(−C) + (1−q)·N(0)``) is **not** used: it is valid for
  Poisson sampling with replacement-adjacency but underestimates ε for fixed-size cohorts, where
  every other sampled client can hold the same update as the replaced one (see the witness test).
"""

from __future__ import annotations

from functools import lru_cache

from dp_accounting import NeighboringRelation, dp_event
from dp_accounting.pld import privacy_loss_distribution

from privacy.accountants.base import Accountant
from privacy.events import SampledGaussian


def pld_event(mechanism: SampledGaussian) -> dp_event.DpEvent:
    """The dominating-pair event, for ``dp_accounting.pld.PLDAccountant(ADD_OR_REMOVE_ONE)``."""
    sensitivity_factor = 1.0 if mechanism.sampling == "poisson" else 2.0
    return dp_event.PoissonSampledDpEvent(
        mechanism.sample_rate,
        dp_event.GaussianDpEvent(mechanism.noise_multiplier / sensitivity_factor),
    )


@lru_cache(maxsize=64)
def single_release_pld(
    mechanism: SampledGaussian, value_discretization_interval: float
) -> privacy_loss_distribution.PrivacyLossDistribution:
    """PLD of one release (cached: building it costs more than self-composing it T times).

    The same construction ``PLDAccountant.compose(pld_event(mechanism))`` performs.
    """
    event = pld_event(mechanism)
    return privacy_loss_distribution.from_gaussian_mechanism(
        standard_deviation=event.event.noise_multiplier,
        sampling_prob=event.sampling_probability,
        value_discretization_interval=value_discretization_interval,
        neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
    )


class PrvAccountant(Accountant):
    """PLD/PRV accountant; ``value_discretization_interval`` trades speed for tightness."""

    name = "prv"
    curve_points = 50

    def __init__(self, value_discretization_interval: float = 1e-3) -> None:
        super().__init__()
        self.value_discretization_interval = value_discretization_interval
        self._composed: privacy_loss_distribution.PrivacyLossDistribution | None = None

    def _history_changed(self) -> None:
        self._composed = None

    def _epsilon(self, delta: float) -> float:
        if self._composed is None:
            # Rebuilt from the grouped history: T identical rounds cost one FFT self-composition.
            composed = None
            for mechanism, count in self._counts.items():
                part = single_release_pld(
                    mechanism, self.value_discretization_interval
                ).self_compose(count)
                composed = part if composed is None else composed.compose(part)
            self._composed = composed
        return self._composed.get_epsilon_for_delta(delta)

    def _fresh(self) -> PrvAccountant:
        return PrvAccountant(self.value_discretization_interval)
