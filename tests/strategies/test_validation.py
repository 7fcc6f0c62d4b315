"""Server-side validation of client replies: every bad update is refused, the good ones still count.

Two levels: :func:`strategies.updates.decode_reply` on hand-made replies (each check and its
boundary), and whole rounds of the real ClientApp where some replies are tampered with on
the way to the server (NaN, Inf, wrong shape, oversized, huge norm, forged codec header).
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from flwr.app import ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict

from fedclient.client_app import app as client_app
from fedclient.components import data_spec, federated_data, new_model
from fedclient.training import get_params
from fedserver.config import parse_run_config
from fedserver.server_app import run_pollen
from strategies import wire
from strategies.codecs import CodecSpec, build_codec
from strategies.factory import build_strategy
from strategies.strategy import to_arrayrecord
from strategies.sync_driver import run_sync
from strategies.updates import UpdateLimits, UpdateRejected, decode_reply, params_norm
from tests.support.inprocess_grid import InProcessGrid

SENT = {"w": np.zeros((3, 4), np.float32), "b": np.zeros(4, np.float32)}
NUM_PARAMS = 16


def _reply(content: RecordDict | Error) -> Message:
    """``content`` as a reply from node 1001 to a train message, routed by a grid."""
    grid = InProcessGrid(lambda msg, ctx: Message(content, reply_to=msg), 1)
    sent = Message(RecordDict(), dst_node_id=1001, message_type=MessageType.TRAIN)
    return next(iter(grid.send_and_receive([sent])))


def _pollen_reply(payload: dict, header: dict | None = None, num_examples=10) -> Message:
    metrics = {} if num_examples is None else {wire.NUM_EXAMPLES: num_examples}
    return _reply(
        RecordDict(
            {
                wire.UPDATE: to_arrayrecord(payload),
                wire.CODEC: ConfigRecord(header or {}),
                wire.METRICS: MetricRecord(metrics),
            }
        )
    )


def _delta(scale: float = 0.1, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (scale * rng.standard_normal(v.shape)).astype(np.float32) for k, v in SENT.items()}


# --- decode_reply, one check at a time ----------------------------------------------------


def test_a_valid_float32_update_is_accepted_exactly():
    delta = _delta()
    update = decode_reply(_pollen_reply(delta, num_examples=7), SENT, limits=UpdateLimits(100.0))
    assert update.node_id == 1001 and update.num_examples == 7
    for k in SENT:
        np.testing.assert_array_equal(update.delta[k], delta[k])
    assert update.payload_bytes >= 4 * NUM_PARAMS


@pytest.mark.parametrize(
    "tamper, reason",
    [
        (lambda d: d["w"].__setitem__((0, 0), np.nan), "non-finite values in 'w'"),
        (lambda d: d["b"].__setitem__(2, np.inf), "non-finite values in 'b'"),
        (lambda d: d["b"].__setitem__(0, -np.inf), "non-finite values in 'b'"),
        (lambda d: d.__setitem__("w", np.zeros((4, 3), np.float32)), "has shape (4, 3), expected (3, 4)"),
        (lambda d: d.__setitem__("w", np.zeros(12, np.float32)), "has shape (12,), expected (3, 4)"),
        (lambda d: d.pop("b"), "missing ['b']"),
        (lambda d: d.__setitem__("extra", np.zeros(2, np.float32)), "unexpected ['extra']"),
        (lambda d: d.__setitem__("w", np.zeros((3, 4), np.int32)), "non-float dtype int32"),
    ],
    ids=["nan", "inf", "-inf", "transposed", "flattened", "missing-key", "extra-key", "int-dtype"],
)
def test_malformed_plain_updates_are_rejected_with_their_reason(tamper, reason):
    delta = _delta()
    tamper(delta)
    with pytest.raises(UpdateRejected, match="node 1001") as err:
        decode_reply(_pollen_reply(delta), SENT)
    assert reason in str(err.value)


def test_norm_limit_is_a_strict_upper_bound():
    delta = _delta(scale=3.0)
    norm = float(np.sqrt(sum(np.sum(v.astype(np.float64) ** 2) for v in delta.values())))
    assert params_norm(delta) == pytest.approx(norm, rel=1e-12)
    decode_reply(_pollen_reply(delta), SENT, limits=UpdateLimits(max_update_norm=norm * (1 + 1e-9)))
    with pytest.raises(UpdateRejected, match="exceeds max-update-norm"):
        decode_reply(_pollen_reply(delta), SENT, limits=UpdateLimits(max_update_norm=norm * (1 - 1e-6)))
    # 0 disables the bound: a model-replacement-sized update passes shape/finiteness checks
    huge = {k: v * 1e6 for k, v in delta.items()}
    decode_reply(_pollen_reply(huge), SENT, limits=UpdateLimits(max_update_norm=0.0))


def test_default_payload_limit_admits_float32_and_refuses_oversized_before_decoding():
    sent = {"w": np.zeros((64, 64), np.float32)}  # 4096 params: default limit 16 * 4096 + 64 kB
    ok = {"w": np.ones((64, 64), np.float32)}
    decode_reply(_pollen_reply(ok), sent, limits=UpdateLimits())
    # 8x the float32 model; its header is garbage too, but size is checked first
    oversized = {"w": np.ones((64, 64), np.float32), "pad": np.ones(7 * 4096, np.float32)}
    codec = build_codec(CodecSpec(name="none"))
    with pytest.raises(UpdateRejected, match="exceeds the limit of 131072 bytes"):
        decode_reply(_pollen_reply(oversized, {"codec": "bogus"}), sent, codec, UpdateLimits())
    with pytest.raises(UpdateRejected, match="exceeds the limit of 1000 bytes"):
        decode_reply(_pollen_reply(ok), sent, limits=UpdateLimits(max_payload_bytes=1000))


@pytest.mark.parametrize("num_examples", [None, 0, -3, float("nan"), float("inf"), [10]])
def test_missing_or_invalid_num_examples_is_rejected(num_examples):
    with pytest.raises(UpdateRejected, match="invalid 'num-examples'"):
        decode_reply(_pollen_reply(_delta(), num_examples=num_examples), SENT)


def test_error_replies_and_unknown_layouts_are_rejected():
    with pytest.raises(UpdateRejected, match="replied with an error: boom"):
        decode_reply(_reply(Error(code=0, reason="boom")), SENT)
    two = RecordDict(
        {
            "a": to_arrayrecord(SENT),
            "b": to_arrayrecord(SENT),
            wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: 1}),
        }
    )
    with pytest.raises(UpdateRejected, match="exactly one ArrayRecord"):
        decode_reply(_reply(two), SENT)
    no_metrics = RecordDict({wire.UPDATE: to_arrayrecord(_delta())})
    with pytest.raises(UpdateRejected, match="no MetricRecord"):
        decode_reply(_reply(no_metrics), SENT)


def test_stock_client_full_model_becomes_a_delta_and_is_validated_the_same_way():
    start = {k: v + 1.0 for k, v in SENT.items()}
    model = {k: v + 0.25 for k, v in start.items()}
    reply = _reply(RecordDict({"arrays": to_arrayrecord(model), "m": MetricRecord({"num-examples": 4})}))
    update = decode_reply(reply, start)
    for k in start:
        np.testing.assert_allclose(update.delta[k], 0.25, rtol=0, atol=1e-7)
    model["w"][1, 1] = np.nan
    with pytest.raises(UpdateRejected, match="non-finite"):
        decode_reply(_reply(RecordDict({"arrays": to_arrayrecord(model), "m": MetricRecord({"num-examples": 4})})), start)


def _encoded(name: str, **spec):
    codec = build_codec(CodecSpec(name=name, **spec))
    payload, header, _ = codec.encode(_delta(seed=3), {})
    return codec, payload, dict(header)


@pytest.mark.parametrize("name", ["none", "fp16", "topk", "sign", "co3"])
@pytest.mark.parametrize(
    "forge",
    [
        lambda h: h.__setitem__("num_params", h["num_params"] + 1),
        lambda h: h.__setitem__("codec", "other"),
        lambda h: h.pop("codec"),
        lambda h: h.__setitem__("unexpected", 1),
    ],
    ids=["num-params", "codec-name", "missing-field", "extra-field"],
)
def test_forged_codec_headers_are_rejected(name, forge):
    codec, payload, header = _encoded(name, topk_ratio=0.25)
    decode_reply(_pollen_reply(payload, header), SENT, codec)  # the genuine header decodes
    forge(header)
    with pytest.raises(UpdateRejected, match=f"malformed {name} payload"):
        decode_reply(_pollen_reply(payload, header), SENT, codec)


def test_topk_indices_outside_the_model_or_unsorted_are_rejected():
    codec, payload, header = _encoded("topk", topk_ratio=0.25)
    for indices in (payload["indices"][::-1].copy(), payload["indices"] + NUM_PARAMS):
        forged = {**payload, "indices": indices.astype(payload["indices"].dtype)}
        with pytest.raises(UpdateRejected, match="malformed topk payload: topk indices"):
            decode_reply(_pollen_reply(forged, header), SENT, codec)


def _mutate(payload: dict, header: dict, rng: np.random.Generator, mode: int) -> tuple[dict, dict]:
    """One random damage: flipped bytes, truncation, garbage, a forged header value, a recast."""
    payload = {k: np.array(v, copy=True) for k, v in payload.items()}
    header = dict(header)
    name = sorted(payload)[rng.integers(len(payload))]
    if mode == 0:
        flat = payload[name].view(np.uint8).reshape(-1)
        at = rng.integers(flat.size, size=rng.integers(1, 6))
        flat[at] = rng.integers(0, 256, size=at.size)
    elif mode == 1:
        payload[name] = payload[name].reshape(-1)[: rng.integers(0, payload[name].size + 1)]
    elif mode == 2:
        payload[name] = rng.integers(0, 256, size=rng.integers(0, 200)).astype(payload[name].dtype)
    elif mode == 3:
        key = sorted(header)[rng.integers(len(header))]
        value = header[key]
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        header[key] = type(value)(rng.integers(-5, 10**6)) if numeric else "x"
    else:
        payload[name] = payload[name].astype(rng.choice([np.float64, np.int64, np.uint8, np.float16]))
    return payload, header


@pytest.mark.parametrize("name", ["none", "fp16", "bf16", "topk", "sign", "co3"])
def test_damaged_payloads_are_rejected_or_decode_to_a_valid_update_never_raise(name):
    """No garbage a client sends can make the server raise anything but a rejection."""
    codec, payload, header = _encoded(name, topk_ratio=0.25)
    rng = np.random.default_rng(0)
    limits = UpdateLimits(max_update_norm=100.0)
    rejected = 0
    for i in range(100):
        damaged, forged = _mutate(payload, header, rng, i % 5)
        try:
            update = decode_reply(_pollen_reply(damaged, forged), SENT, codec, limits)
        except UpdateRejected:
            rejected += 1
            continue
        # damage that still decodes (a flipped low bit) yields a finite, well-shaped, bounded delta
        for k, v in update.delta.items():
            assert v.shape == SENT[k].shape and v.dtype == np.float32 and np.isfinite(v).all()
        assert params_norm(update.delta) <= 100.0
    assert rejected > 50


# --- whole rounds through the real ClientApp ----------------------------------------------

NUM_NODES = 8
GOOD = (0, 1)


def _tamper_payload(kind: str, payload: dict, header: dict) -> tuple[dict, dict]:
    name = min(payload)
    value = np.array(payload[name], copy=True)
    if kind == "nan":
        value.flat[0] = np.nan
    elif kind == "inf":
        value.flat[-1] = np.inf
    elif kind == "shape":
        value = value.reshape(-1)[:-1]
    elif kind == "oversized":
        payload = {**payload, "padding": np.zeros(20 * value.size + 100_000, np.float32)}
    elif kind == "huge-norm":
        value = value * np.float32(1e7)
    elif kind == "header":
        header = {**header, "num_params": int(header["num_params"]) * 2}
    return {**payload, name: value}, header


KINDS = {2: "nan", 3: "inf", 4: "shape", 5: "oversized", 6: "huge-norm", 7: "header"}


class TamperingApp:
    """The real ClientApp; on the way back, node ``i``'s reply is damaged as ``KINDS[i]``.

    Good replies are kept, so the test can compute the expected aggregate independently.
    """

    def __init__(self, index: int) -> None:
        self.index = index
        self.good: list[tuple[dict, int]] = []

    def __call__(self, msg: Message, context) -> Message:
        reply = client_app(msg, context)
        content = reply.content
        payload = {k: v.numpy() for k, v in content[wire.UPDATE].items()}
        header = dict(content[wire.CODEC])
        metrics = content[wire.METRICS]
        if self.index in GOOD:
            self.good.append((payload, int(metrics[wire.NUM_EXAMPLES])))
        else:
            payload, header = _tamper_payload(KINDS[self.index], payload, header)
        return Message(
            RecordDict(
                {wire.UPDATE: to_arrayrecord(payload), wire.CODEC: ConfigRecord(header), wire.METRICS: metrics}
            ),
            reply_to=msg,
        )


def _raw(**overrides) -> dict:
    return {
        "device": "cpu", "model": "logreg", "clients-per-round": NUM_NODES, "local-epochs": 1,
        "num-server-rounds": 2, **overrides,
    }


def test_one_round_aggregates_exactly_the_good_updates():
    raw = _raw()
    cfg = parse_run_config(raw)
    apps = [TamperingApp(i) for i in range(NUM_NODES)]
    grid = InProcessGrid(apps, NUM_NODES, run_config=raw)
    data = federated_data(data_spec(cfg), NUM_NODES)
    start = get_params(new_model(cfg, data.input_shape, data.num_classes))
    strategy = build_strategy(cfg)
    final = run_sync(grid, strategy, start, num_rounds=1)

    stats = strategy.last_round
    assert (stats.sampled, stats.clients, stats.rejected, stats.failed) == (NUM_NODES, 2, 6, 0)
    assert stats.applied
    reasons = " | ".join(stats.rejections)
    for fragment in ("non-finite", "expected float32", "exceeds the limit", "exceeds max-update-norm",
                     "header 'num_params'"):
        assert fragment in reasons, reasons
    good = [entry for i in GOOD for entry in apps[i].good]
    total = sum(n for _, n in good)
    for k in start:
        expected = start[k].astype(np.float64) + sum(n * p[k].astype(np.float64) for p, n in good) / total
        np.testing.assert_allclose(final[k], expected, rtol=1e-6, atol=1e-7)


def test_rejections_are_logged_and_counted_in_metrics_jsonl(tmp_path, caplog):
    raw = _raw(**{"output-dir": str(tmp_path), "run-name": "bad"})
    grid = InProcessGrid([TamperingApp(i) for i in range(NUM_NODES)], NUM_NODES, run_config=raw)
    with caplog.at_level(logging.WARNING, logger="pollen"):
        run = run_pollen(grid, parse_run_config(raw))
    rows = [json.loads(line) for line in run.metrics_path.read_text().splitlines()]
    assert [(r["round"], r["clients"], r["rejected"], r["failed"]) for r in rows] == [(1, 2, 6, 0), (2, 2, 6, 0)]
    assert rows[1]["accuracy"] > 0.5  # the model learned from the two good clients
    warnings = [r.getMessage() for r in caplog.records if "rejected update" in r.getMessage()]
    assert len(warnings) == 12
    assert sum("non-finite" in w for w in warnings) == 4  # NaN and Inf nodes, both rounds
