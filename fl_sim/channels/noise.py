"""Additive white Gaussian noise of the MAC uplink and the broadcast downlink.

Source: [Abdi-thesis], Chapter 5, eq. (5.1) (uplink noise η ~ CN(0, σ² I))
and the sentence after it (downlink noise η'_i ~ N(0, σ_i² I)); docs/notes.md#rlc.

Conventions (used everywhere in fl_sim.channels):

* ``noise_var`` of complex noise is σ² **per complex dimension**: n ~ CN(0, σ²), so
  E|n|² = σ² and the real and the imaginary part are each N(0, σ²/2).
* ``power`` is the transmit power budget p **per channel use** (average energy of one complex
  symbol); over a round of m channel uses a node's budget is P = m p (the P_i of eq. 5.8).
* SNR is the ratio p / σ² (linear) or 10 log10(p / σ²) (``_db``). The thesis' Fig. 5.3 setting,
  SNR = 18 dB, is p / σ² = 10^1.8 ≈ 63.1.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "ChannelError",
    "snr_db_to_linear",
    "linear_to_db",
    "noise_std_from_snr",
    "noise_var_from_snr",
    "complex_awgn",
    "real_awgn",
]


class ChannelError(ValueError):
    """A bad channel parameter or input, explained in one line."""


def snr_db_to_linear(snr_db: float) -> float:
    """10^(snr_db / 10); raises ChannelError for a non-finite value."""
    if not math.isfinite(snr_db):
        raise ChannelError(f"snr_db={snr_db!r} must be a finite number of dB (use None for a noiseless channel)")
    return 10.0 ** (snr_db / 10.0)


def linear_to_db(snr_linear: float) -> float:
    """10 log10(snr_linear) for snr_linear > 0."""
    if not snr_linear > 0:
        raise ChannelError(f"snr_linear={snr_linear!r} must be > 0 to express it in dB")
    return 10.0 * math.log10(snr_linear)


def noise_var_from_snr(snr_db: float, power: float) -> float:
    """σ² per complex dimension such that power / σ² equals the SNR: σ² = p / 10^(snr_db/10)."""
    if not (math.isfinite(power) and power > 0):
        raise ChannelError(f"power={power!r} must be a finite number > 0 (transmit power per channel use)")
    return power / snr_db_to_linear(snr_db)


def noise_std_from_snr(snr_db: float, power: float) -> float:
    """σ = sqrt(p / 10^(snr_db/10)): the standard deviation per complex dimension (σ/√2 per real one)."""
    return math.sqrt(noise_var_from_snr(snr_db, power))


def complex_awgn(
    shape: tuple[int, ...], *, noise_var: float, generator: torch.Generator, dtype: torch.dtype = torch.complex64
) -> torch.Tensor:
    """Circularly-symmetric complex Gaussian noise CN(0, noise_var): each of Re, Im ~ N(0, noise_var/2).

    Returns a tensor of ``shape`` and complex ``dtype``; exact zeros when ``noise_var == 0``.
    """
    _check_var(noise_var)
    real_dtype = torch.float64 if dtype == torch.complex128 else torch.float32
    if noise_var == 0:
        return torch.zeros(shape, dtype=dtype)
    w = torch.randn((*shape, 2), generator=generator, dtype=real_dtype) * math.sqrt(noise_var / 2.0)
    return torch.view_as_complex(w).to(dtype)


def real_awgn(
    shape: tuple[int, ...], *, noise_var: float, generator: torch.Generator, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Real Gaussian noise N(0, noise_var) of ``shape``; exact zeros when ``noise_var == 0``."""
    _check_var(noise_var)
    if noise_var == 0:
        return torch.zeros(shape, dtype=dtype)
    return torch.randn(shape, generator=generator, dtype=dtype) * math.sqrt(noise_var)


def _check_var(noise_var: float) -> None:
    if not (math.isfinite(noise_var) and noise_var >= 0):
        raise ChannelError(f"noise_var={noise_var!r} must be a finite number >= 0")
