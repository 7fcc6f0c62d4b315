"""What crosses the wire between ServerApp and ClientApp: record names and real payload sizes.

Pollen's own ClientApp replies with the *encoded update* (``update`` ArrayRecord + ``codec``
ConfigRecord header) relative to the point it was sent; a stock Flower ClientApp replies with
its full model in ``arrays``. Both are accepted by the server (:mod:`strategies.updates`).

Sizes are measured, not estimated: :func:`serialized_size` adds up the bytes of every object
Flower's inflatable-object protocol would transmit (each ``deflate()`` output, children
included, identical chunks counted once as Flower deduplicates them by content id).
"""

from __future__ import annotations

from flwr.app import RecordDict

ARRAYS = "arrays"  # global model (server → client) or a stock client's full model (reply)
CONFIG = "config"  # per-round settings sent with the model
UPDATE = "update"  # Pollen client reply: encoded delta arrays
CODEC = "codec"  # Pollen client reply: codec header (ConfigRecord)
METRICS = "metrics"  # reply metrics; must hold "num-examples"
NUM_EXAMPLES = "num-examples"


def serialized_size(obj) -> int:
    """Bytes Flower sends for an inflatable object (Message, RecordDict, record, Array).

    Children with the same object id are sent once, so they are counted once.
    """
    seen: set[str] = set()

    def visit(node) -> int:
        total = len(node.deflate())
        for child_id, child in (node.children or {}).items():
            if child_id not in seen:
                seen.add(child_id)
                total += visit(child)
        return total

    return visit(obj)


def content_size(content: RecordDict) -> int:
    """Serialized size of a message's content (its payload)."""
    return serialized_size(content)
