"""The update-codec interface (:class:`Codec`), its configuration (:class:`CodecSpec`) and the name registry.

A codec turns a client's dense float32 update into the arrays that actually travel
(``payload``) plus a few scalars (``header``, sent as a Flower ``ConfigRecord``), and back.
The server decodes every reply before privacy or aggregation see it, so :meth:`Codec.decode`
is also the first line of defence against malformed client updates: it checks everything it
reads and raises :class:`CodecError` with a message that names the problem.

Array order is canonical: every codec that concatenates tensors walks them in sorted-name
order (:class:`Layout`), so client and server never depend on dict insertion order.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from numbers import Real
from typing import ClassVar, TypeVar

import numpy as np

from strategies.codecs.co3_format import SCALE_RULES, FloatFormat

Params = dict[str, np.ndarray]
"""A dense update: parameter name → float32 array (a model ``state_dict`` delta)."""

Header = dict[str, int | float | str | bool]
"""Small scalars that travel with a payload (a Flower ``ConfigRecord``)."""

Like = Mapping[str, tuple[tuple[int, ...], np.dtype]]
"""Names, shapes and dtypes of the update a decoder must rebuild (the server's sent model)."""


class CodecError(ValueError):
    """A payload or header that cannot be decoded; the message says what is wrong."""


@dataclass(frozen=True)
class CodecSpec:
    """What a run's config says about update compression; validated on construction.

    Parameters
    ----------
    name : str
        One of :data:`strategies.codecs.CODECS`: ``"none"`` (float32, exact), ``"fp16"``,
        ``"bf16"`` (float casts), ``"topk"`` (global top-k sparsification), ``"sign"``
        (scaled sign per tensor) or ``"co3"`` (short float + entropy coding, CO3).
    topk_ratio : float
        Fraction of coordinates ``k/d`` in (0, 1] that top-k keeps (``k = max(1, ⌈ratio·d⌉)``).
    co3_exponent_bits, co3_mantissa_bits : int
        CO3's short float format ``E``/``M`` (one sign bit besides; ``1 ≤ E ≤ 5``,
        ``1 + E + M ≤ 8``). ``E=2, M=1`` is the 11-value fp4 grid of the CO3 reference code;
        ``E=5, M=2`` is its 247-value fp8 (see :mod:`strategies.codecs.co3_format`).
    co3_decay : float
        CO3's error-feedback memory decay λ in [0, 1] ("correction coefficient"; 0.9 in the
        reference code). Used instead of ``ef_decay`` when ``name == "co3"``.
    co3_scale_rule : str
        How CO3 picks each tensor's scale from its GenNorm fit: ``"paper"`` (the reference
        code's polynomial ``P(β)``, fitted for fp4) or ``"mse"`` (the scale minimising the
        expected squared error for the configured format, computed from the fit).
    error_feedback : bool
        Whether lossy codecs carry an error-feedback memory across rounds on each client.
    ef_decay : float
        Memory decay in [0, 1] for the other lossy codecs; 1.0 is classic error feedback.
    """

    name: str = "none"
    topk_ratio: float = 0.01
    co3_exponent_bits: int = 2
    co3_mantissa_bits: int = 1
    co3_decay: float = 0.9
    co3_scale_rule: str = "paper"
    error_feedback: bool = True
    ef_decay: float = 1.0

    def __post_init__(self) -> None:
        if self.name not in _REGISTRY:
            raise ValueError(f"codec name must be one of {codec_names()}, got {self.name!r}")
        _check_real("topk_ratio", self.topk_ratio)
        if not 0.0 < self.topk_ratio <= 1.0:
            raise ValueError(f"topk_ratio must be in (0, 1], got {self.topk_ratio}")
        for field, value in (("co3_decay", self.co3_decay), ("ef_decay", self.ef_decay)):
            _check_real(field, value)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{field} must be in [0, 1], got {value}")
        try:
            FloatFormat(self.co3_exponent_bits, self.co3_mantissa_bits)
        except (TypeError, ValueError) as err:
            raise type(err)(f"co3 format: {err}") from None
        if self.co3_scale_rule not in SCALE_RULES:
            raise ValueError(
                f"co3_scale_rule must be one of {SCALE_RULES}, got {self.co3_scale_rule!r}"
            )
        if not isinstance(self.error_feedback, bool):
            raise TypeError(f"error_feedback must be a bool, got {self.error_feedback!r}")


def _check_real(field: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{field} must be a real number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{field} must be finite, got {value!r}")


class Codec(ABC):
    """Encodes a dense update into wire arrays plus a header, and decodes it back.

    Subclasses set ``name`` (the registry key) and ``lossless``, and implement
    :meth:`encode` and :meth:`decode`. A lossy codec may override
    :meth:`encode_and_reconstruct` when it knows the decoded update more cheaply than by
    decoding its own payload (error feedback needs it on every client step).
    """

    name: ClassVar[str]
    """Registry name, used in configs, headers and logs."""
    lossless: ClassVar[bool]
    """Whether ``decode(encode(x)) == x`` bit for bit (then error feedback is pointless)."""

    @classmethod
    def from_spec(cls, spec: CodecSpec) -> Codec:
        """The codec configured by ``spec``; codecs without options ignore it."""
        return cls()

    @abstractmethod
    def encode(self, update: Params, state: Params) -> tuple[dict[str, np.ndarray], Header, Params]:
        """Compress one update.

        Parameters
        ----------
        update : Params
            Dense float arrays (cast to float32). Non-finite values raise :class:`CodecError`.
        state : Params
            This client's codec state from its previous call; ``{}`` the first time.

        Returns
        -------
        payload : dict[str, numpy.ndarray]
            The arrays that go on the wire; their ``nbytes`` are the real upload size.
        header : Header
            Scalars the decoder needs (always ``"codec"`` and ``"num_params"``).
        state : Params
            The new codec state to keep on the client.
        """

    @abstractmethod
    def decode(self, payload: Mapping[str, np.ndarray], header: Mapping, like: Like) -> Params:
        """Rebuild the dense float32 update shaped like ``like``.

        Raises
        ------
        CodecError
            If the header or payload is malformed, inconsistent with ``like`` or with this
            codec's configuration, or decodes to non-finite values.
        """

    def decode_own(self, payload: Mapping[str, np.ndarray], header: Mapping, like: Like) -> Params:
        """Decode a payload that this process's own :meth:`encode` just produced.

        A packed worker decodes every client's payload, as the server would, to see exactly
        the codec's loss; the payload never crossed a wire, so checks that guard the server
        against malformed input are redundant there. The default is :meth:`decode`;
        codecs whose payload *is* the update (identity) return it without another pass.
        """
        return self.decode(payload, header, like)

    def encode_and_reconstruct(
        self, update: Params, state: Params
    ) -> tuple[dict[str, np.ndarray], Header, Params, Params]:
        """:meth:`encode` plus the update the server will decode from the payload.

        The default decodes the payload; overrides must return the identical arrays.
        """
        payload, header, new_state = self.encode(update, state)
        return payload, header, new_state, self.decode(payload, header, like_of(update))

    def _header(self, layout: Layout, **fields: float | str | bool) -> Header:
        return {"codec": self.name, "num_params": layout.total, **fields}

    def _check_header(
        self, header: Mapping, layout: Layout, **expected: float | str | bool
    ) -> None:
        """Require exactly the keys of :meth:`_header` with exactly these values."""
        _check_fields("header", header, self._header(layout, **expected))

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _check_fields(what: str, got: Mapping, expected: Mapping) -> None:
    missing = sorted(expected.keys() - got.keys())
    extra = sorted(got.keys() - expected.keys())
    if missing or extra:
        raise CodecError(f"{what} keys: missing {missing}, unexpected {extra}")
    for key, want in expected.items():
        value = got[key]
        # bool is an int subclass: True must not pass for 1, nor 1 for True.
        if isinstance(value, bool) != isinstance(want, bool) or value != want:
            raise CodecError(f"{what} {key!r} is {value!r}, expected {want!r}")


@dataclass(frozen=True)
class Layout:
    """Tensor names, shapes and offsets in canonical (sorted-name) order.

    Codecs that work on the concatenation of all tensors use it on both sides, so the
    decoder never relies on the order in which a dict was built.
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, like: Like) -> Layout:
        """The layout of a ``like`` mapping (name → (shape, dtype)) or of a :data:`Params`."""
        names = tuple(sorted(like))
        shapes = []
        for name in names:
            entry = like[name]
            shape = entry.shape if isinstance(entry, np.ndarray) else entry[0]
            shapes.append(tuple(int(n) for n in shape))
        return cls(names, tuple(shapes))

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(math.prod(shape) for shape in self.shapes)

    @property
    def total(self) -> int:
        return sum(self.sizes)

    @property
    def offsets(self) -> np.ndarray:
        """Start of each tensor in the concatenation, plus the total at the end."""
        return np.concatenate([[0], np.cumsum(self.sizes, dtype=np.int64)])

    def flatten(self, params: Params) -> np.ndarray:
        """All tensors raveled and concatenated in layout order (float32)."""
        if not self.names:
            return np.zeros(0, np.float32)
        return np.concatenate([params[name].ravel() for name in self.names])

    def split(self, flat: np.ndarray) -> Params:
        """Inverse of :meth:`flatten`: one reshaped (view) array per name."""
        offsets = self.offsets
        return {
            name: flat[offsets[i] : offsets[i + 1]].reshape(shape)
            for i, (name, shape) in enumerate(zip(self.names, self.shapes, strict=True))
        }


def like_of(params: Params) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """The ``like`` argument of :meth:`Codec.decode` that describes ``params``."""
    return {name: (value.shape, value.dtype) for name, value in params.items()}


def checked_update(update: Mapping[str, np.ndarray]) -> Params:
    """``update`` as C-contiguous float32 arrays, after checking it is real and finite.

    Raises
    ------
    CodecError
        If an array is not a real floating type or holds NaN/inf.
    """
    checked: Params = {}
    for name, value in update.items():
        array = np.asarray(value)
        if not np.issubdtype(array.dtype, np.floating):
            raise CodecError(f"update[{name!r}] has dtype {array.dtype}; expected a float array")
        array = np.ascontiguousarray(array, dtype=np.float32)
        if not np.isfinite(array).all():
            raise CodecError(f"update[{name!r}] holds non-finite values")
        checked[name] = array
    return checked


def payload_array(
    payload: Mapping[str, np.ndarray], key: str, dtype: type, shape: tuple[int, ...]
) -> np.ndarray:
    """``payload[key]``, required to have exactly this dtype and shape."""
    if key not in payload:
        raise CodecError(f"payload lacks array {key!r}")
    array = np.asarray(payload[key])
    if array.dtype != np.dtype(dtype) or array.shape != shape:
        raise CodecError(
            f"payload {key!r} is {array.dtype}{list(array.shape)}, "
            f"expected {np.dtype(dtype)}{list(shape)}"
        )
    return array


def check_payload_keys(payload: Mapping[str, np.ndarray], keys: set[str] | tuple[str, ...]) -> None:
    """Require the payload to hold exactly these arrays."""
    _check_fields("payload", {k: None for k in payload}, {k: None for k in keys})


def require_finite(name: str, array: np.ndarray) -> None:
    """Reject NaN/inf in a decoded or received array."""
    if not np.isfinite(array).all():
        raise CodecError(f"{name} holds non-finite values")


def payload_nbytes(payload: Mapping[str, np.ndarray]) -> int:
    """Bytes of array data in a payload (what dominates the upload; headers are tiny)."""
    return sum(np.asarray(value).nbytes for value in payload.values())


_REGISTRY: dict[str, type[Codec]] = {}
CodecT = TypeVar("CodecT", bound=type[Codec])


def register_codec(cls: CodecT) -> CodecT:
    """Class decorator: make a codec buildable by its ``name``."""
    if cls.name in _REGISTRY:
        raise ValueError(f"codec name {cls.name!r} is already registered by {_REGISTRY[cls.name]}")
    _REGISTRY[cls.name] = cls
    return cls


def codec_names() -> tuple[str, ...]:
    """Registered codec names, in registration order."""
    return tuple(_REGISTRY)


def build_codec(spec: CodecSpec) -> Codec:
    """The codec named by ``spec.name``, configured from ``spec``."""
    return _REGISTRY[spec.name].from_spec(spec)
