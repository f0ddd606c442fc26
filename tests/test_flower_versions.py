"""Current Flower and torch releases: what fl-sim relies on in Flower works on the installed release
(1.41 or 1.42), or steps aside saying so; fl-sim's log lines come out in Flower's format; the dependency
ranges admit both releases; the aggregated per-client bits are whole numbers."""

from __future__ import annotations

import io
import logging
import re
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg

from fl_sim.engine import flower_poll
from fl_sim.clients import compression_mod
from fl_sim.strategies import CompressedFedAvg
from fl_sim.testing import InMemoryGrid

ROOT = Path(__file__).resolve().parents[1]


def test_poll_patch_steps_aside_with_one_log_line(monkeypatch, caplog):
    """A Flower whose in-memory LinkState method differs from the one the patch was written for: Flower's
    method stays, and one warning says so (once per process, not once per run)."""
    monkeypatch.setattr(flower_poll, "_KNOWN_SOURCE", set())
    monkeypatch.setattr(flower_poll, "_told", False)
    monkeypatch.delenv(flower_poll.ENV, raising=False)
    from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState

    original = InMemoryLinkState.__dict__["get_message_ins"]
    with caplog.at_level(logging.WARNING, logger="fl_sim"):
        for _ in range(2):
            with flower_poll.fast_message_poll() as patched:
                assert patched is False
                assert InMemoryLinkState.__dict__["get_message_ins"] is original
    lines = [r.getMessage() for r in caplog.records if "faster message poll" in r.getMessage()]
    assert len(lines) == 1 and "Flower's own polling is used" in lines[0]


def test_fl_sim_logs_through_flowers_console_format():
    """fl-sim's logger writes through Flower's console handler, so its lines carry Flower's level prefix
    (was: bare lines from Python's last-resort handler)."""
    from flwr.common.logger import console_handler

    import fl_sim.strategies.base  # noqa: F401 - attaches the handler

    logger = logging.getLogger("fl_sim")
    assert console_handler in logger.handlers
    stream = io.StringIO()
    old = console_handler.stream
    # the format is under test, not the levels other tests (and runs' quiet settings) leave behind
    saved = (logger.level, logger.disabled, console_handler.level, logging.root.manager.disable)
    console_handler.setStream(stream)
    logger.setLevel(logging.INFO)
    logger.disabled = False
    console_handler.setLevel(logging.INFO)
    logging.disable(logging.NOTSET)
    try:
        logger.error("round 3: a test line")
    finally:
        console_handler.setStream(old)
        logger.setLevel(saved[0])
        logger.disabled = saved[1]
        console_handler.setLevel(saved[2])
        logging.disable(saved[3])
    plain = re.sub(r"\x1b\[[0-9;]*m", "", stream.getvalue())  # Flower colours the level on a terminal
    assert re.fullmatch(r"ERROR\s*:\s+round 3: a test line\n", plain), plain


def test_dependency_ranges_admit_both_flower_and_torch_releases():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    from packaging.requirements import Requirement

    deps = {Requirement(d).name: Requirement(d) for d in
            tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}
    for name, ok, bad in (("flwr", ["1.41.0", "1.42.0"], ["1.40.0", "1.43.0"]),
                          ("torch", ["2.14.1", "2.15.0"], ["2.13.0", "2.16.0"])):
        assert all(deps[name].specifier.contains(v) for v in ok), (name, deps[name])
        assert not any(deps[name].specifier.contains(v) for v in bad), (name, deps[name])
    pinned = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines()
                  if "==" in line and not line.startswith("#"))
    assert pinned["flwr"] == "1.41.0" and pinned["torch"] == "2.14.1"  # the documented figures' environment
    assert all(deps[n].specifier.contains(pinned[n]) for n in ("flwr", "torch", "torchvision", "flwr-datasets"))


def test_aggregated_uplink_bits_is_a_whole_number():
    """Flower's weighted mean of equal integer bit counts came back as 198432.00000000003: the
    aggregated ``uplink-bits`` is rounded to whole bits."""
    app = ClientApp(mods=[compression_mod])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        arrays = ArrayRecord({k: Array(a.numpy() + 0.1 * (pid + 1)) for k, a in msg.content["arrays"].items()})
        metrics = MetricRecord({"num-examples": [3, 7, 11][pid]})
        return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)

    strategy = CompressedFedAvg(FedAvg(fraction_evaluate=0.0, min_available_nodes=3), codec="qsgd",
                                codec_params={"levels": 4})
    initial = ArrayRecord({"w": Array(np.zeros(1000, np.float32))})
    result = strategy.start(grid=InMemoryGrid(app, 3), initial_arrays=initial, num_rounds=1)
    bits = result.train_metrics_clientapp[1]["uplink-bits"]
    assert isinstance(bits, int) and bits > 0
