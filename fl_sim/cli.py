"""The ``fl-sim`` command line: run | report | sweep | compare | bench | reproduce.

User errors (bad config, missing data, bad arguments) print one line and exit with code 2, never a
traceback; ``--debug`` shows the traceback for bug reports.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

# Tracebacks of bugs stay readable: no local variables (a run's locals print as 100,000 lines).
app = typer.Typer(add_completion=False, no_args_is_help=False, help="Federated-learning simulation on Flower.",
                  pretty_exceptions_show_locals=False)
console = Console(stderr=True)
out = Console()

# OSError covers FileNotFoundError, a --out that is a file, read-only or full disks: one line naming the path.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, KeyError, MemoryError)


def error_line(exc: BaseException) -> str:
    """The one line a user error prints: its message's first line, and for an OSError the path."""
    if isinstance(exc, OSError) and exc.strerror:
        where = exc.filename if exc.filename is not None else "(path unknown)"
        more = f" -> {exc.filename2}" if exc.filename2 is not None else ""
        return f"{where}{more}: {exc.strerror}"
    text = str(exc).strip()
    if isinstance(exc, KeyError) and len(exc.args) == 1:
        text = str(exc.args[0])
    return text.splitlines()[0] if text else type(exc).__name__


def _fail(exc: BaseException, debug: bool, code: int = 2) -> None:
    if debug:
        raise exc
    # soft_wrap: one line even when stderr is not a terminal (rich would wrap it at 80 columns)
    console.print(f"[bold red]error:[/] {_escape(error_line(exc))}", highlight=False, markup=True, soft_wrap=True)
    raise typer.Exit(code=code)


def _fail_unexpected(exc: Exception, debug: bool) -> None:
    """An exception no check anticipated: one line naming it, exit 1; ``--debug`` shows the traceback."""
    import click

    if debug or isinstance(exc, (click.exceptions.Exit, click.exceptions.Abort, click.ClickException)):
        raise exc
    console.print(f"[bold red]error:[/] {_escape(type(exc).__name__)}: {_escape(error_line(exc))} (an unexpected "
                  "failure: rerun with --debug for the traceback and report it)", highlight=False, markup=True,
                  soft_wrap=True)
    raise typer.Exit(code=1)


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


@app.command()
def run(
    config: Optional[str] = typer.Argument(None, help="YAML config (default: configs/quickstart.yaml)."),
    set_: List[str] = typer.Option([], "--set", help="Override a key: --set train.lr=0.1 (repeatable)."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Run directory (default: runs/<name>-<time>)."),
    resume: Optional[Path] = typer.Option(
        None, "--resume", help="Continue the interrupted run in DIR from its last checkpoint (DIR/config.yaml)."
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace the run already in --out DIR (without it such a DIR is refused)."
    ),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Run one experiment; writes config.yaml, metrics.csv and summary.json to the run directory.

    With ``--resume DIR``: the config is DIR/config.yaml (a CONFIG or ``--set`` may only change how
    the run executes, e.g. simulation.backend); it restarts after the newest checkpoint in DIR.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from fl_sim.runs.simulation import RunFailed
    from fl_sim.strategies.secagg import SecAggError

    run_dir = cfg = None
    try:
        from fl_sim.config import load_config

        if resume is not None:
            if not (resume / "config.yaml").is_file():
                raise FileNotFoundError(f"--resume {resume}: no config.yaml there (is it an fl-sim run directory?)")
            if out_dir is not None and out_dir.resolve() != resume.resolve():
                raise ValueError(f"--out {out_dir} and --resume {resume}: a resumed run stays in its directory")
            if overwrite:
                raise ValueError("--overwrite and --resume: a resumed run continues its directory, it replaces nothing")
        cfg = load_config(config if config is not None or resume is None else resume / "config.yaml", set_)
        from fl_sim.runs.simulation import default_run_dir, run_experiment

        run_dir = resume or out_dir or default_run_dir(cfg)
        with Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        ) as progress:
            starting = {"ray": "starting Flower's engine (Ray)", "inline": "starting (inline)",
                        "vectorized": "starting (vectorized)"}.get(cfg.simulation.backend, "starting")
            task = progress.add_task(cfg.name or cfg.strategy.name, total=cfg.rounds, status=starting)

            def on_round(rnd: int, row: dict) -> None:
                acc = row.get("test_accuracy")
                status = f"acc {acc:.3f}" if isinstance(acc, float) else ""
                progress.update(task, completed=rnd, status=status)

            summary = run_experiment(cfg, run_dir, on_round, resume=resume is not None, overwrite=overwrite)
    except KeyboardInterrupt:
        if run_dir is not None and cfg is not None and cfg.checkpoint_every:
            console.print(f"interrupted: the checkpoints in {run_dir} are kept; continue with fl-sim run --resume "
                          f"{run_dir}", highlight=False, soft_wrap=True)
        raise
    except (RunFailed, SecAggError) as exc:  # a dead Ray worker, no round changed the model, a SecAgg+ round
        # below its threshold (secagg.on_failure: raise): exit 1, not 0
        _fail(exc, debug, code=1)
        return
    except USER_ERRORS as exc:
        _fail(exc, debug)
        return
    except Exception as exc:  # noqa: BLE001 - never a traceback without --debug
        _fail_unexpected(exc, debug)
        return
    acc = summary.get("final_test_accuracy")
    out.print(f"model {cfg.model.name}: {summary.get('parameters', 0):,} parameters; "
              f"{summary.get('clients_with_data', cfg.clients)} of {cfg.clients} clients have data")
    out.print(
        f"final test accuracy {acc:.4f}, uplink {summary['total_uplink_bits']:.3e} bits, "
        f"{summary['wall_s']:.1f} s -> {summary['run_dir']}"
        if acc is not None
        else f"done -> {summary['run_dir']}"
    )


@app.command()
def report(
    run_dirs: List[Path] = typer.Argument(..., help="Run directories."),
    out_dir: Path = typer.Option(Path("report"), "--out", help="Where to write the PNG plots and report.csv."),
    baseline: Optional[str] = typer.Option(None, "--baseline", help="Run name to use as the reference."),
    debug: bool = typer.Option(False, "--debug"),
) -> None:
    """Table of runs and PNG plots (accuracy vs round, vs cumulative uplink bits)."""
    from fl_sim.runs.results import report as make_report

    try:
        rows, plots = make_report(run_dirs, out_dir, baseline=baseline)
    except USER_ERRORS as exc:
        _fail(exc, debug)
        return
    except Exception as exc:  # noqa: BLE001 - never a traceback without --debug
        _fail_unexpected(exc, debug)
        return
    table = Table(title="fl-sim runs")
    for col in rows[0]:
        table.add_column(col)
    for r in rows:
        table.add_row(*[_fmt(v) for v in r.values()])
    out.print(table)
    for p in plots:
        out.print(f"wrote {p}")


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
    if isinstance(v, int) and abs(v) >= 1e5:
        return f"{v:.3e}"
    return str(v)


@app.command()
def sweep(
    config: Optional[str] = typer.Argument(None, help="YAML config the grid modifies."),
    grid: List[str] = typer.Option([], "--grid", help="key.sub=v1,v2,... (repeatable; the cartesian product runs)."),
    repeats: int = typer.Option(1, "--repeats", help="Seeds per point (seed, seed+1, ...)."),
    set_: List[str] = typer.Option([], "--set", help="Fixed overrides for every point."),
    out_dir: Path = typer.Option(Path("runs/sweep"), "--out", help="Sweep directory (resumable)."),
    debug: bool = typer.Option(False, "--debug"),
) -> None:
    """Run a grid of configs (resuming finished points); writes sweep.csv and PNG plots."""
    from fl_sim.experiments.sweep import run_sweep

    try:
        rows = run_sweep(config, grid, out_dir, repeats=repeats, overrides=set_,
                         on_point=lambda name, what: console.print(f"[bold]{name}[/] {what}"))
    except USER_ERRORS as exc:
        _fail(exc, debug)
        return
    except Exception as exc:  # noqa: BLE001 - never a traceback without --debug
        _fail_unexpected(exc, debug)
        return
    out.print(f"{len(rows)} runs -> {out_dir / 'sweep.csv'}")


bench_app = typer.Typer(help="Benchmarks (figures measured side by side in one run); each module in fl_sim/bench. "
                        "--smoke: tiny sizes, what the test suite runs (figures meaningless).")
app.add_typer(bench_app, name="bench")

SMOKE_HELP = "Tiny sizes (what the test suite runs): checks the benchmark end to end; figures meaningless."


def _bench_module(name: str):
    """fl_sim.bench.<name> (installed with fl-sim)."""
    import importlib

    return importlib.import_module(f"fl_sim.bench.{name}")


_BENCH_OPTIONS = {"debug": False}


@bench_app.callback()
def bench_options(debug: bool = typer.Option(False, "--debug", help="Show tracebacks (fl-sim bench --debug NAME ...).")) -> None:
    _BENCH_OPTIONS["debug"] = debug


def _run_bench(name: str, argv: list[str]) -> None:
    """fl_sim.bench.<name>.main(argv); a user error (bad config, unwritable --out) is one line and exit code 2."""
    try:
        _bench_module(name).main(argv)
    except (ValueError, OSError) as exc:
        _fail(exc, debug=_BENCH_OPTIONS["debug"])


@bench_app.command("wire")
def bench_wire(
    d: int = typer.Option(100_000, "--d", help="Update length (two tensors, 60% + 40%)."),
    repeats: int = typer.Option(20, "--repeats", help="Best of this many pack / unpack timings."),
    out_path: Path = typer.Option(Path("bench_out/wire.json"), "--out"),
    markdown: bool = typer.Option(False, "--markdown", help="Print the table as markdown."),
    smoke: bool = typer.Option(False, "--smoke", help=SMOKE_HELP),
) -> None:
    """Per codec: the bits it counts, the bytes its reply carries, Flower's framing, pack/unpack times."""
    argv = ["--d", str(d), "--repeats", str(repeats), "--out", str(out_path)] + ["--markdown"] * markdown
    _run_bench("bench_wire", argv + ["--smoke"] * smoke)


@bench_app.command("codecs")
def bench_codecs(
    quick: bool = typer.Option(False, "--quick", help="Fewer sizes."),
    targets: bool = typer.Option(False, "--targets", help="Only the speed targets (fwht, count sketch, FIHT), ~30 s."),
    no_others: bool = typer.Option(False, "--no-others", help="Skip the transforms and recovery benchmarks."),
    smoke: bool = typer.Option(False, "--smoke", help=SMOKE_HELP),
    out_path: Path = typer.Option(Path("bench_out/codecs.json"), "--out"),
) -> None:
    """Encode/decode times of every codec and their ratio to an FFT of the same length."""
    argv = ["--out", str(out_path)] + ["--quick"] * quick + ["--targets"] * targets + ["--no-others"] * no_others
    _run_bench("bench_codecs", argv + ["--smoke"] * smoke)


@bench_app.command("transforms")
def bench_transforms(
    quick: bool = typer.Option(False, "--quick", help="Fewer sizes and repeats."),
    smoke: bool = typer.Option(False, "--smoke", help=SMOKE_HELP),
    out_path: Path = typer.Option(Path("bench_out/transforms.json"), "--out"),
) -> None:
    """FWHT against torch.fft.rfft, the DCT at d = 668,426, and the projection operators' forward/adjoint."""
    _run_bench("bench_transforms", ["--out", str(out_path)] + ["--quick"] * quick + ["--smoke"] * smoke)


@bench_app.command("recovery")
def bench_recovery(
    quick: bool = typer.Option(False, "--quick", help="Sizes 10x smaller, one repeat."),
    only: str = typer.Option("all", "--only", help="all, count_sketch or fiht."),
    smoke: bool = typer.Option(False, "--smoke", help=SMOKE_HELP),
    out_path: Path = typer.Option(Path("bench_out/recovery.json"), "--out"),
) -> None:
    """Count Sketch at FetchSGD's size and FIHT at Tang et al.'s, each against an FFT of the same length."""
    argv = ["--only", only, "--out", str(out_path)] + ["--quick"] * quick + ["--smoke"] * smoke
    _run_bench("bench_recovery", argv)


@bench_app.command("fidelity")
def bench_fidelity(
    trials: int = typer.Option(200, "--trials", help="Encode seeds per relative MSE."),
    smoke: bool = typer.Option(False, "--smoke", help=SMOKE_HELP),
    out_path: Path = typer.Option(Path("bench_out/fidelity.json"), "--out"),
) -> None:
    """Codec fidelity (no timing): per-tensor vs whole-vector scales, QSGD's Elias bits, TernGrad's clipping."""
    _run_bench("bench_codec_fidelity", ["--trials", str(trials), "--out", str(out_path)] + ["--smoke"] * smoke)


@bench_app.command("encoding")
def bench_encoding(
    methods: str = typer.Option("topk_ef,qcs", "--methods", help="Shipped configs, comma-separated."),
    per_round: str = typer.Option("100,1000", "--per-round", help="Clients per round, comma-separated."),
    store: str = typer.Option("disk,context", "--store", help="Residual stores: disk and/or context."),
    rounds: int = typer.Option(3, "--rounds", help="Rounds per point; the first is not timed."),
    threads: int = typer.Option(0, "--threads", help="Torch threads (0: torch's default)."),
    smoke: bool = typer.Option(False, "--smoke", help=SMOKE_HELP),
    out_path: Path = typer.Option(Path("bench_out/encoding.json"), "--out"),
) -> None:
    """The client-side encoding stage of a round: per reply (compression_mod) against one block (cohort_encode)."""
    argv = ["--methods", methods, "--per-round", per_round, "--store", store, "--rounds", str(rounds),
            "--threads", str(threads), "--out", str(out_path)]
    _run_bench("bench_encoding", argv + ["--smoke"] * smoke)


@bench_app.command("memory-flat")
def bench_memory_flat(
    backend: str = typer.Option("ray", "--backend", help="ray and/or inline, comma-separated (each in its own process)."),
    rounds: int = typer.Option(200, "--rounds"),
    clients: int = typer.Option(200, "--clients"),
    per_round: int = typer.Option(20, "--per-round"),
    set_: List[str] = typer.Option([], "--set", help="Config override (repeatable)."),
    smoke: bool = typer.Option(False, "--smoke", help=SMOKE_HELP),
    out_path: Path = typer.Option(Path("bench_out/memory_flat.json"), "--out"),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write the per-round memory PNG here."),
) -> None:
    """Process-tree memory at every round of a long run of top-k + error feedback (flat after warm-up)."""
    argv = ["--backend", backend, "--rounds", str(rounds), "--clients", str(clients), "--per-round", str(per_round),
            "--out", str(out_path)] + [x for s in set_ for x in ("--set", s)]
    argv += (["--plot", str(plot)] if plot else []) + ["--smoke"] * smoke
    _run_bench("bench_memory_flat", argv)


@bench_app.command("fiht-vs-sketch")
def bench_fiht_vs_sketch(
    steps: int = typer.Option(60, "--steps", help="Update vectors in the stream."),
    smoke: bool = typer.Option(False, "--smoke", help=SMOKE_HELP),
    out_path: Optional[Path] = typer.Option(None, "--out", help="Also write the rows as JSON here."),
) -> None:
    """How much of a stream of updates reaches the model through FIHT-CS and Count Sketch with each residual rule."""
    argv = ["--steps", str(steps)] + (["--out", str(out_path)] if out_path else []) + ["--smoke"] * smoke
    _run_bench("fiht_vs_sketch_ef", argv)


@bench_app.command("secagg")
def bench_secagg(
    clients: str = typer.Option("10,100,1000", "--clients", help="Clients per round, comma-separated."),
    dim: int = typer.Option(10_000, "--dim", help="Float32 payload entries per client."),
    full_up_to: int = typer.Option(30, "--full-up-to", help="Also the complete graph up to this many clients."),
    drop: float = typer.Option(0.0, "--drop", help="Fraction of clients dropping after sharing keys."),
    smoke: bool = typer.Option(False, "--smoke", help=SMOKE_HELP),
    out_path: Path = typer.Option(Path("bench_out/secagg.json"), "--out"),
) -> None:
    """SecAgg+ protocol bits and wall time per round at growing numbers of clients (log n neighbours)."""
    argv = ["--clients", clients, "--dim", str(dim), "--full-up-to", str(full_up_to), "--drop", str(drop),
            "--out", str(out_path)] + ["--smoke"] * smoke
    _run_bench("bench_secagg", argv)


@bench_app.command("round")
def bench_round(
    workloads: str = typer.Option("quickstart,lenet", "--workloads", help="quickstart, lenet and/or digits."),
    per_round: str = typer.Option("10,100", "--per-round", help="Clients per round, comma-separated."),
    modes: str = typer.Option("plain,inline,ray", "--modes",
                              help="plain (PyTorch loop), inline, auto (what `fl-sim run` picks), vectorized, "
                                   "vectorized-1t (one thread), vectorized-nt (one thread per core), ray."),
    rounds: int = typer.Option(0, "--rounds", help="Rounds per run (0: 6 quickstart, 4 lenet)."),
    repeats: int = typer.Option(2, "--repeats", help="Side-by-side repeats (modes alternate who goes first)."),
    num_cpus: str = typer.Option("1", "--num-cpus", help="simulation.num_cpus values for ray, e.g. 0.5,1,2."),
    profile: bool = typer.Option(False, "--profile", help="Also where a round's time goes."),
    what_if: bool = typer.Option(False, "--what-if", help="Also inline runs with the proposed fixes patched in."),
    tune: bool = typer.Option(False, "--tune", help="Also Ray with 0.5/1/2 CPUs per actor."),
    quick: bool = typer.Option(False, "--quick", help="quickstart only, one repeat."),
    scale: bool = typer.Option(False, "--scale", help="Also 10,000 quickstart clients, 10% a round, 50 rounds, "
                               "vectorized (time, peak memory)."),
    contention: str = typer.Option("off", "--contention", help="CPU-bound processes beside each run: off, on, or "
                                   "both (idle and busy side by side)."),
    busy_per_cores: int = typer.Option(2, "--busy-per-cores", help="Contention: one busy process per this many cores."),
    smoke: bool = typer.Option(False, "--smoke", help=SMOKE_HELP + " Plain and inline, no Ray."),
    out_path: Path = typer.Option(Path("bench_out/round.json"), "--out"),
) -> None:
    """R rounds of FedAvg through fl-sim (ray, inline, vectorized) against the same computation as a plain PyTorch loop."""
    argv = ["--workloads", workloads, "--per-round", per_round, "--modes", modes, "--rounds", str(rounds),
            "--repeats", str(repeats), "--num-cpus", num_cpus, "--out", str(out_path)]
    argv += ["--profile"] * profile + ["--what-if"] * what_if + ["--tune"] * tune + ["--quick"] * quick
    argv += ["--scale"] * scale + ["--smoke"] * smoke
    argv += ["--contention", contention, "--busy-per-cores", str(busy_per_cores)]
    _run_bench("bench_round", argv)


@bench_app.command("messages")
def bench_messages(
    workload: str = typer.Option("quickstart", "--workload", help="quickstart (MLP) or lenet (LeNet-5)."),
    number: int = typer.Option(2000, "--number", help="Calls per timing."),
    repeat: int = typer.Option(5, "--repeat", help="Timings per step (the minimum is reported)."),
    smoke: bool = typer.Option(False, "--smoke", help=SMOKE_HELP),
    out_path: Path = typer.Option(Path("bench_out/messages.json"), "--out"),
) -> None:
    """One reply's record building and checks, step by step, labelled fl-sim or Flower (us per reply)."""
    argv = ["--workload", workload, "--number", str(number), "--repeat", str(repeat), "--out", str(out_path)]
    _run_bench("bench_messages", argv + ["--smoke"] * smoke)


@bench_app.command("pfl")
def bench_pfl(
    per_round: str = typer.Option("10,100", "--per-round", help="Clients per round, comma-separated."),
    rounds: int = typer.Option(12, "--rounds"),
    processes: str = typer.Option("1,2", "--processes", help="pfl worker processes, e.g. 1,2."),
    fl_sim_modes: str = typer.Option("vectorized,inline", "--fl-sim-modes", help="fl-sim backends run beside pfl."),
    contention: str = typer.Option("off", "--contention", help="off, on or both (a busy process beside each run)."),
    repeats: int = typer.Option(2, "--repeats"),
    timeout: float = typer.Option(600.0, "--timeout", help="Seconds per measurement."),
    smoke: bool = typer.Option(False, "--smoke", help=SMOKE_HELP),
    out_path: Path = typer.Option(Path("bench_out/pfl.json"), "--out"),
) -> None:
    """pfl-research (a peer, in this Python's environment) beside fl-sim on the quickstart; skips without pfl."""
    argv = ["--per-round", per_round, "--rounds", str(rounds), "--processes", processes, "--fl-sim-modes", fl_sim_modes,
            "--contention", contention, "--repeats", str(repeats), "--timeout", str(timeout), "--out", str(out_path)]
    _run_bench("bench_pfl", argv + ["--smoke"] * smoke)


@bench_app.command("poisoning")
def bench_poisoning(
    table: str = typer.Option("all", "--table", help="zero (one all-zero client a round), inner (inner strategies "
                              "under sign-flipping attackers) or all."),
    rounds: int = typer.Option(None, "--rounds", help="Default: 40 (zero), 30 (inner), 3 with --smoke."),
    smoke: bool = typer.Option(False, "--smoke", help=SMOKE_HELP),
    out_path: Path = typer.Option(Path("bench_out/poisoning.json"), "--out"),
) -> None:
    """The README's poisoning figures (final accuracy under attack, not speed): what the guards catch."""
    argv = ["--table", table, "--out", str(out_path)] + (["--rounds", str(rounds)] if rounds is not None else [])
    _run_bench("bench_poisoning", argv + ["--smoke"] * smoke)


@bench_app.command("plain-loop")
def bench_plain_loop(
    config: Optional[str] = typer.Argument(None, help="A FedAvg config (default: quickstart)."),
    set_: List[str] = typer.Option([], "--set", help="Override a key (repeatable)."),
    threads: int = typer.Option(1, "--threads", help="Torch threads (1: as one fl-sim client process)."),
    smoke: bool = typer.Option(False, "--smoke", help=SMOKE_HELP),
    out_path: Path = typer.Option(Path("bench_out/plain_loop.json"), "--out"),
) -> None:
    """FedAvg as a plain sequential PyTorch loop (bench round's reference): round times and test metrics."""
    argv = [config or "quickstart", "--threads", str(threads), "--out", str(out_path)]
    argv += [x for s in set_ for x in ("--set", s)] + ["--smoke"] * smoke
    _run_bench("plain_loop", argv)


@bench_app.command("scale")
def bench_scale(
    clients: str = typer.Option("100,1000,10000,100000", "--clients", help="Population sizes, comma-separated."),
    nodes: str = typer.Option("clients", "--nodes", help="SuperNodes: clients (as fl-sim run) or per_round."),
    backend: str = typer.Option("ray", "--backend", help="ray or inline."),
    rounds: int = typer.Option(4, "--rounds"),
    config: Optional[str] = typer.Option(None, "--config", help="Measure this config instead (e.g. configs/scale_10k.yaml)."),
    set_: List[str] = typer.Option([], "--set", help="Override for --config (repeatable)."),
    fabricate: Optional[str] = typer.Option(None, "--fabricate", help="cifar10 | mnist: fake data of the real size for --config."),
    timeout: float = typer.Option(300.0, "--timeout", help="Seconds per measurement."),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help="Where the curve's fabricated MNIST goes (default: temp dir)."),
    smoke: bool = typer.Option(False, "--smoke", help=SMOKE_HELP + " Inline, 4 clients."),
    out_path: Path = typer.Option(Path("bench_out/scale.json"), "--out"),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write the per-round time/memory curves PNG here."),
    plot_only: bool = typer.Option(False, "--plot-only", help="Only redraw --plot from --out."),
) -> None:
    """Per-round time and peak memory (whole process tree) from 100 to 100,000 clients, or of one config."""
    argv = ["--clients", clients, "--nodes", nodes, "--backend", backend, "--rounds", str(rounds),
            "--timeout", str(timeout), "--out", str(out_path)]
    if config:
        argv += ["--config", config] + [x for s in set_ for x in ("--set", s)]
        argv += ["--fabricate", fabricate] if fabricate else []
    argv += ["--plot", str(plot)] if plot else []
    argv += (["--data-root", str(data_root)] if data_root else []) + ["--smoke"] * smoke + ["--plot-only"] * plot_only
    _run_bench("bench_scale", argv)


@bench_app.command("ray-profile")
def bench_ray_profile(
    workload: str = typer.Option("lenet", "--workload", help="A bench round workload: quickstart, lenet or digits."),
    per_round: int = typer.Option(100, "--per-round"),
    rounds: int = typer.Option(4, "--rounds"),
    num_cpus: float = typer.Option(1.0, "--num-cpus", help="simulation.num_cpus (CPUs per actor)."),
    env: List[str] = typer.Option([], "--env", help="K=V,... for one run; repeat for an A/B (runs alternate)."),
    repeats: int = typer.Option(1, "--repeats"),
    py_spy: float = typer.Option(0.0, "--py-spy", help="Seconds of py-spy on one process from round 2."),
    py_spy_target: str = typer.Option("actor", "--py-spy-target", help="actor, driver or raylet."),
    poll_micro: Optional[str] = typer.Option(None, "--poll-micro", help="Only time Flower's message extractor, "
                                             "NODESxMESSAGES,... e.g. 100x100,1000x100."),
    timeout: float = typer.Option(600.0, "--timeout", help="Seconds per measurement."),
    smoke: bool = typer.Option(False, "--smoke", help="The test suite's run: --poll-micro 10x10 only (the profile "
                               "itself starts a Ray cluster)."),
    out_path: Optional[Path] = typer.Option(None, "--out", help="Also write the results as JSON here."),
) -> None:
    """Where the CPU of a Ray round goes, per process and per thread (Flower's Ray backend, /proc)."""
    argv = ["--workload", workload, "--per-round", str(per_round), "--rounds", str(rounds), "--num-cpus", str(num_cpus),
            "--repeats", str(repeats), "--py-spy", str(py_spy), "--py-spy-target", py_spy_target,
            "--timeout", str(timeout)] + [x for e in env for x in ("--env", e)]
    argv += (["--poll-micro", poll_micro] if poll_micro else []) + (["--out", str(out_path)] if out_path else [])
    _run_bench("ray_profile", argv + ["--smoke"] * smoke)


@app.command()
def reproduce(
    name: Optional[str] = typer.Argument(None, help="Experiment in configs/papers/ (see --list) or a YAML path."),
    full: bool = typer.Option(False, "--full", help="The full version (real data, more rounds) instead of the reduced one."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Output directory (default: runs/reproduce/NAME[-full])."),
    list_: bool = typer.Option(False, "--list", help="List the experiments and exit."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace other results already in --out DIR (without it such a DIR is refused)."
    ),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Reproduce a paper experiment: CSV + PNG per part and summary.json (docs/reproductions.md)."""
    from fl_sim.experiments.reproduce import list_experiments, reproduce as run_reproduction

    if list_ or name is None:
        table = Table(title="fl-sim reproduce NAME [--full]")
        for col in ("name", "kind", "title"):
            table.add_column(col)
        for row in list_experiments():
            table.add_row(*row)
        out.print(table)
        return
    try:
        summary = run_reproduction(name, full=full, out=out_dir, overwrite=overwrite,
                                   progress=lambda msg: console.print(msg))
    except USER_ERRORS as exc:
        _fail(exc, debug)
        return
    except Exception as exc:  # noqa: BLE001 - never a traceback without --debug
        _fail_unexpected(exc, debug)
        return
    where = out_dir or Path("runs") / "reproduce" / (summary["experiment"] + ("-full" if full else ""))
    out.print(f"{summary['experiment']} ({summary['version']}) done in {summary['wall_s']:.1f} s -> {where}")


def _shutdown_ray(timeout_s: float = 10.0) -> None:
    """Stop a local Ray cluster this process started, waiting at most ``timeout_s``."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return
    import threading

    t = threading.Thread(target=ray.shutdown, daemon=True)
    t.start()
    t.join(timeout_s)
@app.command()
def compare(
    suite: Optional[Path] = typer.Argument(None, help="Suite YAML (default: configs/compare/suite.yaml)."),
    task: str = typer.Option("all", "--task", help="dense, image (a task of the suite) or all."),
    methods: str = typer.Option("", "--methods", help="Comma-separated subset of the suite's methods (must include the baseline)."),
    seeds: Optional[int] = typer.Option(None, "--seeds", help="Reported seeds (default: the suite's, 3)."),
    jobs: int = typer.Option(1, "--jobs", help="Worker processes running runs in parallel."),
    out_dir: Path = typer.Option(Path("runs/compare"), "--out", help="Run directories (resumable)."),
    docs: Path = typer.Option(Path("docs/comparison"), "--docs", help="Where runs.csv, summary.md/csv, tuning.md/csv, pareto.png go."),
    backend: Optional[str] = typer.Option(None, "--backend", help="simulation.backend of every run (default: the suite's)."),
    set_: List[str] = typer.Option([], "--set", help="Override for every run, e.g. --set rounds=2 (repeatable)."),
    report_only: bool = typer.Option(False, "--report-only", help="Aggregate the finished runs only; run nothing."),
    debug: bool = typer.Option(False, "--debug"),
) -> None:
    """Tune every method on validation data (equal budget), run the chosen settings over seeds, tabulate (fl_sim/experiments/compare/)."""
    from fl_sim.experiments.compare import run_compare

    try:
        result = run_compare(suite, tasks=[t.strip() for t in task.split(",") if t.strip()],
                             methods=[m.strip() for m in methods.split(",") if m.strip()] or None, seeds=seeds,
                             jobs=jobs, out=out_dir, docs=docs, extra=set_, backend=backend, report_only=report_only,
                             progress=lambda msg: console.print(msg, highlight=False))
    except USER_ERRORS as exc:
        _fail(exc, debug)
        return
    except Exception as exc:  # noqa: BLE001 - never a traceback without --debug
        _fail_unexpected(exc, debug)
        return
    for f in result["failures"]:
        console.print(f"[bold red]failed:[/] {f}", highlight=False)
    out.print(f"{len(result['runs'])} reported runs, targets "
              + ", ".join(f"{t} {v:.3f}" for t, v in result["targets"].items()) + f" -> {docs}")


def _lingering_threads() -> list:
    """Threads other than this one that the interpreter would wait for at exit (Flower's ServerApp thread)."""
    import threading

    return [t for t in threading.enumerate() if t is not threading.current_thread() and t.is_alive() and not t.daemon]


def main() -> None:
    """The ``fl-sim`` entry point. Ctrl-C exits with 130 within seconds, on every backend.

    Typer turns a KeyboardInterrupt into ``SystemExit(130)``; a normal exit then waits for every non-daemon
    thread, and on the Ray backend Flower's ServerApp thread waits without end for replies that never come
    (the run went on for minutes after Ctrl-C). So an exit that leaves such a thread behind stops Ray
    (bounded) and leaves at once with its code; checkpoints are atomic files and stay.
    """
    try:
        app()
        code: int | str | None = 0
    except KeyboardInterrupt:
        code = 130
    except SystemExit as exc:
        code = exc.code
    if code == 130:
        console.print("interrupted")
    if not _lingering_threads():
        sys.exit(code)
    if not isinstance(code, int):  # sys.exit("message"): print it, exit 1
        if code is not None:
            console.print(str(code))
        code = 1 if code is not None else 0
    _shutdown_ray()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
