"""Fault injection for simulations: dropouts, crashes, corrupt updates and slow clients.

Faults are decided per (seed, round, client) by a dedicated random stream, so a faulty run
is reproducible and the same clients misbehave in every layout. They exercise the server's
real defences: an error reply (dropout, crash), validation (corrupt updates) and the round
timeout (slow clients).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

Params = dict[str, np.ndarray]

FAULT_STREAM = 0xFA17  # keeps fault draws independent of every other random stream


class SimulatedFault(RuntimeError):
    """Raised inside the ClientApp to model a client that drops out or crashes."""


@dataclass(frozen=True)
class FaultPlan:
    dropout_rate: float = 0.0
    crash_rate: float = 0.0
    corrupt_rate: float = 0.0
    slow_rate: float = 0.0
    slow_seconds: float = 5.0
    seed: int = 0

    @property
    def active(self) -> bool:
        return (self.dropout_rate + self.crash_rate + self.corrupt_rate + self.slow_rate) > 0

    def decide(self, server_round: int, client_id: int) -> str | None:
        """``"dropout"``, ``"crash"``, ``"corrupt"``, ``"slow"`` or ``None`` for this client."""
        if not self.active:
            return None
        u = np.random.default_rng([self.seed, server_round, client_id, FAULT_STREAM]).random()
        for name, rate in (
            ("dropout", self.dropout_rate),
            ("crash", self.crash_rate),
            ("corrupt", self.corrupt_rate),
            ("slow", self.slow_rate),
        ):
            if u < rate:
                return name
            u -= rate
        return None

    def before_training(self, fault: str | None) -> None:
        if fault == "dropout":
            raise SimulatedFault("simulated dropout: the client left before training")
        if fault == "slow":
            time.sleep(self.slow_seconds)

    def after_training(self, fault: str | None, payload: dict[str, np.ndarray], server_round: int, client_id: int) -> dict[str, np.ndarray]:
        """Crash after the work was done, or corrupt the encoded payload in one of three ways."""
        if fault == "crash":
            raise SimulatedFault("simulated crash during training")
        if fault != "corrupt":
            return payload
        kind = int(np.random.default_rng([self.seed, server_round, client_id, FAULT_STREAM, 1]).integers(3))
        corrupted = dict(payload)
        name = min(corrupted)
        values = np.array(corrupted[name], copy=True)
        is_float = np.issubdtype(values.dtype, np.floating)
        if kind == 0:  # bad values: NaN, or garbled bytes for an entropy-coded payload
            if is_float and values.size:
                values.flat[0] = np.nan
            else:
                values = values.view(np.uint8).copy()
                values[:8] ^= 0xFF
        elif kind == 1:  # wrong shape / length
            values = np.concatenate([values.ravel(), np.zeros(7, dtype=values.dtype)])
        else:  # absurd magnitude, or a truncated stream
            values = values * np.float32(1e6) + np.float32(1e3) if is_float else values.ravel()[: values.size // 2]
        corrupted[name] = values
        return corrupted
