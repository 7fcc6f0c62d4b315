"""The packed layout: virtual clients hosted by worker SuperNodes, one message per worker.

With ``virtual-clients=N`` the federation's SuperNodes are *workers* rather than clients.
Each round the server samples its cohort over the virtual client ids ``0..N-1`` (the same
samplers as the one-SuperNode-per-client layout, whose sampled index ``i`` addresses the
``i``-th of the sorted node ids), splits the cohort among the workers, and sends each worker
one TRAIN message: the global model, the round config and a :class:`ShareAssignment` (its
client ids). A worker (:mod:`fedclient.packed_worker`) trains its clients one after another
with the same client pipeline, decodes and validates each update as the server would, and
replies with a :class:`ShareReport`: the pre-aggregated sum plus per-client statistics.

Which worker hosts which client (:func:`assign_cohort`):

* clients that keep private state between rounds (error-feedback memory, a DP-SGD
  accountant) need a **stable home**, because the state lives on their worker's disk:
  client ``c`` goes to worker ``c mod W`` (workers in sorted node-id order). A uniformly
  sampled cohort then splits evenly in expectation (the share sizes are hypergeometric:
  for 1,000 clients on 2 workers the larger share is ~1–2 % above 500);
* stateless clients are **balanced by examples**: longest-processing-time first, each
  client to the worker with the fewest examples so far, which bounds the largest share by
  4/3 of the optimum (Graham 1969) and is exact for equal-size clients.

Everything here is O(cohort): the population is a ``range``; nothing per population is built.

Equivalence to the one-SuperNode-per-client layout: the same seed samples the same indices;
in :class:`simulations.inprocess_grid.InProcessGrid` the ``i``-th sorted node holds partition
``i``, so both layouts train the same clients on the same data with the same seeds and reach
the same model up to float64 summation order. In a real Flower simulation node ids are
random, so node ``i`` in sorted order is not necessarily partition ``i``: the two layouts
then sample the same *indices*, not the same clients.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
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

from strategies import wire
from strategies.aggregation import RunningWeightedSum
from strategies.updates import UpdateRejected

Params = dict[str, np.ndarray]

#: Record names of packed messages (server → worker) and replies (worker → server).
PACKED = "packed"  # ConfigRecord: the worker's share of the cohort
PACKED_SUM = "packed-sum"  # ArrayRecord: float64 Σ w_i Δ_i over the share's accepted updates
PACKED_STATS = "packed-stats"  # ArrayRecord: one entry per client of the share
PACKED_REASONS = "packed-reasons"  # ConfigRecord: why clients were rejected or failed

#: Per-client outcome codes in :data:`PACKED_STATS`.
OK, REJECTED, FAILED = 0, 1, 2
_METRIC_PREFIX = "metric/"


def assign_cohort(
    cohort: Sequence[int],
    num_workers: int,
    *,
    sticky: bool,
    num_examples: Callable[[int], int] | None = None,
) -> list[list[int]]:
    """Split a cohort of client ids among ``num_workers`` workers (sorted ids per share).

    Parameters
    ----------
    cohort : sequence of int
        Sampled virtual client ids.
    num_workers : int
        Workers available (shares are indexed like the sorted worker node ids).
    sticky : bool
        True when clients keep private state on their worker: client ``c`` always goes to
        worker ``c mod num_workers``. False: balance the number of examples.
    num_examples : callable, optional
        Client id → number of training examples, for balancing; ``None`` treats all clients
        as equal (then shares differ by at most one client).
    """
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    shares: list[list[int]] = [[] for _ in range(num_workers)]
    if sticky:
        for client in cohort:
            shares[int(client) % num_workers].append(int(client))
        return [sorted(share) for share in shares]
    sizes = {int(c): (1 if num_examples is None else int(num_examples(int(c)))) for c in cohort}
    # Longest first; ties by id so the split is deterministic.
    heap = [(0, w) for w in range(num_workers)]
    for client in sorted(sizes, key=lambda c: (-sizes[c], c)):
        load, w = heapq.heappop(heap)
        shares[w].append(client)
        heapq.heappush(heap, (load + sizes[client], w))
    return [sorted(share) for share in shares]


@dataclass(frozen=True)
class ShareAssignment:
    """What a worker is asked to do in a round: which virtual clients to train.

    ``worker_index`` of ``num_workers`` is the worker's slot in the assignment (its rank
    among the sorted worker node ids); a worker keys its client-state directory by it, since
    sticky assignment is defined on slots.
    """

    client_ids: tuple[int, ...]
    worker_index: int
    num_workers: int

    def to_record(self) -> ConfigRecord:
        return ConfigRecord(
            {
                "client-ids": [int(c) for c in self.client_ids],
                "worker-index": self.worker_index,
                "num-workers": self.num_workers,
            }
        )

    @classmethod
    def from_message(cls, msg: Message) -> ShareAssignment | None:
        """The assignment of a packed TRAIN message, or ``None`` for a one-client message."""
        record = msg.content.config_records.get(PACKED)
        if record is None:
            return None
        return cls(
            client_ids=tuple(int(c) for c in record["client-ids"]),
            worker_index=int(record["worker-index"]),
            num_workers=int(record["num-workers"]),
        )


@dataclass
class ClientRecord:
    """One virtual client's outcome in a worker's share."""

    client_id: int
    status: int  # OK, REJECTED or FAILED
    num_examples: int = 0
    payload_bytes: int = 0  # its encoded update as one-per-client replies carry it
    update_norm: float = math.nan  # L2 norm of the decoded update, before any DP bound
    unclipped: bool = False  # DP: the update was within C (adaptive clipping's bit)
    metrics: dict[str, float] = field(default_factory=dict)
    reason: str = ""  # why it was rejected or failed


@dataclass
class ShareReport:
    """A worker's reply: the sum of its accepted updates and a record per client.

    ``total`` holds ``Σ w_i Δ_i`` over accepted clients in float64, with ``w_i`` their number
    of examples, or 1 when central DP is on (then each ``Δ_i`` is already bounded to norm ≤ C).
    """

    clients: list[ClientRecord]
    total: RunningWeightedSum
    worker_time_s: float = 0.0

    @property
    def accepted(self) -> list[ClientRecord]:
        return [c for c in self.clients if c.status == OK]

    def to_content(self) -> RecordDict:
        """The reply content (what :meth:`from_content` reads back)."""
        clients = self.clients
        stats: dict[str, np.ndarray] = {
            "client-id": np.array([c.client_id for c in clients], dtype=np.int64),
            "status": np.array([c.status for c in clients], dtype=np.int8),
            "num-examples": np.array([c.num_examples for c in clients], dtype=np.int64),
            "payload-bytes": np.array([c.payload_bytes for c in clients], dtype=np.int64),
            "update-norm": np.array([c.update_norm for c in clients], dtype=np.float64),
            "dp-unclipped": np.array([c.unclipped for c in clients], dtype=np.int8),
        }
        names = sorted({k for c in clients for k in c.metrics})
        for name in names:
            stats[_METRIC_PREFIX + name] = np.array(
                [c.metrics.get(name, math.nan) for c in clients], dtype=np.float64
            )
        accepted = self.accepted
        content = RecordDict(
            {
                PACKED_STATS: ArrayRecord({k: Array(v) for k, v in stats.items()}),
                wire.METRICS: MetricRecord(
                    {
                        wire.NUM_EXAMPLES: int(sum(c.num_examples for c in accepted)),
                        "clients": len(accepted),
                        "total-weight": float(self.total.total_weight),
                        "worker_time_s": float(self.worker_time_s),
                    }
                ),
            }
        )
        if self.total.count:
            content[PACKED_SUM] = ArrayRecord(
                {k: Array(np.asarray(v, order="C")) for k, v in self.total.sum64().items()}
            )
        failed = [c for c in clients if c.status != OK]
        if failed:
            content[PACKED_REASONS] = ConfigRecord(
                {"client-ids": [c.client_id for c in failed], "reasons": [c.reason for c in failed]}
            )
        return content

    @classmethod
    def from_content(cls, content: RecordDict, sent: Params, *, private: bool) -> ShareReport:
        """Read and validate a worker's reply.

        Parameters
        ----------
        sent : Params
            The point the worker was sent; the sum must have its names and shapes.
        private : bool
            Central DP is on: every accepted update has weight 1.

        Raises
        ------
        UpdateRejected
            Missing or inconsistent records, a sum with wrong names/shapes or non-finite
            values, or a total weight that does not match the per-client records.
        """
        if PACKED_STATS not in content.array_records:
            raise UpdateRejected(f"packed reply has no '{PACKED_STATS}' record")
        stats = {k: v.numpy() for k, v in content.array_records[PACKED_STATS].items()}
        required = ("client-id", "status", "num-examples", "payload-bytes", "update-norm", "dp-unclipped")
        missing = [k for k in required if k not in stats]
        if missing:
            raise UpdateRejected(f"packed reply statistics lack {missing}")
        k = len(stats["client-id"])
        if any(v.shape != (k,) for v in stats.values()):
            raise UpdateRejected("packed reply statistics have inconsistent lengths")
        status = stats["status"].astype(int)
        if not np.isin(status, (OK, REJECTED, FAILED)).all():
            raise UpdateRejected(f"packed reply has unknown client status codes {sorted(set(status))}")
        reasons: dict[int, str] = {}
        if PACKED_REASONS in content.config_records:
            record = content.config_records[PACKED_REASONS]
            reasons = dict(zip((int(c) for c in record["client-ids"]), (str(r) for r in record["reasons"])))
        metric_names = [n for n in stats if n.startswith(_METRIC_PREFIX)]
        clients = []
        for i in range(k):
            metrics = {
                n[len(_METRIC_PREFIX):]: float(stats[n][i])
                for n in metric_names
                if math.isfinite(float(stats[n][i]))
            }
            clients.append(
                ClientRecord(
                    client_id=int(stats["client-id"][i]),
                    status=int(status[i]),
                    num_examples=int(stats["num-examples"][i]),
                    payload_bytes=int(stats["payload-bytes"][i]),
                    update_norm=float(stats["update-norm"][i]),
                    unclipped=bool(stats["dp-unclipped"][i]),
                    metrics=metrics,
                    reason=reasons.get(int(stats["client-id"][i]), ""),
                )
            )
        accepted = [c for c in clients if c.status == OK]
        if any(c.num_examples <= 0 for c in accepted):
            raise UpdateRejected("packed reply has an accepted client with no examples")
        metrics = dict(content.metric_records.get(wire.METRICS, {}))
        weight = float(len(accepted) if private else sum(c.num_examples for c in accepted))
        reported = metrics.get("total-weight")
        if not isinstance(reported, (int, float)) or not math.isclose(float(reported), weight):
            raise UpdateRejected(
                f"packed reply's total weight {reported!r} does not match its clients' {weight:g}"
            )
        total = RunningWeightedSum()
        if accepted:
            total = RunningWeightedSum.from_sum(_checked_sum(content, sent), weight, len(accepted))
        elif PACKED_SUM in content.array_records:
            raise UpdateRejected("packed reply carries a sum but no accepted client")
        return cls(clients=clients, total=total, worker_time_s=float(metrics.get("worker_time_s", 0.0)))


def _checked_sum(content: RecordDict, sent: Params) -> Params:
    if PACKED_SUM not in content.array_records:
        raise UpdateRejected(f"packed reply has accepted clients but no '{PACKED_SUM}' record")
    total = {k: v.numpy() for k, v in content.array_records[PACKED_SUM].items()}
    if total.keys() != sent.keys():
        raise UpdateRejected(
            f"packed sum has arrays {sorted(total)}, expected {sorted(sent)}"
        )
    for name, ref in sent.items():
        value = total[name]
        if value.shape != ref.shape or not np.issubdtype(value.dtype, np.floating):
            raise UpdateRejected(
                f"packed sum '{name}' has shape {value.shape} and dtype {value.dtype}, expected "
                f"shape {ref.shape} and a float dtype"
            )
        if not np.all(np.isfinite(value)):
            raise UpdateRejected(f"packed sum '{name}' has non-finite values")
    return total


class PackedLayout:
    """The server side of the packed layout: the population, the split, and the replies.

    Parameters
    ----------
    virtual_clients : int
        N; clients are the ids ``0..N-1``.
    sticky : bool
        Clients keep private state on their worker, so each has a fixed home worker
        (see :func:`assign_cohort`).
    num_examples : callable, optional
        Client id → examples, for balancing non-sticky cohorts (``None``: all equal).
    """

    def __init__(
        self,
        virtual_clients: int,
        *,
        sticky: bool,
        num_examples: Callable[[int], int] | None = None,
    ) -> None:
        if virtual_clients < 1:
            raise ValueError(f"virtual_clients must be >= 1, got {virtual_clients}")
        self.virtual_clients = int(virtual_clients)
        self.sticky = sticky
        self.num_examples = num_examples
        self._shares: dict[int, tuple[int, ...]] = {}

    @property
    def population(self) -> range:
        """The virtual client ids, as a ``range`` (no per-population list)."""
        return range(self.virtual_clients)

    def train_messages(
        self, cohort: Sequence[int], node_ids: Iterable[int], content: RecordDict
    ) -> list[Message]:
        """One TRAIN message per worker with a non-empty share of ``cohort``.

        ``content`` (global model + round config) is what a one-client message would hold;
        each worker's message adds its :class:`ShareAssignment`.
        """
        workers = sorted(node_ids)
        self._shares = {}
        if not workers:
            return []
        shares = assign_cohort(
            cohort, len(workers), sticky=self.sticky, num_examples=self.num_examples
        )
        messages = []
        for index, (node, share) in enumerate(zip(workers, shares, strict=True)):
            if not share:
                continue
            self._shares[node] = tuple(share)
            assignment = ShareAssignment(tuple(share), index, len(workers))
            packed = RecordDict(dict(content.items()))
            packed[PACKED] = assignment.to_record()
            messages.append(Message(packed, dst_node_id=node, message_type=MessageType.TRAIN))
        return messages

    def share(self, node_id: int) -> tuple[int, ...]:
        """The client ids sent to ``node_id`` this round (empty if none)."""
        return self._shares.get(node_id, ())

    def read_reply(self, reply: Message, sent: Params, *, private: bool) -> ShareReport:
        """Validate a worker's reply against what it was sent (:meth:`ShareReport.from_content`).

        Its per-client records must cover exactly the worker's share.
        """
        node = reply.metadata.src_node_id
        report = ShareReport.from_content(reply.content, sent, private=private)
        ids = [c.client_id for c in report.clients]
        if sorted(ids) != sorted(self.share(node)):
            raise UpdateRejected(
                f"node {node}: packed reply covers clients {_abbreviate(ids)}, but its share was "
                f"{_abbreviate(self.share(node))}"
            )
        return report

    def unanswered(self, answered: Iterable[int]) -> int:
        """Clients whose worker never replied (timed out or lost)."""
        done = set(answered)
        return sum(len(share) for node, share in self._shares.items() if node not in done)


def _abbreviate(ids: Sequence[int], limit: int = 8) -> str:
    ids = sorted(ids)
    shown = ", ".join(map(str, ids[:limit]))
    return f"[{shown}{', …' if len(ids) > limit else ''}] ({len(ids)})"


class PayloadSizer:
    """Serialized bytes of an encoded update, as a one-client reply would carry it.

    Equals ``wire.serialized_size`` of the update ``ArrayRecord`` plus that of the codec
    header ``ConfigRecord`` — what :func:`strategies.updates.decode_reply` counts — without
    serializing the arrays for every client: an ArrayRecord's size is the bytes of its arrays
    plus an overhead fixed by their names, dtypes and shapes, measured once per such layout
    (with distinct random contents) and cached. Flower sends byte-identical chunks of one
    record once; payloads with two identical arrays are therefore counted as if distinct.
    """

    def __init__(self, max_entries: int = 4096) -> None:
        self._overhead: dict[tuple, int] = {}
        self._headers: dict[tuple, int] = {}
        self._max_entries = max_entries
        self._rng = np.random.default_rng(0)

    def __call__(self, payload: Mapping[str, np.ndarray], header: Mapping) -> int:
        arrays = {k: np.asarray(v) for k, v in payload.items()}
        key = tuple((k, v.dtype.str, v.shape) for k, v in arrays.items())
        overhead = self._overhead.get(key)
        if overhead is None:
            overhead = self._remember(self._overhead, key, self._measure(arrays))
        return overhead + sum(v.nbytes for v in arrays.values()) + self._header_bytes(header)

    def _header_bytes(self, header: Mapping) -> int:
        # Codec headers are a few scalars, mostly the same every time: cache by value.
        key = tuple(sorted((k, type(v).__name__, v) for k, v in header.items()))
        try:
            size = self._headers.get(key)
        except TypeError:  # a list value: not hashable, measure directly
            return wire.serialized_size(ConfigRecord(dict(header)))
        if size is None:
            size = self._remember(
                self._headers, key, wire.serialized_size(ConfigRecord(dict(header)))
            )
        return size

    def _remember(self, cache: dict, key: tuple, value: int) -> int:
        if len(cache) >= self._max_entries:
            cache.clear()
        cache[key] = value
        return value

    def _measure(self, arrays: Mapping[str, np.ndarray]) -> int:
        distinct = {
            k: np.frombuffer(self._rng.bytes(v.nbytes), dtype=v.dtype).reshape(v.shape)
            for k, v in arrays.items()
        }
        # As strategies.strategy.to_arrayrecord builds a reply's update record.
        record = ArrayRecord({k: Array(np.asarray(v, order="C")) for k, v in distinct.items()})
        return wire.serialized_size(record) - sum(v.nbytes for v in distinct.values())
