"""Where a client's error-feedback residual r_i lives between its rounds (QCS, top-k + EF, sign + EF, OneBitCS).

Client error feedback (``compression_mod``: z = Δ + r, r ← z − decode(encode(z)); Karimireddy et al.
2019, [Abdi-thesis] eq. 4.14) needs one d-vector per client that has participated, kept until the client is
sampled again. Two stores, one interface (``load(cid) -> tensor | None``, ``save(cid, r)``):

* :class:`ContextResidualStore` (default outside fl-sim's own runs, e.g. a Flower deployment): the
  residual is an ArrayRecord in the node's ``context.state`` (node-local state, the right place on a
  real device). Memory: each node holds its own residuals. In Flower's simulation engine every node
  Context lives in the driver process and travels to the Ray actor with each message, so the driver
  holds participants × d × bytes (4 for float32, 2 for float16), growing until every client has
  participated once, and the server cannot checkpoint it.
* :class:`DiskResidualStore` (what ``fl-sim run`` uses when a method has client error feedback):
  one sparse file ``rows.bin`` of num_clients × d values (float32 or float16), row ``cid`` at byte
  ``cid·d·bytes``, written with ``pwrite`` and read with ``pread`` (never mapped: a memory map would
  count every touched page in the resident set of each worker that touched it). A row that was never
  written is a hole and takes no disk. ``tokens.bin`` holds one int64 per client: 0 = no residual yet,
  otherwise a random token renewed at every write. Memory bound: one row (d × bytes) in flight per
  client being encoded, plus at most ``budget_bytes`` of cached rows per process (see below); the rest
  is in the OS page cache, which the kernel reclaims. Disk: participants × d × bytes.

Sharing between processes (Ray workers of one machine, or a shared filesystem): a client id is
trained at most once per round and the server waits for every reply before the next round, so writes
touch disjoint rows and every write of round t is in the page cache before any read of round t+1.

Optional in-memory tier (``budget_bytes`` > 0): each process keeps recently used rows, in storage
dtype, in an LRU cache whose total never exceeds ``budget_bytes``. A cached row is used only when its
token equals the one on disk (one 8-byte ``pread``); a write by another process renews the token, so a
stale copy is never used. Writes go through to the file, so the cache changes speed, never results.

Checkpoints (fl_sim.runs.checkpoint): :meth:`DiskResidualStore.snapshot` streams the present rows to a
file, one row at a time; :meth:`DiskResidualStore.restore` puts them back and forgets every other row
(clients first sampled after the checkpoint start again from no residual).
"""

from __future__ import annotations

import json
import os
import shutil
import secrets
from collections import OrderedDict
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context

from fl_sim.wire import keys

__all__ = [
    "ResidualStore",
    "ContextResidualStore",
    "DiskResidualStore",
    "store_for",
    "STORE_KINDS",
    "DTYPES",
]

STORE_KINDS = ("context", "disk")
DTYPES = {"float32": np.float32, "float16": np.float16}
_TOKEN = np.dtype("<i8")


class ResidualStore(Protocol):
    """A client's residual by client id: None before its first save.

    ``load_many(cids)`` / ``save_many(cids, R)`` do the same for a cohort (R: (C, d), row i for cids[i]),
    as one block where the store can (fl_sim.clients.cohort_encode); their result is that of the
    per-client calls in order.
    """

    def load(self, cid: int) -> torch.Tensor | None: ...

    def save(self, cid: int, r: torch.Tensor) -> None: ...

    def load_many(self, cids) -> list[torch.Tensor | None]: ...

    def save_many(self, cids, R: torch.Tensor) -> None: ...


def _check_block(cids: list[int], R: torch.Tensor, dim: int | None, who: str) -> None:
    if not isinstance(R, torch.Tensor) or R.dim() != 2 or R.shape[0] != len(cids):
        shape = tuple(R.shape) if isinstance(R, torch.Tensor) else type(R).__name__
        raise ValueError(f"{who}: expected residuals of shape ({len(cids)}, d) for {len(cids)} clients, got {shape}")
    if dim is not None and R.shape[1] != dim:
        raise ValueError(f"{who}: residuals have {R.shape[1]} values but the store holds rows of d={dim}")
    if len(set(cids)) != len(cids):
        raise ValueError(f"{who}: a client id appears twice; save each client's residual once")


def _runs(sorted_ids: list[int]) -> list[tuple[int, int]]:
    """(start, stop) positions of the runs of consecutive ids in a sorted list of distinct ids."""
    runs, start = [], 0
    for j in range(1, len(sorted_ids) + 1):
        if j == len(sorted_ids) or sorted_ids[j] != sorted_ids[j - 1] + 1:
            runs.append((start, j))
            start = j
    return runs


def _as_storage(r: torch.Tensor, dtype: str) -> np.ndarray:
    if dtype not in DTYPES:
        raise ValueError(f"residual dtype {dtype!r}: use float32 or float16")
    return np.ascontiguousarray(r.detach().cpu().reshape(-1).numpy().astype(DTYPES[dtype]))


class ContextResidualStore:
    """Residuals in ``context.state["fl-sim.residual.<cid>"]`` (node-local state)."""

    def __init__(self, context: Context, dtype: str = "float32") -> None:
        self.context = context
        self.dtype = dtype

    @staticmethod
    def key(cid: int) -> str:
        return f"fl-sim.residual.{cid}"

    def load(self, cid: int) -> torch.Tensor | None:
        rec = self.context.state.get(self.key(cid))
        if rec is None:
            return None
        return torch.from_numpy(rec["r"].numpy().astype(np.float32))

    def save(self, cid: int, r: torch.Tensor) -> None:
        self.context.state[self.key(cid)] = ArrayRecord({"r": Array(_as_storage(r, self.dtype))})

    def load_many(self, cids) -> list[torch.Tensor | None]:
        """[load(cid) for cid in cids] (one node's context: a record per client)."""
        return [self.load(int(c)) for c in cids]

    def save_many(self, cids, R: torch.Tensor) -> None:
        """save(cids[i], R[i]) for each row."""
        cids = [int(c) for c in cids]
        _check_block(cids, R, None, "ContextResidualStore.save_many")
        for cid, r in zip(cids, R):
            self.save(cid, r)


def _pread_exact(fd: int, n: int, offset: int) -> bytes:
    parts, got = [], 0
    while got < n:
        chunk = os.pread(fd, n - got, offset + got)
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


def _fresh_token() -> int:
    return secrets.randbits(62) + 1  # never 0 (0 = no residual)


class DiskResidualStore:
    """Residual rows in a sparse file of a directory (module docstring: layout, bound, sharing).

    Args:
        directory: the store's directory (made by :meth:`create`).
        budget_bytes: in-memory LRU tier of this process, in bytes (0 = none: every load reads the
            file through the page cache).
    """

    META = "meta.json"
    ROWS = "rows.bin"
    TOKENS = "tokens.bin"

    def __init__(self, directory: str | Path, budget_bytes: int = 0) -> None:
        self.directory = Path(directory)
        meta_path = self.directory / self.META
        if not meta_path.is_file():
            raise FileNotFoundError(f"{self.directory}: no residual store here ({self.META} missing)")
        meta = json.loads(meta_path.read_text())
        self.dim = int(meta["dim"])
        self.dtype = str(meta["dtype"])
        self.uid = str(meta["uid"])
        if self.dtype not in DTYPES:
            raise ValueError(f"{meta_path}: dtype {self.dtype!r} is not float32 or float16")
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes={budget_bytes} must be >= 0")
        self.np_dtype = np.dtype(DTYPES[self.dtype])
        self.row_bytes = self.dim * self.np_dtype.itemsize
        self.budget_bytes = int(budget_bytes)
        self._rows = os.open(self.directory / self.ROWS, os.O_RDWR)
        self._tokens = os.open(self.directory / self.TOKENS, os.O_RDWR)
        self._cache: OrderedDict[int, tuple[int, np.ndarray]] = OrderedDict()
        self.memory_bytes = 0  # bytes of rows held by the in-memory tier (<= budget_bytes)
        self.hits = 0
        self.reads = 0

    @classmethod
    def create(
        cls, directory: str | Path, dim: int, dtype: str = "float32", budget_bytes: int = 0
    ) -> "DiskResidualStore":
        """An empty store for d = ``dim`` (any residuals already in ``directory`` are dropped)."""
        if dtype not in DTYPES:
            raise ValueError(f"residual dtype {dtype!r}: use float32 or float16")
        if dim < 1:
            raise ValueError(f"dim={dim} must be >= 1")
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        for name in (cls.ROWS, cls.TOKENS):
            with open(d / name, "wb"):
                pass  # truncate: sparse files grow when rows are written
        meta = {"dim": int(dim), "dtype": dtype, "uid": secrets.token_hex(8)}
        tmp = d / f".{cls.META}.tmp"
        tmp.write_text(json.dumps(meta) + "\n")
        os.replace(tmp, d / cls.META)
        return cls(d, budget_bytes)

    # ---------------------------------------------------------------- wire
    def wire_config(self) -> dict[str, object]:
        """ConfigRecord entries that point a client's ``compression_mod`` at this store."""
        return {keys.EF_STORE: "disk", keys.EF_STORE_DIR: str(self.directory.resolve()),
                keys.EF_STORE_ID: self.uid, keys.EF_STORE_BUDGET: int(self.budget_bytes)}

    # ---------------------------------------------------------------- rows
    def _check_cid(self, cid: int) -> int:
        cid = int(cid)
        if cid < 0:
            raise ValueError(f"client id {cid} must be >= 0")
        return cid

    def token(self, cid: int) -> int:
        raw = os.pread(self._tokens, _TOKEN.itemsize, self._check_cid(cid) * _TOKEN.itemsize)
        return int(np.frombuffer(raw, _TOKEN)[0]) if len(raw) == _TOKEN.itemsize else 0

    def _read_row(self, cid: int) -> np.ndarray:
        raw = _pread_exact(self._rows, self.row_bytes, cid * self.row_bytes)
        if len(raw) != self.row_bytes:
            raise RuntimeError(
                f"{self.directory / self.ROWS}: row {cid} is truncated ({len(raw)} of {self.row_bytes} bytes)"
            )
        return np.frombuffer(raw, self.np_dtype)

    def _remember(self, cid: int, token: int, row: np.ndarray) -> None:
        old = self._cache.pop(cid, None)
        if old is not None:
            self.memory_bytes -= old[1].nbytes
        if row.nbytes > self.budget_bytes:
            return
        while self.memory_bytes + row.nbytes > self.budget_bytes:
            _, (_, evicted) = self._cache.popitem(last=False)
            self.memory_bytes -= evicted.nbytes
        self._cache[cid] = (token, row)
        self.memory_bytes += row.nbytes

    def load(self, cid: int) -> torch.Tensor | None:
        """r_cid as float32 (a fresh tensor), or None if the client has none yet."""
        cid = self._check_cid(cid)
        token = self.token(cid)
        if token == 0:
            return None
        return self._cached_or(cid, token, lambda: self._read_row(cid))

    def _cached_or(self, cid: int, token: int, read) -> torch.Tensor:
        """r_cid from the in-memory tier when its token is current, else ``read()`` (remembered within the budget)."""
        hit = self._cache.get(cid)
        if hit is not None and hit[0] == token:
            self._cache.move_to_end(cid)
            self.hits += 1
            row = hit[1]
        else:
            self.reads += 1
            row = read()
            if self.budget_bytes:
                self._remember(cid, token, row)
        return torch.from_numpy(row.astype(np.float32))

    def save(self, cid: int, r: torch.Tensor) -> None:
        """Write r_cid (cast to the store dtype); the row first, then a fresh token."""
        cid = self._check_cid(cid)
        row = _as_storage(r, self.dtype)
        if row.size != self.dim:
            raise ValueError(f"residual has {row.size} values but the store holds rows of d={self.dim}")
        _pwrite_all(self._rows, row.data, cid * self.row_bytes)
        token = _fresh_token()
        _pwrite_all(self._tokens, np.array([token], _TOKEN).data, cid * _TOKEN.itemsize)
        if self.budget_bytes:
            self._remember(cid, token, row)

    # ---------------------------------------------------------------- blocks of rows (a cohort)
    _TOKEN_SPAN_BYTES = 1 << 20  # tokens of ids within this span are read in one pread

    def _tokens_of(self, cids: list[int]) -> list[int]:
        lo, hi = min(cids), max(cids)
        if (hi - lo + 1) * _TOKEN.itemsize > self._TOKEN_SPAN_BYTES:
            return [self.token(c) for c in cids]
        raw = os.pread(self._tokens, (hi - lo + 1) * _TOKEN.itemsize, lo * _TOKEN.itemsize)
        span = np.zeros(hi - lo + 1, _TOKEN)  # past the file's end: no residual (0)
        got = len(raw) // _TOKEN.itemsize
        span[:got] = np.frombuffer(raw[: got * _TOKEN.itemsize], _TOKEN)
        return [int(span[c - lo]) for c in cids]

    def _read_rows(self, cids: list[int]) -> dict[int, np.ndarray]:
        """Rows of distinct ids, one pread per run of consecutive ids."""
        ids = sorted(set(cids))
        out: dict[int, np.ndarray] = {}
        for a, b in _runs(ids):
            n = (b - a) * self.row_bytes
            raw = _pread_exact(self._rows, n, ids[a] * self.row_bytes)
            if len(raw) != n:
                raise RuntimeError(f"{self.directory / self.ROWS}: rows {ids[a]}..{ids[b - 1]} are truncated "
                                   f"({len(raw)} of {n} bytes)")
            block = np.frombuffer(raw, self.np_dtype).reshape(b - a, self.dim)
            for j in range(a, b):
                out[ids[j]] = block[j - a]
        return out

    def load_many(self, cids) -> list[torch.Tensor | None]:
        """[load(cid) for cid in cids]: the tokens in one read, the rows not cached in one read per run of
        consecutive ids; cache use (hits, reads, LRU order) as the per-client loads in this order."""
        cids = [self._check_cid(c) for c in cids]
        if not cids:
            return []
        tokens = self._tokens_of(cids)
        wanted = []
        for cid, token in zip(cids, tokens):
            hit = self._cache.get(cid)
            if token and not (hit is not None and hit[0] == token):
                wanted.append(cid)
        rows = self._read_rows(wanted) if wanted else {}
        out: list[torch.Tensor | None] = []
        for cid, token in zip(cids, tokens):
            if token == 0:
                out.append(None)
                continue
            # a row of its own memory: a cached row must not hold the whole block
            out.append(self._cached_or(cid, token, lambda c=cid: rows[c].copy()))
        return out

    def save_many(self, cids, R: torch.Tensor) -> None:
        """save(cids[i], R[i]) for each row: every row first (one pwrite per run of consecutive ids), then
        their fresh tokens (one pwrite per run), so a token never points at an older row."""
        cids = [self._check_cid(c) for c in cids]
        _check_block(cids, R, self.dim, "DiskResidualStore.save_many")
        if not cids:
            return
        if self.dtype not in DTYPES:
            raise ValueError(f"residual dtype {self.dtype!r}: use float32 or float16")
        block = np.ascontiguousarray(R.detach().cpu().numpy().astype(DTYPES[self.dtype]))
        order = sorted(range(len(cids)), key=cids.__getitem__)
        ids = [cids[j] for j in order]
        rows = np.ascontiguousarray(block[order])
        tokens = np.array([_fresh_token() for _ in ids], _TOKEN)
        runs = _runs(ids)
        for a, b in runs:
            _pwrite_all(self._rows, rows[a:b].data, ids[a] * self.row_bytes)
        for a, b in runs:
            _pwrite_all(self._tokens, tokens[a:b].data, ids[a] * _TOKEN.itemsize)
        if self.budget_bytes:
            where = {cid: j for j, cid in enumerate(ids)}
            for cid in cids:  # the per-client saves' LRU order
                self._remember(cid, int(tokens[where[cid]]), rows[where[cid]].copy())

    def present(self) -> np.ndarray:
        """Sorted ids of the clients that hold a residual."""
        tokens = np.fromfile(self.directory / self.TOKENS, dtype=_TOKEN)
        return np.flatnonzero(tokens).astype(np.int64)

    def disk_bytes(self) -> int:
        """Bytes the row file occupies on disk (holes excluded)."""
        return os.fstat(self._rows).st_blocks * 512

    # ---------------------------------------------------------------- checkpoints
    def snapshot(self, ids_path: str | Path, rows_path: str | Path) -> int:
        """Write the present ids (.npy) and their rows (raw, in id order), one row in memory at a time.

        Both files are fsynced; the caller renames them into place. Returns the number of rows.
        """
        ids = self.present()
        with open(ids_path, "wb") as f:
            np.save(f, ids)
            f.flush()
            os.fsync(f.fileno())
        with open(rows_path, "wb") as f:
            for cid in ids.tolist():
                f.write(self._read_row(cid).tobytes())
            f.flush()
            os.fsync(f.fileno())
        return int(ids.size)

    def restore(self, ids_path: str | Path, rows_path: str | Path) -> int:
        """Make the store hold exactly the rows of a snapshot (fresh tokens, cache dropped)."""
        ids = np.load(ids_path)
        if ids.ndim != 1 or (ids.size and ids.min() < 0):
            raise ValueError(f"{ids_path}: not a list of client ids")
        size = os.path.getsize(rows_path)
        if size != ids.size * self.row_bytes:
            raise ValueError(f"{rows_path}: {size} bytes, expected {ids.size} rows of {self.row_bytes}")
        self._cache.clear()
        self.memory_bytes = 0
        os.ftruncate(self._tokens, 0)  # every other client: no residual
        os.ftruncate(self._rows, 0)
        with open(rows_path, "rb") as f:
            for cid in ids.tolist():
                _pwrite_all(self._rows, f.read(self.row_bytes), int(cid) * self.row_bytes)
        if ids.size:
            tokens = np.zeros(int(ids.max()) + 1, _TOKEN)
            tokens[ids] = [_fresh_token() for _ in range(ids.size)]
            _pwrite_all(self._tokens, tokens.data, 0)
        return int(ids.size)

    def close(self) -> None:
        """Close the store's two files, once. A second call (``__del__`` after ``close``, a process cache
        evicting a store its run already closed) does nothing: closing the same descriptor numbers again
        would close whatever file the process has opened under those numbers since (another run's store,
        a checkpoint being written), and a later pwrite would then go to the wrong file."""
        fds, self._rows, self._tokens = (self._rows, self._tokens), -1, -1
        for fd in fds:
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._cache.clear()
        self.memory_bytes = 0

    def destroy(self) -> None:
        """Close the store, drop this process's cached handles on its directory and delete it (a finished run)."""
        self.close()
        release(self.directory)
        shutil.rmtree(self.directory, ignore_errors=True)

    def __del__(self) -> None:  # pragma: no cover - best effort
        if hasattr(self, "_tokens"):
            self.close()


_OPEN: OrderedDict[tuple[str, str], DiskResidualStore] = OrderedDict()
_MAX_OPEN = 4  # stores kept open per process (a process serves one run at a time)


def _open_disk(directory: str, uid: str, budget_bytes: int) -> DiskResidualStore:
    """The process's open store for (directory, uid), reopened when the run's store changed."""
    key = (directory, uid)
    store = _OPEN.get(key)
    if store is not None and store.budget_bytes == budget_bytes:
        _OPEN.move_to_end(key)
        return store
    if store is not None:
        store.close()
    store = DiskResidualStore(directory, budget_bytes)
    if store.uid != uid:
        store.close()
        raise ValueError(f"{directory}: residual store {store.uid} is not this run's ({uid}); was it recreated?")
    _OPEN[key] = store
    while len(_OPEN) > _MAX_OPEN:
        _, old = _OPEN.popitem(last=False)
        old.close()
    return store


def release(directory: str | Path) -> None:
    """Close and forget this process's open stores of ``directory`` (its run has ended)."""
    key_dir = str(directory)
    for key in [k for k in _OPEN if k[0] == key_dir or Path(k[0]) == Path(key_dir)]:
        _OPEN.pop(key).close()


def store_for(config: ConfigRecord, context: Context) -> ResidualStore:
    """The store a train message names (``keys.EF_STORE``; default: the node's context)."""
    kind = str(config.get(keys.EF_STORE, "context"))
    dtype = str(config.get(keys.EF_DTYPE, "float32"))
    if kind == "context":
        return ContextResidualStore(context, dtype)
    if kind != "disk":
        raise ValueError(f"residual store {kind!r} unknown; use one of {', '.join(STORE_KINDS)}")
    if keys.EF_STORE_DIR not in config or keys.EF_STORE_ID not in config:
        raise ValueError("a disk residual store needs its directory and id in the train config")
    store = _open_disk(str(config[keys.EF_STORE_DIR]), str(config[keys.EF_STORE_ID]),
                       int(config.get(keys.EF_STORE_BUDGET, 0)))
    if store.dtype != dtype:
        raise ValueError(f"residual store {store.directory} holds {store.dtype} rows but the strategy asks for {dtype}")
    return store
