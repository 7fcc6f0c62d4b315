"""Scaled sign ``"sign"``: one bit per coordinate plus one float32 magnitude per tensor.

Each tensor B (a "block" in COMP-AMS's Block-Sign) becomes ``mean|x_B| · sign(x_B)``: the
sign keeps the direction coordinate-wise and the scale keeps the tensor's ℓ1 mass. Zero is
sent as ``+`` (one bit cannot say 0); that costs nothing in the error
``‖x − C(x)‖² = ‖x‖² − ‖x‖₁²/d_B``, which is the same either way.

Wire format: ``signs`` (uint8, ``np.packbits`` of "x ≥ 0" over the concatenation of the
tensors in sorted-name order, padding bits 0) and ``scales`` (float32, one per tensor).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from strategies.codecs.base import (
    Codec,
    CodecError,
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


@register_codec
class SignCodec(Codec):
    """Per-tensor scaled sign, about 1 bit per parameter."""

    name = "sign"
    lossless = False

    def encode(self, update: Params, state: Params) -> tuple[dict[str, np.ndarray], Header, Params]:
        update = checked_update(update)
        layout = Layout.of(update)
        scales = np.array(
            [np.abs(update[name]).mean(dtype=np.float64) if update[name].size else 0.0
             for name in layout.names],
            dtype=np.float32,
        )
        signs = np.packbits(layout.flatten(update) >= 0)
        return {"signs": signs, "scales": scales}, self._header(layout), {}

    def decode(self, payload: Mapping[str, np.ndarray], header: Mapping, like: Like) -> Params:
        layout = Layout.of(like)
        self._check_header(header, layout)
        check_payload_keys(payload, ("signs", "scales"))
        packed = payload_array(payload, "signs", np.uint8, (-(-layout.total // 8),))
        scales = payload_array(payload, "scales", np.float32, (len(layout.names),))
        require_finite("payload 'scales'", scales)
        if (scales < 0).any():
            raise CodecError("sign scales must be >= 0")
        bits = np.unpackbits(packed)
        if bits[layout.total :].any():
            raise CodecError("sign payload has non-zero padding bits")
        magnitudes = np.repeat(scales, layout.sizes)
        flat = np.where(bits[: layout.total].astype(bool), magnitudes, -magnitudes)
        return layout.split(flat)
