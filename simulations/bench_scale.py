"""``pollen bench scale``: throughput, round time, start-up and memory of Pollen's two layouts.

For every population (1k, 10k, 100k virtual clients) and cohort size (100 and 1,000 clients
per round) it runs, in one command and one after another:

* the **packed layout** through a real ``flwr run`` (:func:`simulations.layout_timing.time_flwr_run`):
  ``virtual-clients=N`` on ``workers`` worker SuperNodes with one torch thread and one core each;
* a **plain single-threaded PyTorch loop** doing the same local training and averaging on the
  same cohorts (:func:`simulations.plain_loop.plain_fedavg`), in a fresh process so that its
  memory and start-up are measured like a run's — a fresh ``torch.optim.SGD`` per client, as
  a researcher would write it; at the goal setting also with Pollen's ``PlainSGD`` step
  (layout ``plain-loop-plainsgd``), which both layouts train with, to show how much of the
  packed layout's gain is the lighter optimizer step and how much the layout itself;
* the **one-SuperNode-per-client layout** (``num-supernodes=N``) where it is feasible. Flower's
  simulation registers every SuperNode, polls each node id every 0.1 s and sends every client
  its own message through a Ray actor; with thousands of nodes a round takes minutes, so only
  the settings in :attr:`ScaleSettings.per_client` are run and the rest are listed as not run,
  with the reason and the round time the measured rate predicts.

Each measurement reports the per-round wall times (``metrics.jsonl``'s ``wall_s``: sampling,
messages, training, aggregation; not evaluation or checkpointing), the **steady round time**
(median of the rounds after the first, which pays Ray's and the actors' start-up), the
**best round time** (the fastest of those: the round least disturbed by other processes),
**client-updates/s** (clients per round / steady round time), the **total wall time** of the
command including SuperLink/Ray start-up and shutdown, and the **peak RSS of the whole process
tree**: every descendant of the bench process plus every process carrying the launcher's
SuperLink marker (SuperExec and the simulation run in sessions of their own), sampled every
0.25 s. RSS is summed per process, so pages shared between processes (torch's libraries in
each Ray worker) count once per process: an upper bound on the memory the run needs.

The ratios that matter are those between measurements of the same command: on a shared machine
the absolute times move with the load (its 1-minute average is recorded with every row). Other
busy processes also bias the round-time ratio against the packed layout: one extra busy process
on two cores leaves the single-threaded loop a whole core but the two workers only two thirds
of one each. The ratio of the fastest rounds estimates what an otherwise idle machine gives.

Run ``python -m simulations.bench_scale [--out DIR] [--quick]`` or ``pollen bench scale``.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import statistics
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Self

from fedserver.config import parse_run_config
from fedserver.launcher import _TOKEN_VARIABLE
from simulations.plain_loop import PlainLoopResult, plain_fedavg

PACKED, PER_CLIENT, PLAIN = "packed", "one-per-client", "plain-loop"
#: The plain loop with Pollen's PlainSGD step instead of torch.optim.SGD (goal setting only).
PLAIN_SGD = "plain-loop-plainsgd"
LAYOUTS = (PACKED, PER_CLIENT, PLAIN, PLAIN_SGD)

#: The workload of the issue's goals: Synthetic(1,1), 50 examples per client, the MLP,
#: one local epoch in batches of 32, FedAvg without DP or compression.
WORKLOAD: dict[str, Any] = {
    "dataset": "synthetic",
    "samples-per-client": 50,
    "model": "mlp",
    "local-epochs": 1,
    "batch-size": 32,
    "strategy": "fedavg",
    "seed": 0,
}


@dataclass(frozen=True)
class ScaleSettings:
    """What ``pollen bench scale`` measures, and the thresholds of its goals.

    Attributes
    ----------
    populations, cohorts : tuple of int
        Every population is run with every cohort size (clients per round) that fits it.
    rounds : int
        Rounds per ``flwr run``: the first pays start-up, the steady time is the median of
        the others.
    plain_rounds : int
        Rounds of the plain loop (its first round pays no start-up; it is still left out).
    workers : int
        Worker SuperNodes of the packed layout, each with one core and one torch thread.
    per_client : tuple of (population, cohort)
        Settings also run with one SuperNode per client; the others are reported as not run.
    goal_pairs : int
        At the goal setting the packed run and the plain loops are measured this many times,
        alternating, and the goal is checked on the median of the paired ratios: on a shared
        machine the background load drifts over the minutes a bench takes, and one pair
        measured half a minute apart can land on either side of it.
    goal_setting : (population, cohort), optional
        Where the packed layout is compared with the plain loop and the per-client layout
        (``None``: not checked).
    rss_populations : (small, large), optional
        Packed peak RSS at ``large`` must be within ``max_rss_growth`` of that at ``small``
        (``None``: not checked).
    run_timeout_s : float
        Each ``flwr run`` is stopped after this long (and reported as failed).
    """

    populations: tuple[int, ...] = (1_000, 10_000, 100_000)
    cohorts: tuple[int, ...] = (100, 1_000)
    rounds: int = 7
    plain_rounds: int = 6
    workers: int = 2
    per_client: tuple[tuple[int, int], ...] = ((1_000, 100),)
    goal_setting: tuple[int, int] | None = (10_000, 1_000)
    goal_pairs: int = 3
    rss_populations: tuple[int, int] | None = (1_000, 100_000)
    max_round_ratio: float = 0.65  # packed steady round / plain loop
    min_throughput_ratio: float = 4.0  # packed client-updates/s / one-per-client
    max_rss_growth: float = 1.2  # packed peak RSS, large / small population
    run_timeout_s: float = 600.0
    workload: Mapping[str, Any] = field(default_factory=lambda: dict(WORKLOAD))

    def __post_init__(self) -> None:
        if self.rounds < 2 or self.plain_rounds < 2:
            raise ValueError(
                f"rounds and plain_rounds must be >= 2 (the first is not steady), got "
                f"{self.rounds} and {self.plain_rounds}"
            )
        if self.goal_pairs < 1:
            raise ValueError(f"goal_pairs must be >= 1, got {self.goal_pairs}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if any(c > p for p, c in self.per_client):
            raise ValueError(f"per_client settings need cohort <= population, got {self.per_client}")

    def settings(self) -> list[tuple[int, int]]:
        """(population, cohort) pairs to run, smallest population first."""
        return [(p, c) for p in self.populations for c in self.cohorts if c <= p]


FULL = ScaleSettings()
#: A smoke test of every layout on one small setting (each ``flwr run`` pays Ray's start-up);
#: the goals are stated for the full workload, so none are checked.
QUICK = ScaleSettings(
    populations=(200,),
    cohorts=(20,),
    rounds=3,
    plain_rounds=2,
    per_client=((200, 20),),
    goal_setting=None,
    rss_populations=None,
    run_timeout_s=300.0,
)


@dataclass
class Row:
    """One measurement (or a setting that was not run, with ``status`` saying why)."""

    layout: str
    population: int
    clients_per_round: int
    supernodes: int = 0  # packed: workers; one-per-client: the population; plain loop: 0
    status: str = "ok"
    round_s: list[float] = field(default_factory=list)
    repeat: int = 0  # which of the goal setting's alternating measurements (0-based)
    total_s: float = math.nan  # the whole command: start-up, rounds, shutdown
    peak_rss_mb: float = math.nan
    load_avg: float = math.nan  # 1-minute load average, mean of start and end

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def first_round_s(self) -> float:
        return self.round_s[0] if self.round_s else math.nan

    @property
    def steady_round_s(self) -> float:
        """Median of the rounds after the first."""
        return float(statistics.median(self.round_s[1:])) if len(self.round_s) > 1 else math.nan

    @property
    def best_round_s(self) -> float:
        """Fastest round after the first: the least disturbed by other load on the machine."""
        return min(self.round_s[1:]) if len(self.round_s) > 1 else math.nan

    @property
    def client_updates_per_s(self) -> float:
        return self.clients_per_round / self.steady_round_s

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {
            "first_round_s": self.first_round_s,
            "steady_round_s": self.steady_round_s,
            "best_round_s": self.best_round_s,
            "client_updates_per_s": self.client_updates_per_s,
        }


# --------------------------------------------------------------------------------------
# Peak RSS of a process tree


def _process_table() -> dict[int, tuple[int, int]]:
    """pid → (parent pid, resident bytes) of every process readable in ``/proc``."""
    page = os.sysconf("SC_PAGE_SIZE")
    table = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:  # exited meanwhile
            continue
        table[int(entry.name)] = (int(fields[1]), int(fields[21]) * page)
    return table


def _marker(pid: int) -> bytes | None:
    """The ``POLLEN_SUPERLINK_TOKEN=...`` entry of a process's environment, if any."""
    prefix = _TOKEN_VARIABLE.encode() + b"="
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            environ = f.read()
    except OSError:
        return None
    return next((e for e in environ.split(b"\0") if e.startswith(prefix)), None)


def tree_rss_bytes(root: int) -> int:
    """Summed RSS of ``root``'s descendants (not ``root``) and of the processes they marked.

    A SuperLink started by :mod:`fedserver.launcher` puts a fresh token in its environment,
    which SuperExec, the simulation and Ray inherit; those run in sessions of their own and
    may be re-parented, so they are found by the tokens of ``root``'s descendants. Other
    SuperLinks on the machine carry other tokens and are not counted.
    """
    table = _process_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    tree: set[int] = set()
    stack = list(children.get(root, []))
    while stack:
        pid = stack.pop()
        if pid not in tree:
            tree.add(pid)
            stack.extend(children.get(pid, []))
    tokens = {m for m in map(_marker, tree) if m is not None}
    if tokens:
        tree |= {pid for pid in table.keys() - tree - {root} if _marker(pid) in tokens}
    return sum(table[pid][1] for pid in tree if pid in table)


class PeakRss:
    """Samples :func:`tree_rss_bytes` of this process in a thread while a ``with`` block runs."""

    def __init__(self, interval_s: float = 0.25) -> None:
        self.interval_s = interval_s
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_mb(self) -> float:
        return self.peak_bytes / 2**20

    def _sample(self) -> None:
        root = os.getpid()
        while True:
            self.peak_bytes = max(self.peak_bytes, tree_rss_bytes(root))
            if self._stop.wait(self.interval_s):
                return


@contextmanager
def _measured(row: Row) -> Iterator[None]:
    """Fill ``row``'s total time, peak RSS and load average around the block."""
    load = os.getloadavg()[0]
    started = time.perf_counter()
    with PeakRss() as rss:
        yield
    row.total_s = time.perf_counter() - started
    row.peak_rss_mb = rss.peak_mb
    row.load_avg = (load + os.getloadavg()[0]) / 2


# --------------------------------------------------------------------------------------
# Measurements


def run_config(settings: ScaleSettings, layout: str, population: int, cohort: int) -> dict[str, Any]:
    """The run config of one measurement (the packed layout adds its keys)."""
    config = {
        **settings.workload,
        "clients-per-round": cohort,
        "num-server-rounds": settings.plain_rounds if layout in (PLAIN, PLAIN_SGD) else settings.rounds,
    }
    if layout == PACKED:
        config |= {"virtual-clients": population, "worker-threads": 1}
    parse_run_config(config)  # fail here, not minutes later inside the ServerApp
    return config


def measure_flwr(
    settings: ScaleSettings, layout: str, population: int, cohort: int, out_dir: Path,
    repeat: int = 0,
) -> Row:
    """One ``flwr run`` of ``layout``; a failure becomes the row's status, not an exception."""
    from simulations.layout_timing import time_flwr_run

    nodes = settings.workers if layout == PACKED else population
    row = Row(layout, population, cohort, supernodes=nodes, repeat=repeat)
    config = run_config(settings, layout, population, cohort)
    federation = {"num-supernodes": nodes, "client-resources-num-cpus": 1}
    try:
        with _measured(row):
            timing = time_flwr_run(
                config, federation, output_dir=out_dir / "runs",
                run_name=f"{layout}-{population}-{cohort}-{time.strftime('%Y%m%d-%H%M%S')}",
                timeout=settings.run_timeout_s,
            )
        row.round_s = timing.round_s
    except (RuntimeError, TimeoutError, OSError) as err:
        row.status = f"failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    return row


def _plain_loop(config: dict[str, Any], population: int, sgd: str) -> PlainLoopResult:
    return plain_fedavg(parse_run_config(config), num_clients=population, threads=1, sgd=sgd)


def measure_plain(
    settings: ScaleSettings, population: int, cohort: int, sgd: str = "torch", repeat: int = 0
) -> Row:
    """The plain loop on the same cohorts, in a fresh process (its start-up and memory count).

    ``sgd="plain"`` (layout ``plain-loop-plainsgd``) trains with Pollen's PlainSGD step, as
    both layouts do, instead of a fresh ``torch.optim.SGD`` per client: the ratio to it is
    what the packed layout buys beyond the lighter optimizer step.
    """
    layout = PLAIN if sgd == "torch" else PLAIN_SGD
    row = Row(layout, population, cohort, repeat=repeat)
    config = run_config(settings, layout, population, cohort)
    with _measured(row):
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
            result = pool.submit(_plain_loop, config, population, sgd).result()
    row.round_s = result.round_s
    return row


def not_run_reason(settings: ScaleSettings, population: int, cohort: int, rows: Sequence[Row]) -> str:
    """Why the one-SuperNode-per-client layout is not run at (population, cohort).

    Uses the throughput measured for that layout (if any) to predict the round time.
    """
    reasons = []
    best = best_per_client(rows)
    if best is not None:
        reasons.append(
            f"≥ {cohort / best.client_updates_per_s:.0f} s/round predicted from the "
            f"{best.client_updates_per_s:.1f} client-updates/s measured with "
            f"{best.population:,} nodes, × {settings.rounds} rounds + start-up"
        )
    if population > max(p for p, _ in settings.per_client):
        reasons.append(
            f"{population:,} SuperNodes: Flower registers each and polls every node id every "
            "0.1 s, so rounds slow down further with the population"
        )
    return "not run (time budget): " + "; ".join(reasons or ["not in ScaleSettings.per_client"])


# --------------------------------------------------------------------------------------
# Ratios and goals


@dataclass
class Ratio:
    """A ratio between two measurements of the same command."""

    name: str
    population: int
    clients_per_round: int
    value: float


@dataclass
class Goal:
    """One of the measured goals: ``value`` against ``threshold`` (``passed`` None: not measured)."""

    name: str
    value: float
    threshold: float
    passed: bool | None
    detail: str = ""


def _find(
    rows: Sequence[Row], layout: str, population: int, cohort: int, repeat: int = 0
) -> Row | None:
    return next(
        (r for r in rows if r.ok and (r.layout, r.population, r.clients_per_round, r.repeat) ==
         (layout, population, cohort, repeat)),
        None,
    )


def goal_pairs(rows: Sequence[Row], settings: ScaleSettings) -> list[tuple[Row, Row]]:
    """(packed, plain loop) measured back to back at the goal setting, one pair per repeat."""
    if settings.goal_setting is None:
        return []
    pairs = []
    for k in range(settings.goal_pairs):
        packed = _find(rows, PACKED, *settings.goal_setting, repeat=k)
        plain = _find(rows, PLAIN, *settings.goal_setting, repeat=k)
        if packed is not None and plain is not None:
            pairs.append((packed, plain))
    return pairs


def best_per_client(rows: Sequence[Row]) -> Row | None:
    """The one-SuperNode-per-client measurement with the highest throughput (its best case)."""
    measured = [r for r in rows if r.layout == PER_CLIENT and r.ok]
    return max(measured, key=lambda r: r.client_updates_per_s, default=None)


def ratios(rows: Sequence[Row], settings: ScaleSettings) -> list[Ratio]:
    """Packed vs plain loop (steady round), packed vs one-per-client (throughput), memory growth.

    At the goal setting every repeated pair gets its ratios (``, pair k`` from the second on)
    and the steady-round ratio also its median over the pairs.
    """
    out = []
    for population, cohort in settings.settings():
        repeats = settings.goal_pairs if (population, cohort) == settings.goal_setting else 1
        for k in range(repeats):
            out += _setting_ratios(rows, population, cohort, k)
        pairs = goal_pairs(rows, settings) if repeats > 1 else []
        if len(pairs) > 1:
            out.append(Ratio(
                f"packed / plain-loop steady round, median of {len(pairs)} pairs", population,
                cohort, _median_ratio(pairs),
            ))
    best = best_per_client(rows)
    throughput = _goal_throughput(rows, settings)
    if best is not None and not math.isnan(throughput):
        out.append(Ratio(
            f"packed / best one-per-client ({best.population:,}/{best.clients_per_round}) "
            "client-updates/s", *settings.goal_setting,
            throughput / best.client_updates_per_s,
        ))
    if settings.rss_populations is None:
        return out
    small, large = settings.rss_populations
    for cohort in settings.cohorts:
        a, b = _find(rows, PACKED, small, cohort), _find(rows, PACKED, large, cohort)
        if a is not None and b is not None:
            out.append(Ratio(f"packed peak RSS, population {large:,} / {small:,}", large, cohort,
                             b.peak_rss_mb / a.peak_rss_mb))
    return out


def _setting_ratios(rows: Sequence[Row], population: int, cohort: int, k: int) -> list[Ratio]:
    packed = _find(rows, PACKED, population, cohort, k)
    if packed is None:
        return []
    tag = "" if k == 0 else f", pair {k + 1}"
    out = []
    plain = _find(rows, PLAIN, population, cohort, k)
    if plain is not None:
        out.append(Ratio(f"packed / plain-loop steady round{tag}", population, cohort,
                         packed.steady_round_s / plain.steady_round_s))
        out.append(Ratio(f"packed / plain-loop best round{tag}", population, cohort,
                         packed.best_round_s / plain.best_round_s))
    lean = _find(rows, PLAIN_SGD, population, cohort, k)
    if lean is not None:
        out.append(Ratio(f"packed / plain-loop-plainsgd steady round{tag}", population, cohort,
                         packed.steady_round_s / lean.steady_round_s))
        if plain is not None:
            out.append(Ratio(f"plain-loop-plainsgd / plain-loop steady round{tag}", population,
                             cohort, lean.steady_round_s / plain.steady_round_s))
    per_client = _find(rows, PER_CLIENT, population, cohort, k)
    if per_client is not None:
        out.append(Ratio(f"packed / one-per-client client-updates/s{tag}", population, cohort,
                         packed.client_updates_per_s / per_client.client_updates_per_s))
    return out


def _median_ratio(pairs: Sequence[tuple[Row, Row]], best: bool = False) -> float:
    if best:
        return float(statistics.median(a.best_round_s / b.best_round_s for a, b in pairs))
    return float(statistics.median(a.steady_round_s / b.steady_round_s for a, b in pairs))


def _goal_throughput(rows: Sequence[Row], settings: ScaleSettings) -> float:
    """Median client-updates/s of the packed runs at the goal setting (NaN: none)."""
    if settings.goal_setting is None:
        return math.nan
    runs = [_find(rows, PACKED, *settings.goal_setting, k) for k in range(settings.goal_pairs)]
    rates = [r.client_updates_per_s for r in runs if r is not None]
    return float(statistics.median(rates)) if rates else math.nan


def goals(rows: Sequence[Row], settings: ScaleSettings) -> list[Goal]:
    """The issue's measured goals, evaluated on this command's rows."""
    out = [] if settings.goal_setting is None else _layout_goals(rows, settings)
    if settings.rss_populations is None:
        return out
    small, large = settings.rss_populations
    for c in settings.cohorts:
        a, b = _find(rows, PACKED, small, c), _find(rows, PACKED, large, c)
        value = math.nan if a is None or b is None else b.peak_rss_mb / a.peak_rss_mb
        out.append(Goal(
            f"peak RSS at {large:,} ≤ {settings.max_rss_growth:g}× at {small:,} (packed, {c}/round)",
            value, settings.max_rss_growth,
            None if math.isnan(value) else value <= settings.max_rss_growth,
        ))
    return out


def _layout_goals(rows: Sequence[Row], settings: ScaleSettings) -> list[Goal]:
    """Packed vs plain loop (round time) and vs one SuperNode per client (throughput)."""
    population, cohort = settings.goal_setting
    where = f"packed, {population:,} clients, {cohort:,}/round, {settings.workers} workers"
    pairs = goal_pairs(rows, settings)
    best = best_per_client(rows)
    out = []
    value = _median_ratio(pairs) if pairs else math.nan
    each = ", ".join(f"{a.steady_round_s / b.steady_round_s:.3f}" for a, b in pairs)
    out.append(Goal(
        f"steady round / plain loop ≤ {settings.max_round_ratio:g} ({where})",
        value, settings.max_round_ratio,
        None if math.isnan(value) else value <= settings.max_round_ratio,
        "" if not pairs else (
            (f"median of {len(pairs)} alternating pairs: {each}; " if len(pairs) > 1 else "")
            + f"fastest rounds of each: {_median_ratio(pairs, best=True):.3f}"
        ),
    ))
    throughput = _goal_throughput(rows, settings)
    value = math.nan if best is None else throughput / best.client_updates_per_s
    out.append(Goal(
        f"client-updates/s ≥ {settings.min_throughput_ratio:g}× one-per-client ({where})",
        value, settings.min_throughput_ratio,
        None if math.isnan(value) else value >= settings.min_throughput_ratio,
        "" if best is None else
        f"one-per-client reference: {best.population:,} nodes, {best.clients_per_round}/round",
    ))
    return out


# --------------------------------------------------------------------------------------
# Report


def _num(value: float, digits: int = 2) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:,.{digits}f}"


def markdown_table(rows: Sequence[Row]) -> str:
    """The measurements as a Markdown table (rows that were not run show why)."""
    lines = [
        (
            "| layout | population | clients/round | SuperNodes | first round s | steady round s "
            "| best round s | client-updates/s | total s | peak RSS MB | load | status |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.layout}{f' #{r.repeat + 1}' if r.repeat else ''} | {r.population:,} | {r.clients_per_round:,} | "
            f"{r.supernodes if r.supernodes else '–'} | {_num(r.first_round_s)} | "
            f"{_num(r.steady_round_s)} | {_num(r.best_round_s)} | "
            f"{_num(r.client_updates_per_s, 1) if r.ok else '–'} | "
            f"{_num(r.total_s, 1)} | {_num(r.peak_rss_mb, 0)} | {_num(r.load_avg, 1)} | {r.status} |"
        )
    return "\n".join(lines)


def summary_lines(ratio_list: Sequence[Ratio], goal_list: Sequence[Goal]) -> list[str]:
    """The ratios and the goals, one line each."""
    lines = ["", "Ratios (same command):"]
    lines += [
        f"- {r.name} at {r.population:,}/{r.clients_per_round:,}: {r.value:.3f}"
        for r in ratio_list
    ]
    lines += ["", "Goals:" if goal_list else "Goals: none checked for these settings."]
    for g in goal_list:
        verdict = {True: "PASS", False: "FAIL", None: "not measured"}[g.passed]
        detail = f" ({g.detail})" if g.detail else ""
        lines.append(f"- {verdict}: {g.name}: {_num(g.value, 3)}{detail}")
    return lines


def plot(rows: Sequence[Row], path: Path) -> Path:
    """Client-updates/s, steady round time and peak RSS against population, per layout and cohort."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (
        ("client_updates_per_s", "client-updates/s"),
        ("steady_round_s", "steady round time (s)"),
        ("peak_rss_mb", "peak RSS of the process tree (MB)"),
    )
    styles = {PACKED: ("tab:green", "o", "-"), PLAIN: ("tab:blue", "s", "--"),
              PLAIN_SGD: ("tab:purple", "D", ":"),
              PER_CLIENT: ("tab:red", "^", ":")}
    fig, axes = plt.subplots(1, len(panels), figsize=(15, 4.4))
    series: dict[tuple[str, int], list[Row]] = {}
    for r in rows:
        if r.ok and r.repeat == 0:  # repeats of the goal setting are in the table, not here
            series.setdefault((r.layout, r.clients_per_round), []).append(r)
    for ax, (attribute, label) in zip(axes, panels, strict=True):
        for (layout, cohort), members in sorted(series.items()):
            members.sort(key=lambda r: r.population)
            color, marker, line = styles[layout]
            ax.plot([r.population for r in members], [getattr(r, attribute) for r in members],
                    color=color, marker=marker, ls=line, alpha=1.0 if cohort == max(
                        c for _, c in series) else 0.55, label=f"{layout}, {cohort:,}/round")
        ax.set_xscale("log")
        ax.set_xlabel("population (clients)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle("Pollen scaling: packed layout vs plain PyTorch loop vs one SuperNode per client",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def report(rows: Sequence[Row], settings: ScaleSettings, *, quick: bool, **extra: Any) -> dict[str, Any]:
    """The JSON report: settings, rows, ratios and goals."""
    return _jsonable({
        "quick": quick,
        "settings": asdict(settings) | {"workload": dict(settings.workload)},
        "rows": [r.to_dict() for r in rows],
        "ratios": [asdict(r) for r in ratios(rows, settings)],
        "goals": [asdict(g) for g in goals(rows, settings)],
        **extra,
    })


def run(out_dir: Path, quick: bool = False, settings: ScaleSettings | None = None) -> dict[str, Any]:
    """Measure every setting; write ``scale.json``, ``scale.md`` and ``scale.png`` to ``out_dir``.

    ``settings`` defaults to :data:`QUICK` or :data:`FULL` by ``quick``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if settings is None:
        settings = QUICK if quick else FULL
    started = time.perf_counter()
    load_start = os.getloadavg()
    rows: list[Row] = []

    def record(row: Row) -> None:
        rows.append(row)
        print(
            f"  {row.layout:14s} N={row.population:>7,} {row.clients_per_round:>5,}/round: "
            + (f"steady {row.steady_round_s:.2f} s, {row.client_updates_per_s:.1f} updates/s, "
               f"total {row.total_s:.0f} s, peak RSS {row.peak_rss_mb:.0f} MB, "
               f"load {row.load_avg:.1f}" if row.ok else row.status),
            flush=True,
        )

    for population, cohort in settings.settings():
        record(measure_flwr(settings, PACKED, population, cohort, out_dir))
        record(measure_plain(settings, population, cohort))
        if (population, cohort) == settings.goal_setting:
            record(measure_plain(settings, population, cohort, sgd="plain"))
            for k in range(1, settings.goal_pairs):  # alternate again: the load drifts
                record(measure_flwr(settings, PACKED, population, cohort, out_dir, repeat=k))
                record(measure_plain(settings, population, cohort, repeat=k))
                record(measure_plain(settings, population, cohort, sgd="plain", repeat=k))
    for population, cohort in settings.settings():
        if (population, cohort) in settings.per_client:
            record(measure_flwr(settings, PER_CLIENT, population, cohort, out_dir))
    for population, cohort in settings.settings():
        if (population, cohort) not in settings.per_client:
            rows.append(Row(PER_CLIENT, population, cohort, supernodes=population,
                            status=not_run_reason(settings, population, cohort, rows)))
    order = {layout: i for i, layout in enumerate(LAYOUTS)}
    rows.sort(key=lambda r: (r.population, r.clients_per_round, r.repeat, order[r.layout]))

    import flwr
    import torch

    result = report(
        rows, settings, quick=quick,
        machine={"cpus": os.cpu_count(), "load_avg_start": load_start,
                 "load_avg_end": os.getloadavg(), "flwr": flwr.__version__,
                 "torch": torch.__version__},
        bench_total_s=time.perf_counter() - started,
    )
    (out_dir / "scale.json").write_text(json.dumps(result, indent=2) + "\n")
    text = "\n".join([
        markdown_table(rows),
        *summary_lines(ratios(rows, settings), goals(rows, settings)),
        "",
        (
            f"{os.cpu_count()} CPUs; load average (1/5/15 min) {load_start[0]:.1f}/"
            f"{load_start[1]:.1f}/{load_start[2]:.1f} at the start; bench took "
            f"{result['bench_total_s']:.0f} s."
        ),
    ])
    (out_dir / "scale.md").write_text(text + "\n")
    plot(rows, out_dir / "scale.png")
    print(text, flush=True)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench-results/scale")
    parser.add_argument("--quick", action="store_true", help="small populations, a smoke test")
    args = parser.parse_args(argv)
    run(Path(args.out), quick=args.quick)


if __name__ == "__main__":
    main()
