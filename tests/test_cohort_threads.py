"""The thread rule of the vectorized backend's batched calls (fl_sim.clients.cohort_threads).

The chooser is driven with fabricated /proc/stat samples and a fabricated clock, so each test states the
machine's load exactly; the grid-level tests check the rule reaches the batched calls and that the thread
count does not change a reply's bits.
"""

import json

import pytest
import torch

from fl_sim.wire import keys
from fl_sim.clients.cohort_threads import (
    IDLE_CORES,
    MAX_BACKOFF,
    MIN_INTERVAL_S,
    CpuSample,
    ThreadChooser,
    other_processes_cores,
    sample,
)
from fl_sim.config import config_from_dict
from fl_sim.wire.records import flatten_arrays
from fl_sim.engine.vectorized import VectorizedGrid
from fl_sim.testing import round_replies


class FakeMachine:
    """A machine whose other processes keep ``others`` cores busy; each sample advances time by ``step`` s,
    during which this process used ``own`` cores."""

    def __init__(self, others: float, own: float = 1.0, step: float = 0.5):
        self.others, self.own, self.step = others, own, step
        self.t = 0.0
        self.busy = 0.0
        self.own_s = 0.0

    def clock(self) -> float:
        return self.t

    def sampler(self) -> CpuSample:
        self.t += self.step
        self.busy += (self.others + self.own) * self.step
        self.own_s += self.own * self.step
        return CpuSample(self.busy, self.own_s)


def chooser(machine: FakeMachine, cores: int = 2, fixed: int = 0) -> ThreadChooser:
    return ThreadChooser(fixed=fixed, cores=cores, sampler=machine.sampler, clock=machine.clock)


def test_other_processes_cores_subtracts_this_process():
    a, b = CpuSample(10.0, 3.0), CpuSample(11.5, 4.0)  # 1.5 busy CPU s in 1 s, 1.0 of them ours
    assert other_processes_cores(a, b, 1.0) == pytest.approx(0.5)
    assert other_processes_cores(a, b, MIN_INTERVAL_S / 2) is None  # too short for /proc/stat's ticks
    assert other_processes_cores(CpuSample(None, 0.0), b, 1.0) is None  # no /proc/stat


def test_a_busy_machine_gets_one_thread_whatever_the_timings():
    m = FakeMachine(others=1.0)
    c = chooser(m)
    for _ in range(20):
        n = c.threads("train")
        c.record("train", n, 0.1, 100)
    assert [n for n, _ in c.history] == [1] * 20
    assert all(o == pytest.approx(1.0) for _, o in list(c.history)[1:])


def test_idle_cores_get_all_threads_after_a_one_thread_reference_while_faster():
    m = FakeMachine(others=0.0)
    c = chooser(m)
    assert c.threads("train") == 1  # no one-thread time of this kind yet
    c.record("train", 1, 1.0, 100)
    for _ in range(5):
        assert c.threads("train") == 2
        c.record("train", 2, 0.6, 100)  # faster: stays
    assert c.threads("evaluate") == 1  # another kind of call has its own reference


def test_slower_n_threads_back_off_exponentially():
    m = FakeMachine(others=0.0)
    c = chooser(m)
    seen = []
    for _ in range(40):
        n = c.threads("train")
        seen.append(n)
        c.record("train", n, 1.0 if n == 1 else 1.5, 100)  # n threads always lose
    tries = [i for i, n in enumerate(seen) if n == 2]
    gaps = [b - a - 1 for a, b in zip(tries, tries[1:])]  # one-thread calls between two tries
    assert gaps == [1, 2, 4, 8, 16][: len(gaps)] and len(gaps) >= 4
    assert MAX_BACKOFF >= 16


def test_load_arriving_sends_the_chooser_back_to_one_thread():
    m = FakeMachine(others=0.0)
    c = chooser(m)
    for _ in range(3):
        n = c.threads("train")
        c.record("train", n, 0.5 if n == 2 else 1.0, 100)
    assert c.history[-1][0] == 2
    m.others = 1.0  # another process takes a core
    assert c.threads("train") == 1


def test_fixed_threads_are_used_as_given():
    c = chooser(FakeMachine(others=1.5), fixed=3)
    assert [c.threads("train") for _ in range(3)] == [3, 3, 3]


def test_the_real_sampler_reads_this_machine():
    s = sample()
    assert s.own_s >= 0 and (s.machine_busy_s is None or s.machine_busy_s > 0)
    assert IDLE_CORES < 1


# ---------------------------------------------------------------------------------------------- grid level
CFG = {
    "rounds": 2, "clients": 12, "clients_per_round": 8, "eval_every": 0,
    "data": {"name": "synthetic", "partition": "natural"},
    "model": {"name": "mlp", "hidden": [256]},
    "train": {"lr": 0.05, "batch_size": 16},
    "simulation": {"backend": "vectorized"},
}


def replies(grid_factory):
    return round_replies(config_from_dict(json.loads(json.dumps(CFG))), grid_factory)


def test_the_thread_count_does_not_change_a_bit():
    """1 and 2 torch threads give bit-identical replies (why the rule may pick either: only time moves)."""
    one, g1 = replies(lambda app, n: VectorizedGrid(app, n, threads=1))
    two, g2 = replies(lambda app, n: VectorizedGrid(app, n, threads=2))
    assert [t for t, _ in g1.thread_chooser.history] == [1, 1]
    assert [t for t, _ in g2.thread_chooser.history] == [2, 2]
    for a, b in zip(one, two):
        assert sorted(a) == sorted(b)
        for cid in a:
            assert torch.equal(flatten_arrays(a[cid].content[keys.ARRAYS]), flatten_arrays(b[cid].content[keys.ARRAYS]))
            assert a[cid].content[keys.METRICS][keys.TRAIN_LOSS] == b[cid].content[keys.METRICS][keys.TRAIN_LOSS]


def test_the_grid_asks_the_chooser_for_each_batched_call():
    """cohort_threads=0 (the default): on a machine whose other processes keep a core busy, every batched
    call runs on one thread, and the process's own thread count is left as it was."""
    busy = FakeMachine(others=1.0)

    def factory(app, n):
        grid = VectorizedGrid(app, n)
        grid.thread_chooser = ThreadChooser(cores=2, sampler=busy.sampler, clock=busy.clock)
        return grid

    before = torch.get_num_threads()
    _, grid = replies(factory)
    assert [t for t, _ in grid.thread_chooser.history] == [1, 1]
    assert torch.get_num_threads() == before
