"""Who may write a run directory: one run at a time, and never over another run's results.

``claim(run_dir, resume=..., overwrite=...)`` is held for the whole of ``run_experiment``:

* it takes an exclusive ``fcntl`` lock on RUN_DIR/.lock (released by the kernel when the process
  ends, however it ends), so a second run on the same directory fails at once with one line;
* a fresh run (not ``resume``) refuses a directory that already holds a run's files unless
  ``overwrite``, which deletes exactly those files first (never anything else in the directory);
* leftovers of a killed writer (``.*.tmp`` from atomic writes) are removed: nobody else can be
  writing them while the lock is held.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path
from typing import Iterator

__all__ = ["claim", "RUN_FILES", "RunDirBusy", "RunDirOccupied", "holds_run"]

LOCK = ".lock"
# Everything fl-sim writes into a run directory (config, metrics, summary, final model, checkpoints,
# client residual store).
RUN_FILES = ("config.yaml", "metrics.csv", "summary.json", "model.pt", "checkpoint", "state")


class RunDirBusy(ValueError):
    """Another process is writing the run directory."""


class RunDirOccupied(ValueError):
    """The directory holds an earlier run that a fresh run would replace."""


def holds_run(run_dir: Path) -> list[str]:
    """Names of fl-sim run files present in ``run_dir``."""
    return [n for n in RUN_FILES if (Path(run_dir) / n).exists()]


def _remove_stale_temps(run_dir: Path) -> None:
    for d in (run_dir, run_dir / "checkpoint"):
        if d.is_dir():
            for p in d.iterdir():
                if p.name.startswith(".") and p.name.endswith(".tmp") and p.is_file():
                    p.unlink(missing_ok=True)


@contextlib.contextmanager
def claim(run_dir: str | Path, *, resume: bool = False, overwrite: bool = False) -> Iterator[Path]:
    """Lock ``run_dir`` for one run (see the module docstring); yields it."""
    import fcntl

    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "exists and is not a directory (--out names a directory)", str(run_dir))
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise RunDirBusy(
                f"{run_dir}: another fl-sim run is writing this directory (lock {run_dir / LOCK}); "
                "wait for it to finish or choose another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        if not resume:
            present = holds_run(run_dir)
            if present and not overwrite:
                raise RunDirOccupied(
                    f"{run_dir} already holds a run ({', '.join(present)}): continue it with --resume {run_dir}, "
                    "choose a fresh --out, or pass --overwrite to replace it"
                )
            for name in present:
                p = run_dir / name
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        _remove_stale_temps(run_dir)
        yield run_dir
    finally:
        os.close(fd)  # releases the lock
