"""Codec benchmark: bits per parameter, encode/decode time and error of every Pollen codec.

Inputs are synthetic updates whose tensors follow GenNorm(β ≈ 1) (Laplace-like, as CO3
assumes for gradients) with very different scales per tensor, shaped like a small CNN. Each
codec encodes and decodes the same update; the rows report

* ``bits_per_param``: 8 · (payload bytes) / d — everything that travels as arrays,
  including CO3's per-tensor ``(s, β, c)`` rows and top-k's indices (header scalars, a few
  dozen bytes, are not counted);
* ``encode_ms`` / ``decode_ms`` per 10^6 parameters: median over ``repeats`` of the
  process's CPU time (``time.process_time``) with BLAS/OpenMP pools limited to one thread,
  i.e. single-core cost, which other load on a shared machine barely inflates;
  ``client_ms`` is what a client runs with error feedback (``ErrorFeedback.encode``);
* ``rel_l2_error``: ‖decode(encode(x)) − x‖ / ‖x‖ of one step (no error feedback).

Baselines for CO3's lossless stage, on the same fp4 symbols: raw 4-bit packing (no entropy
coding), zlib and lzma (standard library; zstd is not a dependency) on one byte per symbol,
and the symbols' empirical entropy (the bound a static per-tensor model could reach).

A second table compares CO3's scale rules (the reference code's ``P(β)`` and the MSE-optimal
scale) on single-tensor GenNorm samples with β from 0.3 to 3.

Run ``python -m simulations.bench_codecs [--out DIR] [--num-params N] [--repeats R]``.
"""

from __future__ import annotations

import argparse
import json
import lzma
import statistics
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from scipy import stats
from threadpoolctl import threadpool_limits

from strategies.codecs import (
    Co3Codec,
    Codec,
    CodecSpec,
    ErrorFeedback,
    Params,
    build_codec,
    like_of,
    payload_nbytes,
)
from strategies.codecs.co3_format import FloatFormat

# A small CNN's tensors, as fractions of the total; "fc1.weight" takes the rest.
_LAYOUT = {
    "conv1.weight": 8e-4,
    "conv1.bias": 3.2e-5,
    "conv2.weight": 5.12e-2,
    "conv2.bias": 6.4e-5,
    "fc1.bias": 1.28e-4,
    "fc2.weight": 1.28e-3,
    "fc2.bias": 1e-5,
}


def synthetic_update(num_params: int, beta: float = 1.0, seed: int = 0) -> Params:
    """A GenNorm update shaped like a small CNN: β jittered ±20% and scale 1e-4…1e-2 per tensor."""
    rng = np.random.default_rng(seed)
    sizes = {name: max(1, round(fraction * num_params)) for name, fraction in _LAYOUT.items()}
    sizes["fc1.weight"] = num_params - sum(sizes.values())
    if sizes["fc1.weight"] < 1:
        raise ValueError(f"num_params must be at least {sum(sizes.values()) + 1}, got {num_params}")
    update = {}
    for name in sorted(sizes):
        tensor_beta = beta * rng.uniform(0.8, 1.2)
        scale = 10.0 ** rng.uniform(-4, -2)
        update[name] = stats.gennorm.rvs(
            tensor_beta, scale=scale, size=sizes[name], random_state=rng
        ).astype(np.float32)
    return update


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return 1e3 * statistics.median(times)


def _relative_error(decoded: Params, update: Params) -> float:
    error = sum(np.sum((decoded[k].astype(np.float64) - update[k]) ** 2) for k in update)
    norm = sum(np.sum(update[k].astype(np.float64) ** 2) for k in update)
    return float(np.sqrt(error / norm))


def _codec_row(label: str, codec: Codec, update: Params, repeats: int, decay: float) -> dict:
    num_params = sum(v.size for v in update.values())
    per_million = 1e6 / num_params
    like = like_of(update)
    payload, header, _ = codec.encode(update, {})
    decoded = codec.decode(payload, header, like)
    row = {
        "codec": label,
        "bits_per_param": 8 * payload_nbytes(payload) / num_params,
        "encode_ms": per_million * _median_ms(lambda: codec.encode(update, {}), repeats),
        "decode_ms": per_million * _median_ms(lambda: codec.decode(payload, header, like), repeats),
        "rel_l2_error": _relative_error(decoded, update),
    }
    if not codec.lossless:
        feedback = ErrorFeedback(codec, decay)
        memory = {k: np.zeros_like(v) for k, v in update.items()}
        row["client_ms"] = per_million * _median_ms(
            lambda: feedback.encode(update, memory, {}), repeats
        )
    return row


def _fp4_symbols(update: Params) -> list[np.ndarray]:
    """CO3's fp4 symbols of each tensor, as its encoder produces them."""
    codec = Co3Codec()
    payload, _, _ = codec.encode(update, {})
    return [
        codec.format.quantize(update[name].ravel() * row[0])
        for name, row in zip(sorted(update), payload["tensor_params"], strict=True)
        if row[0] != 0
    ]


def _lossless_baselines(update: Params, repeats: int) -> list[dict]:
    num_params = sum(v.size for v in update.values())
    per_million = 1e6 / num_params
    symbols = _fp4_symbols(update)
    as_bytes = np.concatenate(symbols).astype(np.uint8).tobytes()
    entropy_bits = 0.0
    for tensor_symbols in symbols:
        counts = np.bincount(tensor_symbols)
        p = counts[counts > 0] / tensor_symbols.size
        entropy_bits -= tensor_symbols.size * float(np.sum(p * np.log2(p)))
    rows = [
        {"codec": "fp4 raw (4-bit packed)", "bits_per_param": 4.0},
        {"codec": "fp4 symbol entropy (bound)", "bits_per_param": entropy_bits / num_params},
    ]
    for label, compress, decompress in (
        ("fp4 + zlib-9", lambda b: zlib.compress(b, 9), zlib.decompress),
        ("fp4 + lzma", lzma.compress, lzma.decompress),
    ):
        compressed = compress(as_bytes)
        assert decompress(compressed) == as_bytes
        rows.append({
            "codec": label,
            "bits_per_param": 8 * len(compressed) / num_params,
            "encode_ms": per_million * _median_ms(lambda c=compress: c(as_bytes), repeats),
            "decode_ms": per_million * _median_ms(lambda d=decompress, c=compressed: d(c), repeats),
        })
    return rows


def _scale_rule_rows(num_samples: int) -> list[dict]:
    """CO3 fp4 with the paper's P(β) rule vs the MSE-optimal scale, per GenNorm shape."""
    rows = []
    for beta in (0.3, 0.5, 1.0, 2.0, 3.0):
        x = stats.gennorm.rvs(
            beta, scale=1e-3, size=num_samples, random_state=np.random.default_rng(1)
        ).astype(np.float32)
        update = {"w": x}
        row: dict = {"beta": beta}
        for rule in ("paper", "mse"):
            codec = Co3Codec(scale_rule=rule)
            payload, header, _ = codec.encode(update, {})
            decoded = codec.decode(payload, header, like_of(update))
            row[f"{rule}_bits_per_param"] = 8 * payload_nbytes(payload) / num_samples
            row[f"{rule}_rel_l2_error"] = _relative_error(decoded, update)
        rows.append(row)
    return rows


def run(
    out_dir: Path, quick: bool = False, num_params: int = 1_000_000, repeats: int | None = None
) -> dict:
    """Benchmark every codec on one synthetic update; print tables, write ``bench_codecs.json``.

    ``quick`` times 2 repeats instead of 5. Returns the results dict (also written to
    ``out_dir / "bench_codecs.json"``).
    """
    repeats = repeats if repeats is not None else (2 if quick else 5)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    update = synthetic_update(num_params)
    configurations = [
        ("none", CodecSpec(name="none")),
        ("fp16", CodecSpec(name="fp16")),
        ("bf16", CodecSpec(name="bf16")),
        ("topk 1%", CodecSpec(name="topk", topk_ratio=0.01)),
        ("sign", CodecSpec(name="sign")),
        ("co3 fp4 (paper rule)", CodecSpec(name="co3")),
        ("co3 fp4 (mse rule)", CodecSpec(name="co3", co3_scale_rule="mse")),
        ("co3 fp8 e5m2", CodecSpec(name="co3", co3_exponent_bits=5, co3_mantissa_bits=2)),
    ]
    with threadpool_limits(limits=1):
        rows = []
        for label, spec in configurations:
            decay = spec.co3_decay if spec.name == "co3" else spec.ef_decay
            rows.append(_codec_row(label, build_codec(spec), update, repeats, decay))
        rows += _lossless_baselines(update, repeats)
        scale_rules = _scale_rule_rows(min(num_params, 200_000))
    results = {
        "num_params": num_params,
        "repeats": repeats,
        "input": "GenNorm(β≈1 ±20% per tensor), per-tensor scales 1e-4…1e-2, 8 tensors",
        "format": FloatFormat(2, 1).grid.tolist(),
        "codecs": rows,
        "scale_rules": scale_rules,
    }
    (out_dir / "bench_codecs.json").write_text(json.dumps(results, indent=2))
    print(_table(rows, ["codec", "bits_per_param", "encode_ms", "decode_ms", "client_ms", "rel_l2_error"]))
    print()
    print(_table(scale_rules, list(scale_rules[0])))
    return results


def _table(rows: list[dict], columns: list[str]) -> str:
    def cell(value) -> str:
        if value is None:
            return "-"
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    cells = [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    parser.add_argument("--num-params", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    run(args.out, args.num_params, args.repeats)


if __name__ == "__main__":
    main()
