"""Work that is the same for every client of a round is done once per round (issue 7, "Scale").

A round's clients share one seed (or, for FIHTCS, the run's one Φ): the partial Hadamard operator of
QCS, the subsampled DCT of FIHTCS and the Count Sketch hashes of FetchSGD are built from that seed once
per process and reused by every client's encode and the server's decode (``SeedCache``).
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
    "config, cls, expected",
    [
        ("configs/qcs.yaml", projections.PartialHadamard, ROUNDS),  # one shared seed per round
        ("configs/fiht_cs.yaml", projections.SubsampledOrthogonal, 1),  # one Φ for all rounds (Tang)
        ("configs/fetchsgd.yaml", sketch.CountSketch, 1),  # one hash family for the run
    ],
)
def test_shared_operators_are_built_once_per_round_not_per_client(monkeypatch, config, cls, expected):
    built = _count(monkeypatch, cls)
    _, rows, _ = run_in_memory(load_config(config, SMALL))
    assert len(rows) == ROUNDS + 1
    # per client it would be ROUNDS * PER_ROUND (+ the server's decodes)
    assert len(built) == expected, (config, len(built))


def test_seed_cache_is_an_lru_of_the_given_size():
    calls: list[int] = []
    cache = codec_base.SeedCache(lambda s: calls.append(s) or s * 10, size=2)
    assert [cache(1), cache(1), cache(2), cache(1), cache(3), cache(2)] == [10, 10, 20, 10, 30, 20]
    assert calls == [1, 2, 3, 2]  # 2 was evicted by 3 (1 was used more recently)
    with pytest.raises(ValueError, match="size"):
        codec_base.SeedCache(lambda s: s, size=0)
