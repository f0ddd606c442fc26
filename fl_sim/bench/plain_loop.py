"""The reference of ``fl-sim bench round``: FedAvg as a plain sequential PyTorch loop in one process.

Same computation as ``fl-sim run`` with strategy ``fedavg`` ([McMahan-2017], Algorithm 1):

* the same clients and data: ``fl_sim.data.load_federated`` (index lists into one shared array);
* the same sampling: ``numpy_generator(seed, round, "sample-clients").choice(eligible, k, replace=False)``,
  sorted, as ``UpdateStrategy.sample``;
* the same model and initial weights: ``fl_sim.models.build_model(..., seed)``;
* the same local update: minibatch SGD on cross-entropy, shuffled by
  ``torch_generator(seed, round, "local-train", cid)``, E epochs of B-sized batches (or a fixed
  number of steps), as ``fl_sim.clients.training.train_local``;
* the same aggregation: w ← Σ_i (n_i / n) w_i over the sampled clients (n = Σ_i n_i), in client-id
  order;
* the same central evaluation: on the test set at round 0 and at the last round (``eval_every: 0``),
  every ``eval_every`` rounds otherwise.

No Flower, no messages, no records: the model is trained in place and its state dict is averaged.
The loop's result equals fl-sim's up to float32 rounding (the server there adds Σ w_i Δ_i to w);
``bench round`` reports the largest difference of the final weights.

Run alone (``fl-sim bench plain-loop [CONFIG] [--set K=V] [--out bench_out/plain_loop.json]`` or
``python -m fl_sim.bench.plain_loop``): the loop on a FedAvg config with an identity codec, its per-round
wall times and test metrics; ``--smoke``: 4 clients, 2 a round, 2 rounds (the test suite).

Also here: ``fabricate_mnist`` / ``fabricate_cifar10`` write an MNIST-format (torchvision's raw idx
layout) or CIFAR-10-format (python pickles) dataset of any size into a directory, so the LeNet-5
workload and the scale runs need no download.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fl_sim.config import RunConfig
from fl_sim.data import load_federated
from fl_sim.data.files import write_idx
from fl_sim.models import build_model
from fl_sim.rng import numpy_generator, torch_generator

__all__ = ["fabricate_mnist", "fabricate_cifar10", "plain_fedavg", "main"]

SMOKE_SET = ["clients=4", "clients_per_round=2", "rounds=2", "eval_every=0"]


def fabricate_mnist(root: str | Path, n_train: int, n_test: int = 1000, *, size: int = 28, seed: int = 0) -> Path:
    """Write <root>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte with learnable fake digits.

    Image of class c: a fixed random template of class c (pixel values 0..255) plus uniform noise,
    clipped; labels uniform over 10 classes. Returns ``root``. Existing files of the same shape are reused.
    """
    raw = Path(root) / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    stamp = raw / f".fabricated-{n_train}-{n_test}-{size}-{seed}"
    if stamp.exists():
        return Path(root)
    rng = np.random.default_rng(seed)
    templates = rng.integers(0, 200, size=(10, size, size), dtype=np.int16)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, size=n).astype(np.uint8)
        images = np.empty((n, size, size), dtype=np.uint8)
        for start in range(0, n, 50_000):  # bounded temporaries for large n
            sl = slice(start, start + 50_000)
            noise = rng.integers(0, 96, size=(len(labels[sl]), size, size), dtype=np.int16)
            images[sl] = np.clip(templates[labels[sl]] + noise, 0, 255).astype(np.uint8)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    for old in raw.glob(".fabricated-*"):
        old.unlink()
    stamp.touch()
    return Path(root)


def fabricate_cifar10(root: str | Path, n_train: int = 50_000, n_test: int = 1000, *, seed: int = 0) -> Path:
    """Write <root>/cifar-10-batches-py/{data_batch_1..5,test_batch} (torchvision's layout) of fake images.

    Same recipe as :func:`fabricate_mnist` (class template + noise) at 3x32x32; ``n_train`` is split
    over the five training batches. Returns ``root``; existing files of the same shape are reused.
    """
    import pickle

    base = Path(root) / "cifar-10-batches-py"
    base.mkdir(parents=True, exist_ok=True)
    stamp = base / f".fabricated-{n_train}-{n_test}-{seed}"
    if stamp.exists():
        return Path(root)
    rng = np.random.default_rng(seed)
    templates = rng.integers(0, 200, size=(10, 3072), dtype=np.int16)
    sizes = [len(a) for a in np.array_split(np.arange(n_train), 5)] + [n_test]
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name, n in zip(names, sizes):
        labels = rng.integers(0, 10, size=n)
        noise = rng.integers(0, 96, size=(n, 3072), dtype=np.int16)
        data = np.clip(templates[labels] + noise, 0, 255).astype(np.uint8)
        with open(base / name, "wb") as f:
            pickle.dump({"data": data, "labels": labels.tolist()}, f, protocol=4)
    for old in base.glob(".fabricated-*"):
        old.unlink()
    stamp.touch()
    return Path(root)


def _batches(n: int, batch_size: int, epochs: int, steps: int, generator: torch.Generator):
    """Index batches exactly as fl_sim.clients.training: shuffled epochs, or ``steps`` batches."""
    done = 0
    for _ in range(epochs if steps <= 0 else 1 << 30):
        perm = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            yield perm[start : start + batch_size]
            done += 1
            if 0 < steps == done:
                return


@torch.no_grad()
def _evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    model.eval()
    loss, correct = 0.0, 0
    for start in range(0, len(y), 1024):
        out = model(x[start : start + 1024])
        loss += float(nn.functional.cross_entropy(out, y[start : start + 1024], reduction="sum"))
        correct += int((out.argmax(1) == y[start : start + 1024]).sum())
    return loss / len(y), correct / len(y)


def plain_fedavg(cfg: RunConfig, *, threads: int = 1, progress=None) -> dict[str, Any]:
    """Run cfg.rounds rounds of FedAvg sequentially; returns times per phase and the final state dict.

    ``threads``: torch intra-op threads (1 = what an fl-sim client process uses). ``progress(rnd, row)``
    is called like fl-sim's (row has ``wall_s`` since the loop started, and the test metrics when due).
    """
    torch.set_num_threads(threads)
    t_start = time.perf_counter()
    data = load_federated(cfg.data, num_clients=cfg.clients, seed=cfg.seed)
    model = build_model(cfg.model.name, data.input_shape, data.num_classes, hidden=cfg.model.hidden, seed=cfg.seed)
    t_setup = time.perf_counter() - t_start
    eligible = np.sort(data.eligible_clients)
    k = cfg.sampled_per_round()
    t = cfg.train
    x_test, y_test = data.test_data()
    glob = {name: v.detach().clone() for name, v in model.state_dict().items()}
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    train_s = 0.0
    for rnd in range(cfg.rounds + 1):
        if rnd > 0:
            rng = numpy_generator(cfg.seed, rnd, "sample-clients")
            cids = np.sort(rng.choice(eligible, size=min(k, len(eligible)), replace=False))
            acc = {name: torch.zeros_like(v, dtype=torch.float64) for name, v in glob.items()}
            total = 0
            t_train = time.perf_counter()
            for cid in cids.tolist():
                model.load_state_dict(glob)
                idx = torch.from_numpy(data.parts[cid])
                x, y = data.source.x[idx], data.source.y[idx]
                model.train()
                opt = torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
                gen = torch_generator(cfg.seed, rnd, "local-train", cid)
                for b in _batches(len(y), t.batch_size, t.local_epochs, t.local_steps, gen):
                    opt.zero_grad(set_to_none=True)
                    nn.functional.cross_entropy(model(x[b]), y[b]).backward()
                    opt.step()
                for name, v in model.state_dict().items():
                    acc[name].add_(v.detach().to(torch.float64), alpha=float(len(y)))
                total += len(y)
            train_s += time.perf_counter() - t_train
            for name, v in glob.items():
                if torch.is_floating_point(v):  # integer buffers keep the server's value, as in fl-sim
                    glob[name] = (acc[name] / total).to(v.dtype)
        row: dict[str, Any] = {"round": rnd}
        if rnd in (0, cfg.rounds) or (cfg.eval_every and rnd % cfg.eval_every == 0):
            model.load_state_dict(glob)
            row["test_loss"], row["test_accuracy"] = _evaluate(model, x_test, y_test)
        row["wall_s"] = time.perf_counter() - t0
        rows.append(row)
        if progress is not None:
            progress(rnd, row)
    return {"setup_s": t_setup, "rows": rows, "train_s": train_s, "state": glob}


def check_plain(cfg: RunConfig) -> None:
    """The loop computes FedAvg without compression: refuse a config it would silently run as something else."""
    s = cfg.strategy
    if s.name != "fedavg" or s.server_lr != 1.0 or s.server_momentum != 0.0 or s.options:
        raise ValueError(f"the plain loop runs FedAvg with server_lr 1 and no momentum or options, not strategy "
                         f"{s.name!r}: use a FedAvg config (e.g. quickstart) or --set strategy.name=fedavg")
    if cfg.codec.name != "identity":
        raise ValueError(f"the plain loop sends uncompressed updates, not codec {cfg.codec.name!r}: "
                         "--set codec.name=identity")
    if cfg.channel:
        raise ValueError("the plain loop has no channel: use a config without a channel section")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from fl_sim.bench.bench_codecs import write_json
    from fl_sim.config import load_config

    p = argparse.ArgumentParser(prog="plain_loop", description=__doc__.splitlines()[0])
    p.add_argument("config", nargs="?", default="quickstart", help="a FedAvg config (default: quickstart)")
    p.add_argument("--set", dest="set_", action="append", default=[], help="config override (repeatable)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: as one fl-sim client process)")
    p.add_argument("--out", type=Path, default=Path("bench_out/plain_loop.json"))
    p.add_argument("--smoke", action="store_true", help="tiny sizes for the test suite: 4 clients, 2 a round, 2 rounds")
    a = p.parse_args(argv)
    cfg = load_config(a.config, [*a.set_, *(SMOKE_SET if a.smoke else [])])
    check_plain(cfg)
    res = plain_fedavg(cfg, threads=a.threads)
    rows = res["rows"]
    per = [b["wall_s"] - a_["wall_s"] for a_, b in zip(rows, rows[1:])]
    for r, dt in zip(rows[1:], per):
        print(f"round {r['round']:4d}: {dt:.3f} s" + (f"  test loss {r['test_loss']:.6f}  accuracy {r['test_accuracy']:.4f}"
                                                     if "test_loss" in r else ""))
    data = {"config": a.config, "set": a.set_, "smoke": a.smoke, "threads": a.threads, "clients": cfg.clients,
            "per_round": cfg.sampled_per_round(), "rounds": cfg.rounds, "setup_s": res["setup_s"],
            "train_s": res["train_s"], "round_s": per, "rows": rows,
            "final_test_loss": rows[-1]["test_loss"], "final_test_accuracy": rows[-1]["test_accuracy"]}
    write_json(data, a.out)
    print(f"setup {res['setup_s']:.2f} s, training {res['train_s']:.2f} s; wrote {a.out}")
    return data


if __name__ == "__main__":
    main()
