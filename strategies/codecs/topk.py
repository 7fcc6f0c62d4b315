"""Top-k sparsification ``"topk"``: the k largest-magnitude coordinates of the whole update.

Selection is global, across all tensors (as in COMP-AMS): k/d of the budget goes wherever
the update is largest, and the compressor is δ-contractive with δ = k/d,
``‖x − C(x)‖² ≤ (1 − k/d)‖x‖²``, which is what error feedback's guarantees need.

Wire format: ``indices`` (int32, strictly increasing positions in the concatenation of the
tensors in sorted-name order) and ``values`` (float32), i.e. 64 bits per kept coordinate:
0.64 bits/param at k/d = 1%. Entropy-coding the index gaps would bring the indices near
``log2(e·d/k)`` bits each; this codec keeps the plain, auditable format.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from fractions import Fraction

import numpy as np

from strategies.codecs.base import (
    Codec,
    CodecError,
    CodecSpec,
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


def topk_count(ratio: float, num_params: int) -> int:
    """``k = max(1, ⌈ratio·d⌉)`` (0 when d = 0), with ``ratio`` read as the decimal it prints as.

    Reading ``0.07`` as 7/100 rather than its binary value 0.07000000000000000666… keeps
    ``⌈0.07·100⌉`` at 7 instead of 8.
    """
    if num_params == 0:
        return 0
    return min(num_params, max(1, math.ceil(Fraction(repr(float(ratio))) * num_params)))


@register_codec
class TopKCodec(Codec):
    """Keeps exactly ``k = max(1, ⌈ratio·d⌉)`` coordinates (ties broken arbitrarily).

    Parameters
    ----------
    ratio : float
        ``k/d`` in (0, 1].
    """

    name = "topk"
    lossless = False

    def __init__(self, ratio: float = 0.01) -> None:
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"topk ratio must be in (0, 1], got {ratio}")
        self.ratio = float(ratio)

    @classmethod
    def from_spec(cls, spec: CodecSpec) -> TopKCodec:
        return cls(spec.topk_ratio)

    def encode(self, update: Params, state: Params) -> tuple[dict[str, np.ndarray], Header, Params]:
        update = checked_update(update)
        layout = Layout.of(update)
        if layout.total >= 2**31:
            raise CodecError(f"topk indexes with int32; {layout.total} parameters is too many")
        flat = layout.flatten(update)
        k = topk_count(self.ratio, flat.size)
        if k == flat.size:
            indices = np.arange(k, dtype=np.int32)
        else:
            indices = np.sort(np.argpartition(np.abs(flat), flat.size - k)[flat.size - k :])
            indices = indices.astype(np.int32)
        payload = {"indices": indices, "values": flat[indices]}
        return payload, self._header(layout, k=k), {}

    def decode(self, payload: Mapping[str, np.ndarray], header: Mapping, like: Like) -> Params:
        layout = Layout.of(like)
        k = topk_count(self.ratio, layout.total)
        self._check_header(header, layout, k=k)
        check_payload_keys(payload, ("indices", "values"))
        indices = payload_array(payload, "indices", np.int32, (k,))
        values = payload_array(payload, "values", np.float32, (k,))
        if k and (indices[0] < 0 or indices[-1] >= layout.total):
            raise CodecError(f"topk indices must lie in [0, {layout.total})")
        if (np.diff(indices) <= 0).any():
            raise CodecError("topk indices must be strictly increasing (sorted, no repeats)")
        require_finite("payload 'values'", values)
        flat = np.zeros(layout.total, np.float32)
        flat[indices] = values
        return layout.split(flat)

    def __repr__(self) -> str:
        return f"TopKCodec(ratio={self.ratio})"
