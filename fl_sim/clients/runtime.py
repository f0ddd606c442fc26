"""Per-process client runtime: the config, the federated data and a reusable model, built once.

Flower rebuilds ClientApp handlers per message and runs them in Ray actors (simulation) or
ClientApp processes (deployment). Building the dataset and the model per message would dominate a
round, so each process keeps one :class:`ClientRuntime` per config (keyed by its YAML text) and only
slices a client's data when that client is sampled.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from functools import cached_property

import torch
import yaml
from flwr.app import ArrayRecord, ConfigRecord

from fl_sim.wire import keys
from fl_sim.config import RunConfig, config_to_dict
from fl_sim.data import FederatedData, load_federated
from fl_sim.models import build_model
from fl_sim.clients.training import LocalTrainSpec

__all__ = ["ClientRuntime", "runtime_for"]

_CACHE: dict[str, "ClientRuntime"] = {}
_LOCK = threading.Lock()


@dataclass
class ClientRuntime:
    cfg: RunConfig

    @cached_property
    def data(self) -> FederatedData:
        return load_federated(self.cfg.data, num_clients=self.cfg.clients, seed=self.cfg.seed)

    @cached_property
    def model(self) -> torch.nn.Module:
        return build_model(
            self.cfg.model.name, self.data.input_shape, self.data.num_classes, hidden=self.cfg.model.hidden,
            seed=self.cfg.seed,
        )

    def load_model(self, arrays: ArrayRecord) -> torch.nn.Module:
        """The process's model with the received global weights loaded (no reconstruction)."""
        state = {k: torch.from_numpy(a.numpy().copy()) for k, a in arrays.items()}
        self.model.load_state_dict(state, strict=True)
        return self.model

    def train_spec(self, config: ConfigRecord) -> LocalTrainSpec:
        """Local hyperparameters from the run config, overridable per round by the strategy."""
        t = self.cfg.train
        return LocalTrainSpec(
            lr=float(config.get(keys.LR, t.lr)),
            batch_size=int(config.get(keys.BATCH_SIZE, t.batch_size)),
            local_epochs=int(config.get(keys.LOCAL_EPOCHS, t.local_epochs)),
            local_steps=int(config.get(keys.LOCAL_STEPS, t.local_steps)),
            momentum=t.momentum,
            weight_decay=t.weight_decay,
        )


_RECENT: list[tuple[RunConfig, "ClientRuntime"]] = []  # the last configs looked up, newest first (bounded)
_RECENT_MAX = 8


def runtime_for(cfg: RunConfig) -> ClientRuntime:
    """The cached runtime of this process for ``cfg`` (one per distinct config).

    Fast paths, no YAML dump: the same config object (inline backend), or one equal to a recently
    seen config (dataclass ``==``, ~30 us: Ray ships the ClientApp, so every message brings a new
    copy of the config). The recent list is bounded, so a long run keeps no per-message entry (an
    id-keyed dict grew by one 2.7 KB RunConfig per message under Ray).
    """
    for c, rt in _RECENT:
        if c is cfg:
            return rt
    with _LOCK:
        for i, (c, rt) in enumerate(_RECENT):
            if c == cfg:
                _RECENT[i] = (cfg, rt)  # the newest copy: the next message of this object hits by identity
                return rt
        key = yaml.safe_dump(config_to_dict(cfg), sort_keys=True)
        rt = _CACHE.get(key)
        if rt is None:
            torch.set_num_threads(1)  # one client per core: intra-op threads only contend
            rt = _CACHE[key] = ClientRuntime(cfg)
        _RECENT.insert(0, (cfg, rt))
        del _RECENT[_RECENT_MAX:]
        return rt
