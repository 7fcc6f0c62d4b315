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

    def encode(
        self,
        delta: Params,
        state: Params,
        transform: Callable[[Params], tuple[Params, dict[str, float]]] | None = None,
    ) -> tuple[dict[str, np.ndarray], dict, Params, dict[str, float]]:
        """Return ``(payload, header, new_state, metrics)``.

        ``transform`` (this round's, e.g. clipping to the server's current C) overrides the
        encoder's own.
        """
        metrics: dict[str, float] = {}
        transform = transform or self.transform
        if self.error_feedback is None:
            if transform is not None:
                delta, extra = transform(delta)
                metrics.update(extra)
            payload, header, _ = self.codec.encode(delta, {})
            new_state = dict(state)
        else:
            bound = None
            if transform is not None:
                # Bound the memory-corrected vector that is actually encoded (not the raw
                # delta), so the decoded update stays within C up to codec rounding.
                def bound(corrected: Params) -> Params:
                    bounded, extra = transform(corrected)
                    metrics.update(extra)
                    return bounded

            memory = {k[len(MEMORY_PREFIX):]: v for k, v in state.items() if k.startswith(MEMORY_PREFIX)}
            payload, header, memory, _ = self.error_feedback.encode(delta, memory, {}, bound)
            new_state = {k: v for k, v in state.items() if not k.startswith(MEMORY_PREFIX)}
            new_state.update({MEMORY_PREFIX + k: v for k, v in memory.items()})
            metrics["ef_norm"] = float(
                np.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in memory.values()))
            )
        metrics["payload_bytes"] = payload_nbytes(payload)
        return payload, header, new_state, metrics


def client_side_dp(clip: float, mode: str) -> Callable[[Params], tuple[Params, dict[str, float]]]:
    """Clip or normalize on the client (``dp-where=client``) before anything is encoded.

    The codec and its error feedback then only ever see an update of norm ≤ C, so what the
    server receives is a function of the bounded update alone. The client reports whether
    its update was within C (``dp_unclipped``), which adaptive clipping needs.
    """
    from privacy.mechanisms import prepare_client_update

    def transform(delta: Params) -> tuple[Params, dict[str, float]]:
        bounded, unclipped = prepare_client_update(delta, clip=clip, mode=mode)
        return bounded, {"dp_unclipped": float(unclipped)}

    return transform
