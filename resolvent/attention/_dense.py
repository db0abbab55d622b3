"""Dense chain attention: the readable reference (SPEC 2.1, ``method="dense"``).

Materialises the ``n x n`` causal softmax attention and solves the lower-triangular system
``(I - gamma A) X = A V`` directly.  O(n^2 d + n^2 dv) time, O(n^2) memory.
"""

from __future__ import annotations

import numpy as np
from scipy.linalg import solve_triangular


def causal_attention(q: np.ndarray, k: np.ndarray, scale: float) -> np.ndarray:
    """``softmax(scale q k^T + causal mask)`` row-wise, shape (B, n, n).

    One ``n x n`` buffer per batch entry, transformed in place: fresh memory costs a page fault per
    4 KiB here, and at n = 8192 the temporaries of the out-of-place version took longer than the
    arithmetic.
    """
    n = q.shape[-2]
    s = q @ np.swapaxes(k, -1, -2)
    s *= scale
    upper = np.tri(n, dtype=bool)
    np.logical_not(upper, out=upper)
    np.copyto(s, -np.inf, where=upper)
    s -= s.max(axis=-1, keepdims=True)  # the diagonal is always finite
    np.exp(s, out=s)
    s /= s.sum(axis=-1, keepdims=True)
    return s


def _identity_minus(A: np.ndarray, g: np.ndarray) -> np.ndarray:
    """``I - g A`` for a stack (B, n, n), in one new buffer."""
    B, n, _ = A.shape
    M = A * (-g)
    M.reshape(B, n * n)[:, :: n + 1] += 1
    return M


def chain_lower(A: np.ndarray, U: np.ndarray, gamma: np.ndarray) -> np.ndarray:
    """``(1 - gamma) (I - gamma A)^{-1} U`` for lower-triangular ``A`` of shape (B, n, n)."""
    g = gamma.reshape(-1, 1, 1).astype(A.dtype, copy=False)
    X = solve_triangular(_identity_minus(A, g), U, lower=True, check_finite=False)
    return (1 - g) * X


def forward(q, k, v, gamma, scale):
    """Dense chain attention on flattened inputs: q, k (B, n, d), v (B, n, dv), gamma (B,)."""
    A = causal_attention(q, k, scale)
    return chain_lower(A, A @ v, gamma)


def backward(q, k, v, gamma, scale, dy):
    """Vector-Jacobian product of :func:`forward`: ``(dq, dk, dv, dgamma)``, dgamma of shape (B,).

    With ``X = (I - gamma A)^{-1} A V`` and ``Y = (1 - gamma) X``, ``G = (I - gamma A)^{-T} dX``
    (``dX = (1 - gamma) dY``) gives ``dV = A^T G``, ``dA = G (V + gamma X)^T``, and the softmax
    backward ``dS = A * (dA - delta)`` with ``delta_t = sum_s A_ts dA_ts = G_t . X_t`` (because
    ``A (V + gamma X) = X``); ``dgamma = -<dY, X> + <G, A X>``.
    """
    g = gamma.reshape(-1, 1, 1).astype(q.dtype, copy=False)
    A = causal_attention(q, k, scale)
    M = _identity_minus(A, g)
    X = solve_triangular(M, A @ v, lower=True, check_finite=False)
    G = solve_triangular(M, (1 - g) * dy, lower=True, trans="T", check_finite=False)
    delta = np.einsum("bij,bij->bi", G, X)[..., None]
    dS = A * (G @ np.swapaxes(v + g * X, -1, -2) - delta)
    dq = scale * (dS @ k)
    dk = scale * (np.swapaxes(dS, -1, -2) @ q)
    dv = np.swapaxes(A, -1, -2) @ G
    dgamma = -np.einsum("bij,bij->b", dy, X) + np.einsum("bij,bij->b", G, A @ X)
    return dq, dk, dv, dgamma
