"""``pollen bench scale``: process-tree memory, steady times, ratios, goals and the report."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
import uuid

import pytest

from fedserver.launcher import _TOKEN_VARIABLE
from simulations import bench_scale as bs
from simulations.bench_scale import (
    PACKED,
    PER_CLIENT,
    PLAIN,
    PLAIN_SGD,
    Row,
    ScaleSettings,
    goals,
    markdown_table,
    not_run_reason,
    ratios,
    report,
    tree_rss_bytes,
)

MB = 2**20

# Holds `size` MB of touched memory until stdin closes. With `orphan`, it double-forks into a
# new session first, so the holder is re-parented away from the caller's process tree (as
# SuperExec and Ray are when the SuperLink exits) and prints the holder's pid.
_HOLDER = """
import os, sys
size, orphan = int(sys.argv[1]), sys.argv[2] == "1"
if orphan:
    r, w = os.pipe()
    if os.fork():
        os.close(w)
        print(os.read(r, 32).decode(), flush=True)
        os._exit(0)
    os.setsid()
    if os.fork():
        os._exit(0)
    os.write(w, str(os.getpid()).encode())
    os.close(w)
    block = b"\\1" * (size << 20)
    import time
    time.sleep(30)
    os._exit(0)
block = b"\\1" * (size << 20)
print(os.getpid(), flush=True)
sys.stdin.read()
"""


def _holder(size_mb: int, *, orphan: bool, token: str | None) -> subprocess.Popen[str]:
    env = dict(os.environ)
    env.pop(_TOKEN_VARIABLE, None)
    if token is not None:
        env[_TOKEN_VARIABLE] = token
    return subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(size_mb), "1" if orphan else "0"],
        env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MB


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc")
def test_tree_rss_counts_descendants_and_orphans_with_their_marker_only():
    mine, other = uuid.uuid4().hex, uuid.uuid4().hex
    child = _holder(120, orphan=False, token=mine)  # like the SuperLink: our child, marked
    launcher = _holder(80, orphan=True, token=mine)  # like SuperExec: left our tree, marked
    stranger = _holder(80, orphan=True, token=other)  # another user's SuperLink
    orphans = []
    try:
        child_pid = int(child.stdout.readline())
        orphans = [int(launcher.stdout.readline()), int(stranger.stdout.readline())]
        launcher.wait(10)
        stranger.wait(10)
        deadline = time.monotonic() + 20
        while min(_rss_mb(p) for p in [child_pid, *orphans]) < 75 and time.monotonic() < deadline:
            time.sleep(0.05)
        expected = _rss_mb(child_pid) + _rss_mb(orphans[0])
        measured = tree_rss_bytes(os.getpid()) / MB
        # Both marked processes, not the stranger's (nor this process's own memory).
        assert expected - 5 <= measured <= expected + 30 < expected + _rss_mb(orphans[1])
    finally:
        child.stdin.close()
        child.wait(10)
        for pid in orphans:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass


def test_peak_rss_keeps_the_maximum_after_the_process_is_gone():
    with bs.PeakRss(interval_s=0.05) as peak:
        holder = _holder(100, orphan=False, token=None)
        holder.stdout.readline()
        time.sleep(0.3)
        holder.stdin.close()
        holder.wait(10)
        time.sleep(0.2)
    assert peak.peak_mb >= 100
    assert tree_rss_bytes(os.getpid()) / MB < 50  # nothing left in the tree


def _rows() -> list[Row]:
    return [
        # (10k, 1000): packed 4 rounds, first with start-up; steady = median(5, 6, 4) = 5
        Row(PACKED, 10_000, 1_000, 2, round_s=[30.0, 5.0, 6.0, 4.0], peak_rss_mb=2_000.0),
        Row(PLAIN, 10_000, 1_000, round_s=[12.0, 9.0, 11.0], peak_rss_mb=400.0),
        Row(PLAIN_SGD, 10_000, 1_000, round_s=[10.0, 8.0, 8.0], peak_rss_mb=400.0),
        # (1k, 1000) and (100k, 1000): peak RSS 2,100 vs 2,600 MB → ×1.238
        Row(PACKED, 1_000, 1_000, 2, round_s=[30.0, 5.0, 5.0], peak_rss_mb=2_100.0),
        Row(PACKED, 100_000, 1_000, 2, round_s=[30.0, 5.0, 5.0], peak_rss_mb=2_600.0),
        # (1k, 100): packed, and two per-client measurements; the faster one is the reference
        Row(PACKED, 1_000, 100, 2, round_s=[20.0, 1.0, 1.0], peak_rss_mb=1_900.0),
        Row(PER_CLIENT, 1_000, 100, 1_000, round_s=[88.0, 5.0, 4.0, 4.4]),  # 22.7/s
        Row(PER_CLIENT, 100, 100, 100, round_s=[40.0, 4.0, 4.0]),  # 25/s
        # failed and not-run rows are ignored by ratios and goals
        Row(PER_CLIENT, 10_000, 1_000, 10_000, status="failed: TimeoutError: ...", round_s=[1.0, 1.0]),
        Row(PACKED, 100_000, 100, 2, status="failed: RuntimeError: boom"),
    ]


SETTINGS = ScaleSettings(per_client=((1_000, 100), (100, 100)))


def test_steady_round_is_the_median_after_the_first_and_throughput_follows():
    packed, plain = _rows()[:2]
    assert packed.first_round_s == 30.0 and packed.steady_round_s == 5.0
    assert packed.best_round_s == 4.0 and plain.best_round_s == 9.0
    assert packed.client_updates_per_s == 200.0
    assert plain.steady_round_s == 10.0
    assert math.isnan(Row(PACKED, 10, 5, round_s=[3.0]).steady_round_s)


def test_ratios_pair_measurements_of_the_same_setting():
    found = {(r.name, r.population, r.clients_per_round): r.value for r in ratios(_rows(), SETTINGS)}
    assert found.pop(("packed / plain-loop steady round", 10_000, 1_000)) == pytest.approx(0.5)
    assert found.pop(("packed / plain-loop best round", 10_000, 1_000)) == pytest.approx(4 / 9)
    # the second baseline (PlainSGD step): what the layout buys beyond the lighter step
    assert found.pop(("packed / plain-loop-plainsgd steady round", 10_000, 1_000)) == (
        pytest.approx(5 / 8)
    )
    assert found.pop(("plain-loop-plainsgd / plain-loop steady round", 10_000, 1_000)) == (
        pytest.approx(8 / 10)
    )
    assert found.pop(("packed / one-per-client client-updates/s", 1_000, 100)) == pytest.approx(
        100 / (100 / 4.4)
    )
    # the goal setting against the best per-client measurement (100 nodes, 25/s)
    best = found.pop(("packed / best one-per-client (100/100) client-updates/s", 10_000, 1_000))
    assert best == pytest.approx(200 / 25)
    assert found.pop(("packed peak RSS, population 100,000 / 1,000", 100_000, 1_000)) == (
        pytest.approx(2_600 / 2_100)
    )
    assert found == {}  # nothing from failed rows or settings without a partner


def test_goals_pass_fail_and_not_measured():
    result = {g.name.split(" (")[0]: g for g in goals(_rows(), SETTINGS)}
    round_goal = result["steady round / plain loop ≤ 0.65"]
    assert round_goal.passed is True and round_goal.value == pytest.approx(0.5)
    assert round_goal.detail == f"fastest rounds of each: {4 / 9:.3f}"
    throughput = result["client-updates/s ≥ 4× one-per-client"]
    assert throughput.passed is True and throughput.value == pytest.approx(8.0)
    assert "100 nodes" in throughput.detail
    rss = [g for g in goals(_rows(), SETTINGS) if g.name.startswith("peak RSS")]
    assert rss[0].passed is None and math.isnan(rss[0].value)  # 100/round: 100k run failed
    assert rss[1].passed is False and rss[1].value == pytest.approx(2_600 / 2_100)
    # without a plain loop at the goal setting the round goal is not measured
    rows = [r for r in _rows() if r.layout != PLAIN]
    assert goals(rows, SETTINGS)[0].passed is None


def test_goal_is_the_median_of_alternating_pairs():
    settings = ScaleSettings(per_client=((1_000, 100),), goal_pairs=3)
    rows = _rows() + [
        # pair 2: a slow packed run (ratio 0.9); pair 3: ratio 0.6 → median of 0.5, 0.9, 0.6
        Row(PACKED, 10_000, 1_000, 2, round_s=[30.0, 9.0, 9.0], repeat=1),
        Row(PLAIN, 10_000, 1_000, round_s=[12.0, 10.0, 10.0], repeat=1),
        Row(PACKED, 10_000, 1_000, 2, round_s=[30.0, 6.0, 6.0], repeat=2),
        Row(PLAIN, 10_000, 1_000, round_s=[12.0, 10.0, 10.0], repeat=2),
    ]
    (round_goal, throughput, *_) = goals(rows, settings)
    assert round_goal.value == pytest.approx(0.6) and round_goal.passed is True
    assert "median of 3 alternating pairs: 0.500, 0.900, 0.600" in round_goal.detail
    # throughput: median packed client-updates/s over the repeats (1000/5, 1000/9, 1000/6)
    assert throughput.value == pytest.approx((1_000 / 6) / 25)  # best per-client: 25/s
    found = {(r.name, r.population): r.value for r in ratios(rows, settings)}
    assert found[("packed / plain-loop steady round, pair 2", 10_000)] == pytest.approx(0.9)
    assert found[("packed / plain-loop steady round, median of 3 pairs", 10_000)] == (
        pytest.approx(0.6)
    )
    assert "| packed #3 | 10,000 |" in markdown_table(rows)
    with pytest.raises(ValueError, match="goal_pairs"):
        ScaleSettings(goal_pairs=0)


def test_quick_settings_check_no_goals_but_still_pair_measurements():
    rows = [
        Row(PACKED, 200, 20, 2, round_s=[20.0, 0.2, 0.3]),
        Row(PLAIN, 200, 20, round_s=[1.0, 0.1, 0.1]),
        Row(PER_CLIENT, 200, 20, 200, round_s=[5.0, 0.5, 0.5]),
    ]
    assert goals(rows, bs.QUICK) == []
    names = [r.name for r in ratios(rows, bs.QUICK)]
    assert names == [
        "packed / plain-loop steady round",
        "packed / plain-loop best round",
        "packed / one-per-client client-updates/s",
    ]
    assert "Goals: none checked for these settings." in bs.summary_lines(ratios(rows, bs.QUICK), [])


def test_not_run_reason_predicts_the_round_time_from_the_best_measured_rate():
    reason = not_run_reason(SETTINGS, 10_000, 1_000, _rows())
    assert reason.startswith("not run (time budget)")
    assert "≥ 40 s/round" in reason and "25.0 client-updates/s" in reason  # 1,000 / 25
    assert "10,000 SuperNodes" in reason
    small = not_run_reason(SETTINGS, 1_000, 1_000, _rows())
    assert "SuperNodes" not in small  # 1,000 nodes were run: only the time budget applies


def test_settings_are_checked_and_skip_cohorts_larger_than_the_population():
    assert ScaleSettings(populations=(50, 500), cohorts=(100, 10)).settings() == [
        (50, 10), (500, 100), (500, 10)
    ]
    with pytest.raises(ValueError, match="rounds"):
        ScaleSettings(rounds=1)
    with pytest.raises(ValueError, match="per_client"):
        ScaleSettings(per_client=((10, 100),))


def test_run_configs_are_valid_and_only_the_packed_one_has_virtual_clients():
    packed = bs.run_config(SETTINGS, PACKED, 100_000, 1_000)
    assert packed["virtual-clients"] == 100_000 and packed["worker-threads"] == 1
    assert packed["num-server-rounds"] == SETTINGS.rounds
    plain = bs.run_config(SETTINGS, PLAIN, 100_000, 1_000)
    assert "virtual-clients" not in plain and plain["num-server-rounds"] == SETTINGS.plain_rounds
    assert "virtual-clients" not in bs.run_config(SETTINGS, PER_CLIENT, 1_000, 100)


def test_report_table_and_plot(tmp_path):
    rows = _rows()
    result = report(rows, SETTINGS, quick=True)
    text = json.dumps(result, allow_nan=False)  # NaNs of failed rows become null
    assert json.loads(text)["rows"][0]["steady_round_s"] == 5.0
    table = markdown_table(rows).splitlines()
    assert len(table) == 2 + len(rows)
    assert table[2].startswith("| packed | 10,000 | 1,000 | 2 | 30.00 | 5.00 | 4.00 | 200.0 |")
    assert "failed: RuntimeError: boom" in table[-1] and "| – |" in table[-1]
    path = bs.plot(rows, tmp_path / "scale.png")
    assert path.stat().st_size > 10_000


@pytest.mark.e2e
def test_tiny_bench_runs_both_layouts_and_the_plain_loop(tmp_path):
    tiny = ScaleSettings(
        populations=(20,), cohorts=(4,), rounds=2, plain_rounds=2, per_client=((20, 4),),
        goal_setting=(20, 4), goal_pairs=2, rss_populations=None, run_timeout_s=300,
    )
    result = bs.run(tmp_path, settings=tiny)
    # the goal setting's packed run and plain loops are measured twice, alternating
    assert sorted((r["layout"], r["repeat"]) for r in result["rows"] if r["repeat"]) == [
        (PACKED, 1), (PLAIN, 1), (PLAIN_SGD, 1)
    ]
    rows = {r["layout"]: r for r in result["rows"] if r["repeat"] == 0}
    assert set(rows) == {PACKED, PLAIN, PLAIN_SGD, PER_CLIENT}  # PlainSGD loop: goal setting
    for row in rows.values():
        assert row["status"] == "ok", row
        assert len(row["round_s"]) == 2 and row["steady_round_s"] > 0
        assert row["total_s"] > sum(row["round_s"])
    # Ray, SuperLink and the simulation are counted; the plain loop is one torch process
    assert rows[PACKED]["peak_rss_mb"] > 2 * rows[PLAIN]["peak_rss_mb"] > 200
    assert [g["passed"] is not None for g in result["goals"]] == [True, True]
    assert {p.name for p in tmp_path.iterdir()} >= {"scale.json", "scale.md", "scale.png"}
    # packed rows say how long the slowest and fastest worker took, within the round's wall time
    packed_dirs = list((tmp_path / "runs").glob("packed-*"))
    assert len(packed_dirs) == 2
    for line in (packed_dirs[0] / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        assert 0 < row["worker_s_min"] <= row["worker_s_max"] < row["wall_s"]
