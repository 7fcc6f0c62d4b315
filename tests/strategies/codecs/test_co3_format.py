"""CO3's short float formats (grids, rounding, saturation) and its scale rules."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from strategies.codecs.co3_format import (
    PAPER_SCALE_FLOOR,
    FloatFormat,
    mse_scale,
    paper_scale_polynomial,
    scaled_gennorm_scale,
)

FORMATS = [(2, 1), (5, 2), (1, 1), (1, 6), (3, 0), (4, 3), (2, 0), (3, 4)]


def test_fp4_e2m1_grid_is_the_eleven_values_of_the_reference_code():
    fmt = FloatFormat(2, 1)
    assert fmt.bias == 1
    np.testing.assert_array_equal(fmt.grid, [-3, -2, -1.5, -1, -0.5, 0, 0.5, 1, 1.5, 2, 3])
    np.testing.assert_array_equal(fmt.edges, [-2.5, -1.75, -1.25, -0.75, -0.25, 0.25, 0.75, 1.25, 1.75, 2.5])


def test_fp8_e5m2_grid_has_247_sorted_symmetric_values():
    fmt = FloatFormat(5, 2)
    assert fmt.bias == 15
    grid = fmt.grid
    assert grid.size == 2 * (3 + 30 * 4) + 1 == 247
    assert (np.diff(grid) > 0).all()
    np.testing.assert_array_equal(grid, -grid[::-1])
    assert grid[-1] == 1.75 * 2.0**15  # exponent field 30 is the largest used
    assert grid[fmt.max_code + 1] == 2.0**-16  # smallest subnormal


@pytest.mark.parametrize(("e", "m"), FORMATS)
def test_grid_matches_explicit_enumeration(e, m):
    """Independent construction: enumerate (exponent field, mantissa) like the reference code."""
    fmt = FloatFormat(e, m)
    bias = 2 ** (e - 1) - 1
    values = {0.0}
    for field in range(2**e - 1):  # all-ones exponent reserved
        for mantissa in range(2**m):
            if field == 0:
                value = mantissa / 2**m * 2.0 ** (1 - bias)
            else:
                value = (1 + mantissa / 2**m) * 2.0 ** (field - bias)
            values |= {value, -value}
    np.testing.assert_array_equal(fmt.grid, sorted(values))
    assert fmt.num_symbols == len(values)


def _probe_values(fmt: FloatFormat, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    magnitudes = fmt.max_value * 2.0 ** rng.uniform(-(2**fmt.exponent_bits) - fmt.mantissa_bits - 4, 2, 20_000)
    return (rng.choice([-1.0, 1.0], magnitudes.size) * magnitudes).astype(np.float32)


@pytest.mark.parametrize(("e", "m"), FORMATS)
def test_quantize_is_nearest_grid_value(e, m):
    fmt = FloatFormat(e, m)
    y = _probe_values(fmt, e * 10 + m)
    symbols = fmt.quantize(y)
    # Independent reference: binary search for the neighbours, keep the closer one.
    grid = fmt.grid
    right = np.clip(np.searchsorted(grid, y), 1, grid.size - 1)
    left = right - 1
    nearest = np.where(np.abs(y - grid[left]) <= np.abs(grid[right] - y), left, right)
    np.testing.assert_array_equal(symbols, nearest)  # no exact ties among random probes


@pytest.mark.parametrize(("e", "m"), FORMATS)
def test_grid_values_map_to_themselves_and_ties_go_to_even_codes(e, m):
    fmt = FloatFormat(e, m)
    np.testing.assert_array_equal(fmt.quantize(fmt.grid.astype(np.float32)), np.arange(fmt.num_symbols))
    ties = fmt.edges.astype(np.float32)
    codes = np.abs(fmt.quantize(ties) - fmt.max_code)
    assert (codes % 2 == 0).all()


def test_saturation_and_flush_to_zero():
    fmt = FloatFormat(2, 1)
    y = np.float32([3.0, 3.4, 1e6, 3e38, -7.0, 0.25, 0.2500001, 1e-30, -0.0, -0.24])
    np.testing.assert_array_equal(
        fmt.grid[fmt.quantize(y)], [3, 3, 3, 3, -3, 0, 0.5, 0, 0, 0]
    )


@pytest.mark.parametrize(("e", "m"), FORMATS)
def test_in_range_error_bounds(e, m):
    fmt = FloatFormat(e, m)
    y = _probe_values(fmt, 7 + e)
    y = y[np.abs(y) <= fmt.max_value]
    error = np.abs(fmt.grid[fmt.quantize(y)] - y.astype(np.float64))
    normal = np.abs(y) >= fmt.min_normal
    assert (error[normal] <= 2.0 ** -(m + 1) * np.abs(y[normal])).all()
    assert (error[~normal] <= fmt.subnormal_step / 2).all()


def test_table_undoes_the_scale_in_float32():
    fmt = FloatFormat(2, 1)
    table = fmt.table(np.float32(4.0))
    assert table.dtype == np.float32
    np.testing.assert_array_equal(table, fmt.grid / 4)


@pytest.mark.parametrize("args", [(0, 1), (6, 1), (2, 6), (5, 3), (1, 0), (2, -1)])
def test_format_rejects_out_of_range_bits(args):
    with pytest.raises(ValueError):
        FloatFormat(*args)


def test_paper_polynomial_values_and_floor():
    assert paper_scale_polynomial(2.0) == pytest.approx(1.76, abs=1e-12)
    assert paper_scale_polynomial(1.0) == pytest.approx(0.65, abs=1e-12)
    betas = np.linspace(0.0, 3.0, 30_001)
    raw = 0.46 - 2.85 * betas + 5.37 * betas**2 - 2.85 * betas**3 + 0.52 * betas**4
    # The reference floor 9e-4 is never reached: P's minimum is about 0.0057 near β = 0.36.
    assert raw.min() > PAPER_SCALE_FLOOR
    assert betas[raw.argmin()] == pytest.approx(0.36, abs=0.01)
    assert [paper_scale_polynomial(b) for b in betas[::1000]] == pytest.approx(raw[::1000].tolist())


@pytest.mark.parametrize("beta", [0.5, 0.8, 1.0, 1.5, 2.0])
def test_mse_rule_agrees_with_the_paper_polynomial_where_it_was_fitted(beta):
    # Two independent derivations of the same optimum (the reference polynomial, and our exact
    # GenNorm integrals) agree to a few percent on fp4 for β in [0.5, 2].
    assert mse_scale(beta, FloatFormat(2, 1)) == pytest.approx(paper_scale_polynomial(beta), rel=0.04)


def test_mse_rule_beats_the_paper_rule_outside_its_fitted_range():
    fmt = FloatFormat(2, 1)
    x = stats.gennorm.rvs(3.0, size=100_000, random_state=np.random.default_rng(0))

    def relative_error(c: float) -> float:
        q = fmt.grid[fmt.quantize((x * c).astype(np.float32))] / c
        return float(np.sum((x - q) ** 2) / np.sum(x**2))

    assert relative_error(mse_scale(3.0, fmt)) < 0.25 * relative_error(paper_scale_polynomial(3.0))


def test_unknown_scale_rule_is_rejected():
    with pytest.raises(ValueError, match="scale rule"):
        scaled_gennorm_scale("median", 1.0, FloatFormat(2, 1))
