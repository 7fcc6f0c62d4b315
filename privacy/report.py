"""Privacy report of a run: ε recomputed from the ledger, parameters, assumptions, utility, ε curve.

:func:`write_report` reads ``run_dir/privacy/ledger.jsonl`` and, if present,
``run_dir/config.json`` (``dp-delta``, ``dp-accountant``, ``dp-target-epsilon``) and
``run_dir/metrics.jsonl`` (final accuracy); it writes ``run_dir/privacy/report.json``,
``report.md`` and ``epsilon.png``.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

from matplotlib.figure import Figure

from privacy.accountants.registry import ACCOUNTANTS
from privacy.events import RoundRelease
from privacy.ledger import LEDGER_PATH, PrivacyLedger
from privacy.mechanisms import DpSpec

#: Metric names accepted as "final utility", in order of preference.
UTILITY_KEYS = (
    "accuracy",
    "eval_accuracy",
    "test_accuracy",
    "centralized_accuracy",
    "server_accuracy",
    "val_accuracy",
)

ACCOUNTANT_DESCRIPTIONS = {
    "rdp": "Rényi DP of the sampled Gaussian (dp_accounting.rdp; an upper bound)",
    "prv": "privacy loss distribution / PRV (dp_accounting.pld; near-tight, pessimistic)",
}


def _config_value(config: dict, key: str):
    """``key`` (kebab- or snake-case) at the top level of ``config`` or one level down."""
    names = (key, key.replace("-", "_"))
    scopes = [config] + [value for value in config.values() if isinstance(value, dict)]
    for scope in scopes:
        for name in names:
            if name in scope:
                return scope[name]
    return None


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _read_jsonl(path: Path) -> list[dict]:
    """Complete JSON lines of ``path`` (a torn last line from a killed writer is skipped)."""
    if not path.exists():
        return []
    complete, _, _ = path.read_bytes().rpartition(b"\n")
    return [json.loads(line) for line in complete.split(b"\n") if line.strip()]


def final_utility(records: list[dict]) -> dict | None:
    """Last record's accuracy-like metric: ``{"metric", "value", "round"}`` or ``None``."""
    for record in reversed(records):
        scopes = [record] + [value for value in record.values() if isinstance(value, dict)]
        for key in UTILITY_KEYS:
            for scope in scopes:
                if isinstance(scope.get(key), (int, float)):
                    return {
                        "metric": key,
                        "value": float(scope[key]),
                        "round": record.get("round", record.get("server_round")),
                    }
    return None


def _summary(values: list[float]):
    """A single value if constant, else ``{"min", "max", "first", "last"}``."""
    if len(set(values)) == 1:
        return values[0]
    return {"min": min(values), "max": max(values), "first": values[0], "last": values[-1]}


def participation(releases: list[RoundRelease]) -> dict | None:
    """Per-client participation counts over the releases that recorded participants."""
    recorded = [r for r in releases if r.participants]
    if not recorded:
        return None
    counts = Counter(client for r in recorded for client in r.participants)
    population = max(r.population for r in recorded)
    return {
        "rounds_recorded": len(recorded),
        "clients_participated": len(counts),
        "clients_never_participated": max(0, population - len(counts)),
        "min_rounds_per_client": min(counts.values()),
        "max_rounds_per_client": max(counts.values()),
        "mean_rounds_per_participating_client": sum(counts.values()) / len(counts),
        "per_client": {str(client): counts[client] for client in sorted(counts)},
    }


def _assumptions(report: dict) -> list[str]:
    sampling, where = report["sampling"], report["where"]
    population = report["population"]
    notes = []
    if where == "server":
        notes.append(
            "Trusted server: it sees raw client updates, clips or normalizes them and adds the "
            "noise. The guarantee covers everything released from the noised aggregate (models, "
            "metrics computed from them) against clients and outside observers, not against the "
            "server itself."
        )
    else:
        notes.append(
            "Client-side clipping: clients bound their own update and the server rejects any "
            "update longer than C. The server still adds the noise, so it must be trusted to do "
            "so; it sees individual clipped updates unless secure aggregation hides them."
        )
    if sampling == "poisson":
        notes.append(
            "Poisson sampling: every client joined each round independently with probability q, "
            "using randomness hidden from the adversary. Adjacency is add-or-remove one client "
            "(all of its data). The average divides by the fixed expected cohort size m = q·N, so "
            "its sensitivity is C/m whatever the number of replies."
        )
    else:
        notes.append(
            "Fixed-size sampling: exactly m of N clients per round, uniformly without replacement, "
            "with randomness hidden from the adversary; N is public. Adjacency is replace one "
            "client, under which the sum's sensitivity is 2C; ε is not comparable with a Poisson "
            "run's ε at the same noise."
        )
    notes.append(
        "Sampled clients that do not reply are assumed to drop out independently of their data; "
        "their missing updates count as zero in the fixed-denominator average."
    )
    if isinstance(report["clip"], dict):
        notes.append(
            "Adaptive clipping: C followed noised unclipped counts (Andrew et al. 2021). The count "
            "queries are included in ε: the update noise used z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2), so "
            "each round is worth multiplier z."
        )
    if population and report["delta"] > 1 / population:
        notes.append(
            f"Warning: δ = {report['delta']:g} exceeds 1/N = {1 / population:.3g}; a mechanism "
            "that publishes one random client's data outright would meet such a δ. Prefer δ ≤ 1/N."
        )
    notes.append(
        "Only the noised model updates are accounted. Anything else clients send in the clear "
        "(e.g. training metrics) is outside this guarantee."
    )
    return notes


def _cell(value) -> str:
    """A report value as a short table cell (4 significant digits, dicts as ``k v`` pairs)."""
    if isinstance(value, dict):
        return ", ".join(f"{key} {_cell(item)}" for key, item in value.items())
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _markdown(report: dict, run_dir: Path) -> str:
    epsilon = report["epsilon"]
    lines = [
        f"# Privacy report: {run_dir.name}",
        "",
        (
            f"**Guarantee.** After {report['rounds']} rounds the released models are (ε = "
            f"{epsilon:.4g}, δ = {report['delta']:g})-differentially private with respect to "
            f"**{report['adjacency']}** (user-level DP), by the {report['accountant']} accountant: "
            f"{ACCOUNTANT_DESCRIPTIONS[report['accountant']]}. ε is recomputed from the events in "
            "`privacy/ledger.jsonl`."
        ),
        "",
        "| quantity | value |",
        "|---|---|",
    ]
    for key in (
        "mode",
        "where",
        "sampling",
        "population",
        "sample_rate",
        "expected_cohort_size",
        "cohort_size",
        "noise_multiplier",
        "clip",
        "rounds",
        "delta",
    ):
        lines.append(f"| {key} | {_cell(report[key])} |")
    for name, value in report["epsilon_by_accountant"].items():
        lines.append(f"| ε ({name}) | {value:.4g} |")
    if report["target_epsilon"]:
        lines.append(f"| target ε | {report['target_epsilon']:g} |")
    utility = report["final_utility"]
    if utility:
        lines.append(
            f"| final {utility['metric']} | {utility['value']:.4g} (round {utility['round']}) |"
        )
    if report["participation"]:
        p = report["participation"]
        lines.append(
            f"| participation | {p['clients_participated']} clients took part, "
            f"{p['min_rounds_per_client']}–{p['max_rounds_per_client']} rounds each |"
        )
    lines += ["", "## Assumptions", ""] + [f"- {note}" for note in report["assumptions"]]
    lines += ["", "## ε per round", "", "![epsilon per round](epsilon.png)", ""]
    return "\n".join(lines)


def _plot(report: dict, path: Path) -> None:
    figure = Figure(figsize=(6, 4))
    axes = figure.subplots()
    rounds = [point[0] for point in report["epsilon_per_round"]]
    epsilons = [point[1] for point in report["epsilon_per_round"]]
    axes.plot(
        rounds,
        epsilons,
        marker="." if len(rounds) <= 50 else None,
        label=f"ε ({report['accountant']})",
    )
    if report["target_epsilon"]:
        axes.axhline(report["target_epsilon"], color="red", linestyle="--", label="target ε")
    axes.set_xlabel("round")
    axes.set_ylabel(f"ε at δ = {report['delta']:g}")
    axes.set_title("Cumulative privacy loss")
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def _write_atomic(path: Path, text: str) -> None:
    temporary = path.with_suffix(path.suffix + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


MAX_EPSILON_FOR_PRV = 100.0


def write_report(
    run_dir: str | os.PathLike, *, delta: float | None = None, accountant: str | None = None
) -> dict:
    """Write ``privacy/report.json``, ``report.md`` and ``epsilon.png`` of ``run_dir``; return it.

    ``delta`` and ``accountant`` default to the run's ``dp-delta`` / ``dp-accountant`` in
    ``config.json``, else to :class:`~privacy.mechanisms.DpSpec`'s defaults.
    """
    run_dir = Path(run_dir)
    ledger_path = run_dir / LEDGER_PATH
    if not ledger_path.exists():
        raise FileNotFoundError(
            f"no privacy ledger at {ledger_path}; "
            "was the run started with a dp mode other than 'off'?"
        )
    config = _read_json(run_dir / "config.json")
    defaults = DpSpec()
    delta = float(
        delta if delta is not None else _config_value(config, "dp-delta") or defaults.delta
    )
    accountant = accountant or _config_value(config, "dp-accountant") or defaults.accountant
    if accountant not in ACCOUNTANTS:
        raise ValueError(
            f"accountant must be one of {', '.join(map(repr, ACCOUNTANTS))}; got {accountant!r}"
        )
    target_epsilon = float(_config_value(config, "dp-target-epsilon") or 0.0)

    ledger = PrivacyLedger(ledger_path)
    releases = ledger.releases
    if not releases:
        raise ValueError(f"the privacy ledger {ledger_path} has no complete release records")
    # PRV/PLD cost grows like 1/z²: for a nearly noiseless run (ε in the hundreds or more,
    # which means no meaningful guarantee anyway) it takes minutes, so such a run is reported
    # with RDP alone and the report says so.
    rdp_epsilon = ledger.epsilon("rdp", delta)
    cheap_only = rdp_epsilon > MAX_EPSILON_FOR_PRV
    if cheap_only and accountant != "rdp":
        accountant = "rdp"
    composed = ledger.accountant(accountant)
    report = {
        "run_dir": str(run_dir),
        "epsilon": composed.epsilon(delta),
        "delta": delta,
        "accountant": accountant,
        "epsilon_by_accountant": {
            name: rdp_epsilon if name == "rdp" else ledger.epsilon(name, delta)
            for name in ACCOUNTANTS
            if name == "rdp" or not cheap_only
        },
        "accountant_note": (
            f"epsilon above {MAX_EPSILON_FOR_PRV:g}: computed with RDP only (PRV would take "
            "minutes and give no meaningful guarantee either)"
            if cheap_only
            else ""
        ),
        "target_epsilon": target_epsilon,
        "rounds": len(releases),
        "first_round": releases[0].round,
        "last_round": releases[-1].round,
        "noise_multiplier": _summary([r.noise_multiplier for r in releases]),
        "sample_rate": _summary([r.sample_rate for r in releases]),
        "sampling": releases[-1].sampling,
        "adjacency": releases[-1].mechanism.adjacency,
        "population": releases[-1].population,
        "expected_cohort_size": _summary([r.expected_cohort_size for r in releases]),
        "cohort_size": {
            "mean": sum(r.cohort_size for r in releases) / len(releases),
            "min": min(r.cohort_size for r in releases),
            "max": max(r.cohort_size for r in releases),
        },
        "mode": releases[-1].mode,
        "where": releases[-1].where,
        "clip": _summary([r.clip for r in releases]),
        "epsilon_per_round": [
            [releases[k - 1].round, value] for k, value in composed.epsilon_curve(releases, delta)
        ],
        "participation": participation(releases),
        "final_utility": final_utility(_read_jsonl(run_dir / "metrics.jsonl")),
        "ledger_torn_bytes": ledger.torn_bytes,
    }
    report["assumptions"] = _assumptions(report)

    out_dir = ledger_path.parent
    _write_atomic(out_dir / "report.json", json.dumps(report, indent=2, allow_nan=True) + "\n")
    _write_atomic(out_dir / "report.md", _markdown(report, run_dir))
    _plot(report, out_dir / "epsilon.png")
    return report
