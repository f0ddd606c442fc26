"""One metric layout per round for the inner strategy: the replies' MetricRecords made consistent.

Flower's Message-API strategies (``FedAvg`` and everything built on it) aggregate client metrics only
when every reply of a round carries exactly one MetricRecord with exactly the same keys
(``flwr.serverapp.strategy.strategy_utils.validate_message_reply_consistency``); otherwise they raise
``InconsistentMessageReplies`` and the run ends. One client with an extra metric, a missing
``train-loss``, a MetricRecord under another name or a list where its peers send a number would
end every run it takes part in.

Rule (per round, over the replies that passed the per-reply checks): each reply's *layout* is the map
key -> kind (a number, or a list of a given length); the round's *agreed layout* is the most common
layout (ties: the one most replies contain, then the one with more keys, then the first in sorted
order; so with two replies, one with an extra key, the extra key goes, and one client cannot remove a
key its peers agree on). A reply whose layout contains
the agreed one is *normalized*: its other keys are dropped before the inner strategy sees it. A reply
that lacks an agreed key, or sends a key in another kind, cannot be normalized (no value can be made
up for it) and is rejected. The weight key (``num-examples``) is in every usable reply, so it is
always agreed. Every reply handed on carries its metrics under one name, ``metrics``.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from flwr.app import MetricRecord

__all__ = ["layout", "agreed_layout", "conform"]

Layout = frozenset  # of (key, kind) pairs; kind: None = a number, n = a list of n numbers


def _kind(value: Any) -> int | None:
    return len(value) if isinstance(value, list) else None


def layout(record: MetricRecord, ignore: tuple[str, ...] = ()) -> Layout:
    """The (key, kind) pairs of a MetricRecord, leaving out ``ignore`` (keys the server sets itself)."""
    return frozenset((k, _kind(v)) for k, v in record.items() if k not in ignore)


def agreed_layout(layouts: list[Layout]) -> Layout:
    """The most common layout of a round; ties go to the layout most replies contain (most replies used),
    then to the one with more keys, then to the first in sorted order."""
    counts = Counter(layouts)
    contained = {lay: sum(n for other, n in counts.items() if lay <= other) for lay in counts}
    return min(counts, key=lambda lay: (-counts[lay], -contained[lay], -len(lay), sorted(lay, key=repr)))


def _describe(kind: int | None) -> str:
    return "a number" if kind is None else f"a list of {kind}"


def conform(record: MetricRecord, agreed: Layout, ignore: tuple[str, ...] = ()) -> tuple[MetricRecord | None, str]:
    """(the record with exactly the agreed keys, what was dropped) or (None, why it cannot be used)."""
    mine = dict(layout(record, ignore))
    want = dict(agreed)
    missing = sorted(k for k in want if k not in mine)
    if missing:
        return None, f"lacks the metric(s) {missing} that the round's other replies report"
    wrong = sorted(k for k in want if mine[k] != want[k])
    if wrong:
        k = wrong[0]
        return None, (f"metric {k!r} is {_describe(mine[k])} where the round's other replies send "
                      f"{_describe(want[k])}")
    extra = sorted(k for k in mine if k not in want)
    kept = MetricRecord({k: record[k] for k in record.keys() if k in want or k in ignore})
    return kept, (f"dropped the metric(s) {extra} that the round's other replies do not report" if extra else "")
