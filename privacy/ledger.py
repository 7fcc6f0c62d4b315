"""Append-only, crash-safe JSONL ledger of a run's DP releases (``run_dir/privacy/ledger.jsonl``).

The ledger stores :class:`~privacy.events.RoundRelease` events, not epsilons, so ε can be
recomputed by any accountant, now or by an auditor later. Each record is one line, written and
``os.fsync``-ed before :meth:`PrivacyLedger.append` returns; the server publishes a round's model
only after that, so a published model is never missing from the ledger.

Crash semantics: a record is complete once its newline is on disk. A process killed mid-write
leaves at most one torn (newline-less) tail; reading ignores it and the next append truncates it
first. The torn record's model was never published (its append never returned), so dropping it
loses nothing. Appends are idempotent per round: a resumed run that re-records round r does not
count it twice.
"""

from __future__ import annotations

import os
from pathlib import Path

from privacy.accountants.base import Accountant
from privacy.accountants.registry import build_accountant
from privacy.events import RoundRelease

LEDGER_PATH = Path("privacy") / "ledger.jsonl"


class LedgerConflictError(ValueError):
    """A round is recorded twice with different accounting parameters."""


def _read_records(path: Path) -> tuple[list[RoundRelease], int]:
    """Complete records in file order and the length of a torn tail (0 if none)."""
    data = path.read_bytes() if path.exists() else b""
    complete, _, torn = data.rpartition(b"\n")
    releases = []
    if complete:
        for lineno, line in enumerate(complete.split(b"\n"), start=1):
            try:
                releases.append(RoundRelease.from_json(line.decode("utf-8")))
            except (ValueError, TypeError, UnicodeDecodeError) as error:
                raise ValueError(f"{path}:{lineno}: corrupt ledger record ({error})") from error
    return releases, len(torn)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class PrivacyLedger:
    """The DP releases of one run, backed by an append-only JSONL file.

    Parameters
    ----------
    path
        The ledger file (created on first append, with its directory). Opening never writes; use
        :meth:`for_run` for the standard location inside a run directory.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._releases: dict[int, RoundRelease] = {}
        self.torn_bytes = 0
        self.load()

    @classmethod
    def for_run(cls, run_dir: str | os.PathLike) -> PrivacyLedger:
        """The ledger at ``run_dir/privacy/ledger.jsonl``."""
        return cls(Path(run_dir) / LEDGER_PATH)

    def load(self) -> list[RoundRelease]:
        """Re-read the file; a torn last line is ignored (see :attr:`torn_bytes`).

        A duplicate round keeps its first record, as :meth:`append` would have; one with other
        accounting parameters raises :class:`LedgerConflictError`. Corrupt complete lines raise
        ``ValueError``: they are not crash debris but damage to investigate.
        """
        records, self.torn_bytes = _read_records(self.path)
        self._releases = {}
        for release in records:
            self._admit(release)
        return self.releases

    @property
    def releases(self) -> list[RoundRelease]:
        """Recorded releases in round order."""
        return [self._releases[r] for r in sorted(self._releases)]

    def __len__(self) -> int:
        return len(self._releases)

    def __contains__(self, server_round: int) -> bool:
        return server_round in self._releases

    def _admit(self, release: RoundRelease) -> bool:
        existing = self._releases.get(release.round)
        if existing is None:
            self._releases[release.round] = release
            return True
        if existing.mechanism != release.mechanism:
            raise LedgerConflictError(
                f"round {release.round} is already recorded with {existing.mechanism}; "
                f"refusing to record it again with {release.mechanism}"
            )
        return False

    def append(self, release: RoundRelease) -> bool:
        """Durably record ``release``; returns ``False`` if its round is already recorded.

        The line is written, flushed and fsync-ed before returning. Re-recording a round with the
        same accounting parameters is a no-op (other fields, e.g. participants, keep the first
        record); different parameters raise :class:`LedgerConflictError`.
        """
        if release.round in self._releases:
            return self._admit(release)
        line = (release.to_json() + "\n").encode("utf-8")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        created = not self.path.exists()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            self._truncate_torn_tail(fd)
            view = memoryview(line)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:
            _fsync_directory(self.path.parent)
        self._releases[release.round] = release
        return True

    def _truncate_torn_tail(self, fd: int) -> None:
        """Cut a newline-less tail left by a killed writer so the next record starts a line."""
        size = os.fstat(fd).st_size
        if size == 0:
            return
        tail = os.pread(fd, 1, size - 1)
        if tail == b"\n":
            return
        data = os.pread(fd, size, 0)
        os.ftruncate(fd, data.rfind(b"\n") + 1)
        os.fsync(fd)
        self.torn_bytes = 0

    def accountant(self, name: str = "rdp") -> Accountant:
        """A fresh accountant of kind ``name`` with every recorded release composed."""
        accountant = build_accountant(name)
        for release in self.releases:
            accountant.compose(release)
        return accountant

    def epsilon(self, accountant: str = "rdp", delta: float = 1e-5) -> float:
        """ε of all recorded releases, recomputed from the events."""
        return self.accountant(accountant).epsilon(delta)
