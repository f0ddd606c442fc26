"""How many torch threads a batched cohort call gets: ``simulation.cohort_threads``.

A batched call's matrix products are large enough to split across cores, but only while the cores
are free. torch's intra-op pool is OpenMP: each parallel region ends at a barrier, so when another
process holds one of the cores the region waits for the thread that has none (measured on 2 cores
with one busy process beside the run: 2 threads 2x-8x slower than 1, see docs/performance.md).
``OMP_WAIT_POLICY=passive`` does not help (the wait is for the descheduled thread's share of the
work, not the spinning) and only takes effect if set before torch loads its OpenMP runtime.

The rule of ``cohort_threads: 0`` (automatic), :class:`ThreadChooser`:

1. one thread (never slower than the per-client inline path's one thread per process) unless the
   cores were idle: over the last interval of at least :data:`MIN_INTERVAL_S` (batched calls
   included), the CPU time the *other* processes of the machine used (``/proc/stat`` busy time minus
   this process's own CPU time) was below :data:`IDLE_CORES` of a core on average;
2. with idle cores, ``n`` threads (one per core this process may use), and the per-client time of
   the call is compared with the last one-thread call of the same kind (the same group key: message
   type, runtime and local hyperparameters). Where ``n`` threads were slower (a small model, a core
   taken during the call), the chooser returns to one thread and waits twice as many calls as last
   time (1, 2, 4, ... up to :data:`MAX_BACKOFF`) before it tries ``n`` again.

The thread count does not change the numbers (each output element of torch's CPU matrix products
is reduced on one thread; tests/test_vectorized.py checks a run with 1 and with 2 threads is
bit-identical), so the choice only moves time. An explicit ``cohort_threads: k`` uses ``k`` threads
always.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Hashable

__all__ = ["ThreadChooser", "other_processes_cores", "CpuSample", "IDLE_CORES", "MAX_BACKOFF", "MIN_INTERVAL_S"]

IDLE_CORES = 0.25  # other processes' average use (cores) below which the machine counts as idle
MAX_BACKOFF = 64  # at most this many calls between two tries of n threads after they lost
MIN_INTERVAL_S = 0.2  # shortest interval the others' CPU use is estimated over
SLOWER = 1.05  # n threads "lost" when their per-client time exceeds one thread's by more than 5%


@dataclass(frozen=True)
class CpuSample:
    """Machine busy CPU seconds (all processes, ``/proc/stat``) and this process's CPU seconds, at one time."""

    machine_busy_s: float | None
    own_s: float


def _machine_busy_s() -> float | None:
    """Busy CPU seconds of the whole machine since boot (``/proc/stat``: all but idle and iowait); None
    where there is no /proc (not Linux)."""
    try:
        with open("/proc/stat", "rb") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != b"cpu":
        return None
    ticks = [int(x) for x in fields[1:9]]  # user nice system idle iowait irq softirq steal
    busy = sum(ticks) - ticks[3] - ticks[4]
    return busy / os.sysconf("SC_CLK_TCK")


def sample() -> CpuSample:
    return CpuSample(_machine_busy_s(), time.process_time())


def other_processes_cores(before: CpuSample, after: CpuSample, wall_s: float) -> float | None:
    """Average number of cores the other processes of the machine kept busy between two samples:
    (Δ machine busy − Δ own CPU) / Δ wall. None without /proc/stat or over a too short interval
    (``/proc/stat`` counts in clock ticks, usually 10 ms: :data:`MIN_INTERVAL_S` keeps the error of
    one tick per core under 0.1 core)."""
    if before.machine_busy_s is None or after.machine_busy_s is None or wall_s < MIN_INTERVAL_S:
        return None
    return max(0.0, (after.machine_busy_s - before.machine_busy_s) - (after.own_s - before.own_s)) / wall_s


@dataclass
class _Kind:
    one_thread_s: float | None = None  # per-client seconds of the last one-thread call
    wait: int = 0  # calls left before n threads may be tried again
    backoff: int = 1


@dataclass
class ThreadChooser:
    """Chooses the torch thread count of each batched call (module docstring: the rule).

    ``fixed`` > 0: always that many threads. ``cores``: the ``n`` of the rule. Use::

        threads = chooser.threads(key)
        ... the call with ``threads`` threads, timed ...
        chooser.record(key, threads, seconds, clients)
    """

    fixed: int = 0
    cores: int = 1
    idle_cores: float = IDLE_CORES
    sampler: Callable[[], CpuSample] = field(default=lambda: sample())  # tests pass fabricated samples
    clock: Callable[[], float] = time.perf_counter
    _kinds: dict[Hashable, _Kind] = field(default_factory=dict)
    _last: CpuSample | None = None
    _last_t: float = 0.0
    _others: float | None = None  # the last estimate of the other processes' cores
    # (threads, others' cores) of the last calls (tests, benchmarks); bounded, so a long run keeps no per-call list
    history: deque[tuple[int, float | None]] = field(default_factory=lambda: deque(maxlen=1024))

    def __post_init__(self) -> None:
        self.mark()

    def mark(self) -> None:
        """Start the interval the next decision looks at (the grid calls it when it is built)."""
        self._last, self._last_t = self.sampler(), self.clock()

    def threads(self, key: Hashable) -> int:
        if self.fixed > 0:
            self.history.append((self.fixed, None))
            return self.fixed
        now, t = self.sampler(), self.clock()
        others = other_processes_cores(self._last, now, t - self._last_t) if self._last is not None else None
        if others is not None:  # a new estimate over [last mark, now], calls included; else the interval grows
            self._others, self._last, self._last_t = others, now, t
        others = self._others
        kind = self._kinds.setdefault(key, _Kind())
        n = 1
        if (self.cores > 1 and others is not None and others < self.idle_cores
                and kind.one_thread_s is not None and kind.wait <= 0):
            n = self.cores
        kind.wait -= 1
        self.history.append((n, others))
        return n

    def record(self, key: Hashable, threads: int, seconds: float, clients: int) -> None:
        """The call's time; n threads slower than one (per client) sends the chooser back to one thread."""
        if self.fixed > 0 or clients <= 0:
            return
        kind = self._kinds.setdefault(key, _Kind())
        per_client = seconds / clients
        if threads == 1:
            kind.one_thread_s = per_client
        elif kind.one_thread_s is not None and per_client > SLOWER * kind.one_thread_s:
            kind.wait = kind.backoff
            kind.backoff = min(2 * kind.backoff, MAX_BACKOFF)
        else:
            kind.backoff = 1
