"""Update codecs: how a client's delta travels to the server (ABC, registry, one module each)."""

from strategies.codecs.base import (
    Codec,
    CodecError,
    CodecSpec,
    Header,
    Layout,
    Like,
    Params,
    build_codec,
    codec_names,
    like_of,
    payload_nbytes,
    register_codec,
)
from strategies.codecs.co3 import Co3Codec
from strategies.codecs.error_feedback import ErrorFeedback, build_error_feedback
from strategies.codecs.float_cast import BFloat16Codec, Float16Codec
from strategies.codecs.identity import IdentityCodec
from strategies.codecs.sign import SignCodec
from strategies.codecs.topk import TopKCodec

CODECS: tuple[str, ...] = codec_names()
"""Every accepted ``CodecSpec.name``: none, fp16, bf16, topk, sign, co3."""

__all__ = [
    "CODECS",
    "BFloat16Codec",
    "Co3Codec",
    "Codec",
    "CodecError",
    "CodecSpec",
    "ErrorFeedback",
    "Float16Codec",
    "Header",
    "IdentityCodec",
    "Layout",
    "Like",
    "Params",
    "SignCodec",
    "TopKCodec",
    "build_codec",
    "build_error_feedback",
    "codec_names",
    "like_of",
    "payload_nbytes",
    "register_codec",
]
