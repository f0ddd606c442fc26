"""Flower's Ray simulation engine, called in one place: resources checked first, the driver kept serial.

``run_flower_simulation`` is the one call into ``flwr.simulation.run_simulation`` (deprecated in
Flower 1.41, so kept behind this function): it checks in bounded time that the Ray cluster can
start a client (``check_engine_resources``), swaps in the indexed message poll
(``fl_sim.engine.flower_poll``) and restores the driver's torch thread count afterwards.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from flwr.serverapp import ServerApp

from fl_sim.config import ConfigError, RunConfig
from fl_sim.engine.flower_poll import fast_message_poll

__all__ = ["run_flower_simulation", "check_engine_resources", "serial_torch_in_driver", "quiet_flower",
           "RAY_CONNECT_TIMEOUT_S"]


def serial_torch_in_driver() -> None:
    """One torch intra-op thread in the Ray driver from round 1 on, as the inline backend has.

    Inline, the first client's ``runtime_for`` sets one thread in the process, so the server's
    aggregation and final evaluation run on one. Under Ray the client runtimes live in the actors and
    the driver kept torch's default (one thread per core) while the actors use every core: each parallel
    op of the aggregation then waits, spinning, for a pool thread that has no core (a 100 x 61,706
    LeNet-5 aggregate: 450 ms of CPU with 2 threads against 35 ms with 1, under load, 2 cores; see
    docs/perf/ray_profile.md). Round 0's evaluation keeps the default, as inline does.
    ``run_flower_simulation`` restores the thread count afterwards.
    """
    import torch

    torch.set_num_threads(1)


RAY_CONNECT_TIMEOUT_S = 10.0


def check_engine_resources(cfg: RunConfig) -> None:
    """Refuse, in bounded time, what would make Flower's engine wait forever: a client needing more CPUs or
    GPUs than the local Ray cluster has (no actor could ever start), or a ``ray_address`` nobody answers."""
    import socket

    sim = cfg.simulation
    if not sim.ray_address:
        cpus = sim.ray_num_cpus or os.cpu_count() or 1
        if sim.num_cpus > cpus:
            raise ConfigError(
                f"simulation.num_cpus={sim.num_cpus:g} per client but the local Ray cluster has {cpus} CPUs "
                f"({'simulation.ray_num_cpus' if sim.ray_num_cpus else 'this machine'}): no client could start; "
                f"use simulation.num_cpus <= {cpus}"
            )
        if sim.num_gpus > 0:
            import torch

            gpus = torch.cuda.device_count()
            if sim.num_gpus > gpus:
                raise ConfigError(
                    f"simulation.num_gpus={sim.num_gpus:g} per client but this machine has {gpus} GPUs: no client "
                    f"could start; use simulation.num_gpus <= {gpus}"
                )
        return
    address = sim.ray_address
    if address == "auto":
        try:
            address = Path("/tmp/ray/ray_current_cluster").read_text().strip()
        except OSError:
            raise ConfigError("simulation.ray_address=auto: no running Ray cluster on this machine (ray start --head "
                              "starts one; leave ray_address empty for a local one)") from None
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"simulation.ray_address={sim.ray_address!r}: expected host:port or auto")
    try:
        socket.create_connection((host, int(port)), timeout=RAY_CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise ConfigError(
            f"simulation.ray_address={sim.ray_address!r}: no Ray cluster answers at {host}:{port} within "
            f"{RAY_CONNECT_TIMEOUT_S:g} s ({exc.strerror or exc}); check the address or leave it empty"
        ) from None
    why = ray_endpoint_problem(host, int(port), client=address.startswith("ray://"))
    if why:
        raise ConfigError(
            f"simulation.ray_address={sim.ray_address!r}: {host}:{port} accepts connections but is not a Ray "
            f"{'client server' if address.startswith('ray://') else 'cluster (GCS)'} ({why}); ray.init would retry "
            "it without end: check the address and port (ray status prints them) or leave it empty"
        )


RAY_PROBE_TIMEOUT_S = 5.0


def ray_endpoint_problem(host: str, port: int, *, client: bool = False) -> str | None:
    """Why ``host:port`` is not a Ray endpoint, or None when it answers as one, within RAY_PROBE_TIMEOUT_S.

    A cluster address is Ray's GCS: it must answer the GCS's own ``NodeInfoGcsService.GetClusterId`` call
    (Ray's generated gRPC stub). A ``ray://`` address is a Ray Client server: it must at least complete a
    gRPC (HTTP/2) handshake. Anything else listening there (a web server, a database) fails either check,
    where ``ray.init`` would retry it for minutes."""
    import grpc

    try:  # Ray's own generated stubs; a Ray without them gets the handshake check only
        from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub
        request = gcs_service_pb2.GetClusterIdRequest
    except (ImportError, AttributeError):
        client = True
    channel = grpc.insecure_channel(f"{host}:{port}")
    try:
        if client:
            grpc.channel_ready_future(channel).result(timeout=RAY_PROBE_TIMEOUT_S)
            return None
        stub(channel).GetClusterId(request(), timeout=RAY_PROBE_TIMEOUT_S)
        return None
    except grpc.FutureTimeoutError:
        return f"no gRPC handshake within {RAY_PROBE_TIMEOUT_S:g} s"
    except grpc.RpcError as exc:
        code = exc.code()
        return f"no answer to Ray's GetClusterId call: {code.name if code else 'error'}"
    finally:
        channel.close()


def run_flower_simulation(server_app: ServerApp, client_app, cfg: RunConfig, num_supernodes: int, *,
                          ray_init: dict[str, Any] | None = None) -> None:
    """The one call into Flower's (deprecated) simulation entry point (``ray_init``: more ``ray.init``
    arguments, over the config's; the benchmarks tune what Flower exposes with it)."""
    from flwr.simulation import run_simulation

    check_engine_resources(cfg)
    # Ray's accelerator-env warning for num_gpus=0 is noise on CPU machines.
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    init_args: dict[str, Any] = {"log_to_driver": False, "logging_level": "ERROR"}
    if cfg.simulation.ray_address:
        init_args["address"] = cfg.simulation.ray_address
    elif cfg.simulation.ray_num_cpus:
        init_args["num_cpus"] = cfg.simulation.ray_num_cpus
    init_args.update(ray_init or {})
    backend_config = {
        "client_resources": {"num_cpus": cfg.simulation.num_cpus, "num_gpus": cfg.simulation.num_gpus},
        "init_args": init_args,
    }
    import torch


    threads = torch.get_num_threads()  # serial_torch_in_driver sets 1 after round 0
    try:
        with fast_message_poll():  # Flower's engine polls every node for messages, 10 times a second: see there
            run_simulation(
                server_app=server_app,
                client_app=client_app,
                num_supernodes=num_supernodes,
                backend_config=backend_config,
                verbose_logging=False,
            )
    finally:
        torch.set_num_threads(threads)


class _DropDeprecation(logging.Filter):
    """run_simulation's deprecation notice: fl-sim knows, and keeps the call in one place."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "DEPRECATED FEATURE" not in record.getMessage() and "deprecated feature" not in record.getMessage()


def quiet_flower(level: str) -> None:
    lvl = getattr(logging, level.upper(), logging.WARNING)
    for name in ("flwr", "ray"):
        logger = logging.getLogger(name)
        logger.setLevel(lvl)
        if not any(isinstance(f, _DropDeprecation) for f in logger.filters):
            logger.addFilter(_DropDeprecation())
