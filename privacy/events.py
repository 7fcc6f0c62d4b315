"""Immutable descriptions of what a DP round released, kept apart from the accountants.

In the spirit of ``dp_accounting.dp_event``: the privacy ledger stores these events, not epsilons,
so any accountant (RDP, PLD/PRV, or an auditor's own) can recompute ε from the ledger.

Two objects:

- :class:`SampledGaussian` is the part of a release that matters for accounting: a Gaussian sum
  query (noise std ``z·C`` on a sum of per-client vectors of L2 norm ≤ ``C``) applied to a cohort
  drawn by Poisson or fixed-size sampling. It is hashable, so accountants group identical rounds.
- :class:`RoundRelease` is one ledger record: the mechanism plus what an auditor or a report wants
  to see (round, clip norm used, mode, cohort size, participants).

Adjacency (who is protected) follows from the sampling mode and is fixed by construction:

- ``poisson``: each of the N clients joins a round independently with probability q. Adjacency is
  **add-or-remove one client** (all of that client's data). Removing a client changes the sum by at
  most C, so the sum query has sensitivity C and ``GaussianDpEvent(z)`` describes it.
- ``fixed``: exactly m of N clients, uniformly without replacement. N is public, so adjacency is
  **replace one client**; replacing a client changes the sum by up to 2C (Δ → −Δ), so relative to
  that sensitivity the multiplier is z/2 and the event is
  ``SampledWithoutReplacementDpEvent(N, m, GaussianDpEvent(z / 2))`` (dp_accounting's RDP
  accountant supports it under ``REPLACE_ONE``; Wang, Balle & Kasiviswanathan 2019, Thm. 27).

ε values of the two modes are therefore not comparable at equal z: replace-one is the stronger
notion and costs about a factor 2 in noise.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

import dp_accounting
from dp_accounting import dp_event

SAMPLINGS = ("poisson", "fixed")
MODES = ("off", "clip", "normalize")
PLACEMENTS = ("server", "client")

_RELEASE_KIND = "round_release"
_RELEASE_VERSION = 1


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")


@dataclass(frozen=True)
class SampledGaussian:
    """Accounting content of one release: Gaussian sum query on a sampled cohort.

    Parameters
    ----------
    noise_multiplier
        z: std of the Gaussian noise added to the **sum** of updates, divided by the clip norm C.
    sample_rate
        q: per-client inclusion probability (poisson) or m/N (fixed).
    sampling
        ``"poisson"`` or ``"fixed"``; it decides the adjacency (see the module docstring).
    population
        N, only for ``fixed`` (0 for poisson, where it does not enter the analysis).
    sample_size
        m, only for ``fixed`` (0 for poisson).

    Build with :meth:`poisson` or :meth:`fixed` so the redundant fields stay consistent.
    """

    noise_multiplier: float
    sample_rate: float
    sampling: str = "poisson"
    population: int = 0
    sample_size: int = 0

    def __post_init__(self) -> None:
        _check_choice("sampling", self.sampling, SAMPLINGS)
        if not math.isfinite(self.noise_multiplier) or self.noise_multiplier < 0:
            raise ValueError(
                f"noise_multiplier must be a finite number >= 0; got {self.noise_multiplier}"
            )
        if not 0 < self.sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1]; got {self.sample_rate}")
        if self.sampling == "poisson":
            if self.population or self.sample_size:
                raise ValueError(
                    "population and sample_size are only used by sampling='fixed'; leave them 0"
                )
            return
        if self.population < 1 or not 1 <= self.sample_size <= self.population:
            raise ValueError(
                "sampling='fixed' needs 1 <= sample_size <= population; "
                f"got sample_size={self.sample_size}, population={self.population}"
            )
        if not math.isclose(self.sample_rate, self.sample_size / self.population, rel_tol=1e-12):
            raise ValueError(
                f"sample_rate={self.sample_rate} does not equal sample_size/population="
                f"{self.sample_size}/{self.population}"
            )

    @classmethod
    def poisson(cls, noise_multiplier: float, sample_rate: float) -> SampledGaussian:
        """Each client joins independently with probability ``sample_rate``."""
        return cls(float(noise_multiplier), float(sample_rate), "poisson")

    @classmethod
    def fixed(cls, noise_multiplier: float, population: int, sample_size: int) -> SampledGaussian:
        """Exactly ``sample_size`` of ``population`` clients, uniformly without replacement."""
        if population < 1:
            raise ValueError(f"population must be >= 1; got {population}")
        return cls(
            float(noise_multiplier),
            sample_size / population,
            "fixed",
            int(population),
            int(sample_size),
        )

    @property
    def neighboring_relation(self) -> dp_accounting.NeighboringRelation:
        """dp_accounting's name for the adjacency of :meth:`to_dp_accounting_event`."""
        if self.sampling == "poisson":
            return dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
        return dp_accounting.NeighboringRelation.REPLACE_ONE

    @property
    def adjacency(self) -> str:
        """Human-readable adjacency, for reports."""
        return "add-or-remove one client" if self.sampling == "poisson" else "replace one client"

    def to_dp_accounting_event(self) -> dp_event.DpEvent:
        """The canonical ``dp_accounting`` event (pair it with :attr:`neighboring_relation`).

        ``GaussianDpEvent``'s multiplier is noise std over the L2 sensitivity under the event's
        adjacency: C for add/remove (multiplier z), 2C for replace-one (multiplier z/2).
        """
        if self.sampling == "poisson":
            return dp_event.PoissonSampledDpEvent(
                self.sample_rate, dp_event.GaussianDpEvent(self.noise_multiplier)
            )
        return dp_event.SampledWithoutReplacementDpEvent(
            self.population, self.sample_size, dp_event.GaussianDpEvent(self.noise_multiplier / 2)
        )

    def to_dict(self) -> dict:
        """Plain JSON-able dict (for accountant state and the ledger)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> SampledGaussian:
        """Inverse of :meth:`to_dict`; unknown or missing keys raise ``ValueError``."""
        _check_keys(
            "SampledGaussian",
            data,
            {f for f in cls.__dataclass_fields__},
            optional={"population", "sample_size"},
        )
        return cls(**data)


def _check_keys(what: str, data: dict, allowed: set[str], optional: set[str]) -> None:
    unknown = set(data) - allowed
    missing = allowed - optional - set(data)
    if unknown or missing:
        raise ValueError(
            f"malformed {what} record: unknown keys {sorted(unknown)}, "
            f"missing keys {sorted(missing)}"
        )


@dataclass(frozen=True)
class RoundRelease:
    """One noised aggregate released by the server: a ledger record.

    Parameters
    ----------
    round
        Server round number (the ledger's key; re-recording a round is idempotent).
    noise_multiplier
        z, the **effective** multiplier this release is accounted with. With adaptive clipping the
        update noise uses z_Δ and the clipped-count query uses σ_b; together they are worth z.
    sample_rate
        q (poisson) or m/N (fixed).
    sampling
        ``"poisson"`` or ``"fixed"``.
    population
        N, the number of clients the cohort is drawn from.
    cohort_size
        Number of clients actually sampled this round (random under Poisson sampling).
    expected_cohort_size
        The fixed denominator m used for the average: q·N (poisson) or m (fixed).
    clip
        C used this round (it changes between rounds under adaptive clipping).
    mode
        ``"clip"`` or ``"normalize"``.
    where
        ``"server"`` (trusted server clips) or ``"client"`` (clients clip, server verifies).
    participants
        Optional client indices whose updates entered the sum, for participation reports.
    """

    round: int
    noise_multiplier: float
    sample_rate: float
    sampling: str
    population: int
    cohort_size: int
    expected_cohort_size: float
    clip: float
    mode: str
    where: str = "server"
    participants: tuple[int, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.round < 0:
            raise ValueError(f"round must be >= 0; got {self.round}")
        _check_choice("mode", self.mode, MODES[1:])
        _check_choice("where", self.where, PLACEMENTS)
        if not self.clip > 0:
            raise ValueError(f"clip must be > 0; got {self.clip}")
        if self.population < 1:
            raise ValueError(f"population must be >= 1; got {self.population}")
        if not 0 <= self.cohort_size <= self.population:
            raise ValueError(
                f"cohort_size must be in [0, population={self.population}]; got {self.cohort_size}"
            )
        object.__setattr__(self, "participants", tuple(int(p) for p in self.participants))
        # The mechanism's own checks cover noise_multiplier, sample_rate and the fixed-size fields.
        _ = self.mechanism
        denominator = (
            self.cohort_size if self.sampling == "fixed" else self.sample_rate * self.population
        )
        if not math.isclose(self.expected_cohort_size, denominator, rel_tol=1e-9):
            raise ValueError(
                f"expected_cohort_size={self.expected_cohort_size} must be the fixed denominator "
                f"{denominator} ({'m' if self.sampling == 'fixed' else 'q·N'}) for "
                f"sampling={self.sampling!r}"
            )

    @property
    def mechanism(self) -> SampledGaussian:
        """The accounting content of this release."""
        if self.sampling == "fixed":
            return SampledGaussian(
                self.noise_multiplier, self.sample_rate, "fixed", self.population, self.cohort_size
            )
        return SampledGaussian(self.noise_multiplier, self.sample_rate, self.sampling)

    def to_dp_accounting_event(self) -> dp_event.DpEvent:
        """Canonical ``dp_accounting`` event of this release (see :class:`SampledGaussian`)."""
        return self.mechanism.to_dp_accounting_event()

    def to_json(self) -> str:
        """One-line JSON with a ``kind``/``version`` header, as stored in the ledger."""
        record = {"kind": _RELEASE_KIND, "version": _RELEASE_VERSION, **asdict(self)}
        record["participants"] = list(self.participants)
        return json.dumps(record, separators=(",", ":"), allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> RoundRelease:
        """Inverse of :meth:`to_json`; malformed records raise ``ValueError``."""
        data = json.loads(text)
        if not isinstance(data, dict) or data.pop("kind", None) != _RELEASE_KIND:
            raise ValueError(f"not a {_RELEASE_KIND} record: {text[:80]!r}")
        if data.pop("version", None) != _RELEASE_VERSION:
            raise ValueError(f"unsupported {_RELEASE_KIND} version in {text[:80]!r}")
        _check_keys(
            "RoundRelease", data, set(cls.__dataclass_fields__), optional={"where", "participants"}
        )
        data["participants"] = tuple(data.get("participants", ()))
        return cls(**data)
