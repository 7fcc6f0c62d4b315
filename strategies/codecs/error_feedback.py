"""Error feedback with memory decay: what a lossy codec dropped is added to the next update.

On each client, with memory ``e`` (zeros at first) and decay λ::

    a = g + λ·e          # update plus decayed memory
    q = C(a)             # what the server will decode
    e' = a − q           # what was lost this round

With λ = 1 (classic error feedback) nothing is ever lost for good: ``Σ q_t + e_{T+1} = Σ g_t``.
λ < 1 is CO3's "correct" step (``co3_decay``, 0.9 in the reference code); it forgets old
errors geometrically. If the codec loses at most a fraction q of what it is given,
``‖a − C(a)‖ ≤ q‖a‖``, and ``‖g_t‖ ≤ G``, then ``‖e‖ ≤ qG / (1 − qλ)``: bounded for any λ < 1
as long as q ≤ 1, which holds for rounding to the nearest point of a grid that contains 0
(casts, CO3), for top-k (q² = 1 − k/d) and for scaled sign (q² = 1 − ‖a‖₁² / (d‖a‖²)).
The memory is codec-agnostic and belongs to the client's private state.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from strategies.codecs.base import Codec, CodecSpec, Header, Params, checked_update


class ErrorFeedback:
    """Wraps a codec with a per-client error memory.

    Parameters
    ----------
    codec : Codec
        The (lossy) codec whose error is fed back.
    decay : float
        Memory decay λ in [0, 1]; 1.0 is classic error feedback, 0.0 plain compression.
    """

    def __init__(self, codec: Codec, decay: float) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"error-feedback decay must be in [0, 1], got {decay}")
        self.codec = codec
        self.decay = float(decay)

    def encode(
        self,
        update: Params,
        memory: Params,
        codec_state: Params,
        bound: Callable[[Params], Params] | None = None,
    ) -> tuple[dict[str, np.ndarray], Header, Params, Params]:
        """Encode ``update + decay·memory``; return payload, header, new memory, new codec state.

        ``memory`` is ``{}`` the first time (treated as zeros); after that it must cover the
        same names and shapes as ``update``. ``bound`` (client-side DP clipping) is applied to
        the corrected vector right before encoding, so what is sent is bounded even though
        the memory is added; whatever it cuts off stays in the memory.
        """
        update = checked_update(update)
        if memory:
            if memory.keys() != update.keys():
                raise ValueError(
                    f"error-feedback memory covers {sorted(memory)}, update has {sorted(update)}"
                )
            decay = np.float32(self.decay)
            corrected = {}
            for name, values in update.items():
                if memory[name].shape != values.shape:
                    raise ValueError(
                        f"error-feedback memory[{name!r}] has shape {memory[name].shape}, "
                        f"update has {values.shape}"
                    )
                corrected[name] = values + decay * memory[name].astype(np.float32, copy=False)
        else:
            corrected = update
        sent = corrected if bound is None else checked_update(bound(corrected))
        payload, header, new_state, decoded = self.codec.encode_and_reconstruct(sent, codec_state)
        new_memory = {name: corrected[name] - decoded[name] for name in corrected}
        return payload, header, new_memory, new_state

    def __repr__(self) -> str:
        return f"ErrorFeedback({self.codec!r}, decay={self.decay})"


def build_error_feedback(spec: CodecSpec, codec: Codec) -> ErrorFeedback | None:
    """The client's error feedback for ``spec``, or ``None`` (lossless codec or disabled).

    CO3 uses ``spec.co3_decay`` (its "correct" step); the other lossy codecs ``spec.ef_decay``.
    """
    if codec.lossless or not spec.error_feedback:
        return None
    return ErrorFeedback(codec, spec.co3_decay if spec.name == "co3" else spec.ef_decay)
