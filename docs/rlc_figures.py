"""Figures and tables of docs/rlc.md from the sweeps under runs/rlc/ (commands in docs/rlc.md).

    python docs/rlc_figures.py [runs/rlc] [docs]

Reads runs/rlc/{snr,gain,qcs}/sweep.csv (written by ``fl-sim sweep``), writes
docs/rlc_accuracy_vs_snr.png and docs/rlc_accuracy_vs_channel_uses.png and prints the markdown
tables. Digital QCS is simulated once at 18 dB: its accuracy does not depend on the SNR
(error-free bits at capacity), its channel uses at another SNR are Σ_rounds Σ_i ⌈bits_i / C(SNR)⌉.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

from fl_sim.channels import capacity_bits_per_use, digital_channel_uses
from fl_sim.runs.results import load_run


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def spread(accs: list[str]) -> str:
    """mean (min..max, n) of final accuracies; a failed run (empty) counts as diverged."""
    vals = [float(a) for a in accs if a is not None]
    failed = len(accs) - len(vals)
    text = f"{mean(vals):.3f}"
    if len(vals) > 1:
        text += f" ({min(vals):.3f}..{max(vals):.3f}, n={len(vals)})"
    return text + (f", {failed} diverged" if failed else "")


def read(path: Path) -> list[dict]:
    """sweep.csv rows with the numeric columns as floats (None for a run that has no value)."""
    with open(path) as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for key in ("final_test_accuracy", "total_uplink_bits", "total_channel_uses", "wall_s"):
            r[key] = float(r[key]) if r.get(key) not in ("", None) else None
    return rows


def digital_uses(run_dir: str, snr_db: float) -> int:
    """Σ over rounds of Σ_i ⌈bits_i / C⌉ (every node of a round sends the same number of bits)."""
    _, rows = load_run(run_dir)
    total = 0
    for r in rows[1:]:
        k = int(r["clients_ok"])
        if k:
            total += digital_channel_uses([int(r["uplink_bits"]) // k] * k, snr_db)
    return total


def curve(run_dir: str, snr_db: float | None = None) -> tuple[list[float], list[float]]:
    """(cumulative channel uses, test accuracy) at the evaluated rounds; digital runs recounted at snr_db."""
    _, rows = load_run(run_dir)
    cum, xs, ys = 0.0, [], []
    for r in rows[1:]:
        if snr_db is None:
            cum += float(r["channel_uses"])
        elif int(r["clients_ok"]):
            k = int(r["clients_ok"])
            cum += digital_channel_uses([int(r["uplink_bits"]) // k] * k, snr_db)
        acc = r.get("test_accuracy")
        if acc is not None and acc == acc:
            xs.append(cum)
            ys.append(float(acc))
    return xs, ys


def plot(snr: list[dict], qcs: list[dict], gains: dict[str, int], out: Path) -> None:
    """Accuracy and channel uses per round vs SNR; accuracy vs cumulative channel uses."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    levels = sorted({float(r["channel.snr_db"]) for r in snr})
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(9.6, 3.8))
    accs = [[r["final_test_accuracy"] for r in snr if float(r["channel.snr_db"]) == s and r["final_test_accuracy"]]
            for s in levels]
    ax.plot(levels, [np.mean(a) for a in accs], "o-", color="C0", label="RLC gain 20 (analog)")
    ax.fill_between(levels, [min(a) for a in accs], [max(a) for a in accs], color="C0", alpha=0.2)
    per_round = [float(next(r for r in snr if float(r["channel.snr_db"]) == s)["total_channel_uses"]) for s in levels]
    rounds = len(load_run(snr[0]["run_dir"])[1]) - 1
    bx.plot(levels, np.array(per_round) / rounds, "o-", color="C0", label="RLC gain 20: m")
    for color, k in (("C3", "118"), ("C2", "1274")):
        runs = [r for r in qcs if r["strategy.k"] == k and r["final_test_accuracy"]]
        if not runs:
            continue
        a = [r["final_test_accuracy"] for r in runs]
        label = f"digital QCS gain {gains[k]}"
        ax.axhline(np.mean(a), color=color, ls="--", label=label + " (any SNR)")
        ax.axhspan(min(a), max(a), color=color, alpha=0.1)
        bx.plot(levels, [digital_uses(runs[0]["run_dir"], s) / rounds for s in levels], "s--", color=color, label=label)
    ax.set_xlabel("SNR (dB)")
    ax.set_ylabel(f"test accuracy after {rounds} rounds")
    ax.set_title("mean, band = min..max over seeds", fontsize=8)
    bx.set_xlabel("SNR (dB)")
    bx.set_ylabel("channel uses per round")
    bx.set_yscale("log")
    for a_ in (ax, bx):
        a_.grid(alpha=0.3)
        a_.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "rlc_accuracy_vs_snr.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for i, s in enumerate(levels):
        runs = [r for r in snr if float(r["channel.snr_db"]) == s and r["final_test_accuracy"]]
        cs = [curve(r["run_dir"]) for r in runs]
        ax.plot(cs[0][0], np.mean([c[1] for c in cs], axis=0), color=plt.cm.viridis(i / max(1, len(levels) - 1)),
                label=f"RLC gain 20, {s:g} dB")
    for color, k in (("C3", "118"), ("C2", "1274")):
        runs = [r for r in qcs if r["strategy.k"] == k and r["final_test_accuracy"]]
        for s_db, ls in ((18.0, "--"), (0.0, ":")):
            if runs:
                cs = [curve(r["run_dir"], s_db) for r in runs]
                ax.plot(cs[0][0], np.mean([c[1] for c in cs], axis=0), ls, color=color,
                        label=f"digital QCS gain {gains[k]}, {s_db:g} dB")
    ax.set_xscale("log")
    ax.set_xlabel("cumulative channel uses")
    ax.set_ylabel("test accuracy (mean over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="upper left")
    fig.tight_layout()
    fig.savefig(out / "rlc_accuracy_vs_channel_uses.png", dpi=100)
    plt.close(fig)


def main(root: Path, out: Path) -> None:
    snr = sorted(read(root / "snr" / "sweep.csv"), key=lambda r: float(r["channel.snr_db"]))
    qcs = read(root / "qcs" / "sweep.csv")
    gains = {"1274": 32, "503": 80, "118": 320, "15": 1600}  # QCS k -> compression gain (exact bits)
    plot(snr, qcs, gains, out)

    print("| SNR (dB) | RLC final acc. | decoded noise / signal | RLC channel uses | QCS-320 uses | ratio "
          "| QCS-32 uses | ratio |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    by_k = {r["strategy.k"]: r for r in qcs}
    for s_db in sorted({float(r["channel.snr_db"]) for r in snr}):
        runs = [r for r in snr if float(r["channel.snr_db"]) == s_db]
        rlc = float(runs[0]["total_channel_uses"])
        noise = [mean(float(m["rlc_noise_rel_mse_expected"]) for m in load_run(r["run_dir"])[1][1:]
                      if m.get("rlc_noise_rel_mse_expected") is not None) for r in runs]
        line = f"| {s_db:g} | {spread([r['final_test_accuracy'] for r in runs])} | {mean(noise):.3g} | {rlc:,.0f} |"
        for k in ("118", "1274"):
            if k in by_k:
                u = digital_uses(by_k[k]["run_dir"], s_db)
                line += f" {u:,} | {u / rlc:.1f} |"
        print(line)
    print()
    print("| digital QCS gain | k | final acc. (SNR-independent) | channel uses at 18 dB |")
    print("|---:|---:|---:|---:|")
    for k, g in gains.items():
        runs = [r for r in qcs if r["strategy.k"] == k]
        if runs:
            print(f"| {g} | {k} | {spread([r['final_test_accuracy'] for r in runs])} | "
                  f"{float(runs[0]['total_channel_uses']):,.0f} |")
    if (root / "gain" / "sweep.csv").is_file():
        print()
        print("| RLC gain d/m | m | final acc. (18 dB) | channel uses |")
        print("|---:|---:|---:|---:|")
        gain_rows = read(root / "gain" / "sweep.csv")
        for g in sorted({float(r["strategy.gain"]) for r in gain_rows}):
            runs = [r for r in gain_rows if float(r["strategy.gain"]) == g]
            m = int(load_run(runs[0]["run_dir"])[1][1]["channel_uses"])
            print(f"| {g:g} | {m:,} | {spread([r['final_test_accuracy'] for r in runs])} | "
                  f"{float(runs[0]['total_channel_uses']):,.0f} |")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/rlc"), Path(sys.argv[2] if len(sys.argv) > 2 else "docs"))
