"""Work that is the same for every client of a round is done once per round.

Common randomness (the run's one Φ of FIHTCS, the Count Sketch hashes of FetchSGD, and every operator
under ``seed_mode=shared``) is built from its seed once per process and reused by every client's encode
and the server's decode (``SeedCache``). QCS's operators are each client's own (per-client seeds).
"""

from __future__ import annotations

import pytest

from fl_sim.compression import base as codec_base
from fl_sim.compression import projections, sketch
from fl_sim.config import load_config
from fl_sim.testing import run_in_memory

ROUNDS, PER_ROUND = 3, 6
SMALL = [f"rounds={ROUNDS}", "clients=12", f"clients_per_round={PER_ROUND}", "model.hidden=[8]", "eval_every=0",
         "simulation.backend=inline", "checkpoint_every=0"]


def _count(monkeypatch, cls) -> list[int]:
    built: list[int] = []
    init = cls.__init__

    def counting(self, *args, **kwargs):
        built.append(1)
        init(self, *args, **kwargs)

    monkeypatch.setattr(cls, "__init__", counting)
    return built


@pytest.mark.parametrize(
    "config, extra, cls, expected",
    [
        # seed_mode=shared (the old rule): one seed per round for every client
        ("configs/qcs.yaml", ["strategy.seed_mode=shared"], projections.PartialHadamard, ROUNDS),
        ("configs/fiht_cs.yaml", [], projections.SubsampledOrthogonal, 1),  # one Φ for all rounds (Tang)
        ("configs/fetchsgd.yaml", [], sketch.CountSketch, 1),  # one hash family for the run
    ],
)
def test_shared_operators_are_built_once_per_round_not_per_client(monkeypatch, config, extra, cls, expected):
    built = _count(monkeypatch, cls)
    _, rows, _ = run_in_memory(load_config(config, SMALL + extra))
    assert len(rows) == ROUNDS + 1
    # per client it would be ROUNDS * PER_ROUND (+ the server's decodes)
    assert len(built) == expected, (config, len(built))


def test_per_client_qcs_builds_one_operator_per_client_and_side(monkeypatch):
    # QCS's R and S are each client's own (per-client seeds): per round, one operator per client on the client
    # side (its EF decode reuses it), at most one per client at the server's decode (the in-process cache
    # holds 4 of the 6 clients' operators; which hit depends on the reply order), one for the reference.
    built = _count(monkeypatch, projections.PartialHadamard)
    _, rows, _ = run_in_memory(load_config("configs/qcs.yaml", SMALL))
    assert len(rows) == ROUNDS + 1
    assert ROUNDS * (PER_ROUND + 1) <= len(built) <= ROUNDS * (2 * PER_ROUND + 1)


def test_seed_cache_is_an_lru_of_the_given_size():
    calls: list[int] = []
    cache = codec_base.SeedCache(lambda s: calls.append(s) or s * 10, size=2)
    assert [cache(1), cache(1), cache(2), cache(1), cache(3), cache(2)] == [10, 10, 20, 10, 30, 20]
    assert calls == [1, 2, 3, 2]  # 2 was evicted by 3 (1 was used more recently)
    with pytest.raises(ValueError, match="size"):
        codec_base.SeedCache(lambda s: s, size=0)
