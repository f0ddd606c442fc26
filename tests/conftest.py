"""Suite-wide isolation: a test leaves Python's logging as it found it.

Benchmarks run in-process by the smoke tests silence logging globally (``logging.disable``) and runs set
Flower's and fl-sim's logger levels (``simulation.log_level``); without this, a later test that reads
fl-sim's log lines (caplog) passes alone and fails after them.
"""

from __future__ import annotations

import logging

import pytest

_LOGGERS = ("fl_sim", "flwr", "ray")


@pytest.fixture(autouse=True)
def _restore_logging():
    disabled = logging.root.manager.disable
    levels = {name: (logging.getLogger(name).level, logging.getLogger(name).disabled) for name in _LOGGERS}
    yield
    logging.disable(disabled)
    for name, (level, off) in levels.items():
        logger = logging.getLogger(name)
        logger.setLevel(level)
        logger.disabled = off
