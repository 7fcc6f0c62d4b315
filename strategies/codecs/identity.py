"""The identity codec ``"none"``: float32 arrays as they are (exact; the uncompressed baseline)."""

from __future__ import annotations

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


@register_codec
class IdentityCodec(Codec):
    """Sends every tensor as float32, one payload array per parameter name."""

    name = "none"
    lossless = True

    def encode(self, update: Params, state: Params) -> tuple[dict[str, np.ndarray], Header, Params]:
        update = checked_update(update)
        return dict(update), self._header(Layout.of(update)), {}

    def decode_own(self, payload: Mapping[str, np.ndarray], header: Mapping, like: Like) -> Params:
        """The payload: :meth:`encode` already made it the checked float32 update.

        In :meth:`decode`'s (sorted-name) order, which later stages iterate in — DP noise is
        drawn array by array in that order.
        """
        return {name: payload[name] for name in sorted(payload)}

    def decode(self, payload: Mapping[str, np.ndarray], header: Mapping, like: Like) -> Params:
        layout = Layout.of(like)
        self._check_header(header, layout)
        check_payload_keys(payload, layout.names)
        decoded: Params = {}
        for name, shape in zip(layout.names, layout.shapes, strict=True):
            array = payload_array(payload, name, np.float32, shape)
            require_finite(f"payload {name!r}", array)
            decoded[name] = array.copy()
        return decoded
