"""Send messages and collect their replies over a Flower ``Grid``, polling at a cost-aware pace.

Why not ``Grid.send_and_receive``: Flower's grids sleep a fixed interval between pulls —
0.1 s in the in-memory grid of a simulation and 3 s in the gRPC grid a deployment's ServerApp
process talks to the SuperLink through. A round of
the packed layout (a few workers, ~1 s of training) then waits on average half an interval
after its last reply arrives, and a deployment round up to 3 s. Pulling much more often is
cheap when a pull is cheap (a handful of message ids) and wasteful when it is not (thousands
of ids, each looked up by the SuperLink), so the pause between pulls follows the measured
cost of the last pull: ``max(min_interval, cost_factor × pull time)``, capped at
``max_interval``. With ``cost_factor=10`` polling takes at most ~1/11 of the ServerApp's time,
whatever the number of outstanding messages.

The semantics are Flower's: push everything, then pull until every message has a reply or
``timeout`` seconds have passed; replies are returned in arrival order, missing ones are
simply absent (the caller counts them).
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid

MIN_INTERVAL = 0.01
MAX_INTERVAL = 1.0
COST_FACTOR = 10.0


def pull_pause(
    pull_seconds: float,
    *,
    min_interval: float = MIN_INTERVAL,
    max_interval: float = MAX_INTERVAL,
    cost_factor: float = COST_FACTOR,
) -> float:
    """Seconds to wait before the next pull, given how long the last one took."""
    return min(max_interval, max(min_interval, cost_factor * pull_seconds))


def send_and_receive(
    grid: Grid,
    messages: Iterable[Message],
    *,
    timeout: float | None = None,
    min_interval: float = MIN_INTERVAL,
    max_interval: float = MAX_INTERVAL,
    cost_factor: float = COST_FACTOR,
) -> list[Message]:
    """Push ``messages``, pull their replies until all arrived or ``timeout`` passed.

    ``timeout=None`` waits for every reply.
    """
    waiting = dict.fromkeys(grid.push_messages(messages))  # ordered: pulls ask in send order
    end = None if timeout is None else time.monotonic() + timeout
    replies: list[Message] = []
    while waiting:
        started = time.monotonic()
        arrived = list(grid.pull_messages(list(waiting)))
        took = time.monotonic() - started
        replies.extend(arrived)
        for reply in arrived:
            waiting.pop(reply.metadata.reply_to_message_id, None)
        if not waiting:
            break
        pause = pull_pause(
            took, min_interval=min_interval, max_interval=max_interval, cost_factor=cost_factor
        )
        if end is not None:
            left = end - time.monotonic()
            if left <= 0:
                break
            pause = min(pause, left)
        time.sleep(pause)
    return replies
