"""Pollen's send-and-receive: every reply collected, cost-aware polling, Flower's timeout semantics.

A fake clock replaces ``time`` in the module, so the tests are exact and take no real time:
each message's reply becomes available at a scripted moment and each pull costs scripted
seconds, as pulls from a SuperLink do.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from strategies import exchange
from strategies.exchange import pull_pause, send_and_receive


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.now += seconds


class ScriptedGrid:
    """Replies to message ``i`` become pullable at ``ready[i]`` (None: never); a pull costs ``cost`` s."""

    def __init__(self, clock: FakeClock, ready: list[float | None], cost: float) -> None:
        self.clock, self.ready, self.cost = clock, ready, cost
        self.pulls: list[float] = []  # clock time of each pull
        self._out: dict[str, int] = {}

    def push_messages(self, messages):
        ids = []
        for i, _ in enumerate(messages):
            self._out[f"m{i}"] = i
            ids.append(f"m{i}")
        return ids

    def pull_messages(self, message_ids):
        self.pulls.append(self.clock.now)
        self.clock.now += self.cost
        replies = []
        for mid in list(message_ids):
            i = self._out.get(mid)
            if i is not None and self.ready[i] is not None and self.ready[i] <= self.pulls[-1]:
                del self._out[mid]
                replies.append(SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=mid), index=i))
        return replies


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(exchange, "time", fake)
    return fake


def test_pause_follows_pull_cost():
    assert pull_pause(0.0) == exchange.MIN_INTERVAL
    assert pull_pause(0.02) == pytest.approx(10 * 0.02)
    assert pull_pause(5.0) == exchange.MAX_INTERVAL


def test_collects_every_reply_soon_after_the_last_arrives(clock):
    ready = [0.3, 0.05, 1.234, 0.9]
    grid = ScriptedGrid(clock, ready, cost=0.001)
    replies = send_and_receive(grid, [object()] * 4, timeout=60)
    assert sorted(r.index for r in replies) == [0, 1, 2, 3]
    assert [r.index for r in replies] == [1, 0, 3, 2]  # arrival order
    # Cheap pulls: the last reply is picked up within one minimum interval (+ one pull).
    assert clock.now - max(ready) <= exchange.MIN_INTERVAL + 2 * grid.cost + 1e-9
    # ...whereas Flower's in-memory grid (0.1 s) or gRPC grid (3 s) could wait up to that long.


def test_costly_pulls_are_spaced_out(clock):
    grid = ScriptedGrid(clock, [10.0], cost=0.05)
    send_and_receive(grid, [object()], timeout=60)
    gaps = [b - a for a, b in zip(grid.pulls, grid.pulls[1:])]
    # Each pull costs 0.05 s, so polling occupies at most 1/(1 + cost_factor) of the time.
    assert all(gap >= grid.cost * (1 + exchange.COST_FACTOR) - 1e-9 for gap in gaps)
    assert len(grid.pulls) <= 10.0 / (grid.cost * (1 + exchange.COST_FACTOR)) + 2


def test_timeout_returns_what_arrived_and_pulls_once_at_the_deadline(clock):
    ready = [0.2, None, 4.999]
    grid = ScriptedGrid(clock, ready, cost=0.0)
    replies = send_and_receive(grid, [object()] * 3, timeout=5.0)
    assert sorted(r.index for r in replies) == [0, 2]
    assert grid.pulls[-1] == pytest.approx(5.0)
    assert clock.now == pytest.approx(5.0)


def test_no_timeout_waits_for_all(clock):
    grid = ScriptedGrid(clock, [1000.0, 2.0], cost=0.0)
    replies = send_and_receive(grid, [object()] * 2, timeout=None)
    assert sorted(r.index for r in replies) == [0, 1]
    assert clock.now >= 1000.0


def test_nothing_to_send_pulls_nothing(clock):
    grid = ScriptedGrid(clock, [], cost=0.0)
    assert send_and_receive(grid, [], timeout=1.0) == []
    assert grid.pulls == []
