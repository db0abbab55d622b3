"""Float64 references built the slow, obvious way, straight from the formulas of SPEC.md.

Nothing here is shared with the library: each matrix is constructed entry by entry so that a test
compares two independent computations.
"""

from __future__ import annotations

import numpy as np


def _logsoftmax_rows(logw: np.ndarray) -> np.ndarray:
    """Row-normalise weights given as logarithms (-inf for a zero weight)."""
    mx = np.max(logw, axis=-1, keepdims=True)
    w = np.exp(logw - mx)
    return w / w.sum(axis=-1, keepdims=True)


def dense_attention(q, k, scale=None) -> np.ndarray:
    """Causal softmax attention ``softmax(scale q k^T + mask)`` in float64, shape (..., n, n)."""
    q = np.asarray(q, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    n, d = q.shape[-2:]
    scale = 1.0 / np.sqrt(d) if scale is None else scale
    s = scale * q @ np.swapaxes(k, -1, -2)
    s = np.where(np.tril(np.ones((n, n), dtype=bool)), s, -np.inf)
    return _logsoftmax_rows(s)


def ahat(q, k, block_size, topk=0, scale=None) -> np.ndarray:
    """The structured attention matrix of SPEC 2.2 (``topk=0``) and 2.3 (``topk>0``), entry by entry."""
    q = np.asarray(q, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    batch = q.shape[:-2]
    n, d = q.shape[-2:]
    scale = 1.0 / np.sqrt(d) if scale is None else scale
    b = block_size
    m = -(-n // b)
    blocks = [range(J * b, min(n, (J + 1) * b)) for J in range(m)]
    out = np.zeros(batch + (n, n))
    for idx in np.ndindex(*batch):
        qi, ki = q[idx], k[idx]
        qbar = np.array([qi[list(B)].mean(axis=0) for B in blocks])
        kbar = np.array([ki[list(B)].mean(axis=0) for B in blocks])
        for t in range(n):
            I = t // b
            logw = np.full(n, -np.inf)
            for s in range(I * b, t + 1):
                logw[s] = scale * qi[t] @ ki[s]
            # the k earlier blocks this token scores highest against their mean keys; ties -> later block
            cand = list(range(I))
            scores = {J: scale * qi[t] @ kbar[J] for J in cand}
            chosen = sorted(cand, key=lambda J: (scores[J], J), reverse=True)[: max(topk, 0)]
            for J in cand:
                for s in blocks[J]:
                    if J in chosen:
                        logw[s] = scale * qi[t] @ ki[s]
                    else:
                        logw[s] = scale * qbar[I] @ kbar[J]
            out[idx + (t,)] = _logsoftmax_rows(logw)
    return out


def chain_reference(A, V, gamma) -> np.ndarray:
    """``(1 - gamma) A (I - gamma A)^{-1} V`` with an explicit inverse, float64, gamma per batch entry."""
    A = np.asarray(A, dtype=np.float64)
    V = np.asarray(V, dtype=np.float64)
    n = A.shape[-1]
    g = np.asarray(gamma, dtype=np.float64)[..., None, None]
    inv = np.linalg.inv(np.eye(n) - g * A)
    return (1.0 - g) * (A @ (inv @ V))
