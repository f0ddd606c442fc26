"""Channel uses and latency: analog over-the-air (RLC) against digital one-node-at-a-time uplinks.

Source: [Abdi-thesis], Chapter 5, §5.5 (Fig. 5.3 text): 50 nodes, CifarNet
(≈1e6 parameters), SNR 18 dB ⇒ P/σ² ≈ 63 and C = 3 bits per channel use; digital QCS at gain 30
needs ≈ 53e6 bits ⇒ 17.8e6 channel uses, RLC at gain 20 needs 50e3, "a factor of at least 350".
The arithmetic (ratio 355.6): docs/notes.md#rlc-channel-uses.

* Analog: every node transmits its m symbols at the same time, so a round costs m channel uses
  whatever the number of nodes.
* Digital: nodes transmit one after another; node i needs ⌈bits_i / C⌉ channel uses at the capacity
  C = 0.5 log2(1 + SNR) bits per real channel use (the real-AWGN formula that gives the thesis'
  C = 3 at 18 dB; the analog scheme also uses one real dimension per channel use, see mac.py).
"""

from __future__ import annotations

import math
from typing import Sequence

from fl_sim.channels.noise import ChannelError, snr_db_to_linear

__all__ = [
    "capacity_bits_per_use",
    "analog_channel_uses",
    "digital_channel_uses",
    "compressed_bits",
    "latency_s",
    "compare_analog_digital",
]


def capacity_bits_per_use(snr_db: float) -> float:
    """C = 0.5 log2(1 + SNR) bits per real channel use (SNR linear = 10^(snr_db/10))."""
    return 0.5 * math.log2(1.0 + snr_db_to_linear(snr_db))


def analog_channel_uses(m: int, n_nodes: int = 1) -> int:
    """m: the channel uses of one over-the-air round, independent of ``n_nodes``."""
    if m < 1 or n_nodes < 0:
        raise ChannelError(f"need m >= 1 and n_nodes >= 0, got m={m}, n_nodes={n_nodes}")
    return int(m)


def digital_channel_uses(bits: Sequence[int] | int, snr_db: float) -> int:
    """Σ_i ⌈bits_i / C⌉: the channel uses of sending each node's bits one node after another."""
    per_node = [bits] if isinstance(bits, int) else list(bits)
    if any(b < 0 for b in per_node):
        raise ChannelError(f"bit counts must be >= 0, got {per_node}")
    c = capacity_bits_per_use(snr_db)
    return int(sum(math.ceil(b / c) for b in per_node))


def compressed_bits(d: int, gain: float, word_bits: int = 32) -> int:
    """⌈word_bits · d / gain⌉: the bits of one node's update at compression gain ``gain`` (eq. 4.11)."""
    if d < 1 or not gain > 0 or word_bits < 1:
        raise ChannelError(f"need d >= 1, gain > 0, word_bits >= 1, got {d}, {gain}, {word_bits}")
    return math.ceil(word_bits * d / gain)


def latency_s(channel_uses: int | float, bandwidth_hz: float, compute_s: float = 0.0) -> float:
    """compute_s + channel_uses / bandwidth_hz (bandwidth = symbol rate, channel uses per second)."""
    if not bandwidth_hz > 0 or compute_s < 0 or channel_uses < 0:
        raise ChannelError(
            f"need bandwidth_hz > 0, compute_s >= 0, channel_uses >= 0, got {bandwidth_hz}, {compute_s}, {channel_uses}"
        )
    return float(compute_s) + float(channel_uses) / float(bandwidth_hz)


def compare_analog_digital(
    d: int, n_nodes: int, snr_db: float, *, digital_gain: float, analog_gain: float, word_bits: int = 32
) -> dict[str, float]:
    """The thesis' Fig. 5.3 comparison: digital bits and channel uses, analog channel uses, ratio.

    ``n_nodes`` is the number of nodes that transmit (the thesis' 17.8e6 counts all 50).
    """
    bits_node = compressed_bits(d, digital_gain, word_bits)
    digital_uses = digital_channel_uses([bits_node] * n_nodes, snr_db)
    analog_uses = analog_channel_uses(max(1, round(d / analog_gain)), n_nodes)
    return {
        "capacity_bits_per_use": capacity_bits_per_use(snr_db),
        "digital_bits": float(bits_node * n_nodes),
        "digital_channel_uses": float(digital_uses),
        "analog_channel_uses": float(analog_uses),
        "ratio": digital_uses / analog_uses,
    }
