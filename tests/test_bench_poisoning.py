"""Smoke test of fl_sim.bench.bench_poisoning (the README's poisoning figures) at tiny sizes."""

from __future__ import annotations

import json
import math

from fl_sim.bench import bench_poisoning


def test_cases_cover_the_readme_tables():
    zero, inner = bench_poisoning.cases("zero"), bench_poisoning.cases("inner")
    assert len(zero) == 3 * 2 * 2 and {c["norm_bound"] for c in zero} == {10.0, 3.0}
    assert {c["inner"] for c in inner} == set(bench_poisoning.INNERS) and len(inner) == 4 * 3


def test_quick_runs_place_the_attackers(tmp_path, monkeypatch):
    out = tmp_path / "poisoning.json"
    zero = bench_poisoning.run_case("natural", rounds=2, attack="zero", quick=True)
    assert zero["attacker"]["replies"] == 2 and zero["honest"]["replies"] == 2 * 4  # one attacker a round of 5
    flip = bench_poisoning.run_case("iid", rounds=2, attack="sign_flip", inner="fedmedian", quick=True)
    assert flip["attacker"]["replies"] >= 1 and flip["honest"]["replies"] >= 1
    assert all(-1 <= r[k] <= 1 for r in (flip["attacker"], flip["honest"]) for k in ("cosine_min", "cosine_max"))
    assert all(math.isfinite(r["final_accuracy"]) for r in (zero, flip))
    monkeypatch.setattr(bench_poisoning, "cases", lambda table: [dict(partition="natural", attack=None)])
    rows = bench_poisoning.main(["--quick", "--rounds", "1", "--out", str(out)])
    assert json.loads(out.read_text()) == rows and rows[0]["rejected"] == 0 and "attacker" not in rows[0]
