"""YAML -> typed, validated run configuration; ``--set a.b=value`` overrides.

Every key is a dataclass field with a default. Unknown keys, wrong types and impossible values raise
:class:`ConfigError` with one line naming the key, the value and what is allowed; the CLI prints it
and exits with code 2.

Method-specific keys (``strategy.*`` beyond the common ones, ``codec.*``, ``channel.*``) are
collected into ``options`` / ``params`` and checked against the keyword arguments of the strategy,
codec or channel they configure, so a typo is still an error.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from fl_sim.compression import codec_names
from fl_sim.config.registry import STRATEGIES
from fl_sim.data.partition import PARTITIONS
from fl_sim.data.sources import SOURCES
from fl_sim.data.spec import DataConfig
from fl_sim.models import MODEL_NAMES

__all__ = [
    "ConfigError",
    "RunConfig",
    "DataConfig",
    "ModelConfig",
    "TrainConfig",
    "StrategyConfig",
    "SimulationConfig",
    "SecAggConfig",
    "load_config",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "packaged_config",
    "config_dir",
]


class ConfigError(ValueError):
    """A configuration problem, explained in one line."""


@dataclass
class ModelConfig:
    """Model by name: logreg, mlp, lenet5, cifarnet, resnet18."""

    name: str = "mlp"
    hidden: list[int] = field(default_factory=lambda: [200])


@dataclass
class TrainConfig:
    """Client-side local training."""

    local_epochs: int = 1
    local_steps: int = 0  # > 0: this many minibatch steps instead of epochs
    lr: float = 0.05
    batch_size: int = 32
    momentum: float = 0.0
    weight_decay: float = 0.0


@dataclass
class StrategyConfig:
    """Server side. ``name`` picks the strategy; ``options`` are its extra keyword arguments."""

    name: str = "fedavg"
    server_lr: float = 1.0
    server_momentum: float = 0.0
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class CodecConfig:
    """Uplink codec: registry name plus its parameters (``make_codec(name, dim=d, **params)``)."""

    name: str = "identity"
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class SimulationConfig:
    """Flower simulation engine settings.

    backend: "auto" (the default: the fastest engine that applies, fl_sim.engine.auto: "ray" when
    ray_address, ray_num_cpus or num_gpus ask for Ray, else "vectorized" where the built-in ClientApp
    can batch the model, else "inline"), "ray" (Flower's simulation engine, Ray actors), "inline" (the
    same strategy and ClientApp code with messages delivered by function calls in this process: no
    engine start-up, sequential clients) or "vectorized" (as inline, but fl-sim's built-in ClientApp
    trains a round's clients in batched torch.func calls: fl_sim.engine.vectorized; the same replies up to
    float rounding).
    """

    backend: str = "auto"
    num_cpus: float = 1.0  # per client (Flower's default of 2 gives one actor on a 2-core machine)
    num_gpus: float = 0.0
    ray_address: str = ""  # connect to an existing Ray cluster ("auto" or "ip:port"); "" = start a local one
    ray_num_cpus: int = 0  # 0 = all cores of this machine
    log_level: str = "WARNING"
    # Client error-feedback residuals (fl_sim.clients.residuals): "auto" = "disk" in `fl-sim run`
    # (RUN_DIR/state/residuals: checkpointable, bounded memory; on a multi-machine Ray cluster RUN_DIR must
    # be on a shared filesystem), node contexts in a Flower deployment; "context" = node contexts always.
    residual_store: str = "auto"
    residual_budget_mb: float = 0.0  # disk store: MB of rows each process may cache in memory (0 = none)
    # Flower SuperNodes the clients are routed onto (client cid -> node cid % n; every client's data,
    # randomness and residual follow its cid, so the numbers do not depend on n). Flower's simulation
    # engine polls every node each round (~0.3 ms each here), so one node per client costs ~30 s a round
    # at 100,000 clients. 0 = auto: one node per client up to AUTO_SUPERNODES clients, else
    # max(AUTO_SUPERNODES, clients per round); always one per client with residual_store=context.
    supernodes: int = 0
    # --- backend "vectorized" (fl_sim.engine.vectorized) ---
    cohort_chunk: int = 0  # clients per batched call; 0 = automatic from cohort_memory_mb
    cohort_memory_mb: float = 1024.0  # working-memory budget of one batched call (automatic chunk size)
    device: str = "cpu"  # where batched training runs: cpu, cuda, or auto (cuda when present)
    # torch intra-op threads of a batched call on the CPU; 0 = automatic (fl_sim.clients.cohort_threads): one
    # thread unless the machine's cores are idle, then one per core while that measures faster (a core taken by
    # another process makes a multi-thread call wait for it: 2x-8x slower). k > 0 = k threads always. The
    # count does not change the numbers and is restored after each call
    cohort_threads: int = 0


@dataclass
class SecAggConfig:
    """Secure aggregation (SecAgg+, [Bell-2020]) of the linear methods' payloads; off by default.

    Flower's SecAggPlusWorkflow names and meanings: ``num_shares`` neighbours per client including itself
    (an int count, or a float fraction of the sampled clients), ``reconstruction_threshold`` t (an int, or a
    fraction of num_shares), ``max_weight`` W (weights travel as n_i / W), ``clipping_range`` c,
    ``quantization_range`` T, ``modulus_range`` M (the field), ``timeout`` seconds per stage (0 = the
    grid's own). ``on_failure``: "raise" stops the run when a round cannot be unmasked, "skip" keeps the
    global model and goes on. docs/secure_aggregation.md.
    """

    enabled: bool = False
    num_shares: Any = 1.0
    reconstruction_threshold: Any = 0.5
    max_weight: float = 1000.0
    clipping_range: float = 8.0
    quantization_range: int = 4194304
    modulus_range: int = 4294967296
    timeout: float = 0.0
    on_failure: str = "raise"


@dataclass
class RunConfig:
    """A whole run. ``clients_per_round`` is a count (int >= 1) or a fraction in (0, 1)."""

    seed: int = 0
    rounds: int = 10
    clients: int = 100
    clients_per_round: float = 10
    eval_every: int = 1
    eval_tail: float = 0.0  # fraction of the rounds, at the end, evaluated every round (0 = none)
    checkpoint_every: int = 10  # rounds between checkpoints for `fl-sim run --resume` (0 = none)
    out: str = "runs"
    name: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    codec: CodecConfig = field(default_factory=CodecConfig)
    channel: dict[str, Any] = field(default_factory=dict)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    secagg: SecAggConfig = field(default_factory=SecAggConfig)

    def num_supernodes(self) -> int:
        """SuperNodes the run starts (``simulation.supernodes``, or its automatic value)."""
        n = self.simulation.supernodes
        if n:
            return int(n)
        if self.simulation.residual_store == "context" or self.clients <= AUTO_SUPERNODES:
            return self.clients
        return max(AUTO_SUPERNODES, self.sampled_per_round())

    def sampled_per_round(self) -> int:
        """Number of clients sampled each round (count, or fraction of ``clients``, at least 1)."""
        c = self.clients_per_round
        if c < 1:
            return max(1, int(round(c * self.clients)))
        return int(c)


# Sections whose unknown keys are collected instead of rejected (validated by their consumer).
_OPEN_SECTIONS = {"strategy": "options", "codec": "params"}


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin is list:
        return f"list of {_type_name(get_args(tp)[0])}"
    if origin is dict:
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` to type ``tp`` (strings from --set are parsed), or raise ConfigError."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is list:
        (inner,) = get_args(tp)
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip() else []
            if not isinstance(value, list):
                value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{key}={value!r}: expected {_type_name(tp)}")
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"{key}={value!r}: expected a mapping of keys to values")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{key}={value!r}: expected true or false")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}={value!r}: expected an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}={value!r}: expected an integer")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}={value!r}: expected a number")
        number = None
        if isinstance(value, (int, float)):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{key}={value!r}: expected a number")
        if not math.isfinite(number):  # inf/nan never train: every float setting is a finite number
            raise ConfigError(f"{key}={value!r}: must be a finite number")
        return number
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}={value!r}: expected a string")
    raise ConfigError(f"{key}: unsupported type {tp}")  # pragma: no cover - schema bug


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    section = prefix.rsplit(".", 1)[-1]
    for k, v in raw.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in fields:
            if section in _OPEN_SECTIONS and prefix:
                extra[k] = v
                continue
            allowed = ", ".join(sorted(fields))
            raise ConfigError(f"unknown config key {key!r}; allowed keys here: {allowed}")
        tp = hints[k]
        if dataclasses.is_dataclass(tp):
            kwargs[k] = _build(tp, v, key)
        else:
            kwargs[k] = _coerce(v, tp, key)
    obj = cls(**kwargs)
    if extra:
        getattr(obj, _OPEN_SECTIONS[section]).update(extra)
    return obj


def config_from_dict(raw: dict[str, Any]) -> RunConfig:
    """Build and validate a RunConfig from a plain mapping (a parsed YAML file)."""
    cfg = _build(RunConfig, raw, "")
    validate(cfg)
    return cfg


def config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    """Plain mapping (for config.yaml in the run directory); options/params flattened back."""
    d = dataclasses.asdict(cfg)
    for section, sub in _OPEN_SECTIONS.items():
        extra = d[section].pop(sub)
        d[section].update(extra)
    return d


def _parse_scalar(text: str) -> Any:
    """A --set value: YAML scalar parsing (numbers, booleans, lists like [1,2])."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` strings to a raw mapping (before typing)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key.sub=value, for example --set train.lr=0.1")
        key, _, text = item.partition("=")
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise ConfigError(f"--set {item!r}: empty key")
        node = raw
        for p in parts[:-1]:
            child = node.get(p)
            if child is None:
                child = node[p] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {p!r} is not a section")
            node = child
        node[parts[-1]] = _parse_scalar(text)
    return raw


def config_dir() -> Path:
    """The configs shipped with fl-sim: fl_sim/configs/ (package data, present in a wheel too)."""
    return Path(__file__).resolve().parents[1] / "configs"


def packaged_config(name: str) -> Path:
    """Path of a shipped config: ``quickstart``, ``qsgd.yaml``, ``papers/qcs`` or ``configs/qsgd.yaml`` (the
    repository-relative path, so ``fl-sim run configs/qsgd.yaml`` works from any directory and installed)."""
    rel = Path(name)
    if rel.parts and rel.parts[0] == "configs":
        rel = Path(*rel.parts[1:]) if len(rel.parts) > 1 else Path()
    if not rel.name.endswith((".yaml", ".yml")):
        rel = rel.with_name(f"{rel.name}.yaml")
    p = config_dir() / rel
    if not rel.is_absolute() and p.is_file():
        return p
    raise ConfigError(f"no config file {name!r} and no shipped config of that name in {config_dir()}; "
                      "give a path to a YAML file")


class _DuplicateKey(ConfigError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                mark = key_node.start_mark
                raise _DuplicateKey(f"line {mark.line + 1}: key {key!r} appears twice in one section")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML file (default: configs/quickstart.yaml), apply overrides, validate."""
    if path is None:
        path = packaged_config("quickstart")
    p = Path(path)
    if not p.is_file():
        p = packaged_config(str(path))
    try:
        raw = yaml.load(p.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}
    except _DuplicateKey as exc:
        raise ConfigError(f"{p}: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{p}: not UTF-8 text (byte {exc.start}); save the config as UTF-8") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{p}:{where} is not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: expected a mapping of config keys at the top level")
    raw = apply_overrides(raw, overrides or [])
    return config_from_dict(raw)


def _require(cond: bool, key: str, value: Any, allowed: str) -> None:
    if not cond:
        raise ConfigError(f"{key}={value!r} is not allowed: {allowed}")


RESIDUAL_STORES = ("auto", "context", "disk")
BACKENDS = ("auto", "ray", "inline", "vectorized")
DEVICES = ("cpu", "cuda", "auto")  # simulation.device (backend vectorized)
# Largest population: each client costs its partition indices and bookkeeping in this one process, so
# 10^8 clients are already tens of GB before any data; the benchmarks measure up to 10^5.
MAX_CLIENTS = 100_000_000
AUTO_SUPERNODES = 1_000  # simulation.supernodes=0: one SuperNode per client up to this many clients


def _registries() -> dict[str, tuple[str, ...]]:
    """The names each registry knows (one source of truth: the kernels' registries and the
    strategy table, imported, not copied)."""
    return {"strategy": tuple(STRATEGIES), "model": tuple(MODEL_NAMES), "data": tuple(SOURCES),
            "partition": ("auto", *PARTITIONS), "codec": tuple(codec_names())}


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# Largest step size accepted (train.lr, strategy.server_lr): no model here trains with a step above this;
# larger values (1e308 was accepted) only overflow the weights to inf/NaN in the first round.
MAX_LR = 1e3


def validate(cfg: RunConfig) -> None:
    """Impossible values -> ConfigError naming key, value and what is allowed."""
    names = _registries()
    _require(cfg.rounds >= 1, "rounds", cfg.rounds, "must be >= 1")
    _require(1 <= cfg.clients <= MAX_CLIENTS, "clients", cfg.clients,
             f"must be in [1, {MAX_CLIENTS:,}] (one process keeps every client's partition and bookkeeping)")
    c = cfg.clients_per_round
    _require(c > 0, "clients_per_round", c, "a count >= 1 or a fraction in (0, 1)")
    _require(
        c < 1 or (float(c).is_integer() and c <= cfg.clients),
        "clients_per_round",
        c,
        f"a whole count <= clients ({cfg.clients}) or a fraction in (0, 1)",
    )
    _require(cfg.eval_every >= 0, "eval_every", cfg.eval_every, "must be >= 0 (0 = only at the end)")
    _require(0.0 <= cfg.eval_tail <= 1.0, "eval_tail", cfg.eval_tail,
             "a fraction in [0, 1] of the rounds, at the end, evaluated every round")
    d = cfg.data
    _require(d.name in names["data"] or d.name.startswith("hf:"), "data.name", d.name,
             f"{', '.join(names['data'])} or hf:<dataset>")
    _require(d.partition in names["partition"], "data.partition", d.partition, ", ".join(names["partition"]))
    _require(d.alpha > 0, "data.alpha", d.alpha, "the Dirichlet concentration must be > 0")
    _require(d.shards_per_client >= 1, "data.shards_per_client", d.shards_per_client, "must be >= 1")
    _require(d.classes_per_client >= 1, "data.classes_per_client", d.classes_per_client, "must be >= 1")
    _require(0 < d.test_fraction < 1, "data.test_fraction", d.test_fraction, "must be in (0, 1)")
    _require(0 <= d.validation < 1, "data.validation", d.validation, "must be in [0, 1) (0 = no validation set)")
    _require(d.synthetic_alpha >= 0, "data.synthetic_alpha", d.synthetic_alpha, "must be >= 0")
    _require(d.synthetic_beta >= 0, "data.synthetic_beta", d.synthetic_beta, "must be >= 0")
    _require(d.synthetic_dim >= 1, "data.synthetic_dim", d.synthetic_dim, "must be >= 1")
    _require(d.synthetic_classes >= 2, "data.synthetic_classes", d.synthetic_classes, "must be >= 2")
    _require(d.min_partition_size >= 0, "data.min_partition_size", d.min_partition_size, "must be >= 0")
    _require(d.max_samples >= 0, "data.max_samples", d.max_samples, "must be >= 0 (0 = all)")
    _require(cfg.model.name in names["model"], "model.name", cfg.model.name, ", ".join(names["model"]))
    _require(all(h >= 1 for h in cfg.model.hidden), "model.hidden", cfg.model.hidden, "layer widths >= 1")
    _require(0 <= cfg.seed < 2**63, "seed", cfg.seed, "must be in [0, 2**63)")
    t = cfg.train
    _require(0 < t.lr <= MAX_LR, "train.lr", t.lr, f"the learning rate must be > 0 and <= {MAX_LR:g}")
    _require(t.local_epochs >= 1 or t.local_steps >= 1, "train.local_epochs", t.local_epochs, "must be >= 1")
    _require(t.local_steps >= 0, "train.local_steps", t.local_steps, "must be >= 0 (0 = use local_epochs)")
    _require(t.batch_size >= 1, "train.batch_size", t.batch_size, "must be >= 1")
    _require(0 <= t.momentum < 1, "train.momentum", t.momentum, "must be in [0, 1)")
    _require(t.weight_decay >= 0, "train.weight_decay", t.weight_decay, "must be >= 0")
    # SGD with coupled weight decay scales the weights by (1 - lr * weight_decay) each step: beyond 2 the
    # weights grow without bound whatever the data.
    _require(t.lr * t.weight_decay < 2, "train.weight_decay", t.weight_decay,
             f"lr * weight_decay must be < 2 (here lr={t.lr:g}); each step multiplies the weights by 1 - lr*wd")
    s = cfg.strategy
    _require(s.name in names["strategy"], "strategy.name", s.name, ", ".join(names["strategy"]))
    _require(cfg.codec.name in names["codec"], "codec.name", cfg.codec.name, ", ".join(names["codec"]))
    _require(0 < s.server_lr <= MAX_LR, "strategy.server_lr", s.server_lr, f"must be > 0 and <= {MAX_LR:g}")
    _require(0 <= s.server_momentum < 1, "strategy.server_momentum", s.server_momentum, "must be in [0, 1)")
    sim = cfg.simulation
    _require(sim.backend in BACKENDS, "simulation.backend", sim.backend, ", ".join(BACKENDS))
    _require(sim.cohort_chunk >= 0, "simulation.cohort_chunk", sim.cohort_chunk, "must be >= 0 (0 = automatic)")
    _require(sim.cohort_memory_mb > 0, "simulation.cohort_memory_mb", sim.cohort_memory_mb, "must be > 0")
    _require(sim.cohort_threads >= 0, "simulation.cohort_threads", sim.cohort_threads, "must be >= 0 (0 = automatic)")
    _require(sim.device in DEVICES, "simulation.device", sim.device, ", ".join(DEVICES))
    _require(sim.num_cpus > 0, "simulation.num_cpus", sim.num_cpus, "CPUs per client must be > 0")
    _require(sim.num_gpus >= 0, "simulation.num_gpus", sim.num_gpus, "must be >= 0")
    _require(sim.log_level.upper() in LOG_LEVELS, "simulation.log_level", sim.log_level, ", ".join(LOG_LEVELS))
    _require(sim.residual_store in RESIDUAL_STORES, "simulation.residual_store", sim.residual_store,
             ", ".join(RESIDUAL_STORES))
    _require(sim.residual_budget_mb >= 0, "simulation.residual_budget_mb", sim.residual_budget_mb,
             "must be >= 0 (0 = no in-memory tier)")
    _require(0 <= sim.supernodes <= cfg.clients, "simulation.supernodes", sim.supernodes,
             f"must be in [0, clients={cfg.clients}] (0 = automatic)")
    _require(sim.residual_store != "context" or sim.supernodes in (0, cfg.clients), "simulation.supernodes",
             sim.supernodes, "must equal clients with residual_store=context (two clients on one node would "
             "race on its context)")
    _validate_secagg(cfg)
    _require(cfg.checkpoint_every >= 0, "checkpoint_every", cfg.checkpoint_every, "must be >= 0 (0 = no checkpoints)")


def _validate_secagg(cfg: RunConfig) -> None:
    sa = cfg.secagg
    for name in ("num_shares", "reconstruction_threshold"):
        v = getattr(sa, name)
        ok = not isinstance(v, bool) and (isinstance(v, int) and v >= 2 or isinstance(v, float) and 0 < v <= 1)
        _require(ok, f"secagg.{name}", v, "an integer count >= 2 or a fraction in (0, 1] (Flower's meaning)")
    _require(sa.max_weight > 0, "secagg.max_weight", sa.max_weight, "must be > 0")
    _require(sa.clipping_range > 0, "secagg.clipping_range", sa.clipping_range, "must be > 0")
    _require(2 <= sa.quantization_range < sa.modulus_range, "secagg.quantization_range", sa.quantization_range,
             f"must be >= 2 and below modulus_range ({sa.modulus_range})")
    _require(sa.modulus_range & (sa.modulus_range - 1) == 0 and sa.modulus_range <= 2**62, "secagg.modulus_range",
             sa.modulus_range, "a power of 2 up to 2**62")
    _require(sa.timeout >= 0, "secagg.timeout", sa.timeout, "seconds >= 0 (0 = the grid's own)")
    _require(sa.on_failure in ("raise", "skip"), "secagg.on_failure", sa.on_failure, "raise or skip")
    if not sa.enabled:
        return
    _require(cfg.simulation.backend != "vectorized", "simulation.backend", cfg.simulation.backend,
             "secagg runs on the inline or ray backend (the vectorized grid batches training outside the mods)")
    _require(cfg.num_supernodes() == cfg.clients, "simulation.supernodes", cfg.simulation.supernodes,
             f"secagg keeps each client's keys in its node's context: one node per client (supernodes = "
             f"{cfg.clients} or 0)")
    _require(cfg.sampled_per_round() >= 2, "clients_per_round", cfg.clients_per_round,
             "secagg needs at least 2 clients per round")
    _require(cfg.sampled_per_round() * sa.quantization_range < sa.modulus_range, "secagg.quantization_range",
             sa.quantization_range, f"clients per round x quantization_range must stay below modulus_range "
             f"({sa.modulus_range}) or the masked sum wraps")
