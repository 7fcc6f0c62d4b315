"""Finding the federation's nodes and their stable client ids before the first round.

Flower gives simulated SuperNodes random node ids in every run (and they may still be
registering when the ServerApp starts). Pollen samples cohorts over the clients' own ids —
a simulated client's ``partition-id`` — so that the same seed trains the same clients in
every run, after a resume, and in both simulation layouts.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from strategies.exchange import send_and_receive

log = logging.getLogger("pollen")

QUERY_KEY = "pollen-query"
CLIENT_ID_QUERY = "client-id"
CLIENT_ID_KEY = "client-id"
#: Query flag: describe the node's data in the same reply (saves a second start-up message,
#: which on a real device means a second ClientApp process start).
DESCRIBE_DATA_KEY = "describe-data"


def wait_for_nodes(grid: Grid, *, settle_s: float = 0.5, timeout: float = 60.0) -> list[int]:
    """Connected node ids, once at least one is there and the count held still for ``settle_s``."""
    deadline = time.monotonic() + timeout
    nodes = sorted(grid.get_node_ids())
    stable_since = time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.2)
        current = sorted(grid.get_node_ids())
        if current != nodes:
            nodes, stable_since = current, time.monotonic()
        elif nodes and time.monotonic() - stable_since >= settle_s:
            break
    return nodes


def discover_client_ids(
    grid: Grid,
    node_ids: list[int],
    *,
    timeout: float = 120.0,
    ask: Mapping[str, bool | int | float | str] | None = None,
    on_reply: Callable[[Message], None] | None = None,
) -> dict[int, int]:
    """Ask every node for its client id; returns node id → client id.

    Nodes that do not answer (or answer without an id) are left out and keep being sampled
    by node id only if no node answered. Duplicate client ids (two devices configured with
    the same partition id) are an error, since they would make two clients one.

    ``ask`` adds entries to the query (e.g. ``{DESCRIBE_DATA_KEY: True}``) and ``on_reply``
    sees every reply, error replies included, so that one start-up message per node can
    carry several questions.
    """
    content = RecordDict({"config": ConfigRecord({QUERY_KEY: CLIENT_ID_QUERY, **(ask or {})})})
    messages = [Message(content, dst_node_id=n, message_type=MessageType.QUERY) for n in node_ids]
    mapping: dict[int, int] = {}
    for reply in send_and_receive(grid, messages, timeout=timeout):
        if on_reply is not None:
            on_reply(reply)
        if reply.has_error() or not reply.content.metric_records:
            continue
        metrics = next(iter(reply.content.metric_records.values()))
        if CLIENT_ID_KEY in metrics:
            mapping[reply.metadata.src_node_id] = int(metrics[CLIENT_ID_KEY])
    seen: dict[int, int] = {}
    for node, client in mapping.items():
        if client in seen:
            raise ValueError(
                f"nodes {seen[client]} and {node} both report client id {client}; give every "
                "node its own partition-id"
            )
        seen[client] = node
    if len(mapping) < len(node_ids):
        log.warning("%d of %d nodes did not report a client id", len(node_ids) - len(mapping), len(node_ids))
    return mapping
