"""Pollen's server strategy: one Flower ``Strategy`` composed of small parts.

The round pipeline is fixed; what varies is plugged in as a part:

``sample cohort → send global (optimizer's send point) → [clients] → decode + validate each
reply → (privacy) → running weighted sum → server optimizer step``

* ``ServerOptimizer`` (:mod:`strategies.server_optimizers`): FedAvg/server-lr, block momentum
  (+ Nesterov), AMSGrad/Adam/Yogi.
* ``Codec`` (:mod:`strategies.codecs`): decodes Pollen payloads before anything else.
* cohort sampler (:mod:`strategies.sampling`).

It implements Flower's Message-API ``Strategy`` ABC, so it also runs under
``strategy.start(grid, ...)`` in a user's own ServerApp and against a stock Flower ClientApp
that replies with ``arrays`` (its full model) and a MetricRecord holding ``num-examples``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from strategies import wire
from strategies.aggregation import RunningWeightedSum, WeightedScalars
from strategies.packed_layout import OK, REJECTED, PackedLayout
from strategies.private_aggregation import PrivateAggregation, client_dpsgd_metrics
from strategies.sampling import FixedSizeSampler, round_rng
from strategies.updates import ClientUpdate, UpdateLimits, UpdateRejected, decode_reply

log = logging.getLogger("pollen")

Params = dict[str, np.ndarray]

CLIENT_INFO = "client-info"
"""ConfigRecord of a Pollen train reply describing the client, e.g. ``{"device": "cuda"}``."""


def to_params(arrays: ArrayRecord) -> Params:
    """ArrayRecord → ordered dict of float32 NumPy arrays."""
    return {k: np.asarray(v.numpy(), dtype=np.float32) for k, v in arrays.items()}


def to_arrayrecord(params: Params) -> ArrayRecord:
    """Ordered dict of NumPy arrays → ArrayRecord (keeps the state-dict names)."""
    # np.asarray(order="C"), not np.ascontiguousarray, which turns 0-d arrays into shape (1,).
    return ArrayRecord({k: Array(np.asarray(v, order="C")) for k, v in params.items()})


@dataclass
class RoundStats:
    """What one training round did, for metrics.jsonl and the progress line."""

    server_round: int
    sampled: int = 0
    clients: int = 0
    rejected: int = 0  # replies that arrived but were invalid
    failed: int = 0  # error replies (client crashed or dropped out)
    missing: int = 0  # sampled clients whose reply never arrived (timeout)
    attempt: int = 0  # retries of this round after too few valid updates
    applied: bool = False  # whether the round changed the global model
    # Traffic per client: the whole reply / message content. In the packed layout, bytes up
    # are the clients' encoded updates (what one-client replies carry, less their few
    # hundred bytes of metrics) and bytes down the model + config sent per client.
    bytes_up: int = 0
    bytes_down: int = 0
    payload_bytes: int = 0
    bits_per_param: float = float("nan")  # uplink: 8 · encoded-update bytes / (clients · params)
    train_loss: float = float("nan")
    client_metrics: dict[str, float] = field(default_factory=dict)
    rejections: list[str] = field(default_factory=list)
    cohort: list[int] = field(default_factory=list)  # node ids (packed: client ids) sampled
    privacy_metrics: dict[str, float] = field(default_factory=dict)  # epsilon, delta, dp_*
    devices: dict[str, int] = field(default_factory=dict)  # accepted updates per client device
    # Packed layout: seconds each worker spent on its share (training + encode/decode/validate),
    # so that ``wall_s − max(worker_s)`` is what messaging and the server cost in the round.
    worker_s: list[float] = field(default_factory=list)


class PollenStrategy(Strategy):
    """FedAvg / Local SGD and its server-optimizer, codec and privacy variants.

    Parameters
    ----------
    optimizer : ServerOptimizer
        Applied to the weighted mean client delta (``fedavg`` with ``server_lr=1`` is FedAvg).
    clients_per_round : int
        Cohort size ``m``; fewer if fewer nodes are connected.
    seed : int
        Seeds cohort sampling, per round, so a resumed run samples the same cohorts.
    codec : Codec, optional
        Decoder for Pollen client payloads; ``None`` for plain float32 deltas / stock clients.
    fraction_evaluate : float, default 0.0
        Fraction of connected nodes asked to evaluate the global model each round.
    train_config : dict, optional
        Extra values sent to clients in the ``config`` ConfigRecord every round.
    limits : UpdateLimits, optional
        Payload-size and norm bounds; a reply outside them is rejected (logged, counted).
    min_replies : int, default 1
        Fewest valid updates with which a round changes the global model; with fewer the
        model is left unchanged for that round (the driver may retry it). Not used with
        ``privacy``: a DP round always releases its noised sum, whatever the turnout.
    privacy : PrivateAggregation, optional
        Central DP: replaces cohort sampling and the example-weighted mean by DP sampling and
        the clipped/normalized, noised sum over a fixed denominator (see
        :mod:`strategies.private_aggregation`).
    layout : PackedLayout, optional
        Packed virtual clients (:mod:`strategies.packed_layout`): the cohort is sampled over
        the virtual client ids, each worker node gets one message with its share, and its
        reply is a pre-aggregated sum that is merged here. ``None``: one node per client.
    """

    def __init__(
        self,
        *,
        optimizer,
        clients_per_round: int,
        seed: int = 0,
        codec=None,
        fraction_evaluate: float = 0.0,
        train_config: dict | None = None,
        limits: UpdateLimits | None = None,
        min_replies: int = 1,
        privacy: PrivateAggregation | None = None,
        layout: PackedLayout | None = None,
    ) -> None:
        if min_replies < 1:
            raise ValueError(f"min_replies must be >= 1, got {min_replies}")
        self.optimizer = optimizer
        self.limits = limits
        self.min_replies = min_replies
        self.privacy = privacy
        self.client_of_node: dict[int, int] = {}  # Flower node id → stable client id
        self.layout = layout
        self.attempt = 0
        self.sampler = FixedSizeSampler(clients_per_round, seed)
        self.seed = seed
        self.codec = codec
        self.fraction_evaluate = fraction_evaluate
        self.train_config = dict(train_config or {})
        self.global_params: Params | None = None
        self._sent: Params | None = None
        self.last_round: RoundStats | None = None
        # The round's accepted updates; in the packed layout, per-client records whose deltas
        # stay empty (they were summed on the workers).
        self.last_updates: list[ClientUpdate] = []

    # --- Flower Strategy ABC ------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.global_params = to_params(arrays)
        self._sent = self.optimizer.send_point(self.global_params)
        node_ids = list(grid.get_node_ids())
        # Clients are the nodes (by their stable client ids when known), or the packed
        # layout's virtual client ids (a range).
        node_of = self._node_of_client(node_ids)
        if self.layout is not None:
            clients = self.layout.population
        else:
            clients = list(node_of) if node_of is not None else node_ids
        round_config = self._round_config(server_round, config)
        if self.privacy is not None:
            if not self.privacy.ready:
                self.privacy.setup(clients)
            cohort = self.privacy.cohort(server_round)
            for k, v in self.privacy.client_config().items():
                round_config[k] = v
        else:
            cohort = self.sampler.sample(server_round, clients, attempt=self.attempt)
        content = RecordDict({wire.ARRAYS: to_arrayrecord(self._sent), wire.CONFIG: round_config})
        self.last_round = RoundStats(
            server_round=server_round, sampled=len(cohort), cohort=list(cohort), attempt=self.attempt
        )
        # Every client is sent the same content: bytes down are counted per recipient.
        self.last_round.bytes_down = wire.content_size(content) * len(cohort)
        if self.layout is not None:
            return self.layout.train_messages(cohort, node_ids, content)
        if node_of is not None:
            cohort = [node_of[c] for c in cohort]
            self.last_round.cohort = list(cohort)
        return [
            Message(content, dst_node_id=node, message_type=MessageType.TRAIN) for node in cohort
        ]

    def set_client_ids(self, client_of_node: dict[int, int]) -> None:
        """Sample by stable client ids instead of Flower node ids.

        Flower numbers simulated nodes randomly in every run; sampling over the clients' own
        ids (their partition ids) makes the cohorts — and so the whole trajectory — depend on
        the seed alone, across runs, resumes and layouts.
        """
        self.client_of_node = dict(client_of_node)

    def _node_of_client(self, node_ids: list[int]) -> dict[int, int] | None:
        if not self.client_of_node:
            return None
        return {self.client_of_node[n]: n for n in node_ids if n in self.client_of_node}

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if self._sent is None or self.global_params is None:
            raise RuntimeError("aggregate_train called before configure_train")
        stats = self.last_round or RoundStats(server_round=server_round)
        total = RunningWeightedSum()
        client_metrics = WeightedScalars()
        self.last_updates = []
        received = 0
        for reply in replies:
            if self.layout is not None:
                received += self._add_share(server_round, reply, stats, total, client_metrics)
                continue
            received += 1
            if reply.has_error():
                stats.failed += 1
                reason = f"node {reply.metadata.src_node_id}: {reply.error.reason}"
                stats.rejections.append(reason)
                log.warning("round %d: client failed: %s", server_round, reason)
                continue
            try:
                update = decode_reply(reply, self._sent, self.codec, self.limits)
                if self.privacy is not None:
                    self.privacy.add(update)
            except UpdateRejected as reason:
                stats.rejected += 1
                stats.rejections.append(str(reason))
                log.warning("round %d: rejected update: %s", server_round, reason)
                continue
            stats.bytes_up += update.bytes_up
            stats.payload_bytes += update.payload_bytes
            total.add(update.delta, update.num_examples)
            client_metrics.add(update.metrics, update.num_examples)
            self.last_updates.append(update)
            info = reply.content.config_records.get(CLIENT_INFO)
            if info is not None and "device" in info:
                stats.devices[str(info["device"])] = stats.devices.get(str(info["device"]), 0) + 1
        stats.clients = total.count
        stats.missing = max(0, stats.sampled - received)
        self.last_round = stats
        summary = {"clients": stats.clients, "rejected": stats.rejected, "failed": stats.failed,
                   "missing": stats.missing}
        if self.privacy is None and total.count < self.min_replies:
            log.warning(
                "round %d: %d valid update(s), fewer than min-replies=%d; the global model is "
                "unchanged", server_round, total.count, self.min_replies,
            )
            return None, MetricRecord(summary)
        num_params = sum(v.size for v in self._sent.values())
        stats.bits_per_param = 8.0 * stats.payload_bytes / max(total.count * num_params, 1)
        if self.privacy is not None:
            mean_delta, stats.privacy_metrics = self.privacy.release(server_round, self._sent)
        else:
            mean_delta = total.mean()
        stats.privacy_metrics.update(client_dpsgd_metrics(self.last_updates))
        self.global_params = self.optimizer.step(self.global_params, mean_delta)
        stats.applied = True
        stats.client_metrics = client_metrics.means()
        stats.train_loss = stats.client_metrics.get("train_loss", float("nan"))
        record = MetricRecord(
            {
                **summary,
                "bytes_up": stats.bytes_up,
                "bytes_down": stats.bytes_down,
                "bits_per_param": stats.bits_per_param,
                **stats.client_metrics,
                **stats.privacy_metrics,
            }
        )
        return to_arrayrecord(self.global_params), record

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.fraction_evaluate <= 0.0:
            return []
        nodes = sorted(grid.get_node_ids())
        n = max(1, round(len(nodes) * self.fraction_evaluate))
        rng = round_rng(self.seed, server_round, stream=1)
        chosen = sorted(rng.choice(len(nodes), size=min(n, len(nodes)), replace=False))
        content = RecordDict(
            {wire.ARRAYS: arrays, wire.CONFIG: self._round_config(server_round, config)}
        )
        return [
            Message(content, dst_node_id=nodes[i], message_type=MessageType.EVALUATE)
            for i in chosen
        ]

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        sums = WeightedScalars()
        for reply in replies:
            if reply.has_error() or not reply.content.metric_records:
                continue
            metrics = next(iter(reply.content.metric_records.values()))
            weight = metrics.get(wire.NUM_EXAMPLES)
            if not isinstance(weight, (int, float)) or weight <= 0:
                continue
            sums.add({k: v for k, v in metrics.items() if k != wire.NUM_EXAMPLES}, weight)
        means = sums.means()
        return MetricRecord(means) if means else None

    def summary(self) -> None:
        log.info(
            "PollenStrategy: optimizer=%s, clients/round=%d, codec=%s, fraction-evaluate=%s",
            getattr(self.optimizer, "name", type(self.optimizer).__name__),
            self.sampler.clients_per_round,
            getattr(self.codec, "name", "none"),
            self.fraction_evaluate,
        )
        if self.layout is not None:
            log.info(
                "packed layout: %d virtual clients on the connected worker nodes (%s)",
                self.layout.virtual_clients,
                "fixed home worker per client" if self.layout.sticky else "balanced by examples",
            )

    def _add_share(
        self,
        server_round: int,
        reply: Message,
        stats: RoundStats,
        total: RunningWeightedSum,
        client_metrics: WeightedScalars,
    ) -> int:
        """Merge one packed worker's reply; returns how many sampled clients it accounts for.

        The worker already decoded and validated each client's update (and, with DP, bounded
        it); here its sum is checked and merged, and its per-client records are counted
        exactly as one-client replies would be.
        """
        assert self.layout is not None and self._sent is not None
        node = reply.metadata.src_node_id
        share = self.layout.share(node)
        if reply.has_error():
            stats.failed += len(share)
            stats.rejections.append(f"node {node} ({len(share)} clients): {reply.error.reason}")
            log.warning("round %d: node %d failed: %s", server_round, node, reply.error.reason)
            return len(share)
        try:
            report = self.layout.read_reply(reply, self._sent, private=self.privacy is not None)
            accepted = report.accepted
            if self.privacy is not None and accepted:
                self.privacy.add_batch(
                    report.total.sum64(),
                    count=len(accepted),
                    unclipped=sum(c.unclipped for c in accepted),
                    participants=[c.client_id for c in accepted],
                )
        except UpdateRejected as reason:
            stats.rejected += len(share)
            stats.rejections.append(f"node {node} ({len(share)} clients): {reason}")
            log.warning("round %d: rejected packed reply of node %d: %s", server_round, node, reason)
            return len(share)
        for client in report.clients:
            if client.status == OK:
                stats.bytes_up += client.payload_bytes
                stats.payload_bytes += client.payload_bytes
                client_metrics.add(client.metrics, client.num_examples)
                self.last_updates.append(
                    ClientUpdate(
                        node_id=client.client_id,
                        delta={},
                        num_examples=client.num_examples,
                        metrics=client.metrics,
                        bytes_up=client.payload_bytes,
                        payload_bytes=client.payload_bytes,
                    )
                )
                continue
            if client.status == REJECTED:
                stats.rejected += 1
                log.warning("round %d: rejected update: %s", server_round, client.reason)
            else:
                stats.failed += 1
                log.warning("round %d: %s", server_round, client.reason)
            stats.rejections.append(client.reason)
        total.merge(report.total)
        stats.worker_s.append(report.worker_time_s)
        return len(report.clients)

    # --- checkpoint state ---------------------------------------------------------------
    def state_dict(self) -> dict:
        """Server-side state other than the global model (for checkpoints)."""
        state = {"optimizer": self.optimizer.state_dict()}
        if self.privacy is not None:
            state["privacy"] = self.privacy.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if self.privacy is not None:
            self.privacy.load_state_dict(state.get("privacy", {}))

    # --- helpers ------------------------------------------------------------------------
    def _round_config(self, server_round: int, config: ConfigRecord) -> ConfigRecord:
        merged = ConfigRecord(dict(config))
        for k, v in self.train_config.items():
            merged[k] = v
        merged["server-round"] = server_round
        return merged
