"""MNIST, Fashion-MNIST and CIFAR-10 read from torchvision's on-disk layout, never downloaded.

Layouts (what ``torchvision.datasets.X(root, download=False)`` expects):
    <root>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]
    <root>/FashionMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]
    <root>/cifar-10-batches-py/{data_batch_1..5,test_batch}   (pickled dicts: data (n, 3072) uint8, labels)
The files are parsed here (idx with NumPy, CIFAR with a restricted unpickler) instead of through
torchvision, which would also insist on its own integrity checks (MD5 sums, batches.meta) and on
importing torchvision.

A pickle can call any importable function while it loads, so a crafted ``data_batch_1`` under
``data.root`` could run code. CIFAR batches are read by :class:`_CifarUnpickler`, which resolves only
the globals the real format holds (NumPy's array reconstruction: ``_reconstruct``, ``ndarray``,
``dtype``, ``scalar``, and ``_frombuffer`` of protocol-5 pickles; and ``_codecs.encode`` to latin-1, which Python 3 uses for bytes in protocol-2
pickles); dicts, lists, strings, bytes and ints need no global. Anything else is refused with one line.

Normalisation x ← (x/255 − mean)/std with the usual per-dataset statistics of the training sets:
MNIST 0.1307 / 0.3081, Fashion-MNIST 0.2860 / 0.3530, CIFAR-10 per channel
mean (0.4914, 0.4822, 0.4465), std (0.2470, 0.2435, 0.2616).
"""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import torch

from fl_sim.data.errors import DataError

__all__ = ["load_mnist_like", "load_cifar10", "read_idx", "write_idx", "MNIST_STATS", "CIFAR_MEAN", "CIFAR_STD"]

# dataset name -> (torchvision folder, (mean, std))
MNIST_STATS = {"mnist": ("MNIST", (0.1307, 0.3081)), "fashion_mnist": ("FashionMNIST", (0.2860, 0.3530))}
CIFAR_MEAN = np.array([0.4914, 0.4822, 0.4465], np.float32)
CIFAR_STD = np.array([0.2470, 0.2435, 0.2616], np.float32)
_IDX_STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
_CIFAR_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)


def read_idx(path: Path) -> np.ndarray:
    """An idx-ubyte file (optionally gzipped): magic 0x0000 08 ndim, ndim big-endian int32 sizes, uint8 data."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or raw[3] == 0:
        raise DataError(f"{path} is not an idx file of unsigned bytes (magic 0x00 0x00 0x08 ndim); re-extract it")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    start = 4 + 4 * ndim
    if len(raw) - start != int(np.prod(shape)):
        raise DataError(f"{path} is truncated or corrupt: header says {shape}, found {len(raw) - start} data bytes")
    return np.frombuffer(raw, dtype=np.uint8, offset=start).reshape(shape)


def write_idx(path: Path, array: np.ndarray, *, gz: bool = False) -> Path:
    """Write ``array`` as an idx-ubyte file (the inverse of :func:`read_idx`; ``gz``: gzipped, ".gz" appended).

    For fabricated MNIST-format datasets (benchmarks, tests); values are cast to uint8."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    data = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    path = Path(path)
    if gz:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def _find(raw_dir: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (raw_dir / name).is_file():
            return raw_dir / name
    return None


def load_mnist_like(name: str, root: str) -> tuple[torch.Tensor, ...]:
    """(x_train, y_train, x_test, y_test) of MNIST or Fashion-MNIST; x (n, 1, 28, 28) normalised float32."""
    folder, (mean, std) = MNIST_STATS[name]
    raw_dir = Path(root) / folder / "raw"
    paths = [_find(raw_dir, s) for s in _IDX_STEMS]
    missing = [s for s, p in zip(_IDX_STEMS, paths) if p is None]
    if missing:
        raise DataError(
            f"{folder} not found under '{root}': put {', '.join(missing)} (each optionally .gz) in {raw_dir}/ "
            "(torchvision's layout) or set data.root; fl-sim never downloads"
        )
    xtr, ytr, xte, yte = (read_idx(p) for p in paths)
    for x, y, split in ((xtr, ytr, "train"), (xte, yte, "t10k")):
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise DataError(f"{raw_dir}: {split} images {x.shape} and labels {y.shape} do not match (n, 28, 28) / (n,)")
        if y.size and (int(y.min()) < 0 or int(y.max()) > 9):
            raise DataError(f"{raw_dir}: {split} labels range over {int(y.min())}..{int(y.max())}, expected 0..9")

    def norm(a: np.ndarray) -> torch.Tensor:
        out = a.astype(np.float32)[:, None, :, :]
        out *= np.float32(1.0 / (255.0 * std))
        out -= np.float32(mean / std)
        return torch.from_numpy(out)

    return norm(xtr), torch.from_numpy(ytr.astype(np.int64)), norm(xte), torch.from_numpy(yte.astype(np.int64))


def _numpy_global(module: str, name: str):
    import importlib

    try:
        mod = importlib.import_module(f"numpy._core.{module}")  # NumPy >= 2
    except ImportError:  # pragma: no cover - NumPy 1.x
        mod = importlib.import_module(f"numpy.core.{module}")
    return getattr(mod, name)


def _latin1_encode(obj, encoding="utf-8", errors="strict"):
    """``_codecs.encode`` as protocol-2 pickles of bytes use it (latin-1 only)."""
    if encoding not in ("latin1", "latin-1") or not isinstance(obj, str):
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r} is not part of the CIFAR format")
    return obj.encode("latin1", errors)


_CIFAR_GLOBALS = {
    **{(f"{pkg}.{mod}", name): (lambda m=mod, n=name: _numpy_global(m, n))
       for pkg in ("numpy.core", "numpy._core")
       for mod, name in (("multiarray", "_reconstruct"), ("multiarray", "scalar"), ("numeric", "_frombuffer"))},
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("_codecs", "encode"): lambda: _latin1_encode,
}


class _CifarUnpickler(pickle.Unpickler):
    """An unpickler that admits only what a CIFAR-10 python batch holds (module docstring)."""

    def find_class(self, module: str, name: str):
        make = _CIFAR_GLOBALS.get((module, name))
        if make is None:
            raise pickle.UnpicklingError(f"it references {module}.{name}, which a CIFAR-10 batch never holds")
        return make()


def _load_cifar_pickle(path: Path) -> dict:
    with open(path, "rb") as f:
        d = _CifarUnpickler(f, encoding="latin1").load()
    if not isinstance(d, dict):
        raise ValueError(f"a {type(d).__name__}, not a dict")
    return d


def _cifar_batches(base: Path, names: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for n in names:
        try:
            d = _load_cifar_pickle(base / n)
            x = np.asarray(d["data"], np.uint8).reshape(-1, 3, 32, 32)
            y = np.asarray(d["labels"], np.int64)
        except pickle.UnpicklingError as exc:
            raise DataError(f"{base / n} is not a CIFAR-10 python batch and was not loaded: {exc}; "
                            "re-extract the real file") from None
        except (OSError, KeyError, ValueError, TypeError, EOFError, AttributeError, IndexError) as exc:
            raise DataError(f"{base / n} is not a CIFAR-10 python batch ({type(exc).__name__}); re-extract it") from None
        if len(x) != len(y):
            raise DataError(f"{base / n}: {len(x)} images but {len(y)} labels")
        xs.append(x)
        ys.append(y)
    x = np.concatenate(xs).astype(np.float32)
    x /= 255.0
    x -= CIFAR_MEAN[None, :, None, None]
    x /= CIFAR_STD[None, :, None, None]
    return torch.from_numpy(x), torch.from_numpy(np.concatenate(ys))


def load_cifar10(root: str) -> tuple[torch.Tensor, ...]:
    """(x_train, y_train, x_test, y_test) of CIFAR-10; x (n, 3, 32, 32) normalised float32."""
    base = Path(root) / "cifar-10-batches-py"
    missing = [f for f in _CIFAR_FILES if not (base / f).is_file()]
    if missing:
        raise DataError(
            f"CIFAR-10 not found under '{root}': put {', '.join(missing)} in {base}/ "
            "(the python version of CIFAR-10, torchvision's layout) or set data.root; fl-sim never downloads"
        )
    return (*_cifar_batches(base, _CIFAR_FILES[:5]), *_cifar_batches(base, _CIFAR_FILES[5:]))
