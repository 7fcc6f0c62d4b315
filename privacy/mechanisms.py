"""User-level central DP for FL rounds: clip or normalize client deltas, noise the sum, adapt C.

Pure array functions (:func:`clip_update`, :func:`normalize_update`, :func:`add_gaussian_noise`),
the run's DP settings (:class:`DpSpec`) and the server's DP stage of the round pipeline
(:class:`CentralDpAggregator`).

Why a **fixed denominator**: the average is ``(Σ Δ̃_i + N(0, (zC)² I)) / m`` with m the *expected*
cohort size (q·N for Poisson sampling, m for fixed-size), never the number of replies. Adding or
removing one client then moves the average by at most C/m, so the noise std z·C/m calibrates to
that sensitivity. Dividing by the realised count would leak it and break the bound.

Clipping (Δ·min(1, C/‖Δ‖)) keeps small updates intact but biases large ones; normalization
(C·Δ/‖Δ‖, DP-NormFedAvg of Das et al. 2021) gives every client norm exactly C. Norms are the global
L2 norm over all arrays of the update (flat clipping, as in Flower's ``compute_clip_model_update``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from privacy.accountants.registry import ACCOUNTANTS
from privacy.events import MODES, PLACEMENTS, SAMPLINGS, RoundRelease, SampledGaussian
from privacy.sampling import Cohort, CohortSampler

Params = dict[str, np.ndarray]

#: Norms below this are treated as zero by :func:`normalize_update` (no direction to keep).
ZERO_NORM = 1e-12
#: Relative slack for client-side clipping: float32 rounding can put a norm a few ulps above C.
CLIENT_NORM_RTOL = 1e-5


def _float_dtype(array: np.ndarray) -> np.dtype:
    return array.dtype if np.issubdtype(array.dtype, np.floating) else np.dtype(np.float32)


def global_l2_norm(update: Params) -> float:
    """L2 norm of all arrays of ``update`` taken together, accumulated in float64."""
    total = 0.0
    for array in update.values():
        flat = np.asarray(array, dtype=np.float64).ravel()
        total += float(flat @ flat)
    return math.sqrt(total)


def _finite_norm(update: Params) -> float:
    norm = global_l2_norm(update)
    if not math.isfinite(norm):
        raise ValueError("update contains NaN or infinite values; it cannot be clipped")
    return norm


def _check_clip(clip: float) -> None:
    if not (math.isfinite(clip) and clip > 0):
        raise ValueError(f"clip norm must be a finite number > 0; got {clip}")


def _scaled(update: Params, scale: float) -> Params:
    return {
        name: (np.asarray(a, dtype=np.float64) * scale).astype(_float_dtype(a))
        for name, a in update.items()
    }


def clip_update(update: Params, clip: float) -> tuple[Params, float]:
    """Flat clipping Δ·min(1, C/‖Δ‖); returns ``(clipped copy, original norm)``.

    Updates with ‖Δ‖ ≤ C come back unchanged (bit for bit).
    """
    _check_clip(clip)
    norm = _finite_norm(update)
    if norm <= clip:
        return {name: np.array(a, dtype=_float_dtype(a)) for name, a in update.items()}, norm
    return _scaled(update, clip / norm), norm


def normalize_update(update: Params, clip: float) -> tuple[Params, float]:
    """Normalization C·Δ/‖Δ‖ (zeros if ‖Δ‖ < 1e-12); returns ``(normalized, original norm)``.

    Scaled in float64 then cast, so the result's norm is C to float32 precision (~1e-7 relative).
    """
    _check_clip(clip)
    norm = _finite_norm(update)
    if norm < ZERO_NORM:
        return {
            name: np.zeros(np.shape(a), dtype=_float_dtype(a)) for name, a in update.items()
        }, norm
    return _scaled(update, clip / norm), norm


def add_gaussian_noise(total: Params, std: float, rng: np.random.Generator) -> Params:
    """``total`` + i.i.d. N(0, std²) per coordinate (computed in float64, cast back)."""
    if not (math.isfinite(std) and std >= 0):
        raise ValueError(f"noise std must be a finite number >= 0; got {std}")
    if std == 0:
        return {name: np.array(a, dtype=_float_dtype(a)) for name, a in total.items()}
    return {
        name: (np.asarray(a, dtype=np.float64) + std * rng.standard_normal(np.shape(a))).astype(
            _float_dtype(a)
        )
        for name, a in total.items()
    }


def prepare_client_update(update: Params, *, clip: float, mode: str) -> tuple[Params, bool]:
    """Client-side DP step (``where="client"``): clip or normalize, and report the adaptive bit.

    Returns ``(prepared, unclipped)`` where ``unclipped = ‖Δ‖ ≤ C`` is the bit b_i of Andrew et al.
    that the client sends with its update when the server adapts C.
    """
    if mode == "clip":
        prepared, norm = clip_update(update, clip)
    elif mode == "normalize":
        prepared, norm = normalize_update(update, clip)
    else:
        raise ValueError(f"mode must be 'clip' or 'normalize'; got {mode!r}")
    return prepared, norm <= clip


def bound_update(
    update: Params,
    *,
    clip: float,
    mode: str,
    where: str,
    adaptive: bool = False,
    client_unclipped: bool | None = None,
    codec_tolerance: float = 0.0,
) -> tuple[Params, bool]:
    """The server's per-update DP step: bound one client's update to norm ≤ C.

    ``where="server"``: clip or normalize here (:func:`prepare_client_update`).
    ``where="client"``: the client already did; raise :class:`NormBoundExceeded` if
    ‖Δ‖ > C·(1 + 1e-5), else clip to exactly C (removing float32 rounding excess). With
    adaptive clipping the client's own bit ``client_unclipped`` (‖Δ‖ ≤ C before its
    clipping) is required, since the server cannot see the original norm.
    ``codec_tolerance`` (``where="client"``): a decoded norm in (C, C·(1 + tolerance)] is a
    lossy codec's rounding of a clipped update, not a misbehaving client, and is clipped to C
    first. Every accepted update has norm ≤ C either way, so the sensitivity stays C.

    Returns ``(prepared, unclipped)``.
    """
    if where == "server":
        if client_unclipped is not None:
            raise ValueError("client_unclipped is only used with where='client'")
        return prepare_client_update(update, clip=clip, mode=mode)
    if codec_tolerance > 0 and clip < global_l2_norm(update) <= clip * (1 + codec_tolerance):
        update, _ = clip_update(update, clip)
    norm = _finite_norm(update)
    if norm > clip * (1 + CLIENT_NORM_RTOL):
        raise NormBoundExceeded(f"client update norm {norm:.6g} exceeds the clip norm C={clip:.6g}")
    if adaptive and client_unclipped is None:
        raise ValueError(
            "adaptive clipping with where='client' needs the client's client_unclipped bit"
        )
    prepared, _ = clip_update(update, clip)
    return prepared, bool(client_unclipped)


def split_noise_multiplier(noise_multiplier: float, clipped_count_stddev: float) -> float:
    """Noise multiplier left for the update sum when the clipped-count query also spends budget.

    z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2) (Andrew et al. 2021, Thm. 1): the count query
    Σ(b_i − ½) has sensitivity ½, so σ_b is worth multiplier 2σ_b, and Gaussian queries compose as
    1/z² = 1/z_Δ² + 1/(2σ_b)². Then the round is accounted as one Gaussian with multiplier z.
    """
    if noise_multiplier == 0:
        return 0.0
    if noise_multiplier >= 2 * clipped_count_stddev:
        raise ValueError(
            "adaptive clipping needs noise_multiplier < 2·clipped_count_stddev; got "
            f"z={noise_multiplier}, σ_b={clipped_count_stddev}. Raise clipped_count_stddev or the "
            "cohort size (the default σ_b = m/20 needs m > 10·z)"
        )
    return (noise_multiplier**-2 - (2 * clipped_count_stddev) ** -2) ** -0.5


def next_clip_norm(
    clip: float, unclipped_fraction: float, target_quantile: float, clip_lr: float
) -> float:
    """Geometric step C·exp(−η_C·(b̃ − γ)) toward the γ-quantile of update norms (Andrew et al.)."""
    return clip * math.exp(-clip_lr * (unclipped_fraction - target_quantile))


@dataclass(frozen=True)
class DpSpec:
    """Differential-privacy settings of a run (the ``dp-*`` config keys).

    Parameters
    ----------
    mode
        ``"off"``, ``"clip"`` (Δ·min(1, C/‖Δ‖)) or ``"normalize"`` (C·Δ/‖Δ‖).
    clip
        C, the L2 bound of one client's update; the initial C when ``adaptive``.
    noise_multiplier
        z ≥ 0: noise std on the update sum is z·C (z = 0: clipping without privacy, ε = ∞).
    delta
        δ of the reported (ε, δ) guarantee; choose δ ≤ 1/N.
    where
        ``"server"``: the trusted server clips raw updates. ``"client"``: clients clip, the server
        verifies ‖Δ‖ ≤ C and rejects longer updates. The server always adds the noise.
    adaptive
        Adapt C toward the ``target_quantile`` of update norms (Andrew et al. 2021);
        ``mode="clip"`` only.
    target_quantile
        γ ∈ (0, 1), the fraction of updates that should be unclipped.
    clip_lr
        η_C > 0, the geometric learning rate of C.
    clipped_count_stddev
        σ_b, noise std of the unclipped count; ``None`` means m/20 (Andrew et al.'s default).
    sampling
        ``"poisson"`` (add/remove-one adjacency) or ``"fixed"`` (m of N, replace-one adjacency).
    population
        N; 0 means the number of clients, resolved by the caller.
    accountant
        ``"rdp"`` or ``"prv"`` (see :mod:`privacy.accountants`).
    target_epsilon
        Stop before the round that would push ε above this; 0 disables the budget stop.
    """

    mode: str = "off"
    clip: float = 1.0
    noise_multiplier: float = 1.0
    delta: float = 1e-5
    where: str = "server"
    adaptive: bool = False
    target_quantile: float = 0.5
    clip_lr: float = 0.2
    clipped_count_stddev: float | None = None
    sampling: str = "poisson"
    population: int = 0
    accountant: str = "rdp"
    target_epsilon: float = 0.0

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid setting and what is allowed."""
        for name, value, allowed in (
            ("mode", self.mode, MODES),
            ("where", self.where, PLACEMENTS),
            ("sampling", self.sampling, SAMPLINGS),
            ("accountant", self.accountant, tuple(ACCOUNTANTS)),
        ):
            if value not in allowed:
                raise ValueError(
                    f"dp {name} must be one of {', '.join(map(repr, allowed))}; got {value!r}"
                )
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise ValueError(f"dp clip (C) must be a finite number > 0; got {self.clip}")
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0):
            raise ValueError(
                f"dp noise_multiplier (z) must be a finite number >= 0; got {self.noise_multiplier}"
            )
        if not 0 < self.delta < 1:
            raise ValueError(f"dp delta must be in (0, 1); got {self.delta}")
        if not 0 < self.target_quantile < 1:
            raise ValueError(f"dp target_quantile must be in (0, 1); got {self.target_quantile}")
        if not (math.isfinite(self.clip_lr) and self.clip_lr > 0):
            raise ValueError(f"dp clip_lr must be a finite number > 0; got {self.clip_lr}")
        if self.clipped_count_stddev is not None and not self.clipped_count_stddev >= 0:
            raise ValueError(
                "dp clipped_count_stddev must be >= 0 or None (m/20); "
                f"got {self.clipped_count_stddev}"
            )
        if self.population < 0:
            raise ValueError(
                f"dp population must be >= 0 (0 = number of clients); got {self.population}"
            )
        if not (math.isfinite(self.target_epsilon) and self.target_epsilon >= 0):
            raise ValueError(
                f"dp target_epsilon must be >= 0 (0 = no budget stop); got {self.target_epsilon}"
            )
        if self.adaptive and self.mode != "clip":
            raise ValueError(
                f"dp adaptive clipping needs mode='clip'; got mode={self.mode!r} "
                "(with normalization the signal-to-noise ratio does not depend on C)"
            )
        if self.adaptive and self.noise_multiplier > 0 and self.clipped_count_stddev == 0:
            raise ValueError(
                "dp clipped_count_stddev=0 releases the unclipped count without noise, which voids "
                "the guarantee; use a positive value (or None for m/20), or noise_multiplier=0 for "
                "a non-private run"
            )


class NormBoundExceeded(ValueError):
    """A client-side clipped update is longer than C: the server must drop that client's update."""


@dataclass(frozen=True)
class DpRelease:
    """What :meth:`CentralDpAggregator.release` returns for one round.

    ``average`` is the noised mean delta for the server optimizer, ``event`` goes to the ledger
    (before the new model is published), ``metrics`` to the round's metrics.
    """

    average: Params
    event: RoundRelease
    metrics: dict[str, float] = field(default_factory=dict)


class CentralDpAggregator:
    """The server's DP stage: per-client :meth:`prepare`, then one :meth:`release` per round.

    Usage per round::

        cohort = sampler.sample(population, rng)
        total = zeros_like(global_model)
        for update in replies:                       # from cohort members only
            prepared = dp.prepare(update)            # may raise NormBoundExceeded: drop that client
            total = {k: total[k] + prepared[k] for k in total}
        result = dp.release(total, cohort, server_round)
        ledger.append(result.event)                  # durable before the model is published

    Parameters
    ----------
    spec
        Validated here; ``mode`` must not be ``"off"`` and ``spec.sampling`` must match ``sampler``.
    sampler
        The cohort sampler of the run; fixes the denominator m and σ_b's default m/20.
    population
        N, the number of clients cohorts are drawn from.
    seed
        Seed of the server-private noise generator (its state is checkpointed).
    """

    def __init__(
        self, spec: DpSpec, sampler: CohortSampler, *, population: int, seed: int | None = None
    ) -> None:
        spec.validate()
        if spec.mode == "off":
            raise ValueError("CentralDpAggregator needs dp mode 'clip' or 'normalize'; got 'off'")
        if sampler.sampling != spec.sampling:
            raise ValueError(
                f"sampler draws {sampler.sampling!r} cohorts but dp sampling is {spec.sampling!r}"
            )
        if population < 1:
            raise ValueError(f"population must be >= 1; got {population}")
        self.spec = spec
        self.sampler = sampler
        self.population = population
        expected = sampler.expected_size(population)
        if spec.adaptive:
            stddev = spec.clipped_count_stddev
            self.clipped_count_stddev = expected / 20 if stddev is None else stddev
            self.update_noise_multiplier = split_noise_multiplier(
                spec.noise_multiplier, self.clipped_count_stddev
            )
        else:
            self.clipped_count_stddev = 0.0
            self.update_noise_multiplier = spec.noise_multiplier
        self._clip = spec.clip
        self._rng = np.random.default_rng(seed)
        self._prepared = 0
        self._unclipped = 0

    @property
    def clip(self) -> float:
        """Current C (send it to clients when ``where="client"``)."""
        return self._clip

    def next_mechanism(self) -> SampledGaussian:
        """Accounting content of the next release (for ``BudgetGuard.would_exceed``)."""
        return self.sampler.mechanism(self.population, self.spec.noise_multiplier)

    def prepare(
        self,
        update: Params,
        *,
        client_unclipped: bool | None = None,
        codec_tolerance: float = 0.0,
    ) -> Params:
        """Bound one client's update to norm ≤ C (:func:`bound_update`) and tally its bit.

        Every prepared update must enter the sum passed to :meth:`release`.
        """
        prepared, unclipped = bound_update(
            update,
            clip=self._clip,
            mode=self.spec.mode,
            where=self.spec.where,
            adaptive=self.spec.adaptive,
            client_unclipped=client_unclipped,
            codec_tolerance=codec_tolerance,
        )
        self._prepared += 1
        self._unclipped += int(unclipped)
        return prepared

    def add_prepared(self, count: int, unclipped: int) -> None:
        """Tally a batch of ``count`` updates bounded and summed elsewhere, ``unclipped`` unclipped.

        A packed worker (:mod:`fedclient.packed_worker`) hosts many clients: it bounds each
        client's update with :func:`bound_update` at this round's C — the same function
        :meth:`prepare` applies — and sends only their sum, which the caller adds to the
        ``total`` passed to :meth:`release`. The sensitivity argument is unchanged: every
        client's contribution was bounded to norm ≤ C on its own before it entered any sum,
        so adding or removing one client still moves the total by at most C, however the
        total is grouped. (Running that step on a worker means trusting the worker as much as
        the server, which holds in a simulation where both run the same code.)
        """
        if not 0 <= unclipped <= count:
            raise ValueError(
                f"a prepared batch needs 0 <= unclipped <= count; got unclipped={unclipped}, "
                f"count={count}"
            )
        self._prepared += int(count)
        self._unclipped += int(unclipped)

    def release(
        self, total: Params, cohort: Cohort, server_round: int, participants: tuple[int, ...] = ()
    ) -> DpRelease:
        """Noise the sum of this round's prepared updates and divide by the fixed denominator.

        Returns the average ``(total + N(0, (z_Δ·C)² I)) / m`` (m = ``cohort.expected_size``), the
        :class:`RoundRelease` to record, and metrics. With adaptive clipping, C then moves by
        ``exp(−η_C·(b̃ − γ))`` with b̃ = (Σ(b_i − ½) + N(0, σ_b²) + m/2) / m, the noised unclipped
        fraction (centred so that its sensitivity is ½, matching :func:`split_noise_multiplier`).
        Pass ``total`` as zeros when no update arrived: the noise is still released and accounted.
        """
        if cohort.sampling != self.spec.sampling or cohort.population != self.population:
            raise ValueError(
                f"cohort ({cohort.sampling}, N={cohort.population}) does not match the aggregator "
                f"({self.spec.sampling}, N={self.population})"
            )
        if self._prepared > len(cohort.members):
            raise ValueError(
                f"{self._prepared} updates were prepared for a cohort of "
                f"{len(cohort.members)} clients"
            )
        if participants and len(participants) != self._prepared:
            raise ValueError(
                f"participants lists {len(participants)} clients but "
                f"{self._prepared} updates were prepared"
            )
        clip, expected = self._clip, cohort.expected_size
        noise_std = self.update_noise_multiplier * clip
        noised = add_gaussian_noise(total, noise_std, self._rng)
        average = {name: (a / expected).astype(a.dtype) for name, a in noised.items()}
        metrics = {
            "dp_clip": clip,
            "dp_noise_std": noise_std / expected,
            "dp_updates": float(self._prepared),
        }
        if self.spec.adaptive:
            count_noise = (
                self._rng.normal(0.0, self.clipped_count_stddev)
                if self.clipped_count_stddev > 0
                else 0.0
            )
            centred = self._unclipped - self._prepared / 2
            fraction = (centred + count_noise + expected / 2) / expected
            self._clip = next_clip_norm(
                clip, fraction, self.spec.target_quantile, self.spec.clip_lr
            )
            metrics["dp_unclipped_fraction"] = fraction
        metrics["dp_next_clip"] = self._clip
        event = RoundRelease(
            round=server_round,
            noise_multiplier=self.spec.noise_multiplier,
            sample_rate=cohort.sample_rate,
            sampling=cohort.sampling,
            population=cohort.population,
            cohort_size=len(cohort.members),
            expected_cohort_size=expected,
            clip=clip,
            mode=self.spec.mode,
            where=self.spec.where,
            participants=tuple(participants),
        )
        self._prepared = 0
        self._unclipped = 0
        return DpRelease(average, event, metrics)

    def state_dict(self) -> dict:
        """JSON-able state between rounds: current C and the noise generator's state."""
        if self._prepared:
            raise RuntimeError(
                f"state_dict() mid-round: {self._prepared} prepared updates are not released yet"
            )
        return {"clip": self._clip, "rng": self._rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` (resume a run with the same C and noise stream)."""
        clip = float(state["clip"])
        _check_clip(clip)
        self._rng.bit_generator.state = state["rng"]
        self._clip = clip
        self._prepared = 0
        self._unclipped = 0
