"""Synthetic(α, β): the federated data of Li et al., "Federated Optimization in Heterogeneous Networks"
(FedProx, MLSys 2020), §5.1, as produced by the authors' ``generate_synthetic.py`` (the LEAF-style
synthetic benchmark; [Li-FedProx-2020], [Caldas-LEAF-2018] in docs/references.md). The formulas are the
paper's, the constants its code's.

Client k (of K):
    u_k ~ N(0, α²),  W_k ~ N(u_k, 1) ∈ R^{d×C},  b_k ~ N(u_k, 1) ∈ R^C     (model heterogeneity)
    B_k ~ N(0, β²),  v_k ~ N(B_k, 1) ∈ R^d                                 (feature heterogeneity)
    x ~ N(v_k, Σ),  Σ = diag(j^-1.2), j = 1..d;   y = argmax softmax(W_kᵀ x + b_k) = argmax(W_kᵀ x + b_k)
    n_k = ⌊lognormal(4, 2)⌋ + 50 samples (the paper's "power law"), capped at ``SIZE_CAP``.

Erratum (paper vs code): the paper writes u_k ~ N(0, α) and B_k ~ N(0, β) as if α, β were variances;
its generator calls ``np.random.normal(0, alpha)``, i.e. α and β are standard deviations. We follow
the code, so Synthetic(0.5, 0.5) is the published data set (the two readings agree at 0 and 1).
``iid=True`` is the code's ``synthetic_iid``: one W ~ N(0, 1), b ~ N(0, 1) for every client and
v_k = 0, so every client draws from the same distribution (sizes still vary).

Test data: ``test_fraction`` of each client's n_k samples (rounded, at least 1, at most n_k − 1) are
drawn from that client's distribution into the common test set (FedProx splits every device's data
into local train and test parts).

Reproducibility: clients come in blocks of ``BLOCK`` with their own generators
(seed, "synthetic", purpose, block); a block always draws parameters for all its ``BLOCK`` clients,
so client k's data is the same for every K > k (a federation of 100 contains the one of 30).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fl_sim.rng import numpy_generator, torch_generator

__all__ = ["SyntheticData", "generate_synthetic", "client_sizes", "feature_bytes", "SIZE_CAP", "BLOCK"]

MIN_SIZE = 50  # n_k = ⌊lognormal⌋ + MIN_SIZE: every client has at least this many samples
SIZE_CAP = 1000  # FedProx's uncapped lognormal(4, 2) tail reaches 10^5 samples on one client
BLOCK = 256  # clients per generator block (a partial last block draws at most 255 clients' noise in vain)


@dataclass
class SyntheticData:
    """One Synthetic(α, β) federation.

    x_train (N, d) float32 and y_train (N,) int64 tensors, rows grouped by client in client order;
    owner_train (N,) int64 array, the client of each row; x_test, y_test, owner_test likewise;
    sizes (K,) n_k before the hold-out.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    owner_train: np.ndarray
    x_test: torch.Tensor
    y_test: torch.Tensor
    owner_test: np.ndarray
    sizes: np.ndarray


def client_sizes(num_clients: int, seed: int) -> np.ndarray:
    """n_k = min(⌊lognormal(4, 2)⌋ + 50, SIZE_CAP), k < num_clients (block-stable)."""
    blocks = -(-num_clients // BLOCK)
    draws = [numpy_generator(seed, "synthetic", "sizes", i).lognormal(4.0, 2.0, BLOCK) for i in range(blocks)]
    raw = np.concatenate(draws)[:num_clients] if draws else np.zeros(0)
    return np.minimum(raw.astype(np.int64) + MIN_SIZE, SIZE_CAP)


def feature_bytes(num_clients: int, seed: int, dim: int) -> int:
    """Memory of the generated features (train + test, float32): Σ_k n_k · d · 4 bytes."""
    return int(client_sizes(num_clients, seed).sum()) * dim * 4


def _block_rows(counts: np.ndarray, keep: int, w: np.ndarray, b: np.ndarray, v: np.ndarray, std: np.ndarray,
                g: torch.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Rows of the first ``keep`` clients of one block: x = v_k + std ⊙ z, y = argmax(x W_k + b_k).

    The noise z ~ N(0, I) is drawn for every client of the block (``counts`` covers all ``BLOCK``)
    and cut, so a client's rows do not depend on how many clients follow it. torch draws it (4x
    faster than NumPy's float32 normals here); the rest is NumPy, single-threaded and cheap.
    """
    m = int(counts[:keep].sum())
    x = torch.empty(int(counts.sum()), len(std)).normal_(generator=g).numpy()[:m]
    x *= std
    x += v[np.repeat(np.arange(keep), counts[:keep])]
    y = np.empty(m, dtype=np.int64)
    ends = np.cumsum(counts[:keep])
    # W_k differs per client: one small matmul per client on its contiguous rows (a batched einsum
    # over a gathered (m, d, C) copy of W was 10x slower and 60x the memory).
    for k in np.flatnonzero(counts[:keep]):
        s, e = int(ends[k] - counts[k]), int(ends[k])
        y[s:e] = np.argmax(x[s:e] @ w[k] + b[k], axis=1)
    return x, y


def generate_synthetic(
    num_clients: int, seed: int, *, alpha: float, beta: float, dim: int, classes: int, iid: bool, test_fraction: float
) -> SyntheticData:
    """Synthetic(α, β) for ``num_clients`` clients (module docstring); vectorised per block of clients."""
    blocks = -(-num_clients // BLOCK)
    sizes_all = client_sizes(blocks * BLOCK, seed)  # whole blocks (block-stable draws)
    n_test_all = np.clip(np.rint(test_fraction * sizes_all).astype(np.int64), 1, sizes_all - 1)
    n_train_all = sizes_all - n_test_all
    sizes, n_train, n_test = sizes_all[:num_clients], n_train_all[:num_clients], n_test_all[:num_clients]
    std = (np.arange(1, dim + 1, dtype=np.float64) ** -0.6).astype(np.float32)  # √Σ_jj = j^-0.6
    if iid:
        g = numpy_generator(seed, "synthetic", "global")
        w_glob = g.standard_normal((dim, classes))
        b_glob = g.standard_normal(classes)
    out = {p: (np.empty((int(c.sum()), dim), np.float32), np.empty(int(c.sum()), np.int64), [0])
           for p, c in (("train", n_train), ("test", n_test))}
    for i in range(blocks):
        lo = i * BLOCK
        keep = min(BLOCK, num_clients - lo)
        g = numpy_generator(seed, "synthetic", "params", i)
        u = g.normal(0.0, alpha, BLOCK)  # α is a standard deviation (module docstring, erratum)
        big_b = g.normal(0.0, beta, BLOCK)
        w = g.standard_normal((BLOCK, dim, classes)) + u[:, None, None]
        b = g.standard_normal((BLOCK, classes)) + u[:, None]
        v = g.standard_normal((BLOCK, dim)) + big_b[:, None]
        if iid:
            w = np.broadcast_to(w_glob, (BLOCK, dim, classes))
            b = np.broadcast_to(b_glob, (BLOCK, classes))
            v = np.zeros((BLOCK, dim))
        w, b, v = (np.ascontiguousarray(a[:keep], dtype=np.float32) for a in (w, b, v))
        for purpose, counts in (("train", n_train_all), ("test", n_test_all)):
            x, y = _block_rows(counts[lo : lo + BLOCK], keep, w, b, v, std,
                               torch_generator(seed, "synthetic", purpose, i))
            x_all, y_all, off = out[purpose]
            x_all[off[0] : off[0] + len(y)] = x
            y_all[off[0] : off[0] + len(y)] = y
            off[0] += len(y)
    (x_tr, y_tr, _), (x_te, y_te, _) = out["train"], out["test"]
    clients = np.arange(num_clients)
    return SyntheticData(torch.from_numpy(x_tr), torch.from_numpy(y_tr), np.repeat(clients, n_train),
                         torch.from_numpy(x_te), torch.from_numpy(y_te), np.repeat(clients, n_test), sizes)
