"""Half-precision casts: ``"fp16"`` (IEEE binary16) and ``"bf16"`` (bfloat16), 16 bits per value.

NumPy has no bfloat16, so ``"bf16"`` travels as ``uint16`` words that hold the upper half of
the float32 bit pattern, rounded to nearest with ties to even (what PyTorch and hardware
converters do). Both casts saturate at their largest finite value instead of overflowing to
infinity, so a large but finite update stays finite (error feedback absorbs the excess).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping

import numpy as np

from strategies.codecs.base import (
    Codec,
    Header,
    Layout,
    Like,
    Params,
    check_payload_keys,
    checked_update,
    payload_array,
    register_codec,
    require_finite,
)

_BF16_MAX_BITS = np.uint16(0x7F7F)  # largest finite bfloat16 magnitude, 3.3895e38
_FP16_MAX = np.float32(np.finfo(np.float16).max)


def float32_to_bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) of finite float32 ``x``, rounded to nearest even, saturated."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    # Adding 0x7FFF + lsb rounds half to even on bit 16; the carry may bump the exponent.
    rounded = ((bits + (np.uint32(0x7FFF) + ((bits >> 16) & 1))) >> 16).astype(np.uint16)
    magnitude = rounded & np.uint16(0x7FFF)
    # Rounded up into the all-ones exponent (infinity): saturate, keeping the sign.
    return np.where(magnitude > _BF16_MAX_BITS, (rounded & np.uint16(0x8000)) | _BF16_MAX_BITS, rounded)


def bfloat16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """float32 values of bfloat16 bit patterns (exact: bfloat16 ⊂ float32)."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


class _HalfCodec(Codec):
    """One 16-bit payload array per parameter name; subclasses define the cast."""

    lossless = False
    wire_dtype: type

    @abstractmethod
    def _to_wire(self, values: np.ndarray) -> np.ndarray:
        """float32 → wire array (same shape)."""

    @abstractmethod
    def _from_wire(self, values: np.ndarray) -> np.ndarray:
        """Wire array → float32 (same shape)."""

    def encode(self, update: Params, state: Params) -> tuple[dict[str, np.ndarray], Header, Params]:
        update = checked_update(update)
        payload = {name: self._to_wire(values) for name, values in update.items()}
        return payload, self._header(Layout.of(update)), {}

    def decode(self, payload: Mapping[str, np.ndarray], header: Mapping, like: Like) -> Params:
        layout = Layout.of(like)
        self._check_header(header, layout)
        check_payload_keys(payload, layout.names)
        decoded: Params = {}
        for name, shape in zip(layout.names, layout.shapes, strict=True):
            values = self._from_wire(payload_array(payload, name, self.wire_dtype, shape))
            require_finite(f"payload {name!r}", values)
            decoded[name] = values
        return decoded


@register_codec
class Float16Codec(_HalfCodec):
    """IEEE half precision (10-bit mantissa, range ±65504, subnormals below 6.1e-5)."""

    name = "fp16"
    wire_dtype = np.float16

    def _to_wire(self, values: np.ndarray) -> np.ndarray:
        return np.clip(values, -_FP16_MAX, _FP16_MAX).astype(np.float16)

    def _from_wire(self, values: np.ndarray) -> np.ndarray:
        return values.astype(np.float32)


@register_codec
class BFloat16Codec(_HalfCodec):
    """bfloat16 (float32's exponent range, 7-bit mantissa) as uint16 words."""

    name = "bf16"
    wire_dtype = np.uint16

    def _to_wire(self, values: np.ndarray) -> np.ndarray:
        return float32_to_bfloat16_bits(values)

    def _from_wire(self, values: np.ndarray) -> np.ndarray:
        return bfloat16_bits_to_float32(values)
