"""The vectorized backend (fl_sim.engine.vectorized, fl_sim.clients.cohort): batched clients give the inline numbers.

Tolerances: the batched and the per-client computations do the same float32 operations in another order
(batched matmuls, one backward of the summed losses), so parameters agree to a few float32 ulps per step
(rtol 1e-5, atol 1e-6 after a few steps at lr <= 0.1); anything structural (a wrong batch, mask, step count,
momentum or weight-decay term) moves them by ~lr x gradient ~1e-3 and fails.
"""

import json
import logging
import math

import numpy as np
import pytest
import torch
from flwr.app import Array, Message
from flwr.clientapp import ClientApp
from torch import nn

from fl_sim.wire import keys
from fl_sim.runs.build import build_experiment
from fl_sim.clients.app import make_client_app
from fl_sim.clients.cohort import (
    CohortClient,
    AUTO_CHUNK_MAX,
    auto_chunk,
    evaluate_cohort,
    per_client_bytes,
    train_cohort,
    vectorizable,
)
from fl_sim.clients.training import LocalTrainSpec, batch_indices, batch_matrix, evaluate_model, train_local
from fl_sim.config import ConfigError, config_from_dict, load_config
from fl_sim.models import build_model
from fl_sim.wire.records import flatten_arrays, ndarray_to_array, read_array
from fl_sim.testing import InMemoryGrid, round_replies, run_in_memory
from fl_sim.clients.stacked import cohort_forward, layerwise
from fl_sim.engine.vectorized import VectorizedGrid, cpu_cores, intra_op_threads, resolve_device

RTOL, ATOL = 1e-5, 1e-6


def _clients(shape, sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, *shape, generator=g), torch.randint(0, 10, (n,), generator=g)) for n in sizes]


def _sequential(model, init, data, spec, seeds):
    out, losses = [], []
    for (x, y), s in zip(data, seeds):
        model.load_state_dict(init)
        losses.append(train_local(model, x, y, spec, torch.Generator().manual_seed(s)))
        out.append({k: v.detach().clone() for k, v in model.named_parameters()})
    return out, losses


@pytest.mark.parametrize(
    "name,shape,spec",
    [
        ("mlp", (20,), LocalTrainSpec(lr=0.1, batch_size=8, local_epochs=2, momentum=0.9, weight_decay=1e-2)),
        ("mlp", (20,), LocalTrainSpec(lr=0.1, batch_size=8, local_steps=5)),
        ("lenet5", (1, 8, 8), LocalTrainSpec(lr=0.05, batch_size=8, local_epochs=1, momentum=0.5)),
    ],
)
def test_cohort_equals_train_local_per_client(name, shape, spec):
    """Unequal sizes (1 row, partial last batches, 1..5 batches an epoch), momentum, weight decay, fixed steps."""
    model = build_model(name, shape, 10, hidden=[16], seed=0)
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    sizes = [1, 7, 8, 9, 20, 37]
    data = _clients(shape, sizes)
    seeds = [11, 12, 13, 14, 15, 16]
    ref, ref_loss = _sequential(model, init, data, spec, seeds)
    cohort = [CohortClient(x, y, init, torch.Generator().manual_seed(s)) for (x, y), s in zip(data, seeds)]
    trained, loss = train_cohort(model, cohort, spec)
    for i in range(len(sizes)):
        for k in init:
            torch.testing.assert_close(trained[k][i], ref[i][k], rtol=RTOL, atol=ATOL)
            assert not torch.equal(trained[k][i], init[k]) or k.endswith("bias")  # the clients did train
    np.testing.assert_allclose(loss.numpy(), ref_loss, rtol=1e-5)


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 33])
@pytest.mark.parametrize("epochs,steps", [(1, 0), (3, 0), (1, 1), (1, 5), (1, 11)])
def test_batch_matrix_is_batch_indices(n, epochs, steps):
    """The cohort's batch tensor holds exactly train_local's batches, in order, from the same generator."""
    spec = LocalTrainSpec(lr=0.1, batch_size=4, local_epochs=epochs, local_steps=steps)
    if n == 0 and steps:
        return  # batch_indices never ends for an empty client with fixed steps; clients without data are not sampled
    ref = list(batch_indices(n, spec, torch.Generator().manual_seed(3)))
    mat = batch_matrix(n, spec, torch.Generator().manual_seed(3))
    assert len(mat) == len(ref)
    for row, idx in zip(mat, ref):
        assert torch.equal(row[row >= 0], idx) and bool((row[len(idx):] == -1).all())


def _conv_sequential():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.Tanh(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Sequential(nn.Linear(27, 12), nn.GELU()), nn.Linear(12, 10, bias=False))


@pytest.mark.parametrize("make,shape", [(lambda: build_model("mlp", (20,), 10, hidden=[16, 8], seed=0), (20,)),
                                        (_conv_sequential, (1, 8, 8))])
def test_layerwise_forward_equals_vmap_and_train_local(make, shape):
    """The layer-by-layer cohort forward (bmm Linear, per-sample layers on the [a*B, ...] view, a conv through
    its own vmap, nested Sequential) gives vmap's logits, and training through it train_local's parameters."""
    model = make()
    assert layerwise(model) is not None
    params = {k: torch.stack([v.detach() + 0.01 * i for i in range(4)]) for k, v in model.named_parameters()}
    x = torch.randn(4, 5, *shape, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(cohort_forward(model)(params, x), cohort_forward(model, generic=True)(params, x),
                               rtol=RTOL, atol=ATOL)
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    spec = LocalTrainSpec(lr=0.1, batch_size=4, local_epochs=2, momentum=0.9)
    data, seeds = _clients(shape, [3, 9, 14]), [1, 2, 3]
    ref, _ = _sequential(model, init, data, spec, seeds)
    trained, _ = train_cohort(model, [CohortClient(x, y, init, torch.Generator().manual_seed(s))
                                      for (x, y), s in zip(data, seeds)], spec)
    for i in range(3):
        for k in init:
            torch.testing.assert_close(trained[k][i], ref[i][k], rtol=RTOL, atol=ATOL)


def test_layerwise_declines_what_it_cannot_run_per_layer():
    """Not a plain Sequential (LeNet-5's own forward), a flatten across the batch, a layer with buffers:
    None, so train_cohort takes the whole-model vmap."""
    assert layerwise(build_model("lenet5", (1, 8, 8), 10)) is None
    assert layerwise(nn.Sequential(nn.Flatten(0), nn.Linear(3, 2))) is None
    assert layerwise(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))) is None


def test_cohort_threads_is_set_for_the_call_and_restored():
    before = torch.get_num_threads()
    with intra_op_threads(0):
        assert torch.get_num_threads() == cpu_cores()
    with intra_op_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(ConfigError, match="simulation.cohort_threads"):
        small("vectorized", simulation={"cohort_threads": -1})


def test_a_clients_result_does_not_depend_on_its_cohort():
    """Seeded per client: training client c alone or among others gives c the same batches and result."""
    model = build_model("mlp", (20,), 10, hidden=[16], seed=0)
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    spec = LocalTrainSpec(lr=0.1, batch_size=4, local_epochs=1)
    data = _clients((20,), [5, 30, 13])
    alone, _ = train_cohort(model, [CohortClient(*data[2], init, torch.Generator().manual_seed(7))], spec)
    among, _ = train_cohort(
        model, [CohortClient(*d, init, torch.Generator().manual_seed(s)) for d, s in zip(data, [5, 6, 7])], spec
    )
    for k in init:
        torch.testing.assert_close(among[k][2], alone[k][0], rtol=RTOL, atol=ATOL)


def test_evaluate_cohort_equals_evaluate_model():
    model = build_model("mlp", (20,), 10, hidden=[16], seed=0)
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    data = _clients((20,), [3, 50, 0, 17])
    loss, acc = evaluate_cohort(model, [CohortClient(x, y, init) for x, y in data], batch_size=16)
    for i, (x, y) in enumerate(data):
        ref_loss, ref_acc = evaluate_model(model, x, y)
        if len(y) == 0:
            assert math.isnan(loss[i]) and math.isnan(acc[i])
        else:
            assert loss[i] == pytest.approx(ref_loss, rel=1e-5) and acc[i] == pytest.approx(ref_acc)


def test_models_with_buffers_or_dropout_are_not_vectorized():
    assert "buffers" in vectorizable(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)))
    assert "dropout" in vectorizable(nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5)))
    assert vectorizable(build_model("lenet5", (1, 8, 8), 10)) == ""
    with pytest.raises(ValueError, match="buffers"):
        train_cohort(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)), [], LocalTrainSpec(lr=0.1, batch_size=2))


def test_auto_chunk_follows_the_memory_budget():
    model = build_model("lenet5", (1, 8, 8), 10)
    sample = torch.zeros(1, 8, 8)
    each = per_client_bytes(model, sample, 32)
    d = sum(p.numel() for p in model.parameters())
    assert each > 5 * 4 * d  # parameters, gradient, momentum, temporaries + activations
    assert auto_chunk(model, sample, 32, 10 * each) == 10
    assert auto_chunk(model, sample, 32, 1) == 1
    # a budget for thousands of clients still gives cache-sized chunks (the cap's measurement: cohort.py)
    assert auto_chunk(model, sample, 32, 10_000 * each) == AUTO_CHUNK_MAX
    # the backend's memory goal: 1,000 LeNet-5 clients of batch 32 in a few GB
    assert 1000 * each < 3 * 2**30


# ---------------------------------------------------------------------------------------------- grid level
SMALL = {
    "rounds": 1,
    "clients": 12,
    "clients_per_round": 6,
    "eval_every": 0,
    "data": {"name": "synthetic", "partition": "natural"},
    "model": {"name": "mlp", "hidden": [16]},
    "train": {"lr": 0.05, "batch_size": 16, "momentum": 0.5},
}


def small(backend, **over):
    raw = json.loads(json.dumps(SMALL))
    raw.update(over)
    raw["simulation"] = {**raw.get("simulation", {}), "backend": backend}
    return config_from_dict(raw)


def assert_same_replies(a: dict[int, Message], b: dict[int, Message]):
    assert sorted(a) == sorted(b) and len(a) > 0
    for cid in a:
        ma, mb = a[cid].content[keys.METRICS], b[cid].content[keys.METRICS]
        assert ma[keys.NUM_EXAMPLES] == mb[keys.NUM_EXAMPLES]
        assert ma[keys.TRAIN_LOSS] == pytest.approx(mb[keys.TRAIN_LOSS], rel=1e-5)
        torch.testing.assert_close(flatten_arrays(a[cid].content[keys.ARRAYS]),
                                   flatten_arrays(b[cid].content[keys.ARRAYS]), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("train", [{"local_steps": 1}, {"local_epochs": 2}])
def test_every_clients_update_equals_inline(train):
    """One local step with the same batches (and two epochs): each client's reply equals the inline one."""
    raw_train = {**SMALL["train"], **train}
    inline, _ = round_replies(small("inline", train=raw_train), InMemoryGrid)
    vec, grid = round_replies(small("vectorized", train=raw_train), VectorizedGrid)
    assert grid.last_chunks == [6]  # all six clients in one batched call
    assert_same_replies(inline[0], vec[0])


def test_chunking_gives_the_one_chunk_result():
    one, _ = round_replies(small("vectorized"), VectorizedGrid)
    chunked, grid = round_replies(small("vectorized"), lambda app, n: VectorizedGrid(app, n, chunk=4))
    assert grid.last_chunks == [4, 2]
    assert_same_replies(one[0], chunked[0])
    cfg = small("vectorized", simulation={"cohort_chunk": 5})
    _, grid = round_replies(cfg, VectorizedGrid)
    assert grid.last_chunks == [5, 1]  # simulation.cohort_chunk reaches the grid


def test_a_foreign_client_app_falls_back_to_the_inline_path(caplog):
    cfg = small("vectorized")
    inner = make_client_app(cfg)
    user_app = ClientApp()

    @user_app.train()
    def _train(message, context):  # a user's own app (here delegating): the grid cannot batch it
        return inner(message, context)

    inline, _ = round_replies(cfg, InMemoryGrid)
    with caplog.at_level(logging.WARNING, logger="fl_sim"):
        vec, grid = round_replies(cfg, lambda app, n: VectorizedGrid(user_app, n))
    notices = [r for r in caplog.records if "not fl-sim's built-in" in r.getMessage()]
    assert len(notices) == 1 and "\n" not in notices[0].getMessage()
    assert grid.last_chunks == []
    for cid in inline[0]:  # the very same path: identical replies
        assert torch.equal(flatten_arrays(inline[0][cid].content[keys.ARRAYS]),
                           flatten_arrays(vec[0][cid].content[keys.ARRAYS]))


@pytest.mark.parametrize("config", ["topk_ef", "qcs", "fetchsgd", "daqusgd", "rlc_digital_qcs"])
def test_methods_through_compression_mod_match_inline(config):
    """Every method's replies pass the app's mods (encoding, EF residuals): same bits and losses as inline."""
    sets = ["rounds=2", "clients=12", "clients_per_round=4", "data.name=synthetic", "data.partition=natural",
            "model.name=mlp", "model.hidden=[16]", "eval_every=1"]
    rows = {}
    for backend in ("inline", "vectorized"):
        _, rows[backend], _ = run_in_memory(load_config(config, sets + [f"simulation.backend={backend}"]))
    for a, b in zip(rows["inline"], rows["vectorized"]):
        assert a["uplink_bits"] == b["uplink_bits"]
        # 2e-4: float32 rounding differences of the updates pass through one codec step and one server step
        assert a["test_loss"] == pytest.approx(b["test_loss"], rel=2e-4)


def test_quickstart_accuracy_curve_agrees_with_inline():
    """20 rounds of the quickstart (FedAvg, MLP, 10 of 100 clients a round): the same curve up to rounding.

    Seed noise for scale (measured): the round-20 test accuracy of seeds 0..4 is 0.45-0.53 (std 0.035). The two
    backends compute the same run, so their curves must agree far inside that: 0.01 is 45 of the 4,545 test
    predictions, room for float32 rounding differences accumulated over 20 rounds (measured: identical curves,
    max difference 0.0), while a wrong batch order, step count or SGD term changes the curve by more.
    """
    sets = ["rounds=20", "eval_every=1"]
    curves = {}
    for backend in ("inline", "vectorized"):
        _, rows, _ = run_in_memory(load_config("quickstart", sets + [f"simulation.backend={backend}"]))
        curves[backend] = np.array([r["test_accuracy"] for r in rows])
    assert len(curves["inline"]) == 21 and curves["inline"][-1] > curves["inline"][0] + 0.2  # it learned
    assert np.abs(curves["inline"] - curves["vectorized"]).max() <= 0.01


def test_device_and_config_errors():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_device("cuda")
    with pytest.raises(ConfigError, match="simulation.backend"):
        small("vector")
    with pytest.raises(ConfigError, match="simulation.cohort_chunk"):
        small("vectorized", simulation={"cohort_chunk": -1})
    with pytest.raises(ConfigError, match="simulation.device"):
        small("vectorized", simulation={"device": "tpu"})


def test_sweep_runs_vectorized_unless_told_otherwise(tmp_path):
    from fl_sim.runs.simulation import run_experiment
    from fl_sim.experiments.sweep import run_sweep

    seen = []

    def runner(cfg, run_dir, **kw):  # run_sweep passes overwrite=/resume= (fl_sim.runs.rundir's occupancy rules)
        seen.append(cfg.simulation.backend)
        return run_experiment(cfg, run_dir, **kw)

    tiny = ["rounds=1", "clients=6", "clients_per_round=3", "model.hidden=[8]", "eval_every=1"]
    run_sweep(None, ["train.lr=0.05"], tmp_path / "a", overrides=tiny, runner=runner)
    run_sweep(None, ["train.lr=0.05"], tmp_path / "b", overrides=tiny + ["simulation.backend=inline"], runner=runner)
    assert seen == ["vectorized", "inline"]


# ---------------------------------------------------------------------------------------------- records
@pytest.mark.parametrize(
    "a",
    [np.arange(12, dtype=np.float32).reshape(3, 4), np.arange(5), np.array(3.0, dtype=np.float32),
     np.ones((2, 3), dtype=np.float16), np.asfortranarray(np.random.rand(3, 4)), np.ones((2, 3), dtype=">f4"),
     np.zeros((0, 3), np.float32), np.random.rand(4, 6)[:, ::2], np.array([True, False])],
)
def test_npy_fast_paths_match_flower(a):
    """records reads .npy buffers in place and writes them with a cached header: Flower's bytes and arrays."""
    ours, flowers = ndarray_to_array(a), Array(a)
    assert (ours.data, ours.dtype, ours.shape, ours.stype) == (flowers.data, flowers.dtype, flowers.shape, flowers.stype)
    back = read_array(flowers)
    assert back.dtype == a.dtype and back.shape == a.shape and np.array_equal(back, a)


def test_a_failing_chunk_falls_back_to_per_client_replies(caplog, monkeypatch):
    """A batched call that raises never aborts the round: its clients are served one by one, as inline."""
    import fl_sim.engine.vectorized as fv

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    inline, _ = round_replies(small("inline"), InMemoryGrid)
    monkeypatch.setattr(fv, "train_cohort", broken)
    with caplog.at_level(logging.WARNING, logger="fl_sim"):
        vec, _ = round_replies(small("vectorized"), VectorizedGrid)
    assert any("batched chunk failed" in r.getMessage() for r in caplog.records)
    assert_same_replies(inline[0], vec[0])


def test_evaluate_messages_are_batched_with_the_inline_metrics():
    from flwr.app import ConfigRecord, MessageType, RecordDict

    cfg = small("vectorized")
    exp = build_experiment(cfg)
    replies = {}
    for name, grid in (("inline", InMemoryGrid(make_client_app(cfg), cfg.clients)),
                       ("vectorized", VectorizedGrid(make_client_app(cfg), cfg.clients))):
        msgs = [Message(content=RecordDict({keys.ARRAYS: exp.initial_arrays, keys.CONFIG: ConfigRecord({})}),
                        message_type=MessageType.EVALUATE, dst_node_id=node) for node in grid.node_ids[:5]]
        replies[name] = [r.content[keys.METRICS] for r in grid.send_and_receive(msgs)]
        if name == "vectorized":
            assert grid.last_chunks == [5]
    for a, b in zip(replies["inline"], replies["vectorized"]):
        assert a[keys.M_CID] == b[keys.M_CID] and a[keys.NUM_EXAMPLES] == b[keys.NUM_EXAMPLES]
        assert a["eval-loss"] == pytest.approx(b["eval-loss"], rel=1e-5) and a["eval-acc"] == pytest.approx(b["eval-acc"])
