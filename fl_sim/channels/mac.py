"""MACChannel: the wireless multiple-access channel of Abdi's RLC, generate (h) then apply (y).

Source: [Abdi-thesis], Chapter 5: eq. (5.1) y = Σ_i h_i ⊙ x_i + η,
η ~ CN(0, σ² I); downlink ŷ_i = y + η'_i, η'_i ~ N(0, σ_i² I); eqs. (5.6)-(5.10) power control and
participation; Lemmas 13-14 (decoder (1/c) Aᵀ y). docs/notes.md#rlc.

Real codewords on complex channel uses. The codewords v_i = A g_i are real; node i sends the complex
x_i = c α_i (b_i/π_i)(m/m_i)(q_i ⊙ v_i) with q_i = 1/ĥ_i on its used subchannels (eq. 5.10). With
perfect CSI, h_i ⊙ x_i is real, so the receiver keeps Re(y) (in-phase component) and discards the
imaginary part, which holds only noise. The noise that reaches the decoder is therefore real with
variance σ_R² = σ²/2 per coordinate (σ² per complex dimension, see fl_sim.channels.noise), and

    ĝ = (1/c) Aᵀ Re(y),   E‖ĝ − g‖² = (d/m − 1)‖g‖² + d σ²/2       (Lemma 13 / eq. 5.5, c = 1)

i.e. the σ² of eq. (5.5) and (5.9) is the per-real-dimension variance σ_R² = σ²/2 here (the noise
term of Aᵀη_R is tr(A Aᵀ) σ_R² = (d/m)·m·σ_R² = d σ_R²). One round occupies m channel uses however
many nodes transmit (only the in-phase dimension carries data, consistent with the real-channel
capacity 0.5 log2(1 + SNR) used for the digital comparison in fl_sim.channels.accounting).

Randomness, all from fl_sim.rng keyed by the channel seed: fading (seed, "fading", round //
coherence_rounds, node), CSI error (seed, "csi", round, node), participation (seed, "participation",
round, node), uplink noise (seed, "uplink-noise", round), downlink noise (seed, "downlink-noise",
round, node), node distances (seed, "distance", node).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from fl_sim.rng import torch_generator
from fl_sim.channels.csi import CSI_MODES, estimate_csi
from fl_sim.channels.fading import FADING_KINDS, PathLoss, draw_fading, node_list
from fl_sim.channels.noise import ChannelError, complex_awgn, noise_var_from_snr, real_awgn, snr_db_to_linear
from fl_sim.channels.participation import check_probabilities, draw_participation
from fl_sim.channels.power import POWER_POLICIES, form_signals, power_control

__all__ = ["MACChannel", "REAL_NOISE_FRACTION"]

REAL_NOISE_FRACTION = 0.5  # σ_R² = σ²/2: the share of CN(0, σ²) noise kept by the in-phase decoder


def _per_node(value: float | tuple[float, ...], ids: list[int], name: str) -> torch.Tensor:
    """A scalar broadcast to the nodes, or entry ``id`` of a per-node tuple, as float64 (K,)."""
    if isinstance(value, tuple):
        too_big = [i for i in ids if not 0 <= i < len(value)]
        if too_big:
            raise ChannelError(f"{name} has {len(value)} entries (one per node id) but node {too_big[0]} was asked")
        return torch.tensor([value[i] for i in ids], dtype=torch.float64)
    return torch.full((len(ids),), float(value), dtype=torch.float64)


@dataclass(frozen=True)
class MACChannel:
    """Configuration and simulation of the uplink MAC y = Σ_i h_i ⊙ x_i + η and the noisy downlink.

    Attributes:
        snr_db: p / σ² in dB, p the reference per-channel-use power (``power``, or the mean of a
            per-node list), σ² the noise variance per complex dimension; None = noiseless uplink.
        fading: ``"none"``, ``"rayleigh"`` or ``"rician"`` (fl_sim.channels.fading).
        rician_k: Rician K factor (linear).
        coherence_rounds: rounds per fading block.
        csi: ``"perfect"`` or ``"imperfect"`` (ĥ = h + CN(0, csi_error_var)).
        csi_error_var: channel-estimation error variance per complex dimension.
        power: transmit budget p_i per channel use (scalar, or one per node id); a round's budget is
            P_i = m p_i (eq. 5.8: E‖x_i‖² <= P_i, while transmitting).
        participation: π_i in (0, 1] (scalar, or one per node id), b_i ~ Bernoulli(π_i) (eq. 5.10).
        power_policy: ``"mse"`` (subchannel selection minimising (5.9)) or ``"all"``.
        downlink_snr_db: SNR of the broadcast relative to the broadcast signal's own power per
            symbol; None = noiseless downlink.
        path_loss_exponent: None (no large-scale loss) or the exponent of β = (d0/d)^exponent.
        reference_distance, min_distance, max_distance: d0 and the annulus of node distances.
        seed: channel seed (every draw is keyed by it).
    """

    snr_db: float | None = 18.0
    fading: str = "rayleigh"
    rician_k: float = 1.0
    coherence_rounds: int = 1
    csi: str = "perfect"
    csi_error_var: float = 0.0
    power: float | tuple[float, ...] = 1.0
    participation: float | tuple[float, ...] = 1.0
    power_policy: str = "mse"
    downlink_snr_db: float | None = None
    path_loss_exponent: float | None = None
    reference_distance: float = 1.0
    min_distance: float = 1.0
    max_distance: float = 10.0
    seed: int = 0
    _path_loss: PathLoss | None = field(init=False, repr=False, compare=False, default=None)

    def __post_init__(self) -> None:
        for name in ("power", "participation"):
            value = getattr(self, name)
            if isinstance(value, (list, torch.Tensor)):
                object.__setattr__(self, name, tuple(float(v) for v in value))
        for name in ("snr_db", "downlink_snr_db"):
            value = getattr(self, name)
            if value is not None:
                snr_db_to_linear(float(value))  # raises for a non-finite value
        if self.fading not in FADING_KINDS:
            raise ChannelError(f"fading={self.fading!r} is unknown; use one of {', '.join(FADING_KINDS)}")
        if self.csi not in CSI_MODES:
            raise ChannelError(f"csi={self.csi!r} is unknown; use one of {', '.join(CSI_MODES)}")
        if self.power_policy not in POWER_POLICIES:
            raise ChannelError(f"power_policy={self.power_policy!r} is unknown; use one of {', '.join(POWER_POLICIES)}")
        if not (isinstance(self.coherence_rounds, int) and self.coherence_rounds >= 1):
            raise ChannelError(f"coherence_rounds={self.coherence_rounds!r} must be an int >= 1")
        if not (math.isfinite(self.rician_k) and self.rician_k >= 0):
            raise ChannelError(f"rician_k={self.rician_k!r} must be a finite number >= 0")
        if not (math.isfinite(self.csi_error_var) and self.csi_error_var >= 0):
            raise ChannelError(f"csi_error_var={self.csi_error_var!r} must be a finite variance >= 0")
        powers = torch.as_tensor(self.power, dtype=torch.float64)
        if powers.numel() == 0 or not bool((torch.isfinite(powers) & (powers > 0)).all()):
            raise ChannelError(f"power={self.power!r} must be finite and > 0 (budget per channel use)")
        pis = torch.as_tensor(self.participation, dtype=torch.float64)
        if pis.numel() == 0:
            raise ChannelError("participation must be a probability in (0, 1] or one per node id")
        check_probabilities(pis)
        if not isinstance(self.seed, int):
            raise ChannelError(f"seed={self.seed!r} must be an int")
        if self.path_loss_exponent is not None:
            pl = PathLoss(float(self.path_loss_exponent), self.reference_distance, self.min_distance, self.max_distance)
            object.__setattr__(self, "_path_loss", pl)

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def config_keys(cls) -> tuple[str, ...]:
        """The keys :meth:`from_config` accepts."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.init)

    @classmethod
    def from_config(cls, config: Mapping[str, Any], *, seed: int | None = None) -> "MACChannel":
        """Build from a mapping (the ``channel:`` section of a config); unknown keys raise ValueError.

        ``seed`` is used when the mapping has no ``seed`` key.
        """
        allowed = cls.config_keys()
        unknown = [k for k in config if k not in allowed]
        if unknown:
            raise ChannelError(f"channel: unknown key {unknown[0]!r}; allowed keys: {', '.join(allowed)}")
        kwargs = dict(config)
        if "seed" not in kwargs and seed is not None:
            kwargs["seed"] = int(seed)
        return cls(**kwargs)

    # -- quantities -----------------------------------------------------------------------
    @property
    def reference_power(self) -> float:
        """p of the SNR definition: ``power``, or the mean of the per-node list."""
        return float(torch.as_tensor(self.power, dtype=torch.float64).mean())

    @property
    def noise_var(self) -> float:
        """σ² per complex dimension of the uplink noise (0.0 when noiseless)."""
        return 0.0 if self.snr_db is None else noise_var_from_snr(float(self.snr_db), self.reference_power)

    @property
    def path_loss(self) -> PathLoss | None:
        return self._path_loss

    def budgets(self, nodes: int | Sequence[int], m: int) -> torch.Tensor:
        """P_i = m p_i (float64, (K,)): the per-round budget of eq. (5.8)."""
        return m * _per_node(self.power, node_list(nodes), "power")

    def probabilities(self, nodes: int | Sequence[int]) -> torch.Tensor:
        """π_i (float64, (K,))."""
        return _per_node(self.participation, node_list(nodes), "participation")

    # -- generate -------------------------------------------------------------------------
    def draw(self, nodes: int | Sequence[int], m: int, *, round: int) -> torch.Tensor:
        """True gains h (complex64, (K, m)): small-scale fading times sqrt(path-loss gain)."""
        return draw_fading(self.fading, nodes, m, seed=self.seed, round=round, coherence_rounds=self.coherence_rounds,
                           rician_k=self.rician_k, path_loss=self._path_loss)

    def estimate(self, h: torch.Tensor, nodes: int | Sequence[int], *, round: int) -> torch.Tensor:
        """ĥ: what the nodes believe (h, or h + CN(0, csi_error_var))."""
        return estimate_csi(h, mode=self.csi, error_var=self.csi_error_var, seed=self.seed, round=round, nodes=nodes)

    # -- apply ----------------------------------------------------------------------------
    def transmit(self, signals: torch.Tensor, h: torch.Tensor, *, round: int) -> torch.Tensor:
        """y = Σ_i h_i ⊙ x_i + η (eq. 5.1), η ~ CN(0, σ² I) from (seed, "uplink-noise", round).

        Args:
            signals: x, real or complex, shape (..., K, m) (leading dims = independent trials).
            h: (K, m) complex gains.
        Returns:
            y, complex (complex128 if either input is double precision, else complex64), shape (..., m).
        """
        if signals.dim() < 2 or signals.shape[-2:] != h.shape:
            raise ChannelError(
                f"signals must have shape (..., K, m) = (..., {tuple(h.shape)}), got {tuple(signals.shape)}"
            )
        if not _finite(signals) or not _finite(h):
            raise ChannelError("signals and h must be finite (no NaN or inf)")
        double = signals.dtype in (torch.float64, torch.complex128) or h.dtype == torch.complex128
        cdtype = torch.complex128 if double else torch.complex64
        y = (h.to(cdtype) * signals.to(cdtype)).sum(dim=-2)
        gen = torch_generator(self.seed, "uplink-noise", round)
        return y + complex_awgn(tuple(y.shape), noise_var=self.noise_var, generator=gen, dtype=cdtype)

    def round_draws(
        self, ids: Sequence[int], m: int, *, round: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Steps 1-2 of a round: (h, ĥ, π, b) for nodes ``ids`` on m subchannels (fading, CSI estimate,
        participation probabilities, Bernoulli draws b_i ~ Bernoulli(π_i)), all keyed by ``round``."""
        h = self.draw(ids, m, round=round)
        h_est = self.estimate(h, ids, round=round)
        pi = self.probabilities(ids)
        b = draw_participation(pi, seed=self.seed, round=round, nodes=ids)
        return h, h_est, pi, b

    def plan_power(self, h_est: torch.Tensor, a: torch.Tensor, budget: torch.Tensor):
        """Step 4: power control (eqs. 5.6-5.8) for signal norms ``a`` (α_i (b_i/π_i) ‖g_i‖), under
        this channel's policy and the in-phase noise variance σ²/2."""
        return power_control(h_est, a, budget, noise_var=REAL_NOISE_FRACTION * self.noise_var,
                             policy=self.power_policy)

    def receive(self, x: torch.Tensor, h: torch.Tensor, c: float, *, round: int,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Steps 6-7: y = Σ h_i ⊙ x_i + η (eq. 5.1) and the in-phase decode Re(y)/c, shape (m,); zeros
        when c = 0 (nothing was sent: the server knows and skips decoding)."""
        if c > 0:
            y = self.transmit(x, h, round=round)
            return (y.real.to(torch.float64) / c).to(dtype)
        return torch.zeros(h.shape[-1], dtype=dtype)

    def over_the_air(
        self,
        codewords: torch.Tensor,
        weights: torch.Tensor,
        *,
        round: int,
        node_ids: Sequence[int] | None = None,
        norms: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """One RLC round: the estimate of Σ_i α_i v_i (v_i = A g_i) the server gets, and metrics.

        Steps (eq. numbers of the thesis, Chapter 5):
          1. h = draw (fading + path loss), ĥ = CSI estimate;  2. b_i ~ Bernoulli(π_i);
          3. a_i = α_i (b_i/π_i) ‖g_i‖, P_i = m p_i;  4. power control: S_i, q_i, c (5.6)-(5.8);
          5. x_i = c α_i (b_i/π_i)(m/m_i)(q_i ⊙ v_i) (5.10);  6. y = Σ h_i ⊙ x_i + η (5.1);
          7. return Re(y)/c (then Aᵀ(·) is the decoder of Lemma 14).

        Args:
            codewords: (K, m) real, v_i = A g_i (already projected with the common A).
            weights: (K,) α_i >= 0.
            round: round index (keys every draw).
            node_ids: ids of the K nodes (default 0..K-1).
            norms: (K,) ‖g_i‖ for the power rule (5.8); default ‖v_i‖ (E‖A g‖² = ‖g‖²). Pass the true
                norms for Lemma 14's exact unbiasedness (then S_i and c do not depend on A).
        Returns:
            (y_decoded, metrics): y_decoded (m,) real (float64 for float64 codewords, else float32);
            metrics: floats ``transmitting``, ``c``, ``mean_m_i``, ``channel_uses``, ``noise_var``,
            ``decoded_noise_var`` (σ²/(2c²) per coordinate), ``power_ratio_max`` (realized ‖x_i‖²/P_i),
            ``expected_power_ratio_max`` ((5.8)/P_i), ``snr_db`` (when noisy); tensors ``b``, ``m_i``,
            ``power``, ``expected_power``, ``budget`` (one entry per node).
        """
        v = _check_codewords(codewords)
        k_nodes, m = v.shape
        ids = node_list(node_ids if node_ids is not None else k_nodes)
        if len(ids) != k_nodes:
            raise ChannelError(f"node_ids has {len(ids)} entries for {k_nodes} codewords")
        alpha = _check_nonneg(weights, k_nodes, "weights (α_i)")
        if norms is None:
            g_norm = v.to(torch.float64).norm(dim=1)
        else:
            g_norm = _check_nonneg(norms, k_nodes, "norms (‖g_i‖)")
        # 1-2. channel draw, CSI, participation
        h, h_est, pi, b = self.round_draws(ids, m, round=round)
        coef = alpha * b.to(torch.float64) / pi  # α_i b_i / π_i
        # 3-4. power control on the transmitting nodes
        budget = self.budgets(ids, m)
        plan = self.plan_power(h_est, coef * g_norm, budget)
        # 5-7. signals, superposition, in-phase decode
        x = form_signals(v, coef, plan)
        sending = plan.m_i > 0
        out_dtype = torch.float64 if v.dtype == torch.float64 else torch.float32
        y_dec = self.receive(x, h, plan.c, round=round, dtype=out_dtype)
        power = (x.abs().to(torch.float64) ** 2).sum(dim=1)
        metrics: dict[str, Any] = {
            "transmitting": float(b.sum()),
            "c": float(plan.c),
            "mean_m_i": float(plan.m_i[sending].to(torch.float64).mean()) if bool(sending.any()) else 0.0,
            "channel_uses": float(m),
            "noise_var": self.noise_var,
            "decoded_noise_var": REAL_NOISE_FRACTION * self.noise_var / plan.c**2 if plan.c > 0 else 0.0,
            "power_ratio_max": float((power / budget).max()) if k_nodes else 0.0,
            "expected_power_ratio_max": float((plan.expected_power / budget).max()) if k_nodes else 0.0,
            "b": b,
            "m_i": plan.m_i,
            "power": power,
            "expected_power": plan.expected_power,
            "budget": budget,
        }
        if self.snr_db is not None:
            metrics["snr_db"] = float(self.snr_db)
        return y_dec, metrics

    def downlink(self, x: torch.Tensor, node_ids: Sequence[int], *, round: int) -> torch.Tensor:
        """ŷ_i = x + η'_i for each node (shape (K, *x.shape)), η'_i ~ N(0, σ_dl² I).

        σ_dl² = mean(x²) / 10^(downlink_snr_db/10): the router broadcasts at its own power and each
        node, after compensating its downlink gain, sees this SNR. None = noiseless (copies of x).
        Noise of node i comes from (seed, "downlink-noise", round, i).
        """
        if not torch.is_floating_point(x) or not _finite(x):
            raise ChannelError("downlink: x must be a finite real tensor")
        ids = node_list(node_ids)
        out = x.unsqueeze(0).expand(len(ids), *x.shape).clone()
        if self.downlink_snr_db is None:
            return out
        power = float((x.to(torch.float64) ** 2).mean()) if x.numel() else 0.0
        var = power / snr_db_to_linear(float(self.downlink_snr_db))
        for j, i in enumerate(ids):
            gen = torch_generator(self.seed, "downlink-noise", round, i)
            out[j] += real_awgn(tuple(x.shape), noise_var=var, generator=gen, dtype=x.dtype)
        return out


def _finite(t: torch.Tensor) -> bool:
    t = torch.view_as_real(t) if torch.is_complex(t) else t
    return bool(torch.isfinite(t).all())


def _check_codewords(codewords: torch.Tensor) -> torch.Tensor:
    if not isinstance(codewords, torch.Tensor) or codewords.dim() != 2:
        shape = getattr(codewords, "shape", type(codewords))
        raise ChannelError(f"codewords must be a (K, m) tensor of A g_i, got {shape}")
    if not torch.is_floating_point(codewords):
        raise ChannelError(f"codewords must be real floating point (A g_i), got {codewords.dtype}")
    if codewords.shape[1] < 1:
        raise ChannelError("codewords must have m >= 1 channel symbols")
    if not _finite(codewords):
        raise ChannelError("codewords contain NaN or inf; check the update before encoding")
    return codewords if codewords.dtype == torch.float64 else codewords.to(torch.float32)


def _check_nonneg(values: torch.Tensor, k: int, name: str) -> torch.Tensor:
    t = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    if t.numel() != k or not bool((torch.isfinite(t) & (t >= 0)).all()):
        raise ChannelError(f"{name} must hold {k} finite values >= 0")
    return t
