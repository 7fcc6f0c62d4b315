"""Error feedback over codecs: telescoping identity, bounded memory, decay semantics, wiring from a spec."""

from __future__ import annotations

import numpy as np
import pytest

from strategies.codecs import (
    Co3Codec,
    CodecSpec,
    ErrorFeedback,
    SignCodec,
    TopKCodec,
    build_codec,
    build_error_feedback,
    like_of,
)

LOSSY = ["fp16", "bf16", "topk", "sign", "co3"]


def _gradients(steps: int, seed: int = 0, shapes=((6, 5), (17,))):
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        yield {f"t{i}": rng.laplace(size=shape).astype(np.float32) for i, shape in enumerate(shapes)}


def _norm(params) -> float:
    return float(np.sqrt(sum(np.sum(v.astype(np.float64) ** 2) for v in params.values())))


@pytest.mark.parametrize("name", LOSSY)
def test_telescoping_identity_with_classic_error_feedback(name):
    codec = build_codec(CodecSpec(name=name, topk_ratio=0.1))
    feedback = ErrorFeedback(codec, decay=1.0)
    memory, state = {}, {}
    sent_total = {k: np.zeros(s, np.float64) for k, s in (("t0", (6, 5)), ("t1", (17,)))}
    true_total = {k: np.zeros_like(v) for k, v in sent_total.items()}
    for g in _gradients(60):
        payload, header, memory, state = feedback.encode(g, memory, state)
        q = codec.decode(payload, header, like_of(g))
        for k in g:
            sent_total[k] += q[k]
            true_total[k] += g[k]
    # Σ q_t + e_{T+1} = Σ g_t: nothing is lost, only delayed (up to float32 rounding).
    for k, total in true_total.items():
        np.testing.assert_allclose(sent_total[k] + memory[k], total, atol=2e-4)


@pytest.mark.parametrize("name", LOSSY)
def test_zero_decay_is_plain_compression(name):
    codec = build_codec(CodecSpec(name=name, topk_ratio=0.1))
    feedback = ErrorFeedback(codec, decay=0.0)
    memory, state = {}, {}
    for g in _gradients(3, seed=1):
        payload, header, memory, state = feedback.encode(g, memory, state)
        plain_payload, plain_header, _ = codec.encode(g, {})
        assert header == plain_header
        for key in payload:
            np.testing.assert_array_equal(payload[key], plain_payload[key])
        decoded = codec.decode(payload, header, like_of(g))
        for k in g:
            np.testing.assert_array_equal(memory[k], g[k] - decoded[k])


def _run(codec, decay, steps, gradients):
    """Max memory norm, max input norm G and max per-step contraction q = ‖a−C(a)‖/‖a‖."""
    feedback = ErrorFeedback(codec, decay)
    memory, state = {}, {}
    max_memory = max_g = max_q = 0.0
    norms = []
    for g in gradients(steps):
        corrected_norm = _norm({k: g[k] + np.float32(decay) * memory[k] for k in g}) if memory else _norm(g)
        _, _, memory, state = feedback.encode(g, memory, state)
        max_q = max(max_q, _norm(memory) / corrected_norm)
        max_memory = max(max_memory, _norm(memory))
        max_g = max(max_g, _norm(g))
        norms.append(_norm(memory))
    return max_memory, max_g, max_q, np.array(norms)


def _unit_gradients(steps, seed=2, d=64):
    """Random directions plus a persistent bias, ‖g‖ ≤ 1: accumulation is the worst case."""
    rng = np.random.default_rng(seed)
    bias = rng.laplace(size=d)
    for _ in range(steps):
        g = bias + rng.laplace(size=d)
        yield {"w": (g / np.linalg.norm(g)).astype(np.float32)}


@pytest.mark.parametrize(
    "codec", [TopKCodec(0.05), SignCodec(), Co3Codec()], ids=lambda c: c.name
)
@pytest.mark.parametrize("decay", [0.5, 0.9])
def test_decayed_memory_is_bounded_by_the_contraction(codec, decay):
    max_memory, max_g, max_q, _ = _run(codec, decay, 400, _unit_gradients)
    # e' = a − C(a), ‖a‖ ≤ G + λ‖e‖  ⇒  ‖e‖ ≤ qG / (1 − qλ) ≤ G / (1 − λ) (rounding to the
    # nearest value of a grid holding 0, top-k and scaled sign all have q ≤ 1).
    assert max_q <= 1.0
    assert max_memory <= max_q * max_g / (1 - max_q * decay) * (1 + 1e-5)
    assert max_memory <= max_g / (1 - decay)


def _assert_plateau(norms: np.ndarray) -> None:
    """No growth: the last quarter's mean ‖e‖ is within 10% of the second quarter's."""
    quarter = norms.size // 4
    assert norms[-quarter:].mean() <= 1.1 * norms[quarter : 2 * quarter].mean()


def test_topk_memory_obeys_the_a_priori_bound_over_10000_steps():
    d, k = 64, 4  # TopKCodec(1/16) keeps 4 of 64 coordinates
    q = np.sqrt(1 - k / d)
    max_memory, max_g, max_q, norms = _run(TopKCodec(1 / 16), 1.0, 10_000, _unit_gradients)
    assert max_q <= q * (1 + 1e-6)
    assert max_memory <= q * max_g / (1 - q) * (1 + 1e-5)
    _assert_plateau(norms)


@pytest.mark.parametrize("codec", [SignCodec(), Co3Codec()], ids=lambda c: c.name)
def test_classic_memory_plateaus(codec):
    steps = 4000 if codec.name == "sign" else 1500
    max_memory, max_g, max_q, norms = _run(codec, 1.0, steps, _unit_gradients)
    assert max_q < 1.0
    assert max_memory <= max_q * max_g / (1 - max_q) * (1 + 1e-5)
    _assert_plateau(norms)


def test_memory_must_match_the_update():
    feedback = ErrorFeedback(TopKCodec(0.5), 1.0)
    g = {"w": np.ones(4, np.float32)}
    with pytest.raises(ValueError, match="covers"):
        feedback.encode(g, {"v": np.ones(4, np.float32)}, {})
    with pytest.raises(ValueError, match="shape"):
        feedback.encode(g, {"w": np.ones(5, np.float32)}, {})
    with pytest.raises(ValueError, match="decay"):
        ErrorFeedback(TopKCodec(0.5), 1.5)


def test_build_error_feedback_from_spec():
    assert build_error_feedback(CodecSpec(name="none"), build_codec(CodecSpec(name="none"))) is None
    spec = CodecSpec(name="topk", error_feedback=False)
    assert build_error_feedback(spec, build_codec(spec)) is None
    spec = CodecSpec(name="co3", co3_decay=0.7, ef_decay=0.3)
    assert build_error_feedback(spec, build_codec(spec)).decay == 0.7
    spec = CodecSpec(name="sign", co3_decay=0.7, ef_decay=0.3)
    feedback = build_error_feedback(spec, build_codec(spec))
    assert feedback.decay == pytest.approx(0.3) and feedback.codec.name == "sign"
