"""Data sources: embedded (Synthetic(α, β), scikit-learn digits), torchvision on-disk files, Hugging Face.

Each loader returns a :class:`Source`: one shared training array (X, Y), a test set, and for the
synthetic generator the natural client of every sample. Nothing is ever downloaded.
"""

from __future__ import annotations

import gzip
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import DataConfig
from ..rng import numpy_generator

__all__ = ["Source", "DataError", "load_source"]


class DataError(ValueError):
    """A data problem explained in one line (missing files, impossible partition...)."""


@dataclass
class Source:
    name: str
    x: torch.Tensor  # (N, *input_shape) float32, the one shared training array
    y: torch.Tensor  # (N,) int64
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    natural_ids: np.ndarray | None = None  # (N,) generator client of each sample (synthetic only)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])


# ------------------------------------------------------------------------- synthetic (FedProx)
def synthetic(cfg: DataConfig, num_clients: int, seed: int) -> Source:
    """Synthetic(α, β) of Li et al. (FedProx, MLSys 2020, §5.1) as in LEAF's generator.

    Client k: u_k ~ N(0, α), W_k ~ N(u_k, 1) (dim x C), b_k ~ N(u_k, 1); B_k ~ N(0, β),
    v_k ~ N(B_k, 1) (dim); x ~ N(v_k, Σ), Σ = diag(j^-1.2); y = argmax(softmax(x W_k + b_k)).
    ``synthetic_iid``: one W, b and v for everybody (α = β = 0 and shared draws).
    Sizes: n_k = lognormal(4, 2) + 50 as in the FedProx code, capped at 1,000 samples here so that
    10,000 clients stay in memory (the uncapped tail reaches 10^5). A share ``test_fraction`` of every
    client's samples is held out into the common test set.
    """
    rng = numpy_generator(seed, "synthetic")
    dim, classes = cfg.synthetic_dim, cfg.synthetic_classes
    sizes = np.minimum(rng.lognormal(4, 2, num_clients).astype(np.int64) + 50, 1000)
    if cfg.synthetic_iid:
        w = np.broadcast_to(rng.normal(0, 1, (1, dim, classes)), (num_clients, dim, classes))
        b = np.broadcast_to(rng.normal(0, 1, (1, classes)), (num_clients, classes))
        v = np.zeros((num_clients, dim))
    else:
        u = rng.normal(0, np.sqrt(cfg.synthetic_alpha), num_clients)
        big_b = rng.normal(0, np.sqrt(cfg.synthetic_beta), num_clients)
        w = rng.normal(u[:, None, None], 1.0, (num_clients, dim, classes))
        b = rng.normal(u[:, None], 1.0, (num_clients, classes))
        v = rng.normal(big_b[:, None], 1.0, (num_clients, dim))
    std = np.arange(1, dim + 1, dtype=np.float64) ** (-1.2 / 2)
    owner = np.repeat(np.arange(num_clients), sizes)
    x = (v[owner] + rng.standard_normal((owner.size, dim)) * std).astype(np.float32)
    y = np.empty(owner.size, dtype=np.int64)
    for start in range(0, owner.size, 65536):  # chunks bound the (chunk, dim, C) gather
        sl = slice(start, start + 65536)
        logits = np.einsum("nd,ndc->nc", x[sl], w[owner[sl]]) + b[owner[sl]]
        y[sl] = logits.argmax(axis=1)
    test = rng.random(owner.size) < cfg.test_fraction
    return Source(
        name="synthetic",
        x=torch.from_numpy(x[~test]),
        y=torch.from_numpy(y[~test]),
        x_test=torch.from_numpy(x[test]),
        y_test=torch.from_numpy(y[test]),
        num_classes=classes,
        natural_ids=owner[~test],
    )


# ------------------------------------------------------------------------- embedded real data
def digits(cfg: DataConfig, seed: int) -> Source:
    """scikit-learn's bundled handwritten digits: 1,797 8x8 images in [0, 1], 10 classes."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = (data.images / 16.0).astype(np.float32)[:, None, :, :]
    y = data.target.astype(np.int64)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=cfg.test_fraction, random_state=seed % (2**32), stratify=y)
    return Source("digits", torch.from_numpy(xtr), torch.from_numpy(ytr), torch.from_numpy(xte), torch.from_numpy(yte), 10)


# ------------------------------------------------------------------------- torchvision files
_MNIST = {"mnist": ("MNIST", (0.1307, 0.3081)), "fashion_mnist": ("FashionMNIST", (0.2860, 0.3530))}
_CIFAR_MEAN = np.array([0.4914, 0.4822, 0.4465], np.float32)
_CIFAR_STD = np.array([0.2470, 0.2435, 0.2616], np.float32)


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _find(raw_dir: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (raw_dir / name).is_file():
            return raw_dir / name
    return None


def mnist_like(name: str, root: str) -> Source:
    """MNIST / Fashion-MNIST from torchvision's layout: <root>/<MNIST|FashionMNIST>/raw/*-ubyte[.gz]."""
    folder, (mean, std) = _MNIST[name]
    raw = Path(root) / folder / "raw"
    stems = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    paths = [_find(raw, s) for s in stems]
    if any(p is None for p in paths):
        missing = [s for s, p in zip(stems, paths) if p is None]
        raise DataError(
            f"{folder} not found under '{root}': put {', '.join(missing)} (optionally .gz) in {raw}/ "
            "(torchvision's layout) or set data.root; fl-sim never downloads"
        )
    xtr, ytr, xte, yte = (_read_idx(p) for p in paths)

    def norm(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(((a.astype(np.float32) / 255.0 - mean) / std)[:, None, :, :])

    return Source(name, norm(xtr), torch.from_numpy(ytr.astype(np.int64)), norm(xte),
                  torch.from_numpy(yte.astype(np.int64)), 10)


def cifar10(root: str) -> Source:
    """CIFAR-10 from torchvision's layout: <root>/cifar-10-batches-py/{data_batch_1..5,test_batch}."""
    base = Path(root) / "cifar-10-batches-py"
    files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    missing = [f for f in files if not (base / f).is_file()]
    if missing:
        raise DataError(
            f"CIFAR-10 not found under '{root}': put {', '.join(missing)} in {base}/ "
            "(the python version of CIFAR-10, torchvision's layout) or set data.root; fl-sim never downloads"
        )

    def load(names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        for n in names:
            with open(base / n, "rb") as f:
                d = pickle.load(f, encoding="latin1")
            xs.append(np.asarray(d["data"], np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(d["labels"], np.int64))
        x = np.concatenate(xs).astype(np.float32) / 255.0
        x = (x - _CIFAR_MEAN[None, :, None, None]) / _CIFAR_STD[None, :, None, None]
        return torch.from_numpy(x), torch.from_numpy(np.concatenate(ys))

    xtr, ytr = load(files[:5])
    xte, yte = load(files[5:])
    return Source("cifar10", xtr, ytr, xte, yte, 10)


# ------------------------------------------------------------------------- Hugging Face
def huggingface(cfg: DataConfig, seed: int) -> Source:
    """``hf:<dataset>`` through flwr-datasets (needs hub access or a warm cache), or ``hf:<local path>``
    (a .parquet/.arrow/.csv file or a directory saved with ``save_to_disk``), offline."""
    import datasets

    target = cfg.name[3:]
    path = Path(target)
    try:
        if path.exists():
            if path.is_dir():
                ds = datasets.load_from_disk(str(path))
            else:
                kind = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv", ".json": "json"}.get(path.suffix)
                if kind is None:
                    raise DataError(f"data.name={cfg.name!r}: unsupported file type {path.suffix!r}; use parquet, arrow, csv")
                ds = datasets.load_dataset(kind, data_files=str(path), split="train")
        else:
            from flwr_datasets import FederatedDataset
            from flwr_datasets.partitioner import IidPartitioner

            fds = FederatedDataset(dataset=target, partitioners={"train": IidPartitioner(1)})
            ds = fds.load_split("train")
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - hub/network/format errors all become one line
        raise DataError(
            f"cannot load Hugging Face dataset {target!r} ({type(exc).__name__}: {str(exc).splitlines()[0][:120]}); "
            "without hub access pre-download it and use data.name=hf:/path/to/file.parquet"
        ) from None
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    cols = ds.column_names
    fkey = cfg.feature_key if cfg.feature_key != "auto" else next((c for c in ("image", "img", "x", "features") if c in cols), None)
    lkey = cfg.label_key if cfg.label_key != "auto" else next((c for c in ("label", "fine_label", "labels", "y") if c in cols), None)
    if fkey not in cols or lkey not in cols:
        raise DataError(f"{cfg.name}: cannot find feature/label columns in {cols}; set data.feature_key and data.label_key")
    x = np.stack([np.asarray(v, dtype=np.float32) for v in ds[fkey]])
    if x.ndim == 3:  # (N, H, W) grayscale images
        x = x[:, None, :, :]
    elif x.ndim == 4 and x.shape[-1] in (1, 3):  # (N, H, W, C) -> (N, C, H, W)
        x = np.transpose(x, (0, 3, 1, 2))
    if x.max() > 1.5:
        x = x / 255.0
    y = np.asarray(ds[lkey], dtype=np.int64)
    rng = numpy_generator(seed, "hf-test-split")
    test = rng.random(len(y)) < cfg.test_fraction
    xt = torch.from_numpy(np.ascontiguousarray(x))
    yt = torch.from_numpy(y)
    mask = torch.from_numpy(test)
    return Source(cfg.name, xt[~mask], yt[~mask], xt[mask], yt[mask], int(y.max()) + 1)


def load_source(cfg: DataConfig, num_clients: int, seed: int) -> Source:
    if cfg.name == "synthetic":
        src = synthetic(cfg, num_clients, seed)
    elif cfg.name == "digits":
        src = digits(cfg, seed)
    elif cfg.name in _MNIST:
        src = mnist_like(cfg.name, cfg.root)
    elif cfg.name == "cifar10":
        src = cifar10(cfg.root)
    elif cfg.name.startswith("hf:"):
        src = huggingface(cfg, seed)
    else:  # config validation already refuses this
        raise DataError(f"unknown dataset {cfg.name!r}")
    if cfg.max_samples and len(src.y) > cfg.max_samples:
        keep = torch.from_numpy(np.sort(numpy_generator(seed, "max-samples").permutation(len(src.y))[: cfg.max_samples]))
        src.x, src.y = src.x[keep], src.y[keep]
        if src.natural_ids is not None:
            src.natural_ids = src.natural_ids[keep.numpy()]
    return src
