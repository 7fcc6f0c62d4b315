"""Compression benchmark: accuracy, uplink bits/param and codec time of every codec on non-IID MNIST.

Every codec trains the same federation through the real ClientApp on an in-process grid
(:mod:`simulations.inprocess_grid`) and the synchronous driver ``pollen run`` uses: the
5,000-image MNIST subset, Dirichlet(0.3) label skew over 20 clients, 10 per round, an MLP
(784-128-128-10, 118k parameters), FedAvg, the same seeds (data split, initial model, cohorts,
local shuffling) and number of rounds for all: 3 seeds × 50 rounds (quick: 1 × 5). Lossy codecs run with error feedback on (classic, λ = 1, for fp16/bf16/top-k/sign; CO3's
decayed memory, λ = ``co3-decay``, for CO3). Reported per codec:

* final test accuracy and its mean over the last 5 rounds (a single run's last round moves by
  about a point from round to round on this non-IID task, so the mean is the steadier figure),
  averaged over seeds, and both as a difference to ``none`` paired by seed (mean and range);
* uplink bits/param: the mean over rounds of the ``bits_per_param`` the strategy computes for
  metrics.jsonl, i.e. 8 × serialized encoded-update bytes (arrays plus codec header, as they
  travel) / (clients × parameters);
* encode and decode time per 10^6 parameters on one core: process CPU time with PyTorch and
  BLAS/OpenMP pools at one thread, median over repeats, on a 1M-parameter update *resampled
  from a real client delta* of the trained ``none`` model (first seed) (each tensor keeps its share of the
  parameters and its empirical value distribution). "Encode" is the client's whole step
  (:meth:`ErrorFeedback.encode`: add the memory, encode, reconstruct, new memory); "decode"
  is the server's :meth:`Codec.decode`.

Goals checked in the table: CO3 at ≤ 2 bits/param with ≤ 1 point accuracy loss against
``none``, and encode + decode of a 1M-parameter update under 50 ms on one core.

Writes ``<out>/compression.json``, ``<out>/compression.md`` and ``<out>/compression.png``
(accuracy against round per codec, and bits/param per codec).
Run ``python -m simulations.bench_compression [--out DIR] [--quick]`` or ``pollen bench compression``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from fedclient.client_app import app as client_app
from fedclient.components import data_spec, federated_data, local_training, new_model
from fedclient.pipeline import client_update
from fedclient.training import as_tensors, evaluate, get_params, seeded_generator, set_params
from fedserver.config import RunConfig, parse_run_config
from simulations.inprocess_grid import InProcessGrid
from strategies.codecs import ErrorFeedback, Params, build_error_feedback, like_of
from strategies.factory import build_codec_for, build_strategy, codec_spec
from strategies.sync_driver import run_sync

NUM_NODES = 20
TASK = {
    "dataset": "mnist", "partitioner": "dirichlet", "dirichlet-alpha": 0.3,
    "model": "mlp", "hidden-size": 128, "clients-per-round": 10,
    "local-epochs": 2, "batch-size": 32, "lr": 0.05, "momentum": 0.9,
    "strategy": "fedavg", "server-lr": 1.0, "device": "cpu",
}
"""The federation every codec trains (run-config keys; the seed varies, see ``SEEDS``)."""

ROUNDS, QUICK_ROUNDS = 50, 5
SEEDS, QUICK_SEEDS = (0, 1, 2), (0,)
TIMING_PARAMS, QUICK_TIMING_PARAMS = 1_000_000, 250_000
TIMING_REPEATS, QUICK_TIMING_REPEATS = 5, 2
LAST = 5
"""Rounds averaged for the steadier accuracy figure."""
BITS_GOAL, ACCURACY_GOAL, TIME_GOAL_MS = 2.0, 0.01, 50.0


@dataclass(frozen=True)
class Variant:
    """One row of the table: a label and the compression keys of the run config."""

    label: str
    config: dict[str, Any]


VARIANTS = (
    Variant("none", {"codec": "none"}),
    Variant("fp16", {"codec": "fp16"}),
    Variant("bf16", {"codec": "bf16"}),
    Variant("topk 1%", {"codec": "topk", "topk-ratio": 0.01}),
    Variant("sign", {"codec": "sign"}),
    Variant("co3 E2M1 (default)", {"codec": "co3"}),
    Variant("co3 E2M0 mse", {"codec": "co3", "co3-mantissa-bits": 0, "co3-scale-rule": "mse"}),
    Variant(
        "co3 E1M1 mse (ternary)",
        {"codec": "co3", "co3-exponent-bits": 1, "co3-mantissa-bits": 1, "co3-scale-rule": "mse"},
    ),
)


def train(variant: Variant, rounds: int, seed: int) -> dict[str, Any]:
    """Train the federation with this codec and seed; one trace point per round."""
    raw = {**TASK, **variant.config, "num-server-rounds": rounds, "seed": seed}
    cfg = parse_run_config(raw)
    grid = InProcessGrid(client_app, NUM_NODES, run_config=raw)
    data = federated_data(data_spec(cfg), NUM_NODES)
    test = data.test_set()
    model = new_model(cfg, data.input_shape, data.num_classes)
    test_x, test_y = as_tensors(test.x, test.y, torch.device("cpu"))
    trace: list[dict[str, float]] = []

    def record(result) -> None:
        set_params(model, result.params)
        loss, accuracy = evaluate(model, test_x, test_y)
        trace.append(
            {
                "round": result.server_round,
                "accuracy": accuracy,
                "loss": loss,
                "bits_per_param": result.stats.bits_per_param,
                "ef_norm": result.stats.client_metrics.get("ef_norm", 0.0),
            }
        )

    started = time.perf_counter()
    final = run_sync(grid, build_strategy(cfg), get_params(model), num_rounds=rounds, on_round=record)
    return {
        "label": variant.label,
        "seed": seed,
        "num_params": int(sum(v.size for v in final.values())),
        "trace": trace,
        "final_params": final,
        "wall_s": time.perf_counter() - started,
    }


def client_delta(cfg: RunConfig, params: Params, server_round: int, client: int = 0) -> Params:
    """Client ``client``'s raw delta in round ``server_round`` from ``params`` (what its codec sees)."""
    data = federated_data(data_spec(cfg), NUM_NODES)
    part = data.partition(client)
    x, y = as_tensors(part.x, part.y, torch.device("cpu"))
    model = new_model(cfg, data.input_shape, data.num_classes)
    generator = seeded_generator(cfg.seed, server_round, client)
    return client_update(model, params, x, y, local_training(cfg), generator).payload


def resample(delta: Params, num_params: int, seed: int = 0) -> Params:
    """A ``num_params``-parameter update with ``delta``'s tensors, shares and value distributions.

    Each tensor gets ``round(share · num_params)`` values (the largest takes the rounding
    remainder) drawn with replacement from that tensor's values.
    """
    rng = np.random.default_rng(seed)
    total = sum(v.size for v in delta.values())
    sizes = {k: round(v.size * num_params / total) for k, v in delta.items()}
    largest = max(delta, key=lambda k: delta[k].size)
    sizes[largest] += num_params - sum(sizes.values())
    return {k: rng.choice(delta[k].ravel(), size=sizes[k]) for k in delta}


def _median_cpu_ms(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return 1e3 * statistics.median(times)


def codec_time(variant: Variant, update: Params, repeats: int) -> dict[str, float]:
    """Client encode (with error feedback where the run has it) and server decode, ms per 1M."""
    cfg = parse_run_config({**TASK, **variant.config})
    codec = build_codec_for(cfg)
    feedback = build_error_feedback(codec_spec(cfg), codec)
    num_params = sum(v.size for v in update.values())
    per_million = 1e6 / num_params
    rng = np.random.default_rng(1)
    memory = {k: (0.1 * rng.permutation(v)).astype(np.float32) for k, v in update.items()}

    def encode() -> tuple:
        if isinstance(feedback, ErrorFeedback):
            return feedback.encode(update, memory, {})
        return codec.encode(update, {})

    payload, header = encode()[:2]
    like = like_of(update)
    with threadpool_limits(limits=1):
        encode_ms = per_million * _median_cpu_ms(encode, repeats)
        decode_ms = per_million * _median_cpu_ms(lambda: codec.decode(payload, header, like), repeats)
    return {"encode_ms": encode_ms, "decode_ms": decode_ms, "codec_ms": encode_ms + decode_ms}


def summarize(runs: list[dict[str, Any]], reference: list[dict[str, Any]]) -> dict[str, Any]:
    """One table row from a codec's runs (one per seed) and ``none``'s runs with the same seeds.

    Accuracy differences are paired by seed, then averaged; their range over seeds is kept.
    """
    final = [r["trace"][-1]["accuracy"] for r in runs]
    last = [statistics.fmean(p["accuracy"] for p in r["trace"][-LAST:]) for r in runs]
    ref_final = [r["trace"][-1]["accuracy"] for r in reference]
    ref_last = [statistics.fmean(p["accuracy"] for p in r["trace"][-LAST:]) for r in reference]
    final_delta = [a - b for a, b in zip(final, ref_final, strict=True)]
    last_delta = [a - b for a, b in zip(last, ref_last, strict=True)]
    per_seed_bits = [statistics.fmean(p["bits_per_param"] for p in r["trace"]) for r in runs]
    return {
        "codec": runs[0]["label"],
        "seeds": [r["seed"] for r in runs],
        "final_accuracy": statistics.fmean(final),
        "accuracy_delta": statistics.fmean(final_delta),
        "accuracy_delta_range": [min(final_delta), max(final_delta)],
        "last5_accuracy": statistics.fmean(last),
        "last5_delta": statistics.fmean(last_delta),
        "last5_delta_range": [min(last_delta), max(last_delta)],
        "bits_per_param": statistics.fmean(per_seed_bits),
        "bits_per_param_range": [min(per_seed_bits), max(per_seed_bits)],
        "wall_s": sum(r["wall_s"] for r in runs),
    }


def goals(row: dict[str, Any]) -> dict[str, bool]:
    """Whether a row meets the bits/param + accuracy goal and the time goal."""
    return {
        "bits_and_accuracy": row["bits_per_param"] <= BITS_GOAL
        and -row["accuracy_delta"] <= ACCURACY_GOAL
        and -row["last5_delta"] <= ACCURACY_GOAL,
        "time": row["codec_ms"] < TIME_GOAL_MS,
    }


def _delta_text(mean: float, bounds: list[float]) -> str:
    """A paired accuracy difference in points, with its range over seeds when there are several."""
    low, high = bounds
    if low == high:
        return f"{100 * mean:+.1f}"
    return f"{100 * mean:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}]"


def _bits_text(mean: float, bounds: list[float]) -> str:
    """Mean bits/param, with the range of the per-seed means when they differ."""
    low, high = bounds
    if round(low, 2) == round(high, 2):
        return f"{mean:.3f}"
    return f"{mean:.3f} [{low:.2f}, {high:.2f}]"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    header = (
        "| codec | final acc | Δ final (pt) | last-5 acc | Δ last-5 (pt) | uplink bits/param "
        "| encode ms/1M | decode ms/1M | enc+dec ms/1M |"
    )
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['codec']} | {r['final_accuracy']:.4f} "
            f"| {_delta_text(r['accuracy_delta'], r['accuracy_delta_range'])} "
            f"| {r['last5_accuracy']:.4f} | {_delta_text(r['last5_delta'], r['last5_delta_range'])} "
            f"| {_bits_text(r['bits_per_param'], r['bits_per_param_range'])} | {r['encode_ms']:.1f} | {r['decode_ms']:.1f} "
            f"| {r['codec_ms']:.1f} |"
        )
    return "\n".join(lines)


def goal_lines(rows: list[dict[str, Any]]) -> list[str]:
    co3 = [r for r in rows if r["codec"].startswith("co3")]
    meeting = [r["codec"] for r in co3 if r["goals"]["bits_and_accuracy"]]
    over = [r["codec"] for r in co3 if r["bits_per_param_range"][1] > BITS_GOAL]
    slow = [f"{r['codec']} ({r['codec_ms']:.0f} ms)" for r in rows if not r["goals"]["time"]]
    return [
        f"- CO3 at ≤ {BITS_GOAL:g} bits/param (mean over seeds) with ≤ {100 * ACCURACY_GOAL:g} "
        f"point accuracy loss (mean paired Δ of the final and of the last-{LAST} accuracy): "
        + (f"met by {', '.join(meeting)}." if meeting else "not met by any CO3 setting.")
        + (f" Above {BITS_GOAL:g} bits/param in some seed: {', '.join(over)}." if over else ""),
        f"- Encode + decode of 1M parameters under {TIME_GOAL_MS:g} ms on one core: "
        + (f"not met by {', '.join(slow)}." if slow else "met by every codec."),
    ]


def mean_curve(runs: list[dict[str, Any]]) -> tuple[list[int], list[float]]:
    """Test accuracy per round, averaged over a codec's seeds."""
    rounds = [p["round"] for p in runs[0]["trace"]]
    accuracy = [statistics.fmean(r["trace"][i]["accuracy"] for r in runs) for i in range(len(rounds))]
    return rounds, accuracy


def plot(
    curves: dict[str, tuple[list[int], list[float]]], rows: list[dict[str, Any]], path: Path, title: str
) -> Path:
    """Accuracy against round per codec (left) and uplink bits/param per codec (right, log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.6), gridspec_kw={"width_ratios": [3, 2]})
    for label, (rounds, accuracy) in curves.items():
        left.plot(rounds, accuracy, label=label, lw=1.3, ls="-" if label.startswith("co3") else "--")
    left.set_xlabel("round")
    left.set_ylabel("test accuracy (mean over seeds)")
    floor = min(a for _, accuracy in curves.values() for a in accuracy[len(accuracy) // 5 :])
    left.set_ylim(bottom=max(0.0, floor - 0.02))
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    labels = [r["codec"] for r in rows]
    bits = [r["bits_per_param"] for r in rows]
    bars = right.bar(range(len(rows)), bits, color="tab:blue")
    right.bar_label(bars, labels=[f"{b:.2f}" for b in bits], fontsize=7)
    right.axhline(BITS_GOAL, color="grey", ls="--", lw=0.8)
    right.set_yscale("log")
    right.set_xticks(range(len(rows)), labels, rotation=35, ha="right", fontsize=8)
    right.set_ylabel("uplink bits / parameter (log)")
    right.grid(alpha=0.3, axis="y")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(out_dir: Path, quick: bool = False) -> dict[str, Any]:
    """Train with every codec and seed, time every codec; write JSON, Markdown and plot to ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)  # a small MLP: threads only add overhead, and timings are 1-core
    rounds = QUICK_ROUNDS if quick else ROUNDS
    seeds = QUICK_SEEDS if quick else SEEDS
    timing_params = QUICK_TIMING_PARAMS if quick else TIMING_PARAMS
    repeats = QUICK_TIMING_REPEATS if quick else TIMING_REPEATS
    runs: dict[str, list[dict[str, Any]]] = {}
    for variant in VARIANTS:
        runs[variant.label] = [train(variant, rounds, seed) for seed in seeds]
        final = [r["trace"][-1]["accuracy"] for r in runs[variant.label]]
        wall = sum(r["wall_s"] for r in runs[variant.label])
        print(f"{variant.label}: final accuracy {final}, {wall:.0f} s", flush=True)
    reference = runs[VARIANTS[0].label]
    cfg = parse_run_config({**TASK, **VARIANTS[0].config, "seed": seeds[0]})
    delta = client_delta(cfg, reference[0]["final_params"], rounds + 1)
    update = resample(delta, timing_params)
    rows = []
    for variant in VARIANTS:
        row = {**summarize(runs[variant.label], reference), **codec_time(variant, update, repeats)}
        row["goals"] = goals(row)
        rows.append(row)
    none_final = [r["trace"][-1]["accuracy"] for r in reference]
    title = (
        f"MNIST (5k) Dirichlet 0.3, {NUM_NODES} clients, {TASK['clients-per-round']}/round, "
        f"MLP ({reference[0]['num_params']:,} params), FedAvg, {rounds} rounds, "
        f"seeds {', '.join(map(str, seeds))}"
    )
    accuracy_note = (
        "Accuracies are means over seeds; Δ is paired by seed against none, in points, "
        "[range over seeds]. none's final accuracy per seed: "
        f"{', '.join(f'{a:.4f}' for a in none_final)}."
    )
    timing_note = (
        f"Times: CPU ms per 10^6 parameters, one thread, median of {repeats}, on a "
        f"{timing_params:,}-parameter update resampled from a real client delta; encode includes "
        "error feedback."
    )
    table = markdown_table(rows)
    lines = goal_lines(rows)
    markdown = "\n".join([f"{title}.", "", table, "", *lines, "", accuracy_note, timing_note])
    print(markdown, flush=True)
    report = {
        "quick": quick,
        "task": {**TASK, "num_nodes": NUM_NODES, "rounds": rounds, "seeds": list(seeds)},
        "timing": {"num_params": timing_params, "repeats": repeats},
        "summary": rows,
        "goals": lines,
        "runs": [
            {k: v for k, v in r.items() if k != "final_params"} for rs in runs.values() for r in rs
        ],
    }
    (out_dir / "compression.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "compression.md").write_text(markdown + "\n")
    curves = {label: mean_curve(label_runs) for label, label_runs in runs.items()}
    plot(curves, rows, out_dir / "compression.png", title)
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench-results/compression"))
    parser.add_argument("--quick", action="store_true", help="a short budget (about a minute)")
    args = parser.parse_args(argv)
    run(args.out, quick=args.quick)
    print(f"wrote {args.out / 'compression.md'}, .json and .png")


if __name__ == "__main__":
    main()
