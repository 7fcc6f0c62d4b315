"""A Flower ``Grid`` that delivers messages to ClientApps in this process.

It exercises the real ClientApp and the real Message/record objects without starting a
SuperLink, so strategy tests and algorithm benchmarks stay fast and deterministic. Each node
keeps its own ``Context`` (node config and ``state``) across messages, as a SuperNode does.
A message is delivered (its ClientApp runs) when its reply is pulled, so replies can be
pulled in any order, as from a SuperLink with clients of different speeds.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence

from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity


class InProcessGrid(Grid):
    """Routes each message to ``apps[node]`` (a ClientApp or a callable(msg, ctx) → msg)."""

    def __init__(
        self,
        apps: Sequence[Callable[[Message, Context], Message]] | Callable[[Message, Context], Message],
        num_nodes: int,
        *,
        run_config: dict | None = None,
        node_configs: Sequence[dict] | None = None,
    ) -> None:
        # Messages read the sender's identity from the process-wide TaskIdentity.
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
        self._ids = list(range(1001, 1001 + num_nodes))
        self._apps = apps if isinstance(apps, Sequence) else [apps] * num_nodes
        self._contexts = {
            nid: Context(
                run_id=1,
                node_id=nid,
                node_config=dict(node_configs[i]) if node_configs else {"partition-id": i, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config=dict(run_config or {}),
            )
            for i, nid in enumerate(self._ids)
        }
        self._counter = itertools.count()
        self._pending: dict[str, Message] = {}
        self.delivered: list[int] = []  # node ids in delivery order

    # --- Grid ABC -------------------------------------------------------------------------
    def set_run(self, run) -> None:  # pragma: no cover - not used in-process
        self._run = run

    @property
    def run(self):  # pragma: no cover
        return getattr(self, "_run", None)

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # pragma: no cover
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self._ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            mid = f"m{next(self._counter)}"
            msg.metadata.__dict__["_message_id"] = mid  # normally set by the SuperLink
            self._pending[mid] = msg
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = []
        for mid in message_ids:
            msg = self._pending.pop(mid, None)
            if msg is not None:
                replies.append(self.deliver(msg))
        return replies

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(list(self.push_messages(messages)))

    # --- delivery -----------------------------------------------------------------------
    def deliver(self, msg: Message) -> Message:
        node = msg.metadata.dst_node_id
        index = self._ids.index(node)
        self.delivered.append(node)
        context = self._contexts[node]
        try:
            reply = self._apps[index](msg, context)
        except Exception as err:  # noqa: BLE001 - as a SuperNode, any ClientApp failure becomes an error reply
            reply = Message(Error(code=0, reason=f"{type(err).__name__}: {err}"), reply_to=msg)
        return reply
