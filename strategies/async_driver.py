"""The asynchronous driver: bounded-staleness server steps, one per client reply, over Flower's Message API.

This is APAM (Xu et al., "Parallel and distributed asynchronous adaptive stochastic gradient
methods", arXiv 2002.09095) on Flower's ``Grid``, with any Pollen server optimizer in place
of its AMSGrad master (``strategy=amsgrad`` gives APAM with local steps):

* ``concurrency`` clients are kept busy; there is no round barrier
  (``grid.push_messages`` / ``grid.pull_messages``).
* Each job is sent the current model version ``j`` (the optimizer's send point, held in
  :class:`~strategies.staleness.ModelVersions`). When its reply arrives at version ``k``,
  its staleness is ``s = k − j``. Replies with ``s > max_staleness`` are dropped; the rest are
  decoded and validated exactly as in the synchronous path (:func:`decode_reply`, against
  the model the client started from), scaled by the staleness weight (constant or
  ``(1 + s)^−a``) and applied at once with :meth:`ServerOptimizer.step`. One applied update
  is one *server step* and publishes version ``k + 1``.
* The node is freed and a new job goes to a node chosen uniformly among the idle ones
  (seeded per dispatch), so every client keeps taking part, as cohort sampling does.

Order of replies. With a :class:`~strategies.virtual_clock.VirtualClock` every job has a
simulated finish time and replies are applied in that order (the driver waits for the
earliest-finishing job's reply, buffering the others), so a run is deterministic for a seed
whatever the real timing. Without one, replies are applied in real arrival order.

Metrics. ``num_steps`` counts server steps. The observer gets one
:class:`AsyncRoundResult` per ``report_every`` server steps (default ``concurrency``, the
work of one synchronous round of ``concurrency`` clients) and after the last step.

Checkpoints. :meth:`AsyncDriver.state_dict` holds the model versions an in-flight job can
still be applied against, the in-flight jobs, the dispatch counter, the counters and the
clock. On resume the in-flight jobs are sent again with the same model and dispatch index:
with the virtual clock and Pollen's seeded clients this reproduces the uninterrupted run
exactly. A job whose start version is no longer held could only be dropped, so it is not
sent again; it keeps its node busy until its simulated finish time and is then counted as
dropped. Replies that were already computed before the crash are computed again.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from strategies import wire
from strategies.aggregation import WeightedScalars
from strategies.exchange import MIN_INTERVAL, pull_pause
from strategies.sampling import FixedSizeSampler
from strategies.staleness import ModelVersions, StalenessPolicy
from strategies.strategy import PollenStrategy, RoundStats, to_arrayrecord
from strategies.sync_driver import RoundResult
from strategies.updates import UpdateRejected, decode_reply
from strategies.virtual_clock import VirtualClock

log = logging.getLogger("pollen")

Params = dict[str, np.ndarray]

ACCEPTED, DROPPED, REJECTED = "accepted", "dropped", "rejected"


@dataclass
class Job:
    """One dispatched training job.

    Attributes
    ----------
    dispatch : int
        1-based dispatch index; the client is sent it as ``server-round`` (it seeds the
        client's batch order) and the virtual clock keys the job's duration on it.
    node_id : int
        Node training it.
    version : int
        Model version it started from.
    sim_finish : float
        Simulated finish time (NaN without a virtual clock).
    message_id : str or None
        Flower message id; ``None`` for a job restored from a checkpoint whose start
        version is no longer held (it can only be dropped, so it is not sent again).
    deadline : float
        ``time.monotonic()`` after which a missing reply counts as a failure.
    """

    dispatch: int
    node_id: int
    version: int
    sim_finish: float = math.nan
    message_id: str | None = None
    deadline: float = math.inf


@dataclass(frozen=True)
class Arrival:
    """What became of one job: applied, dropped as too stale, or rejected."""

    dispatch: int
    node_id: int
    version: int
    staleness: int
    outcome: str
    weight: float
    server_step: int  # model version after handling it
    sim_time: float  # simulated arrival time (NaN without a virtual clock)
    reason: str = ""


@dataclass
class AsyncRoundResult(RoundResult):
    """A :class:`RoundResult` for a block of server steps, with what asynchrony adds.

    ``server_round`` is the number of server steps applied so far (the model version);
    ``stats.clients`` the updates applied in this block.
    """

    sim_time: float | None = None
    accepted: int = 0
    dropped: int = 0
    dispatched: int = 0
    staleness_hist: list[int] = field(default_factory=list)
    arrivals: list[Arrival] = field(default_factory=list)

    def metrics(self) -> dict[str, Any]:
        """Fields for the metrics row (``sim_time`` only with a virtual clock).

        ``staleness_hist[s]`` counts this block's replies with staleness ``s`` for
        ``s ≤ max_staleness``; the last entry counts those staler than that (dropped).
        """
        stale = [a.staleness for a in self.arrivals if a.outcome == ACCEPTED]
        row: dict[str, Any] = {
            "accepted": self.accepted,
            "dropped": self.dropped,
            "dispatched": self.dispatched,
            "staleness_hist": list(self.staleness_hist),
            "mean_staleness": float(np.mean(stale)) if stale else None,
        }
        if self.sim_time is not None:
            row["sim_time"] = self.sim_time
        return row


class _Block:
    """Accumulates what happens between two reports."""

    def __init__(self, max_staleness: int, started: float) -> None:
        self.started = started
        self.accepted = self.dropped = self.rejected = self.dispatched = 0
        self.bytes_up = self.bytes_down = 0
        self.hist = [0] * (max_staleness + 2)
        self.metrics = WeightedScalars()
        self.arrivals: list[Arrival] = []
        self.rejections: list[str] = []

    def record(self, arrival: Arrival) -> None:
        self.arrivals.append(arrival)
        if arrival.outcome == REJECTED:
            self.rejected += 1
            self.rejections.append(arrival.reason)
            return
        self.hist[min(arrival.staleness, len(self.hist) - 1)] += 1
        if arrival.outcome == ACCEPTED:
            self.accepted += 1
        else:
            self.dropped += 1


class AsyncDriver:
    """Bounded-staleness asynchronous training with a :class:`PollenStrategy`'s parts.

    Parameters
    ----------
    strategy : PollenStrategy
        Provides the server optimizer, the codec, the seed and the per-job config
        (``train_config``); its round pipeline (``configure_train``/``aggregate_train``)
        is not used.
    concurrency : int
        Jobs kept in flight (fewer if fewer nodes are connected).
    policy : StalenessPolicy
        ``max_staleness`` τ and the staleness weighting.
    clock : VirtualClock, optional
        Simulated durations; replies are then applied in simulated finish order.
        ``None``: real arrival order (deployments).
    timeout : float
        Real seconds a job may take before its missing reply counts as a failure.
    report_every : int, optional
        Server steps per observer call (default ``concurrency``).
    poll_interval : float
        Least seconds between ``pull_messages`` calls while nothing has arrived; the pause
        grows with the measured cost of a pull (:func:`strategies.exchange.pull_pause`).
    """

    def __init__(
        self,
        strategy: PollenStrategy,
        *,
        concurrency: int,
        policy: StalenessPolicy,
        clock: VirtualClock | None = None,
        timeout: float = 600.0,
        report_every: int | None = None,
        poll_interval: float = MIN_INTERVAL,
    ) -> None:
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise ValueError(f"concurrency must be an integer >= 1, got {concurrency!r}")
        report_every = concurrency if report_every is None else report_every
        if report_every < 1:
            raise ValueError(f"report_every must be >= 1, got {report_every}")
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0, got {timeout}")
        self.strategy = strategy
        self.concurrency = concurrency
        self.policy = policy
        self.clock = clock
        self.timeout = float(timeout)
        self.report_every = report_every
        self.poll_interval = float(poll_interval)
        self._last_pull_s = 0.0  # how long the last pull took; paces the next one
        self._sampler = FixedSizeSampler(1, strategy.seed)
        self._versions = ModelVersions(policy.max_staleness)
        self._version_base = 0  # global id of the first version published to _versions
        self._jobs: dict[int, Job] = {}  # dispatch index → job
        self._inbox: dict[str, Message] = {}  # pulled replies not yet handled, arrival order
        self._to_resend: list[Job] = []
        self.dispatched = 0
        self.totals = {ACCEPTED: 0, DROPPED: 0, REJECTED: 0}
        self._failures_in_a_row = 0

    # --- public -------------------------------------------------------------------------
    @property
    def version(self) -> int:
        """Current model version = server steps applied so far (−1 before :meth:`run`)."""
        if not self._versions.held_versions:
            return -1
        return self._version_base + self._versions.current_version

    @property
    def in_flight(self) -> list[Job]:
        """Jobs dispatched and not yet handled, in dispatch order."""
        return [self._jobs[d] for d in sorted(self._jobs)]

    def run(
        self,
        grid: Grid,
        params: Params,
        *,
        num_steps: int,
        on_round: Callable[[AsyncRoundResult], bool | None] | None = None,
    ) -> Params:
        """Apply updates until the model version reaches ``num_steps``; return the model.

        ``params`` is the global model: the initial one, or the checkpointed one after
        :meth:`load_state_dict`. ``on_round`` returning ``False`` stops early (the state
        then still describes the in-flight jobs, so the run can be resumed).
        """
        optimizer = self.strategy.optimizer
        if self.version < 0:
            self._versions.publish(optimizer.send_point(params))
        if self.version >= num_steps:
            return params
        log.info(
            "async driver: %d server steps from version %d, concurrency %d, %r, %s",
            num_steps, self.version, self.concurrency, self.policy,
            self.clock if self.clock is not None else "real arrival order",
        )
        block = _Block(self.policy.max_staleness, time.perf_counter())
        self._resend(grid, block)
        self._fill(grid, block)
        while self.version < num_steps:
            job, reply = self._next_arrival(grid)
            params, applied = self._handle(job, reply, params, block)
            if self.version < num_steps:
                self._fill(grid, block)
            if applied and (self.version % self.report_every == 0 or self.version == num_steps):
                result = self._result(block, params)
                block = _Block(self.policy.max_staleness, time.perf_counter())
                if on_round is not None and on_round(result) is False:
                    break
        return params

    def state_dict(self) -> dict[str, Any]:
        """Everything but the model and the optimizer (checkpointed by the strategy)."""
        base = self._version_base
        jobs = sorted([*self._jobs.values(), *self._to_resend], key=lambda j: j.dispatch)
        return {
            "version": self.version,
            "versions": {base + v: dict(self._versions.get(v)) for v in self._versions.held_versions},
            "jobs": [
                {"dispatch": j.dispatch, "node_id": j.node_id, "version": j.version, "sim_finish": j.sim_finish}
                for j in jobs
            ],
            "dispatched": self.dispatched,
            "totals": dict(self.totals),
            "clock": self.clock.state_dict() if self.clock is not None else None,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; the in-flight jobs are sent again by the next :meth:`run`.

        Raises
        ------
        ValueError
            If the held versions are not consecutive up to ``version``, are more than
            ``max_staleness + 1``, or the state has a clock and this driver none (or the
            reverse).
        """
        versions = {int(v): model for v, model in state["versions"].items()}
        held = sorted(versions)
        version = int(state["version"])
        if not held or held != list(range(held[0], version + 1)):
            raise ValueError(
                f"async driver state must hold consecutive model versions ending at {version}, "
                f"got {held}"
            )
        if len(held) > self.policy.max_staleness + 1:
            raise ValueError(
                f"async driver state holds {len(held)} versions; max_staleness "
                f"{self.policy.max_staleness} keeps at most {self.policy.max_staleness + 1}"
            )
        if (state.get("clock") is None) != (self.clock is None):
            raise ValueError(
                "async driver state and this driver disagree on the virtual clock "
                f"(the state has {'none' if state.get('clock') is None else 'one'})"
            )
        self._versions = ModelVersions(self.policy.max_staleness)
        self._version_base = held[0]
        for v in held:
            self._versions.publish(versions[v])
        self._jobs = {}
        self._inbox = {}
        self._to_resend = [
            Job(
                dispatch=int(j["dispatch"]),
                node_id=int(j["node_id"]),
                version=int(j["version"]),
                sim_finish=float(j["sim_finish"]),
            )
            for j in state["jobs"]
        ]
        self.dispatched = int(state["dispatched"])
        self.totals = {k: int(v) for k, v in state["totals"].items()}
        if self.clock is not None:
            self.clock.load_state_dict(state["clock"])

    # --- dispatch -----------------------------------------------------------------------
    def _held(self, version: int) -> Params | None:
        """The send point of ``version``, or ``None`` once it has left the ring buffer."""
        local = version - self._version_base
        return self._versions.get(local) if local in self._versions else None

    def _push(self, grid: Grid, job: Job, start: Params, block: _Block) -> bool:
        # The same per-round config as the synchronous path, with the dispatch index as the
        # round: it seeds the client's batch order, so every job gets its own.
        config = self.strategy._round_config(job.dispatch, ConfigRecord())
        config["model-version"] = job.version
        content = RecordDict({wire.ARRAYS: to_arrayrecord(start), wire.CONFIG: config})
        message = Message(content, dst_node_id=job.node_id, message_type=MessageType.TRAIN)
        ids = list(grid.push_messages([message]))
        if not ids or not ids[0]:
            reason = f"node {job.node_id}: the message could not be pushed"
            log.warning("async: %s", reason)
            self._record(block, job, REJECTED, self.version - job.version, reason=reason)
            return False
        job.message_id = ids[0]
        job.deadline = time.monotonic() + self.timeout
        block.bytes_down += wire.content_size(content)
        self._jobs[job.dispatch] = job
        return True

    def _fill(self, grid: Grid, block: _Block) -> None:
        """Dispatch jobs to idle nodes until ``concurrency`` are in flight."""
        nodes = sorted(grid.get_node_ids())
        busy = {job.node_id for job in self._jobs.values()}
        failed: set[int] = set()
        while len(self._jobs) < self.concurrency:
            idle = [n for n in nodes if n not in busy and n not in failed]
            if not idle:
                break
            self.dispatched += 1
            # One node out of the idle ones, drawn like a one-client cohort of round
            # `dispatch`: with concurrency 1 this is exactly the synchronous driver's draw.
            node = self._sampler.sample(self.dispatched, idle)[0]
            job = Job(dispatch=self.dispatched, node_id=node, version=self.version)
            if self.clock is not None:
                job.sim_finish = self.clock.now + self.clock.duration(node, job.dispatch)
            block.dispatched += 1
            if self._push(grid, job, self._held(job.version), block):
                busy.add(node)
            else:
                failed.add(node)
        if not self._jobs:
            raise RuntimeError(
                f"async driver: no job in flight and no node to dispatch to "
                f"({len(nodes)} nodes connected, {len(failed)} failed pushes)"
            )

    def _resend(self, grid: Grid, block: _Block) -> None:
        """Send the in-flight jobs of a restored checkpoint again (see the module docstring)."""
        if not self._to_resend:
            return
        for job in self._to_resend:
            start = self._held(job.version)
            if start is None:
                self._jobs[job.dispatch] = job  # can only be dropped: stays busy until then
            else:
                self._push(grid, job, start, block)
        self._to_resend = []
        log.info("async: resumed at version %d with %d jobs in flight", self.version, len(self._jobs))

    # --- arrivals -----------------------------------------------------------------------
    def _poll(self, grid: Grid) -> None:
        waiting = [
            j.message_id
            for j in self._jobs.values()
            if j.message_id is not None and j.message_id not in self._inbox
        ]
        if waiting:
            started = time.monotonic()
            for reply in grid.pull_messages(waiting):
                self._inbox[reply.metadata.reply_to_message_id] = reply
            self._last_pull_s = time.monotonic() - started

    def _pause(self) -> None:
        time.sleep(pull_pause(self._last_pull_s, min_interval=self.poll_interval))

    def _next_arrival(self, grid: Grid) -> tuple[Job, Message | None]:
        """The next job to handle and its reply (``None``: not sent again, or timed out)."""
        if self.clock is not None:
            job = min(self._jobs.values(), key=lambda j: (j.sim_finish, j.dispatch))
            while job.message_id is not None and job.message_id not in self._inbox:
                if time.monotonic() > job.deadline:
                    break
                self._poll(grid)
                if job.message_id not in self._inbox:
                    self._pause()
            del self._jobs[job.dispatch]
            return job, self._inbox.pop(job.message_id, None) if job.message_id else None
        unsent = [j for j in self._jobs.values() if j.message_id is None]
        if unsent:
            return self._jobs.pop(unsent[0].dispatch), None
        by_message = {j.message_id: j for j in self._jobs.values()}
        while True:
            for message_id in list(self._inbox):
                reply = self._inbox.pop(message_id)
                if message_id in by_message:  # else: a reply to a job given up on
                    return self._jobs.pop(by_message[message_id].dispatch), reply
            self._poll(grid)
            if self._inbox:
                continue
            expired = [j for j in self._jobs.values() if time.monotonic() > j.deadline]
            if expired:
                return self._jobs.pop(expired[0].dispatch), None
            self._pause()

    def _handle(
        self, job: Job, reply: Message | None, params: Params, block: _Block
    ) -> tuple[Params, bool]:
        """Drop, reject or apply one job's reply; return the global model and whether it moved."""
        if self.clock is not None:
            self.clock.advance_to(job.sim_finish)
        if reply is not None and reply.has_content():
            block.bytes_up += wire.content_size(reply.content)
        staleness = self.version - job.version
        if not self.policy.accept(staleness):
            self._record(block, job, DROPPED, staleness)
            return params, False
        if reply is None:
            reason = f"node {job.node_id}: no reply within {self.timeout:g} s"
            self._record(block, job, REJECTED, staleness, reason=reason)
            return params, False
        try:
            update = decode_reply(reply, self._held(job.version), self.strategy.codec)
        except UpdateRejected as err:
            log.warning("async: rejected update: %s", err)
            self._record(block, job, REJECTED, staleness, reason=str(err))
            return params, False
        weight = self.policy.weight(staleness)
        delta = update.delta if weight == 1.0 else {
            k: v * np.float32(weight) for k, v in update.delta.items()
        }
        optimizer = self.strategy.optimizer
        params = optimizer.step(params, delta)
        self._versions.publish(optimizer.send_point(params))
        block.metrics.add(update.metrics, update.num_examples)
        self._record(block, job, ACCEPTED, staleness, weight=weight)
        return params, True

    def _record(
        self, block: _Block, job: Job, outcome: str, staleness: int, *,
        weight: float = 0.0, reason: str = "",
    ) -> None:
        block.record(
            Arrival(
                dispatch=job.dispatch,
                node_id=job.node_id,
                version=job.version,
                staleness=staleness,
                outcome=outcome,
                weight=weight,
                server_step=self.version,
                sim_time=self.clock.now if self.clock is not None else math.nan,
                reason=reason,
            )
        )
        self.totals[outcome] += 1
        if outcome != REJECTED:
            self._failures_in_a_row = 0
            return
        self._failures_in_a_row += 1
        if self._failures_in_a_row >= 10 * self.concurrency:
            raise RuntimeError(
                f"async driver: {self._failures_in_a_row} jobs in a row failed; last: {reason}"
            )

    def _result(self, block: _Block, params: Params) -> AsyncRoundResult:
        client_metrics = block.metrics.means()
        stats = RoundStats(
            server_round=self.version,
            sampled=block.dispatched,
            clients=block.accepted,
            rejected=block.rejected,
            bytes_up=block.bytes_up,
            bytes_down=block.bytes_down,
            train_loss=client_metrics.get("train_loss", math.nan),
            client_metrics=client_metrics,
            rejections=block.rejections,
        )
        return AsyncRoundResult(
            server_round=self.version,
            params=params,
            stats=stats,
            client_eval=None,
            wall_s=time.perf_counter() - block.started,
            sim_time=self.clock.now if self.clock is not None else None,
            accepted=block.accepted,
            dropped=block.dropped,
            dispatched=block.dispatched,
            staleness_hist=block.hist,
            arrivals=block.arrivals,
        )

