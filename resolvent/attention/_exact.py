"""Exact streaming chain attention (SPEC 2.1, ``method="exact"``).

The same numbers as the dense reference, with no ``n x n`` buffer.  Queries are processed in tiles
``I`` of ``tq`` rows; for each, one pass over the earlier keys in chunks of ``tk`` keeps an online
log-sum-exp (running max ``mu`` and sum ``l``) and accumulates, unnormalised and rescaled as the
max moves,

    acc_I = sum_{J < I} exp(S_IJ - mu) [V_J | X_J]     (one matrix product per chunk)

The diagonal tile closes the normaliser; with ``A_II = exp(S_II - mu) / l`` (causal inside),
``U_I = (A V)_I`` and ``C_I = sum_{J<I} A_IJ X_J``, block forward substitution gives

    X_I = (I - gamma A_II)^{-1} (U_I + gamma C_I),      Y = (1 - gamma) X.

Time O(n^2 (d + dv)), memory O(n dv + tq tk) per batch entry.
"""

from __future__ import annotations

import numpy as np
from scipy.linalg import solve_triangular

from .._threads import one_blas_thread, split_batch

TQ = 128  # query rows per tile
TK = 1024  # keys per chunk of the streaming pass


def row_logsumexp(q, k, scale, tq=None, tk=None):
    """``log sum_{s <= t} exp(scale q_t . k_s)`` for every row t, streaming over key chunks.

    Shapes: q, k (B, n, d) -> (B, n).  Memory O(B tq tk).
    """
    with one_blas_thread():
        return _row_logsumexp(q, k, scale, tq or TQ, tk or TK)


def _row_logsumexp(q, k, scale, tq, tk):
    B, n, _ = q.shape
    out = np.empty((B, n), dtype=q.dtype)
    for i0 in range(0, n, tq):
        i1 = min(n, i0 + tq)
        qi = scale * q[:, i0:i1]
        mu = np.full((B, i1 - i0), -np.inf, dtype=q.dtype)
        ell = np.zeros((B, i1 - i0), dtype=q.dtype)
        for j0 in range(0, i1, tk):
            j1 = min(i1, j0 + tk)
            s = qi @ np.swapaxes(k[:, j0:j1], -1, -2)
            if j1 > i0:  # the chunk reaches the diagonal: mask s > t
                s[:, np.arange(i0, i1)[:, None] < np.arange(j0, j1)[None, :]] = -np.inf
            mu_new = np.maximum(mu, s.max(axis=-1))
            ell = ell * np.exp(mu - mu_new) + np.exp(s - mu_new[..., None]).sum(axis=-1)
            mu = mu_new
        out[:, i0:i1] = mu + np.log(ell)
    return out


def forward(q, k, v, gamma, scale):
    """Exact chain attention on flattened inputs: q, k (B, n, d), v (B, n, dv), gamma (B,).

    The batch is split over the cores, BLAS on one thread (see ``resolvent._threads``).
    """
    B, n, d = q.shape
    return split_batch(_forward, (q, k, v, gamma), (scale,), B * n * (d + v.shape[-1]))


def _forward(q, k, v, gamma, scale):
    tq, tk = TQ, TK
    B, n, _ = q.shape
    dv = v.shape[-1]
    dt = q.dtype
    g = gamma.astype(dt, copy=False).reshape(B, 1, 1)
    # [V | X]: X is filled tile by tile, so one product per chunk serves both accumulations.
    VX = np.empty((B, n, 2 * dv), dtype=dt)
    VX[..., :dv] = v
    tri = np.tri(tq, dtype=bool)
    eye = np.eye(tq, dtype=dt)
    with np.errstate(invalid="ignore", over="ignore"):
        for i0 in range(0, n, tq):
            i1 = min(n, i0 + tq)
            T = i1 - i0
            qi = scale * q[:, i0:i1]
            mu = np.full((B, T), -np.inf, dtype=dt)
            ell = np.zeros((B, T), dtype=dt)
            acc = np.zeros((B, T, 2 * dv), dtype=dt)
            for j0 in range(0, i0, tk):
                j1 = min(i0, j0 + tk)
                s = qi @ np.swapaxes(k[:, j0:j1], -1, -2)
                mu_new = np.maximum(mu, s.max(axis=-1))
                alpha = np.exp(mu - mu_new)
                np.exp(s - mu_new[..., None], out=s)
                ell = ell * alpha + s.sum(axis=-1)
                acc *= alpha[..., None]
                acc += s @ VX[:, j0:j1]
                mu = mu_new
            # diagonal tile (causal inside)
            s = qi @ np.swapaxes(k[:, i0:i1], -1, -2)
            s[:, ~tri[:T, :T]] = -np.inf
            mu_new = np.maximum(mu, s.max(axis=-1))
            alpha = np.exp(mu - mu_new)
            np.exp(s - mu_new[..., None], out=s)
            ell = ell * alpha + s.sum(axis=-1)
            acc *= alpha[..., None]
            acc[..., :dv] += s @ v[:, i0:i1]
            inv_l = (1.0 / ell)[..., None]
            A_II = s * inv_l
            rhs = acc[..., :dv] * inv_l + g * (acc[..., dv:] * inv_l)
            M = eye[:T, :T] - g * A_II
            VX[:, i0:i1, dv:] = solve_triangular(M, rhs, lower=True, check_finite=False)
    return (1 - g) * VX[..., dv:]


def backward(q, k, v, gamma, scale, dy):
    """Vector-Jacobian product of :func:`forward`: ``(dq, dk, dv, dgamma)`` (see ``_backward``)."""
    B, n, d = q.shape
    return split_batch(_backward, (q, k, v, gamma, dy), (scale,), B * n * (d + v.shape[-1]))


def _backward(q, k, v, gamma, dy, scale):
    """Vector-Jacobian product of :func:`forward`, streaming: ``(dq, dk, dv, dgamma)``.

    ``G = (I - gamma A)^{-T} dX`` is upper triangular in the tiles, so it is solved by backward
    substitution over key tiles ``I`` from the last to the first.  For each, the column strip
    ``A_{>=I, I}`` (rows ``t >= i0``, the tile's columns) is recomputed from the saved row
    log-sum-exp; it serves the right side ``dX_I + gamma A_{>I,I}^T G_{>I}``, then the gradients
    ``dS = A * (G R_I^T - delta)`` (``R = V + gamma X``, ``delta_t = G_t . X_t``), ``dq += scale dS k_I``,
    ``dk_I = scale dS^T q``, ``dV_I = A^T G`` and ``(A X)_t`` for ``dgamma``.  Memory O(n tq).
    """
    tq = TQ
    B, n, _ = q.shape
    dt = q.dtype
    g = gamma.astype(dt, copy=False).reshape(B, 1, 1)
    X = _forward(q, k, v, gamma, scale) / (1 - g)
    lse = row_logsumexp(q, k, scale)
    dX = (1 - g) * dy
    R = v + g * X
    G = np.empty_like(dX)
    delta = np.empty((B, n), dtype=dt)
    AX = np.zeros_like(X)
    dq = np.zeros_like(q)
    dk = np.empty_like(k)
    dv = np.empty_like(v)
    tri = np.tri(tq, dtype=bool)
    eye = np.eye(tq, dtype=dt)
    for i0 in reversed(range(0, n, tq)):
        i1 = min(n, i0 + tq)
        T = i1 - i0
        S = scale * (q[:, i0:] @ np.swapaxes(k[:, i0:i1], -1, -2))  # (B, n - i0, T)
        S -= lse[:, i0:, None]
        S[:, :T][:, ~tri[:T, :T]] = -np.inf
        A = np.exp(S, out=S)
        rhs = dX[:, i0:i1] + g * (np.swapaxes(A[:, T:], -1, -2) @ G[:, i1:])
        M = eye[:T, :T] - g * A[:, :T]
        G[:, i0:i1] = solve_triangular(M, rhs, lower=True, trans="T", check_finite=False)
        delta[:, i0:i1] = np.einsum("bij,bij->bi", G[:, i0:i1], X[:, i0:i1])
        Gs = G[:, i0:]
        dS = A * (Gs @ np.swapaxes(R[:, i0:i1], -1, -2) - delta[:, i0:, None])
        dq[:, i0:] += scale * (dS @ k[:, i0:i1])
        dk[:, i0:i1] = scale * (np.swapaxes(dS, -1, -2) @ q[:, i0:])
        dv[:, i0:i1] = np.swapaxes(A, -1, -2) @ Gs
        AX[:, i0:] += A @ X[:, i0:i1]
    dgamma = -np.einsum("bij,bij->b", dy, X) + np.einsum("bij,bij->b", G, AX)
    return dq, dk, dv, dgamma
