"""A real Flower deployment on loopback: flower-superlink, two flower-supernode processes, `flwr run`.

Insecure mode, free ports, runtime dependency installation disabled, a FLWR_HOME per process
(fl_sim.engine.loopback); every process started is stopped by its PID, also when the test fails.
"""

import shutil
import sys
from pathlib import Path

import pytest

from fl_sim.engine.loopback import LoopbackDeployment

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.mark.skipif(shutil.which("flower-superlink", path=str(BIN)) is None, reason="Flower CLI not installed")
def test_superlink_two_supernodes_fihtcs(tmp_path):
    out_dir = tmp_path / "runs"
    overrides = (f"clients=4 clients_per_round=2 model.hidden=[16] out={out_dir} name=deploy "
                 "strategy.compression=4")
    with LoopbackDeployment(tmp_path, nodes=2) as deployment:
        run = deployment.flwr_run(REPO, f"rounds=2 config='fiht_cs' overrides='{overrides}'", timeout=240)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-3000:]
    assert "[fl-sim] final test accuracy" in output, output[-3000:]
    runs = list(out_dir.glob("deploy-*"))
    assert len(runs) == 1, output[-2000:]
    lines = (runs[0] / "metrics.csv").read_text().strip().splitlines()
    header = lines[0].split(",")
    assert len(lines) == 4  # header + rounds 0, 1, 2
    row = dict(zip(header, lines[2].split(",")))
    assert float(row["uplink_bits"]) > 0 and float(row["compression_ratio"]) > 3.5


@pytest.mark.skipif(shutil.which("flower-superlink", path=str(BIN)) is None, reason="Flower CLI not installed")
def test_deployed_reply_size_is_the_counted_bits_plus_framing(tmp_path):
    """examples/wire-measurement on two SuperNodes: each QSGD reply Flower transfers is within 1.15x of the codec's
    counted bits plus the framing docs/performance.md documents (813 + 449 bytes per payload array)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("measure", REPO / "examples" / "wire-measurement" / "measure.py")
    measure = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(measure)
    (result,) = measure.measure({"qsgd": measure.CODECS["qsgd"]}, tmp_path)
    assert len(result["rows"]) == 4  # 2 rounds x 2 SuperNodes
    for row in result["rows"]:
        framing = 813 + 449 * 1  # QSGD's payload is one array: its Elias stream
        assert row["payload_bytes"] == -(-row["counted_bits"] // 8)  # the stream's bytes, padding only
        assert row["counted_bits"] / 8 < row["message_bytes"] <= 1.15 * (row["counted_bits"] / 8 + framing)
        assert row["server_round_uplink_bits"] > 0
