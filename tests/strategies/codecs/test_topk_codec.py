"""Top-k: exactly k coordinates, the largest, chosen globally; strict decoding."""

from __future__ import annotations

import numpy as np
import pytest

from strategies.codecs import CodecError, CodecSpec, TopKCodec, build_codec, like_of
from strategies.codecs.topk import topk_count


def _update(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    # Tensors on very different scales: a global top-k must favour the large one.
    return {
        "big": rng.standard_normal((30, 40)).astype(np.float32),
        "small": (1e-3 * rng.standard_normal(500)).astype(np.float32),
        "mid": (0.5 * rng.standard_normal((7, 11))).astype(np.float32),
    }


@pytest.mark.parametrize(
    ("ratio", "d", "k"),
    [(0.01, 100, 1), (0.07, 100, 7), (0.01, 1_000_000, 10_000), (0.001, 10, 1), (1.0, 5, 5),
     (0.3, 10, 3), (0.25, 9, 3), (0.5, 0, 0)],
)
def test_topk_count_is_ceil_of_the_decimal_ratio(ratio, d, k):
    assert topk_count(ratio, d) == k


@pytest.mark.parametrize("ratio", [0.001, 0.01, 0.2, 1.0])
def test_keeps_exactly_the_k_largest_magnitudes_globally(ratio):
    update = _update()
    codec = TopKCodec(ratio)
    payload, header, _ = codec.encode(update, {})
    decoded = codec.decode(payload, header, like_of(update))
    x = np.concatenate([update[n].ravel() for n in sorted(update)])
    y = np.concatenate([decoded[n].ravel() for n in sorted(update)])
    k = topk_count(ratio, x.size)
    assert header["k"] == k
    kept = np.flatnonzero(y)
    assert kept.size == k
    # Independent reference: a full sort of |x| (values are distinct with probability 1).
    np.testing.assert_array_equal(kept, np.sort(np.argsort(-np.abs(x), kind="stable")[:k]))
    np.testing.assert_array_equal(y[kept], x[kept])
    # δ-contraction with δ = k/d, the property error feedback relies on.
    assert np.sum((x - y) ** 2) <= (1 - k / x.size) * np.sum(x**2)
    assert payload["indices"].dtype == np.int32 and payload["values"].dtype == np.float32


def test_ratio_comes_from_the_spec():
    assert build_codec(CodecSpec(name="topk", topk_ratio=0.25)).ratio == 0.25


def _encoded():
    update = _update()
    codec = TopKCodec(0.05)
    payload, header, _ = codec.encode(update, {})
    return codec, payload, header, like_of(update)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda idx: idx.__setitem__(-1, 10**6), "lie in"),
        (lambda idx: idx.__setitem__(0, -1), "lie in"),
        (lambda idx: idx.__setitem__(1, idx[0]), "strictly increasing"),
        (lambda idx: idx.__setitem__(slice(None), idx[::-1].copy()), "lie in|strictly increasing"),
    ],
)
def test_decode_rejects_bad_indices(mutate, message):
    codec, payload, header, like = _encoded()
    indices = payload["indices"].copy()
    mutate(indices)
    with pytest.raises(CodecError, match=message):
        codec.decode({**payload, "indices": indices}, header, like)


def test_decode_rejects_a_different_k_than_the_configured_ratio():
    codec, payload, header, like = _encoded()
    with pytest.raises(CodecError, match="'k'"):
        codec.decode(payload, {**header, "k": header["k"] + 1}, like)
    with pytest.raises(CodecError, match="'k'"):
        TopKCodec(0.1).decode(payload, header, like)
