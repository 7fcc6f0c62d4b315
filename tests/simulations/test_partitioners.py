"""Tests for simulations.partitioners: determinism, coverage, skew and clear failures."""

import numpy as np
import pytest

from simulations.partitioners import PARTITIONERS, IndexPartition, check_partition_request

NUM_CLASSES = 10


def balanced_labels(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).permutation(np.arange(n) % NUM_CLASSES)


def split(labels: np.ndarray, num_partitions: int, name: str, *, seed: int = 0,
          alpha: float = 0.5, shards: int = 2) -> list[np.ndarray]:
    index = IndexPartition(labels, num_partitions, name=name, dirichlet_alpha=alpha,
                           shards_per_client=shards, seed=seed)
    return [index.indices(i) for i in range(num_partitions)]


def mean_label_skew(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    """Mean total-variation distance between each client's and the global label mix."""
    overall = np.bincount(labels, minlength=NUM_CLASSES) / len(labels)
    return float(np.mean([
        0.5 * np.abs(np.bincount(labels[p], minlength=NUM_CLASSES) / len(p) - overall).sum()
        for p in parts
    ]))


@pytest.mark.parametrize("name", PARTITIONERS)
def test_same_seed_same_partition_other_seed_other_partition(name):
    labels = balanced_labels(600)
    first, again = split(labels, 12, name, seed=3), split(labels, 12, name, seed=3)
    other = split(labels, 12, name, seed=4)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(np.sort(a), np.sort(b)) for a, b in zip(first, other, strict=True))


@pytest.mark.parametrize("name", ["iid", "dirichlet"])
def test_every_example_is_in_exactly_one_partition(name):
    labels = balanced_labels(1000)
    parts = split(labels, 37, name)
    assert all(len(p) > 0 for p in parts)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(1000))


def test_iid_sizes_differ_by_at_most_one_and_mix_labels():
    labels = balanced_labels(1003)
    parts = split(labels, 10, "iid")
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert mean_label_skew(labels, parts) < 0.12  # each client ~ the global mix


def test_dirichlet_skew_grows_as_alpha_shrinks():
    labels = balanced_labels(5000)
    skew = {alpha: mean_label_skew(labels, split(labels, 20, "dirichlet", alpha=alpha))
            for alpha in (100.0, 1.0, 0.1)}
    assert skew[100.0] < 0.1 < skew[1.0] < skew[0.1]
    assert skew[0.1] > 0.6  # alpha = 0.1: most of a client's data is one or two classes


def test_shards_give_each_client_about_shards_per_client_classes():
    labels = balanced_labels(2000)
    num_partitions, shards = 20, 2
    parts = split(labels, num_partitions, "shards", shards=shards)
    shard_size = 2000 // (num_partitions * shards)
    assert all(len(p) == shards * shard_size for p in parts)
    assert len(np.unique(np.concatenate(parts))) == num_partitions * shards * shard_size
    classes = [len(np.unique(labels[p])) for p in parts]
    # A shard lies within one class here (class size 200 is a multiple of 50)...
    assert max(classes) <= shards
    # ...and a shard may straddle two classes otherwise, at most doubling the count.
    odd = balanced_labels(1437)
    assert max(len(np.unique(odd[p])) for p in split(odd, 10, "shards", shards=3)) <= 6


@pytest.mark.parametrize(("name", "num_partitions", "match"), [
    ("iid", 51, "num_partitions=51 exceeds the 50 training examples"),
    ("dirichlet", 51, "num_partitions=51 exceeds"),
    ("shards", 26, r"num_partitions \* shards_per_client = 26 \* 2 exceeds"),
])
def test_more_clients_than_examples_is_a_clear_error(name, num_partitions, match):
    with pytest.raises(ValueError, match=match):
        split(balanced_labels(50), num_partitions, name)


def test_dirichlet_that_keeps_leaving_clients_empty_fails_clearly():
    with pytest.raises(ValueError, match="raise dirichlet_alpha or use fewer partitions"):
        split(balanced_labels(200), 150, "dirichlet", alpha=0.05)


def test_unknown_partitioner_and_bad_partition_id_are_rejected():
    with pytest.raises(ValueError, match="allowed: iid, dirichlet, shards"):
        check_partition_request("pathological", 100, 10, 2)
    index = IndexPartition(balanced_labels(100), 5, name="iid", dirichlet_alpha=0.5,
                           shards_per_client=2, seed=0)
    with pytest.raises(ValueError, match=r"partition_id=5 is outside \[0, 5\)"):
        index.indices(5)
