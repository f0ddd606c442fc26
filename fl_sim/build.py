"""Build the pieces of a run from a RunConfig: data, model, initial arrays, strategy, evaluator.

Shared by ``fl-sim run`` (simulation.py) and the Flower App entry points (app.py) so both run the
same experiment from the same config.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import ArrayRecord, MetricRecord

from .clients.training import evaluate_model
from .config import ConfigError, RunConfig
from .data import FederatedData, load_federated
from .models import build_model, count_parameters
from .records import state_dict_to_arrays
from .strategies import strategy_class

__all__ = ["Experiment", "build_experiment", "build_strategy"]

# Strategies that take a codec from the `codec:` section.
_CODEC_STRATEGIES = {"compressed"}


@dataclass
class Experiment:
    cfg: RunConfig
    data: FederatedData
    model: torch.nn.Module
    initial_arrays: ArrayRecord

    @property
    def dim(self) -> int:
        return sum(p.numel() for p in self.model.state_dict().values() if torch.is_floating_point(p))

    def evaluate(self, arrays: ArrayRecord) -> tuple[float, float]:
        """(test loss, test accuracy) of a global model on the held-out test set."""
        state = {k: torch.from_numpy(a.numpy().copy()) for k, a in arrays.items()}
        self.model.load_state_dict(state, strict=True)
        x, y = self.data.test_data()
        return evaluate_model(self.model, x, y)

    def evaluate_validation(self, arrays: ArrayRecord) -> tuple[float, float] | None:
        """(loss, accuracy) on the validation rows held out of training (``data.validation``), else None."""
        val = self.data.validation_data()
        if val is None:
            return None
        state = {k: torch.from_numpy(a.numpy().copy()) for k, a in arrays.items()}
        self.model.load_state_dict(state, strict=True)
        return evaluate_model(self.model, *val)


def build_experiment(cfg: RunConfig) -> Experiment:
    data = load_federated(cfg.data, num_clients=cfg.clients, seed=cfg.seed)
    eligible = len(data.eligible_clients)
    if eligible < cfg.sampled_per_round():
        raise ConfigError(
            f"clients_per_round={cfg.clients_per_round!r} but only {eligible} of {cfg.clients} clients have data; "
            "lower clients_per_round, use fewer clients, or raise data.alpha"
        )
    model = build_model(cfg.model.name, data.input_shape, data.num_classes, hidden=cfg.model.hidden, seed=cfg.seed)
    return Experiment(cfg, data, model, state_dict_to_arrays(model.state_dict()))


def build_strategy(exp: Experiment, **extra: Any):
    """The configured strategy over the experiment's eligible clients."""
    cfg = exp.cfg
    cls = strategy_class(cfg.strategy.name)
    kwargs: dict[str, Any] = dict(
        clients_per_round=cfg.sampled_per_round(),
        client_ids=exp.data.eligible_clients.tolist(),
        seed=cfg.seed,
        server_lr=cfg.strategy.server_lr,
        server_momentum=cfg.strategy.server_momentum,
    )
    if cfg.strategy.name in _CODEC_STRATEGIES:
        kwargs["codec"] = cfg.codec.name
        kwargs["codec_params"] = dict(cfg.codec.params)
    elif cfg.codec.name != "identity" or cfg.codec.params:
        raise ConfigError(
            f"codec.name={cfg.codec.name!r} is only used by strategy 'compressed'; strategy "
            f"{cfg.strategy.name!r} sets its own compression through strategy options"
        )
    if cfg.channel and cfg.strategy.name != "rlc":
        # A digital baseline over the same channel: bits -> channel uses at capacity (Abdi Ch. 5).
        link = {k: cfg.channel[k] for k in ("snr_db", "bandwidth_hz", "compute_s") if k in cfg.channel}
        rest = {k: v for k, v in cfg.channel.items() if k not in link}
        from .channels import MACChannel

        try:
            MACChannel.from_config(rest)  # same keys as the analog channel: a typo is an error
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if "snr_db" not in link:
            raise ConfigError("channel.snr_db is required to count a digital strategy's channel uses")
        kwargs["digital_link"] = link
    if hasattr(cls, "from_experiment"):
        kwargs.update(cls.from_experiment(exp))
    kwargs.update(extra)
    options = dict(cfg.strategy.options)
    allowed = _accepted_kwargs(cls)
    for key in options:
        if key not in allowed:
            raise ConfigError(
                f"unknown config key 'strategy.{key}' for strategy {cfg.strategy.name!r}; "
                f"allowed: {', '.join(sorted(allowed)) or 'none'}"
            )
    kwargs.update(options)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"strategy {cfg.strategy.name!r}: {exc}") from None


def _accepted_kwargs(cls: type) -> set[str]:
    """Keyword arguments a strategy accepts through its class hierarchy (user-settable ones)."""
    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        for p in inspect.signature(init).parameters.values():
            if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name != "self":
                names.add(p.name)
    return names - {"client_ids", "seed", "clients_per_round", "server_lr", "server_momentum", "codec", "codec_params"}


def describe_model(exp: Experiment) -> str:
    return f"{exp.cfg.model.name}: {count_parameters(exp.model):,} parameters"


def metric_record(loss: float, acc: float) -> MetricRecord:
    return MetricRecord({"test_loss": float(loss), "test_accuracy": float(acc)})
