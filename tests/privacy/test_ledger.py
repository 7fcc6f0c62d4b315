"""Tests for privacy/ledger.py: SIGKILL durability, torn lines, idempotent rounds, ε from events."""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from privacy.budget import epsilon_for
from privacy.events import RoundRelease
from privacy.ledger import LedgerConflictError, PrivacyLedger

REPO_ROOT = Path(__file__).resolve().parents[2]


def release(server_round, z=1.0, participants=()):
    return RoundRelease(
        round=server_round,
        noise_multiplier=z,
        sample_rate=0.05,
        sampling="poisson",
        population=100,
        cohort_size=5,
        expected_cohort_size=5.0,
        clip=1.0,
        mode="clip",
        participants=participants,
    )


def complete_lines(path):
    data = path.read_bytes()
    return data.rpartition(b"\n")[0].split(b"\n") if b"\n" in data else []


def start_writer(ledger_path, body):
    """A child process that imports the ledger and runs ``body`` (stdout line-buffered to us)."""
    code = textwrap.dedent(
        f"""
        import os, sys, time
        from privacy.events import RoundRelease
        from privacy.ledger import PrivacyLedger

        def release(r):
            return RoundRelease(round=r, noise_multiplier=1.0, sample_rate=0.05,
                                sampling="poisson", population=100, cohort_size=5,
                                expected_cohort_size=5.0, clip=1.0, mode="clip",
                                participants=tuple(range(r % 7)))

        ledger = PrivacyLedger({str(ledger_path)!r})
        """
    ) + textwrap.dedent(body)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env, cwd=REPO_ROOT
    )


def kill(process):
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL


def test_round_trip_and_epsilon_recomputed_from_events(tmp_path):
    ledger = PrivacyLedger.for_run(tmp_path)
    assert ledger.path == tmp_path / "privacy" / "ledger.jsonl" and not ledger.path.exists()
    for r in range(1, 21):
        assert ledger.append(release(r, participants=(r, r + 1)))
    reloaded = PrivacyLedger(ledger.path)
    assert reloaded.releases == ledger.releases and len(reloaded) == 20
    assert reloaded.epsilon("rdp", 1e-5) == pytest.approx(
        epsilon_for(1.0, 0.05, 20, 1e-5), rel=1e-12
    )
    assert reloaded.epsilon("prv", 1e-5) == pytest.approx(
        epsilon_for(1.0, 0.05, 20, 1e-5, accountant="prv"), rel=1e-12
    )


def test_append_is_idempotent_per_round_and_refuses_conflicts(tmp_path):
    ledger = PrivacyLedger(tmp_path / "ledger.jsonl")
    assert ledger.append(release(1, participants=(1, 2)))
    assert not ledger.append(release(1, participants=(3,)))  # a resumed run re-recording round 1
    assert len(complete_lines(ledger.path)) == 1 and ledger.releases[0].participants == (1, 2)
    with pytest.raises(LedgerConflictError, match="round 1 is already recorded"):
        ledger.append(release(1, z=2.0))
    assert 1 in ledger and 2 not in ledger


def test_torn_last_line_from_a_killed_writer_is_ignored_and_repaired(tmp_path):
    path = tmp_path / "ledger.jsonl"
    writer = start_writer(
        path,
        """
        for r in range(1, 6):
            ledger.append(release(r))
        torn = release(6).to_json()[:37].encode()
        fd = os.open(ledger.path, os.O_WRONLY | os.O_APPEND)
        os.write(fd, torn)  # killed mid-record: no newline
        os.fsync(fd)
        print("ready", flush=True)
        time.sleep(60)
        """,
    )
    assert writer.stdout.readline().strip() == "ready"
    kill(writer)
    assert not path.read_bytes().endswith(b"\n")

    ledger = PrivacyLedger(path)
    assert [r.round for r in ledger.releases] == [1, 2, 3, 4, 5]
    assert ledger.torn_bytes == 37
    # the resumed run re-records round 5 (no double count) and goes on; the torn bytes are cut first
    assert not ledger.append(release(5))
    assert ledger.append(release(6))
    lines = complete_lines(path)
    assert path.read_bytes().endswith(b"\n") and len(lines) == 6
    assert [RoundRelease.from_json(line.decode()).round for line in lines] == [1, 2, 3, 4, 5, 6]
    assert PrivacyLedger(path).epsilon("rdp", 1e-5) == pytest.approx(
        epsilon_for(1.0, 0.05, 6, 1e-5)
    )


def test_sigkill_during_appends_loses_no_acknowledged_release(tmp_path):
    path = tmp_path / "ledger.jsonl"
    writer = start_writer(
        path,
        """
        r = 0
        while True:
            r += 1
            ledger.append(release(r))
            print(r, flush=True)  # acknowledged: the round's model could now be published
        """,
    )
    acknowledged = 0
    while acknowledged < 40:
        acknowledged = int(writer.stdout.readline())
    kill(writer)  # lands at an arbitrary point of some later append

    ledger = PrivacyLedger(path)
    rounds = [r.round for r in ledger.releases]
    assert rounds == list(range(1, len(rounds) + 1))  # no gaps, no duplicates
    assert len(rounds) >= acknowledged
    assert len(complete_lines(path)) == len(rounds)
    # resume: re-record the last two rounds, then continue
    last = len(rounds)
    for r in range(last - 1, last + 4):
        ledger.append(release(r, participants=tuple(range(r % 7))))
    final = PrivacyLedger(path)
    assert [r.round for r in final.releases] == list(range(1, last + 4))
    assert final.epsilon("rdp", 1e-5) == pytest.approx(epsilon_for(1.0, 0.05, last + 3, 1e-5))


def test_corrupt_complete_line_is_an_error_not_crash_debris(tmp_path):
    path = tmp_path / "ledger.jsonl"
    ledger = PrivacyLedger(path)
    ledger.append(release(1))
    with path.open("ab") as handle:
        handle.write(b"{not json}\n")
    ledger.append(release(3))
    with pytest.raises(ValueError, match=r"ledger.jsonl:2: corrupt ledger record"):
        PrivacyLedger(path)
