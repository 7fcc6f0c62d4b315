"""Label-based partitioners that split one training set among simulated clients.

Pollen delegates the splitting itself to flwr-datasets (``IidPartitioner``,
``DirichletPartitioner``, ``ShardPartitioner``) so that a partition built here is the
partition a Flower user gets from ``FederatedDataset`` with the same seed, and results
stay comparable with the Flower ecosystem. This module adds what a simulation platform
needs on top: one name per scheme for the run config, up-front checks that turn
impossible requests into a one-line ``ValueError`` instead of an empty client or a
``ZeroDivisionError`` deep inside the library, and :class:`IndexPartition`, which runs a
partitioner over plain label arrays (held in memory by ``simulations.datasets``).

Schemes
-------
``iid``
    Shuffle by ``seed``, then cut into ``num_partitions`` contiguous blocks whose sizes
    differ by at most one. Every example lands in exactly one partition.
``dirichlet``
    Label skew of Hsu et al. (2019), "Measuring the Effects of Non-Identical Data
    Distribution for Federated Visual Classification": for every class, the share of
    each client is drawn from ``Dir(alpha)``. Every example lands in exactly one
    partition; a smaller ``alpha`` gives more skewed clients. ``self_balancing`` is off
    so that ``alpha`` alone controls the skew. Sampling is repeated (flwr-datasets allows
    10 retries) until no partition is empty; when that fails, which happens when
    clients outnumber what ``alpha`` can spread the data over, a ``ValueError`` says so.
``shards``
    Pathological split of McMahan et al. (2017), "Communication-Efficient Learning of
    Deep Networks from Decentralized Data": sort by label, cut into
    ``num_partitions * shards_per_client`` equal shards, give each client
    ``shards_per_client`` random shards. The remainder of the division (fewer than
    ``num_partitions * shards_per_client`` examples) is left out, as in the paper.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from flwr_datasets.partitioner import Partitioner

#: flwr-datasets gives up after this many Dirichlet draws that leave a partition empty.
_DIRICHLET_ATTEMPTS = 11


def _iid(num_partitions: int, dirichlet_alpha: float, shards_per_client: int, seed: int,
         label_column: str) -> Partitioner:
    from flwr_datasets.partitioner import IidPartitioner

    # IidPartitioner cuts contiguous blocks; the shuffle comes from the caller
    # (IndexPartition or FederatedDataset), exactly as in flwr-datasets.
    return IidPartitioner(num_partitions=num_partitions)


def _dirichlet(num_partitions: int, dirichlet_alpha: float, shards_per_client: int,
               seed: int, label_column: str) -> Partitioner:
    from flwr_datasets.partitioner import DirichletPartitioner

    return DirichletPartitioner(
        num_partitions=num_partitions,
        partition_by=label_column,
        alpha=dirichlet_alpha,
        min_partition_size=1,
        self_balancing=False,
        shuffle=True,
        seed=seed,
    )


def _shards(num_partitions: int, dirichlet_alpha: float, shards_per_client: int,
            seed: int, label_column: str) -> Partitioner:
    from flwr_datasets.partitioner import ShardPartitioner

    return ShardPartitioner(
        num_partitions=num_partitions,
        partition_by=label_column,
        num_shards_per_partition=shards_per_client,
        keep_incomplete_shard=False,
        shuffle=True,
        seed=seed,
    )


_FACTORIES: dict[str, Callable[[int, float, int, int, str], Partitioner]] = {
    "iid": _iid,
    "dirichlet": _dirichlet,
    "shards": _shards,
}

#: Names accepted by the ``partitioner`` run-config key.
PARTITIONERS: tuple[str, ...] = tuple(_FACTORIES)


def check_partition_request(
    name: str, num_examples: int, num_partitions: int, shards_per_client: int
) -> None:
    """Raise ``ValueError`` when ``name`` cannot give every client at least one example.

    Parameters
    ----------
    name : str
        Partitioner name, one of :data:`PARTITIONERS`.
    num_examples : int
        Size of the training set being split.
    num_partitions : int
        Number of clients.
    shards_per_client : int
        Shards per client (``shards`` only).
    """
    if name not in _FACTORIES:
        raise ValueError(f"partitioner={name!r} is unknown; allowed: {', '.join(PARTITIONERS)}")
    if num_partitions < 1:
        raise ValueError(f"num_partitions must be >= 1, got {num_partitions}")
    needed = num_partitions * shards_per_client if name == "shards" else num_partitions
    if needed > num_examples:
        what = (f"num_partitions * shards_per_client = {num_partitions} * {shards_per_client}"
                if name == "shards" else f"num_partitions={num_partitions}")
        raise ValueError(
            f"{what} exceeds the {num_examples} training examples: every "
            f"{'shard' if name == 'shards' else 'partition'} needs at least one example; "
            "use fewer partitions or the 'synthetic' dataset"
        )


def build_partitioner(
    name: str,
    num_partitions: int,
    *,
    dirichlet_alpha: float,
    shards_per_client: int,
    seed: int,
    label_column: str = "label",
) -> Partitioner:
    """Return a fresh flwr-datasets partitioner for scheme ``name``.

    The result has no dataset yet: assign one (or hand it to ``FederatedDataset``),
    then call :func:`materialise` so configuration errors surface immediately.

    Parameters
    ----------
    name : str
        One of :data:`PARTITIONERS`.
    num_partitions : int
        Number of clients.
    dirichlet_alpha : float
        Concentration of the Dirichlet prior (``dirichlet`` only).
    shards_per_client : int
        Shards per client (``shards`` only).
    seed : int
        Seed of the partitioner's random generator.
    label_column : str
        Column holding the class labels.
    """
    if name not in _FACTORIES:
        raise ValueError(f"partitioner={name!r} is unknown; allowed: {', '.join(PARTITIONERS)}")
    return _FACTORIES[name](num_partitions, dirichlet_alpha, shards_per_client, seed,
                            label_column)


def materialise(partitioner: Partitioner, *, num_partitions: int,
                dirichlet_alpha: float) -> None:
    """Compute the partitioner's whole index assignment now, once, with clear errors.

    flwr-datasets partitioners assign indices lazily on first use and keep the result,
    so calling this at load time makes later ``load_partition`` calls cheap lookups and
    moves failures to start-up.

    Parameters
    ----------
    partitioner : Partitioner
        A partitioner with its dataset assigned.
    num_partitions, dirichlet_alpha : int, float
        Reported in the error message when Dirichlet sampling keeps leaving a client empty.
    """
    with warnings.catch_warnings():
        # Each failed Dirichlet draw warns; the outcome is reported below instead.
        warnings.filterwarnings("ignore", message="The specified min_partition_size")
        # ShardPartitioner sorts through pyarrow, which warns about a deprecated option.
        warnings.filterwarnings("ignore", category=FutureWarning, module="pyarrow")
        try:
            _ = partitioner.num_partitions
        except ValueError as error:
            if "max number of attempts" not in str(error):
                raise
            raise ValueError(
                f"dirichlet partitioner: {_DIRICHLET_ATTEMPTS} draws with "
                f"dirichlet_alpha={dirichlet_alpha} over {num_partitions} "
                "partitions all left some partition empty; raise dirichlet_alpha or use "
                "fewer partitions"
            ) from error


class IndexPartition:
    """Partition of ``range(len(labels))`` among clients, computed once.

    Runs a flwr-datasets partitioner over a two-column table (``label``, ``index``)
    that is shuffled by ``seed`` first, as ``FederatedDataset`` does, so the split of
    an in-memory array equals the split Flower users get for the same data and seed.

    Parameters
    ----------
    labels : np.ndarray
        Integer class labels of the training set, shape ``(n,)``.
    num_partitions : int
        Number of clients.
    name : str
        One of :data:`PARTITIONERS`.
    dirichlet_alpha : float
        Concentration of the Dirichlet prior (``dirichlet`` only).
    shards_per_client : int
        Shards per client (``shards`` only).
    seed : int
        Seed for the shuffle and the partitioner.
    """

    def __init__(
        self,
        labels: np.ndarray,
        num_partitions: int,
        *,
        name: str,
        dirichlet_alpha: float,
        shards_per_client: int,
        seed: int,
    ) -> None:
        import datasets

        labels = np.asarray(labels)
        if labels.ndim != 1:
            raise ValueError(f"labels must be one-dimensional, got shape {labels.shape}")
        check_partition_request(name, len(labels), num_partitions, shards_per_client)
        table = datasets.Dataset.from_dict(
            {"label": labels, "index": np.arange(len(labels), dtype=np.int64)}
        ).shuffle(seed=seed)
        self._partitioner = build_partitioner(
            name, num_partitions, dirichlet_alpha=dirichlet_alpha,
            shards_per_client=shards_per_client, seed=seed,
        )
        self._partitioner.dataset = table
        materialise(self._partitioner, num_partitions=num_partitions,
                    dirichlet_alpha=dirichlet_alpha)
        self.num_partitions = num_partitions

    def indices(self, partition_id: int) -> np.ndarray:
        """Return the training-set indices of client ``partition_id`` (int64)."""
        if not 0 <= partition_id < self.num_partitions:
            raise ValueError(
                f"partition_id={partition_id} is outside [0, {self.num_partitions})"
            )
        part = self._partitioner.load_partition(partition_id)
        # A column slice reads in one batch; iterating the column goes row by row.
        return np.asarray(part["index"][:], dtype=np.int64)
