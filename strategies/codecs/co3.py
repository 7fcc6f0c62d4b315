"""CO3 (Chen, Hernandez, Huang, Rini, arXiv 2204.08211): convert to a short float, compress losslessly.

Per tensor, every round:

1. *Fit* a zero-location GenNorm(β, α) by moment matching (:func:`fit_gennorm`).
2. *Convert*: scale by ``s = c/α`` with ``c`` from the scale rule (the reference code's
   ``P(β)`` by default) and round to the short float grid (:class:`FloatFormat`).
3. *Compress*: entropy-code the symbols with ANS under the model "GenNorm(β, c) mass of each
   grid bin" (:mod:`strategies.codecs.entropy`) — the distribution the scaled tensor was
   fitted to, so the rate is close to the symbols' entropy when the fit is good.

The third step of the paper, *correct*, is error feedback with memory decay λ (``co3_decay``);
it is codec-agnostic and lives in :class:`~strategies.codecs.error_feedback.ErrorFeedback`.

Differences from the reference code (``Chen-Zhong-Jing/CO3_algorithm``), all deliberate:
the scale is refitted on every call (an FL round is long and the fit costs two passes over
the data) instead of every 5 epochs, so CO3 keeps no codec state; the fit fixes the location
at 0 and matches moments instead of ``scipy.stats.gennorm.fit``; and the entropy coder is
ANS with the fitted model rather than a Huffman table (the reference code omits this step).

Wire format: ``payload["symbols"]`` (uint8, the ANS stream) and ``payload["tensor_params"]``
(float32, one row ``(s, β, c)`` per tensor in sorted-name order; an all-zero or empty
tensor has the row ``(0, 0, 0)`` and codes no symbols). The header holds the format.
"""

from __future__ import annotations

from collections.abc import Mapping

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
)
from strategies.codecs.co3_format import FloatFormat, scaled_gennorm_scale
from strategies.codecs.entropy import decode_symbols, encode_symbols
from strategies.codecs.gennorm import BETA_MAX, BETA_MIN, bin_masses, fit_gennorm

_PAYLOAD_KEYS = ("symbols", "tensor_params")


@register_codec
class Co3Codec(Codec):
    """CO3's convert + compress steps (use with error feedback for the correct step).

    Parameters
    ----------
    exponent_bits, mantissa_bits : int
        The short float format (:class:`FloatFormat`); (2, 1) is CO3's fp4.
    scale_rule : str
        ``"paper"`` or ``"mse"`` (:func:`~strategies.codecs.co3_format.scaled_gennorm_scale`).
    """

    name = "co3"
    lossless = False

    def __init__(self, exponent_bits: int = 2, mantissa_bits: int = 1, scale_rule: str = "paper"):
        self.format = FloatFormat(exponent_bits, mantissa_bits)
        # Validates the rule name (and builds the "mse" table once, not on the first round).
        scaled_gennorm_scale(scale_rule, 1.0, self.format)
        self.scale_rule = scale_rule

    @classmethod
    def from_spec(cls, spec: CodecSpec) -> Co3Codec:
        return cls(spec.co3_exponent_bits, spec.co3_mantissa_bits, spec.co3_scale_rule)

    def encode(self, update: Params, state: Params) -> tuple[dict[str, np.ndarray], Header, Params]:
        payload, header, _ = self._encode(update, reconstruct=False)
        return payload, header, {}

    def encode_and_reconstruct(
        self, update: Params, state: Params
    ) -> tuple[dict[str, np.ndarray], Header, Params, Params]:
        """Encode, and dequantize the symbols directly instead of entropy-decoding them."""
        payload, header, reconstruction = self._encode(update, reconstruct=True)
        return payload, header, {}, reconstruction

    def _encode(
        self, update: Params, reconstruct: bool
    ) -> tuple[dict[str, np.ndarray], Header, Params]:
        update = checked_update(update)
        layout = Layout.of(update)
        tensor_params = np.zeros((len(layout.names), 3), np.float32)
        segments = []
        reconstruction: Params = {}
        for i, name in enumerate(layout.names):
            values = update[name]
            tensor_params[i] = self._tensor_params(values)
            scale, beta, target = (float(v) for v in tensor_params[i])
            if scale == 0:
                reconstruction[name] = np.zeros(values.shape, np.float32)
                continue
            symbols = self.format.quantize(values.ravel() * np.float32(scale))
            segments.append((symbols, bin_masses(self.format.edges, beta, target)))
            if reconstruct:
                reconstruction[name] = self._dequantize(symbols, scale, values.shape)
        payload = {"symbols": encode_symbols(segments), "tensor_params": tensor_params}
        return payload, self._header(layout, **self._format_fields()), reconstruction

    def _dequantize(self, symbols: np.ndarray, scale: float, shape: tuple[int, ...]) -> np.ndarray:
        return np.take(self.format.table(scale), symbols).reshape(shape)

    def _tensor_params(self, values: np.ndarray) -> np.ndarray:
        """``(s, β, c)`` as float32 (the values the decoder will see), or zeros to skip."""
        if values.size == 0 or not values.any():
            return np.zeros(3, np.float32)
        fit = fit_gennorm(values)
        target = scaled_gennorm_scale(self.scale_rule, fit.beta, self.format)
        row = np.array([target / fit.scale, fit.beta, target], np.float32)
        if not np.isfinite(row).all() or row[0] == 0:
            # Scale outside float32 (α below ~1e-38 or above ~1e38): send the tensor as zeros;
            # error feedback carries it to the next round.
            return np.zeros(3, np.float32)
        return row

    def _format_fields(self) -> dict[str, int]:
        return {
            "exponent_bits": self.format.exponent_bits,
            "mantissa_bits": self.format.mantissa_bits,
        }

    def decode(self, payload: Mapping[str, np.ndarray], header: Mapping, like: Like) -> Params:
        layout = Layout.of(like)
        self._check_header(header, layout, **self._format_fields())
        check_payload_keys(payload, _PAYLOAD_KEYS)
        tensor_params = payload_array(payload, "tensor_params", np.float32, (len(layout.names), 3))
        segments = []
        for name, size, row in zip(layout.names, layout.sizes, tensor_params, strict=True):
            scale, beta, target = (float(v) for v in row)
            if scale == 0 and beta == 0 and target == 0:
                continue
            if not (
                np.isfinite(row).all()
                and scale > 0
                and target > 0
                and BETA_MIN * (1 - 1e-6) <= beta <= BETA_MAX * (1 + 1e-6)
            ):
                raise CodecError(
                    f"tensor_params for {name!r} must be (0, 0, 0) or (s > 0, β in "
                    f"[{BETA_MIN}, {BETA_MAX}], c > 0), got {tuple(row.tolist())}"
                )
            segments.append((size, bin_masses(self.format.edges, beta, target)))
        symbols = iter(decode_symbols(payload["symbols"], segments))
        decoded: Params = {}
        for name, shape, row in zip(layout.names, layout.shapes, tensor_params, strict=True):
            if row[0] == 0:
                decoded[name] = np.zeros(shape, np.float32)
            else:
                decoded[name] = self._dequantize(next(symbols), float(row[0]), shape)
        return decoded

    def __repr__(self) -> str:
        return (
            f"Co3Codec(exponent_bits={self.format.exponent_bits}, "
            f"mantissa_bits={self.format.mantissa_bits}, scale_rule={self.scale_rule!r})"
        )

