"""CIFAR-10 batches are pickles: a crafted data_batch_1 must not run code."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

from fl_sim.config import DataConfig
from fl_sim.data import load_federated
from fl_sim.data.errors import DataError

NAMES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def genuine(rng, n=8) -> dict:
    """A batch as the real files hold it: batch_label, labels, data (n, 3072) uint8, filenames."""
    return {"batch_label": "training batch 1 of 5", "labels": rng.integers(0, 10, n).tolist(),
            "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            "filenames": [f"img_{i}.png".encode() for i in range(n)]}


def write_all(base, protocol, override=None):
    base.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for name in NAMES:
        with open(base / name, "wb") as f:
            pickle.dump(genuine(rng), f, protocol=protocol)
    if override is not None:
        (base / "data_batch_1").write_bytes(override)


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_genuine_batches_still_load(tmp_path, protocol):
    write_all(tmp_path / "cifar-10-batches-py", protocol)
    fd = load_federated(DataConfig(name="cifar10", root=str(tmp_path), partition="iid"), 4, 0)
    assert fd.input_shape == (3, 32, 32) and fd.client_sizes.sum() == 40


class _RunsCode:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_malicious_batch_refused_without_running_it(tmp_path, protocol):
    marker = tmp_path / "pwned"
    evil = {"data": _RunsCode(f"touch {marker}"), "labels": [0]}
    write_all(tmp_path / "cifar-10-batches-py", 2, pickle.dumps(evil, protocol=protocol))
    with pytest.raises(DataError) as err:
        load_federated(DataConfig(name="cifar10", root=str(tmp_path), partition="iid"), 4, 0)
    msg = str(err.value)
    assert not marker.exists()
    assert "\n" not in msg and "data_batch_1" in msg and "system" in msg and "never holds" in msg


def test_codecs_encode_only_to_latin1(tmp_path):
    """Protocol-2 bytes are rebuilt by _codecs.encode(text, 'latin1'); any other codec is refused."""
    import pickletools  # noqa: F401 - documents that the stream below is hand-made

    evil = (b"\x80\x02c_codecs\nencode\nq\x00X\x03\x00\x00\x00abcq\x01X\x05\x00\x00\x00rot13q\x02\x86q\x03Rq\x04.")
    write_all(tmp_path / "cifar-10-batches-py", 2, evil)
    with pytest.raises(DataError, match="rot13"):
        load_federated(DataConfig(name="cifar10", root=str(tmp_path), partition="iid"), 4, 0)
