"""The codec registry, CodecSpec validation, and behaviour every codec shares (shapes, headers, rejection)."""

from __future__ import annotations

import numpy as np
import pytest

from strategies.codecs import (
    CODECS,
    Codec,
    CodecError,
    CodecSpec,
    build_codec,
    like_of,
    payload_nbytes,
)


def _update(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "conv.weight": rng.laplace(size=(4, 3, 3, 3)).astype(np.float32),
        "conv.bias": rng.laplace(size=4).astype(np.float32),
        "fc.weight": rng.laplace(scale=0.01, size=(10, 108)).astype(np.float32),
        "fc.bias": np.zeros(10, np.float32),
        "empty": np.zeros((0, 5), np.float32),
    }


def _codecs() -> list[Codec]:
    return [build_codec(CodecSpec(name=name)) for name in CODECS]


def test_registry_holds_the_six_codecs_with_matching_names():
    assert sorted(CODECS) == sorted(["none", "fp16", "bf16", "topk", "sign", "co3"])
    for name in CODECS:
        codec = build_codec(CodecSpec(name=name))
        assert codec.name == name
        assert codec.lossless == (name == "none")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "gzip"}, "codec name"),
        ({"topk_ratio": 0.0}, "topk_ratio"),
        ({"topk_ratio": 1.5}, "topk_ratio"),
        ({"co3_decay": 1.1}, "co3_decay"),
        ({"ef_decay": -0.1}, "ef_decay"),
        ({"ef_decay": float("nan")}, "ef_decay"),
        ({"co3_exponent_bits": 0}, "exponent_bits"),
        ({"co3_exponent_bits": 6}, "exponent_bits"),
        ({"co3_mantissa_bits": 8}, "mantissa_bits"),
        ({"co3_exponent_bits": 1, "co3_mantissa_bits": 0}, "mantissa_bits"),
        ({"co3_scale_rule": "best"}, "co3_scale_rule"),
    ],
)
def test_spec_rejects_bad_values_naming_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CodecSpec(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [{"co3_exponent_bits": 2.0}, {"error_feedback": 1}, {"topk_ratio": True}],
)
def test_spec_rejects_wrong_types(kwargs):
    with pytest.raises(TypeError):
        CodecSpec(**kwargs)


@pytest.mark.parametrize("codec", _codecs(), ids=lambda c: c.name)
def test_round_trip_keeps_names_shapes_and_float32(codec):
    update = _update()
    payload, header, state = codec.encode(update, {})
    decoded = codec.decode(payload, header, like_of(update))
    assert decoded.keys() == update.keys()
    for name, values in update.items():
        assert decoded[name].shape == values.shape
        assert decoded[name].dtype == np.float32
    assert header["codec"] == codec.name
    assert header["num_params"] == sum(v.size for v in update.values())
    assert all(isinstance(v, (int, float, str, bool)) for v in header.values())
    assert isinstance(state, dict)
    assert payload_nbytes(payload) == sum(a.nbytes for a in payload.values())


@pytest.mark.parametrize("codec", _codecs(), ids=lambda c: c.name)
def test_encode_and_reconstruct_equals_decoding_the_payload(codec):
    update = _update(1)
    payload, header, _, reconstruction = codec.encode_and_reconstruct(update, {})
    decoded = codec.decode(payload, header, like_of(update))
    for name in update:
        np.testing.assert_array_equal(reconstruction[name], decoded[name])


@pytest.mark.parametrize("codec", _codecs(), ids=lambda c: c.name)
def test_decode_own_equals_decode_in_values_and_order(codec):
    # A packed worker decodes its clients' payloads with decode_own; later stages (DP noise)
    # iterate the result in order, so the order must be decode's too.
    update = _update(2)
    payload, header, _ = codec.encode(update, {})
    decoded = codec.decode(payload, header, like_of(update))
    own = codec.decode_own(payload, header, like_of(update))
    assert list(own) == list(decoded)
    for name in decoded:
        assert own[name].dtype == decoded[name].dtype == np.float32
        np.testing.assert_array_equal(own[name], decoded[name])


@pytest.mark.parametrize("codec", _codecs(), ids=lambda c: c.name)
def test_empty_update_and_all_zero_update(codec):
    payload, header, _ = codec.encode({}, {})
    assert codec.decode(payload, header, {}) == {}
    zeros = {"a": np.zeros((3, 4), np.float32), "b": np.zeros(0, np.float32)}
    payload, header, _ = codec.encode(zeros, {})
    decoded = codec.decode(payload, header, like_of(zeros))
    assert decoded["a"].shape == (3, 4) and decoded["b"].shape == (0,)
    np.testing.assert_array_equal(decoded["a"], 0.0)


@pytest.mark.parametrize("codec", _codecs(), ids=lambda c: c.name)
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_encode_rejects_non_finite_updates(codec, bad):
    update = _update()
    update["conv.bias"][1] = bad
    with pytest.raises(CodecError, match="conv.bias"):
        codec.encode(update, {})


def test_encode_rejects_integer_arrays():
    with pytest.raises(CodecError, match="dtype"):
        build_codec(CodecSpec()).encode({"steps": np.arange(3)}, {})


def _header_corruptions(header):
    wrong_codec = {**header, "codec": "other"}
    missing = {k: v for k, v in header.items() if k != "num_params"}
    extra = {**header, "note": "hi"}
    wrong_size = {**header, "num_params": header["num_params"] + 1}
    as_bool = {**header, "num_params": True}
    return [wrong_codec, missing, extra, wrong_size, as_bool]


@pytest.mark.parametrize("codec", _codecs(), ids=lambda c: c.name)
def test_decode_rejects_bad_headers(codec):
    update = _update()
    payload, header, _ = codec.encode(update, {})
    for bad in _header_corruptions(header):
        with pytest.raises(CodecError, match="header"):
            codec.decode(payload, bad, like_of(update))


@pytest.mark.parametrize("codec", _codecs(), ids=lambda c: c.name)
def test_decode_rejects_payload_for_another_model(codec):
    update = _update()
    payload, header, _ = codec.encode(update, {})
    other = dict(update)
    other["fc.bias"] = np.zeros(11, np.float32)
    with pytest.raises(CodecError):
        codec.decode(payload, header, like_of(other))


@pytest.mark.parametrize("codec", _codecs(), ids=lambda c: c.name)
def test_decode_rejects_missing_extra_or_retyped_arrays(codec):
    update = _update()
    payload, header, _ = codec.encode(update, {})
    like = like_of(update)
    first = min(payload)
    with pytest.raises(CodecError, match="payload"):
        codec.decode({k: v for k, v in payload.items() if k != first}, header, like)
    with pytest.raises(CodecError, match="payload"):
        codec.decode({**payload, "smuggled": np.zeros(3, np.uint8)}, header, like)
    for key, array in payload.items():
        retyped = array.astype(np.float64) if array.dtype != np.float64 else array.astype(np.int64)
        with pytest.raises(CodecError):
            codec.decode({**payload, key: retyped}, header, like)
        if array.size:
            with pytest.raises(CodecError):
                codec.decode({**payload, key: array.ravel()[:-1]}, header, like)


@pytest.mark.parametrize("name", ["none", "fp16", "topk"])
def test_decode_rejects_non_finite_values(name):
    codec = build_codec(CodecSpec(name=name))
    update = _update()
    payload, header, _ = codec.encode(update, {})
    key = "values" if name == "topk" else "conv.bias"
    poisoned = payload[key].copy()
    poisoned[0] = np.inf
    with pytest.raises(CodecError, match="non-finite"):
        codec.decode({**payload, key: poisoned}, header, like_of(update))


def test_identity_codec_is_exact_and_copies():
    codec = build_codec(CodecSpec(name="none"))
    update = _update()
    payload, header, _ = codec.encode(update, {})
    decoded = codec.decode(payload, header, like_of(update))
    for name, values in update.items():
        np.testing.assert_array_equal(decoded[name], values)
        assert decoded[name] is not payload[name]
    assert payload_nbytes(payload) == 4 * header["num_params"]
