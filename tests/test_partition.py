"""Partitions: equal to flwr-datasets' own result, disjoint coverage, seeds, label skew vs the Dirichlet
formula, size distributions, scale (10,000 and 100,000 clients), clear errors."""

import time

import numpy as np
import pytest
import torch

import datasets
from fl_sim.config import DataConfig
from fl_sim.data import DataError, FederatedData, load_federated
from fl_sim.data import partition as P
from fl_sim.data.sources import Source
from fl_sim.rng import numpy_generator

datasets.utils.logging.disable_progress_bar()


def _source(n=2000, classes=10, seed=0, balanced=False, natural=None):
    y = np.arange(n) % classes if balanced else np.random.default_rng(seed).integers(0, classes, n)
    return Source("fake", torch.arange(n, dtype=torch.float32)[:, None], torch.from_numpy(y.astype(np.int64)),
                  torch.zeros(1, 1), torch.zeros(1, dtype=torch.int64), classes, natural_ids=natural)


def _cfg(partition, **kw):
    return DataConfig(name="digits", partition=partition, **kw)


# --------------------------------------------------------------------------- same result as flwr-datasets
@pytest.mark.filterwarnings("ignore::FutureWarning")  # pyarrow, inside ShardPartitioner's sort
@pytest.mark.parametrize(
    "kind, extra",
    [("dirichlet", {"alpha": 0.3}), ("shards", {}), ("pathological", {}), ("size", {}),
     ("size", {"size_distribution": "linear"}), ("size", {"size_distribution": "square_root"})],
)
def test_index_lists_equal_flwr_datasets_load_partition(kind, extra):
    """Reading the assignment once == calling the partitioner's load_partition for every client."""
    src, k, seed = _source(600), 12, 3
    cfg = _cfg(kind, **extra)
    parts = P.partition_indices(src, cfg, k, seed)
    labels = src.y.numpy()
    n = len(labels)
    rows = numpy_generator(seed, "partition", "rows").permutation(n) if kind == "size" else np.arange(n)
    ref = P._flwr_partitioner(kind, cfg, k, n, P.derive_partition_seed(seed, kind))
    ref.dataset = datasets.Dataset.from_dict({"idx": rows, "label": labels[rows]})
    for c in range(k):
        expected = np.asarray(ref.load_partition(c)["idx"], dtype=np.int64)
        assert np.array_equal(parts[c], expected), c


def test_iid_equals_iid_partitioner_on_the_shuffled_rows():
    from flwr_datasets.partitioner import IidPartitioner

    n, k, seed = 503, 7, 1
    parts = P.partition_indices(_source(n), _cfg("iid"), k, seed)
    ref = IidPartitioner(num_partitions=k)
    ref.dataset = datasets.Dataset.from_dict({"idx": numpy_generator(seed, "partition", "iid").permutation(n)})
    for c in range(k):
        assert np.array_equal(parts[c], np.asarray(ref.load_partition(c)["idx"]))


def test_natural_equals_natural_id_partitioner():
    from flwr_datasets.partitioner import NaturalIdPartitioner

    ids = np.random.default_rng(0).integers(0, 9, 400)
    parts = P.natural_partition(ids, 9)
    ref = NaturalIdPartitioner(partition_by="client_id")
    ref.dataset = datasets.Dataset.from_dict({"client_id": ids, "idx": np.arange(400)})
    for c in range(9):
        assert np.array_equal(parts[c], np.asarray(ref.load_partition(c)["idx"]))
    assert len(P.natural_partition(np.array([0, 0, 2]), 4)[1]) == 0  # a natural client without rows is empty
    with pytest.raises(DataError, match="span 0..4 but there are 4 clients"):
        P.natural_partition(np.array([0, 4]), 4)


# --------------------------------------------------------------------------- coverage, seeds
@pytest.mark.parametrize("kind", ["iid", "dirichlet", "shards", "pathological", "size"])
def test_disjoint_cover_and_seeded(kind):
    src = _source(3000)
    parts = P.partition_indices(src, _cfg(kind), 40, 0)
    again = P.partition_indices(src, _cfg(kind), 40, 0)
    other = P.partition_indices(src, _cfg(kind), 40, 1)
    flat = np.concatenate(parts)
    assert len(parts) == 40 and all(p.dtype == np.int64 for p in parts)
    assert len(np.unique(flat)) == len(flat)  # no row twice
    # 3000 rows = 80 shards of 37 + 40 left out (ShardPartitioner drops the incomplete shard)
    assert len(flat) == (80 * 37 if kind == "shards" else 3000)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other))


def test_shards_and_pathological_limit_classes_per_client():
    # 1000 rows, 10 balanced classes; 25 clients x 2 shards = 50 shards of 20: each within one class.
    src = _source(1000, balanced=True)
    labels = src.y.numpy()
    for parts, most in (
        (P.partition_indices(src, _cfg("shards", shards_per_client=2), 25, 0), 2),
        (P.partition_indices(src, _cfg("pathological", classes_per_client=3), 25, 0), 3),
    ):
        distinct = [len(np.unique(labels[p])) for p in parts]
        assert max(distinct) <= most and sum(len(p) for p in parts) == 1000


# --------------------------------------------------------------------------- Dirichlet label skew
def _dirichlet_sum_sq_moments(alpha, k):
    """E and Var of S = Σ_c p_c², p ~ Dir(α 1_k), from the Dirichlet moments (A = kα):
    E[p²] = α(α+1)/(A(A+1)), E[p⁴] = α(α+1)(α+2)(α+3)/(A(A+1)(A+2)(A+3)),
    E[p_c² p_d²] = α²(α+1)²/(A(A+1)(A+2)(A+3)) for c ≠ d."""
    a, big = alpha, k * alpha
    d4 = big * (big + 1) * (big + 2) * (big + 3)
    mean = k * a * (a + 1) / (big * (big + 1))
    second = (k * a * (a + 1) * (a + 2) * (a + 3) + k * (k - 1) * a**2 * (a + 1) ** 2) / d4
    return mean, second - mean**2


@pytest.mark.parametrize("alpha", [100.0, 1.0, 0.1])
def test_dirichlet_class_split_matches_dirichlet_moments(alpha):
    """DirichletPartitioner splits every class j over the k clients with p_j ~ Dir(α 1_k), so
    S_j = Σ_c (n_jc / n_j)² has mean (α+1)/(kα+1). 50 classes give 50 independent S_j: tolerance
    5 standard errors of their mean, plus the rounding of n_jc = ⌊cumsum⌋ differences (|n_jc − p n_j| < 1
    moves S by at most 2/n_j + k/n_j² = 0.0021 at n_j = 1000)."""
    classes, per_class, k = 50, 1000, 50
    src = _source(classes * per_class, classes, balanced=True)
    parts = P.partition_indices(src, _cfg("dirichlet", alpha=alpha), k, 0)
    labels = src.y.numpy()
    counts = np.stack([np.bincount(labels[p], minlength=classes) for p in parts])  # (k, classes)
    s = ((counts / per_class) ** 2).sum(axis=0)
    mean, var = _dirichlet_sum_sq_moments(alpha, k)
    assert abs(mean - (alpha + 1) / (k * alpha + 1)) < 1e-12
    tol = 5 * np.sqrt(var / classes) + 2 / per_class + k / per_class**2
    assert abs(s.mean() - mean) < tol, (s.mean(), mean, tol)


def test_label_skew_grows_as_alpha_falls():
    src = _source(8000)
    stats = [load_fd(src, _cfg("dirichlet", alpha=a), 40).describe() for a in (100.0, 1.0, 0.1)]
    ent = [s["label_entropy_bits"] for s in stats]
    share = [s["mean_majority_label_share"] for s in stats]
    assert ent[0] > ent[1] > ent[2] and share[0] < share[1] < share[2]
    assert ent[0] > 3.2 and ent[2] < 1.5  # log2(10) = 3.32: near-uniform at α=100, a few labels at α=0.1


def load_fd(src, cfg, k, seed=0):
    return FederatedData(src, P.partition_indices(src, cfg, k, seed), cfg.partition)


def test_tiny_alpha_ten_thousand_clients_in_seconds_with_empty_clients_reported():
    """α = 0.01, 10,000 clients, 50,000 samples: no hang, no NaN, empty clients reported and not
    eligible (measured 0.3-0.7 s on the shared 2-core machine; the flwr default min_partition_size=10
    would retry for 14 s and fail)."""
    src = _source(50_000)
    t0 = time.perf_counter()
    fd = load_fd(src, _cfg("dirichlet", alpha=0.01), 10_000)
    elapsed = time.perf_counter() - t0
    sizes = fd.client_sizes
    d = fd.describe()
    assert sizes.sum() == 50_000 and d["empty_clients"] == int((sizes == 0).sum()) > 1000
    assert len(fd.eligible_clients) == 10_000 - d["empty_clients"] and (sizes[fd.eligible_clients] > 0).all()
    assert elapsed < 10, elapsed


def test_hundred_thousand_clients_cost_their_index_lists():
    src = _source(200_000)
    t0 = time.perf_counter()
    fd = load_fd(src, _cfg("iid"), 100_000)
    assert time.perf_counter() - t0 < 5
    assert fd.client_sizes.sum() == 200_000 and len(fd.eligible_clients) == 100_000
    assert sum(p.nbytes for p in fd.parts) == 200_000 * 8  # the rows themselves are never copied
    x, y = fd.client_data(99_999)
    assert torch.equal(x, src.x[torch.from_numpy(fd.parts[99_999])]) and len(y) == 2


# --------------------------------------------------------------------------- sizes
def test_power_law_sizes_follow_fedprox_weights():
    """n_k − 1 = ⌊w_k/Σw (N − K)⌋ (+1 for the largest remainders), w_k = lognormal(4, 2) + 50."""
    k, total = 500, 40_000
    sizes = np.array(P.power_law_sizes(k, total, 5))
    w = numpy_generator(5, "power-law-sizes").lognormal(4.0, 2.0, k) + 50.0
    share = w / w.sum() * (total - k)
    assert sizes.sum() == total and sizes.min() >= 1
    assert np.all((sizes - 1 - share > -1) & (sizes - 1 - share < 1 + 1e-9))
    assert sizes.max() > 10 * np.median(sizes)  # heavy tail


def test_linear_and_square_root_sizes():
    src = _source(5500)
    lin = [len(p) for p in P.partition_indices(src, _cfg("size", size_distribution="linear"), 10, 0)]
    expected = np.arange(1, 11) / 55 * 5500  # n_i ∝ i: 100 i (flwr floors; 7/55·5500 = 699.99...)
    assert np.all(np.abs(np.array(lin[:9]) - expected[:9]) < 1) and sum(lin) == 5500
    root = np.array([len(p) for p in P.partition_indices(src, _cfg("size", size_distribution="square_root"), 10, 0)])
    expected = np.sqrt(np.arange(1, 11)) / np.sqrt(np.arange(1, 11)).sum() * 5500
    assert np.all(np.abs(root[:-1] - expected[:-1]) < 1) and root.sum() == 5500


def test_exponential_sizes_checked_before_flwr():
    with pytest.raises(DataError, match="at most 7 clients"):
        P.partition_indices(_source(1437), _cfg("size", size_distribution="exponential"), 20, 0)
    parts = P.partition_indices(_source(1437), _cfg("size", size_distribution="exponential"), 7, 0)
    assert min(len(p) for p in parts) >= 1


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "cfg, k, match",
    [
        (_cfg("natural"), 4, "iid, dirichlet, shards, pathological or size"),
        (_cfg("iid"), 3000, "use at most 2000 clients"),
        (_cfg("dirichlet", min_partition_size=100), 50, "min_partition_size"),
        (_cfg("shards", shards_per_client=50), 50, "shards_per_client"),
        (_cfg("pathological", classes_per_client=11), 5, "has 10 classes"),
        (_cfg("size", size_distribution="square"), 200, "partition size of fake"),
        (_cfg("size", size_distribution="zipf"), 5, "power_law, linear, square, square_root, exponential"),
    ],
)
def test_impossible_partitions_are_one_line_data_errors(cfg, k, match):
    t0 = time.perf_counter()
    with pytest.raises(DataError, match=match) as err:
        P.partition_indices(_source(2000), cfg, k, 0)
    assert "\n" not in str(err.value) and time.perf_counter() - t0 < 2  # no retry loop


def test_auto_is_natural_for_natural_sources_else_dirichlet():
    ids = np.repeat(np.arange(4), 50)
    parts = P.partition_indices(_source(200, natural=ids), _cfg("auto"), 4, 0)
    assert [p.tolist() for p in parts] == [list(range(50 * c, 50 * c + 50)) for c in range(4)]
    fd = load_federated(DataConfig(name="digits"), 5, 0)
    assert fd.partition == "dirichlet" and fd.describe()["partition"] == "dirichlet"


def test_all_clients_empty_is_an_error(monkeypatch):
    import fl_sim.data as data

    monkeypatch.setattr(data, "partition_indices", lambda src, cfg, k, seed: [np.zeros(0, np.int64)] * k)
    with pytest.raises(DataError, match="fewer clients or a larger data.alpha"):
        load_federated(DataConfig(name="digits"), 3, 0)
