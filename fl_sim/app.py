"""The Flower App entry points (``flwr run .``): ``server_app`` and ``client_app``.

``[tool.flwr.app.config]`` in pyproject.toml maps onto the fl-sim config:

* ``config``: a path or the name of a file in configs/ (default "quickstart");
* ``rounds``, ``seed``: override the config's values (0 / -1 mean "keep the config's");
* ``overrides``: space-separated ``key.sub=value`` items, as ``fl-sim run --set``.

``flwr run . --run-config "rounds=5 overrides='train.lr=0.1'"`` overrides them. In a deployment the
nodes are the clients: each reads its partition from ``node_config['partition-id']`` unless the
strategy names a virtual client in the message.
"""

from __future__ import annotations

import shlex
from functools import lru_cache

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fl_sim.runs.build import build_experiment, build_strategy
from fl_sim.clients.app import make_client_app
from fl_sim.config import RunConfig, load_config
from fl_sim.runs.results import RunRecorder
from fl_sim.config import config_to_dict
from fl_sim.runs.simulation import default_run_dir, server_loop

__all__ = ["server_app", "client_app", "config_from_run_config"]


@lru_cache(maxsize=8)
def _load(config: str, rounds: int, seed: int, overrides: str) -> RunConfig:
    items = shlex.split(overrides)
    if rounds > 0:
        items.append(f"rounds={rounds}")
    if seed >= 0:
        items.append(f"seed={seed}")
    return load_config(config or None, items)


def config_from_run_config(context: Context) -> RunConfig:
    """The fl-sim config described by a Flower run config."""
    rc = context.run_config
    return _load(
        str(rc.get("config", "quickstart")),
        int(rc.get("rounds", 0)),
        int(rc.get("seed", -1)),
        str(rc.get("overrides", "")),
    )


server_app = ServerApp()


@server_app.main()
def _server_main(grid: Grid, context: Context) -> None:
    cfg = config_from_run_config(context)
    exp = build_experiment(cfg)
    strategy = build_strategy(exp)
    recorder = RunRecorder(default_run_dir(cfg), config_to_dict(cfg))

    def progress(rnd: int, row: dict) -> None:
        acc = row.get("test_accuracy")
        if acc is not None:
            print(f"[fl-sim] round {rnd}: test accuracy {acc:.4f}", flush=True)

    server_loop(grid, exp, strategy, recorder, progress)
    summary = recorder.finish({"strategy": cfg.strategy.name})
    print(f"[fl-sim] final test accuracy {summary['final_test_accuracy']} -> {recorder.run_dir}", flush=True)


client_app = make_client_app(config_from_run_config)
