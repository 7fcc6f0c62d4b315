"""Lossless coding of symbol streams with known categorical models (CO3's "compress" step).

Symbols are coded with asymmetric numeral systems (ANS) from the ``constriction`` package
(Rust), one model per segment (a tensor), all segments in one stream. The models are not
sent: encoder and decoder both derive them from a few header numbers, so they must produce
the *same* integer model. :func:`model_weights` therefore quantizes a float pmf to integer
weights (resolution 2^-20) before ``constriction`` sees it; with identical inputs the
result is identical, and across platforms it only differs if a mass lands within one ulp of
a multiple of 2^-20.

Every symbol of the alphabet gets weight ≥ 1, i.e. probability ≥ ~2^-20: any symbol stays
codable (costing at most ~20 bits) even when the model gives it no mass.

Integrity: the coder starts from a fixed non-zero 32-bit state (:data:`START_STATE`, the
stream's last word), and the decoder requires to be back at exactly that state after the last
symbol. A truncated, extended or altered stream, or one coding a different number of symbols,
almost surely fails that check (or constriction's own), and decoding raises
:class:`~strategies.codecs.base.CodecError`. Starting from the empty state instead would let
a stream that is short by a few leading symbols decode silently: ANS can decode from, and
encode the first symbol of the alphabet into, an empty state without changing it.
"""

from __future__ import annotations

from collections.abc import Sequence

import constriction
import numpy as np

from strategies.codecs.base import CodecError

MODEL_PRECISION_BITS = 20
"""Resolution of the integer models: weights are multiples of 2^-20 of the total mass."""

START_STATE = np.array([0x600DC0DE], dtype=np.uint32)
"""The coder's state before the first symbol; every stream ends with this word."""


def model_weights(pmf: np.ndarray) -> np.ndarray:
    """Integer weights (as float64) ``floor(p·2^20) + 1`` of a non-negative pmf.

    Raises
    ------
    ValueError
        If ``pmf`` has fewer than 2 entries, is not 1-D, negative, non-finite or sums to 0.
    """
    pmf = np.asarray(pmf, dtype=np.float64)
    if pmf.ndim != 1 or pmf.size < 2:
        raise ValueError(f"pmf must be a 1-D array of at least 2 symbols, got shape {pmf.shape}")
    total = pmf.sum()
    if not np.isfinite(pmf).all() or (pmf < 0).any() or total <= 0:
        raise ValueError("pmf must be finite, non-negative and not all zero")
    return np.floor(pmf / total * 2.0**MODEL_PRECISION_BITS) + 1.0


def _model(pmf: np.ndarray):
    return constriction.stream.model.Categorical(model_weights(pmf), perfect=False)


def encode_symbols(segments: Sequence[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Code segments ``(symbols, pmf)`` into one byte string (uint8, little-endian words).

    ``symbols`` are integers in ``[0, len(pmf))``; each segment is coded with its own model.

    Raises
    ------
    ValueError
        If a symbol lies outside its segment's alphabet, or a pmf is invalid.
    """
    coder = constriction.stream.stack.AnsCoder(START_STATE.copy())
    # ANS is a stack: push the segments last-to-first so that they decode first-to-last.
    for symbols, pmf in reversed(segments):
        symbols = np.ascontiguousarray(symbols, dtype=np.int32).ravel()
        if symbols.size == 0:
            continue
        if symbols.min() < 0 or symbols.max() >= len(pmf):
            raise ValueError(f"symbols must lie in [0, {len(pmf)}), got [{symbols.min()}, {symbols.max()}]")
        coder.encode_reverse(symbols, _model(pmf))
    return coder.get_compressed().astype("<u4").view(np.uint8)


def decode_symbols(data: np.ndarray, segments: Sequence[tuple[int, np.ndarray]]) -> list[np.ndarray]:
    """Decode what :func:`encode_symbols` wrote, given each segment's ``(count, pmf)``.

    Returns
    -------
    list of numpy.ndarray
        One int32 array of ``count`` symbols per segment.

    Raises
    ------
    CodecError
        If ``data`` is not a uint8 byte string of whole 32-bit words, or is not exactly the
        coding of that many symbols under these models.
    """
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim != 1:
        raise CodecError(f"coded symbols must be a 1-D uint8 array, got {data.dtype}{list(data.shape)}")
    if data.size % 4:
        raise CodecError(f"coded symbols have {data.size} bytes, not a whole number of 32-bit words")
    counts = [int(count) for count, _ in segments]
    if any(count < 0 for count in counts):
        raise CodecError(f"segment sizes must be >= 0, got {counts}")
    words = data.view("<u4").astype(np.uint32)
    try:
        coder = constriction.stream.stack.AnsCoder(words)
        decoded = [
            coder.decode(_model(pmf), count) if count else np.zeros(0, np.int32)
            for count, pmf in segments
        ]
    except (ValueError, RuntimeError) as err:
        raise CodecError(f"coded symbols are corrupt: {err}") from None
    if not np.array_equal(coder.get_compressed(), START_STATE):
        raise CodecError(
            "coded symbols are corrupt: the coder does not end in its start state "
            "(truncated, extended or altered data, or a different number of symbols)"
        )
    return [np.asarray(symbols, dtype=np.int32) for symbols in decoded]
