"""Build the pieces of a run from a RunConfig: data, model, initial arrays, strategy, evaluator.

Shared by ``fl-sim run`` (simulation.py) and the Flower App entry points (app.py) so both run the
same experiment from the same config.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import ArrayRecord, MetricRecord

from fl_sim.clients.training import evaluate_model
from fl_sim.config import AUTO_SUPERNODES, ConfigError, RunConfig
from fl_sim.config.schema import _coerce
from fl_sim.data import FederatedData, load_federated
from fl_sim.models import build_model, count_parameters
from fl_sim.wire.records import state_dict_to_arrays
from fl_sim.strategies import strategy_class

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
    from fl_sim.engine.memory import check_experiment, check_model

    check_experiment(cfg)  # before the data and model are allocated
    data = load_federated(cfg.data, num_clients=cfg.clients, seed=cfg.seed)
    if cfg.data.name.startswith("hf:"):
        check_model(cfg, data.input_shape, data.num_classes)
    eligible = len(data.eligible_clients)
    if eligible < cfg.sampled_per_round():
        raise ConfigError(
            f"clients_per_round={cfg.clients_per_round!r} but only {eligible} of {cfg.clients} clients have data; "
            "lower clients_per_round, use fewer clients, or raise data.alpha"
        )
    model = build_model(cfg.model.name, data.input_shape, data.num_classes, hidden=cfg.model.hidden, seed=cfg.seed)
    return Experiment(cfg, data, model, state_dict_to_arrays(model.state_dict()))


# Flower's sampling options (FedAvg and the strategies built on it): fractions of the connected nodes, and
# counts of nodes a round waits for. Flower waits, without a timeout, until that many nodes are connected.
_FRACTIONS = {"fraction_train": (False, "(0, 1]"), "fraction_evaluate": (True, "[0, 1]")}
_NODE_COUNTS = ("min_available_nodes", "min_train_nodes", "min_evaluate_nodes")


def check_sampling_options(cfg: RunConfig, nodes: int | None = None) -> None:
    """Refuse the strategy options that make Flower wait forever for nodes: a fraction above 1 (Flower
    samples ``int(fraction * nodes)`` nodes and waits until that many are connected) and, in a simulation
    of ``nodes`` SuperNodes, a ``min_*_nodes`` above ``nodes``. Values of the wrong type are left to
    :func:`typed_options`."""
    options = cfg.strategy.options

    def given(key: str, tp: type):
        try:
            return _coerce(options[key], tp, f"strategy.{key}") if key in options else None
        except ConfigError:
            return None

    for key, (zero_ok, allowed) in _FRACTIONS.items():
        v = given(key, float)
        if v is not None and not (0 <= v <= 1 if zero_ok else 0 < v <= 1):
            raise ConfigError(f"strategy.{key}={options[key]!r} is not allowed: a fraction of the nodes in {allowed} "
                              "(Flower would wait forever for more nodes than exist)")
    if nodes is None:
        return
    for key in _NODE_COUNTS:
        v = given(key, int)
        if v is not None and v > nodes:
            raise ConfigError(f"strategy.{key}={v} but this run has {nodes} SuperNodes (simulation.supernodes; "
                              f"automatic: one per client up to {AUTO_SUPERNODES:,}); Flower would wait "
                              f"forever for the missing ones: use strategy.{key} <= {nodes} or leave it out")


def build_strategy(exp: Experiment, **extra: Any):
    """The configured strategy over the experiment's eligible clients."""
    from fl_sim.engine.memory import check_strategy
    from fl_sim.strategies import guards as reply_guards

    cfg = exp.cfg
    check_sampling_options(cfg)
    cls = strategy_class(cfg.strategy.name)
    check_strategy(cfg, exp.dim)  # before the codec's structures are allocated
    kwargs: dict[str, Any] = dict(
        clients_per_round=cfg.sampled_per_round(),
        client_ids=exp.data.eligible_clients.tolist(),
        seed=cfg.seed,
        server_lr=cfg.strategy.server_lr,
        server_momentum=cfg.strategy.server_momentum,
        # fl-sim's runs may run on one node: differs from Flower's FedAvg defaults (min nodes 2), so explicit.
        # (fraction_evaluate: below.)
        min_train_nodes=1,
        min_available_nodes=1,
    )
    if cfg.strategy.name in _CODEC_STRATEGIES:
        from fl_sim.compression.base import _REGISTRY, _load_builtin_codecs

        _load_builtin_codecs()
        codec_cls = _REGISTRY.get(cfg.codec.name)
        params = dict(cfg.codec.params)
        kwargs["codec"] = cfg.codec.name
        kwargs["codec_params"] = typed_options(_signature_types(codec_cls), params, "codec") if codec_cls else params
    elif cfg.codec.name != "identity" or cfg.codec.params:
        raise ConfigError(
            f"codec.name={cfg.codec.name!r} is only used by strategy 'compressed'; strategy "
            f"{cfg.strategy.name!r} sets its own compression through strategy options"
        )
    if cfg.channel:
        from fl_sim.channels import MACChannel

        typed_options(_signature_types(MACChannel), dict(cfg.channel), "channel")  # snr_db=abc names its key
    if cfg.channel and cfg.strategy.name != "rlc":
        # A digital baseline over the same channel: bits -> channel uses at capacity ([Abdi-thesis] Ch. 5).
        link = {k: cfg.channel[k] for k in ("snr_db", "bandwidth_hz", "compute_s") if k in cfg.channel}
        rest = {k: v for k, v in cfg.channel.items() if k not in link}
        from fl_sim.channels import MACChannel

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
    kwargs.update(typed_options(_signature_types(cls), options, "strategy"))
    # reply guards: a simulation's server knows each client's partition size (a larger num-examples is a lie)
    guard_options = kwargs.get("guards") or {}
    if not isinstance(guard_options, dict):
        raise ConfigError(f"strategy.guards={guard_options!r}: expected a mapping of guard options "
                          f"({', '.join(reply_guards.DEFAULTS)}), e.g. --set strategy.guards.norm_bound=5")
    kwargs["guards"] = {"client_sizes": exp.data.client_sizes.tolist(), **guard_options}
    try:
        strategy = cls(**kwargs)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"strategy {cfg.strategy.name!r}: {exc}") from None
    if "fraction_evaluate" not in options:
        # fl-sim's runs evaluate centrally on the server (evaluate_fn), not on the clients: Flower's FedAvg
        # default is 1.0. Set after construction, as FedAvg's constructor warns about 0.0 on every run.
        strategy.inner.fraction_evaluate = 0.0
        strategy.inner.min_evaluate_nodes = 0
    if cfg.secagg.enabled:
        from fl_sim.strategies.secagg import check_strategy as check_secagg

        try:
            check_secagg(strategy)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    return strategy


_SCALARS = {"int": int, "float": float, "str": str, "bool": bool}


def _signature_types(cls: type) -> dict[str, tuple[list[type], bool]]:
    """Keyword argument -> (accepted scalar types, None accepted) through a class hierarchy, read from the
    annotations of each ``__init__`` (``"int | None"`` -> ([int], True)); unannotated or non-scalar
    arguments are left out (passed through unchecked)."""
    out: dict[str, tuple[list[type], bool]] = {}
    for klass in reversed(cls.__mro__):
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        for p in inspect.signature(init).parameters.values():
            ann = p.annotation if isinstance(p.annotation, str) else getattr(p.annotation, "__name__", "")
            parts = [a.strip() for a in str(ann).split("|")]
            types = [_SCALARS[a] for a in parts if a in _SCALARS]
            if types and all(a in _SCALARS or a == "None" for a in parts):
                out[p.name] = (types, "None" in parts)
            else:
                out.pop(p.name, None)
    return out


def typed_options(types: dict[str, tuple[list[type], bool]], values: dict[str, Any], section: str) -> dict[str, Any]:
    """Check and convert method options by the annotations of the code they configure, so a wrong type is
    one line naming the key (``strategy.compression='abc': expected a number``), never an error deep inside.

    Rules: numbers must be finite; an integer option whose ``None`` means "derive a default" must be >= 1
    when given (0 would silently read as "absent" in ``x or default``).
    """

    out = dict(values)
    for key, value in values.items():
        if key not in types:
            continue
        accepted, optional = types[key]
        name = f"{section}.{key}"
        if value is None and optional:
            continue
        err: ConfigError | None = None
        for tp in accepted:
            try:
                v = _coerce(value, tp, name)
            except ConfigError as exc:
                err = err or exc
                continue
            if tp is float and not math.isfinite(v):
                raise ConfigError(f"{name}={value!r}: must be a finite number")
            if tp is int and optional and v < 1:
                raise ConfigError(f"{name}={value!r}: must be >= 1 (leave it out for the default)")
            out[key] = v
            break
        else:
            if len(accepted) > 1:
                raise ConfigError(f"{name}={value!r}: expected {' or '.join(t.__name__ for t in accepted)}")
            raise err  # type: ignore[misc]
    return out


def _accepted_kwargs(cls: type) -> set[str]:
    """Keyword arguments a strategy accepts through its class hierarchy and the FedAvg it builds
    (user-settable ones)."""
    from flwr.serverapp.strategy import FedAvg

    names: set[str] = set()
    for klass in (*cls.__mro__, FedAvg):
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        for p in inspect.signature(init).parameters.values():
            if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name != "self":
                names.add(p.name)
    return names - {"inner", "client_ids", "seed", "clients_per_round", "server_lr", "server_momentum", "codec",
                    "codec_params", "train_metrics_aggr_fn", "evaluate_metrics_aggr_fn"}


def describe_model(exp: Experiment) -> str:
    return f"{exp.cfg.model.name}: {count_parameters(exp.model):,} parameters"


def metric_record(loss: float, acc: float) -> MetricRecord:
    return MetricRecord({"test_loss": float(loss), "test_accuracy": float(acc)})
