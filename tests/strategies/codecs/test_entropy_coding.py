"""The lossless stage: bit-exact round trips, rate close to the entropy, rejection of corrupt streams."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from strategies.codecs import CodecError
from strategies.codecs.entropy import (
    MODEL_PRECISION_BITS,
    decode_symbols,
    encode_symbols,
    model_weights,
)

PEAKED = np.array([0.001, 0.004, 0.02, 0.06, 0.15, 0.53, 0.15, 0.06, 0.02, 0.004, 0.001])


def _round_trip(segments):
    data = encode_symbols(segments)
    assert data.dtype == np.uint8 and data.size % 4 == 0
    decoded = decode_symbols(data, [(len(symbols), pmf) for symbols, pmf in segments])
    for (symbols, _), got in zip(segments, decoded, strict=True):
        np.testing.assert_array_equal(got, symbols)
        assert got.dtype == np.int32
    return data


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    sizes=st.lists(st.integers(0, 3000), min_size=0, max_size=4),
    alphabet=st.integers(2, 300),
)
def test_random_segments_round_trip(seed, sizes, alphabet):
    rng = np.random.default_rng(seed)
    segments = []
    for size in sizes:
        pmf = rng.dirichlet(np.full(alphabet, 0.3))
        segments.append((rng.integers(0, alphabet, size).astype(np.int32), pmf))
    _round_trip(segments)


def test_all_mass_in_the_rarest_symbol_still_round_trips():
    pmf = PEAKED.copy()
    pmf[0] = 0.0  # the model says "never": the floor keeps it codable
    symbols = np.zeros(5000, np.int32)
    data = _round_trip([(symbols, pmf)])
    # Cost is bounded by the floor: about MODEL_PRECISION_BITS bits per symbol.
    assert data.size * 8 <= symbols.size * (MODEL_PRECISION_BITS + 1)


def test_empty_all_zero_and_single_symbol_alphabets():
    assert _round_trip([]).size == 4  # just the start state
    assert _round_trip([(np.zeros(0, np.int32), PEAKED)]).size == 4
    _round_trip([(np.full(10_000, 5, np.int32), PEAKED)])  # all at the zero symbol
    _round_trip([(np.zeros(7, np.int32), PEAKED)])  # symbol 0 is free on an empty ANS state


def test_large_alphabet_and_mixed_segments():
    rng = np.random.default_rng(1)
    big = rng.dirichlet(np.ones(7935))
    _round_trip([
        (rng.integers(0, 7935, 2000).astype(np.int32), big),
        (np.zeros(0, np.int32), PEAKED),
        (rng.choice(11, 3000, p=PEAKED).astype(np.int32), PEAKED),
    ])


def test_rate_is_within_one_percent_of_the_cross_entropy():
    rng = np.random.default_rng(2)
    n = 200_000
    symbols = rng.choice(11, n, p=PEAKED).astype(np.int32)
    data = encode_symbols([(symbols, PEAKED)])
    counts = np.bincount(symbols, minlength=11)
    cross_entropy_bits = -np.sum(counts * np.log2(PEAKED))
    assert data.size * 8 <= 1.01 * cross_entropy_bits + 64


def test_model_weights_floor_and_validation():
    weights = model_weights(np.array([0.0, 3.0, 1.0, 0.0]))
    quarter = 2.0 ** (MODEL_PRECISION_BITS - 2)
    np.testing.assert_array_equal(weights, [1.0, 3 * quarter + 1, quarter + 1, 1.0])
    for bad in (np.array([]), np.array([1.0]), np.array([0.0, 0.0]), np.array([0.5, -0.1]), np.array([np.nan, 1.0])):
        with pytest.raises(ValueError):
            model_weights(bad)


def test_encode_rejects_symbols_outside_the_alphabet():
    with pytest.raises(ValueError, match="symbols must lie"):
        encode_symbols([(np.array([0, 11], np.int32), PEAKED)])
    with pytest.raises(ValueError, match="symbols must lie"):
        encode_symbols([(np.array([-1], np.int32), PEAKED)])


def _stream():
    rng = np.random.default_rng(3)
    segments = [(rng.choice(11, 4000, p=PEAKED).astype(np.int32), PEAKED) for _ in range(2)]
    return encode_symbols(segments), [(4000, PEAKED), (4000, PEAKED)]


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda d: d[:-4],  # last word dropped
        lambda d: d[4:],  # first word dropped
        lambda d: d[: d.size // 2],  # cut in half
        lambda d: np.concatenate([d, np.array([7, 0, 0, 0], np.uint8)]),  # a word appended
        lambda d: np.concatenate([np.array([7, 0, 0, 0], np.uint8), d]),  # a word prepended
        lambda d: np.zeros(0, np.uint8),  # nothing at all
    ],
)
def test_decode_rejects_truncated_or_extended_streams(corrupt):
    data, segments = _stream()
    with pytest.raises(CodecError, match="coded symbols"):
        decode_symbols(corrupt(data), segments)


def test_decode_rejects_wrong_symbol_counts_and_malformed_bytes():
    data, segments = _stream()
    for counts in ((4000, 3999), (4000, 4001), (4000, 4000, 1), (4000,)):
        with pytest.raises(CodecError, match="start state"):
            decode_symbols(data, [(count, PEAKED) for count in counts])
    with pytest.raises(CodecError, match="start state"):
        decode_symbols(encode_symbols([(np.zeros(7, np.int32), PEAKED)]), [(8, PEAKED)])
    with pytest.raises(CodecError, match="32-bit words"):
        decode_symbols(data[:-1], segments)
    with pytest.raises(CodecError, match="uint8"):
        decode_symbols(data.view(np.uint32), segments)
    with pytest.raises(CodecError, match=">= 0"):
        decode_symbols(data, [(-1, PEAKED)])
