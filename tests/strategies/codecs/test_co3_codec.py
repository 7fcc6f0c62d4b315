"""The CO3 codec: convert + compress end to end, rate against the symbols' entropy, strict decoding."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from strategies.codecs import Co3Codec, CodecError, CodecSpec, build_codec, like_of
from strategies.codecs.co3_format import FloatFormat, paper_scale_polynomial
from strategies.codecs.gennorm import fit_gennorm


def _update(n: int = 20_000, beta: float = 1.0, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)

    def sample(scale: float, shape) -> np.ndarray:
        return stats.gennorm.rvs(beta, scale=scale, size=shape, random_state=rng).astype(np.float32)

    return {
        "layer1.weight": sample(1e-3, (n // 100, 100)),
        "layer1.bias": sample(1e-2, 37),
        "layer2.weight": sample(3e-4, n // 2),
        "frozen": np.zeros(50, np.float32),
        "empty": np.zeros((0,), np.float32),
    }


def _empirical_entropy_bits(symbols: np.ndarray) -> float:
    counts = np.bincount(symbols)
    p = counts[counts > 0] / symbols.size
    return float(-symbols.size * np.sum(p * np.log2(p)))


def test_default_spec_builds_fp4_with_the_paper_rule():
    codec = build_codec(CodecSpec(name="co3"))
    assert isinstance(codec, Co3Codec)
    assert codec.format == FloatFormat(2, 1) and codec.scale_rule == "paper"
    codec = build_codec(CodecSpec(name="co3", co3_exponent_bits=5, co3_mantissa_bits=2, co3_scale_rule="mse"))
    assert codec.format.num_symbols == 247 and codec.scale_rule == "mse"


def test_decoded_values_are_the_nearest_scaled_grid_points():
    update = _update()
    codec = Co3Codec()
    payload, header, state = codec.encode(update, {})
    assert state == {}
    decoded = codec.decode(payload, header, like_of(update))
    grid = FloatFormat(2, 1).grid
    for row, name in zip(payload["tensor_params"], sorted(update), strict=True):
        x = update[name]
        if not x.any():
            assert tuple(row) == (0, 0, 0)
            np.testing.assert_array_equal(decoded[name], 0)
            continue
        scale, beta, target = (float(v) for v in row)
        fit = fit_gennorm(x)
        # The paper rule: s = P(β)/α with (β, α) the tensor's GenNorm fit.
        assert beta == pytest.approx(fit.beta, rel=1e-6)
        assert target == pytest.approx(paper_scale_polynomial(fit.beta), rel=1e-6)
        assert scale == pytest.approx(target / fit.scale, rel=1e-6)
        # Independent reference: brute-force nearest grid point of the scaled values.
        y = (x * np.float32(scale)).astype(np.float64).ravel()
        nearest = grid[np.abs(y[:, None] - grid[None, :]).argmin(axis=1)]
        np.testing.assert_allclose(decoded[name].ravel(), nearest / scale, rtol=1e-6)


def test_coded_size_is_within_5_percent_of_the_empirical_entropy():
    update = _update(n=200_000)
    codec = Co3Codec()
    payload, _, _ = codec.encode(update, {})
    fmt = codec.format
    entropy_bits = 0.0
    for row, name in zip(payload["tensor_params"], sorted(update), strict=True):
        if row[0]:
            entropy_bits += _empirical_entropy_bits(fmt.quantize(update[name].ravel() * row[0]))
    coded_bits = 8 * payload["symbols"].nbytes
    assert entropy_bits <= coded_bits <= 1.05 * entropy_bits + 8 * 4 * len(update)
    # And well under the 4 bits/value of raw fp4 for a Laplace-like update.
    assert coded_bits / sum(v.size for v in update.values()) < 3.0


def test_relative_error_of_fp4_on_laplace_data_is_near_the_theoretical_optimum():
    update = _update(n=100_000)
    codec = Co3Codec()
    payload, header, _ = codec.encode(update, {})
    decoded = codec.decode(payload, header, like_of(update))
    x = update["layer2.weight"].astype(np.float64)
    relative_mse = np.sum((decoded["layer2.weight"] - x) ** 2) / np.sum(x**2)
    # Expected relative MSE of fp4 at the optimal scale for β = 1 is ≈ 0.036 (GenNorm integral).
    assert 0.03 < relative_mse < 0.043


def test_fp8_format_round_trips_with_a_small_error():
    update = _update()
    codec = Co3Codec(5, 2)
    payload, header, _ = codec.encode(update, {})
    decoded = codec.decode(payload, header, like_of(update))
    for name, x in update.items():
        if x.any():
            assert np.abs(decoded[name] - x).max() <= 2.0**-3 * np.abs(x).max()


def test_a_constant_tensor_and_a_single_value_survive():
    update = {"c": np.full(64, 0.25, np.float32), "s": np.float32([-7.5])}
    codec = Co3Codec(scale_rule="mse")
    payload, header, _ = codec.encode(update, {})
    decoded = codec.decode(payload, header, like_of(update))
    np.testing.assert_allclose(decoded["c"], 0.25, rtol=0.25)
    np.testing.assert_allclose(decoded["s"], -7.5, rtol=0.25)


def _encoded():
    update = _update(n=5000)
    codec = Co3Codec()
    payload, header, _ = codec.encode(update, {})
    return codec, payload, header, like_of(update)


def test_decode_rejects_truncated_or_padded_symbols():
    codec, payload, header, like = _encoded()
    for symbols in (payload["symbols"][:-4], payload["symbols"][:-3], payload["symbols"][8:],
                    np.concatenate([payload["symbols"], np.zeros(4, np.uint8)])):
        with pytest.raises(CodecError, match="coded symbols"):
            codec.decode({**payload, "symbols": symbols}, header, like)


@pytest.mark.parametrize(
    "row",
    [(-1.0, 1.0, 0.65), (np.nan, 1.0, 0.65), (np.inf, 1.0, 0.65), (10.0, 0.01, 0.65),
     (10.0, 50.0, 0.65), (10.0, 1.0, 0.0), (0.0, 1.0, 0.65)],
)
def test_decode_rejects_bad_tensor_params(row):
    codec, payload, header, like = _encoded()
    params = payload["tensor_params"].copy()
    params[0] = row
    with pytest.raises(CodecError, match="tensor_params"):
        codec.decode({**payload, "tensor_params": params}, header, like)


def test_decode_rejects_altered_model_parameters_through_the_stream_check():
    codec, payload, header, like = _encoded()
    params = payload["tensor_params"].copy()
    params[2, 1] *= 1.5  # a different β: a different model, so the stream no longer fits it
    with pytest.raises(CodecError, match="coded symbols"):
        codec.decode({**payload, "tensor_params": params}, header, like)


def test_decode_rejects_a_different_format():
    codec, payload, header, like = _encoded()
    with pytest.raises(CodecError, match="mantissa_bits"):
        codec.decode(payload, {**header, "mantissa_bits": 2}, like)
    with pytest.raises(CodecError, match="exponent_bits"):
        Co3Codec(5, 1).decode(payload, header, like)
