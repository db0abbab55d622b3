"""Fused forward kernel of block-sparse links (SPEC 2.3, ``topk > 0``; Numba, CPU).

The NumPy path (``resolvent/attention/_topk.py``) runs a Python loop over the ``m`` blocks with some
25 NumPy calls per block; at batch x heads = 8, n = 4096, b = 64 that call overhead, not the
arithmetic, is its time.  Here one parallel iteration per batch entry walks the rows in order and
*pulls* everything a row needs from rows already finished:

* its logits: own block (``s <= t``), exact scores against the keys of its selected blocks
  ``J in sel(t)`` (all earlier, so ``Z_J = V_J + gamma X_J`` is known), and the pooled scores
  ``sigma_IJ`` of the earlier blocks it did not select (masked, never "all minus selected");
* one row max ``mu_t`` over all of them, so every exponent is ``<= 0``, and the normaliser
  ``ell_t`` (earlier blocks are full: the pooled weight counts ``b`` times);
* ``x_t (ell_t - gamma w_tt) = sum_{s < t} w_ts Z_s + w_tt v_t`` with the pooled part
  ``sum_J exp(sigma_IJ - mu_t) c_J`` from the running block sums ``c_J`` of ``Z``.  The last line
  is the forward substitution with ``I - gamma Ahat_II`` row by row: the rows ``s < t`` of the own
  block are finished too, so their ``Z_s`` enters like any other key's.

Per row that is ``(i + 1 + k b) (d + dv) + m (d + dv)`` multiply-adds with the inner loops over the
contiguous ``d`` or ``dv``; the keys and ``Z`` of a selected block (``b x (d + dv)``) stay in L1/L2
while the row uses them.  Nothing is padded: the last block may be shorter, and padded rows exist
only in the statistics handed to the NumPy backward.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

from ._blockwise import FASTMATH


# --- exp(x) for x <= 0 that vectorises ------------------------------------------------------------
#
# Without Intel's SVML, Numba calls libm's exp once per element: at n = 4096 the kernel's 5 million
# exponentials took 26 ms of one core in float32, about a third of the whole forward.  The version
# below (Cephes' range reduction and polynomial / Pade form, 2^n built in the exponent bits) is a
# straight-line function LLVM vectorises: 0.8 ns per float32 element instead of 5-7, within 1 ulp
# (float32) and 2 ulp (float64) of libm.  Arguments below the normal range give 0 (the row sums it
# feeds are >= 1, so subnormal weights cannot change them, and they would slow every later product).
# It is compiled with ``contract`` only and left to LLVM to inline: under the callers' ``reassoc``
# the two-part subtraction of n ln 2 would be folded into one and lose ~1e-13 at large |x|.


@intrinsic
def _pow2(typingctx, nf):
    """``2**nf`` for an integral float ``nf`` in the normal exponent range (float32 or float64)."""
    if nf == types.float32:
        ity, bias, shift, fty = ir.IntType(32), 127, 23, ir.FloatType()
    elif nf == types.float64:
        ity, bias, shift, fty = ir.IntType(64), 1023, 52, ir.DoubleType()
    else:
        return None

    def codegen(context, builder, sig, args):
        i = builder.fptosi(args[0], ir.IntType(32))
        if ity.width == 64:
            i = builder.sext(i, ity)
        i = builder.add(i, ir.Constant(ity, bias))
        i = builder.shl(i, ir.Constant(ity, shift))
        return builder.bitcast(i, fty)

    return nf(nf), codegen


_f32, _f64 = np.float32, np.float64
_LO32, _LOG2E32, _HALF32 = _f32(-87.0), _f32(1.4426950408889634), _f32(0.5)
_C1_32, _C2_32, _ONE32, _ZERO32 = _f32(0.693359375), _f32(-2.12194440e-4), _f32(1.0), _f32(0.0)
_PA, _PB, _PC = _f32(1.9875691500e-4), _f32(1.3981999507e-3), _f32(8.3334519073e-3)
_PD, _PE, _PF = _f32(4.1665795894e-2), _f32(1.6666665459e-1), _f32(5.0000001201e-1)
_LO64, _LOG2E64 = _f64(-708.0), _f64(1.4426950408889634)
_C1_64, _C2_64 = _f64(6.93145751953125e-1), _f64(1.42860682030941723212e-6)
_P0, _P1, _P2 = _f64(1.26177193074810590878e-4), _f64(3.02994407707441961300e-2), _f64(9.99999999999999999910e-1)
_Q0, _Q1 = _f64(3.00198505138664455042e-6), _f64(2.52448340349684104192e-3)
_Q2, _Q3 = _f64(2.27265548208155028766e-1), _f64(2.00000000000000000009e0)


def expneg(x):
    """``exp(x)`` for ``x <= 0`` (``-inf`` gives 0); compiled code gets the overload below."""
    return np.exp(x)


@overload(expneg, jit_options={"fastmath": {"contract"}})
def _expneg(x):  # pragma: no cover - compiled
    if x == types.float32:

        def impl(x):
            xc = max(x, _LO32)
            nf = np.floor(xc * _LOG2E32 + _HALF32)
            r = xc - nf * _C1_32
            r = r - nf * _C2_32
            z = r * r
            p = (((((_PA * r + _PB) * r + _PC) * r + _PD) * r + _PE) * r + _PF) * z + r + _ONE32
            y = p * _pow2(nf)
            return y if x >= _LO32 else _ZERO32

        return impl
    if x == types.float64:

        def impl(x):
            xc = max(x, _LO64)
            nf = np.floor(xc * _LOG2E64 + 0.5)
            r = xc - nf * _C1_64
            r = r - nf * _C2_64
            xx = r * r
            px = r * ((_P0 * xx + _P1) * xx + _P2)
            e = px / (((_Q0 * xx + _Q1) * xx + _Q2) * xx + _Q3 - px)
            y = (1.0 + 2.0 * e) * _pow2(nf)
            return y if x >= _LO64 else 0.0

        return impl
    return None


# --- the two inner products, unrolled by four so each load of the accumulator serves four terms ----


@numba.njit(fastmath=FASTMATH, cache=True)
def _scores(qrow, scale, KT, T, sc, zero):  # pragma: no cover - compiled
    """``sc[:T] = sum_a (scale qrow[a]) KT[a, :T]``: the row's scores against T keys stored transposed."""
    d = qrow.shape[0]
    for j in range(T):
        sc[j] = zero
    a = 0
    while a + 4 <= d:
        q0 = qrow[a] * scale
        q1 = qrow[a + 1] * scale
        q2 = qrow[a + 2] * scale
        q3 = qrow[a + 3] * scale
        k0 = KT[a]
        k1 = KT[a + 1]
        k2 = KT[a + 2]
        k3 = KT[a + 3]
        for j in range(T):
            sc[j] += q0 * k0[j] + q1 * k1[j] + q2 * k2[j] + q3 * k3[j]
        a += 4
    while a < d:
        q0 = qrow[a] * scale
        k0 = KT[a]
        for j in range(T):
            sc[j] += q0 * k0[j]
        a += 1


@numba.njit(fastmath=FASTMATH, cache=True)
def _accumulate(acc, w, w0, Zs, r0, T):  # pragma: no cover - compiled
    """``acc += sum_{j < T} w[w0 + j] Zs[r0 + j]``."""
    dv = acc.shape[0]
    j = 0
    while j + 4 <= T:
        e0 = w[w0 + j]
        e1 = w[w0 + j + 1]
        e2 = w[w0 + j + 2]
        e3 = w[w0 + j + 3]
        z0 = Zs[r0 + j]
        z1 = Zs[r0 + j + 1]
        z2 = Zs[r0 + j + 2]
        z3 = Zs[r0 + j + 3]
        for a in range(dv):
            acc[a] += e0 * z0[a] + e1 * z1[a] + e2 * z2[a] + e3 * z3[a]
        j += 4
    while j < T:
        e0 = w[w0 + j]
        z0 = Zs[r0 + j]
        for a in range(dv):
            acc[a] += e0 * z0[a]
        j += 1


@numba.njit(parallel=True, fastmath=FASTMATH, cache=True)
def _select(q, kbarT, b, kk, scale, sel):  # pragma: no cover - compiled
    """``sel`` (B, m b, kk): per row the ``kk`` earlier blocks with the largest ``(scale q_t) . kbar_J``,
    by decreasing score, ties to the later block; ``m`` in unused slots and for padded rows.
    ``kbarT`` (B, d, m): the mean keys, transposed."""
    B, n, d = q.shape
    m = kbarT.shape[2]
    N = sel.shape[1]
    for job in numba.prange(B * m):
        p = job // m
        I = job - p * m
        zero = np.zeros(1, dtype=q.dtype)[0]
        sc = np.empty(m, dtype=q.dtype)
        best = np.empty(kk + 1, dtype=q.dtype)
        bj = np.empty(kk + 1, dtype=np.int64)
        for t in range(I * b, min(N, I * b + b)):
            for r in range(kk):
                sel[p, t, r] = m
            if t >= n or kk == 0:
                continue
            _scores(q[p, t], scale, kbarT[p], I, sc, zero)
            cnt = 0
            # candidates from the latest block down: a tie ranks after the (later) block already kept
            for J in range(I - 1, -1, -1):
                s = sc[J]
                pos = cnt
                while pos > 0 and s > best[pos - 1]:
                    pos -= 1
                if pos >= kk:
                    continue
                for r in range(min(cnt, kk - 1), pos, -1):
                    best[r] = best[r - 1]
                    bj[r] = bj[r - 1]
                best[pos] = s
                bj[pos] = J
                if cnt < kk:
                    cnt += 1
            for r in range(cnt):
                sel[p, t, r] = bj[r]


@numba.njit(parallel=True, fastmath=FASTMATH, cache=True)
def _forward(q, k, v, gamma, sel, sigma, b, scale, values, Y, Z, cZ, mu, ell):  # pragma: no cover
    """Blocks in order, per batch entry: ``Y = (1 - gamma) X`` (B, n, dv) when ``values``, and each
    row's shift ``mu`` and normaliser ``ell`` (B, m b; padded rows included, as the NumPy forward
    leaves them).  ``Z`` (B, n, dv) holds a row's accumulator until the row is solved, then
    ``V + gamma X``; ``cZ`` (B, m, dv) the block sums of ``Z``.  Without ``values``, ``v``, ``Y``,
    ``Z`` and ``cZ`` are not touched."""
    B, n, d = q.shape
    dv = v.shape[2]
    m = sigma.shape[1]
    kk = sel.shape[2]
    N = mu.shape[1]
    for p in numba.prange(B):
        # constants in the working precision (a float32 mixed with a Python int or float would be
        # promoted to float64)
        c = np.zeros(4, dtype=q.dtype)
        c[1] = 1
        c[2] = b
        c[3] = -np.inf
        zero, one, fb, ninf = c[0], c[1], c[2], c[3]
        gam = gamma[p]
        onem = one - gam
        qp = q[p]
        kp = k[p]
        vp = v[p]
        Zp = Z[p]
        Yp = Y[p]
        cz = cZ[p]
        sg = sigma[p]
        mup = mu[p]
        ellp = ell[p]
        KT = np.empty((d, b), dtype=q.dtype)  # the keys of the current block, transposed
        sc = np.empty(b, dtype=q.dtype)
        pw = np.empty(m, dtype=q.dtype)
        # the push lists: rows that selected block J are rows[start[J]:start[J + 1]], in order
        start = np.zeros(m + 1, dtype=np.int64)
        for t in range(n):
            for r in range(kk):
                J = sel[p, t, r]
                if J < m:
                    start[J + 1] += 1
        for J in range(m):
            start[J + 1] += start[J]
        fill = start[:m].copy()
        rows = np.empty(start[m], dtype=np.int64)
        for t in range(n):
            for r in range(kk):
                J = sel[p, t, r]
                if J < m:
                    rows[fill[J]] = t
                    fill[J] += 1
        for t in range(n):
            mup[t] = ninf
            ellp[t] = zero
        for I in range(m):
            t0 = I * b
            T = min(n, t0 + b) - t0
            for a in range(d):
                for j in range(T):
                    KT[a, j] = kp[t0 + j, a]
            if values:
                for a in range(dv):
                    cz[I, a] = zero
            for i in range(T):
                t = t0 + i
                # logits: own block (s <= t), pooled scores of the earlier blocks not selected
                _scores(qp[t], scale, KT, i + 1, sc, zero)
                mo = mup[t]  # the running max of the exact links pushed so far (-inf: none)
                mx = mo
                for j in range(i + 1):
                    mx = max(mx, sc[j])
                for J in range(I):
                    pw[J] = sg[I, J]
                for r in range(kk):
                    J = sel[p, t, r]
                    if J < I:
                        pw[J] = ninf
                for J in range(I):
                    mx = max(mx, pw[J])
                alpha = expneg(mo - mx)  # 0 when the row had no exact link
                l_own = zero
                for j in range(i + 1):
                    e = expneg(sc[j] - mx)
                    sc[j] = e
                    l_own += e
                l_pool = zero
                for J in range(I):
                    e = expneg(pw[J] - mx)
                    pw[J] = e
                    l_pool += e
                el = alpha * ellp[t] + l_own + fb * l_pool
                mup[t] = mx
                ellp[t] = el
                if not values:
                    continue
                acc = Zp[t]
                if mo == ninf:
                    for a in range(dv):
                        acc[a] = zero
                else:
                    for a in range(dv):
                        acc[a] *= alpha
                # the pooled residue from the block sums of Z; masked entries are 0
                _accumulate(acc, pw, 0, cz, 0, I)
                # own block: rows s < t are solved, their Z enters like any key's
                _accumulate(acc, sc, 0, Zp, t0, i)
                eii = sc[i]
                inv = one / (el - gam * eii)  # >= (1 - gamma) ell_t > 0
                for a in range(dv):
                    x = (acc[a] + eii * vp[t, a]) * inv
                    Yp[t, a] = onem * x
                    z = vp[t, a] + gam * x
                    acc[a] = z
                    cz[I, a] += z
            # push block I's exact links to the later rows that selected it (block I is full)
            for idx in range(start[I], start[I + 1]):
                u = rows[idx]
                _scores(qp[u], scale, KT, b, sc, zero)
                mo = mup[u]
                mx = mo
                for j in range(b):
                    mx = max(mx, sc[j])
                alpha = expneg(mo - mx)
                l = zero
                for j in range(b):
                    e = expneg(sc[j] - mx)
                    sc[j] = e
                    l += e
                ellp[u] = alpha * ellp[u] + l
                mup[u] = mx
                if not values:
                    continue
                acc = Zp[u]
                if mo == ninf:
                    for a in range(dv):
                        acc[a] = zero
                elif alpha != one:
                    for a in range(dv):
                        acc[a] *= alpha
                _accumulate(acc, sc, 0, Zp, t0, b)
        # padded rows of the last block (statistics only): zero queries, so every own logit is 0;
        # they select nothing and, as in the NumPy forward, take the pooled weight of every earlier
        # block unless the block has no more than kk earlier ones
        I = m - 1
        npool = I if I > kk else 0
        for t in range(n, N):
            i = t - I * b
            mx = zero
            for J in range(npool):
                mx = max(mx, sg[I, J])
            l_pool = zero
            for J in range(npool):
                l_pool += expneg(sg[I, J] - mx)
            mup[t] = mx
            ellp[t] = (i + 1) * expneg(-mx) + fb * l_pool  # stored in the working precision


def select(q, kbar, b, topk, scale):
    """The per-token choice of blocks, (B, m b, min(topk, m - 1)) int64 (see :func:`_select`)."""
    B, n, _ = q.shape
    m = kbar.shape[1]
    kk = min(topk, m - 1)
    sel = np.empty((B, m * b, kk), dtype=np.int64)
    kbarT = np.ascontiguousarray(np.swapaxes(kbar, -1, -2))
    _select(q, kbarT, b, kk, q.dtype.type(scale), sel)
    return sel


def forward(q, k, v, gamma, sel, sigma, b, scale, values=True):
    """``(Y, mu, ell)``: the output (None without ``values``) and the row statistics (B, m b)."""
    B, n, d = q.shape
    dv = v.shape[-1]
    m = sigma.shape[1]
    dt = q.dtype
    mu = np.empty((B, m * b), dtype=dt)
    ell = np.empty((B, m * b), dtype=dt)
    if values:
        Y = np.empty((B, n, dv), dtype=dt)
        Z = np.empty((B, n, dv), dtype=dt)
        cZ = np.empty((B, m, dv), dtype=dt)
    else:
        Y = Z = np.empty((B, 0, dv), dtype=dt)
        cZ = np.empty((B, 0, dv), dtype=dt)
    _forward(q, k, v, gamma.astype(dt), sel, sigma, b, dt.type(scale), values, Y, Z, cZ, mu, ell)
    return (Y if values else None), mu, ell
