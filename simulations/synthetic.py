"""FedProx Synthetic(alpha, beta) clients, generated lazily and deterministically per client.

Li et al. (2020), "Federated Optimization in Heterogeneous Networks" (FedProx), section
5.1, define a 60-feature, 10-class softmax-regression task whose heterogeneity is set by
two numbers. For client ``k``::

    u_k ~ N(0, alpha)        W_k ~ N(u_k, 1)  (60 x 10)    b_k ~ N(u_k, 1)  (10)
    B_k ~ N(0, beta)         v_k ~ N(B_k, 1)  (60)
    x   ~ N(v_k, Sigma),     Sigma = diag(j ** -1.2), j = 1..60
    y   = argmax softmax(W_k^T x + b_k)

``alpha`` is meant to control how much the local models differ, ``beta`` how much the
local inputs differ. As in the authors' generator (``generate_synthetic.py`` in
litian96/FedProx), ``alpha`` and ``beta`` are the *standard deviations* passed to
``np.random.normal``.

Note on ``alpha``: ``u_k`` shifts every entry of ``W_k`` and ``b_k`` by the same amount,
which adds ``u_k * (sum(x) + 1)`` to *every* logit and so never changes the argmax. The
law of a client's ``(x, y)`` therefore does not depend on ``alpha`` at all; with the same
seed the data are identical for every ``alpha``. Heterogeneity comes from ``beta`` and
from the per-client noise in ``W_k``, ``b_k`` and ``v_k``. This generator keeps the
published construction unchanged so results stay comparable.

Unlike that script, which draws all clients from one global random stream, every client
here has its own streams seeded by ``(seed, client_id, purpose)``. A client's data is
therefore the same whatever the number of clients and whichever clients were generated
before it, and a federation of 100,000 clients costs nothing until a client is asked
for. Every client has the same number of samples (the original draws sizes from a
log-normal); quantity skew is left to the caller.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NUM_FEATURES = 60
NUM_CLASSES = 10
#: Per-feature variances of the input distribution, ``j ** -1.2`` for j = 1..60.
FEATURE_VARIANCE = np.arange(1, NUM_FEATURES + 1, dtype=np.float64) ** -1.2

# Independent random streams of one client, so that drawing test data never shifts
# the training data and vice versa.
_PARAMETERS_STREAM, _TRAIN_STREAM, _TEST_STREAM = 0, 1, 2


@dataclass(frozen=True, eq=False)
class ClientDistribution:
    """The data-generating parameters of one Synthetic(alpha, beta) client.

    Attributes
    ----------
    weights : np.ndarray
        ``W_k``, shape ``(60, 10)``.
    bias : np.ndarray
        ``b_k``, shape ``(10,)``.
    input_mean : np.ndarray
        ``v_k``, shape ``(60,)``.
    model_mean : float
        ``u_k``, the mean of the entries of ``W_k`` and ``b_k``.
    input_shift : float
        ``B_k``, the mean of the entries of ``v_k``.
    """

    weights: np.ndarray
    bias: np.ndarray
    input_mean: np.ndarray
    model_mean: float
    input_shift: float

    def sample(self, rng: np.random.Generator, num_samples: int) -> tuple[np.ndarray, np.ndarray]:
        """Draw ``num_samples`` labelled examples; returns ``x`` float32 (n, 60), ``y`` int64."""
        noise = rng.standard_normal((num_samples, NUM_FEATURES))
        x = (self.input_mean + noise * np.sqrt(FEATURE_VARIANCE)).astype(np.float32)
        # Label the float32 features that are stored, so x and y agree exactly.
        logits = x.astype(np.float64) @ self.weights + self.bias
        return x, np.argmax(logits, axis=1).astype(np.int64)


@dataclass(frozen=True)
class SyntheticFederation:
    """A population of Synthetic(alpha, beta) clients indexed by integer id.

    Parameters
    ----------
    alpha : float
        Standard deviation of the per-client model means ``u_k`` (model heterogeneity).
    beta : float
        Standard deviation of the per-client input shifts ``B_k`` (input heterogeneity).
    seed : int
        Non-negative base seed; client ``k`` depends on ``(seed, k)`` only.
    """

    alpha: float = 1.0
    beta: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.alpha < 0 or self.beta < 0:
            raise ValueError(
                f"synthetic alpha and beta must be >= 0, got alpha={self.alpha}, beta={self.beta}"
            )
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")

    def _rng(self, client_id: int, stream: int) -> np.random.Generator:
        if client_id < 0:
            raise ValueError(f"client_id must be >= 0, got {client_id}")
        return np.random.default_rng([self.seed, client_id, stream])

    def distribution(self, client_id: int) -> ClientDistribution:
        """Return the generating parameters of client ``client_id``."""
        rng = self._rng(client_id, _PARAMETERS_STREAM)
        model_mean = rng.normal(0.0, self.alpha)
        input_shift = rng.normal(0.0, self.beta)
        return ClientDistribution(
            weights=rng.normal(model_mean, 1.0, (NUM_FEATURES, NUM_CLASSES)),
            bias=rng.normal(model_mean, 1.0, NUM_CLASSES),
            input_mean=rng.normal(input_shift, 1.0, NUM_FEATURES),
            model_mean=float(model_mean),
            input_shift=float(input_shift),
        )

    def train_data(self, client_id: int, num_samples: int) -> tuple[np.ndarray, np.ndarray]:
        """Return client ``client_id``'s training examples ``(x, y)``."""
        return self.distribution(client_id).sample(
            self._rng(client_id, _TRAIN_STREAM), num_samples
        )

    def test_data(self, client_id: int, num_samples: int) -> tuple[np.ndarray, np.ndarray]:
        """Return held-out examples from client ``client_id``'s distribution.

        They come from a stream separate from :meth:`train_data`, so they never overlap
        the training examples and asking for them changes nothing else.
        """
        return self.distribution(client_id).sample(
            self._rng(client_id, _TEST_STREAM), num_samples
        )
