"""Memory a run will need, estimated from its config before anything big is allocated.

``check_experiment(cfg)`` (before the data are generated and the model is built) and
``check_strategy(cfg, d)`` (before the strategy builds its codec structures) refuse a config whose
largest structures cannot fit, with one line giving the estimate and the machine's available memory,
instead of a MemoryError deep inside (or, in a Ray worker, every client failing while the run exits 0).

The estimates count the dominant allocations only (formulas beside each) and are lower bounds of
the real peak: a refusal is certain to be right; a config that passes can still need more.
Available memory: psutil's ``virtual_memory().available`` when psutil is installed, else
MemAvailable of /proc/meminfo; unknown (no check) elsewhere.
"""

from __future__ import annotations

from typing import Any

from fl_sim.data.sources import meminfo_available_bytes

__all__ = ["available_bytes", "require", "check_experiment", "check_strategy", "model_parameters"]

F32, F64, I32 = 4, 8, 4
# Copies of the model's float parameters alive at once: the global model, a client's model, its gradients
# and optimizer momentum, the flattened update, and the server's aggregate.
MODEL_COPIES = 6
# Per-client bookkeeping every source keeps (partition sizes, offsets, client ids, node routing: int64 each).
PER_CLIENT_BYTES = 4 * 8
# Input shapes and classes of the built-in sources (hf:* is known only after loading).
_SHAPES = {"digits": ((64,), 10), "mnist": ((1, 28, 28), 10), "fashion_mnist": ((1, 28, 28), 10),
           "cifar10": ((3, 32, 32), 10)}


def available_bytes() -> int | None:
    """Memory this process can still allocate without swapping, or None when unknown."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # not installed, or no support on this platform
        pass
    return meminfo_available_bytes()


def _gib(n: float) -> str:
    return f"{n / 2**30:.3g} GiB"


def require(what: str, nbytes: float, fix: str) -> None:
    """Raise MemoryError (one line) when ``nbytes`` exceeds the available memory."""
    avail = available_bytes()
    if avail is not None and nbytes > avail:
        raise MemoryError(f"{what} needs about {_gib(nbytes)} but this machine has {_gib(avail)} available; {fix}")


def model_parameters(name: str, input_shape, num_classes: int, hidden) -> int:
    """Exact parameter count of a model, built on PyTorch's meta device (no memory allocated)."""
    import torch

    from fl_sim.models import build_model

    with torch.device("meta"):
        model = build_model(name, input_shape, num_classes, hidden=hidden, seed=0)
    return sum(p.numel() for p in model.state_dict().values() if p.is_floating_point())


def check_experiment(cfg) -> None:
    """Data generation and model, before either is allocated."""
    d = cfg.data
    # per-client bookkeeping of any source (sizes, partition indices, client ids: int64 each), before anything
    # is drawn per client: an absurd client count is refused here, not by a per-client allocation
    require(f"clients={cfg.clients:,}", cfg.clients * PER_CLIENT_BYTES, "use fewer clients")
    if d.name == "synthetic":
        from fl_sim.data.synthetic import BLOCK, MIN_SIZE, feature_bytes

        # features (Σ n_k · dim floats) and the generator's per-block weights w (BLOCK, dim, classes) float64,
        # drawn and offset (two arrays alive at once); n_k >= MIN_SIZE gives a lower bound without drawing n_k
        fixed = 2 * BLOCK * d.synthetic_dim * d.synthetic_classes * F64
        what = (f"data.synthetic_dim={d.synthetic_dim}, data.synthetic_classes={d.synthetic_classes} "
                f"({cfg.clients:,} clients)")
        require(what, cfg.clients * MIN_SIZE * d.synthetic_dim * F32 + fixed, "use fewer classes, features or clients")
        need = feature_bytes(cfg.clients, cfg.seed, d.synthetic_dim) + fixed
        require(what, need, "use fewer classes, features or clients")
        shape, classes = (d.synthetic_dim,), d.synthetic_classes
    elif d.name in _SHAPES:
        shape, classes = _SHAPES[d.name]
    else:
        return
    check_model(cfg, shape, classes)


def check_model(cfg, input_shape, num_classes: int) -> None:
    try:
        n = model_parameters(cfg.model.name, input_shape, num_classes, cfg.model.hidden)
    except (TypeError, ValueError, RuntimeError, NotImplementedError):
        return  # a model the meta device cannot build: its own errors come from the real build
    require(f"model {cfg.model.name} with hidden={cfg.model.hidden} ({n:,} parameters)", n * F32 * MODEL_COPIES,
            "use smaller layers (model.hidden)")


def _int(v: Any, default: int = 0) -> int:
    try:
        return int(v)
    except (TypeError, ValueError, OverflowError):
        return default


def check_strategy(cfg, d: int) -> None:
    """The method's own structures for a model of ``d`` parameters, from the options that size them."""
    s = cfg.strategy.name
    o = dict(cfg.strategy.options)
    p = dict(cfg.codec.params) if s == "compressed" else {}
    k_round = cfg.sampled_per_round()
    checks: list[tuple[str, float]] = []
    if s == "fetchsgd" or (s == "compressed" and cfg.codec.name == "count_sketch"):
        src, key = (o, "strategy") if s == "fetchsgd" else (p, "codec")
        rows, cols = _int(src.get("rows", 5), 5), _int(src.get("cols", 1000), 1000)
        # hash/sign table (rows, d) int32 and sketch tables (rows, cols) float32: one per client in a round,
        # plus FetchSGD's momentum and error sketches
        need = rows * d * I32 + (k_round + 3) * rows * cols * F32
        checks.append((f"{key}.rows={rows}, {key}.cols={cols}", need))
    if s == "rlc" or (s == "compressed" and cfg.codec.name == "rlc"):
        m = _int((o if s == "rlc" else p).get("m") or 0)
        # per-node channel memory (nodes, m) float64 and the round's m-vectors
        checks.append((f"{'strategy' if s == 'rlc' else 'codec'}.m={m}", (k_round + 2) * m * F64))
    for src, key in ((o, "strategy"), (p, "codec")):
        block = _int(src.get("block") or 0)
        if block:
            # a block-wise transform pads d to a whole number of blocks and works in float64
            checks.append((f"{key}.block={block}", 3 * max(block, d) * F64))
        meas = _int(src.get("measurements") or 0)
        if meas:
            checks.append((f"{key}.measurements={meas}", (k_round + 2) * meas * F64))
    for what, need in checks:
        require(what, need, "use a smaller value")
