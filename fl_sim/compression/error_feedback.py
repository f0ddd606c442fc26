"""Error-feedback memories, kept apart from the codecs (compensate before encoding, update after).

Sources:
  * Classic EF: [Karimireddy-2019] ("Error feedback fixes SignSGD"), [Abdi-thesis] ref. [28].
  * Weighted EF: [Abdi-thesis] Ch. 4 eq. (4.14), Lemma 9 eqs. (4.15)-(4.16), Remark 3 eqs. (4.17)-(4.18);
    docs/notes.md#weighted-ef (the (4.16) form is the one re-derived from the proof's D.15-D.16, not the
    extracted text's).
  * Server-side EF: [Tang-FIHT] (docs/notes.md#tang-fiht):
    p = eta g + e, Delta = A(Phi p), e <- p - Delta.

The client memories are pure functions of tensors (``compensate(g, residual)``, ``update(residual, z,
z_hat)``; residual ``None`` means 0), so the caller keeps the residual where it wants (Flower
``context.state``, a bounded store, fp16). The server memory holds its one vector and is checkpointable.
"""

from __future__ import annotations

import math

import torch

from fl_sim.compression.base import CodecError

__all__ = [
    "ErrorFeedback",
    "WeightedErrorFeedback",
    "ServerErrorFeedback",
    "optimal_beta",
    "residual_bound",
]


def _check_pair(a: torch.Tensor, b: torch.Tensor, who: str, names: str) -> None:
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        raise CodecError(f"{who}: {names} must be torch.Tensors")
    if a.shape != b.shape:
        raise CodecError(f"{who}: {names} have shapes {tuple(a.shape)} and {tuple(b.shape)}; they must match")


def _as_float(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Residuals may be stored in fp16: compute in the gradient's floating dtype."""
    return t.to(like.dtype if torch.is_floating_point(like) else torch.float32)


class ErrorFeedback:
    """Classic error feedback ([Karimireddy-2019]).

        z_t = g_t + r_t,   z_hat_t = DECODE(ENCODE(z_t)),   r_{t+1} = z_t - z_hat_t,   r_0 = 0.

    g_t: the update to send; r_t: residual (what compression dropped so far); z_t: what is encoded.
    """

    beta = 1.0

    def compensate(self, g: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        """z = g + r (g itself when there is no residual yet)."""
        if residual is None:
            return g
        _check_pair(g, residual, type(self).__name__ + ".compensate", "g and residual")
        return g + _as_float(residual, g)

    def update(self, residual: torch.Tensor | None, z: torch.Tensor, z_hat: torch.Tensor) -> torch.Tensor:
        """r_{t+1} = z - z_hat."""
        _check_pair(z, z_hat, type(self).__name__ + ".update", "z and z_hat")
        return z - z_hat.to(z.dtype)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class WeightedErrorFeedback(ErrorFeedback):
    """Abdi's weighted error feedback, eq. (4.14), r_0 = 0, forgetting factor beta in (0, 1]:

        z_t = g_t + beta r_t
        e_t = z_t - z_hat_t                      (z_hat_t: the compressed-then-decoded z_t)
        r_{t+1} = (1 - beta) r_t + e_t

    beta = 1 is classic EF. Remark 3: beta* = 1/(gamma + 1) for Unbiased-QCS (eq. 4.17), beta* = 1 for
    MMSE-QCS (eq. 4.18) (:func:`optimal_beta`); Lemma 9 bounds E||r_t||^2 <= eta B (:func:`residual_bound`).
    """

    def __init__(self, *, beta: float = 1.0) -> None:
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 < beta <= 1.0:
            raise CodecError(f"WeightedErrorFeedback: beta must be in (0, 1], got {beta!r}; try optimal_beta(gamma, alpha)")
        self.beta = float(beta)

    def compensate(self, g: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        """z = g + beta r."""
        if residual is None:
            return g
        _check_pair(g, residual, "WeightedErrorFeedback.compensate", "g and residual")
        return g + self.beta * _as_float(residual, g)

    def update(self, residual: torch.Tensor | None, z: torch.Tensor, z_hat: torch.Tensor) -> torch.Tensor:
        """r_{t+1} = (1 - beta) r_t + (z - z_hat)."""
        e = super().update(residual, z, z_hat)
        if residual is None or self.beta == 1.0:
            return e
        _check_pair(e, residual, "WeightedErrorFeedback.update", "z and residual")
        return (1.0 - self.beta) * _as_float(residual, e) + e

    def __repr__(self) -> str:
        return f"WeightedErrorFeedback(beta={self.beta!r})"


def _check_alpha(alpha: str, who: str) -> None:
    if alpha not in ("unbiased", "mmse"):
        raise CodecError(f"{who}: alpha must be 'unbiased' or 'mmse', got {alpha!r}")


def optimal_beta(gamma: float, alpha: str = "unbiased") -> float:
    """Remark 3: beta* = 1/(gamma + 1) for Unbiased-QCS (eq. 4.17), 1 for MMSE-QCS (eq. 4.18)."""
    _check_alpha(alpha, "optimal_beta")
    if not gamma >= 0:
        raise CodecError(f"optimal_beta: gamma must be >= 0, got {gamma!r}")
    return 1.0 / (gamma + 1.0) if alpha == "unbiased" else 1.0


def residual_bound(gamma: float, beta: float, alpha: str = "unbiased") -> float:
    """Lemma 9: eta with E||r_t||^2 <= eta B whenever E||g_t||^2 <= B.

    Unbiased-QCS (4.15): eta = gamma / (1 - ((1 - beta)^2 + beta^2 gamma)), for 0 < beta < min(1, 2/(1+gamma)).
    MMSE-QCS (4.16):     eta = gamma / (sqrt(gamma + 1 - (1 - beta)^2) - sqrt(gamma))^2, for 0 < beta <= 1.
    At beta*: eta_u* = gamma (gamma + 1), eta_m* = gamma / (sqrt(gamma + 1) - sqrt(gamma))^2 (Remark 3).
    """
    _check_alpha(alpha, "residual_bound")
    if not gamma >= 0:
        raise CodecError(f"residual_bound: gamma must be >= 0, got {gamma!r}")
    if alpha == "unbiased":
        upper = min(1.0, 2.0 / (1.0 + gamma))
        if not 0.0 < beta < upper and not (gamma == 0 and beta == 1.0):
            raise CodecError(
                f"residual_bound: Lemma 9 (4.15) needs 0 < beta < min(1, 2/(1+gamma)) = {upper:.4g}, got beta={beta!r}"
            )
        return gamma / (1.0 - ((1.0 - beta) ** 2 + beta**2 * gamma))
    if not 0.0 < beta <= 1.0:
        raise CodecError(f"residual_bound: Lemma 9 (4.16) needs 0 < beta <= 1, got beta={beta!r}")
    return gamma / (math.sqrt(gamma + 1.0 - (1.0 - beta) ** 2) - math.sqrt(gamma)) ** 2


class ServerErrorFeedback:
    """Server-side error feedback of Tang et al. (biased sparse recovery at the server):

        p_t = eta g_t + e_t,   Delta_t = RECOVER(p_t),   x_{t+1} = x_t - Delta_t (or + for updates),
        e_{t+1} = p_t - Delta_t,   e_0 = 0.

    g_t: the round's averaged (decoded or measured) update; eta: server step size; e_t: the error held
    at the server (O(d) once, O(1) per client). ``compensate`` forms p, ``update`` stores e.
    The vector may live in measurement space (store Phi e) when the recovery works there.
    """

    def __init__(self, *, lr: float = 1.0) -> None:
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
            raise CodecError(f"ServerErrorFeedback: lr (eta) must be a positive number, got {lr!r}")
        self.lr = float(lr)
        self.error: torch.Tensor | None = None

    def compensate(self, g: torch.Tensor) -> torch.Tensor:
        """p = eta g + e."""
        if not isinstance(g, torch.Tensor):
            raise CodecError("ServerErrorFeedback.compensate: g must be a torch.Tensor")
        if self.error is None:
            return self.lr * g
        _check_pair(g, self.error, "ServerErrorFeedback.compensate", "g and the stored error")
        return self.lr * g + self.error.to(g.dtype)

    def update(self, p: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """e <- p - Delta; returns the new e."""
        _check_pair(p, delta, "ServerErrorFeedback.update", "p and delta")
        self.error = (p - delta.to(p.dtype)).detach().clone()
        return self.error

    def reset(self) -> None:
        self.error = None

    def state_dict(self) -> dict:
        return {"lr": self.lr, "error": None if self.error is None else self.error.clone()}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or "error" not in state:
            raise CodecError("ServerErrorFeedback.load_state_dict: expected the dict from state_dict()")
        err = state["error"]
        if err is not None and not isinstance(err, torch.Tensor):
            raise CodecError("ServerErrorFeedback.load_state_dict: 'error' must be a tensor or None")
        self.lr = float(state.get("lr", self.lr))
        self.error = None if err is None else err.clone()

    def __repr__(self) -> str:
        return f"ServerErrorFeedback(lr={self.lr!r})"
