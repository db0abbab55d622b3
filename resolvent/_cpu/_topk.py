"""Fused kernels of block-sparse links (SPEC 2.3, ``topk > 0``; Numba, CPU): the per-token choice of
blocks, the forward pass and its vector-Jacobian product.

The NumPy path (``resolvent/attention/_topk.py``) runs a Python loop over the ``m`` blocks with some
25 NumPy calls per block; at batch x heads = 8, n = 4096 that call overhead, not the arithmetic, is
its time.  Here one parallel iteration per batch entry walks the blocks, and the rows of each block,
in order:

* a row ``t`` of block ``I`` *pulls* its own block's scores (``s <= t``) and the pooled scores
  ``sigma_IJ`` of the earlier blocks it did not select (masked, never "all minus selected"), takes
  one max ``mu_t`` over them and over the running max of its exact links, and forms
  ``x_t (ell_t - gamma w_tt) = acc_t + sum_J exp(sigma_IJ - mu_t) c_J + sum_{s < t in B_I} w_ts Z_s
  + w_tt v_t`` with every exponent ``<= 0``: the forward substitution with ``I - gamma Ahat_II``,
  row by row (the own block's earlier rows are solved, their ``Z = V + gamma X`` enters like any
  key's).  ``c_J`` are the running block sums of ``Z``; earlier blocks are full, so a pooled weight
  counts ``b`` times in ``ell_t``.
* once block ``I`` is solved it *pushes* its exact links to the later rows that selected it (lists
  built from the selection at the start): scores against the block's keys, an online log-sum-exp
  update of the row's ``(mu, ell, acc)`` (rescaled when the max moves).  Keys and ``Z`` of the
  current block stay in L1 while all its pushes run; a pull of the selected blocks per row would
  stream ``k b (d + dv)`` numbers per row instead.

``acc_t`` lives in the output row ``Y[t]`` until row ``t`` is solved, and ``Z`` of the current block
in a (b, dv) scratch, so nothing of size n is allocated besides ``Y``.  Per row the work is
``(i + 1 + k b) (d + dv) + m (d + dv)`` multiply-adds, the inner loops over the contiguous ``d``,
``dv`` or keys.  Nothing is padded: the last block may be shorter; padded rows exist only in the
statistics, laid out (B, m b) as the NumPy forward leaves them.

The backward kernel (:func:`_backward`) walks the blocks from the last: the later rows' exact links
to a block are pulled from the same lists, the pooled part arrives through a running per-block
accumulator, and the own block's transposed solve runs row by row from the last; the derivation is
in ``resolvent/attention/_topk.py`` (``_backward``) and ``docs/topk.md`` section 8.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

from .. import _threads
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


# --- the two inner products ----------------------------------------------------------------------
#
# Unrolled by four, so that each load and store of the accumulator serves four multiply-adds.  Rows
# are addressed as ``X[r, a]``, never as views ``X[r]``: a view costs an atomic reference count
# update on the parent array, and with the parent shared by the threads those updates contend.


@numba.njit(fastmath=FASTMATH, cache=True)
def _scores(Q, u, scale, KT, T, sc, zero):  # pragma: no cover - compiled
    """``sc[:T] = sum_a (scale Q[u, a]) KT[a, :T]``: a row's scores against T keys stored transposed."""
    d = Q.shape[1]
    for j in range(T):
        sc[j] = zero
    a = 0
    while a + 4 <= d:
        q0 = Q[u, a] * scale
        q1 = Q[u, a + 1] * scale
        q2 = Q[u, a + 2] * scale
        q3 = Q[u, a + 3] * scale
        for j in range(T):
            sc[j] += q0 * KT[a, j] + q1 * KT[a + 1, j] + q2 * KT[a + 2, j] + q3 * KT[a + 3, j]
        a += 4
    while a < d:
        q0 = Q[u, a] * scale
        for j in range(T):
            sc[j] += q0 * KT[a, j]
        a += 1


@numba.njit(fastmath=FASTMATH, cache=True)
def _accumulate(A, u, w, Zs, r0, T):  # pragma: no cover - compiled
    """``A[u] += sum_{j < T} w[j] Zs[r0 + j]``."""
    dv = A.shape[1]
    j = 0
    while j + 4 <= T:
        e0 = w[j]
        e1 = w[j + 1]
        e2 = w[j + 2]
        e3 = w[j + 3]
        r = r0 + j
        for a in range(dv):
            A[u, a] += e0 * Zs[r, a] + e1 * Zs[r + 1, a] + e2 * Zs[r + 2, a] + e3 * Zs[r + 3, a]
        j += 4
    while j < T:
        e0 = w[j]
        r = r0 + j
        for a in range(dv):
            A[u, a] += e0 * Zs[r, a]
        j += 1


@numba.njit(cache=True)
def _link_lists(selp, n, m):  # pragma: no cover - compiled
    """The rows that selected block J, ``rows[start[J]:start[J + 1]]`` in increasing order, from one
    batch entry's selection ``selp`` (m b, kk)."""
    kk = selp.shape[1]
    start = np.zeros(m + 1, dtype=np.int64)
    for t in range(n):
        for r in range(kk):
            J = selp[t, r]
            if J < m:
                start[J + 1] += 1
    for J in range(m):
        start[J + 1] += start[J]
    fill = start[:m].copy()
    rows = np.empty(start[m], dtype=np.int64)
    for t in range(n):
        for r in range(kk):
            J = selp[t, r]
            if J < m:
                rows[fill[J]] = t
                fill[J] += 1
    return start, rows


@numba.njit(fastmath=FASTMATH, cache=True)
def _rank1(A, r0, T, w, B, u):  # pragma: no cover - compiled
    """``A[r0 + j] += w[j] B[u]`` for ``j < T``."""
    c = A.shape[1]
    for j in range(T):
        e = w[j]
        r = r0 + j
        for a in range(c):
            A[r, a] += e * B[u, a]


@numba.njit(parallel=True, fastmath=FASTMATH, cache=True)
def _select(q, kbar, kbarT, b, kk, scale, sel):  # pragma: no cover - compiled
    """``sel`` (B, m b, kk): per row the ``kk`` earlier blocks with the largest ``(scale q_t) . kbar_J``,
    by decreasing score, ties to the later block; ``m`` in unused slots and for padded rows.

    One job per (batch entry, block I).  The scores of the block's T rows against the I earlier mean
    keys are computed along the longer of the two (``kbarT`` (B, d, >= m rounded up to 16): the mean
    keys transposed, zero-padded), then the top ``kk`` of every row at once."""
    B, n, d = q.shape
    m = kbar.shape[1]
    N = sel.shape[1]
    for job in numba.prange(B * m):
        p = job // m
        I = job - p * m
        t0 = I * b
        T = max(0, min(n, t0 + b) - t0)
        for t in range(t0, min(N, t0 + b)):
            for r in range(kk):
                sel[p, t, r] = m
        if kk == 0 or I == 0 or T == 0:
            continue
        c = np.zeros(3, dtype=q.dtype)
        c[1] = 1
        c[2] = -np.inf
        zero, one, ninf = c[0], c[1], c[2]
        Tp = (T + 15) // 16 * 16  # score loops over a multiple of 16 (see _forward)
        Ip = (I + 15) // 16 * 16
        by_row = I > T
        if by_row:  # S[i, J]: each row against the mean keys
            S = np.empty((T, Ip), dtype=q.dtype)
            qp = q[p]
            kT = kbarT[p]
            for i in range(T):
                _scores(qp, t0 + i, scale, kT, Ip, S[i], zero)
        else:  # S[J, i]: each mean key against the block's scaled queries, transposed
            S = np.empty((I, Tp), dtype=q.dtype)
            QT = np.zeros((d, Tp), dtype=q.dtype)
            for a in range(d):
                for i in range(T):
                    QT[a, i] = q[p, t0 + i, a] * scale
            kb = kbar[p]
            for J in range(I):
                _scores(kb, J, one, QT, Tp, S[J], zero)
        # the top kk of each row: scan the candidates from the latest block down, keeping a sorted
        # list; a candidate must beat the k-th entry strictly (a tie goes to the later block, seen
        # first), which after the first few blocks is one comparison
        best = np.empty(kk, dtype=q.dtype)
        bj = np.empty(kk, dtype=np.int64)
        for i in range(T):
            for r in range(kk):
                best[r] = ninf
                bj[r] = m
            for J in range(I - 1, -1, -1):
                s = S[i, J] if by_row else S[J, i]
                if s <= best[kk - 1] and bj[kk - 1] < m:
                    continue
                pos = kk - 1
                while pos > 0 and (s > best[pos - 1] or bj[pos - 1] == m):
                    best[pos] = best[pos - 1]
                    bj[pos] = bj[pos - 1]
                    pos -= 1
                best[pos] = s
                bj[pos] = J
            for r in range(kk):
                sel[p, t0 + i, r] = bj[r]


@numba.njit(parallel=True, fastmath=FASTMATH, cache=True)
def _forward(q, k, v, gamma, sel, sigma, b, scale, values, Y, cZ, mu, ell):  # pragma: no cover
    """Blocks in order, per batch entry: ``Y = (1 - gamma) X`` (B, n, dv) when ``values``, and each
    row's shift ``mu`` and normaliser ``ell`` (B, m b; padded rows included, as the NumPy forward
    leaves them).  Until row t is solved, ``Y[t]`` holds its accumulator (the exact links pushed to
    it); ``cZ`` (B, m, dv) receives the block sums of ``Z = V + gamma X``, whose rows are needed only
    while their own block is current (a (b, dv) scratch).  Without ``values``, ``v``, ``Y`` and
    ``cZ`` are not touched."""
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
        Yp = Y[p]
        cz = cZ[p]
        sg = sigma[p]
        mup = mu[p]
        ellp = ell[p]
        selp = sel[p]
        # the current block's keys, transposed, zero-padded to a multiple of 16 columns: every score
        # loop runs over a multiple of 16 keys (no scalar remainder; the extra scores are ignored)
        bp = (b + 15) // 16 * 16
        KT = np.zeros((d, bp), dtype=q.dtype)
        sc = np.empty(bp, dtype=q.dtype)
        pw = np.empty(m, dtype=q.dtype)
        ZI = np.empty((b, dv), dtype=q.dtype)  # Z of the current block's solved rows
        start, rows = _link_lists(selp, n, m)
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
                # logits: own block (s <= t; the columns past i are computed and ignored), pooled
                # scores of the earlier blocks the row did not select
                _scores(qp, t, scale, KT, min(bp, (i + 16) // 16 * 16), sc, zero)
                mo = mup[t]  # the running max of the exact links pushed so far (-inf: none)
                mx = mo
                for j in range(i + 1):
                    mx = max(mx, sc[j])
                for J in range(I):
                    pw[J] = sg[I, J]
                for r in range(kk):
                    J = selp[t, r]
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
                # Y[t] holds the row's accumulator: rescale it to the final max
                if mo == ninf:
                    for a in range(dv):
                        Yp[t, a] = zero
                else:
                    for a in range(dv):
                        Yp[t, a] *= alpha
                # the pooled residue from the block sums of Z (masked blocks have weight 0), then
                # the own block: rows s < t are solved, their Z enters like any key's
                _accumulate(Yp, t, pw, cz, 0, I)
                _accumulate(Yp, t, sc, ZI, 0, i)
                eii = sc[i]
                inv = one / (el - gam * eii)  # >= (1 - gamma) ell_t > 0
                for a in range(dv):
                    x = (Yp[t, a] + eii * vp[t, a]) * inv
                    Yp[t, a] = onem * x
                    z = vp[t, a] + gam * x
                    ZI[i, a] = z
                    cz[I, a] += z
            # push block I's exact links to the later rows that selected it (block I is full)
            for idx in range(start[I], start[I + 1]):
                u = rows[idx]
                _scores(qp, u, scale, KT, bp, sc, zero)
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
                if mo == ninf:
                    for a in range(dv):
                        Yp[u, a] = zero
                elif alpha != one:
                    for a in range(dv):
                        Yp[u, a] *= alpha
                _accumulate(Yp, u, sc, ZI, 0, b)
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


# error_model="numpy": a zero row normaliser (non-finite input, possible with check_finite=False)
# gives inf/NaN, not ZeroDivisionError
@numba.njit(nogil=True, fastmath=FASTMATH, cache=True, error_model="numpy")
def _backward(q, k, v, gamma, dy, y, sel, sigma, mu, ell, b, scale, G, dq, dk, dV, dsigma):  # pragma: no cover
    """The vector-Jacobian product, blocks from the last to the first, per batch entry.

    With ``X = y / (1 - gamma)``, ``Z = V + gamma X``, ``dX = (1 - gamma) dy``: ``G`` (B, n, dv) solves
    ``(I - gamma Ahat)^T G = dX`` by block backward substitution, ``dV = Ahat^T G``, and the score
    gradients ``dlogit_ts = Ahat_ts (G_t . Z_s - delta_t)``, ``delta_t = G_t . X_t``, reach ``dq``
    and ``dk`` (scale included) for the own blocks and the exact links, and ``dsigma`` (B, m, m) for
    the pooled scores (which the caller takes through the block means).  ``Ahat`` is recomputed
    from the forward's row statistics ``mu``, ``ell``: every exponent is a logit minus its row's max.

    Block J, once every later row's ``G`` is known: ``r_J[s] = sum_{t later} Ahat_ts G_t`` is the
    pooled accumulator ``H_J`` (the same for every key of J) plus the exact links of the rows that
    selected J (pulled: scores against J's keys, ``P^T G``, and their score gradients); then the
    own block's upper-triangular solve row by row from the last, ``dV``, ``delta`` and the own
    block's score gradients; then the rows' pooled weights add ``p^T G`` to ``H`` of the earlier
    blocks they did not select and their ``dsigma``.
    """
    B, n, d = q.shape
    dvd = v.shape[2]
    m = sigma.shape[1]
    kk = sel.shape[2]
    for p in range(B):
        c = np.zeros(4, dtype=q.dtype)
        c[1] = 1
        c[2] = b
        c[3] = -np.inf
        zero, one, fb, ninf = c[0], c[1], c[2], c[3]
        gam = gamma[p]
        onem = one - gam
        inv1m = one / onem
        qp = q[p]
        kp = k[p]
        vp = v[p]
        dyp = dy[p]
        yp = y[p]
        Gp = G[p]
        dqp = dq[p]
        dkp = dk[p]
        dVp = dV[p]
        sg = sigma[p]
        dsg = dsigma[p]
        mup = mu[p]
        ellp = ell[p]
        selp = sel[p]
        bp = (b + 15) // 16 * 16
        mp = (m + 15) // 16 * 16
        KT = np.zeros((d, bp), dtype=q.dtype)  # the block's keys, transposed (see _forward)
        ZT = np.zeros((dvd, bp), dtype=q.dtype)  # the block's Z = V + gamma X, transposed
        cZT = np.zeros((dvd, mp), dtype=q.dtype)  # block sums of Z, transposed
        A = np.zeros((b, b), dtype=q.dtype)  # the own block of Ahat
        r = np.empty((b, dvd), dtype=q.dtype)
        H = np.zeros((m, dvd), dtype=q.dtype)
        acc = np.empty((1, dvd), dtype=q.dtype)
        sc = np.empty(max(bp, mp), dtype=q.dtype)
        w = np.empty(max(bp, mp), dtype=q.dtype)
        delta = np.empty(n, dtype=q.dtype)
        start, rows = _link_lists(selp, n, m)
        for t in range(n):
            for a in range(d):
                dqp[t, a] = zero
                dkp[t, a] = zero
            J = t // b
            for a in range(dvd):
                cZT[a, J] += vp[t, a] + gam * (yp[t, a] * inv1m)
        for r0 in range(m):
            for r1 in range(m):
                dsg[r0, r1] = zero
        for J in range(m - 1, -1, -1):
            t0 = J * b
            T = min(n, t0 + b) - t0
            for a in range(d):
                for j in range(T):
                    KT[a, j] = kp[t0 + j, a]
            for a in range(dvd):
                for j in range(T):
                    ZT[a, j] = vp[t0 + j, a] + gam * (yp[t0 + j, a] * inv1m)
            for j in range(T):
                for a in range(dvd):
                    r[j, a] = H[J, a]
            # the exact links of the later rows that selected J (block J is full)
            for idx in range(start[J], start[J + 1]):
                u = rows[idx]
                _scores(qp, u, scale, KT, bp, sc, zero)
                mo = mup[u]
                il = one / ellp[u]
                for j in range(b):
                    w[j] = expneg(sc[j] - mo) * il  # P_uj
                _rank1(r, 0, b, w, Gp, u)
                _scores(Gp, u, one, ZT, bp, sc, zero)  # G_u . Z_j
                du = delta[u]
                for j in range(b):
                    w[j] = scale * w[j] * (sc[j] - du)
                _accumulate(dqp, u, w, kp, t0, b)
                _rank1(dkp, t0, b, w, qp, u)
            # the own block's rows of Ahat
            for i in range(T):
                t = t0 + i
                _scores(qp, t, scale, KT, min(bp, (i + 16) // 16 * 16), sc, zero)
                mo = mup[t]
                il = one / ellp[t]
                for j in range(i + 1):
                    A[i, j] = expneg(sc[j] - mo) * il
            # (I - gamma A)^T G = dX + gamma r, from the last row up; dV = A^T G + r
            for i in range(T - 1, -1, -1):
                t = t0 + i
                nb = T - 1 - i
                for jj in range(nb):
                    w[jj] = A[i + 1 + jj, i]
                for a in range(dvd):
                    acc[0, a] = r[i, a]
                _accumulate(acc, 0, w, Gp, t + 1, nb)  # r_t + sum_{s > t in J} A_st G_s
                aii = A[i, i]
                inv = one / (one - gam * aii)
                dl = zero
                for a in range(dvd):
                    g = (onem * dyp[t, a] + gam * acc[0, a]) * inv
                    Gp[t, a] = g
                    dVp[t, a] = acc[0, a] + aii * g
                    dl += g * (yp[t, a] * inv1m)
                delta[t] = dl
            # the own block's score gradients
            for i in range(T):
                t = t0 + i
                _scores(Gp, t, one, ZT, min(bp, (i + 16) // 16 * 16), sc, zero)  # G_t . Z_j
                dl = delta[t]
                for j in range(i + 1):
                    w[j] = scale * A[i, j] * (sc[j] - dl)
                _accumulate(dqp, t, w, kp, t0, i + 1)
                _rank1(dkp, t0, i + 1, w, qp, t)
            # the pooled weights of the rows of J on the earlier blocks they did not select
            if J <= kk:
                continue
            Jp = (J + 15) // 16 * 16
            for i in range(T):
                t = t0 + i
                mo = mup[t]
                il = one / ellp[t]
                for I in range(J):
                    w[I] = sg[J, I]
                for rr in range(kk):
                    I = selp[t, rr]
                    if I < J:
                        w[I] = ninf
                for I in range(J):
                    w[I] = expneg(w[I] - mo) * il  # p_tI, 0 where selected
                for I in range(J):
                    e = w[I]
                    if e != zero:
                        for a in range(dvd):
                            H[I, a] += e * Gp[t, a]
                _scores(Gp, t, one, cZT, Jp, sc, zero)  # G_t . c_I
                dl = fb * delta[t]
                for I in range(J):
                    dsg[J, I] += w[I] * (sc[I] - dl)


def _over_batch(fn, B, work):
    """``fn(lo, hi)`` on contiguous slices of the batch, one per core on a thread pool (the kernel is
    compiled without the GIL).

    For the backward kernel only: with ``parallel=True`` it compiled in 13 s per dtype instead of 5
    on the 2-core machine, and ran no faster (medians 101 and 98 ms at batch 8, n 4096).  The forward
    and the selection keep Numba's threads: there the pool was 15-30 % slower (forward at n 4096:
    median 43 against 37 ms over 41 interleaved runs), for 5 s more compile time per dtype.
    """
    n_workers = min(B, _threads.workers()) if work >= _threads.PARALLEL_MIN else 1
    if n_workers < 2:
        fn(0, B)
        return
    cuts = np.linspace(0, B, n_workers + 1).astype(int)
    with ThreadPoolExecutor(n_workers) as ex:
        list(ex.map(lambda i: fn(cuts[i], cuts[i + 1]), range(n_workers)))


def select(q, kbar, b, topk, scale):
    """The per-token choice of blocks, (B, m b, min(topk, m - 1)) int64 (see :func:`_select`)."""
    B, n, d = q.shape
    m = kbar.shape[1]
    kk = min(topk, m - 1)
    sel = np.empty((B, m * b, kk), dtype=np.int64)
    mp = (m + 15) // 16 * 16
    kbarT = np.zeros((B, d, mp), dtype=q.dtype)
    kbarT[:, :, :m] = np.swapaxes(kbar, -1, -2)
    _select(q, kbar, kbarT, b, kk, q.dtype.type(scale), sel)
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
        cZ = np.empty((B, m, dv), dtype=dt)
    else:
        Y = np.empty((B, 0, dv), dtype=dt)
        cZ = np.empty((B, 0, dv), dtype=dt)
    _forward(q, k, v, gamma.astype(dt), sel, sigma, b, dt.type(scale), values, Y, cZ, mu, ell)
    return (Y if values else None), mu, ell


def backward(q, k, v, gamma, dy, y, sel, sigma, mu, ell, b, scale):
    """``(dq, dk, dv, dsigma)`` from :func:`_backward` (dq and dk without the pooled scores' share)."""
    B, n, d = q.shape
    dt = q.dtype
    m = sigma.shape[1]
    G = np.empty(v.shape, dtype=dt)
    dq = np.empty(q.shape, dtype=dt)
    dk = np.empty(k.shape, dtype=dt)
    dV = np.empty(v.shape, dtype=dt)
    dsigma = np.empty((B, m, m), dtype=dt)
    g = gamma.astype(dt)
    sc = dt.type(scale)

    def run(lo, hi):
        s = slice(lo, hi)
        _backward(q[s], k[s], v[s], g[s], dy[s], y[s], sel[s], sigma[s], mu[s], ell[s], b, sc, G[s], dq[s], dk[s],
                  dV[s], dsigma[s])

    _over_batch(run, B, B * n * (d + v.shape[-1]))
    return dq, dk, dV, dsigma
