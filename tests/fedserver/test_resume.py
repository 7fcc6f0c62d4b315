"""Crash safety: a killed run, resumed, ends exactly where an uninterrupted run ends.

In-process tests (real ServerApp ``run_pollen`` and ClientApp over an ``InProcessGrid``)
crash the server at chosen points by making a run-directory write raise, resume with
``resume=true`` and require the final model, the strategy state, ``metrics.jsonl`` and the
privacy ledger to be *bitwise* those of an uninterrupted run with the same seed.

The end-to-end test does it for real: ``pollen run`` through Flower, SIGKILL of the process
that hosts the ServerApp mid-run, ``pollen resume RUN_DIR``, and a comparison with an
uninterrupted in-process run of the same config.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fedclient.client_app import app as client_app
from fedserver.cli import main as pollen_main
from fedserver.cli import resume_run_config
from fedserver.config import ConfigError, parse_run_config
from fedserver.run_dir import RunDirectory
from fedserver.server_app import run_pollen
from privacy.events import RoundRelease
from privacy.ledger import PrivacyLedger
from tests.support.inprocess_grid import InProcessGrid

NUM_NODES = 5
REPO = Path(__file__).resolve().parents[2]



class ServerCrash(RuntimeError):
    """Stands in for the server process dying at a chosen point of a round."""


def _raw(tmp_path: Path, name: str, rounds: int, **extra) -> dict:
    return {
        "device": "cpu", "model": "logreg", "local-epochs": 1, "clients-per-round": 3,
        "num-server-rounds": rounds, "output-dir": str(tmp_path), "run-name": name, "seed": 7,
        **extra,
    }


def _run(raw: dict) -> RunDirectory:
    grid = InProcessGrid(client_app, NUM_NODES, run_config=raw)
    return run_pollen(grid, parse_run_config(raw))


def _crash(monkeypatch, at_round: int, where: str) -> None:
    """Make the server die in round ``at_round``, ``before`` or ``after`` its checkpoint.

    ``before``: the round's metrics row, model.pt and (with DP) ledger record are on disk,
    its checkpoint is not — the window in which resume must re-run the round.
    """
    save = RunDirectory.save_checkpoint

    def dying_save(self, state):
        if state["round"] == at_round and where == "before":
            raise ServerCrash(f"killed before checkpoint {at_round}")
        save(self, state)
        if state["round"] == at_round and where == "after":
            raise ServerCrash(f"killed after checkpoint {at_round}")

    monkeypatch.setattr(RunDirectory, "save_checkpoint", dying_save)


def _rows(run: RunDirectory) -> list[dict]:
    """Metric rows without timings (the only fields that may differ between two runs)."""
    return [{k: v for k, v in row.items() if not k.endswith("_s")} for row in run.read_metrics()]


def _ledger_lines(run: RunDirectory) -> list[dict]:
    path = PrivacyLedger.for_run(run.path).path
    return [json.loads(line) for line in path.read_text().splitlines()]


def _assert_same_state(a: dict, b: dict, path: str = "") -> None:
    """Nested checkpoint state (tensors, arrays, numbers, RNG states) bitwise equal."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k, value in a.items():
            _assert_same_state(value, b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_state(x, y, f"{path}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    elif isinstance(a, np.ndarray):
        np.testing.assert_array_equal(a, b, err_msg=path)
    else:
        assert a == b or (np.isnan(a) and np.isnan(b)), path


SCENARIOS = {
    # central DP (Poisson cohorts, noise RNG in the checkpoint) + Nesterov block momentum
    "dp-block-momentum": {
        "dp": "clip", "dp-clip": 0.5, "dp-noise-multiplier": 0.5, "strategy": "block-momentum",
        "block-momentum": 0.6, "nesterov": True,
    },
    # AMSGrad moments + a stateful codec whose error-feedback memory lives on disk
    "amsgrad-topk-ef": {
        "strategy": "amsgrad", "server-lr": 0.03, "codec": "topk", "topk-ratio": 0.2,
        "client-state-dir": "{tmp}/client-state",
    },
    # adaptive clipping (the clip norm is server state) with Adam
    "dp-adaptive-adam": {
        "dp": "clip", "dp-adaptive": True, "dp-noise-multiplier": 0.2, "dp-sampling": "fixed",
        "strategy": "adam", "server-lr": 0.03,
    },
}
DP = "dp-block-momentum"


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """Uninterrupted 5-round runs, one per scenario, made on first use and shared."""
    root = tmp_path_factory.mktemp("references")
    made: dict[str, RunDirectory] = {}

    def reference(scenario: str) -> RunDirectory:
        if scenario not in made:
            made[scenario] = _run(_raw(root, scenario, 5, **_extra(scenario, root)))
        return made[scenario]

    return reference


def _extra(scenario: str, tmp_path: Path) -> dict:
    return {k: v.format(tmp=tmp_path) if isinstance(v, str) else v for k, v in SCENARIOS[scenario].items()}


def _assert_same_run(resumed: RunDirectory, reference: RunDirectory, rounds: int = 5) -> None:
    """Bitwise: final model, strategy state, metric rows (timings aside), ledger file."""
    expected = torch.load(reference.path / "model.pt")
    final = torch.load(resumed.path / "model.pt")
    assert expected.keys() == final.keys()
    for k in expected:
        assert torch.equal(expected[k], final[k]), k
    _assert_same_state(reference.load_checkpoint()["strategy"], resumed.load_checkpoint()["strategy"])
    assert [r["round"] for r in resumed.read_metrics()] == list(range(1, rounds + 1))
    assert _rows(resumed) == _rows(reference)
    assert json.loads((resumed.path / "summary.json").read_text())["rounds"] == rounds
    if PrivacyLedger.for_run(reference.path).path.exists():
        assert [r["round"] for r in _ledger_lines(resumed)] == list(range(1, rounds + 1))
        assert _ledger_lines(resumed) == _ledger_lines(reference)


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_crash_after_checkpoint_then_resume_is_bitwise_the_uninterrupted_run(
    scenario, references, tmp_path, monkeypatch
):
    extra = _extra(scenario, tmp_path)
    with monkeypatch.context() as patch:
        _crash(patch, at_round=2, where="after")
        with pytest.raises(ServerCrash):
            _run(_raw(tmp_path, scenario, 3, **extra))
    crashed = RunDirectory(tmp_path / scenario)
    assert [r["round"] for r in crashed.read_metrics()] == [1, 2]
    assert not (crashed.path / "summary.json").exists()
    resumed = _run(_raw(tmp_path, scenario, 5, resume=True, **extra))
    _assert_same_run(resumed, references(scenario))


def test_crash_between_ledger_and_checkpoint_counts_every_release_once(references, tmp_path, monkeypatch):
    """Round 3's release is in the ledger and its row in metrics.jsonl, its checkpoint is not."""
    extra = _extra(DP, tmp_path)
    with monkeypatch.context() as patch:
        _crash(patch, at_round=3, where="before")
        with pytest.raises(ServerCrash):
            _run(_raw(tmp_path, "crashed", 5, **extra))
    crashed = RunDirectory(tmp_path / "crashed")
    before = crashed.metrics_path.read_text().splitlines()
    assert [r["round"] for r in crashed.read_metrics()] == [1, 2, 3]
    assert [r["round"] for r in _ledger_lines(crashed)] == [1, 2, 3]
    assert crashed.load_checkpoint()["round"] == 2

    resumed = _run(_raw(tmp_path, "crashed", 5, resume=True, **extra))
    _assert_same_run(resumed, references(DP))  # includes: each release once in the ledger file
    # rows up to the checkpoint are kept as written; the orphaned row 3 was replaced once
    assert resumed.metrics_path.read_text().splitlines()[:2] == before[:2]
    rows = resumed.read_metrics()
    epsilon = PrivacyLedger.for_run(resumed.path).epsilon("rdp", delta=1e-5)
    assert rows[-1]["epsilon"] == pytest.approx(epsilon, rel=1e-12)
    assert json.loads((resumed.path / "privacy" / "report.json").read_text())["rounds"] == 5


def test_crash_mid_round_with_a_stateful_codec_resumes_to_the_same_model(references, tmp_path, monkeypatch):
    scenario = "amsgrad-topk-ef"
    extra = _extra(scenario, tmp_path)
    with monkeypatch.context() as patch:
        _crash(patch, at_round=3, where="before")
        with pytest.raises(ServerCrash):
            _run(_raw(tmp_path, scenario, 5, **extra))
    _assert_same_run(_run(_raw(tmp_path, scenario, 5, resume=True, **extra)), references(scenario))


def test_budget_stop_is_the_same_after_a_crash_in_the_last_affordable_round(tmp_path, monkeypatch):
    # q = 3/5, z = 1: epsilon after 3 releases is about 21.2, after 4 about 24.9
    extra = {"dp": "clip", "dp-noise-multiplier": 1.0, "dp-sampling": "fixed", "dp-target-epsilon": 23.0}
    reference = _run(_raw(tmp_path, "reference", 6, **extra))
    assert len(reference.read_metrics()) == 3
    with monkeypatch.context() as patch:
        _crash(patch, at_round=3, where="before")
        with pytest.raises(ServerCrash):
            _run(_raw(tmp_path, "crashed", 6, **extra))
    _assert_same_run(_run(_raw(tmp_path, "crashed", 6, resume=True, **extra)), reference, rounds=3)


def test_killed_before_the_first_checkpoint_resumes_from_round_one(references, tmp_path, monkeypatch):
    extra = _extra(DP, tmp_path)
    with monkeypatch.context() as patch:
        _crash(patch, at_round=1, where="before")
        with pytest.raises(ServerCrash):
            _run(_raw(tmp_path, "crashed", 5, **extra))
    crashed = RunDirectory(tmp_path / "crashed")
    assert crashed.load_checkpoint() is None and len(_ledger_lines(crashed)) == 1
    _assert_same_run(_run(_raw(tmp_path, "crashed", 5, resume=True, **extra)), references(DP))


def test_a_torn_metrics_line_is_dropped_and_the_round_rerun(references, tmp_path):
    extra = _extra(DP, tmp_path)
    run = _run(_raw(tmp_path, "torn", 2, **extra))
    with open(run.metrics_path, "a") as fh:  # killed in the middle of writing row 3
        fh.write('{"round": 3, "train_loss": 0.')
    _assert_same_run(_run(_raw(tmp_path, "torn", 5, resume=True, **extra)), references(DP))


def test_resume_checks_the_run_and_pollen_resume_builds_its_config(tmp_path, capsys):
    run = _run(_raw(tmp_path, "run", 1, lr=0.07))
    with pytest.raises(ConfigError, match=r"keys differ .*lr: 0.07 -> 0.1") as err:
        _run(_raw(tmp_path, "run", 2, resume=True, lr=0.1))
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="holds no run to resume"):
        _run(_raw(tmp_path, "never-started", 2, resume=True))

    moved = tmp_path / "elsewhere"
    moved.mkdir()
    run.path.rename(moved / "run")
    config, num_nodes = resume_run_config(moved / "run", "num-server-rounds=4")
    assert num_nodes == NUM_NODES
    assert config["resume"] is True and config["num-server-rounds"] == 4 and config["lr"] == 0.07
    assert config["output-dir"] == str(moved.resolve()) and config["run-name"] == "run"
    assert parse_run_config(config).seed == 7
    with pytest.raises(ConfigError, match=r"\['lr'\] cannot change when resuming"):
        resume_run_config(moved / "run", "lr=0.1")
    assert pollen_main(["resume", str(tmp_path / "nothing-here")]) == 2
    assert "is not a Pollen run directory" in capsys.readouterr().err


# --- for real: SIGKILL of the ServerApp process under Flower ------------------------------


def _processes() -> dict[int, tuple[int, str]]:
    """pid → (parent pid, command line) of every visible process (Linux /proc)."""
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            table[int(entry.name)] = (int(stat[stat.rfind(")") + 2 :].split()[1]), cmdline)
    return table


def _serverapp_process(root: int) -> int | None:
    """The descendant of ``root`` that hosts the ServerApp.

    Flower 1.42 simulation: ``pollen run`` → ``flower-superlink`` → ``flower-superexec`` (own
    session) → ``flwr-simulation``, which runs the ServerApp and drives Ray's ClientApp
    actors (a deployment runs it in ``flwr-serverapp`` instead).
    """
    table = _processes()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    stack = [root]
    while stack:
        for child in children.get(stack.pop(), []):
            if any(name in table[child][1] for name in ("flwr-simulation", "flwr-serverapp")):
                return child
            stack.append(child)
    return None


@pytest.mark.e2e
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the ServerApp process through /proc")
def test_sigkill_of_the_serverapp_then_pollen_resume_matches_an_uninterrupted_run(tmp_path):
    """Kill the process hosting the ServerApp mid-run, ``pollen resume``, compare.

    Cohorts are the whole federation (``clients-per-round`` = nodes, fixed DP sampling with
    q = 1): Flower numbers a simulation's nodes randomly per run, so partial cohorts, drawn
    by position among node ids, would pick other partitions in another Flower run.
    Slow-client faults (every client sleeps 0.6 s) only pace the rounds so that the kill
    lands mid-run; they do not change any update, and the in-process reference skips them.

    Equality is to float tolerance, not bitwise: the resumed run's clients are other
    processes (Ray actors, one torch thread each) and replies arrive in another order, so
    the float64 sums and float32 casts may round differently in the last bit.
    """
    config = {
        "num-server-rounds": 6, "clients-per-round": 4, "local-epochs": 1, "model": "logreg",
        "device": "cpu", "seed": 3, "dp": "clip", "dp-clip": 0.5, "dp-noise-multiplier": 0.5,
        "dp-sampling": "fixed", "strategy": "block-momentum", "block-momentum": 0.5,
    }
    overrides = " ".join(f"{k}={json.dumps(v)}" for k, v in config.items())
    killed_dir = tmp_path / "killed"
    log_path = tmp_path / "killed.log"
    started = time.monotonic()
    with open(log_path, "w") as log:
        pollen = subprocess.Popen(
            [
                sys.executable, "-m", "fedserver.cli", "run", "-c", overrides,
                "-c", f"output-dir={tmp_path} run-name=killed fault-slow-rate=1.0 fault-slow-seconds=0.6",
                "-f", "num-supernodes=4", "--timeout", "600",
            ],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        metrics = killed_dir / "metrics.jsonl"
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
            assert pollen.poll() is None, f"pollen run ended early:\n{log_path.read_text()[-3000:]}"
            assert time.monotonic() - started < 600, "no 2 rounds within 600 s"
            time.sleep(0.05)
        server = _serverapp_process(pollen.pid)
        assert server is not None, "no flwr-simulation/flwr-serverapp process under pollen run"
        os.kill(server, signal.SIGKILL)
        killed_rows = len(metrics.read_text().splitlines())
    finally:
        pollen.send_signal(signal.SIGTERM)  # pollen stops its SuperLink and everything under it
        try:
            pollen.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(pollen.pid, signal.SIGKILL)
            pollen.wait()
    assert 2 <= killed_rows < 6, f"the kill was not mid-run ({killed_rows} rows)"
    assert not (killed_dir / "summary.json").exists()
    written = RunDirectory(killed_dir).read_metrics()
    checkpointed = RunDirectory(killed_dir).load_checkpoint()["round"]

    assert pollen_main(["resume", str(killed_dir), "--timeout", "600"]) == 0
    resumed = RunDirectory(killed_dir)
    rows = resumed.read_metrics()
    assert [r["round"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[:checkpointed] == written[:checkpointed]  # rows already written stay valid

    reference = _run_reference(tmp_path, config)
    expected = torch.load(reference.path / "model.pt")
    final = torch.load(resumed.path / "model.pt")
    for k in expected:
        torch.testing.assert_close(final[k], expected[k], rtol=1e-5, atol=1e-6)
    # the ledger: each of the 6 releases exactly once, with the reference run's parameters
    got, want = _ledger_lines(resumed), _ledger_lines(reference)
    assert [r["round"] for r in got] == [1, 2, 3, 4, 5, 6]
    for g, w in zip(got, want):
        g_acc = RoundRelease.from_json(json.dumps({**g, "participants": []}))
        w_acc = RoundRelease.from_json(json.dumps({**w, "participants": []}))
        assert g_acc == w_acc and len(g["participants"]) == len(w["participants"]) == 4
    assert rows[-1]["epsilon"] == pytest.approx(reference.read_metrics()[-1]["epsilon"], rel=1e-12)


def _run_reference(tmp_path: Path, config: dict) -> RunDirectory:
    raw = {**config, "output-dir": str(tmp_path), "run-name": "reference"}
    grid = InProcessGrid(client_app, 4, run_config=raw)
    return run_pollen(grid, parse_run_config(raw))
