"""CO3's short floating-point formats ("convert") and the rules that scale a tensor into them.

A format has one sign bit, ``E`` exponent bits and ``M`` mantissa bits, IEEE-754 style:
exponent bias ``2^(E−1) − 1``, subnormals at exponent field 0, and the all-ones exponent
field *reserved* — IEEE spends it on inf/NaN; CO3 has no such codes and leaves it unused, so
the largest value has exponent field ``2^E − 2``. This is exactly the grid of the CO3
reference code (``pack/fp4.py``, ``pack/fp8.py``):

* E=2, M=1 (fp4, bias 1): the 11 values {0, ±0.5, ±1, ±1.5, ±2, ±3};
* E=5, M=2 (fp8, bias 15): 2·(3 + 30·4) + 1 = 247 values.

(OCP's MX "E2M1" spends the top exponent on values and reaches ±6; CO3's fp4 does not.)

Conversion rounds to the nearest grid value (ties to the even code, as IEEE does), so
magnitudes below half the smallest subnormal flush to 0, and saturates at the largest finite
value. A value is carried as its *symbol*: its index in the sorted grid, so symbol
``max_code`` is 0 and the grid is ``-mag[max_code] … mag[max_code]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, lru_cache

import numpy as np
from scipy.optimize import minimize_scalar

from strategies.codecs.gennorm import BETA_MAX, BETA_MIN, quantization_mse

MAX_EXPONENT_BITS = 5
MAX_BITS = 8
"""Formats are *short* floats: sign + exponent + mantissa bits at most 8 (≤ 247 values)."""


@dataclass(frozen=True)
class FloatFormat:
    """A sign + ``exponent_bits`` + ``mantissa_bits`` float format without inf/NaN codes.

    Parameters
    ----------
    exponent_bits : int
        ``E`` in [1, 5]. E=1 has no normal numbers: it is a uniform (fixed-point) grid.
    mantissa_bits : int
        ``M >= 0`` with ``1 + E + M <= 8``; (E, M) = (1, 0) is refused (its only value is 0).
    """

    exponent_bits: int
    mantissa_bits: int

    def __post_init__(self) -> None:
        for field, value in (
            ("exponent_bits", self.exponent_bits),
            ("mantissa_bits", self.mantissa_bits),
        ):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{field} must be an int, got {value!r}")
        if not 1 <= self.exponent_bits <= MAX_EXPONENT_BITS:
            raise ValueError(
                f"exponent_bits must be in [1, {MAX_EXPONENT_BITS}], got {self.exponent_bits}"
            )
        if not 0 <= self.mantissa_bits <= MAX_BITS - 1 - self.exponent_bits:
            raise ValueError(
                f"mantissa_bits must be in [0, {MAX_BITS - 1 - self.exponent_bits}] so that the "
                f"format has at most {MAX_BITS} bits, got {self.mantissa_bits}"
            )
        if self.max_code == 0:
            raise ValueError("exponent_bits=1 needs mantissa_bits >= 1 (else the only value is 0)")

    @property
    def bias(self) -> int:
        return 2 ** (self.exponent_bits - 1) - 1

    @property
    def max_code(self) -> int:
        """Code of the largest magnitude: exponent field ``2^E − 2``, mantissa all ones."""
        return ((2**self.exponent_bits - 2) << self.mantissa_bits) | (2**self.mantissa_bits - 1)

    @property
    def num_symbols(self) -> int:
        """Size of the signed grid: ``2·max_code + 1`` (one zero)."""
        return 2 * self.max_code + 1

    @property
    def min_normal(self) -> float:
        return 2.0 ** (1 - self.bias)

    @property
    def subnormal_step(self) -> float:
        """Spacing of the subnormals, i.e. the smallest positive value."""
        return 2.0 ** (1 - self.bias - self.mantissa_bits)

    @cached_property
    def magnitudes(self) -> np.ndarray:
        """Value of every magnitude code ``0 … max_code`` (float64, increasing)."""
        codes = np.arange(self.max_code + 1)
        exponent = codes >> self.mantissa_bits
        mantissa = (codes & (2**self.mantissa_bits - 1)) / 2.0**self.mantissa_bits
        return np.where(
            exponent == 0,
            mantissa * self.min_normal,
            (1.0 + mantissa) * 2.0 ** (exponent - self.bias),
        )

    @property
    def max_value(self) -> float:
        return float(self.magnitudes[-1])

    @cached_property
    def grid(self) -> np.ndarray:
        """All representable values, sorted (float64); ``grid[symbol]`` is a symbol's value."""
        return np.concatenate([-self.magnitudes[:0:-1], self.magnitudes])

    @cached_property
    def edges(self) -> np.ndarray:
        """Boundaries between consecutive grid values (their midpoints)."""
        return 0.5 * (self.grid[1:] + self.grid[:-1])

    def quantize(self, y: np.ndarray) -> np.ndarray:
        """Symbols (int32, into :attr:`grid`) of the nearest grid values of float32 ``y``.

        Works on the float32 bit pattern instead of searching the grid: rounding the
        mantissa to ``M`` bits is an integer add and shift, the carry into the exponent
        handled by the addition itself. Below the smallest normal that code is too small
        (it is ≤ the subnormal code there), and above it the subnormal code is capped at
        ``2^M`` (≤ the normal code), so the larger of the two is the right code everywhere.
        ``y`` must be finite (infinities saturate, NaN is undefined).
        """
        bits = np.ascontiguousarray(y, dtype=np.float32).view(np.int32)
        sign = bits >> 31  # 0 or -1
        magnitude_bits = bits & np.int32(0x7FFFFFFF)
        shift = 23 - self.mantissa_bits
        # Round half to even on the kept mantissa bits: add half an ulp − 1, plus the kept lsb.
        code = magnitude_bits + np.int32((1 << (shift - 1)) - 1)
        code += (magnitude_bits >> shift) & 1
        code >>= shift
        code -= np.int32((127 - self.bias) << self.mantissa_bits)
        # Subnormals: uniform spacing, so round half to even on the scaled value (scaling by
        # a power of two is exact).
        subnormal = np.minimum(magnitude_bits.view(np.float32), np.float32(self.min_normal))
        subnormal *= np.float32(1.0 / self.subnormal_step)
        np.maximum(code, np.rint(subnormal).astype(np.int32), out=code)
        np.minimum(code, np.int32(self.max_code), out=code)
        # Two's-complement negation where the sign bit is set, then shift into [0, 2·max_code].
        code ^= sign
        code -= sign
        code += np.int32(self.max_code)
        return code

    def table(self, scale: float) -> np.ndarray:
        """float32 value of each symbol after undoing a scale: ``grid / scale``.

        Encoder and decoder both dequantize through this one table, so they agree bit
        for bit.
        """
        return (self.grid / np.float64(np.float32(scale))).astype(np.float32)


SCALE_RULES = ("paper", "mse")
"""Accepted names of the rule that picks a tensor's scale (see :func:`scaled_gennorm_scale`)."""

PAPER_SCALE_FLOOR = 9e-4
"""Lower bound the CO3 reference code puts on ``P(β)``."""


def paper_scale_polynomial(beta: float) -> float:
    """The CO3 reference code's ``P(β) = 0.46 − 2.85β + 5.37β² − 2.85β³ + 0.52β⁴``, floored at 9e-4.

    It is a fit of the MSE-optimal fp4 (E2M1) scale of a unit-scale GenNorm(β). P's minimum
    over the reals is ≈0.0057 (at β≈0.36), so the floor of the reference code never binds;
    it is kept so the rule reads exactly as published.
    """
    value = 0.46 + beta * (-2.85 + beta * (5.37 + beta * (-2.85 + beta * 0.52)))
    return max(value, PAPER_SCALE_FLOOR)


@lru_cache(maxsize=16)
def _mse_scale_table(fmt: FloatFormat) -> tuple[np.ndarray, np.ndarray]:
    """``(log β, log c*(β))`` on a grid, where ``c*`` minimises the relative quantization MSE.

    Built once per format and process (≈0.1 s for fp4, ≈1 s for 8-bit formats): a coarse
    log-spaced search per β, refined by a bounded 1-D minimisation around the best point.
    """
    log_betas = np.linspace(np.log(BETA_MIN), np.log(BETA_MAX), 41)
    log_c_grid = np.linspace(np.log(1e-5), np.log(1e3), 81)
    best = np.empty_like(log_betas)
    for i, beta in enumerate(np.exp(log_betas)):

        def relative_mse(log_c: np.ndarray, beta: float = beta) -> np.ndarray:
            # Quantizing c·X, X ~ GenNorm(β, 1), then dividing by c: error ∝ MSE(c) / c².
            c = np.exp(log_c)
            return quantization_mse(fmt.grid, fmt.edges, beta, c) / c**2

        j = int(np.argmin(relative_mse(log_c_grid)))
        lo, hi = log_c_grid[max(j - 1, 0)], log_c_grid[min(j + 1, log_c_grid.size - 1)]
        result = minimize_scalar(
            lambda v: float(relative_mse(np.array(v))), bounds=(lo, hi), method="bounded"
        )
        best[i] = result.x
    return log_betas, best


def mse_scale(beta: float, fmt: FloatFormat) -> float:
    """The scale ``c*(β)`` that minimises ``E(X − Q(cX)/c)²`` for X ~ GenNorm(β, 1) on ``fmt``.

    Interpolated (in log–log) from a per-format table computed from the exact GenNorm bin
    integrals (:func:`~strategies.codecs.gennorm.quantization_mse`).
    """
    log_betas, log_scales = _mse_scale_table(fmt)
    return float(np.exp(np.interp(np.log(beta), log_betas, log_scales)))


def scaled_gennorm_scale(rule: str, beta: float, fmt: FloatFormat) -> float:
    """Target GenNorm scale ``c`` of a tensor after scaling, so its scale is ``s = c / α``.

    ``"paper"`` is the reference code's ``P(β)`` (fitted for fp4; applied unchanged to other
    formats, whose wider range makes the scale matter less); ``"mse"`` is :func:`mse_scale`
    for ``fmt``.
    """
    if rule == "paper":
        return paper_scale_polynomial(beta)
    if rule == "mse":
        return mse_scale(beta, fmt)
    raise ValueError(f"scale rule must be one of {SCALE_RULES}, got {rule!r}")
