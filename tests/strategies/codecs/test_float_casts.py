"""fp16 and bf16 casts: rounding against independent references, saturation, error bounds."""

from __future__ import annotations

import numpy as np
import pytest

from strategies.codecs import CodecSpec, build_codec, like_of
from strategies.codecs.float_cast import bfloat16_bits_to_float32, float32_to_bfloat16_bits


def _values(seed: int = 0, n: int = 20_000) -> np.ndarray:
    rng = np.random.default_rng(seed)
    magnitudes = 10.0 ** rng.uniform(-40, 38, n)
    return (rng.choice([-1.0, 1.0], n) * magnitudes).astype(np.float32)


def _bfloat16_value(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def _nearest_bfloat16(x: np.ndarray) -> np.ndarray:
    """Reference: of the two bfloat16 neighbours (truncate, truncate + 1 ulp) take the nearer,
    ties to the even pattern; compared exactly in float64."""
    bits = x.view(np.uint32)
    down = (bits >> 16).astype(np.uint32)
    up = down + 1
    err_down = np.abs(x.astype(np.float64) - _bfloat16_value(down))
    err_up = np.abs(x.astype(np.float64) - _bfloat16_value(up))
    pick_up = (err_up < err_down) | ((err_up == err_down) & (up % 2 == 0))
    return np.where(pick_up, up, down).astype(np.uint16)


def test_bfloat16_rounds_to_nearest_even():
    x = _values()
    x = x[np.abs(x) < 3.38e38]  # keep clear of saturation, tested separately
    np.testing.assert_array_equal(float32_to_bfloat16_bits(x), _nearest_bfloat16(x))


def test_bfloat16_exact_ties_go_to_even():
    one_plus_half_ulp = np.float32(1.0 + 2.0**-8)  # halfway between 1 and 1 + 2^-7
    three_halves_ulp = np.float32(1.0 + 3 * 2.0**-8)  # halfway between 1 + 2^-7 and 1 + 2^-6
    got = bfloat16_bits_to_float32(float32_to_bfloat16_bits(np.array([one_plus_half_ulp, three_halves_ulp])))
    np.testing.assert_array_equal(got, np.float32([1.0, 1.0 + 2.0**-6]))


def test_bfloat16_matches_torch():
    torch = pytest.importorskip("torch")
    x = _values(1)
    x = x[np.abs(x) < 3.38e38]
    expected = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(float32_to_bfloat16_bits(x), expected)


def test_bfloat16_saturates_instead_of_overflowing():
    big = np.float32([3.4e38, -3.4e38, np.finfo(np.float32).max])
    back = bfloat16_bits_to_float32(float32_to_bfloat16_bits(big))
    assert np.isfinite(back).all()
    np.testing.assert_array_equal(np.abs(back), np.float32(3.3895313892515355e38))
    assert back[1] < 0


@pytest.mark.parametrize(("name", "mantissa_bits", "tiny"), [("fp16", 10, 6.2e-5), ("bf16", 7, 1.2e-38)])
def test_relative_error_of_normal_values_is_half_an_ulp(name, mantissa_bits, tiny):
    codec = build_codec(CodecSpec(name=name))
    x = _values(2)
    x = x[(np.abs(x) > tiny) & (np.abs(x) < 6e4)]
    update = {"w": x}
    payload, header, _ = codec.encode(update, {})
    assert payload["w"].itemsize == 2
    decoded = codec.decode(payload, header, like_of(update))["w"]
    relative = np.abs(decoded.astype(np.float64) - x) / np.abs(x)
    assert relative.max() <= 2.0 ** -(mantissa_bits + 1)


def test_fp16_is_numpy_half_inside_its_range_and_saturates_outside():
    codec = build_codec(CodecSpec(name="fp16"))
    x = np.float32([0.1, -3.0e-8, 1e-3, 65504.0, 7e4, -1e30])
    payload, header, _ = codec.encode({"w": x}, {})
    decoded = codec.decode(payload, header, like_of({"w": x}))["w"]
    np.testing.assert_array_equal(decoded[:4], x[:4].astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(decoded[4:], np.float32([65504.0, -65504.0]))


def test_bf16_decode_rejects_infinity_and_nan_patterns():
    codec = build_codec(CodecSpec(name="bf16"))
    x = {"w": np.ones(4, np.float32)}
    payload, header, _ = codec.encode(x, {})
    for pattern in (0x7F80, 0xFFC0):  # +inf, a NaN
        words = payload["w"].copy()
        words[2] = pattern
        with pytest.raises(ValueError, match="non-finite"):
            codec.decode({"w": words}, header, like_of(x))
