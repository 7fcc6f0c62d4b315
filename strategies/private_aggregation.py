"""The differential-privacy stage of the server round: cohort, bound, sum, noise, ledger.

It replaces two parts of the plain pipeline when ``dp`` is on:

* **sampling** — cohorts come from :mod:`privacy.sampling` (Poisson or fixed-size), the same
  object that tells the accountant which analysis applies, so they cannot disagree;
* **aggregation** — each valid update is clipped or normalized to norm ≤ C (or, with
  ``dp-where=client``, checked to be), summed with weight 1, noised once and divided by the
  *expected* cohort size m (a fixed denominator: the sensitivity of the average is C/m no
  matter how many clients drop out).

Every release is appended to the run's privacy ledger (fsynced) before the new model is
published, and a budget guard refuses a round whose release would push ε past the target.
The server optimizer then runs on the noised average like on any other mean delta.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fedserver.config import ConfigError
from privacy.accountants import build_accountant
from privacy.budget import BudgetGuard
from privacy.ledger import PrivacyLedger
from privacy.mechanisms import (
    CLIENT_NORM_RTOL,
    CentralDpAggregator,
    DpSpec,
    NormBoundExceeded,
    global_l2_norm,
)
from privacy.sampling import Cohort, build_sampler
from strategies.sampling import round_rng
from strategies.updates import ClientUpdate, UpdateRejected

log = logging.getLogger("pollen")

Params = dict[str, np.ndarray]


class PrivateAggregation:
    """Central DP for one run (server side).

    Parameters
    ----------
    spec : DpSpec
        The ``dp-*`` settings (mode, C, z, δ, where, adaptive clipping, sampling, accountant).
    clients_per_round : int
        Target cohort size; the sampling rate is ``clients_per_round / population``.
    seed : int
        Seeds cohort draws per round and the server's noise generator.
    ledger_path : Path, optional
        Where releases are recorded (``<run>/privacy/ledger.jsonl``); ``None`` keeps no ledger
        (library use).
    codec_tolerance : float, default 0.0
        With ``dp-where=client``: relative excess over C that a *decoded* update may have
        before it is rejected. Clients clip before encoding, but a lossy codec with error
        feedback can round the decoded norm slightly above C (measured up to 1.4% for
        sign/top-k). The server clips every update to exactly C afterwards either way, so the
        sensitivity stays C; the tolerance only decides what counts as a misbehaving client.
    """

    def __init__(
        self,
        spec: DpSpec,
        *,
        clients_per_round: int,
        seed: int,
        ledger_path: Path | None = None,
        codec_tolerance: float = 0.0,
    ) -> None:
        spec.validate()
        if codec_tolerance < 0:
            raise ValueError(f"codec_tolerance must be >= 0, got {codec_tolerance}")
        self.codec_tolerance = codec_tolerance
        self.spec = spec
        self.clients_per_round = clients_per_round
        self.seed = seed
        self.ledger = PrivacyLedger(ledger_path) if ledger_path is not None else None
        self.aggregator: CentralDpAggregator | None = None
        self.guard: BudgetGuard | None = None
        self.accountant = build_accountant(spec.accountant)
        self._nodes: list[int] = []
        self._cohort: Cohort | None = None
        self._sum: Params | None = None
        self._participants: list[int] = []
        self._pending_state: dict | None = None

    # --- set-up once the federation is known ---------------------------------------------
    def setup(self, node_ids: Sequence[int]) -> None:
        """Fix the population from the connected nodes (first round, or after a resume).

        The packed layout passes its virtual client ids as ``range(N)``; a range is kept as
        it is, so no per-population list is built.
        """
        nodes = node_ids if isinstance(node_ids, range) else sorted(node_ids)
        population = self.spec.population or len(nodes)
        if population > len(nodes):
            raise ValueError(
                f"dp-population={population} exceeds the {len(nodes)} connected clients"
            )
        if self.clients_per_round > population:
            raise ValueError(
                f"clients-per-round={self.clients_per_round} exceeds the DP population {population}"
            )
        self._nodes = nodes[:population]
        sampler = build_sampler(
            self.spec.sampling, sample_rate=self.clients_per_round / population, population=population
        )
        self.aggregator = CentralDpAggregator(self.spec, sampler, population=population, seed=self.seed)
        if self.spec.target_epsilon > 0:
            self.guard = BudgetGuard(self.spec.target_epsilon, self.spec.delta, self.spec.accountant)
        # A resumed run starts from everything already spent.
        self.accountant = build_accountant(self.spec.accountant)
        for release in self.ledger.releases if self.ledger is not None else []:
            self.accountant.compose(release)
            if self.guard is not None:
                self.guard.record(release)
        if self._pending_state is not None:
            self.aggregator.load_state_dict(self._pending_state)
            self._pending_state = None
        self._check_target_reachable()

    def _check_target_reachable(self) -> None:
        """Fail at once, naming the keys to change, if not even one round fits the budget."""
        if self.guard is None or len(self.guard.accountant) > 0:  # a resumed run may stop
            return
        assert self.aggregator is not None
        mechanism = self.aggregator.next_mechanism()
        first = self.guard.epsilon_after(mechanism)
        if first > self.guard.target_epsilon:
            raise ConfigError(
                f"run-config key 'dp-target-epsilon' ({self.guard.target_epsilon:g}) is below the "
                f"epsilon of a single round ({first:.4g} with dp-noise-multiplier="
                f"{self.spec.noise_multiplier:g}, q={mechanism.sample_rate:g}, "
                f"dp-delta={self.spec.delta:g}), so no round can run; raise dp-noise-multiplier "
                "(`pollen privacy plan` finds the z for a target), lower the sampling rate, or "
                "raise the target"
            )

    @property
    def ready(self) -> bool:
        return self.aggregator is not None

    # --- per round -----------------------------------------------------------------------
    def cohort(self, server_round: int) -> list[int]:
        """Check the budget, then draw this round's cohort (node ids).

        Raises
        ------
        privacy.budget.PrivacyBudgetExceeded
            If this round's release would exceed ``dp-target-epsilon``.
        """
        assert self.aggregator is not None, "setup() first"
        # A round already in the ledger is being re-run after a crash: its release was counted
        # (and its noise comes from the checkpointed generator), so it costs nothing new.
        rerun = self.ledger is not None and server_round in self.ledger
        if self.guard is not None and not rerun:
            self.guard.check(self.aggregator.next_mechanism(), server_round)
        cohort = self.aggregator.sampler.sample(self.aggregator.population, round_rng(self.seed, server_round))
        self._cohort = cohort
        self._sum = None
        self._participants = []
        return [self._nodes[i] for i in cohort.members]

    def client_config(self) -> dict[str, float | str]:
        """What clients need for client-side clipping (sent in the round config)."""
        assert self.aggregator is not None
        config: dict[str, float | str] = {
            "dp-clip": float(self.aggregator.clip), "dp-mode": self.spec.mode, "dp-where": self.spec.where
        }
        if self.spec.where == "client" and self.codec_tolerance > 0:
            # Packed workers bound each decoded update exactly as add() does.
            config["dp-codec-tolerance"] = self.codec_tolerance
        return config

    def add(self, update: ClientUpdate) -> None:
        """Bound one valid update and add it to the round's sum (weight 1, not examples)."""
        assert self.aggregator is not None
        unclipped = update.metrics.get("dp_unclipped") if self.spec.where == "client" else None
        try:
            prepared = self.aggregator.prepare(
                update.delta,
                client_unclipped=None if unclipped is None else bool(unclipped),
                codec_tolerance=self.codec_tolerance if self.spec.where == "client" else 0.0,
            )
        except (NormBoundExceeded, ValueError) as err:
            raise UpdateRejected(f"node {update.node_id}: {err}") from None
        if self._sum is None:
            self._sum = {k: v.astype(np.float64) for k, v in prepared.items()}
        else:
            for k, v in prepared.items():
                self._sum[k] += v
        self._participants.append(update.node_id)

    def add_batch(
        self, total: Params, *, count: int, unclipped: int, participants: Sequence[int]
    ) -> None:
        """Add a packed worker's sum of ``count`` already bounded updates (weight 1 each).

        The worker bounded every client's update on its own with
        :func:`privacy.mechanisms.bound_update` at this round's C before summing (see
        :meth:`~privacy.mechanisms.CentralDpAggregator.add_prepared` for why the sensitivity
        is unchanged). A sum longer than ``count``·C cannot come from such updates (triangle
        inequality) and is rejected whole.
        """
        assert self.aggregator is not None
        if count < 1 or len(participants) != count:
            raise UpdateRejected(
                f"a prepared batch needs count >= 1 and one participant per update; got "
                f"count={count}, {len(participants)} participants"
            )
        norm = global_l2_norm(total)
        bound = count * self.aggregator.clip * (1 + CLIENT_NORM_RTOL)
        if not norm <= bound:
            raise UpdateRejected(
                f"batch of {count} bounded updates has norm {norm:.6g} > count·C = {bound:.6g}"
            )
        try:
            self.aggregator.add_prepared(count, unclipped)
        except ValueError as err:
            raise UpdateRejected(str(err)) from None
        if self._sum is None:
            self._sum = {k: np.array(v, dtype=np.float64) for k, v in total.items()}
        else:
            for k, v in total.items():
                self._sum[k] += v
        self._participants.extend(int(p) for p in participants)

    def release(self, server_round: int, like: Params) -> tuple[Params, dict[str, float]]:
        """Noise the sum, record the release durably, return (noised average, metrics)."""
        assert self.aggregator is not None and self._cohort is not None
        total = (
            {k: v.astype(np.float32) for k, v in self._sum.items()}
            if self._sum is not None
            else {k: np.zeros_like(v, dtype=np.float32) for k, v in like.items()}
        )
        result = self.aggregator.release(total, self._cohort, server_round, tuple(self._participants))
        newly_recorded = self.ledger.append(result.event) if self.ledger is not None else True
        if newly_recorded:
            self.accountant.compose(result.event)
            if self.guard is not None:
                self.guard.record(result.event)
        metrics = dict(result.metrics)
        metrics["epsilon"] = self.epsilon()
        metrics["delta"] = self.spec.delta
        self._sum, self._cohort = None, None
        return result.average, metrics

    def epsilon(self) -> float:
        """ε spent so far at ``dp-delta`` (every release recorded, resumed runs included)."""
        return float(self.accountant.epsilon(self.spec.delta))

    # --- checkpoint ----------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {} if self.aggregator is None else self.aggregator.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        if self.aggregator is None:
            self._pending_state = state
        else:
            self.aggregator.load_state_dict(state)


def client_dpsgd_metrics(updates: Sequence[ClientUpdate]) -> dict[str, float]:
    """Row fields from the sample-level DP-SGD ε each client reported (``dpsgd_epsilon``).

    ``dpsgd_epsilon_max`` is the guarantee that holds for every example of these clients;
    ``dpsgd_epsilon_mean`` shows the spread (clients that joined more rounds spent more). Empty
    when no client ran DP-SGD. Clients report their own ε in the clear, so these describe the
    clients' accounting, not something the server verified.
    """
    epsilons = [
        float(update.metrics["dpsgd_epsilon"])
        for update in updates
        if "dpsgd_epsilon" in update.metrics
    ]
    if not epsilons:
        return {}
    return {
        "dpsgd_epsilon_max": max(epsilons),
        "dpsgd_epsilon_mean": float(np.mean(epsilons)),
    }
