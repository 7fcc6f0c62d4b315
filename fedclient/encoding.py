"""Client-side update encoding: (client-side DP transform) → codec with error feedback.

This is the last stage of the client pipeline. Its state — the error-feedback memory — is the
client's own and persists across rounds (``context.state`` in simulation, a state directory
on real devices), so a client that was not sampled for a while still carries its residual.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from strategies.codecs import Codec, ErrorFeedback, payload_nbytes

Params = dict[str, np.ndarray]

MEMORY_PREFIX = "ef/"


class UpdateEncoder:
    """Turns a client delta into the payload that goes on the wire.

    Parameters
    ----------
    codec : Codec
        The same codec class the server decodes with.
    error_feedback : ErrorFeedback, optional
        Error feedback around the codec (``None`` for lossless codecs or when disabled).
    transform : callable, optional
        Applied to the delta before encoding, returning ``(delta, metrics)``; client-side DP
        clipping/normalization plugs in here so that the codec sees exactly the bounded update.
    """

    def __init__(
        self,
        codec: Codec,
        error_feedback: ErrorFeedback | None = None,
        transform: Callable[[Params], tuple[Params, dict[str, float]]] | None = None,
    ) -> None:
        self.codec = codec
        self.error_feedback = error_feedback
        self.transform = transform

    def encode(self, delta: Params, state: Params) -> tuple[dict[str, np.ndarray], dict, Params, dict[str, float]]:
        """Return ``(payload, header, new_state, metrics)``."""
        metrics: dict[str, float] = {}
        if self.transform is not None:
            delta, extra = self.transform(delta)
            metrics.update(extra)
        if self.error_feedback is None:
            payload, header, _ = self.codec.encode(delta, {})
            new_state = dict(state)
        else:
            memory = {k[len(MEMORY_PREFIX):]: v for k, v in state.items() if k.startswith(MEMORY_PREFIX)}
            payload, header, memory, _ = self.error_feedback.encode(delta, memory, {})
            new_state = {k: v for k, v in state.items() if not k.startswith(MEMORY_PREFIX)}
            new_state.update({MEMORY_PREFIX + k: v for k, v in memory.items()})
            metrics["ef_norm"] = float(
                np.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in memory.values()))
            )
        metrics["payload_bytes"] = payload_nbytes(payload)
        return payload, header, new_state, metrics
