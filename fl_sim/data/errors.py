"""The one exception of fl_sim.data."""

from __future__ import annotations

__all__ = ["DataError"]


class DataError(ValueError):
    """A data problem explained in one line (missing files with where to put them, impossible partition...)."""
