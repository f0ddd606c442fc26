"""CountSketch (fl_sim/compression/sketch.py): exact definition, linearity, heavy hitters, bucket zeroing."""

import pytest
import torch

from fl_sim.compression.base import CodecError
from fl_sim.compression.sketch import CountSketch, topk_abs


def _reference_table(cs: CountSketch, x: torch.Tensor) -> torch.Tensor:
    """S[j, b] = sum_{i: h_j(i) = b} s_j(i) x_i, computed with torch.index_add_ in float64."""
    table = torch.zeros(cs.rows, cs.cols, dtype=torch.float64)
    for j in range(cs.rows):  # rows only; coordinates are vectorized
        table[j].index_add_(0, cs.h[j].long(), cs.s[j].double() * x.double())
    return table


def _reference_estimate(cs: CountSketch, table: torch.Tensor) -> torch.Tensor:
    vals = cs.s.double() * table.double().gather(1, cs.h.long())  # (r, d)
    srt = vals.sort(dim=0).values
    r = cs.rows
    return srt[r // 2] if r % 2 else 0.5 * (srt[r // 2 - 1] + srt[r // 2])


def test_hashes_are_uniform_and_in_range():
    # Prepare: 5 rows x 1e5 coordinates, 8 buckets.
    cs = CountSketch(100_000, 5, 8, seed=0)
    # Assert: buckets in [0, c), signs +-1, dtypes as documented.
    assert cs.h.dtype == torch.int32 and cs.s.dtype == torch.int8
    assert int(cs.h.min()) == 0 and int(cs.h.max()) == 7
    assert set(cs.s.unique().tolist()) == {-1, 1}
    # Each bucket count ~ Binomial(5e5, 1/8): sd = sqrt(5e5 * 1/8 * 7/8) = 234; 5 sd = 1170.
    counts = torch.bincount(cs.h.flatten().long(), minlength=8).double()
    assert (counts - 62_500).abs().max() < 1170
    # Signs: sum of 5e5 Rademacher, sd = 707; 5 sd = 3536.
    assert abs(int(cs.s.sum())) < 3536


@pytest.mark.parametrize("rows", [1, 4, 5])
def test_sketch_and_estimate_match_definition(rows):
    cs = CountSketch(3000, rows, 64, seed=7)
    x = torch.randn(3000, generator=torch.Generator().manual_seed(1))
    table = cs.sketch(x)
    assert table.shape == (rows, 64) and table.dtype == torch.float32
    torch.testing.assert_close(table.double(), _reference_table(cs, x), rtol=1e-5, atol=1e-4)
    # even rows: mean of the two middle values; odd rows: the middle one (r = 5 uses the network)
    torch.testing.assert_close(cs.estimate(table).double(), _reference_estimate(cs, table), rtol=1e-6, atol=1e-6)


def test_hand_example_one_row():
    # Prepare: d = 3, one row, 2 buckets; read the drawn hashes and build the expected table by hand.
    cs = CountSketch(3, 1, 2, seed=3)
    x = torch.tensor([1.0, 2.0, 4.0])
    expected = torch.zeros(1, 2)
    for i in range(3):
        expected[0, int(cs.h[0, i])] += int(cs.s[0, i]) * x[i]
    # Execute / Assert: the table, and with a single row the estimate is s_0(i) * S[0, h_0(i)].
    table = cs.sketch(x)
    assert torch.equal(table, expected)
    est = cs.estimate(table)
    for i in range(3):
        assert est[i] == int(cs.s[0, i]) * expected[0, int(cs.h[0, i])]


def test_linear_and_batched():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(5000, generator=g), torch.randn(5000, generator=g)
    cs = CountSketch(5000, 5, 100, seed=11)
    # float32 sums of ~50 terms of size ~1: rounding error well below 1e-4
    torch.testing.assert_close(cs.sketch(a) + cs.sketch(b), cs.sketch(a + b), rtol=0, atol=1e-4)
    torch.testing.assert_close(cs.sketch(3.0 * a), 3.0 * cs.sketch(a), rtol=1e-6, atol=1e-5)
    batched = cs.sketch(torch.stack([a, b]))
    assert batched.shape == (2, 5, 100)
    assert torch.equal(batched[0], cs.sketch(a)) and torch.equal(batched[1], cs.sketch(b))


def test_deterministic_from_seed():
    x = torch.randn(2000, generator=torch.Generator().manual_seed(0))
    t1 = CountSketch(2000, 3, 50, seed=42).sketch(x)
    t2 = CountSketch(2000, 3, 50, seed=42).sketch(x)
    t3 = CountSketch(2000, 3, 50, seed=43).sketch(x)
    assert torch.equal(t1, t2)
    assert not torch.equal(t1, t3)


def test_recovers_planted_heavy_hitters():
    # Prepare: d = 20,000, 10 heavy coordinates of magnitude 10 among N(0, 0.01^2) noise.
    d, k, rows, cols = 20_000, 10, 5, 2000
    g = torch.Generator().manual_seed(5)
    x = 0.01 * torch.randn(d, generator=g)
    heavy = torch.randperm(d, generator=g)[:k]
    x[heavy] = 10.0 * (torch.randint(0, 2, (k,), generator=g) * 2 - 1).float()
    cs = CountSketch(d, rows, cols, seed=9)
    # Execute
    values, idx = cs.unsketch_topk(cs.sketch(x), k)
    # Assert: exactly the planted set. A noise coordinate reaches the top only if >= 3 of its 5 buckets
    # hold a heavy hitter: P ~ C(5,3) (k/c)^3 = 1.25e-6, times d = 0.025 expected false hits.
    assert set(idx.tolist()) == set(heavy.tolist())
    assert int((values != 0).sum()) == k
    # Estimate error = bucket noise: sd 0.01 sqrt(d/c) = 0.032 per row; tolerance 0.2 > 6 sd.
    assert (values[heavy] - x[heavy]).abs().max() < 0.2


def test_zero_coordinates_clears_their_buckets():
    cs = CountSketch(1000, 3, 40, seed=1)
    x = torch.randn(1000, generator=torch.Generator().manual_seed(3))
    table = cs.sketch(x)
    before = table.clone()
    idx = torch.tensor([0, 17, 999])
    out = cs.zero_coordinates(table, idx)
    assert out is table  # in place
    hit = torch.zeros(3, 40, dtype=torch.bool)
    for j in range(3):
        hit[j, cs.h[j, idx].long()] = True
    assert (table[hit] == 0).all()
    assert torch.equal(table[~hit], before[~hit])
    assert (cs.estimate(table)[idx] == 0).all()


def test_topk_abs_exact_on_large_vectors():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(300_000, generator=g)
    for k in (1, 1000, 30_000):
        got = topk_abs(v, k)
        ref = torch.topk(v.abs(), k).indices
        assert got.numel() == k and set(got.tolist()) == set(ref.tolist())
    # adversarial layout: heavy entries only between the strided sample points -> fallback path
    w = torch.zeros(300_000)
    w[1::4][:500] = torch.arange(1, 501, dtype=torch.float32)
    assert set(topk_abs(w, 500).tolist()) == set(torch.topk(w.abs(), 500).indices.tolist())
    assert topk_abs(v[:10], 20).tolist() == list(range(10))


def test_topk_breaks_exact_ties_as_fetchsgds_code():
    # FetchSGD's csvec unsketches with torch.topk(est**2, k, sorted=False) over all d estimates. With exact
    # ties across the k-th value (sketch estimates repeat: a bucket's value is shared by the coordinates
    # it collides), the candidate shortcut must return that selection's set, not its own pick among the
    # tied entries. 2,000 entries tie at 0.5; 990 larger ones; k = 1,000 takes 10 of the tied entries.
    g = torch.Generator().manual_seed(3)
    d, k = 400_000, 1000
    v = torch.randn(d, generator=g) * 0.01
    perm = torch.randperm(d, generator=g)
    v[perm[:990]] = 1.0 + torch.rand(990, generator=g)
    v[perm[990:2990]] = 0.5 * torch.sign(torch.randn(2000, generator=g))  # +-0.5: equal squares
    ref = set(torch.topk(v**2, k, sorted=False).indices.tolist())
    assert set(torch.topk(v.abs(), k, sorted=False).indices.tolist()) == ref  # |v| and v^2: same comparisons
    assert set(topk_abs(v, k).tolist()) == ref
    cs = CountSketch(d, 1, 2 * d, seed=0)
    table = cs.sketch(v)
    est = cs.estimate(table)
    _, idx = cs.unsketch_topk(table, k)
    assert set(idx.tolist()) == set(torch.topk(est**2, k, sorted=False).indices.tolist())


def test_degenerate_inputs():
    cs = CountSketch(37, 5, 8, seed=0)  # d not a power of 2, d smaller than the table
    zero = cs.sketch(torch.zeros(37))
    assert torch.equal(zero, torch.zeros(5, 8))
    values, idx = cs.unsketch_topk(zero, 37)
    assert torch.equal(values, torch.zeros(37)) and idx.numel() == 37
    # single nonzero of extreme magnitudes: every row's bucket holds only it -> exact recovery
    for mag in (1e-30, 1.0, 1e30):
        x = torch.zeros(37)
        x[5] = mag
        table = cs.sketch(x.double())  # float64 input is accepted (table is float32)
        values, idx = cs.unsketch_topk(table, 1)
        assert idx.tolist() == [5] and values[5] == torch.tensor(mag, dtype=torch.float32)
        assert torch.isfinite(values).all()
    half = cs.sketch(torch.ones(37, dtype=torch.float16))
    assert torch.isfinite(half).all() and half.dtype == torch.float32


def test_clear_errors():
    with pytest.raises(CodecError, match="rows"):
        CountSketch(10, 0, 5, seed=0)
    with pytest.raises(CodecError, match="seed"):
        CountSketch(10, 1, 5, seed=1.5)
    cs = CountSketch(10, 2, 5, seed=0)
    with pytest.raises(CodecError, match="shape"):
        cs.sketch(torch.zeros(11))
    with pytest.raises(CodecError, match="floating"):
        cs.sketch(torch.zeros(10, dtype=torch.int64))
    with pytest.raises(CodecError, match="table of shape"):
        cs.estimate(torch.zeros(3, 5))
    with pytest.raises(CodecError, match="k must be"):
        cs.unsketch_topk(torch.zeros(2, 5), 11)
    with pytest.raises(CodecError, match="idx"):
        cs.zero_coordinates(torch.zeros(2, 5), torch.tensor([10]))
    with pytest.raises(CodecError, match="float32"):
        cs.zero_coordinates(torch.zeros(2, 5, dtype=torch.float64), torch.tensor([1]))


def test_sketch_kernels_use_numba_workqueue_threads_not_a_second_openmp():
    """Numba's OpenMP layer left spinning threads that slowed torch training 3-11x in the same process
    (FetchSGD clients); fl_sim.compression.sketch selects the workqueue layer (see its comment)."""
    import numba
    import torch

    from fl_sim.compression.sketch import CountSketch

    CountSketch(1000, 3, 50, seed=0).sketch(torch.randn(1000))  # launches a parallel kernel
    assert numba.threading_layer() == "workqueue"


def test_fetchsgd_server_loop_follows_the_authors_selection_over_rounds():
    # FetchSGD's server (momentum and error sketches, top-k unsketch, zeroing of the applied buckets) run
    # 8 rounds, twice on the same random sketched gradients: once with CountSketch.unsketch_topk, once selecting as
    # csvec does (torch.topk(est**2, k, sorted=False) over all d estimates). A Count Sketch estimate is a
    # bucket value, shared by the coordinates that land in that bucket of the median row, so exact ties at
    # the k-th value are common; with d >= 200,000 the candidate shortcut runs, and the two trajectories
    # must stay bitwise equal.
    d, rows, cols, k, rho = 250_000, 5, 4_000, 2_000, 0.9
    cs = CountSketch(d, rows, cols, seed=1)
    g = torch.Generator().manual_seed(2)
    state = {name: (torch.zeros(rows, cols), torch.zeros(rows, cols)) for name in ("ours", "authors")}
    for _ in range(8):  # the shortcut parted from the authors by round 5 (seeded)
        s_t = cs.sketch(torch.randn(d, generator=g) * torch.rand(d, generator=g) ** 4)
        deltas = {}
        for name, (s_u, s_e) in state.items():
            s_u.mul_(rho).add_(s_t)
            s_e.add_(s_u)
            if name == "ours":
                delta, idx = cs.unsketch_topk(s_e, k)
            else:
                est = cs.estimate(s_e)
                idx = torch.topk(est**2, k, sorted=False).indices
                delta = torch.zeros(d)
                delta[idx] = est[idx]
            cs.zero_coordinates(s_u, idx)
            cs.zero_coordinates(s_e, idx)
            deltas[name] = delta
        assert torch.equal(deltas["ours"], deltas["authors"])
