"""RLCOverTheAir ([Abdi-thesis] Ch. 5, eqs. 5.3-5.11, Lemmas 13-14) driven through the real Flower message
path (configure_train -> ClientApp with compression_mod -> aggregate_train) on an InMemoryGrid.

The test ClientApp "trains" by returning received + Δ_cid with fixed updates Δ_cid, so the exact
aggregate Σ α_i Δ_i is known and no data or model is needed (fast, no Ray).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fl_sim.strategies.base import SERVER_PREFIX
from fl_sim.wire import keys
from fl_sim.clients.mods import compression_mod
from fl_sim.wire.protocol import get_codec
from fl_sim.wire.records import flatten_arrays
from fl_sim.strategies.rlc import M_UPDATE_NORM, REPORT_NORM, RLCOverTheAir
from fl_sim.testing import InMemoryGrid

D = 64  # model size (a power of 2, so Lemma 13's d/m is exact)


def updates(k: int, d: int = D, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed client updates Δ (k, d) and unbalanced sample counts n_i (k,)."""
    g = torch.Generator().manual_seed(seed)
    deltas = torch.randn(k, d, generator=g) * torch.linspace(0.5, 2.0, k)[:, None]
    counts = torch.arange(1, k + 1) * 10
    return deltas, counts


def client_app(deltas: torch.Tensor, counts: torch.Tensor, inner_mods=()) -> ClientApp:
    """A ClientApp that returns received + Δ_cid (compression_mod encodes the update)."""
    app = ClientApp(mods=[compression_mod, *inner_mods])

    @app.train()
    def _train(msg: Message, context) -> Message:
        cid = int(msg.content[keys.CONFIG][keys.CID])
        w = flatten_arrays(msg.content[keys.ARRAYS])
        arrays = ArrayRecord({"w": Array((w + deltas[cid]).numpy())})
        metrics = MetricRecord({keys.NUM_EXAMPLES: int(counts[cid]), keys.TRAIN_LOSS: 0.0, keys.M_CID: cid})
        return Message(content=RecordDict({keys.ARRAYS: arrays, keys.METRICS: metrics}), reply_to=msg)

    return app


def norm_mod(msg: Message, context, call_next) -> Message:
    """What a node reports for power control when asked (REPORT_NORM): its ‖Δ_i‖."""
    reply = call_next(msg, context)
    if msg.content[keys.CONFIG].get(REPORT_NORM):
        delta = flatten_arrays(reply.content[keys.ARRAYS]) - flatten_arrays(msg.content[keys.ARRAYS])
        reply.content[keys.METRICS][M_UPDATE_NORM] = float(delta.norm())
    return reply


def setup(k: int = 4, *, channel: dict, report_norm: bool = False, seed: int = 0, sizes: bool = False, **kw):
    """Strategy, grid, Δ, α. ``sizes``: the strategy knows every n_i (as from an experiment), so idle
    nodes (b_i = 0) are not asked to train."""
    deltas, counts = updates(k, seed=seed)
    strategy = RLCOverTheAir(channel=channel, client_ids=list(range(k)), clients_per_round=k, seed=seed,
                             diagnostics=report_norm, client_sizes=counts.tolist() if sizes else None, **kw)
    grid = InMemoryGrid(client_app(deltas, counts, [norm_mod] if report_norm else []), k)
    alpha = counts.double() / counts.sum()
    return strategy, grid, deltas, alpha


def server_part(metrics):
    """The server-side figures of a returned MetricRecord (named ``server.<name>``), unprefixed."""
    return {k[len(SERVER_PREFIX):]: v for k, v in metrics.items() if k.startswith(SERVER_PREFIX)}


def one_round(strategy, grid, rnd: int, w: torch.Tensor | None = None):
    """(ĝ = w_new − w, metrics, messages sent) for one round from model w (zeros by default)."""
    w = torch.zeros(D) if w is None else w
    arrays = ArrayRecord({"w": Array(w.numpy())})
    messages = list(strategy.configure_train(rnd, arrays, ConfigRecord(), grid))
    new, metrics = strategy.aggregate_train(rnd, grid.send_and_receive(messages))
    g_hat = torch.zeros(D) if new is None else flatten_arrays(new) - w
    return g_hat, server_part(metrics), messages


def projected(strategy, rnd: int, g: torch.Tensor) -> torch.Tensor:
    """Aᵀ A g with the round's A (the decode of a perfect MAC)."""
    op = get_codec("rlc", D, {"m": strategy.symbols(D)}).operator(strategy.matrix_seed(rnd))
    return op.adjoint(op.forward(g.double()))


def test_noiseless_decode_is_exact_projection_of_weighted_sum():
    s, grid, deltas, alpha = setup(channel={"snr_db": None, "fading": "none", "participation": 1.0}, gain=4)
    g = (alpha[:, None] * deltas.double()).sum(0)
    for rnd in (1, 2):
        g_hat, metrics, _ = one_round(s, grid, rnd)
        expected = projected(s, rnd, g)
        torch.testing.assert_close(g_hat.double(), expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
        assert metrics["rlc_channel_mse"] <= 1e-9 * float((expected**2).sum())
        assert metrics["rlc_transmitting"] == 4 and metrics["clients_ok"] == 4
    # over a perfect channel the decode differs from g itself (Lemma 13 projection error, m < d)
    assert float((g_hat.double() - g).norm()) > 0.1 * float(g.norm())


@pytest.mark.parametrize(
    "channel",
    [
        {"snr_db": 10.0, "fading": "none", "participation": 0.5, "power_policy": "all"},
        {"snr_db": 15.0, "fading": "rayleigh", "participation": 0.5},
    ],
)
def test_decode_unbiased_and_mse_matches_lemma(channel):
    """Over T rounds (fresh A, fading, b_i, noise each round) E[ĝ] = g = Σ α_i Δ_i, and for no fading
    with all subchannels the MSE is the formula of docs/notes.md#rlc-participation (5.10, derived):
        (d/m)[‖g‖² + (1/π − 1) Σ α_i² ‖Δ_i‖²] − ‖g‖² + d σ_R²/c²   (σ_R²/c² reported per round)
    True norms are reported (norm_mod), so c and S_i do not depend on A and the decode is exactly
    unbiased (Lemma 14)."""
    trials, m = 100, 32
    s, grid, deltas, alpha = setup(3, channel=channel, report_norm=True, m=m, sizes=True)
    g = (alpha[:, None] * deltas.double()).sum(0)
    est, mse, noise = [], [], []
    for rnd in range(1, trials + 1):
        g_hat, metrics, _ = one_round(s, grid, rnd)
        if metrics["rlc_transmitting"]:  # else an idle round: ĝ = 0, no noise decoded
            assert metrics["rlc_true_norms"] == 1.0
        est.append(g_hat.double())
        mse.append(float(((g_hat.double() - g) ** 2).sum()))
        noise.append(metrics["rlc_noise_mse_expected"])
    est = torch.stack(est)
    # Unbiasedness: E‖mean − g‖² = tr(Cov)/T; a 4x margin on this chi-square-like statistic with
    # D = 64 degrees of freedom is beyond its 1e-6 quantile even for unequal coordinate variances.
    err2 = float(((est.mean(0) - g) ** 2).sum())
    tr_cov = float(est.var(0).sum())
    assert err2 < 4 * tr_cov / trials
    # and the test can fail: without the 1/π compensation E‖mean − g‖² >= ‖(1 − π) g‖², twice the bound.
    pi = channel["participation"]
    assert ((1 - pi) ** 2) * float((g**2).sum()) > 2 * 4 * tr_cov / trials
    if channel["fading"] == "none":
        pi_term = (1 / pi - 1) * float((alpha**2 * (deltas.double() ** 2).sum(1)).sum())
        g2 = float((g**2).sum())
        formula = (D / m) * (g2 + pi_term) - g2 + float(np.mean(noise))
        # standard error of the Monte-Carlo mean MSE, 5 sigma
        se = float(np.std(mse, ddof=1)) / math.sqrt(trials)
        assert abs(float(np.mean(mse)) - formula) < 5 * se
        assert se < 0.1 * formula  # the check is tight enough to mean something


def test_refresh_changes_matrix_every_refresh_rounds():
    s, grid, _, _ = setup(channel={"snr_db": None, "fading": "none"}, gain=4, refresh=3)
    deltas, counts = updates(4)
    g = (counts.double()[:, None] * deltas.double()).sum(0) / counts.sum()
    op_of = get_codec("rlc", D, {"m": D // 4}).operator
    seeds = []
    for rnd in range(1, 8):
        g_hat, _, messages = one_round(s, grid, rnd)
        cfg_seeds = {int(m.content[keys.CONFIG][keys.SEED]) for m in messages}
        assert len(cfg_seeds) == 1  # a common A for every client of the round
        seeds.append(cfg_seeds.pop())
        op = op_of(seeds[-1])  # the server decodes with the A the clients encoded with
        torch.testing.assert_close(g_hat.double(), op.adjoint(op.forward(g)), rtol=1e-5, atol=1e-5)
    assert seeds[0] == seeds[1] == seeds[2] != seeds[3]
    assert seeds[3] == seeds[4] == seeds[5] != seeds[6]
    assert len({seeds[0], seeds[3], seeds[6]}) == 3


def test_channel_uses_and_latency_metrics():
    s, grid, _, _ = setup(channel={"snr_db": 18.0, "fading": "rayleigh", "participation": 0.5}, gain=5,
                          bandwidth_hz=2e4, compute_s=0.25)
    m = round(D / 5)
    for rnd in (1, 2, 3):
        _, metrics, _ = one_round(s, grid, rnd)
        assert metrics["channel_uses"] == m == metrics["rlc_m"]
        assert metrics["latency_s"] == pytest.approx(0.25 + m / 2e4)
        assert metrics["snr_db"] == 18.0
        assert 0 <= metrics["rlc_transmitting"] <= 4
        for key, value in metrics.items():
            assert isinstance(value, (int, float)), key  # numbers only, no tensors
        if metrics["rlc_transmitting"]:
            assert metrics["rlc_c"] > 0 and metrics["rlc_power_ratio_max"] > 0


@pytest.mark.parametrize("variant", ["unbiased", "remark6"])
@pytest.mark.parametrize("sizes", [False, True])
def test_round_without_transmitters_leaves_model_unchanged(variant, sizes):
    s, grid, _, _ = setup(channel={"snr_db": 10.0, "fading": "rayleigh", "participation": 1e-9}, gain=4,
                          variant=variant, sizes=sizes)
    w = torch.linspace(-1, 1, D)
    g_hat, metrics, messages = one_round(s, grid, 1, w)
    assert len(messages) == (0 if sizes else 4)  # with known sizes idle nodes are not asked
    # Δ̂ = 0; the inner FedAvg's float32 weighted mean of the identical models w + 0 rounds by at most a
    # few ulp of |w| <= 1 (Σ_i (n_i/n) w with Σ n_i/n = 1 in float32): 1e-6 absolute.
    assert torch.allclose(g_hat, torch.zeros(D), rtol=0, atol=1e-6)
    assert metrics["rlc_transmitting"] == 0 and metrics["rlc_c"] == 0.0
    assert metrics["channel_uses"] == D // 4  # the round's m symbols elapse anyway
    assert all(math.isfinite(v) for k, v in metrics.items() if k not in ("rlc_downlink_mse", "train_loss"))


@pytest.mark.parametrize("variant", ["unbiased", "remark6"])
def test_skipping_idle_nodes_gives_the_same_decode(variant):
    """b_i drawn before the round (only transmitters train) = b_i drawn by the channel afterwards;
    α_i = n_i / Σ_sampled n_j either way. (Remark 6 only in round 1: later, a node asked while idle
    has advanced its error-feedback memory for a payload the channel dropped, which skipping avoids.)"""
    channel = {"snr_db": 10.0, "fading": "rayleigh", "participation": 0.5}
    ask_all, grid_a, _, _ = setup(6, channel=channel, gain=4, sizes=True, skip_idle=False, variant=variant)
    skip, grid_b, _, _ = setup(6, channel=channel, gain=4, sizes=True, variant=variant)
    for rnd in (1, 2, 3) if variant == "unbiased" else (1,):
        g_a, m_a, sent_a = one_round(ask_all, grid_a, rnd)
        g_b, m_b, sent_b = one_round(skip, grid_b, rnd)
        assert len(sent_a) == 6 and len(sent_b) == m_b["rlc_transmitting"] == m_a["rlc_transmitting"]
        torch.testing.assert_close(g_b, g_a, rtol=1e-5, atol=1e-7)


def test_malformed_payload_and_bad_norm_rejected(caplog):
    s, grid, _, _ = setup(channel={"snr_db": 10.0, "fading": "none"}, gain=4, report_norm=True)
    hit = []

    def tamper(reply: Message) -> Message:
        if len(hit) == 0:  # first reply: a codeword of the wrong length
            reply.content[keys.ARRAYS] = ArrayRecord({"y": Array(np.zeros(3, dtype=np.float32))})
        elif len(hit) == 1:  # second reply: a NaN symbol
            y = reply.content[keys.ARRAYS]["y"].numpy().copy()
            y[0] = np.nan
            reply.content[keys.ARRAYS] = ArrayRecord({"y": Array(y)})
        elif len(hit) == 2:  # third reply: a negative norm report
            reply.content[keys.METRICS][M_UPDATE_NORM] = -1.0
        hit.append(reply.metadata.src_node_id)
        return reply

    grid.tamper = tamper
    with caplog.at_level("ERROR", logger="fl_sim"):
        g_hat, metrics, _ = one_round(s, grid, 1)
    assert metrics["clients_failed"] == 3 and metrics["clients_ok"] == 1
    assert torch.isfinite(g_hat).all()
    for node in hit[:3]:
        assert any(str(node) in rec.getMessage() for rec in caplog.records)


def test_downlink_noise_per_node():
    """With downlink_snr_db each sampled node starts from its own noisy copy w + Aᵀ η'_i, η'_i of
    variance mean(y²)/SNR per symbol; E‖Aᵀη'‖² = tr(A Aᵀ) σ² = d σ² (unit column norms of A)."""
    snr_dl = 10.0
    s, grid, deltas, alpha = setup(channel={"snr_db": None, "fading": "none", "downlink_snr_db": snr_dl}, gain=4)
    one_round(s, grid, 1)
    y_prev = s._broadcast[1]
    sigma2 = float((y_prev.double() ** 2).mean()) / 10 ** (snr_dl / 10)
    w = torch.zeros(D)
    g_hat, metrics, messages = one_round(s, grid, 2, w)
    copies = torch.stack([flatten_arrays(m.content[keys.ARRAYS]) for m in messages])
    assert len({tuple(c.tolist()) for c in copies}) == len(messages)  # one copy per node
    perturb2 = (copies.double() ** 2).sum(1)
    assert metrics["rlc_downlink_mse"] == pytest.approx(float(perturb2.mean()), rel=1e-5)
    # d σ² expected per node; 4 nodes of a chi-square with 64 dof: ±50% is > 5 sigma (sd 2/sqrt(256))
    assert float(perturb2.mean()) == pytest.approx(D * sigma2, rel=0.5)
    # the clients' updates are relative to their own copies: the uplink (noiseless) still gets Aᵀ A Σ α Δ
    torch.testing.assert_close(g_hat.double(), projected(s, 2, (alpha[:, None] * deltas.double()).sum(0)),
                               rtol=1e-4, atol=1e-5)
    # without downlink noise, every node gets the same model
    s2, grid2, _, _ = setup(channel={"snr_db": None, "fading": "none"}, gain=4)
    one_round(s2, grid2, 1)
    _, metrics2, messages2 = one_round(s2, grid2, 2, w)
    assert all(torch.equal(flatten_arrays(m.content[keys.ARRAYS]), w) for m in messages2)
    assert math.isnan(metrics2["rlc_downlink_mse"])


def test_remark6_realized_power_within_budget_and_memory_conserves():
    """Remark 6 (eq. 5.11): realized ‖x_i‖² <= P_i always; sent + withheld = intended
    (noiseless, no fading, π = 1: Σ_i [ρ_i + (1 − ρ_i)] Aᵀ A α_i Δ_i = Aᵀ A g)."""
    s, grid, deltas, alpha = setup(channel={"snr_db": None, "fading": "none"}, gain=4, variant="remark6",
                                   c_gain=3.0, error_feedback="none")
    g = (alpha[:, None] * deltas.double()).sum(0)
    g_hat, metrics, messages = one_round(s, grid, 1)
    assert metrics["rlc_power_ratio_max"] <= 1 + 1e-6
    assert metrics["rlc_clipped"] >= 1  # c_gain = 3 forces clipping somewhere
    withheld = sum(e.double() for e in s._memory.values())
    torch.testing.assert_close(g_hat.double() + withheld, projected(s, 1, g), rtol=1e-4, atol=1e-5)
    # next round: memory is re-sent first (round 2 target includes it)
    g_hat2, metrics2, _ = one_round(s, grid, 2)
    assert metrics2["rlc_power_ratio_max"] <= 1 + 1e-6


def test_remark6_configures_weighted_client_error_feedback():
    s, grid, _, _ = setup(channel={"snr_db": 10.0, "fading": "rayleigh", "participation": 0.5}, gain=4,
                          variant="remark6")
    for rnd in (1, 2, 3):
        g_hat, metrics, messages = one_round(s, grid, rnd)
        assert torch.isfinite(g_hat).all()
        cfg = messages[0].content[keys.CONFIG]
        assert cfg[keys.EF] == "weighted" and cfg[keys.EF_BETA] == pytest.approx(16 / D)
        assert metrics["rlc_power_ratio_max"] <= 1 + 1e-6


def test_config_errors():
    with pytest.raises(ValueError, match="variant"):
        RLCOverTheAir(variant="magic")
    with pytest.raises(ValueError, match="gain"):
        RLCOverTheAir(gain=0.5)
    with pytest.raises(ValueError, match="refresh"):
        RLCOverTheAir(refresh=0)
    with pytest.raises(ValueError, match="c_gain"):
        RLCOverTheAir(c_gain=2.0)
    with pytest.raises(ValueError, match="unknown key"):
        RLCOverTheAir(channel={"snr": 3})
