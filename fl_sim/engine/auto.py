"""Which engine runs a config: ``simulation.backend`` (``auto`` by default).

The three engines run the same strategy and the same ClientApp code and give the same numbers (the
vectorized backend up to float rounding, fl_sim.engine.vectorized): they differ in time only. ``auto`` picks
the fastest one that applies, in this order:

1. ``ray`` (Flower's simulation engine, one process per Ray actor) when the config asks for something
   only Ray provides: ``simulation.ray_address`` (an existing Ray cluster, possibly several machines),
   ``simulation.ray_num_cpus`` (the size of a local Ray cluster) or ``simulation.num_gpus`` > 0 (a GPU
   share per client process);
2. ``vectorized`` (a round's clients trained in batched calls) when fl-sim's built-in ClientApp can train
   the model batched (fl_sim.clients.cohort.vectorizable: no buffers, no dropout) and the method's
   clients train with the shared local-training loop (not DaQuSGD, whose clients select and quantize
   samples themselves);
3. ``inline`` (messages delivered as function calls in this process, one client after another) otherwise.

``fl-sim run`` only ever runs fl-sim's built-in ClientApp, in this process or Ray's actors; that app
keeps no state outside its node context and the run directory, so it needs no process isolation.
A Flower app (``flwr run .``, fl_sim.app) always runs on Flower's own engine.
"""

from __future__ import annotations

from dataclasses import replace

from torch import nn

from fl_sim.config import RunConfig

__all__ = ["choose_backend", "resolve_backend", "ENGINES"]

ENGINES = ("ray", "inline", "vectorized")


def choose_backend(cfg: RunConfig, model: nn.Module) -> tuple[str, str]:
    """(engine, why) for ``cfg`` with its built model (module docstring: the rule)."""
    from fl_sim.clients.cohort import vectorizable

    sim = cfg.simulation
    if sim.backend != "auto":
        return sim.backend, "simulation.backend"
    if sim.ray_address:
        return "ray", f"simulation.ray_address={sim.ray_address}"
    if sim.ray_num_cpus:
        return "ray", f"simulation.ray_num_cpus={sim.ray_num_cpus}"
    if sim.num_gpus > 0:
        return "ray", f"simulation.num_gpus={sim.num_gpus:g} (a GPU share per client process)"
    if cfg.strategy.name == "daqusgd":
        return "inline", "DaQuSGD clients select and quantize their own samples (no batched path)"
    why = vectorizable(model)
    if why:
        return "inline", why
    return "vectorized", "the built-in ClientApp trains this model batched"


def resolve_backend(cfg: RunConfig, model: nn.Module) -> tuple[RunConfig, str]:
    """``cfg`` with ``simulation.backend`` set to the engine that runs it, and why that one."""
    engine, why = choose_backend(cfg, model)
    if engine == cfg.simulation.backend:
        return cfg, why
    return replace(cfg, simulation=replace(cfg.simulation, backend=engine)), why
