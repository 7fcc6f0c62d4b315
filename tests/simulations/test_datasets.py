"""Tests for simulations.datasets: specs, bundled sets, laziness, device files and hub loading."""

import time
import tracemalloc

import numpy as np
import pytest

from simulations.datasets import (
    DATASETS,
    ArrayDataset,
    DataSpec,
    HubData,
    load_federated,
    stratified_split,
)


def test_spec_validation_names_the_parameter_and_allowed_values():
    with pytest.raises(ValueError, match="allowed: digits, mnist, synthetic, hub, files"):
        DataSpec(dataset="cifar")
    with pytest.raises(ValueError, match="allowed: iid, dirichlet, shards"):
        DataSpec(partitioner="label-skew")
    with pytest.raises(ValueError, match=r"test_fraction must be in \(0, 1\), got 1.0"):
        DataSpec(test_fraction=1.0)
    with pytest.raises(ValueError, match="dirichlet_alpha must be > 0"):
        DataSpec(dirichlet_alpha=0.0)
    with pytest.raises(ValueError, match="needs data_path"):
        DataSpec(dataset="files")
    assert set(DATASETS) == {"digits", "mnist", "synthetic", "hub", "files"}


def test_array_dataset_rejects_inconsistent_arrays():
    x = np.zeros((3, 2), np.float32)
    with pytest.raises(ValueError, match="float32 x and int64 y"):
        ArrayDataset(x=x.astype(np.float64), y=np.zeros(3, np.int64), num_classes=2)
    with pytest.raises(ValueError, match="does not match"):
        ArrayDataset(x=x, y=np.zeros(4, np.int64), num_classes=2)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        ArrayDataset(x=x, y=np.array([0, 1, 2]), num_classes=2)


def test_stratified_split_is_exact_disjoint_deterministic_and_keeps_class_shares():
    y = np.repeat(np.arange(4), [50, 30, 15, 5])
    train, test = stratified_split(y, 0.2, seed=1)
    assert len(test) == 20 and len(train) == 80
    assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(100))
    assert np.array_equal(np.bincount(y[test], minlength=4), [10, 6, 3, 1])
    again_train, again_test = stratified_split(y, 0.2, seed=1)
    assert np.array_equal(test, again_test) and np.array_equal(train, again_train)
    assert not np.array_equal(test, stratified_split(y, 0.2, seed=2)[1])
    # Rounding: 7 * 0.2 = 1.4 -> one test example, from the largest-remainder class.
    assert len(stratified_split(np.array([0, 0, 0, 0, 1, 1, 1]), 0.2, seed=0)[1]) == 1


@pytest.mark.parametrize(("dataset", "total", "shape"), [
    ("digits", 1797, (1, 8, 8)),
    ("mnist", 5000, (1, 28, 28)),
])
def test_bundled_datasets_split_into_clients_and_a_stratified_test_set(dataset, total, shape):
    data = load_federated(DataSpec(dataset=dataset, partitioner="iid", seed=0), 7)
    test = data.test_set()
    parts = [data.partition(i) for i in range(7)]
    assert data.input_shape == shape and data.num_classes == 10
    assert len(test) == round(0.2 * total)
    assert sum(len(p) for p in parts) + len(test) == total
    for part in parts + [test]:
        assert part.x.dtype == np.float32 and part.y.dtype == np.int64
        assert part.x.shape[1:] == shape and 0.0 <= part.x.min() and part.x.max() <= 1.0
    counts = np.bincount(test.y, minlength=10)
    assert counts.max() - counts.min() <= 3  # stratified: every digit close to 10 %
    # No test image appears among the training images.
    train_rows = {row.tobytes() for p in parts for row in p.x}
    assert sum(row.tobytes() in train_rows for row in test.x) <= 2  # digits has few duplicates


def test_federation_is_memoised_and_partitions_are_lru_cached():
    spec = DataSpec(dataset="digits", partitioner="dirichlet", seed=5)
    data = load_federated(spec, 10, cache_size=2)
    assert load_federated(spec, 10, cache_size=2) is data
    first = data.partition(0)
    assert data.partition(0) is first  # cached
    data.partition(1)
    data.partition(2)  # evicts partition 0, the least recently used
    rebuilt = data.partition(0)
    assert rebuilt is not first and np.array_equal(rebuilt.x, first.x)
    with pytest.raises(ValueError, match=r"partition id 10 is outside \[0, 10\)"):
        data.partition(10)
    with pytest.raises(ValueError, match="num_partitions=2000 exceeds the 1438 training examples"):
        load_federated(spec, 2000)


def test_hundred_thousand_synthetic_clients_cost_nothing_until_asked():
    spec = DataSpec(dataset="synthetic", samples_per_client=50, seed=11)
    tracemalloc.start()
    try:
        start = time.perf_counter()
        data = load_federated(spec, 100_000, cache_size=8)
        built = time.perf_counter() - start
        after_build = tracemalloc.get_traced_memory()[0]
        for i in range(0, 100_000, 500):  # 200 clients, 2.4 MB of features in total
            assert len(data.partition(i)) == 50
        after_use = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert built < 0.5
    assert after_build < 200_000
    assert after_use < 500_000  # only the 8 cached clients stay (8 x 12 kB)


def test_files_dataset_serves_the_devices_file_with_a_held_out_split(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 5)), np.repeat([0, 1, 3], [20, 15, 5])
    np.savez(tmp_path / "device.npz", x=x, y=y)
    spec = DataSpec(dataset="files", data_path=str(tmp_path / "device.npz"), num_classes=6)
    data = load_federated(spec, 3)
    train, test = data.partition(0), data.test_set()
    assert data.partition(2) is train and data.num_classes == 6 and data.input_shape == (5,)
    assert len(train) == 32 and len(test) == 8
    rows = {row.tobytes(): label for row, label in zip(x.astype(np.float32), y, strict=True)}
    seen = [row.tobytes() for row in np.concatenate([train.x, test.x])]
    assert sorted(seen) == sorted(rows)
    assert all(rows[row.tobytes()] == label for row, label in zip(test.x, test.y, strict=True))


# -- hub: FederatedDataset on small local parquet files, without network ------------------

def _image_table(ids: range, mode: str, label_column: str, class_names: list[str] | None):
    """Images whose first pixel encodes the example id, labelled ``id % 3``."""
    from datasets import ClassLabel, Dataset, Features, Value
    from datasets import Image as ImageFeature
    from PIL import Image

    channels = {"L": (), "RGB": (3,)}[mode]
    images = []
    for example in ids:
        pixels = np.full((5, 4, *channels), 7, dtype=np.uint8)
        pixels[0, 0] = example
        images.append(Image.fromarray(pixels, mode=mode))
    label = ClassLabel(names=class_names) if class_names else Value("int64")
    return Dataset.from_dict(
        {"img": images, label_column: [i % 3 for i in ids]},
        features=Features({"img": ImageFeature(), label_column: label}),
    )


@pytest.fixture
def offline(monkeypatch):
    import datasets

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


@pytest.mark.parametrize("partitioner", ["iid", "dirichlet"])
def test_hub_loader_partitions_local_parquet_offline(tmp_path, offline, partitioner):
    _image_table(range(60), "L", "label", ["a", "b", "c", "d"]).to_parquet(tmp_path / "tr.parquet")
    _image_table(range(100, 112), "L", "label", ["a", "b", "c", "d"]).to_parquet(
        tmp_path / "te.parquet")
    spec = DataSpec(dataset="hub", hub_dataset="parquet", partitioner=partitioner,
                    dirichlet_alpha=1.0, seed=4)
    data = HubData(spec, 4, data_files={"train": str(tmp_path / "tr.parquet"),
                                        "test": str(tmp_path / "te.parquet")},
                   cache_dir=str(tmp_path / "cache"))
    assert data.num_classes == 4 and data.input_shape == (1, 5, 4)
    parts = [data.partition(i) for i in range(4)]
    ids = np.concatenate([np.rint(p.x[:, 0, 0, 0] * 255).astype(int) for p in parts])
    assert np.array_equal(np.sort(ids), np.arange(60))
    for part in parts:
        part_ids = np.rint(part.x[:, 0, 0, 0] * 255).astype(int)
        assert np.array_equal(part.y, part_ids % 3)
        assert np.allclose(part.x[:, 0, 1:, :], 7 / 255)
    test = data.test_set()
    assert np.array_equal(np.sort(np.rint(test.x[:, 0, 0, 0] * 255)), np.arange(100, 112))


def test_hub_loader_without_test_split_holds_out_part_of_train(tmp_path, offline):
    _image_table(range(50), "RGB", "labels", None).to_parquet(tmp_path / "all.parquet")
    spec = DataSpec(dataset="hub", hub_dataset="parquet", test_fraction=0.2, seed=0)
    data = HubData(spec, 5, data_files={"train": str(tmp_path / "all.parquet")},
                   cache_dir=str(tmp_path / "cache"))
    assert data.input_shape == (3, 5, 4) and data.num_classes == 3
    train_ids = np.concatenate([data.partition(i).x[:, 0, 0, 0] for i in range(5)])
    test_ids = data.test_set().x[:, 0, 0, 0]
    assert len(train_ids) == 40 and len(test_ids) == 10
    assert np.array_equal(np.sort(np.rint(np.concatenate([train_ids, test_ids]) * 255)),
                          np.arange(50))


def test_hub_loader_reports_missing_columns(tmp_path, offline):
    from datasets import Dataset

    Dataset.from_dict({"pixels": [[0.0, 1.0]] * 4, "label": [0, 1, 0, 1]}).to_parquet(
        tmp_path / "x.parquet")
    spec = DataSpec(dataset="hub", hub_dataset="parquet")
    with pytest.raises(ValueError, match="no image column among pixels, label"):
        HubData(spec, 2, data_files={"train": str(tmp_path / "x.parquet")},
                cache_dir=str(tmp_path / "cache"))
