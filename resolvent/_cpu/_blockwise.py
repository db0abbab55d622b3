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
        for i in range(T):
            # scores s_ts for s <= t, and the row max including the pooled shift
            rmax = -np.inf
            for j in range(i + 1):
                acc = zero
                for a in range(d):
                    acc += qI[i, a] * kI[j, a]
                acc *= scale
                S[i, j] = acc
                rmax = max(rmax, acc)
            if I > 0:
                rmax = max(rmax, c[p, I])
            z = zero
            for j in range(i + 1):
                e = math.exp(S[i, j] - rmax)
                S[i, j] = e
                z += e
            ec = zero
            if I > 0:
                ec = math.exp(c[p, I] - rmax)
                z += ec * pooled[p, I]
            inv_z = 1.0 / z
            u = ec * inv_z
            dtt = S[i, i] * inv_z
            # x_t = (u P_I + D_tt v_t + sum_{s<t} D_ts (v_s + gamma x_s)) / (1 - gamma D_tt)
            hacc = gam * u
            for a in range(dv):
                w[i, a] = u * PI[a] + dtt * vI[i, a]
            for j in range(i):
                dts = S[i, j] * inv_z
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
