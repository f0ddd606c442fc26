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
Nothing it builds is larger than a few times the file: arrays start empty and get only the bytes the file
carries, dtypes are numbers of at most 16 bytes, and ``data``/``labels`` must have the real format's types
before NumPy converts them (a 65-byte pickle asked ``_reconstruct`` for 2 GiB; a list of shared references
expands without bound).

Normalisation x ← (x/255 − mean)/std with the usual per-dataset statistics of the training sets:
MNIST 0.1307 / 0.3081, Fashion-MNIST 0.2860 / 0.3530, CIFAR-10 per channel
mean (0.4914, 0.4822, 0.4465), std (0.2470, 0.2435, 0.2616).
"""

from __future__ import annotations

import gzip
import math
import pickle
import zlib
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


# Largest idx payload read: no MNIST-format set comes near it (EMNIST's largest split is 0.6 GB); a header
# declaring more is corrupt, and a small .gz can decompress to any size, so reads stop at the declared size.
MAX_IDX_BYTES = 2**32
_CHUNK = 1 << 24


def _read_upto(f, n: int) -> bytes:
    """At most ``n`` bytes of ``f``, read in chunks (one ``read(n)`` preallocates n bytes)."""
    parts, got = [], 0
    while got < n:
        chunk = f.read(min(_CHUNK, n - got))
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def read_idx(path: Path) -> np.ndarray:
    """An idx-ubyte file (optionally gzipped): magic 0x0000 08 ndim, ndim big-endian int32 sizes, uint8 data.

    Reads the header, then at most the size it declares plus one byte: memory stays bounded by the declared
    size (at most MAX_IDX_BYTES) whatever the (decompressed) file holds."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            head = _read_upto(f, 4)
            if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] != 0x08 or head[3] == 0:
                raise DataError(f"{path} is not an idx file of unsigned bytes (magic 0x00 0x00 0x08 ndim); "
                                "re-extract it")
            ndim = head[3]
            dims = _read_upto(f, 4 * ndim)
            shape = tuple(int.from_bytes(dims[4 * i: 4 * i + 4], "big") for i in range(len(dims) // 4))
            n = math.prod(shape)
            if len(shape) != ndim or n > MAX_IDX_BYTES:
                raise DataError(f"{path} is corrupt: its header declares shape {shape} ({n:,} bytes); re-extract it")
            raw = _read_upto(f, n + 1)
    except EOFError:  # gzip: the stream ends before its end marker (a truncated download)
        raise DataError(f"{path} is truncated (the gzip stream ends early); re-extract or re-download it") from None
    except (OSError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        raise DataError(f"cannot read {path}: {exc}") from None
    if len(raw) != n:
        found = f"{len(raw)}" if len(raw) < n else "more"
        raise DataError(f"{path} is truncated or corrupt: header says {shape}, found {found} data bytes")
    return np.frombuffer(raw, dtype=np.uint8).reshape(shape)


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


# Allocation bound: every object the unpickler builds is at most a few times the file's bytes. NumPy's own
# pickles create an array empty (``_reconstruct(ndarray, (0,), b'b')``) and give it its shape and bytes in
# BUILD (``__setstate__``), where NumPy checks the bytes against the shape; ``_reconstruct`` with any
# other shape allocates that shape at once (a 65-byte pickle asked for 2 GiB), and a dtype of a flexible
# kind (void, bytes, str) or object can declare any item size, or take a list of shared references
# whose expansion has no bound. So: arrays start empty, and dtypes are numbers of at most 16 bytes.
_MAX_ITEMSIZE = 16


class _BoundedArray(np.ndarray):
    """The array ``_reconstruct`` gives the unpickler: its ``__setstate__`` (BUILD) admits a shape only with
    the bytes that fill it (no object dtype, whose state is a list); read back as a plain ndarray."""

    def __setstate__(self, state):
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise pickle.UnpicklingError("an ndarray state that NumPy never writes")
        shape, dtype, data = state[-4], state[-3], state[-1]
        if not isinstance(dtype, np.dtype) or not isinstance(data, (bytes, bytearray)):
            raise pickle.UnpicklingError("an ndarray whose state is not (shape, numeric dtype, bytes)")
        n = 1
        for dim in shape:
            if not isinstance(dim, int) or dim < 0:
                raise pickle.UnpicklingError(f"an ndarray of shape {shape!r}")
            n *= dim
        if n * dtype.itemsize != len(data):
            raise pickle.UnpicklingError(f"an ndarray of shape {tuple(shape)} ({n * dtype.itemsize} bytes) that "
                                         f"carries {len(data)} bytes")
        super().__setstate__(state)


def _bounded_reconstruct(subtype, shape, dtype):
    """``numpy._core.multiarray._reconstruct`` for an empty ndarray only (module note above)."""
    if subtype is not _BoundedArray or tuple(shape) != (0,):
        raise pickle.UnpicklingError(f"_reconstruct of shape {shape!r}: NumPy pickles an empty array and fills "
                                     "it in BUILD")
    return _BoundedArray((0,), dtype)


def _bounded_dtype(*args):
    """``numpy.dtype`` of numbers only (bool, integers, floats, complex) of at most ``_MAX_ITEMSIZE`` bytes."""
    dt = np.dtype(*args)
    if dt.kind not in "biufc" or dt.itemsize > _MAX_ITEMSIZE:
        raise pickle.UnpicklingError(f"dtype {dt} is not a number type a CIFAR-10 batch holds")
    return dt


def _bounded_scalar(dtype, *args):
    if not isinstance(dtype, np.dtype) or dtype.kind not in "biufc":
        raise pickle.UnpicklingError(f"a numpy scalar of dtype {dtype!r}")
    return _numpy_global("multiarray", "scalar")(dtype, *args)


_CIFAR_GLOBALS = {
    **{(f"{pkg}.multiarray", "_reconstruct"): (lambda: _bounded_reconstruct) for pkg in ("numpy.core", "numpy._core")},
    **{(f"{pkg}.multiarray", "scalar"): (lambda: _bounded_scalar) for pkg in ("numpy.core", "numpy._core")},
    **{(f"{pkg}.numeric", "_frombuffer"): (lambda: _numpy_global("numeric", "_frombuffer"))
       for pkg in ("numpy.core", "numpy._core")},
    ("numpy", "ndarray"): lambda: _BoundedArray,
    ("numpy", "dtype"): lambda: _bounded_dtype,
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
            x, y = d["data"], d["labels"]
            # the real format only: converting anything else (a list of shared references) could expand
            # without bound
            if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3 * 32 * 32:
                raise DataError(f"{base / n}: 'data' is not an (n, 3072) uint8 array; re-extract the real file")
            if not isinstance(y, list) or not all(type(v) is int for v in y):
                raise DataError(f"{base / n}: 'labels' is not a list of integers; re-extract the real file")
            x = np.asarray(x).reshape(-1, 3, 32, 32)
            y = np.asarray(y, np.int64)
        except DataError:
            raise
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
