"""Power control for RLC over the MAC: subchannel selection, channel inversion, global scale c.

Source: [Abdi-thesis], Chapter 5, §5.4.1, eqs. (5.6)-(5.9) and (5.10);
docs/notes.md#rlc-lemma14.

Node i sends, on the subchannel set S_i it selects (m_i = |S_i| = ‖q_i‖₀),

    [q_i]_l = 1/[ĥ_i]_l if l ∈ S_i else 0                                            (5.6)
    x_i     = c a'_i (m/m_i) (q_i ⊙ v_i),   v_i = A g_i,  a'_i = α_i b_i/π_i           (5.7), (5.10)
    E‖x_i‖² = m c² a_i² ‖q_i‖² / m_i²,      a_i = a'_i ‖g_i‖                           (5.8)

(expectation over the random A: E[(A g)_l²] = ‖g‖²/m). The decoder (1/c) Aᵀ y is unbiased for any
S_i and c (Lemma 14) and its error is bounded by

    (Σ_i (d/m_i) a_i)(Σ_i a_i) − ‖g‖² + d σ_R² / c²                                   (5.9)

with σ_R² the noise variance per real dimension that reaches the decoder (σ²/2 for CN(0, σ²) noise,
see fl_sim.channels.mac).

Policy (the thesis' two rules, combined by a search over c):
  * for a given c each node uses the largest number k of its strongest subchannels (largest |ĥ|) with
    E‖x_i‖² ≤ P_i;
  * for given m_i, c is the largest value meeting every node's constraint.
Let S_ik = Σ_{l ≤ k} 1/|ĥ_i|²_(l) over node i's k strongest subchannels (a cumulative sum after one
sort per node) and c_i(k) = sqrt(P_i k² / (m a_i² S_ik)), the largest c node i tolerates with k
subchannels. For a candidate c, m_i(c) = max{k : c_i(k) ≥ c}; then c' = min_i c_i(m_i(c)) ≥ c.
Every candidate of a geometric grid between the c at which all nodes use all m subchannels and the
largest feasible c is evaluated at once (tensor form) and the one minimising the bound (5.9) (the
factor d dropped) is kept. Policy ``"all"`` skips selection: m_i = m, c = min_i c_i(m).

In practice each node knows its own ‖g_i‖ and ĥ_i, so the selection is local; the global c needs every
node's constraint: nodes report one scalar (their c_i curve summarised, e.g. c_i(m_i)) before the
round, or c is set in advance from a known bound on a_i. The simulation computes it centrally.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from fl_sim.channels.noise import ChannelError

__all__ = ["POWER_POLICIES", "PowerPlan", "power_control", "form_signals"]

POWER_POLICIES = ("mse", "all")
_GRID_FLOOR = 1e-6  # the smallest candidate c is at least this fraction of the largest feasible c


class PowerPlan(NamedTuple):
    """Result of :func:`power_control` (unpacks as ``c, mask, q, m_i, expected_power``).

    Attributes:
        c: global power-control scale (0.0 when no node has anything to send).
        mask: (n, m) bool, True on the subchannels node i uses (S_i).
        q: (n, m) complex, 1/ĥ on S_i and 0 elsewhere (eq. 5.6).
        m_i: (n,) int64, |S_i| (0 for a node that sends nothing).
        expected_power: (n,) float64, E‖x_i‖² of eq. (5.8) (per round, same units as the budgets).
    """

    c: float
    mask: torch.Tensor
    q: torch.Tensor
    m_i: torch.Tensor
    expected_power: torch.Tensor


def power_control(
    h_est: torch.Tensor,
    amplitude: torch.Tensor,
    budget: torch.Tensor,
    *,
    noise_var: float = 0.0,
    policy: str = "mse",
    grid: int = 64,
) -> PowerPlan:
    """Select subchannels and the global scale c for n nodes (see the module docstring).

    Args:
        h_est: (n, m) complex, the gains the nodes believe (ĥ_i).
        amplitude: (n,) a_i = α_i (b_i/π_i) ‖g_i‖ >= 0; nodes with a_i = 0 send nothing.
        budget: (n,) P_i > 0, the per-round power budget (E‖x_i‖² <= P_i).
        noise_var: σ_R², noise variance per real dimension at the decoder (enters the objective only).
        policy: ``"mse"`` (selection minimising (5.9)) or ``"all"`` (every subchannel, no selection).
        grid: number of candidate values of c for the ``"mse"`` policy.
    """
    if policy not in POWER_POLICIES:
        raise ChannelError(f"power policy={policy!r} is unknown; use one of {', '.join(POWER_POLICIES)}")
    if h_est.dim() != 2 or not torch.is_complex(h_est):
        raise ChannelError(f"h_est must be a complex tensor of shape (n, m), got {h_est.dtype} {tuple(h_est.shape)}")
    n, m = h_est.shape
    a = torch.as_tensor(amplitude, dtype=torch.float64).reshape(-1)
    p = torch.as_tensor(budget, dtype=torch.float64).reshape(-1)
    if p.numel() not in (1, n):
        raise ChannelError(f"budget must be one value or {n} values (one per node), got {p.numel()}")
    p = p.expand(n)
    if a.numel() != n or not bool(torch.isfinite(a).all() & (a >= 0).all()):
        raise ChannelError(f"amplitude must hold {n} finite values >= 0 (α_i b_i/π_i ‖g_i‖)")
    if not bool(torch.isfinite(p).all() & (p > 0).all()):
        raise ChannelError("power budgets must be finite and > 0")
    if not (math.isfinite(noise_var) and noise_var >= 0):
        raise ChannelError(f"noise_var={noise_var!r} must be a finite number >= 0")
    if not bool(torch.isfinite(torch.view_as_real(h_est)).all()):
        raise ChannelError("h_est contains NaN or inf")
    if not isinstance(grid, int) or grid < 2:
        raise ChannelError(f"grid={grid!r} must be an int >= 2")

    # 1. Sort each transmitting node's subchannels by |ĥ| (strongest first); S_ik = cumulative Σ 1/|ĥ|².
    gain2 = torch.view_as_real(h_est).to(torch.float64).pow(2).sum(-1)  # |ĥ|², (n, m)
    active = a > 0
    idx = torch.nonzero(active).flatten()
    order = torch.argsort(gain2[idx], dim=1, descending=True, stable=True)  # (n_active, m)
    s = torch.cumsum(1.0 / gain2[idx].gather(1, order), dim=1)  # inf after a zero gain
    m_i = torch.zeros(n, dtype=torch.int64)
    c = 0.0
    if idx.numel():
        # 2. c_i(k) = sqrt(P_i k² / (m a_i² S_ik)): the largest c node i tolerates with k subchannels.
        k = torch.arange(1, m + 1, dtype=torch.float64)
        aa, pa = a[idx], p[idx]
        c_node = torch.sqrt(pa[:, None] * k**2 / (m * aa[:, None] ** 2 * s))
        if policy == "all":
            counts = torch.full((idx.numel(),), m, dtype=torch.int64)
            c = float(c_node[:, -1].min())
            if c <= 0:
                raise ChannelError("policy 'all' needs every subchannel usable, but a node has a zero gain; use 'mse'")
        else:
            counts, c = _search_c(c_node, aa, noise_var, grid)
        m_i[idx] = counts

    # 3. Mask of the m_i strongest subchannels, inversion q = 1/ĥ = conj(ĥ)/|ĥ|² on them (5.6),
    #    expected power (5.8).
    mask = torch.zeros((n, m), dtype=torch.bool)
    if idx.numel():
        used = torch.arange(m).expand(idx.numel(), m) < m_i[idx, None]  # in sorted order
        mask[idx] = torch.zeros_like(used).scatter_(1, order, used)
    inv = torch.where(mask, 1.0 / gain2, 0.0)
    q = h_est.conj() * inv.to(h_est.real.dtype)
    expected = torch.zeros(n, dtype=torch.float64)
    if idx.numel():
        s_used = s.gather(1, (m_i[idx] - 1)[:, None])[:, 0]
        expected[idx] = m * c**2 * a[idx] ** 2 * s_used / m_i[idx].to(torch.float64) ** 2
    return PowerPlan(c, mask, q, m_i, expected)


def _search_c(c_node: torch.Tensor, a: torch.Tensor, noise_var: float, grid: int) -> tuple[torch.Tensor, float]:
    """(m_i, c) minimising (5.9) over a geometric grid of c (rows of ``c_node`` = active nodes)."""
    m = c_node.shape[1]
    # R_i(k) = max_{j >= k} c_i(j), nonincreasing in k: m_i(c) = #{k : R_i(k) >= c}.
    r = torch.flip(torch.cummax(torch.flip(c_node, [1]), dim=1).values, [1])
    c_hi = float(r[:, 0].min())
    if not c_hi > 0:
        raise ChannelError("a transmitting node has no usable subchannel (every |h| is 0)")
    c_lo = max(float(r[:, -1].min()), c_hi * _GRID_FLOOR)
    cand = torch.exp(torch.linspace(math.log(c_lo), math.log(c_hi), grid, dtype=torch.float64))
    cand[0], cand[-1] = c_lo, c_hi  # exact ends: exp(log(c)) may round past a breakpoint
    counts = torch.searchsorted(-r.contiguous(), (-cand).expand(r.shape[0], grid).contiguous(), right=True)
    counts = counts.clamp(min=1, max=m)  # (n_active, grid); >= 1 since R_i(1) >= c_hi
    c_eff = c_node.gather(1, counts - 1).min(dim=0).values  # (grid,) the largest c for these m_i
    objective = (a[:, None] / counts).sum(0) * a.sum() + noise_var / c_eff**2
    best = grid - 1 - int(torch.argmin(torch.flip(objective, [0])))  # ties -> the larger c
    return counts[:, best], float(c_eff[best])


def form_signals(codewords: torch.Tensor, coef: torch.Tensor, plan: PowerPlan) -> torch.Tensor:
    """x_i = c coef_i (m/m_i) (q_i ⊙ v_i) of eq. (5.10), for codewords v (..., n, m) real.

    ``coef`` is (n,) α_i b_i/π_i. Returns complex (..., n, m) (complex128 for float64 codewords, else
    complex64); nodes with m_i = 0 send zeros.
    """
    n, m = plan.q.shape
    if codewords.shape[-2:] != (n, m):
        raise ChannelError(f"codewords must end in shape (n={n}, m={m}), got {tuple(codewords.shape)}")
    cdtype = torch.complex128 if codewords.dtype == torch.float64 else torch.complex64
    scale = plan.c * torch.as_tensor(coef, dtype=torch.float64) * m / plan.m_i.clamp(min=1).to(torch.float64)
    rdtype = torch.float64 if cdtype == torch.complex128 else torch.float32
    return plan.q.to(cdtype) * (scale.to(rdtype)[:, None] * codewords.to(rdtype))
