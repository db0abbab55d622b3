"""Blockwise chain attention, O(n b d + m^2 d) (SPEC 2.2, ``method="blockwise"``, ``topk=0``).

``Ahat = D + diag(u) E W E^T``: ``D`` block diagonal (exact attention inside each block, normalised
by the full row sum), ``W`` (m x m) strictly lower triangular with ``W_IJ = exp(sigma_IJ - c_I)``,
``c_I = max_{J<I} sigma_IJ``, and ``u_t`` the row's normaliser with the shift folded in.  Every
exponent is ``<= 0`` (row max ``r_t = max(max_s s_ts, c_I)``), so nothing overflows for any score.

``Y = (1 - gamma) (I - gamma Ahat)^{-1} U`` with ``U = Ahat V``, by Woodbury with
``M0 = I - gamma D`` (block diagonal, each block lower triangular)::

    h   = M0^{-1} (gamma u),     g_J = sum_{t in B_J} h_t
    Y0  = M0^{-1} U
    (I_m - diag(g) W) Z = E^T Y0                  (unit lower triangular, m x m)
    X   = Y0 + h * E (W Z)

No ``n x n`` array is formed.  ``n`` need not be a multiple of ``b``: the inputs are padded with
zero rows at the end; causality keeps padded keys away from real queries, and the last block's
reduced unknown feeds no later block, so padded rows never reach a real output.
"""

from __future__ import annotations

import numpy as np
from scipy.linalg import solve_triangular

from .._threads import one_blas_thread, split_batch


# None: use the Numba kernel when Numba imports; True/False force a path (tests cover both).
USE_NUMBA: bool | None = None


def _pad_blocks(x: np.ndarray, b: int, m: int) -> np.ndarray:
    """(B, n, c) -> (B, m, b, c), zero rows appended."""
    B, n, c = x.shape
    if m * b != n:
        x = np.concatenate([x, np.zeros((B, m * b - n, c), dtype=x.dtype)], axis=1)
    return x.reshape(B, m, b, c)


def causal_bias(b: int, dtype) -> np.ndarray:
    """(b, b) array: 0 on and below the diagonal, -inf above (adding it is much faster than masking)."""
    return np.where(np.tri(b, dtype=bool), 0, -np.inf).astype(dtype)


def pooled_scores(q, k, b, scale):
    """Pooled cross-block weights: row shift ``c`` (B, m), ``W`` (B, m, m), block sizes (m,).

    ``sigma_IJ = scale qbar_I . kbar_J``, ``c_I = max_{J<I} sigma_IJ`` (``-inf`` for block 0) and
    ``W_IJ = exp(sigma_IJ - c_I)`` for ``J < I``, else 0.
    """
    B, n, d = q.shape
    m = -(-n // b)
    dt = q.dtype
    sizes = np.full(m, b, dtype=dt)
    sizes[-1] = n - (m - 1) * b
    qbar = _pad_blocks(q, b, m).sum(axis=2) / sizes[:, None]
    kbar = _pad_blocks(k, b, m).sum(axis=2) / sizes[:, None]
    sigma = scale * (qbar @ np.swapaxes(kbar, -1, -2))
    sigma += np.where(np.tri(m, k=-1, dtype=bool), 0, -np.inf).astype(dt)
    c = sigma.max(axis=-1)  # (B, m), -inf for the first block
    with np.errstate(invalid="ignore"):
        W = np.exp(sigma - c[..., None])
    W[:, 0, :] = 0  # block 0 has no earlier block: clear its NaN row
    # Weights below eps^2 of the row's largest (which is 1) cannot change a row sum in this precision,
    # but as subnormal numbers they slow every later product with W by up to 100x: flush them.
    W[W < np.finfo(dt).eps ** 2] = 0
    return c, W, sizes


def structure(q, k, b, scale):
    """The factors of ``Ahat``: ``D`` (B, m, b, b), ``u`` (B, m, b), ``W`` (B, m, m), sizes (m,).

    Shared by the forward and backward passes and by :func:`resolvent.block_mass`.
    """
    B, n, d = q.shape
    m = -(-n // b)
    dt = q.dtype
    qb = _pad_blocks(q, b, m)
    kb = _pad_blocks(k, b, m)
    c, W, sizes = pooled_scores(q, k, b, scale)
    # within-block scores, causal inside the block
    S = qb @ np.swapaxes(kb, -1, -2)
    S *= scale
    S += causal_bias(b, dt)
    pooled = W @ sizes  # sum_J W_IJ n_J, (B, m)
    r = np.maximum(S.max(axis=-1), c[..., None])  # (B, m, b), finite
    S -= r[..., None]
    np.exp(S, out=S)  # D, unnormalised
    e_c = np.exp(c[..., None] - r)  # 0 for block 0
    inv_z = 1.0 / (S.sum(axis=-1) + e_c * pooled[..., None])
    S *= inv_z[..., None]
    return S, e_c * inv_z, W, sizes


def lower_solve(M: np.ndarray, R: np.ndarray) -> np.ndarray:
    """Solve ``M X = R`` for a stack of small lower-triangular blocks: (..., b, b), (..., b, c)."""
    # The NumPy path (without Numba) only.  numpy's batched LU runs the whole stack in one gufunc
    # call, scipy's solve_triangular loops over it in Python: measured on 8 x 4096 rows, the batched
    # LU won for b <= 32 (many small blocks: 155 ms against 242 ms at b = 16) and lost at b = 64
    # (139 ms against 70 ms); small blocks are the default, so LU it is.
    return np.linalg.solve(M, R)


def use_numba() -> bool:
    """The fused Numba kernel runs when Numba is installed, unless ``USE_NUMBA`` is set to False."""
    if USE_NUMBA is not None:
        return USE_NUMBA
    from .._cpu import available

    return available()


def forward(q, k, v, gamma, b, scale):
    """Blockwise chain attention on flattened inputs: q, k (B, n, d), v (B, n, dv), gamma (B,).

    BLAS runs on one thread: the cores go to the Numba kernels' parallel loops, or without Numba to
    slices of the batch (see ``resolvent._threads``).
    """
    if use_numba():
        with one_blas_thread():
            return _forward_fused(q, k, v, gamma, b, scale)
    B, n, d = q.shape
    return split_batch(_forward_numpy, (q, k, v, gamma), (b, scale), B * n * (d + v.shape[-1]))


def _reduced_and_combine(Y0, h, W, gamma, b, n):
    """Solve ``(I - diag(g) W) Z = E^T Y0`` and return ``(1 - gamma) (Y0 + h * E W Z)``, (B, n, dv)."""
    B, m = W.shape[:2]
    dv = Y0.shape[-1]
    dt = Y0.dtype
    Y0 = _pad_blocks(Y0, b, m)
    h = _pad_blocks(h[..., None], b, m)[..., 0]
    g = h.sum(axis=-1)  # (B, m)
    T = np.eye(m, dtype=dt) - g[..., None] * W
    Z = solve_triangular(T, Y0.sum(axis=2), lower=True, unit_diagonal=True, check_finite=False)
    X = Y0 + h[..., None] * (W @ Z)[:, :, None, :]
    X *= (1 - gamma.astype(dt, copy=False)).reshape(B, 1, 1, 1)
    return X.reshape(B, m * b, dv)[:, :n]


def _forward_numpy(q, k, v, gamma, b, scale):
    B, n, _ = q.shape
    dv = v.shape[-1]
    dt = q.dtype
    D, u, W, sizes = structure(q, k, b, scale)
    m = W.shape[-1]
    vb = _pad_blocks(v, b, m)
    g4 = gamma.astype(dt, copy=False).reshape(B, 1, 1, 1)
    # U = Ahat V and the right-hand side [U | gamma u] of the block solves, in one buffer
    rhs = np.empty((B, m, b, dv + 1), dtype=dt)
    np.matmul(D, vb, out=rhs[..., :dv])
    rhs[..., :dv] += u[..., None] * (W @ vb.sum(axis=2))[:, :, None, :]
    rhs[..., dv] = g4[..., 0] * u
    M0 = np.eye(b, dtype=dt) - g4 * D
    sol = lower_solve(M0, rhs).reshape(B, m * b, dv + 1)
    return _reduced_and_combine(sol[..., :dv], sol[..., dv], W, gamma, b, n)


def _forward_fused(q, k, v, gamma, b, scale):
    from .._cpu._blockwise import combine, pooled, within_blocks

    B, n, _ = q.shape
    dv = v.shape[-1]
    dt = q.dtype
    c, W, sizes, pooled_mass, vsum, _, _ = pooled(q, k, v, b, scale)
    m = W.shape[-1]
    P = W @ vsum
    X = np.empty((B, n, dv), dtype=dt)
    h = np.empty((B, n), dtype=dt)
    rr = np.empty((B, m, dv), dtype=dt)
    g = np.empty((B, m), dtype=dt)
    gamma = gamma.astype(dt)
    within_blocks()(q, k, v, gamma, b, dt.type(scale), c, pooled_mass, P, X, h, rr, g)
    T = np.eye(m, dtype=dt) - g[..., None] * W
    Z = solve_triangular(T, rr, lower=True, unit_diagonal=True, check_finite=False)
    combine()(X, h, W @ Z, gamma, b)
    return X


def backward(q, k, v, gamma, b, scale, dy, y=None):
    """Vector-Jacobian product of :func:`forward` (derivation in ``_backward_numpy``).

    ``y``, the forward's output, saves recomputing it (``X = y / (1 - gamma)``).
    """
    B = q.shape[0]
    if y is None:
        y = forward(q, k, v, gamma, b, scale)
    X = y / (1 - gamma.astype(q.dtype, copy=False)).reshape(B, 1, 1)
    if use_numba():
        with one_blas_thread():
            return _backward_fused(q, k, v, gamma, b, scale, dy, X)
    return split_batch(_backward_numpy, (q, k, v, gamma, dy, X), (b, scale), B * q.shape[1] * q.shape[2])


def _add_per_block(x: np.ndarray, per_block: np.ndarray, b: int) -> None:
    """In place: ``x[:, t] += per_block[:, t // b]`` for x (B, n, c), per_block (B, m, c)."""
    B, n, c = x.shape
    full = n // b
    if full:
        x[:, : full * b].reshape(B, full, b, c)[...] += per_block[:, :full, None, :]
    if full * b < n:
        x[:, full * b :] += per_block[:, full, None, :]


def _backward_fused(q, k, v, gamma, b, scale, dy, X):
    """:func:`backward` with the block work in two fused Numba kernels (see ``resolvent._cpu``)."""
    from .._cpu._blockwise import backward_grads, backward_solve, block_sums, pooled

    B, n, d = q.shape
    dvdim = v.shape[-1]
    dt = q.dtype
    g1 = gamma.astype(dt)
    c, W, sizes, pooled_mass, _, qbar, kbar = pooled(q, k, v, b, scale)
    m = W.shape[-1]
    dX = (1 - g1).reshape(B, 1, 1) * dy
    Dst = np.empty((B, m, b, b), dtype=dt)
    u = np.empty((B, n), dtype=dt)
    G = np.empty((B, n, dvdim), dtype=dt)
    hp = np.empty((B, n), dtype=dt)
    rr = np.empty((B, m, dvdim), dtype=dt)
    gdiag = np.empty((B, m), dtype=dt)
    backward_solve()(q, k, g1, b, dt.type(scale), c, pooled_mass, dX, Dst, u, G, hp, rr, gdiag)
    Wt = np.swapaxes(W, -1, -2)
    Tm = np.eye(m, dtype=dt) - gdiag[..., None] * Wt
    Z = solve_triangular(Tm, rr, lower=False, unit_diagonal=True, check_finite=False)
    dq = np.empty_like(q)
    dk = np.empty_like(k)
    dvv = np.empty_like(v)
    Gu = np.empty((B, m, dvdim), dtype=dt)
    a = np.empty((B, m), dtype=dt)
    Rsum = np.empty((B, m, dvdim), dtype=dt)
    gdx = np.empty((B, m), dtype=dt)
    backward_grads()(q, k, v, X, g1, b, dt.type(scale), Dst, u, G, hp, Wt @ Z, dq, dk, dvv, Gu, a, Rsum, gdx)
    # the pooled scores: dsigma = W * (Gu Rsum^T - a n^T), through the block means
    dsigma = W * (Gu @ np.swapaxes(Rsum, -1, -2) - a[..., None] * sizes)
    dqbar = scale * (dsigma @ kbar) / sizes[:, None]
    dkbar = scale * (np.swapaxes(dsigma, -1, -2) @ qbar) / sizes[:, None]
    _add_per_block(dq, dqbar, b)
    _add_per_block(dk, dkbar, b)
    _add_per_block(dvv, Wt @ Gu, b)
    Xsum = block_sums(X, b)
    dgamma = (-np.einsum("bij,bij->b", dy, X) + gdx.sum(axis=-1)
              + np.einsum("bmc,bmc->b", Gu, W @ Xsum))
    return dq, dk, dvv, dgamma


def _backward_numpy(q, k, v, gamma, dy, X, b, scale):
    """Vector-Jacobian product of :func:`forward`: ``(dq, dk, dv, dgamma)`` in O(n b d + m^2 d).

    ``(I - gamma Ahat)^T = M0^T - gamma E W^T E^T diag(u)``, so by Woodbury again (with the same
    ``g`` as the forward, since ``1^T M0^{-1} gamma u = gamma u^T M0^{-T} 1``)::

        [G0 | h'] = M0^{-T} [dX | gamma 1]                    (block upper-triangular solves)
        (I_m - diag(g) W^T) Z = E^T diag(u) G0                 (unit upper triangular, m x m)
        G = G0 + h' * E (W^T Z)

    Then, with ``R = V + gamma X`` and ``delta_t = G_t . X_t`` (the softmax row term, because
    ``Ahat R = X``): within blocks ``dS = D * (G R^T - delta)``; for the pooled scores
    ``dsigma = W * (Gu Rsum^T - a n^T)`` with ``Gu_I = sum_{t in B_I} u_t G_t``,
    ``a_I = sum_{t in B_I} u_t delta_t`` and ``Rsum_J = sum_{s in B_J} R_s``, which reach ``q`` and
    ``k`` through the block means; ``dV = D^T G + E W^T Gu``; ``dgamma = -<dY, X> + <G, Ahat X>``.
    """
    B, n, d = q.shape
    dvdim = v.shape[-1]
    dt = q.dtype
    g1 = gamma.astype(dt, copy=False)
    D, u, W, sizes = structure(q, k, b, scale)
    m = W.shape[-1]
    g4 = g1.reshape(B, 1, 1, 1)
    qb, kb, vb = (_pad_blocks(x, b, m) for x in (q, k, v))
    Xb, dyb = _pad_blocks(X, b, m), _pad_blocks(dy, b, m)
    # G = (I - gamma Ahat)^{-T} dX
    rhs = np.empty((B, m, b, dvdim + 1), dtype=dt)
    rhs[..., :dvdim] = (1 - g4) * dyb
    rhs[..., dvdim] = g4[..., 0]
    M0T = np.eye(b, dtype=dt) - g4 * np.swapaxes(D, -1, -2)
    sol = np.linalg.solve(M0T, rhs)
    G0, hp = sol[..., :dvdim], sol[..., dvdim]
    gdiag = np.einsum("bmt,bmt->bm", u, hp)
    Tm = np.eye(m, dtype=dt) - gdiag[..., None] * np.swapaxes(W, -1, -2)
    Z = solve_triangular(Tm, np.einsum("bmt,bmtc->bmc", u, G0), lower=False, unit_diagonal=True,
                         check_finite=False)
    G = G0 + hp[..., None] * (np.swapaxes(W, -1, -2) @ Z)[:, :, None, :]
    # gradients of the scores
    R = vb + g4 * Xb
    delta = np.einsum("bmtc,bmtc->bmt", G, Xb)
    dS = D * (G @ np.swapaxes(R, -1, -2) - delta[..., None])
    dqb = scale * (dS @ kb)
    dkb = scale * (np.swapaxes(dS, -1, -2) @ qb)
    Gu = np.einsum("bmt,bmtc->bmc", u, G)
    a = np.einsum("bmt,bmt->bm", u, delta)
    dsigma = W * (Gu @ np.swapaxes(R.sum(axis=2), -1, -2) - a[..., None] * sizes)
    qbar = qb.sum(axis=2) / sizes[:, None]
    kbar = kb.sum(axis=2) / sizes[:, None]
    dqb += (scale * (dsigma @ kbar) / sizes[:, None])[:, :, None, :]
    dkb += (scale * (np.swapaxes(dsigma, -1, -2) @ qbar) / sizes[:, None])[:, :, None, :]
    dvb = np.swapaxes(D, -1, -2) @ G + (np.swapaxes(W, -1, -2) @ Gu)[:, :, None, :]
    AX = D @ Xb + u[..., None] * (W @ Xb.sum(axis=2))[:, :, None, :]
    dgamma = -np.einsum("bij,bij->b", dy, X) + np.einsum("bmtc,bmtc->b", G, AX)

    def unpad(x):
        return x.reshape(B, m * b, x.shape[-1])[:, :n]

    return unpad(dqb), unpad(dkb), unpad(dvb), dgamma
