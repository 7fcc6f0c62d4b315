"""Scaled sign: per-tensor magnitude mean|x_B|, one sign bit per coordinate, strict decoding."""

from __future__ import annotations

import numpy as np
import pytest

from strategies.codecs import CodecError, SignCodec, like_of


def _update() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "a": rng.laplace(size=(13, 3)).astype(np.float32),
        "b": (1e-4 * rng.standard_normal(10)).astype(np.float32),
        "c": np.float32([0.0, -2.0, 0.0, 3.0, -1.0]),
    }


def test_each_tensor_becomes_its_mean_magnitude_times_its_signs():
    update = _update()
    codec = SignCodec()
    payload, header, _ = codec.encode(update, {})
    decoded = codec.decode(payload, header, like_of(update))
    for name, x in update.items():
        scale = np.abs(x.astype(np.float64)).mean()
        np.testing.assert_allclose(np.abs(decoded[name]), scale, rtol=1e-7)
        nonzero = x != 0
        np.testing.assert_array_equal(np.sign(decoded[name][nonzero]), np.sign(x[nonzero]))
        # Zero goes out as +scale; the squared error is ‖x‖² − ‖x‖₁²/d either way.
        assert (decoded[name][~nonzero] > 0).all()
        np.testing.assert_allclose(
            np.sum((x - decoded[name]).astype(np.float64) ** 2),
            np.sum(x.astype(np.float64) ** 2) - np.sum(np.abs(x), dtype=np.float64) ** 2 / x.size,
            rtol=1e-5,
        )


def test_payload_is_one_bit_per_parameter_plus_one_float_per_tensor():
    update = _update()
    payload, _, _ = SignCodec().encode(update, {})
    d = sum(v.size for v in update.values())
    assert payload["signs"].nbytes == -(-d // 8)
    assert payload["scales"].nbytes == 4 * len(update)


def test_decode_rejects_padding_bits_and_negative_or_non_finite_scales():
    update = _update()
    codec = SignCodec()
    payload, header, _ = codec.encode(update, {})
    like = like_of(update)
    d = sum(v.size for v in update.values())
    assert d % 8  # there are padding bits to corrupt
    signs = payload["signs"].copy()
    signs[-1] |= 1
    with pytest.raises(CodecError, match="padding"):
        codec.decode({**payload, "signs": signs}, header, like)
    for bad in (-1.0, np.nan):
        scales = payload["scales"].copy()
        scales[0] = bad
        with pytest.raises(CodecError, match="scales"):
            codec.decode({**payload, "scales": scales}, header, like)
