"""Privacy benchmark: test accuracy against ε for DP clipping vs DP normalization (central DP).

Task: the 5,000-image MNIST subset over a simulated population of 1,000 clients (4 training
images each, from two label-sorted shards: at most two digits per client), softmax regression,
FedAvg with a few local full-batch steps. Two clip norms: C = 0.5, about the median raw update
norm (about half the updates are clipped), and C = 1.5, above nearly all of them (clipping then
rarely changes an update, while normalization still rescales every one to C). Every run trains
through the real ClientApp on the in-process grid (:mod:`simulations.inprocess_grid`) and the
same :class:`~strategies.strategy.PollenStrategy` + :class:`~strategies.private_aggregation.
PrivateAggregation` that ``pollen run`` uses (``dp=clip`` or ``dp=normalize``).

**Production calibration.** A real deployment samples a cohort of m_prod clients per round
from N_prod clients; the simulation can afford only m_sim < m_prod clients per round from its
1,000. The noise is set for the production cohort:

* ε is computed for the production run: Poisson sampling at q_prod = m_prod / N_prod, noise
  multiplier z, T rounds, δ_prod (RDP accountant), and z is the smallest multiplier that meets
  each target ε (:func:`privacy.budget.plan_noise_multiplier`);
* the released average of the m_sim simulated (bounded) updates gets Gaussian noise of std
  z·C/m_prod per coordinate — the std the average of m_prod updates would get. The run does this
  by giving the unchanged DP stage the multiplier z_sim = z·m_sim/m_prod (its noise std on the
  average is z_sim·C/m_sim = z·C/m_prod); the bench checks the std it reports.

What this does not simulate: the average of m_sim updates has more sampling variance than an
average of m_prod updates would, so accuracy here is, if anything, pessimistic. The simulation's
own ledger (q_sim = m_sim/1000, z_sim) would give a far larger ε; it is listed in the JSON as
``epsilon_if_deployed_as_simulated`` to make plain that the headline ε is the production one.

Written to ``<out>/privacy.json``, ``privacy.md`` and ``privacy.png`` (final accuracy against ε,
log scale, one line per mode, with the non-private FedAvg and the noiseless clip/normalize runs
as references). Run ``python -m simulations.bench_privacy [--out DIR] [--quick]`` or
``pollen bench privacy``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedclient.client_app import app as client_app
from fedclient.components import data_spec, federated_data, new_model
from fedclient.training import as_tensors, evaluate, get_params, set_params
from fedserver.config import parse_run_config
from privacy.budget import epsilon_for, plan_noise_multiplier
from simulations.inprocess_grid import InProcessGrid
from strategies.factory import build_strategy
from strategies.sync_driver import run_sync

MODES = ("clip", "normalize")


@dataclass(frozen=True)
class Production:
    """The deployment whose privacy the simulated runs are calibrated to."""

    population: int = 100_000  # N_prod
    cohort: int = 100  # m_prod, expected clients per round
    delta: float = 1e-6  # ≤ 1/N_prod
    accountant: str = "rdp"

    @property
    def sample_rate(self) -> float:
        return self.cohort / self.population


@dataclass(frozen=True)
class Simulation:
    """The simulated federation and its training settings."""

    population: int = 1_000  # clients (partitions) in the in-process grid
    cohort: int = 20  # m_sim, expected clients per round (Poisson)
    rounds: int = 40
    quick_rounds: int = 12
    clips: tuple[float, ...] = (0.5, 1.5)  # C: about the median raw update norm, and 3x it
    config: tuple[tuple[str, Any], ...] = (
        ("dataset", "mnist"), ("partitioner", "shards"), ("shards-per-client", 2),
        ("model", "logreg"),
        ("local-steps", 4), ("batch-size", 32), ("lr", 0.1), ("momentum", 0.0),
        ("strategy", "fedavg"), ("server-lr", 1.0),
    )


EPSILONS = (0.25, 1.0, 4.0)
QUICK_EPSILONS = (0.25,)
FINAL_WINDOW = 5  # final accuracy = mean over the last rounds (noise makes single rounds jumpy)


def noise_multipliers(epsilon: float, production: Production, rounds: int, sim: Simulation):
    """(z for the production run at this ε, z_sim for the simulated cohort); ε = ∞ → (0, 0)."""
    if math.isinf(epsilon):
        return 0.0, 0.0
    z = plan_noise_multiplier(
        epsilon, production.delta, production.sample_rate, rounds,
        accountant=production.accountant, rtol=1e-4,
    )
    return z, z * sim.cohort / production.cohort


def run_one(
    mode: str,
    epsilon: float,
    clip: float,
    rounds: int,
    sim: Simulation,
    production: Production,
    seed: int = 0,
) -> dict[str, Any]:
    """Train one configuration; ``mode='off'`` is non-private FedAvg (ε, C are then ``None``)."""
    raw: dict[str, Any] = {
        "device": "cpu", "seed": seed, "num-server-rounds": rounds,
        "clients-per-round": sim.cohort, **dict(sim.config),
    }
    z = z_sim = 0.0
    if mode != "off":
        z, z_sim = noise_multipliers(epsilon, production, rounds, sim)
        raw.update({
            "dp": mode, "dp-clip": clip, "dp-noise-multiplier": z_sim,
            "dp-sampling": "poisson", "dp-delta": production.delta,
        })
    cfg = parse_run_config(raw)
    grid = InProcessGrid(client_app, sim.population, run_config=raw)
    data = federated_data(data_spec(cfg), sim.population)
    test = data.test_set()
    model = new_model(cfg, data.input_shape, data.num_classes)
    test_x, test_y = as_tensors(test.x, test.y, torch.device("cpu"))
    strategy = build_strategy(cfg)
    accuracies: list[float] = []
    noise_stds: list[float] = []

    def record(result) -> None:
        set_params(model, result.params)
        accuracies.append(evaluate(model, test_x, test_y)[1])
        if mode != "off":
            noise_stds.append(result.stats.privacy_metrics["dp_noise_std"])

    started = time.perf_counter()
    run_sync(grid, strategy, get_params(model), num_rounds=rounds, on_round=record)
    wall = time.perf_counter() - started
    expected_std = z * clip / production.cohort
    if noise_stds and not np.allclose(noise_stds, expected_std, rtol=1e-9, atol=0):
        raise AssertionError(
            f"released noise std {noise_stds[0]:.6g} differs from z·C/m_prod = {expected_std:.6g}"
        )
    simulated_epsilon = (
        epsilon_for(z_sim, sim.cohort / sim.population, rounds, production.delta)
        if mode != "off" and z_sim > 0 else None
    )
    return {
        "mode": mode,
        "epsilon": None if mode == "off" else epsilon,
        "clip": None if mode == "off" else clip,
        "noise_multiplier": z,
        "simulated_noise_multiplier": z_sim,
        "noise_std_on_average": expected_std,
        "epsilon_if_deployed_as_simulated": simulated_epsilon,
        "final_accuracy": float(np.mean(accuracies[-FINAL_WINDOW:])),
        "last_accuracy": accuracies[-1],
        "accuracy": accuracies,
        "rounds": rounds,
        "seed": seed,
        "wall_s": wall,
    }


def _epsilon_text(epsilon: float | None) -> str:
    if epsilon is None:
        return "— (no DP)"
    return "∞ (z = 0)" if math.isinf(epsilon) else f"{epsilon:g}"


def markdown(results: list[dict[str, Any]], sim: Simulation, production: Production) -> str:
    rounds = results[0]["rounds"]
    lines = [
        "# Accuracy against ε: DP clipping vs DP normalization",
        "",
        (
            f"MNIST (5,000-image subset) over {sim.population:,} simulated clients (two "
            f"label-sorted shards each), softmax regression, FedAvg, {rounds} rounds, "
            f"{sim.cohort} clients per simulated round; final accuracy = mean test accuracy of "
            f"the last {FINAL_WINDOW} rounds."
        ),
        "",
        (
            f"**Noise calibrated for a production cohort.** ε is for a deployment of N = "
            f"{production.population:,} clients with m = {production.cohort} per round (Poisson, "
            f"q = {production.sample_rate:g}), {rounds} rounds, δ = {production.delta:g}, "
            f"{production.accountant.upper()} accountant. The simulation samples only "
            f"{sim.cohort} of its {sim.population:,} clients per round; the average of their "
            f"bounded updates gets noise of std z·C/{production.cohort} per coordinate, the std "
            f"an average of {production.cohort} updates would get (the DP stage runs with z_sim = "
            f"z·{sim.cohort}/{production.cohort}). The simulated run's own ε would be far larger; "
            "it is not the claim here."
        ),
        "",
        "| mode | C | ε | z (production) | noise std on the average | final accuracy | wall s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        clip = "—" if r["clip"] is None else f"{r['clip']:g}"
        lines.append(
            f"| {r['mode']} | {clip} | {_epsilon_text(r['epsilon'])} | {r['noise_multiplier']:.3f} "
            f"| {r['noise_std_on_average']:.2e} | {r['final_accuracy']:.4f} | {r['wall_s']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def plot(results: list[dict[str, Any]], clips: tuple[float, ...], path: Path) -> Path:
    """Final accuracy against ε, one panel per C; ε = ∞ and no-DP FedAvg as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(clips), figsize=(5.5 * len(clips), 4.2), squeeze=False)
    baseline = next(r["final_accuracy"] for r in results if r["mode"] == "off")
    for ax, clip in zip(axes[0], clips):
        runs = [r for r in results if r["clip"] == clip]
        for mode, color in zip(MODES, ("tab:blue", "tab:orange")):
            finite = sorted(
                (r["epsilon"], r["final_accuracy"])
                for r in runs if r["mode"] == mode and not math.isinf(r["epsilon"])
            )
            if finite:
                ax.plot(*zip(*finite), marker="o", color=color, label=f"{mode}, noised")
            for r in runs:
                if r["mode"] == mode and math.isinf(r["epsilon"]):
                    ax.axhline(r["final_accuracy"], color=color, ls=":", lw=1,
                               label=f"{mode}, no noise (ε = ∞)")
        ax.axhline(baseline, color="grey", ls="--", lw=1, label="FedAvg, no DP")
        ax.set_xscale("log")
        ticks = sorted({r["epsilon"] for r in runs if not math.isinf(r["epsilon"])})
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("ε (production cohort)")
        ax.set_ylabel("final test accuracy")
        ax.set_title(f"C = {clip:g}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle("MNIST over 1,000 non-IID clients: DP clipping vs normalization")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _jsonable(value: Any) -> Any:
    """Strict JSON: ε = ∞ as the string ``"inf"``."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return value


def run(out_dir: Path, quick: bool = False) -> dict[str, Any]:
    """Run every (mode, ε) and the references; write JSON, Markdown and the plot to ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only add overhead on a shared machine
    absl = logging.getLogger("absl")
    absl_level = absl.level
    absl.setLevel(logging.ERROR)  # dp_accounting's per-order convergence notes
    sim, production = Simulation(), Production()
    rounds = sim.quick_rounds if quick else sim.rounds
    epsilons = (QUICK_EPSILONS if quick else EPSILONS) + (math.inf,)
    try:
        results = [run_one("off", math.inf, 0.0, rounds, sim, production)]
        for clip in sim.clips:
            for mode in MODES:
                for epsilon in epsilons:
                    results.append(run_one(mode, epsilon, clip, rounds, sim, production))
                    r = results[-1]
                    print(
                        f"  C={clip:g} {mode:9s} ε={_epsilon_text(epsilon):10s} "
                        f"z={r['noise_multiplier']:.3f} acc={r['final_accuracy']:.4f} "
                        f"({r['wall_s']:.0f} s)",
                        flush=True,
                    )
    finally:
        torch.set_num_threads(threads)
        absl.setLevel(absl_level)
    report = {
        "task": "mnist-shards-1000-clients-logreg",
        "quick": quick,
        "simulation": asdict(sim) | {"config": dict(sim.config)},
        "production": asdict(production) | {"sample_rate": production.sample_rate},
        "final_window": FINAL_WINDOW,
        "results": results,
    }
    (out_dir / "privacy.json").write_text(json.dumps(_jsonable(report), indent=2) + "\n")
    table = markdown(results, sim, production)
    (out_dir / "privacy.md").write_text(table)
    plot(results, sim.clips, out_dir / "privacy.png")
    print(table)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench-results/privacy")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    run(Path(args.out), quick=args.quick)


if __name__ == "__main__":
    main()
