"""Data sources on fabricated files, partitioners, reproducibility, label skew, clear errors."""

import pickle
import time

import numpy as np
import pytest
import torch

from fl_sim.config import DataConfig
from fl_sim.data.files import write_idx
from fl_sim.data import DataError, load_federated
from fl_sim.data.partition import partition_indices
from fl_sim.data.sources import Source


def _fake_mnist(root, folder="MNIST", n=60, gz=False):
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    write_idx(raw / "train-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)), gz=gz)
    write_idx(raw / "train-labels-idx1-ubyte", np.arange(n) % 10, gz=gz)
    write_idx(raw / "t10k-images-idx3-ubyte", rng.integers(0, 256, (20, 28, 28)), gz=gz)
    write_idx(raw / "t10k-labels-idx1-ubyte", np.arange(20) % 10, gz=gz)


@pytest.mark.parametrize("name, folder, gz", [("mnist", "MNIST", False), ("fashion_mnist", "FashionMNIST", True)])
def test_mnist_like_from_torchvision_layout(tmp_path, name, folder, gz):
    _fake_mnist(tmp_path, folder, gz=gz)
    fd = load_federated(DataConfig(name=name, root=str(tmp_path), partition="iid"), 6, 0)
    assert fd.input_shape == (1, 28, 28) and fd.num_classes == 10
    assert fd.client_sizes.sum() == 60 and len(fd.test_data()[1]) == 20
    x, y = fd.client_data(0)
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and len(y) == 10


def test_cifar10_from_pickles(tmp_path):
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    rng = np.random.default_rng(1)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(base / name, "wb") as f:
            pickle.dump({"data": rng.integers(0, 256, (8, 3072), dtype=np.uint8), "labels": list(range(8))}, f)
    fd = load_federated(DataConfig(name="cifar10", root=str(tmp_path), partition="iid"), 4, 0)
    assert fd.input_shape == (3, 32, 32) and fd.client_sizes.sum() == 40 and len(fd.test_data()[1]) == 8


@pytest.mark.parametrize("name, words", [("mnist", ["MNIST", "train-images-idx3-ubyte", "raw"]),
                                         ("cifar10", ["CIFAR-10", "data_batch_1"])])
def test_missing_files_one_line_error(tmp_path, name, words):
    with pytest.raises(DataError) as err:
        load_federated(DataConfig(name=name, root=str(tmp_path / "nowhere"), partition="iid"), 4, 0)
    msg = str(err.value)
    assert "\n" not in msg and "never downloads" in msg
    for w in words:
        assert w in msg


def test_hf_local_parquet_offline(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    rng = np.random.default_rng(2)
    ds = datasets.Dataset.from_dict({"image": rng.integers(0, 256, (50, 8, 8)).tolist(), "label": (np.arange(50) % 5).tolist()})
    path = tmp_path / "toy.parquet"
    ds.to_parquet(str(path))
    fd = load_federated(DataConfig(name=f"hf:{path}", partition="iid", test_fraction=0.2), 5, 0)
    assert fd.input_shape == (1, 8, 8) and fd.num_classes == 5
    assert fd.client_sizes.sum() + len(fd.test_data()[1]) == 50
    assert float(fd.source.x.max()) <= 1.0


def test_hf_unreachable_hub_is_one_line(monkeypatch):
    import datasets
    import huggingface_hub

    # Offline mode as a user without hub access has it (the flags are read at import time).
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match="pre-download"):
        load_federated(DataConfig(name="hf:some-user/not-cached-dataset", partition="iid"), 2, 0)


def test_synthetic_natural_is_reproducible_and_heterogeneous():
    a = load_federated(DataConfig(), 30, 7)
    b = load_federated(DataConfig(), 30, 7)
    c = load_federated(DataConfig(), 30, 8)
    assert np.array_equal(a.client_sizes, b.client_sizes)
    assert torch.equal(a.client_data(3)[0], b.client_data(3)[0])
    assert not np.array_equal(a.client_sizes, c.client_sizes)
    # Non-iid: per-client majority label share far above the pooled one.
    hist = a.label_histograms()
    pooled = hist.sum(0).max() / hist.sum()
    assert a.describe()["mean_majority_label_share"] > pooled + 0.2
    # Natural partition: the generator's clients, sizes >= 50 before the test holdout (power-law tail).
    assert a.client_sizes.max() > 3 * np.median(a.client_sizes)


def _fake_source(n=5000, classes=10, seed=0):
    y = torch.from_numpy(np.random.default_rng(seed).integers(0, classes, n))
    return Source("fake", torch.arange(n, dtype=torch.float32)[:, None], y, torch.zeros(1, 1),
                  torch.zeros(1, dtype=torch.long), classes)


@pytest.mark.parametrize("partition", ["iid", "dirichlet", "shards", "pathological", "size"])
def test_partitioners_cover_disjointly_and_reproducibly(partition):
    src = _fake_source()
    cfg = DataConfig(name="digits", partition=partition, alpha=0.3)
    parts = partition_indices(src, cfg, 50, 0)
    again = partition_indices(src, cfg, 50, 0)
    other = partition_indices(src, cfg, 50, 1)
    flat = np.concatenate(parts)
    assert len(parts) == 50
    assert len(np.unique(flat)) == len(flat)  # disjoint
    if partition != "shards":  # shards may leave an incomplete shard out
        assert len(flat) == 5000
    assert all(np.array_equal(p, q) for p, q in zip(parts, again))
    assert not all(np.array_equal(p, q) for p, q in zip(parts, other))


def _majority_share(parts, labels):
    shares = [np.bincount(labels[p], minlength=10).max() / len(p) for p in parts if len(p)]
    return float(np.mean(shares))


def test_label_skew_grows_as_alpha_falls():
    src = _fake_source(8000)
    labels = src.y.numpy()
    shares = [
        _majority_share(partition_indices(src, DataConfig(name="digits", partition="dirichlet", alpha=a), 40, 0), labels)
        for a in (100.0, 1.0, 0.1)
    ]
    assert shares[0] < shares[1] < shares[2]
    assert shares[0] < 0.2 and shares[2] > 0.5


def test_tiny_alpha_many_clients_is_fast_and_reports_empty_clients():
    src = _fake_source(50_000)
    t0 = time.perf_counter()
    parts = partition_indices(src, DataConfig(name="digits", partition="dirichlet", alpha=0.01), 10_000, 0)
    elapsed = time.perf_counter() - t0
    sizes = np.array([len(p) for p in parts])
    assert sizes.sum() == 50_000 and (sizes == 0).sum() > 1000
    assert elapsed < 60  # seconds, not a hang (about 5 s here even with the CPU shared)


def test_empty_clients_are_not_eligible():
    from fl_sim.data import FederatedData

    src = _fake_source(100)
    fd = FederatedData(src, [np.arange(50), np.zeros(0, np.int64), np.arange(50, 100)])
    assert fd.eligible_clients.tolist() == [0, 2]
    assert fd.describe()["empty_clients"] == 1
    with pytest.raises(DataError, match="out of range"):
        fd.client_data(5)


def test_natural_partition_refused_for_digits():
    with pytest.raises(DataError, match="natural"):
        load_federated(DataConfig(name="digits", partition="natural"), 4, 0)


def test_digits_embedded():
    fd = load_federated(DataConfig(name="digits", partition="dirichlet", alpha=0.5), 8, 0)
    assert fd.input_shape == (1, 8, 8) and fd.client_sizes.sum() + len(fd.test_data()[1]) == 1797
