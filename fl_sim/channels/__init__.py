"""Wireless multiple-access channel for over-the-air FL ([Abdi-thesis] Chapter 5). No flwr import.

Source: [Abdi-thesis], Chapter 5, eqs. (5.1)-(5.11), Lemmas 13-14;
docs/notes.md#rlc. Generate (draw h) then apply (y = Σ h_i ⊙ x_i + η); power control reads ĥ before apply.

Modules, one job each:
  noise          complex / real AWGN, SNR conventions (σ² per complex dimension)
  fading         h: none / Rayleigh / Rician, block fading, distance path loss
  csi            ĥ = h (+ estimation error)
  power          subchannel selection, channel inversion, global scale c (5.6)-(5.9)
  participation  b_i ~ Bernoulli(π_i), 1/π_i scaling (5.10), α_i = n_i/n
  mac            MACChannel: transmit (5.1), over_the_air (5.10 + decode), downlink
  accounting     analog vs digital channel uses, latency

Layer: kernels. May import ``fl_sim.rng``, torch, numpy; never Flower or any other fl_sim layer.
"""

from fl_sim.channels.accounting import (
    analog_channel_uses,
    capacity_bits_per_use,
    compare_analog_digital,
    compressed_bits,
    digital_channel_uses,
    latency_s,
)
from fl_sim.channels.csi import CSI_MODES, estimate_csi
from fl_sim.channels.fading import FADING_KINDS, PathLoss, draw_fading
from fl_sim.channels.mac import REAL_NOISE_FRACTION, MACChannel
from fl_sim.channels.noise import (
    ChannelError,
    complex_awgn,
    linear_to_db,
    noise_std_from_snr,
    noise_var_from_snr,
    real_awgn,
    snr_db_to_linear,
)
from fl_sim.channels.participation import data_weights, draw_participation, participation_scale
from fl_sim.channels.power import POWER_POLICIES, PowerPlan, form_signals, power_control

__all__ = [
    "MACChannel",
    "REAL_NOISE_FRACTION",
    "ChannelError",
    "FADING_KINDS",
    "CSI_MODES",
    "POWER_POLICIES",
    "PathLoss",
    "PowerPlan",
    "draw_fading",
    "estimate_csi",
    "power_control",
    "form_signals",
    "draw_participation",
    "participation_scale",
    "data_weights",
    "snr_db_to_linear",
    "linear_to_db",
    "noise_std_from_snr",
    "noise_var_from_snr",
    "complex_awgn",
    "real_awgn",
    "capacity_bits_per_use",
    "analog_channel_uses",
    "digital_channel_uses",
    "compressed_bits",
    "latency_s",
    "compare_analog_digital",
]
