"""Turning one client reply into a validated dense update, or a reason to reject it.

This is the server's first step for every reply, before privacy or aggregation see it:
decode (Pollen codec payload, or a stock Flower client's full model) into a dense float32
delta relative to the point the client was sent, then check what a faulty or malicious
client could get wrong. A rejected reply is logged and counted; the round goes on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from flwr.app import Message

from strategies import wire

Params = dict[str, np.ndarray]


class UpdateRejected(ValueError):
    """A client reply that must not be aggregated; the message says why."""


@dataclass
class ClientUpdate:
    """A decoded, validated client update."""

    node_id: int
    delta: Params
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)
    bytes_up: int = 0  # the whole reply content, serialized
    payload_bytes: int = 0  # the encoded update alone (update arrays + codec header), serialized


@dataclass(frozen=True)
class UpdateLimits:
    """Bounds a reply must respect to be aggregated (0 disables a bound).

    ``max_update_norm`` catches exploding or malicious updates (a scaled model-replacement
    attack needs a large norm); ``max_payload_bytes`` refuses oversized replies before any
    decoding work is spent on them.
    """

    max_update_norm: float = 0.0
    max_payload_bytes: int = 0  # 0: four times the model's float32 size, plus 64 kB

    def payload_limit(self, num_params: int) -> int:
        return self.max_payload_bytes or 16 * num_params + 65_536


def params_norm(params: Params) -> float:
    """Global L2 norm over all arrays (float64 accumulation)."""
    return float(np.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in params.values())))


def decode_reply(
    reply: Message, sent: Params, codec=None, limits: UpdateLimits | None = None
) -> ClientUpdate:
    """Decode and validate one train reply.

    Parameters
    ----------
    reply : Message
        The client's reply. Pollen clients send ``update`` + ``codec``; stock Flower
        clients send their full model as the only ArrayRecord.
    sent : Params
        The exact point this client was sent; the reference for deltas and shapes.
    codec : Codec, optional
        Decoder for Pollen payloads (``None``: plain float32 deltas).
    limits : UpdateLimits, optional
        Payload-size and update-norm bounds.

    Raises
    ------
    UpdateRejected
        On an error reply, missing records, wrong keys/shapes/dtypes, non-finite values,
        a malformed codec payload, a missing/invalid ``num-examples``, an oversized payload
        or an update norm above the limit.
    """
    node = reply.metadata.src_node_id
    if reply.has_error():
        raise UpdateRejected(f"node {node} replied with an error: {reply.error.reason}")
    content = reply.content
    metrics_records = content.metric_records
    if not metrics_records:
        raise UpdateRejected(f"node {node}: reply has no MetricRecord")
    metrics = dict(
        metrics_records[wire.METRICS] if wire.METRICS in metrics_records
        else next(iter(metrics_records.values()))
    )
    num_examples = metrics.get(wire.NUM_EXAMPLES)
    if not isinstance(num_examples, (int, float)) or not np.isfinite(num_examples) or num_examples <= 0:
        raise UpdateRejected(f"node {node}: invalid '{wire.NUM_EXAMPLES}' {num_examples!r}")

    arrays = content.array_records
    if wire.UPDATE in arrays:
        record = arrays[wire.UPDATE]
        payload_bytes = wire.serialized_size(record)
        if wire.CODEC in content.config_records:
            payload_bytes += wire.serialized_size(content.config_records[wire.CODEC])
    elif len(arrays) == 1:
        record = next(iter(arrays.values()))
        payload_bytes = wire.serialized_size(record)
    else:
        raise UpdateRejected(
            f"node {node}: reply must hold an '{wire.UPDATE}' ArrayRecord or exactly one "
            f"ArrayRecord with the full model, got {sorted(arrays)}"
        )
    source = f"node {node}"
    # Size is checked before any decoding work is spent on the payload.
    check_payload_size(source, payload_bytes, sent, limits)
    if wire.UPDATE in arrays:
        payload = {k: v.numpy() for k, v in record.items()}
        header = dict(content.config_records.get(wire.CODEC, {}))
        delta = decode_payload(source, payload, header, sent, codec)
    else:  # a stock Flower client: its full model, made a delta against what it was sent
        model = {k: v.numpy() for k, v in record.items()}
        _check_shapes(source, model, sent)
        delta = {k: (model[k].astype(np.float32) - sent[k]) for k in sent}
    delta, _ = validate_delta(source, delta, sent, limits)
    clean_metrics = {
        k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and k != wire.NUM_EXAMPLES
    }
    return ClientUpdate(
        node_id=node,
        delta=delta,
        num_examples=int(num_examples),
        metrics=clean_metrics,
        bytes_up=wire.content_size(content),
        payload_bytes=payload_bytes,
    )


def check_payload_size(
    source: str, payload_bytes: int, sent: Params, limits: UpdateLimits | None
) -> None:
    """Reject a payload above the size limit (before any decoding work is spent on it)."""
    if limits is None:
        return
    limit = limits.payload_limit(sum(v.size for v in sent.values()))
    if payload_bytes > limit:
        raise UpdateRejected(
            f"{source}: payload of {payload_bytes} bytes exceeds the limit of {limit} bytes"
        )


def decode_payload(
    source: str, payload: Params, header: dict, sent: Params, codec=None, *, own: bool = False
) -> Params:
    """Decode a Pollen codec payload into a dense delta shaped like ``sent``.

    ``own``: the payload comes from this process's own encoder, not over a wire
    (:meth:`~strategies.codecs.base.Codec.decode_own`; a packed worker's clients).

    ``source`` names the sender in rejection messages (``"node 7"``, ``"client 42"``).
    """
    if codec is None:
        return payload
    like = {k: (v.shape, v.dtype) for k, v in sent.items()}
    try:
        return codec.decode_own(payload, header, like) if own else codec.decode(payload, header, like)
    except ValueError as err:
        raise UpdateRejected(f"{source}: malformed {codec.name} payload: {err}") from None


def validate_delta(
    source: str, delta: Params, sent: Params, limits: UpdateLimits | None = None
) -> tuple[Params, float]:
    """Check a decoded dense delta and return it as float32 with its L2 norm.

    The one validation every update passes, whoever decoded it: the server for a reply,
    or a packed worker for each of its virtual clients, so both layouts accept and reject
    exactly the same updates.

    Raises
    ------
    UpdateRejected
        Wrong keys, shapes or dtypes, non-finite values, or a norm above
        ``limits.max_update_norm``.
    """
    _check_shapes(source, delta, sent)
    delta = {k: np.asarray(v, dtype=np.float32) for k, v in delta.items()}
    # The float64 sum of squares is finite exactly when every value is (no float32 square
    # overflows float64), so one pass both checks the values and gives the norm.
    norm = params_norm(delta)
    if not np.isfinite(norm):
        bad = next(k for k, v in delta.items() if not np.all(np.isfinite(v)))
        raise UpdateRejected(f"{source}: non-finite values in '{bad}'")
    if limits is not None and limits.max_update_norm and norm > limits.max_update_norm:
        raise UpdateRejected(
            f"{source}: update norm {norm:.4g} exceeds max-update-norm {limits.max_update_norm:g}"
        )
    return delta, norm


def _check_shapes(source: str, got: Params, sent: Params) -> None:
    if got.keys() != sent.keys():
        missing, extra = sorted(sent.keys() - got.keys()), sorted(got.keys() - sent.keys())
        raise UpdateRejected(f"{source}: wrong arrays (missing {missing}, unexpected {extra})")
    for k, ref in sent.items():
        if got[k].shape != ref.shape:
            raise UpdateRejected(
                f"{source}: '{k}' has shape {got[k].shape}, expected {ref.shape}"
            )
        if not np.issubdtype(got[k].dtype, np.floating):
            raise UpdateRejected(f"{source}: '{k}' has non-float dtype {got[k].dtype}")
