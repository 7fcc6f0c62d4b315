"""UpdateEncoder, the client's last stage: transform → codec with error-feedback memory in its state.

Every check decodes what the client sent with the server's decoder, so the identities hold for
what actually travels, not for the encoder's own view of it.
"""

from __future__ import annotations

import numpy as np
import pytest

from fedclient.encoding import MEMORY_PREFIX, UpdateEncoder
from strategies.codecs import (
    CodecSpec,
    IdentityCodec,
    build_codec,
    build_error_feedback,
    like_of,
)


def _delta(rng: np.random.Generator, scale: float = 1.0) -> dict[str, np.ndarray]:
    return {
        "fc.weight": (scale * rng.laplace(size=(16, 12))).astype(np.float32),
        "fc.bias": (scale * rng.laplace(size=12)).astype(np.float32),
        "conv.weight": (0.01 * scale * rng.laplace(size=(4, 3, 3))).astype(np.float32),
    }


def _encoder(spec: CodecSpec, transform=None) -> UpdateEncoder:
    codec = build_codec(spec)
    return UpdateEncoder(codec, build_error_feedback(spec, codec), transform)


def _decode(spec: CodecSpec, payload, header, like) -> dict[str, np.ndarray]:
    """What the server decodes, with its own codec object built from the same spec."""
    return build_codec(spec).decode(payload, header, like)


def _memory(state: dict) -> dict[str, np.ndarray]:
    return {k[len(MEMORY_PREFIX) :]: v for k, v in state.items() if k.startswith(MEMORY_PREFIX)}


def _norm(params: dict) -> float:
    return float(np.sqrt(sum(np.sum(np.square(v, dtype=np.float64)) for v in params.values())))


def test_lossless_codec_sends_the_delta_and_leaves_the_state_alone():
    delta = _delta(np.random.default_rng(0))
    spec = CodecSpec(name="none")
    encoder = _encoder(spec)
    assert encoder.error_feedback is None and isinstance(encoder.codec, IdentityCodec)
    state = {"dp/steps": np.array(3)}
    payload, header, new_state, metrics = encoder.encode(delta, state)
    decoded = _decode(spec, payload, header, like_of(delta))
    for k in delta:
        np.testing.assert_array_equal(decoded[k], delta[k])
    assert new_state.keys() == state.keys()
    assert metrics == {"payload_bytes": sum(v.nbytes for v in delta.values())}


@pytest.mark.parametrize(
    "spec",
    [
        CodecSpec(name="topk", topk_ratio=0.05),
        CodecSpec(name="sign"),
        CodecSpec(name="fp16"),
        CodecSpec(name="co3", co3_decay=1.0),
        CodecSpec(name="co3", co3_exponent_bits=2, co3_mantissa_bits=0, co3_decay=1.0),
    ],
    ids=lambda s: f"{s.name}-E{s.co3_exponent_bits}M{s.co3_mantissa_bits}",
)
def test_classic_error_feedback_telescopes_over_what_the_server_decodes(spec):
    """With λ = 1: Σ_t decoded_t + e_{T+1} = Σ_t delta_t, and other state keys survive."""
    rng = np.random.default_rng(1)
    encoder = _encoder(spec)
    state = {"dp/steps": np.array(11)}
    sent_sum = delta_sum = None
    for _ in range(12):
        delta = _delta(rng, scale=rng.uniform(0.1, 10))
        payload, header, state, metrics = encoder.encode(delta, state)
        decoded = _decode(spec, payload, header, like_of(delta))
        sent_sum = decoded if sent_sum is None else {k: sent_sum[k] + decoded[k] for k in delta}
        delta_sum = delta if delta_sum is None else {k: delta_sum[k] + delta[k] for k in delta}
    assert sorted(state) == sorted(["dp/steps"] + [MEMORY_PREFIX + k for k in delta])
    np.testing.assert_array_equal(state["dp/steps"], 11)
    memory = _memory(state)
    assert metrics["ef_norm"] == pytest.approx(_norm(memory), rel=1e-12)
    assert metrics["ef_norm"] > 0
    for k in delta:
        np.testing.assert_allclose(
            sent_sum[k] + memory[k], delta_sum[k], rtol=1e-5, atol=1e-4 * np.abs(delta_sum[k]).max()
        )


def test_co3_memory_decays_by_co3_decay_and_the_others_by_ef_decay():
    """e' = (delta + λ·e) − decoded, with λ = co3_decay for CO3 and ef_decay otherwise."""
    for spec, decay in [
        (CodecSpec(name="co3", co3_decay=0.5, ef_decay=1.0), 0.5),
        (CodecSpec(name="topk", topk_ratio=0.1, co3_decay=0.5, ef_decay=0.75), 0.75),
    ]:
        rng = np.random.default_rng(2)
        encoder = _encoder(spec)
        state: dict = {}
        expected = {k: np.zeros_like(v) for k, v in _delta(rng).items()}
        for _ in range(5):
            delta = _delta(rng)
            payload, header, state, _ = encoder.encode(delta, state)
            decoded = _decode(spec, payload, header, like_of(delta))
            expected = {
                k: (delta[k] + np.float32(decay) * expected[k]) - decoded[k] for k in delta
            }
            for k in delta:
                np.testing.assert_allclose(_memory(state)[k], expected[k], rtol=1e-6, atol=1e-7)


def test_error_feedback_off_sends_plain_compression_and_keeps_no_memory():
    spec = CodecSpec(name="topk", topk_ratio=0.1, error_feedback=False)
    encoder = _encoder(spec)
    assert encoder.error_feedback is None
    rng = np.random.default_rng(3)
    state: dict = {}
    for _ in range(3):
        delta = _delta(rng)
        payload, _, state, metrics = encoder.encode(delta, state)
        plain_payload, _, _ = encoder.codec.encode(delta, {})
        for key in plain_payload:
            np.testing.assert_array_equal(payload[key], plain_payload[key])
    assert state == {} and "ef_norm" not in metrics


def test_transform_bounds_what_is_encoded_and_memory_keeps_the_rest():
    """Client-side clipping bounds the memory-corrected vector that is encoded.

    So every decoded update stays within C up to the codec's rounding, and error feedback
    still telescopes to the *raw* deltas: what clipping cut off waits in the memory.
    """
    bound = 1.0

    def clip(delta):
        norm = _norm(delta)
        factor = min(1.0, bound / norm)
        return {k: (v * np.float32(factor)) for k, v in delta.items()}, {"pre_clip_norm": norm}

    spec = CodecSpec(name="sign")
    encoder = _encoder(spec, transform=clip)
    rng = np.random.default_rng(4)
    state: dict = {}
    sent_sum = raw_sum = None
    for _ in range(6):
        delta = _delta(rng, scale=5.0)
        memory_before = _memory(state)
        payload, header, state, metrics = encoder.encode(delta, state)
        corrected = {k: delta[k] + memory_before.get(k, 0) for k in delta}
        assert metrics["pre_clip_norm"] == pytest.approx(_norm(corrected), rel=1e-5)
        decoded = _decode(spec, payload, header, like_of(delta))
        assert _norm(decoded) <= bound * 1.02  # sign rounding only, memory does not leak in
        sent_sum = decoded if sent_sum is None else {k: sent_sum[k] + decoded[k] for k in delta}
        raw_sum = delta if raw_sum is None else {k: raw_sum[k] + delta[k] for k in delta}
    memory = _memory(state)
    for k in raw_sum:
        np.testing.assert_allclose(sent_sum[k] + memory[k], raw_sum[k], rtol=1e-4, atol=1e-4)


def test_memory_that_does_not_match_the_update_is_refused():
    encoder = _encoder(CodecSpec(name="topk"))
    delta = _delta(np.random.default_rng(5))
    with pytest.raises(ValueError, match="shape"):
        encoder.encode(delta, {MEMORY_PREFIX + k: np.zeros(3, np.float32) for k in delta})
    with pytest.raises(ValueError, match="memory covers"):
        encoder.encode(delta, {MEMORY_PREFIX + "other": np.zeros(3, np.float32)})


def test_a_per_round_transform_replaces_the_encoders_own():
    """The round's transform (e.g. clipping to the server's current C) wins over the default."""

    def scale_by(factor: float):
        def transform(delta):
            return {k: v * np.float32(factor) for k, v in delta.items()}, {"factor": factor}

        return transform

    spec = CodecSpec(name="none")
    encoder = _encoder(spec, transform=scale_by(2.0))
    delta = _delta(np.random.default_rng(6))
    for transform, factor in [(None, 2.0), (scale_by(0.5), 0.5)]:
        payload, header, _, metrics = encoder.encode(delta, {}, transform)
        decoded = _decode(spec, payload, header, like_of(delta))
        assert metrics["factor"] == factor
        for k in delta:
            np.testing.assert_array_equal(decoded[k], delta[k] * np.float32(factor))
