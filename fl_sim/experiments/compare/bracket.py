"""Bracketed tuning: extend a method's step along a log grid until the best validation point is interior.

A tuning grid of fixed points says little when its best point sits on an edge: the optimum may lie
beyond it. The rule, the same for every method (factor and cap are suite settings): take the line of
tuned points that differ from the chosen point only in the method's ``step`` key; while the chosen value
has no evaluated neighbour below (above) it, add the value / ``factor`` (x ``factor``) and tune again,
until the chosen point has a neighbour on both sides (*bracketed*: neither neighbour is better, since
the chosen point has the highest score) or ``cap`` points have been added for this method and task
(*at cap*). A diverged run scores 0 and so bounds the line like any worse point.
"""

from __future__ import annotations

import math
from typing import Any

BRACKETED, AT_CAP, EXTENDING = "bracketed", "at cap", "extending"


def scale(value: Any, factor: float) -> Any:
    """``value`` x ``factor`` on the log grid: an int step stays an int (at least 1), a float keeps 6
    significant digits (so 0.15 x 2 x 2 prints as 0.6, not 0.6000000000000001)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return max(1, int(round(value * factor)))
    return float(f"{float(value) * factor:.6g}")


def bracket(line: list[tuple[Any, float | None]], best: Any, factor: float, added: int, cap: int,
            ) -> tuple[str, list[Any]]:
    """The bracket status of a tuning line and the step values to add next.

    ``line``: (step value, validation score) of every tuned point on the chosen point's line (score None:
    the run did not finish; it bounds nothing). ``best``: the chosen step value. ``added``: how many
    points were already added for this method and task. Returns (``bracketed`` | ``extending`` |
    ``at cap``, new values), at most ``cap - added`` new values, below first.
    """
    if factor <= 1.0 or not math.isfinite(factor):
        raise ValueError(f"bracket factor {factor} must be a finite number > 1")
    values = [v for v, s in line if s is not None]
    below = any(v < best for v in values)
    above = any(v > best for v in values)
    if below and above:
        return BRACKETED, []
    tried = {v for v, _ in line}
    want = ([] if below else [scale(best, 1.0 / factor)]) + ([] if above else [scale(best, factor)])
    want = [v for v in want if v not in tried and v != best]
    room = max(0, cap - added)
    if not want or room == 0:
        return AT_CAP, []
    return EXTENDING, want[:room]
