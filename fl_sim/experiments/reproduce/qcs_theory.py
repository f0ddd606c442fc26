"""QCS theory used by the reproductions: the wire bits of a QCS block and the best (k, Q) for a gain, from gamma (4.10).
"""

from __future__ import annotations

import math

from fl_sim.experiments.reproduce.spec import FLOAT_BITS


def _qcs_wire_bits(n: int, k: int, levels: float) -> int:
    """Exact bits per block of the qcs codec: a float32 scale + k ceil(log2(2Q+1))-bit indices."""
    from fl_sim.compression.quantizers import level_bits

    return FLOAT_BITS + k * level_bits(levels)


def _qcs_table(n: int, levels, wire: bool):
    """(gain, gamma, k, Q) arrays over k = 2..n and Q in ``levels``: gamma of (4.10), gain (4.11) or exact."""
    import numpy as np

    from fl_sim.compression.quantizers import level_bits

    k = np.arange(2, n + 1, dtype=np.float64)
    gains, gammas, ks, qs = [], [], [], []
    for Q in levels:
        bits = FLOAT_BITS + k * level_bits(Q) if wire else k * math.log2(2 * Q + 1)
        gains.append(FLOAT_BITS * n / bits)
        gammas.append(n / k - 1 + (n / (4.0 * Q * Q)) * np.log(k) / (k - 1))  # (4.10), k >= 2
        ks.append(k)
        qs.append(np.full_like(k, Q))
    return tuple(np.concatenate(a) for a in (gains, gammas, ks, qs))


def best_qcs_parameters(n: int, gain: float, *, levels=None, wire: bool = False) -> dict[str, float]:
    """argmin over (k, Q) of gamma (4.10) subject to gain >= ``gain`` (docs/notes.md#qcs-numbers).

    Gain is eq. (4.11), 32 n / (k log2(2Q + 1)), or with ``wire`` the codec's exact 32 n / bits
    (fixed-length indices and the 32-bit scale). Q ranges over ``levels`` (default: 1..64, as the notes' table;
    add 0.5 for the 1-bit variant), k over 2..n.
    """
    import numpy as np

    g, gam, k, q = _qcs_table(n, list(levels or range(1, 65)), wire)
    ok = g >= gain
    if not ok.any():
        raise ValueError(f"no (k, Q) reaches gain {gain} at n={n}")
    i = int(np.argmin(np.where(ok, gam, np.inf)))
    Q = float(q[i])
    return {"k": int(k[i]), "levels": int(Q) if Q.is_integer() else Q, "gamma": float(gam[i]), "gain": float(g[i])}


def qcs_theory_front(n: int, levels, *, wire: bool = True) -> list[tuple[float, float]]:
    """Lower envelope of gamma (4.10) over (k, Q) against gain: [(gain, min gamma at gain >= it)], gain
    strictly descending, gamma strictly descending."""
    import numpy as np

    g, gam, _, _ = _qcs_table(n, list(levels), wire)
    order = np.lexsort((gam, -g))  # gain descending, then gamma ascending
    front: list[tuple[float, float]] = []
    for i in order:
        if not front or gam[i] < front[-1][1]:
            if front and g[i] == front[-1][0]:
                front[-1] = (float(g[i]), float(gam[i]))
            else:
                front.append((float(g[i]), float(gam[i])))
    return front
