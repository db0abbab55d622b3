"""Dense and exact (streaming) chain attention and their gradients on CuPy arrays.

Ports of ``resolvent/attention/_dense.py`` and ``_exact.py``: the same formulas, with cuBLAS
matmuls per tile and the blocked triangular solver of :mod:`._blockwise` for the diagonal tiles.
``exact`` never forms an ``n x n`` buffer: its largest temporary is ``B x tq x tk``.
"""

from __future__ import annotations

import numpy as np

from ._blockwise import batch_sum, lower_solve

TQ = 256  # query rows per tile
MAX_TILE_ELEMS = 1 << 26  # B * tq * tk, the largest temporary of the streaming passes (256 MB in float32)


def _tk(B, tq, n):
    tk = max(tq, (MAX_TILE_ELEMS // max(1, B * tq)) // tq * tq)
    return min(tk, max(n, tq))


def causal_attention(xp, q, k, scale):
    n = q.shape[-2]
    s = q @ xp.swapaxes(k, -1, -2)
    s *= q.dtype.type(scale)
    s = xp.where(xp.tri(n, dtype=bool), s, q.dtype.type(-np.inf))
    s -= s.max(axis=-1, keepdims=True)
    s = xp.exp(s)
    s /= s.sum(axis=-1, keepdims=True)
    return s


def _tri(xp, M, R, lower=True):
    return lower_solve(xp, M, R, lower=lower)


def dense_forward(xp, q, k, v, gamma, scale):
    n = q.shape[-2]
    A = causal_attention(xp, q, k, scale)
    g = gamma.reshape(-1, 1, 1)
    M = xp.eye(n, dtype=A.dtype) - g * A
    return (1 - g) * _tri(xp, M, A @ v)


def dense_backward(xp, q, k, v, gamma, scale, dy):
    n = q.shape[-2]
    g = gamma.reshape(-1, 1, 1)
    A = causal_attention(xp, q, k, scale)
    M = xp.eye(n, dtype=A.dtype) - g * A
    X = _tri(xp, M, A @ v)
    G = _tri(xp, xp.swapaxes(M, -1, -2), (1 - g) * dy, lower=False)
    delta = (G * X).sum(axis=-1)[..., None]
    dS = A * (G @ xp.swapaxes(v + g * X, -1, -2) - delta)
    s = q.dtype.type(scale)
    dq = s * (dS @ k)
    dk = s * (xp.swapaxes(dS, -1, -2) @ q)
    dv = xp.swapaxes(A, -1, -2) @ G
    dgamma = -batch_sum(xp, dy * X) + batch_sum(xp, G * (A @ X))
    return dq, dk, dv, dgamma


def row_logsumexp(xp, q, k, scale, tq=TQ):
    B, n, _ = q.shape
    tk = _tk(B, tq, n)
    dt = q.dtype
    out = xp.empty((B, n), dtype=dt)
    for i0 in range(0, n, tq):
        i1 = min(n, i0 + tq)
        qi = dt.type(scale) * q[:, i0:i1]
        mu = xp.full((B, i1 - i0), -np.inf, dtype=dt)
        ell = xp.zeros((B, i1 - i0), dtype=dt)
        for j0 in range(0, i1, tk):
            j1 = min(i1, j0 + tk)
            s = qi @ xp.swapaxes(k[:, j0:j1], -1, -2)
            if j1 > i0:
                mask = xp.arange(i0, i1)[:, None] >= xp.arange(j0, j1)[None, :]
                s = xp.where(mask, s, dt.type(-np.inf))
            mu_new = xp.maximum(mu, s.max(axis=-1))
            ell = ell * xp.exp(mu - mu_new) + xp.exp(s - mu_new[..., None]).sum(axis=-1)
            mu = mu_new
        out[:, i0:i1] = mu + xp.log(ell)
    return out


def exact_forward(xp, q, k, v, gamma, scale, tq=TQ):
    B, n, _ = q.shape
    dv = v.shape[-1]
    dt = q.dtype
    tk = _tk(B, tq, n)
    g = gamma.reshape(B, 1, 1)
    VX = xp.empty((B, n, 2 * dv), dtype=dt)
    VX[..., :dv] = v
    tri = xp.tri(tq, dtype=bool)
    eye = xp.eye(tq, dtype=dt)
    neg = dt.type(-np.inf)
    for i0 in range(0, n, tq):
        i1 = min(n, i0 + tq)
        T = i1 - i0
        qi = dt.type(scale) * q[:, i0:i1]
        mu = xp.full((B, T), -np.inf, dtype=dt)
        ell = xp.zeros((B, T), dtype=dt)
        acc = xp.zeros((B, T, 2 * dv), dtype=dt)
        for j0 in range(0, i0, tk):
            j1 = min(i0, j0 + tk)
            s = qi @ xp.swapaxes(k[:, j0:j1], -1, -2)
            mu_new = xp.maximum(mu, s.max(axis=-1))
            alpha = xp.exp(mu - mu_new)
            s = xp.exp(s - mu_new[..., None])
            ell = ell * alpha + s.sum(axis=-1)
            acc *= alpha[..., None]
            acc += s @ VX[:, j0:j1]
            mu = mu_new
        s = qi @ xp.swapaxes(k[:, i0:i1], -1, -2)
        s = xp.where(tri[:T, :T], s, neg)
        mu_new = xp.maximum(mu, s.max(axis=-1))
        alpha = xp.exp(mu - mu_new)
        s = xp.exp(s - mu_new[..., None])
        ell = ell * alpha + s.sum(axis=-1)
        acc *= alpha[..., None]
        acc[..., :dv] += s @ v[:, i0:i1]
        inv_l = (1 / ell)[..., None]
        rhs = acc[..., :dv] * inv_l + g * (acc[..., dv:] * inv_l)
        M = eye[:T, :T] - g * (s * inv_l)
        VX[:, i0:i1, dv:] = _tri(xp, M, rhs)
    return (1 - g) * VX[..., dv:]


def exact_backward(xp, q, k, v, gamma, scale, dy, tq=TQ):
    B, n, _ = q.shape
    dt = q.dtype
    g = gamma.reshape(B, 1, 1)
    X = exact_forward(xp, q, k, v, gamma, scale, tq) / (1 - g)
    lse = row_logsumexp(xp, q, k, scale, tq)
    dX = (1 - g) * dy
    R = v + g * X
    G = xp.empty_like(dX)
    AX = xp.zeros_like(X)
    dq = xp.zeros_like(q)
    dk = xp.empty_like(k)
    dv = xp.empty_like(v)
    tri = xp.tri(tq, dtype=bool)
    eye = xp.eye(tq, dtype=dt)
    s_ = dt.type(scale)
    for i0 in reversed(range(0, n, tq)):
        i1 = min(n, i0 + tq)
        T = i1 - i0
        S = s_ * (q[:, i0:] @ xp.swapaxes(k[:, i0:i1], -1, -2))
        S -= lse[:, i0:, None]
        S[:, :T] = xp.where(tri[:T, :T], S[:, :T], dt.type(-np.inf))
        A = xp.exp(S)
        rhs = dX[:, i0:i1] + g * (xp.swapaxes(A[:, T:], -1, -2) @ G[:, i1:])
        M = eye[:T, :T] - g * A[:, :T]
        G[:, i0:i1] = _tri(xp, xp.swapaxes(M, -1, -2), rhs, lower=False)
        delta = (G[:, i0:] * X[:, i0:]).sum(axis=-1)
        Gs = G[:, i0:]
        dS = A * (Gs @ xp.swapaxes(R[:, i0:i1], -1, -2) - delta[..., None])
        dq[:, i0:] += s_ * (dS @ k[:, i0:i1])
        dk[:, i0:i1] = s_ * (xp.swapaxes(dS, -1, -2) @ q[:, i0:])
        dv[:, i0:i1] = xp.swapaxes(A, -1, -2) @ Gs
        AX[:, i0:] += A @ X[:, i0:i1]
    dgamma = -batch_sum(xp, dy * X) + batch_sum(xp, G * AX)
    return dq, dk, dv, dgamma
