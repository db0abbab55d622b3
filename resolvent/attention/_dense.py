"""Dense chain attention: the readable reference (SPEC 2.1, ``method="dense"``).

Materialises the ``n x n`` causal softmax attention and solves the lower-triangular system
``(I - gamma A) X = A V`` directly.  O(n^2 d + n^2 dv) time, O(n^2) memory.
"""

from __future__ import annotations

import numpy as np
from scipy.linalg import solve_triangular


def causal_attention(q: np.ndarray, k: np.ndarray, scale: float) -> np.ndarray:
    """``softmax(scale q k^T + causal mask)`` row-wise, shape (B, n, n)."""
    n = q.shape[-2]
    s = scale * (q @ np.swapaxes(k, -1, -2))
    s[..., ~np.tri(n, dtype=bool)] = -np.inf
    s -= s.max(axis=-1, keepdims=True)  # the diagonal is always finite
    np.exp(s, out=s)
    s /= s.sum(axis=-1, keepdims=True)
    return s


def chain_lower(A: np.ndarray, U: np.ndarray, gamma: np.ndarray) -> np.ndarray:
    """``(1 - gamma) (I - gamma A)^{-1} U`` for lower-triangular ``A`` of shape (B, n, n)."""
    n = A.shape[-1]
    g = gamma.reshape(-1, 1, 1).astype(A.dtype, copy=False)
    M = np.eye(n, dtype=A.dtype) - g * A
    X = solve_triangular(M, U, lower=True, check_finite=False)
    return (1 - g) * X


def forward(q, k, v, gamma, scale):
    """Dense chain attention on flattened inputs: q, k (B, n, d), v (B, n, dv), gamma (B,)."""
    A = causal_attention(q, k, scale)
    return chain_lower(A, A @ v, gamma)
