"""Vectorized cohorts: the local training of many clients of one model architecture in one batched call.

The same computation as :func:`fl_sim.clients.training.train_local` run once per client (McMahan et al.
2017, Algorithm 1 ClientUpdate: minibatch SGD on cross-entropy, optional momentum and weight decay with
``torch.optim.SGD``'s semantics), but for a cohort of C clients at once: every client's parameters are
stacked along a leading axis, one batched forward pass computes all C clients' logits per step
(fl_sim.clients.stacked: layer by layer for a Sequential, else ``torch.func.vmap`` of
``torch.func.functional_call``) and one backward pass all C gradients. Small models spend most of a
sequential loop in per-client Python and kernel launches, not arithmetic; the batched step removes that.

Exactly the inline numbers, up to float rounding:

* batches: each client's batches come from :func:`fl_sim.clients.training.batch_matrix` (the batches of
  ``batch_indices``, which ``train_local`` reads, as one tensor) with the
  client's own generator (seeded from (run seed, round, "local-train", cid) by the caller), so the cohort
  (its size, its members, its chunking) never changes a client's randomness;
* unequal dataset sizes and partial last batches: a batch is padded to ``batch_size`` rows with a mask,
  and the client's loss is the mean cross-entropy over its valid rows (what ``nn.CrossEntropyLoss`` gives
  on the unpadded batch);
* different numbers of local steps: clients are sorted by their step count, so at step s the active
  clients are a prefix of the cohort; only that prefix is computed and updated (its SGD state included);
* SGD: g = ∇L + wd·w; buf = μ·buf + g (buf = g at the first step, as torch's SGD); w ← w − lr·buf
  (w ← w − lr·g without momentum).

Models with buffers (BatchNorm running statistics) or dropout are not vectorized here (their train-mode
state or randomness would differ from the inline path): :func:`vectorizable` says so and the caller
falls back to the per-client path.

Memory: a cohort is split into chunks of at most ``chunk`` clients; :func:`auto_chunk` sizes them from a
byte budget, the parameter count and the activations of one batch (measured with forward hooks).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from fl_sim.clients.stacked import cohort_forward
from fl_sim.clients.training import LocalTrainSpec, batch_matrix

__all__ = ["CohortClient", "vectorizable", "train_cohort", "evaluate_cohort", "auto_chunk", "per_client_bytes"]


@dataclass
class CohortClient:
    """One client of a cohort: its data, its starting parameters (name -> tensor) and its batch generator."""

    x: torch.Tensor
    y: torch.Tensor
    params: dict[str, torch.Tensor]
    generator: torch.Generator | None = None


def vectorizable(model: nn.Module) -> str:
    """'' when :func:`train_cohort` computes exactly what ``train_local`` would for ``model``, else why not."""
    if any(True for _ in model.buffers()):
        return "the model has buffers (BatchNorm running statistics)"
    if any(isinstance(m, nn.modules.dropout._DropoutNd) for m in model.modules()):
        return "the model has dropout (its randomness would differ from the per-client path)"
    return ""


def _activation_numel(model: nn.Module, sample: torch.Tensor) -> int:
    """Sum of every leaf module's output size for one sample (what autograd keeps for the backward pass)."""
    total = [0]

    def hook(_m, _i, out):
        if isinstance(out, torch.Tensor):
            total[0] += out.numel()

    leaves = [m for m in model.modules() if not any(True for _ in m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        with torch.no_grad():
            model(sample.unsqueeze(0))
    finally:
        for h in handles:
            h.remove()
    return total[0] + sample.numel()


def per_client_bytes(model: nn.Module, sample: torch.Tensor, batch_size: int) -> int:
    """Working memory of one client in a chunk: parameters, gradient, momentum buffer, update temporaries
    (5 d-vectors) and the activations of one batch, twice (forward outputs and their gradients)."""
    d = sum(p.numel() for p in model.parameters())
    return 4 * (5 * d + 2 * batch_size * _activation_numel(model, sample))


# Largest automatic chunk. Beyond a few hundred clients the stacked parameters, gradients and momentum of a
# chunk leave the CPU caches: at 1,000 quickstart clients a round, chunks of 100-250 took 0.71-0.74 s a round
# against 0.79-0.80 s for one chunk of 1,000 with idle cores, 0.93-0.95 s against 1.13-1.17 s with one busy
# process beside the run (docs/performance.md, "Busy machines").
AUTO_CHUNK_MAX = 256


def auto_chunk(model: nn.Module, sample: torch.Tensor, batch_size: int, budget_bytes: int) -> int:
    """Clients per chunk so that a chunk's working memory stays within ``budget_bytes`` (at least 1, at most
    :data:`AUTO_CHUNK_MAX`)."""
    return max(1, min(AUTO_CHUNK_MAX, int(budget_bytes // per_client_bytes(model, sample, batch_size))))


def _plan(clients: Sequence[CohortClient], spec: LocalTrainSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each client's batches as (global row index [C, S, B], valid-row mask [C, S, B], steps [C]).

    Rows index the concatenation of the clients' data in cohort order; padded rows point at row 0.
    """
    B = spec.batch_size
    mats = [batch_matrix(len(c.y), spec, c.generator) for c in clients]
    steps = torch.tensor([len(m) for m in mats], dtype=torch.long)
    S = max(int(steps.max()) if mats else 0, 1)
    offsets = torch.cumsum(torch.tensor([0] + [len(c.y) for c in clients[:-1]]), 0)
    padded = torch.full((len(mats), S, B), -1, dtype=torch.long)
    for i, m in enumerate(mats):
        padded[i, : len(m)] = m
    mask = padded >= 0
    index = torch.where(mask, padded + offsets.view(-1, 1, 1), 0)
    return index, mask, steps


def _masked_mean_ce(logits: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-client mean cross-entropy over the valid rows: logits [C, B, K], y [C, B], mask [C, B] -> [C].

    Written with log_softmax + gather: ``F.cross_entropy`` under vmap goes through a slower decomposition.
    """
    ce = -logits.log_softmax(-1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
    return (ce * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def _stack(clients: Sequence[CohortClient], names: Sequence[str], device) -> dict[str, torch.Tensor]:
    """Stacked parameters [C, ...]; one broadcast copy when every client starts from the same tensors."""
    out = {}
    for k in names:
        first = clients[0].params[k]
        if all(c.params[k] is first for c in clients):
            out[k] = first.to(device=device, dtype=torch.float32).unsqueeze(0).repeat(len(clients), *([1] * first.dim()))
        else:
            out[k] = torch.stack([c.params[k] for c in clients]).to(device=device, dtype=torch.float32)
    return out


def train_cohort(
    model: nn.Module,
    clients: Sequence[CohortClient],
    spec: LocalTrainSpec,
    *,
    device: str | torch.device = "cpu",
    generic: bool = False,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Train every client of ``clients`` from its own ``params`` (module docstring); one batched call.

    Returns (trained parameters name -> [C, ...] on the CPU, in ``clients`` order; mean training loss per
    client [C], float64, NaN-free: 0/1 steps give the mean of the steps taken as ``train_local``).
    ``generic``: always vmap the whole model (fl_sim.clients.stacked; tests compare the two forwards).
    """
    why = vectorizable(model)
    if why:
        raise ValueError(f"train_cohort: {why}")
    C = len(clients)
    names = [k for k, _ in model.named_parameters()]
    if C == 0:
        return {k: torch.zeros(0) for k in names}, torch.zeros(0, dtype=torch.float64)
    device = torch.device(device)
    index, mask, steps = _plan(clients, spec)
    order = torch.argsort(steps, descending=True, stable=True)  # active clients = a prefix at every step
    index, mask, steps = index[order].to(device), mask[order].to(device), steps[order]
    x = torch.cat([c.x for c in clients]).to(device)
    y = torch.cat([c.y for c in clients]).to(device)
    params = _stack([clients[int(i)] for i in order], names, device)
    bufs = {k: torch.zeros_like(v) for k, v in params.items()} if spec.momentum else None
    loss_sum = torch.zeros(C, dtype=torch.float64, device=device)

    forward = cohort_forward(model, generic=generic)  # [a, B, ...] -> logits [a, B, classes]
    model.train()
    active_at = [int((steps > s).sum()) for s in range(int(steps.max()))]
    for s, a in enumerate(active_at):
        idx, mb = index[:a, s], mask[:a, s].to(torch.float32)
        p = {k: v[:a].detach().requires_grad_(True) for k, v in params.items()}  # leaves sharing params' storage
        # Each client's loss depends only on its own slice of p, so the gradient of the sum of the clients'
        # losses is every client's own gradient (one backward pass for the cohort).
        loss = _masked_mean_ce(forward(p, x[idx]), y[idx], mb)
        grads = torch.autograd.grad(loss.sum(), list(p.values()))
        loss_sum[:a] += loss.detach().to(torch.float64)
        with torch.no_grad():
            for (k, w), g in zip(p.items(), grads):  # w: a view of params[k][:a], updated in place
                w = w.detach()
                if spec.weight_decay:
                    g = g.add(w, alpha=spec.weight_decay)
                if bufs is not None:
                    b = bufs[k][:a]
                    b.mul_(spec.momentum).add_(g)
                    g = b
                w.add_(g, alpha=-spec.lr)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(C)
    inverse = inverse.to(device)
    trained = {k: v[inverse].cpu() for k, v in params.items()}
    mean_loss = (loss_sum.cpu() / steps.clamp(min=1).to(torch.float64))[inverse.cpu()]
    return trained, mean_loss


@torch.no_grad()
def evaluate_cohort(
    model: nn.Module, clients: Sequence[CohortClient], *, batch_size: int = 1024, device: str | torch.device = "cpu",
    generic: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean cross-entropy [C], accuracy [C]) of every client's ``params`` on its own (x, y), batched;
    NaN for a client without data, as :func:`fl_sim.clients.training.evaluate_model`."""
    C = len(clients)
    if C == 0:
        return torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.float64)
    device = torch.device(device)
    names = [k for k, _ in model.named_parameters()]
    params = _stack(clients, names, device)
    sizes = torch.tensor([len(c.y) for c in clients])
    offsets = torch.cumsum(sizes, 0) - sizes
    x = torch.cat([c.x for c in clients]).to(device)
    y = torch.cat([c.y for c in clients]).to(device)
    forward = cohort_forward(model, generic=generic)
    model.eval()
    loss_sum = torch.zeros(C, dtype=torch.float64, device=device)
    correct = torch.zeros(C, dtype=torch.float64, device=device)
    n_max = int(sizes.max())
    for start in range(0, n_max, batch_size):
        local = torch.arange(start, min(start + batch_size, n_max))
        valid = (local.unsqueeze(0) < sizes.unsqueeze(1)).to(device)
        rows = torch.where(valid.cpu(), offsets.unsqueeze(1) + local.unsqueeze(0), 0).to(device)
        out = forward(params, x[rows])
        ce = nn.functional.cross_entropy(out.flatten(0, 1), y[rows].flatten(), reduction="none").view(rows.shape)
        loss_sum += (ce * valid).sum(1).to(torch.float64)
        correct += ((out.argmax(-1) == y[rows]) & valid).sum(1).to(torch.float64)
    n = sizes.to(torch.float64)
    nan = torch.full_like(n, math.nan)
    return (torch.where(n > 0, loss_sum.cpu() / n.clamp(min=1), nan), torch.where(n > 0, correct.cpu() / n.clamp(min=1), nan))
