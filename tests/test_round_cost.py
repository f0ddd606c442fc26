"""What a round costs besides training: the per-reply value check (guards.all_finite) equals torch's and still
rejects a non-finite reply; metrics.csv is rewritten at most once per interval and complete at the end."""

import math

import pytest
import torch

from fl_sim.strategies.guards import all_finite


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("bad", [None, math.nan, math.inf, -math.inf])
def test_all_finite_agrees_with_torch(dtype, bad):
    x = torch.linspace(-3, 3, 1001).to(dtype)
    if bad is not None:
        x[517] = bad
    assert all_finite(x) == bool(torch.isfinite(x).all()) == (bad is None)
    assert all_finite(x[::7]) == bool(torch.isfinite(x[::7]).all())  # a strided view
    assert all_finite(x.reshape(7, 143).t()) == (bad is None)  # non-contiguous


def test_all_finite_of_integers_and_of_a_tensor_with_grad():
    assert all_finite(torch.arange(10))
    w = torch.ones(5, requires_grad=True)
    assert all_finite(w)
    assert all_finite(torch.empty(0))


def test_a_nan_reply_is_still_rejected():
    """The strategy's decode path uses all_finite: a reply with one NaN is a ReplyError."""
    from flwr.app import ArrayRecord

    from fl_sim.wire.records import ndarray_to_array
    from fl_sim.strategies.base import ReplyError, UpdateStrategy

    from fl_sim.wire.records import model_spec

    strategy = UpdateStrategy.__new__(UpdateStrategy)  # the decode step alone: the global model it compares with
    strategy._global_vector = torch.zeros(6)
    bad = torch.zeros(6)
    bad[3] = math.nan
    msg = type("Reply", (), {})()
    record = ArrayRecord()
    record["w"] = ndarray_to_array(bad.numpy())
    strategy._model_spec = model_spec(record)
    strategy.reply_arrays = lambda m: record
    with pytest.raises(ReplyError, match="NaN or inf"):
        strategy.decode_reply(1, msg, 0)
    record["w"] = ndarray_to_array(torch.ones(6).numpy())
    delta, bits = strategy.decode_reply(1, msg, 0)
    assert torch.equal(delta, torch.ones(6)) and bits == 6 * 32


def test_metrics_csv_is_rewritten_at_most_once_per_interval_and_complete_when_flushed(tmp_path):
    from fl_sim.runs.results import RunRecorder

    def lines():
        return (tmp_path / "metrics.csv").read_text().strip().splitlines()

    rec = RunRecorder(tmp_path, {"name": "t"}, csv_interval_s=3600.0)
    for r in range(4):
        rec.add({"round": r, "test_accuracy": 0.1 * r, "test_loss": 1.0})
    assert len(lines()) == 2  # header + round 0: the first row is written at once, the rest wait
    rec.flush()
    assert len(lines()) == 5
    rec.add({"round": 4, "test_accuracy": 0.4, "test_loss": 1.0})
    summary = rec.finish({})
    assert len(lines()) == 6 and summary["rounds"] == 4
    every = RunRecorder(tmp_path / "every", {"name": "t"}, csv_interval_s=0.0)
    every.add({"round": 0})
    every.add({"round": 1})
    assert len((tmp_path / "every" / "metrics.csv").read_text().strip().splitlines()) == 3
