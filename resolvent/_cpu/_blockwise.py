"""Fused within-block kernel of blockwise chain attention (Numba, CPU).

One parallel iteration per (batch entry, block): scores of the block (causal), the row normaliser
including the pooled cross-block mass, ``U = D V + u P`` and the forward substitution with
``I - gamma D``, all on data that stays in cache.  Per block it costs ``b^2/2 (d + dv)``
multiply-adds; the NumPy path needs separate passes and a LAPACK call per block.
"""

from __future__ import annotations

import math

import numba
import numpy as np


# Reassociation lets the dot products and row updates vectorise; no-NaN/no-inf flags stay off.
FASTMATH = {"reassoc", "contract", "arcp", "nsz"}


@numba.njit(fastmath=FASTMATH, cache=True)
def _block_attention(qI, kI, scale, has_pooled, c, pooled, S, u):  # pragma: no cover - compiled
    """One block's rows of ``Ahat``: ``S[i, j] = D_ts`` for ``j <= i`` (T x T, causal) and
    ``u[i] = u_t``, normalised by the full row sum including the pooled mass ``pooled`` with the
    pooled shift ``c``; every exponent is ``<= 0``.  Shared by the forward and backward kernels."""
    T, d = qI.shape
    zero = np.zeros(1, dtype=S.dtype)[0]
    for i in range(T):
        rmax = -np.inf
        for j in range(i + 1):
            acc = zero
            for a in range(d):
                acc += qI[i, a] * kI[j, a]
            acc *= scale
            S[i, j] = acc
            rmax = max(rmax, acc)
        if has_pooled:
            rmax = max(rmax, c)
        z = zero
        for j in range(i + 1):
            e = math.exp(S[i, j] - rmax)
            S[i, j] = e
            z += e
        ec = zero
        if has_pooled:
            ec = math.exp(c - rmax)
            z += ec * pooled
        inv_z = 1.0 / z
        for j in range(i + 1):
            S[i, j] *= inv_z
        u[i] = ec * inv_z


@numba.njit(parallel=True, fastmath=FASTMATH, cache=True)
def _within_blocks(q, k, v, gamma, b, scale, c, pooled, P, X, h, rr, g):  # pragma: no cover
    """Fill ``X`` (B, n, dv) with ``M0^{-1} U`` and ``h`` (B, n) with ``M0^{-1} (gamma u)``, and
    their block sums ``rr`` (B, m, dv) and ``g`` (B, m): the reduced system's right side and diagonal.

    ``c`` (B, m): the pooled row shift ``max_{J<I} sigma_IJ`` (ignored for block 0);
    ``pooled`` (B, m): ``sum_{J<I} W_IJ n_J``; ``P`` (B, m, dv): ``sum_{J<I} W_IJ sum_{s in B_J} v_s``.
    """
    B, n, d = q.shape
    dv = v.shape[2]
    m = (n + b - 1) // b
    for job in numba.prange(B * m):
        p = job // m
        I = job - p * m
        t0 = I * b
        T = min(n, t0 + b) - t0
        gam = gamma[p]
        zero = np.zeros(1, dtype=q.dtype)[0]
        S = np.empty((T, T), dtype=q.dtype)
        w = np.empty((T, dv), dtype=q.dtype)  # v_s + gamma x_s, the rows already solved
        qI = q[p, t0 : t0 + T]
        kI = k[p, t0 : t0 + T]
        vI = v[p, t0 : t0 + T]
        XI = X[p, t0 : t0 + T]
        PI = P[p, I]
        rsum = rr[p, I]
        rsum[:] = 0
        gsum = zero
        uI = np.empty(T, dtype=q.dtype)
        _block_attention(qI, kI, scale, I > 0, c[p, I], pooled[p, I], S, uI)
        for i in range(T):
            u = uI[i]
            dtt = S[i, i]
            # x_t = (u P_I + D_tt v_t + sum_{s<t} D_ts (v_s + gamma x_s)) / (1 - gamma D_tt)
            hacc = gam * u
            for a in range(dv):
                w[i, a] = u * PI[a] + dtt * vI[i, a]
            for j in range(i):
                dts = S[i, j]
                hacc += gam * dts * h[p, t0 + j]
                for a in range(dv):
                    w[i, a] += dts * w[j, a]
            inv_m = 1.0 / (1.0 - gam * dtt)
            h[p, t0 + i] = hacc * inv_m
            gsum += hacc * inv_m
            for a in range(dv):
                x = w[i, a] * inv_m
                XI[i, a] = x
                rsum[a] += x
                w[i, a] = vI[i, a] + gam * x
        g[p, I] = gsum


@numba.njit(parallel=True, fastmath=FASTMATH, cache=True)
def _combine(X, h, WZ, gamma, b):  # pragma: no cover - compiled
    """In place: ``X <- (1 - gamma) (X + h * E (W Z))``, the Woodbury correction."""
    B, n, dv = X.shape
    m = (n + b - 1) // b
    for job in numba.prange(B * m):
        p = job // m
        I = job - p * m
        one_minus = 1 - gamma[p]
        for t in range(I * b, min(n, I * b + b)):
            ht = h[p, t]
            for a in range(dv):
                X[p, t, a] = one_minus * (X[p, t, a] + ht * WZ[p, I, a])


def within_blocks():
    return _within_blocks


def combine():
    return _combine


@numba.njit(parallel=True, fastmath=FASTMATH, cache=True)
def _backward_solve(q, k, gamma, b, scale, c, pooled, dX, Dst, u, G0, hp, rr, g):  # pragma: no cover
    """Backward, first half: ``[G0 | h'] = M0^{-T} [dX | gamma 1]`` block by block.

    Recomputes the block's normalised scores into ``Dst`` (B, m, b, b) and ``u`` (B, n) for the
    second half, and writes the reduced system's right side ``rr = E^T diag(u) G0`` and diagonal
    ``g = E^T diag(u) h'``.
    """
    B, n, d = q.shape
    dv = dX.shape[2]
    m = (n + b - 1) // b
    for job in numba.prange(B * m):
        p = job // m
        I = job - p * m
        t0 = I * b
        T = min(n, t0 + b) - t0
        gam = gamma[p]
        zero = np.zeros(1, dtype=q.dtype)[0]
        qI = q[p, t0 : t0 + T]
        kI = k[p, t0 : t0 + T]
        S = Dst[p, I]
        uI = u[p, t0 : t0 + T]
        _block_attention(qI, kI, scale, I > 0, c[p, I], pooled[p, I], S, uI)
        # backward substitution with M0^T = I - gamma D^T (upper triangular)
        GI = G0[p, t0 : t0 + T]
        dXI = dX[p, t0 : t0 + T]
        rsum = rr[p, I]
        rsum[:] = 0
        gsum = zero
        for i in range(T - 1, -1, -1):
            hacc = gam
            for a in range(dv):
                GI[i, a] = dXI[i, a]
            for j in range(i + 1, T):
                dji = gam * S[j, i]
                hacc += dji * hp[p, t0 + j]
                for a in range(dv):
                    GI[i, a] += dji * GI[j, a]
            inv_m = 1.0 / (1.0 - gam * S[i, i])
            hp[p, t0 + i] = hacc * inv_m
            gsum += uI[i] * hacc * inv_m
            for a in range(dv):
                GI[i, a] *= inv_m
                rsum[a] += uI[i] * GI[i, a]
        g[p, I] = gsum


@numba.njit(parallel=True, fastmath=FASTMATH, cache=True)
def _backward_grads(q, k, v, X, gamma, b, scale, Dst, u, G, hp, WtZ,
                    dq, dk, dv, Gu, a_sum, Rsum, gdx):  # pragma: no cover
    """Backward, second half: ``G = G0 + h' * E W^T Z`` (in place), then within each block
    ``dS = D * (G R^T - delta)``, ``dq = scale dS k``, ``dk = scale dS^T q``, ``dv = D^T G``, and the
    block sums the pooled part needs: ``Gu = E^T diag(u) G``, ``a = E^T (u * delta)``,
    ``Rsum = E^T R`` and ``gdx_I = sum_{t in B_I} G_t . (D X)_t``.
    """
    B, n, d = q.shape
    dvd = v.shape[2]
    m = (n + b - 1) // b
    for job in numba.prange(B * m):
        p = job // m
        I = job - p * m
        t0 = I * b
        T = min(n, t0 + b) - t0
        gam = gamma[p]
        zero = np.zeros(1, dtype=q.dtype)[0]
        S = Dst[p, I]
        qI = q[p, t0 : t0 + T]
        kI = k[p, t0 : t0 + T]
        vI = v[p, t0 : t0 + T]
        XI = X[p, t0 : t0 + T]
        GI = G[p, t0 : t0 + T]
        dqI = dq[p, t0 : t0 + T]
        dkI = dk[p, t0 : t0 + T]
        dvI = dv[p, t0 : t0 + T]
        R = np.empty((T, dvd), dtype=q.dtype)
        delta = np.empty(T, dtype=q.dtype)
        gu = Gu[p, I]
        gu[:] = 0
        rs = Rsum[p, I]
        rs[:] = 0
        asum = zero
        for i in range(T):
            hi = hp[p, t0 + i]
            dl = zero
            for a in range(dvd):
                GI[i, a] += hi * WtZ[p, I, a]
                R[i, a] = vI[i, a] + gam * XI[i, a]
                rs[a] += R[i, a]
                dl += GI[i, a] * XI[i, a]
                gu[a] += u[p, t0 + i] * GI[i, a]
            delta[i] = dl
            asum += u[p, t0 + i] * dl
        a_sum[p, I] = asum
        dqI[:, :] = 0
        dkI[:, :] = 0
        dvI[:, :] = 0
        gd = zero
        for i in range(T):
            for j in range(i + 1):
                dij = S[i, j]
                gr = zero
                gx = zero
                for a in range(dvd):
                    gr += GI[i, a] * R[j, a]
                    gx += GI[i, a] * XI[j, a]
                gd += dij * gx
                ds = scale * dij * (gr - delta[i])
                for a in range(d):
                    dqI[i, a] += ds * kI[j, a]
                    dkI[j, a] += ds * qI[i, a]
                for a in range(dvd):
                    dvI[j, a] += dij * GI[i, a]
        gdx[p, I] = gd


def backward_solve():
    return _backward_solve


def backward_grads():
    return _backward_grads


@numba.njit(parallel=True, fastmath=FASTMATH, cache=True)
def _block_sums(x, b, out):  # pragma: no cover - compiled
    """``out[p, I] = sum_{t in B_I} x[p, t]`` for x (B, n, c), out (B, m, c)."""
    B, n, c = x.shape
    m = (n + b - 1) // b
    for job in numba.prange(B * m):
        p = job // m
        I = job - p * m
        o = out[p, I]
        o[:] = 0
        for t in range(I * b, min(n, I * b + b)):
            for a in range(c):
                o[a] += x[p, t, a]


@numba.njit(parallel=True, fastmath=FASTMATH, cache=True)
def _pooled_weights(sigma, sizes, floor, c, pooled):  # pragma: no cover - compiled
    """In place, row by row: ``sigma`` (B, m, m) becomes ``W`` with ``W_IJ = exp(sigma_IJ - c_I)``
    for ``J < I`` (0 where below ``floor`` or ``J >= I``), ``c_I = max_{J<I} sigma_IJ`` (0 for
    block 0, which has no pooled part) and ``pooled_I = sum_J W_IJ n_J``."""
    B, m, _ = sigma.shape
    for job in numba.prange(B * m):
        p = job // m
        I = job - p * m
        row = sigma[p, I]
        cmax = -np.inf
        for J in range(I):
            cmax = max(cmax, row[J])
        if I == 0:
            cmax = 0.0
        acc = 0.0
        for J in range(I):
            w = math.exp(row[J] - cmax)
            if w < floor:
                w = 0.0
            row[J] = w
            acc += w * sizes[J]
        for J in range(I, m):
            row[J] = 0.0
        c[p, I] = cmax
        pooled[p, I] = acc


def block_sums(x, b):
    B, n, c = x.shape
    out = np.empty((B, (n + b - 1) // b, c), dtype=x.dtype)
    _block_sums(x, b, out)
    return out


def pooled(q, k, v, b, scale):
    """Cross-block quantities for the fused paths: ``c`` (B, m; 0 for block 0), ``W`` (B, m, m),
    block sizes (m,), ``pooled = W n`` (B, m) and the block sums of ``v`` (B, m, dv)."""
    B, n, _ = q.shape
    dt = q.dtype
    m = (n + b - 1) // b
    sizes = np.full(m, b, dtype=dt)
    sizes[-1] = n - (m - 1) * b
    qbar = block_sums(q, b) / sizes[:, None]
    kbar = block_sums(k, b) / sizes[:, None]
    W = np.matmul(qbar, np.swapaxes(kbar, -1, -2))
    W *= dt.type(scale)
    c = np.empty((B, m), dtype=dt)
    pw = np.empty((B, m), dtype=dt)
    _pooled_weights(W, sizes, dt.type(np.finfo(dt).eps ** 2), c, pw)
    return c, W, sizes, pw, block_sums(v, b), qbar, kbar
