"""The server-optimizer interface: how the global model moves given the mean client delta.

Every server algorithm in Pollen (FedAvg with a server learning rate, block momentum,
FedAdam/FedAMS/FedYogi) is one :class:`ServerOptimizer`. The round loop only ever calls
:meth:`ServerOptimizer.send_point` before it dispatches a round and
:meth:`ServerOptimizer.step` after it has aggregated the replies, so algorithms never leak
into the loop. Optimizer state (momentum buffers, moment estimates, the step count) lives
in the optimizer and round-trips through :meth:`state_dict` / :meth:`load_state_dict`,
which is what a checkpoint stores.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import ClassVar

import numpy as np

Params = dict[str, np.ndarray]
"""A model as a state dict: parameter name → NumPy array (float32 in Pollen)."""

StateDict = dict[str, np.ndarray | float | int]
"""A flat optimizer state: ``"num_steps"`` plus one ``"<buffer>/<param name>"`` array each."""

_SEPARATOR = "/"


class ServerOptimizer(ABC):
    """A server-side optimizer over model state dicts.

    Subclasses implement :meth:`step` and declare the names of their per-parameter
    buffers in ``buffer_names``; the base class owns the step count, the buffers, their
    lazy creation (shapes are only known at the first step) and checkpointing.

    Arrays passed in are never modified: every step returns fresh arrays, so the caller
    may keep the previous model (e.g. as a sent version for the asynchronous driver).

    Parameters
    ----------
    server_lr : float
        Server (outer, block) learning rate ``η`` that multiplies the update direction.
    """

    name: ClassVar[str]
    """Registry name, used in configs and logs."""
    buffer_names: ClassVar[tuple[str, ...]] = ()
    """Names of the per-parameter state buffers, in the order they are created."""

    def __init__(self, server_lr: float) -> None:
        self.server_lr = float(server_lr)
        self.num_steps = 0
        self._buffers: dict[str, Params] = {}

    def send_point(self, params: Params) -> Params:
        """The point clients start from this round; client deltas are relative to it.

        The default is the global model itself (returned as is, not copied).
        """
        return params

    @abstractmethod
    def step(self, params: Params, mean_delta: Params) -> Params:
        """New global params from the current ones and the weighted mean client delta.

        Parameters
        ----------
        params : Params
            Current global model ``x`` (not the send point).
        mean_delta : Params
            ``Δ̄ = Σ p_i (x_i − send_point(x))``, same keys and shapes as ``params``.
            It is cast to each parameter's dtype, so buffers keep the model's dtype.

        Returns
        -------
        Params
            New arrays; neither argument is modified.
        """

    def state_dict(self) -> StateDict:
        """Everything needed to resume bit-exactly: the step count and copies of all buffers."""
        state: StateDict = {"num_steps": self.num_steps}
        for buffer_name, buffer in self._buffers.items():
            for key, value in buffer.items():
                state[f"{buffer_name}{_SEPARATOR}{key}"] = value.copy()
        return state

    def load_state_dict(self, state: Mapping[str, np.ndarray | float | int]) -> None:
        """Restore a state produced by :meth:`state_dict` of the same optimizer class.

        Accepts the values back as NumPy scalars or 0-d arrays, as ``np.savez`` returns them.

        Raises
        ------
        ValueError
            If ``num_steps`` is missing or negative, a key names a buffer this optimizer
            does not have, or (after at least one step) a buffer is missing or the buffers
            cover different parameter names.
        """
        if "num_steps" not in state:
            raise ValueError(f"{type(self).__name__} state has no 'num_steps' entry")
        num_steps = int(np.asarray(state["num_steps"]))
        if num_steps < 0:
            raise ValueError(f"state 'num_steps' must be >= 0, got {num_steps}")
        buffers: dict[str, Params] = {}
        for full_key, value in state.items():
            if full_key == "num_steps":
                continue
            buffer_name, sep, key = full_key.partition(_SEPARATOR)
            if not sep or buffer_name not in self.buffer_names:
                raise ValueError(
                    f"unexpected state key {full_key!r} for {type(self).__name__}; expected "
                    f"'num_steps' and '<buffer>/<param>' keys with buffer in {self.buffer_names}"
                )
            buffers.setdefault(buffer_name, {})[key] = np.array(value, copy=True)
        if buffers or num_steps > 0:
            missing = [b for b in self.buffer_names if b not in buffers]
            if missing:
                raise ValueError(f"{type(self).__name__} state is missing buffers {missing}")
            key_sets = {b: sorted(buffers[b]) for b in self.buffer_names}
            if len({tuple(k) for k in key_sets.values()}) > 1:
                raise ValueError(f"state buffers cover different parameters: {key_sets}")
        self.num_steps = num_steps
        self._buffers = buffers

    def _checked_delta(self, params: Params, mean_delta: Params) -> Params:
        """``mean_delta`` cast to the params' dtypes, after checking keys and shapes match."""
        if params.keys() != mean_delta.keys():
            missing = sorted(params.keys() - mean_delta.keys())
            extra = sorted(mean_delta.keys() - params.keys())
            raise ValueError(
                f"mean_delta keys differ from params keys: missing {missing}, unexpected {extra}"
            )
        delta: Params = {}
        for key, value in params.items():
            d = np.asarray(mean_delta[key])
            if d.shape != value.shape:
                raise ValueError(
                    f"mean_delta[{key!r}] has shape {d.shape}, params has {value.shape}"
                )
            delta[key] = d.astype(value.dtype, copy=False)
        return delta

    def _buffer(self, buffer_name: str, params: Params) -> Params:
        """The named buffer, created as zeros shaped like ``params`` on first use."""
        if buffer_name not in self._buffers:
            self._buffers[buffer_name] = {k: np.zeros_like(v) for k, v in params.items()}
        buffer = self._buffers[buffer_name]
        if buffer.keys() != params.keys():
            raise ValueError(
                f"{type(self).__name__} buffer {buffer_name!r} was built for parameters "
                f"{sorted(buffer)}, but params has {sorted(params)}"
            )
        for key, value in params.items():
            if buffer[key].shape != value.shape:
                raise ValueError(
                    f"{type(self).__name__} buffer {buffer_name!r}[{key!r}] has shape "
                    f"{buffer[key].shape}, params has {value.shape}"
                )
        return buffer

    def __repr__(self) -> str:
        return f"{type(self).__name__}(server_lr={self.server_lr}, num_steps={self.num_steps})"
