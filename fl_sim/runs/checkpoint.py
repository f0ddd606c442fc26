"""Checkpoints of a run, for ``fl-sim run --resume DIR``.

Every ``checkpoint_every`` rounds the server writes RUN_DIR/checkpoint/round-NNNNNN.pt holding all
that round N+1 needs and that cannot be rebuilt from the config:

* the global model after round N (every array of the ArrayRecord, dtypes kept);
* the strategy's server state (``UpdateStrategy.state_dict``: the inner strategy's FedOpt moments or FedAvgM
  momentum, fl-sim's FedAvgM momentum, FetchSGD momentum
  and error sketches, FIHTCS error Φe, DaQuSGD threshold sums and momentum, RLC channel memory and
  last broadcast);
* the metric rows of rounds 0..N (metrics.csv is rebuilt from them, dropping rows of rounds after N
  that a killed run may have written);
* the config, to refuse a resume under another one;
* with client error feedback, a snapshot of the disk residual store (residuals-NNNNNN.ids.npy, .rows).

RNG positions: every random draw is keyed by (seed, round, purpose, id) (fl_sim.rng): client
sampling, codec seeds, local-training shuffles, channel draws; models have no dropout and nothing
reads torch's or NumPy's global generators, so the round number is the whole RNG state.

Integrity: every checkpoint has a manifest, round-NNNNNN.sha256, holding the SHA-256 of each of its
files (the .pt and the residual snapshot) in ``sha256sum`` format (``sha256sum -c`` checks it by
hand). Loading verifies every file against it before reading anything, so a 0-byte, truncated or
bit-flipped .pt and a damaged snapshot (short rows, garbage ids) are all found before they can be
used; a checkpoint without its manifest is incomplete. A run directory written before manifests
existed (no .sha256 at all) is loaded unverified, with a warning.

Atomicity: each file is written under a temporary name, fsynced and renamed into place, in the order
residual snapshot, .pt, manifest: the manifest is the commit point. The two newest checkpoints are kept
(older ones are deleted only after the new manifest is in place), and loading falls back to the older
one with a one-line warning when the newest is damaged, incomplete or holds a non-finite model. A run
killed at any instant leaves a complete checkpoint; its stale temporaries are removed by the next writer.
Files are loaded with ``torch.load(weights_only=True)``: tensors, numbers, strings, lists and dicts.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

__all__ = ["Checkpoint", "save_checkpoint", "latest_checkpoint", "config_differences", "config_hash", "ENGINE_KEYS", "CKPT_DIR"]

log = logging.getLogger("fl_sim")

CKPT_DIR = "checkpoint"
FORMAT = 2  # 2: strategy state holds the inner strategy's (FedOpt moments, FedAvgM momentum)
KEEP = 2  # checkpoints kept: the newest and the one before it (fallback)
_NAME = re.compile(r"^round-(\d{6})\.pt$")
MANIFEST = "round-{:06d}.sha256"  # SHA-256 of each file of a checkpoint, sha256sum format

# Keys that choose how a run executes, not what it computes: a run may resume under other values.
ENGINE_KEYS = frozenset(
    {"out", "simulation.backend", "simulation.num_cpus", "simulation.num_gpus", "simulation.ray_address",
     "simulation.ray_num_cpus", "simulation.log_level", "simulation.residual_budget_mb",
     "simulation.supernodes", "simulation.cohort_chunk", "simulation.cohort_memory_mb", "simulation.device",
     "simulation.cohort_threads"}
)


@dataclass
class Checkpoint:
    """A loaded checkpoint: resume at round ``round + 1``."""

    round: int
    arrays: ArrayRecord
    strategy: dict[str, Any]
    strategy_class: str
    rows: list[dict[str, Any]]
    config: dict[str, Any]
    residuals: tuple[Path, Path] | None  # (ids .npy, rows) of the residual store snapshot
    path: Path


def _plain(v: Any) -> Any:
    """Metric values as Python numbers (a row may hold NumPy scalars)."""
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        return v.item()
    return v


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _tmp(d: Path, name: str) -> Path:
    fd, path = tempfile.mkstemp(dir=d, prefix=f".{name}.", suffix=".tmp")
    os.close(fd)
    return Path(path)


def _tensors(arrays: ArrayRecord) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of an ArrayRecord, in its order, as tensors that own their memory."""
    return [(name, torch.from_numpy(np.array(a.numpy(), copy=True))) for name, a in arrays.items()]


def _write_atomic(path: Path, data) -> Path:
    """``data`` (bytes or a buffer) to ``path`` atomically: a temporary file in the same directory, flushed
    and fsynced, then renamed over ``path`` (and the directory fsynced); the temporary is removed on failure."""
    tmp = _tmp(path.parent, path.stem)
    try:
        with open(tmp, "wb") as f:
            data = memoryview(data)
            while data:  # a raw file may write part of it (a nearly full disk); the next write raises
                data = data[f.write(data) or 0:]
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; results are ordinary files (as atomic_write)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.filename is None and exc.strerror:  # a full disk names no file: name the one being written
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def _torch_save_atomic(obj: Any, path: Path) -> Path:
    """torch.save ``obj`` to ``path`` atomically (:func:`_write_atomic`).

    Serialized in memory first: torch.save writing straight to a full disk fails inside its zip writer with
    "[enforce fail at inline_container.cc] unexpected pos" (a RuntimeError naming neither the disk nor the
    file); one plain write raises the OSError (ENOSPC, EDQUOT, EIO) that says what happened."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return _write_atomic(path, buf.getbuffer())


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _write_manifest(path: Path, files: list[Path]) -> Path:
    """The manifest of a checkpoint: ``<sha256>  <name>`` per file (``sha256sum`` format), atomically."""
    text = "".join(f"{_sha256(p)}  {p.name}\n" for p in files)
    return _write_atomic(path, text.encode())


def _verify_manifest(manifest: Path, pt: Path) -> set[str]:
    """Check every file a manifest lists against its SHA-256 (ValueError naming the first damaged one);
    returns the names listed, which must include the .pt."""
    listed: dict[str, str] = {}
    for line in manifest.read_text(errors="replace").splitlines():
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64 or "/" in name or name in ("", ".", ".."):
            raise ValueError(f"{pt}: damaged checkpoint (its manifest {manifest.name} is not sha256sum lines)")
        listed[name] = digest.lower()
    if pt.name not in listed:
        raise ValueError(f"{pt}: damaged checkpoint (its manifest {manifest.name} does not list it)")
    for name, digest in listed.items():
        f = pt.parent / name
        if not f.is_file():
            raise ValueError(f"{pt}: incomplete checkpoint ({name}, listed in {manifest.name}, is missing)")
        if _sha256(f) != digest:
            raise ValueError(f"{pt}: damaged checkpoint ({name}: {f.stat().st_size} bytes whose SHA-256 differs "
                             f"from {manifest.name})")
    return set(listed)


def save_checkpoint(
    run_dir: str | Path,
    server_round: int,
    arrays: ArrayRecord,
    strategy,
    rows: list[dict[str, Any]],
    config: dict[str, Any],
    store=None,
) -> Path:
    """Write the checkpoint of round ``server_round`` atomically; returns its path."""
    d = Path(run_dir) / CKPT_DIR
    d.mkdir(parents=True, exist_ok=True)
    stem = f"round-{server_round:06d}"
    residuals = None
    temps: list[Path] = []
    try:
        if store is not None:
            ids_tmp, rows_tmp = _tmp(d, "ids"), _tmp(d, "rows")
            temps += [ids_tmp, rows_tmp]
            store.snapshot(ids_tmp, rows_tmp)
            residuals = {"ids": f"residuals-{server_round:06d}.ids.npy", "rows": f"residuals-{server_round:06d}.rows"}
            os.replace(ids_tmp, d / residuals["ids"])
            os.replace(rows_tmp, d / residuals["rows"])
        state = {
            "format": FORMAT,
            "round": int(server_round),
            "arrays": _tensors(arrays),
            "strategy": strategy.state_dict(),
            "strategy_class": type(strategy).__name__,
            "rows": [{k: _plain(v) for k, v in row.items()} for row in rows],
            "config": config,
            "residuals": residuals,
        }
        pt = _torch_save_atomic(state, d / f"{stem}.pt")
        files = [pt] + ([d / residuals["ids"], d / residuals["rows"]] if residuals else [])
        _write_manifest(d / MANIFEST.format(server_round), files)  # the commit point
    except BaseException:
        for t in temps:
            if t.exists():
                t.unlink()
        raise
    # Keep this checkpoint and the one before it (the fallback should this one turn out unreadable);
    # delete older ones and their snapshots, and temporaries a killed writer left behind.
    kept = sorted((int(m.group(1)) for p in d.iterdir() if (m := _NAME.match(p.name))), reverse=True)[:KEEP]
    keep = {n for r in kept for n in (f"round-{r:06d}.pt", MANIFEST.format(r), f"residuals-{r:06d}.ids.npy",
                                       f"residuals-{r:06d}.rows")}
    for p in d.iterdir():
        if p.name not in keep and p.is_file():
            p.unlink()
    return d / f"{stem}.pt"


def save_model(run_dir: str | Path, arrays: ArrayRecord) -> Path:
    """Write the final global model to RUN_DIR/model.pt atomically: ``{name: tensor}`` in the order of
    the model's ``state_dict``, so ``model.load_state_dict(torch.load(path))`` restores it."""
    d = Path(run_dir)
    d.mkdir(parents=True, exist_ok=True)
    return _torch_save_atomic(dict(_tensors(arrays)), d / "model.pt")


def _first_line(exc: BaseException) -> str:
    """``Type: first line of the message`` (120 characters at most; an empty message gives the type alone)."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:120]}" if lines else type(exc).__name__


def _load(path: Path, verify: bool = True) -> Checkpoint:
    """One checkpoint, checked: every file against its manifest (``verify``), readable, this format, its
    residual snapshot present and listed in the manifest, a finite model."""
    d = path.parent
    listed: set[str] | None = None
    if verify:
        manifest = d / MANIFEST.format(int(_NAME.match(path.name).group(1)))
        if not manifest.is_file():
            raise ValueError(f"{path}: incomplete checkpoint (no manifest {manifest.name}: the write was interrupted)")
        listed = _verify_manifest(manifest, path)
    try:
        state = torch.load(path, weights_only=True)
    except Exception as exc:  # truncated or corrupt: torch/pickle raise many types
        raise ValueError(f"{path}: unreadable checkpoint ({_first_line(exc)})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        fmt = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{path}: checkpoint format {fmt!r}, this fl-sim reads {FORMAT}")
    try:
        res = state["residuals"]
        residuals = None
        if res is not None:
            residuals = (d / res["ids"], d / res["rows"])
            for p in residuals:
                if not p.is_file():
                    raise ValueError(f"{path} names the residual snapshot {p.name}, which is missing")
                if listed is not None and p.name not in listed:
                    raise ValueError(f"{path}: damaged checkpoint (its manifest does not list {p.name})")
        for name, t in state["arrays"]:
            if torch.is_floating_point(t) and not bool(torch.isfinite(t).all()):
                raise ValueError(f"{path}: the model array {name!r} holds non-finite values")
        arrays = ArrayRecord({name: Array(t.numpy()) for name, t in state["arrays"]})
        return Checkpoint(
            round=int(state["round"]), arrays=arrays, strategy=state["strategy"],
            strategy_class=state["strategy_class"], rows=list(state["rows"]), config=state["config"],
            residuals=residuals, path=path,
        )
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{path}: incomplete checkpoint (missing {exc})") from None


def latest_checkpoint(run_dir: str | Path) -> Checkpoint | None:
    """The newest usable checkpoint of a run directory, or None when there is none.

    A checkpoint whose files do not match their manifest's SHA-256 (or that has no manifest), that
    cannot be read, lacks its residual snapshot or holds a non-finite model is skipped with a one-line
    warning for the one before it; when every one is unusable, ValueError names the newest.
    """
    d = Path(run_dir) / CKPT_DIR
    if not d.is_dir():
        return None
    found = sorted(((int(m.group(1)), p) for p in d.iterdir() if (m := _NAME.match(p.name))), reverse=True)
    if not found:
        return None
    verify = any(d.glob("round-*.sha256"))
    if not verify:
        log.warning("%s: the checkpoints have no SHA-256 manifests (written by an older fl-sim); loading them "
                    "unverified", d)
    errors = []
    for _, path in found:
        try:
            ckpt = _load(path, verify)
        except ValueError as exc:
            errors.append(str(exc))
            continue
        for e in errors:
            log.warning("%s; falling back to %s", e, path.name)
        return ckpt
    raise ValueError(errors[0] + (f" (and {len(errors) - 1} older checkpoint(s) unusable)" if len(errors) > 1 else ""))


def remove_checkpoints(run_dir: str | Path) -> None:
    """Delete a run's checkpoints (a finished run needs none)."""
    shutil.rmtree(Path(run_dir) / CKPT_DIR, ignore_errors=True)


def _flatten(d: dict[str, Any]) -> dict[str, Any]:
    """Sections one level deep (``simulation.backend``); the channel mapping stays one value."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "channel":
            out.update({f"{k}.{sub}": x for sub, x in v.items()})
        else:
            out[k] = v
    return out


def config_hash(config: dict[str, Any]) -> str:
    """SHA-256 (16 hex digits) of what a config computes: the resolved mapping without ENGINE_KEYS, so a
    run under another backend has the same hash (``fl-sim sweep`` reruns a point whose hash changed)."""
    import hashlib
    import json

    flat = {k: v for k, v in _flatten(config).items() if k not in ENGINE_KEYS}
    text = json.dumps(flat, sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``key: saved -> current`` for every key that changes what a run computes (ENGINE_KEYS aside)."""
    a, b = _flatten(saved), _flatten(current)
    diffs = []
    for key in sorted(set(a) | set(b)):
        if key in ENGINE_KEYS:
            continue
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            diffs.append(f"{key}: {a.get(key, '<absent>')!r} -> {b.get(key, '<absent>')!r}")
    return diffs
