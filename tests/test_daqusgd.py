"""DaQuSGD ([Hanna-DaQuSGD]): Theorem 3's 1/N over considered samples, Algorithm 1's unbiased version
(exact DataQ + GradCorrQ) end to end, and the per-round sample budget."""

import json
import math

import pytest
import torch
from torch import nn

from fl_sim.wire import keys
from fl_sim.wire.daqusgd import unpack_samples
from fl_sim.compression.dataq import dataq_bits, dequantize_normalized, dequantize_selection
from fl_sim.config import config_from_dict
from fl_sim.testing import run_in_memory

K = 4


def _cfg(strategy, **over):
    raw = {"rounds": 2, "clients": 12, "clients_per_round": K, "data": {"name": "synthetic", "partition": "natural"},
           "model": {"name": "mlp", "hidden": [16]}, "train": {"lr": 0.05, "batch_size": 16},
           "strategy": {"name": "daqusgd", **strategy}}
    raw.update(over)
    return config_from_dict(json.loads(json.dumps(raw)))


def _one_round(cfg, threshold):
    """Drive one DaQuSGD round by hand; return (strategy, replies, applied update)."""
    from fl_sim.runs.build import build_experiment, build_strategy
    from fl_sim.clients.app import make_client_app
    from fl_sim.wire.records import flatten_arrays
    from fl_sim.testing import InMemoryGrid

    exp = build_experiment(cfg)
    strategy = build_strategy(exp)
    grid = InMemoryGrid(make_client_app(cfg), cfg.clients)
    strategy.threshold = threshold
    from flwr.app import ConfigRecord

    msgs = list(strategy.configure_train(1, exp.initial_arrays, ConfigRecord(), grid))
    replies = list(grid.send_and_receive(msgs))
    new, _ = strategy.aggregate_train(1, replies)
    return strategy, msgs, replies, flatten_arrays(new) - flatten_arrays(exp.initial_arrays), exp


@pytest.mark.parametrize("rule", ["considered", "sent"])
def test_server_gradient_divides_by_considered_samples(rule):
    # Theorem 3: unsent samples count as zero, ĝ = (1/N) Σ_sent ∇ℓ(W, Z_Q) with N the samples considered.
    # The threshold (0.9 x a typical initial loss of ~2.3 at 10 classes is far below; use the median) is set so
    # that some samples are held back; the old rule (mean over the sent ones) is the option "sent".
    cfg = _cfg({"loss_average": rule, "momentum": 0.0, "lr": 1.0, "batch_size": 40})
    strategy, _, replies, update, exp = _one_round(cfg, threshold=2.3)
    xs, ys, considered = [], [], 0
    for r in replies:
        a = unpack_samples({k: v.numpy() for k, v in r.content[keys.ARRAYS].items()}, quantizer="per_feature",
                           bits_per_feature=3, levels=32, gradcorrq=False)
        considered += int(r.content[keys.METRICS][keys.DAQU_CONSIDERED])
        lv = a["levels"]
        if lv.shape[0]:
            xs.append(dequantize_selection(lv, float(a["scale"][0]), 3))
            ys.append(a["labels"])
    x, y = torch.cat(xs), torch.cat(ys)
    assert considered == 40 and 0 < len(y) < considered  # the threshold held some samples back
    model = exp.model
    state = {k: torch.from_numpy(v.numpy().copy()) for k, v in exp.initial_arrays.items()}
    model.load_state_dict(state)
    model.zero_grad()
    n = considered if rule == "considered" else len(y)
    (nn.functional.cross_entropy(model(x), y, reduction="sum") / n).backward()
    expected = -torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(update, expected, rtol=1e-4, atol=1e-6)


def test_round_budget_is_split_among_the_rounds_clients():
    cfg = _cfg({"batch_size": 10})
    strategy, msgs, replies, _, _ = _one_round(cfg, threshold=0.0)
    assert [int(m.content["config"][keys.BATCH_SIZE]) for m in msgs] == [3, 3, 2, 2]
    assert sum(int(r.content[keys.METRICS][keys.DAQU_CONSIDERED]) for r in replies) == 10
    assert strategy.last_metrics["considered_samples"] == 10
    cfg = _cfg({"batch_size": 10, "budget": "client"})
    _, msgs, replies, _, _ = _one_round(cfg, threshold=0.0)
    assert [int(m.content["config"][keys.BATCH_SIZE]) for m in msgs] == [10] * K
    assert sum(int(r.content[keys.METRICS][keys.DAQU_CONSIDERED]) for r in replies) == 10 * K


def test_unbiased_version_runs_end_to_end_with_exact_bits():
    # Algorithm 1: exact DataQ (Remark 1: norm + index in S) and one GradCorrQ bit per sent sample.
    m = 32
    _, rows, s = run_in_memory(_cfg({"quantizer": "exact", "levels": m, "gradcorrq": True, "lr": 0.01,
                                     "batch_size": 16, "epoch_rounds": 1}))
    # on the wire (fl_sim.wire.daqusgd): a norm, (a, b) at log2 m bits each per feature (the per-feature code,
    # not Theorem 1's index into S), a 4-bit label and GradCorrQ's bit per sample; per reply an int32 header
    # [n, C, 60] and at most 7 padding bits in each of its 4 packed arrays
    per_sample = 32 + 2 * 60 * int(math.log2(m)) + math.ceil(math.log2(10)) + 1
    assert per_sample > 32 + dataq_bits(60, m) + 5  # the index code would be smaller: a documented departure
    for r in rows[1:]:
        n = r["received_samples"]
        assert n * per_sample + K * 96 <= r["uplink_bits"] <= n * per_sample + K * (96 + 4 * 7)
        assert r["gradcorrq_clipped"] == 0
        assert math.isfinite(r["test_accuracy"])
    assert "gradcorrq_clipped" in s.last_metrics


def test_gradcorrq_makes_the_server_gradient_unbiased():
    # E[ĝ] = (1/n) Σ ∇ℓ(W, Z_i) (true data) over the GradCorrQ randomness (i*, e_g), Lemma 1. One node, n = 8
    # samples sent (threshold -1), exact DataQ with m = 4 (coarse, so the DataQ bias of g_{Z_Q} is large).
    # The node's path (select_and_quantize) is checked against the pieces it is made of for a few seeds;
    # the T trials then redraw only i* and e_g with those same pieces (Δ does not depend on the seed).
    # Per coordinate the correction's mean over T trials has variance <= (1/n^2) n (h b)^2 / h / T
    # = h b^2 / (n T) (each sample puts h b at one of h coordinates, b its eq. (8) bound; b^2 averaged over
    # samples): the mean must lie within 5 sigma of the true gradient at every one of the h = 47 coordinates
    # (P(false alarm) < 47 x 6e-7 = 3e-5), and DataQ alone must be off by more than 5 sigma somewhere.
    from fl_sim.clients.daqusgd import gradcorrq_index, per_sample_grad_diff, select_and_quantize
    from fl_sim.compression.dataq import gradcorrq_bits, gradcorrq_values
    from fl_sim.models import build_model
    from fl_sim.rng import torch_generator
    from fl_sim.strategies import DaQuSGD

    torch.manual_seed(0)
    model = build_model("mlp", (6,), 3, hidden=[5])
    h = sum(p.numel() for p in model.parameters())
    x, y = torch.randn(8, 6, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    n, m, c_z = 8, 4, 2.0  # C_z = 1 (App. A) is too small for this model: |Δ_i| reaches 1.4 x its bound
    strat = DaQuSGD(model=build_model("mlp", (6,), 3, hidden=[5]), quantizer="exact", levels=m, gradcorrq=True,
                    c_z=c_z, num_classes=3)
    kw = dict(threshold=-1.0, bits_per_feature=3, num_classes=3, batch_size=8, quantizer="exact", levels=m,
              gradcorrq=True, c_z=c_z, cid=5)
    sel = select_and_quantize(model, x, y, generator=torch.Generator().manual_seed(0), round_seed=0, **kw)
    a, b, r = sel.arrays["a"].long(), sel.arrays["b"].long(), sel.arrays["norms"]
    xq = dequantize_normalized(a, b, r, m)
    bound = c_z * r.double() * math.sqrt(6) / (m - 1)  # eq. (8) per sample
    for t in range(3):
        sel_t = select_and_quantize(model, x, y, generator=torch.Generator().manual_seed(0), round_seed=t, **kw)
        i_star = gradcorrq_index(t, 5, n, h)
        picked = per_sample_grad_diff(model, x, xq, y, i_star)
        bit, clipped = gradcorrq_bits(picked, bound, generator=torch_generator(t, "daqusgd-gradcorrq-bit", 5))
        assert torch.equal(sel_t.arrays["gc_bits"], bit) and sel_t.clipped == clipped == 0
    all_i = torch.arange(h).repeat(n, 1).T  # every coordinate of every sample: Δ once, then gathered
    delta = torch.stack([per_sample_grad_diff(model, x, xq, y, all_i[j]) for j in range(h)], dim=1)  # (n, h)
    assert bool((delta.abs().amax(dim=1) <= bound).all())  # no clipping: the estimate is exactly unbiased
    for t in range(3):  # the server's reconstruction at the node's shared i*: h-scaled one-hot values
        i_star = gradcorrq_index(t, 5, n, h)
        bit, _ = gradcorrq_bits(delta.gather(1, i_star.unsqueeze(1)).squeeze(1), bound,
                                generator=torch_generator(t, "daqusgd-gradcorrq-bit", 5))
        strat._round_seed = t
        want = torch.zeros(h, dtype=torch.float64).index_add_(0, i_star, (2 * bit.double() - 1) * h * bound)
        torch.testing.assert_close(strat._correction([{"correction": (bit, bound), "cid": 5}], h).double(), want,
                                   rtol=1e-6, atol=1e-6)
    # T trials at once: i* uniform, e_g by the same gradcorrq_bits / gradcorrq_values the node and server use
    T = 400_000
    g = torch.Generator().manual_seed(11)
    i_star = torch.randint(0, h, (T, n), generator=g)
    picked = delta.gather(1, i_star.T).T  # (T, n)
    bnd = bound.expand(T, n)
    bit, clipped = gradcorrq_bits(picked.reshape(-1), bnd.reshape(-1), generator=g)
    assert clipped == 0
    vals = gradcorrq_values(bit, bnd.reshape(-1), h)
    total = torch.zeros(h, dtype=torch.float64).index_add_(0, i_star.reshape(-1), vals)

    def grad(inp):
        model.zero_grad()
        nn.functional.cross_entropy(model(inp), y, reduction="sum").div(n).backward()
        return torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double()

    g_true, g_q = grad(x), grad(xq)
    mean = g_q + total / T / n
    sigma = math.sqrt(h * float((bound**2).mean()) / (n * T))
    assert float((g_true - g_q).abs().max()) > 5 * sigma  # DataQ alone is visibly biased at m = 4
    assert float((mean - g_true).abs().max()) < 5 * sigma


def test_strategy_does_not_import_the_client():
    import ast
    from pathlib import Path

    src = (Path(__file__).resolve().parents[1] / "fl_sim" / "strategies" / "daqusgd.py").read_text()
    imported = [n.module or "" for n in ast.walk(ast.parse(src)) if isinstance(n, ast.ImportFrom)]
    assert not any("clients" in m for m in imported)


def test_the_wire_carries_the_bits_counted():
    """A node's reply arrays are packed at the bits DaQuSGD counts (b bits per feature, ceil(log2 C) per
    label): the server's uplink count is 8 x the bytes that arrived, and those bytes exceed the per-sample
    bits only by the header, the scale and byte padding (they were int16 levels and int64 labels: ~5x)."""
    cfg = _cfg({"batch_size": 40})
    strategy, _, replies, _, _ = _one_round(cfg, threshold=-1.0)
    wire = sum(8 * a.numpy().nbytes for r in replies for a in r.content[keys.ARRAYS].values())
    assert strategy.last_metrics["uplink_bits"] == wire
    n = strategy.last_metrics["received_samples"]
    assert n == 40
    payload_bits = n * (60 * 3 + math.ceil(math.log2(10)))
    assert payload_bits + K * (96 + 32) <= wire <= payload_bits + K * (96 + 32 + 2 * 7)
