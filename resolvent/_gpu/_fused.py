"""The float32 forward of blockwise chain attention in four kernel launches (``docs/gpu.md``).

The maths is that of :mod:`resolvent._gpu._blockwise` (SPEC 2.2, the Woodbury form); this module
only reorganises where it runs, so that a forward pass is four launches and no library calls:

1. :func:`_means_kernel`, one thread block per (batch entry, block): the block means ``qbar``
   (scaled) and ``kbar`` (stored transposed, ``kbarT[p, :, J]``, so that the pooled scores read it
   coalesced), the block sums of ``v``, and a finiteness check of ``q``, ``k``, ``v`` (a block sum
   is finite exactly when its entries are, short of overflow), reported through ``sync[0:3]``.
2. :func:`_rows_kernel`, one thread block per (batch entry, block ``I``): the pooled scores
   ``sigma_IJ = qbar_I . kbar_J`` (J < I), their shift ``c_I``, ``W_IJ = exp(sigma_IJ - c_I)``
   (written out for steps 3-4), the pooled mass and ``P_I = sum_J W_IJ vsum_J``; then the causal
   scores of the block (register-tiled, :func:`._kernels._tri_prod`), the row normalisers and
   ``D``; then the block's forward substitution with ``I - gamma D`` on ``[U | gamma u]`` by
   panels of ``PANEL`` rows: inside a panel one thread per column substitutes (a column needs no
   other column), then every thread adds the panel's rows to the rows below.  Two barriers per
   panel, where the old kernel had one per row.
3. :func:`_reduced_kernel`: the reduced unit lower-triangular system ``(I - diag(g) W) Z = R``,
   blocked in ``NB`` rows.  Thread block ``(p, chunk, J)`` first inverts its diagonal block, then
   multiplies its rows of ``W`` with each finished earlier block ``Z_J'`` as soon as that block's
   flag is up, applies the inverse and raises its own flag.  Thread blocks take their ``(p, chunk, J)``
   from an atomic ticket, so every block a thread block waits for was started before it: no
   deadlock whatever the scheduling, and the serial chain is ``m / NB`` short steps.
4. :func:`_combine_kernel`: ``(W Z)_I`` and ``X <- (1 - gamma) (X + h (W Z)_I)`` in place.

Shared memory is sized for float32 (about 44 KB in step 2); float64 stays on the kernels of
:mod:`resolvent._gpu._kernels`.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from numba import cuda

from . import _kernels as K

__all__ = ["forward", "forward_checked", "supported", "SYNC_HEAD"]

NT = 256  #: threads per thread block
DVC = 64  #: value columns per pass of the within-block solve
KCF = 16  #: columns of q/k per shared chunk of the score tile (small: room for the solve's tile)
NB = 64  #: diagonal block of the reduced system
PANEL = 16  #: rows per panel of the blocked substitutions (even; divides NB and the block tiles)
CW = 16  #: right-hand-side columns per thread block of the reduced system (fewer: shorter chain steps)
SYNC_HEAD = 4  #: sync[0:3] non-finite q, k, v; sync[3] the reduced solve's ticket counter


def supported(dtype, b) -> bool:
    """Whether this pipeline runs ``dtype`` with block size ``b``."""
    return np.dtype(dtype) == np.float32 and b <= K.MAX_BLOCK


def _threads(nt):
    """256 threads on a GPU; 64 under the simulator (each thread is a Python thread there)."""
    if nt is not None:
        return nt
    return 64 if K._simulated() else NT


def _widths(nt):
    """``(dvc, cw)``: value columns per solve pass (thread ``dvc`` takes the h column) and
    right-hand-side columns per thread block of the reduced system, for ``nt`` threads."""
    return min(DVC, nt // 2), min(CW, nt)


# --------------------------------------------------------------------------------------------------
# device helpers


@functools.cache
def _colsum(dtype):
    """Device function: ``sum_{t < T} src[p, t0 + t, col]``, eight loads in flight."""
    ZERO = np.dtype(dtype).type(0)

    @cuda.jit(device=True)
    def colsum(src, p, t0, T, col):
        a0 = ZERO
        a1 = ZERO
        a2 = ZERO
        a3 = ZERO
        t = 0
        while t + 8 <= T:
            x0 = src[p, t0 + t, col]
            x1 = src[p, t0 + t + 1, col]
            x2 = src[p, t0 + t + 2, col]
            x3 = src[p, t0 + t + 3, col]
            x4 = src[p, t0 + t + 4, col]
            x5 = src[p, t0 + t + 5, col]
            x6 = src[p, t0 + t + 6, col]
            x7 = src[p, t0 + t + 7, col]
            a0 += x0 + x4
            a1 += x1 + x5
            a2 += x2 + x6
            a3 += x3 + x7
            t += 8
        while t < T:
            a0 += src[p, t0 + t, col]
            t += 1
        return (a0 + a1) + (a2 + a3)

    return colsum


@functools.cache
def _tile_load(NR, NC, NT, dtype):
    """Device function: ``dst[i, j] = src[p, r0 + i, c0 + j]`` for ``i < NR, j < NC`` (zero where
    ``i >= T`` or ``c0 + j >= C``); each thread issues all its loads before its shared stores."""
    IT = K._cdiv(NR * NC, NT)
    nbt = K._numba_type(dtype)
    ZERO = np.dtype(dtype).type(0)

    @cuda.jit(device=True)
    def tile_load(src, p, r0, T, c0, C, dst):
        tid = cuda.threadIdx.x
        buf = cuda.local.array(IT, nbt)
        for it in range(IT):
            e = tid + it * NT
            i = e // NC
            j = e - i * NC
            val = ZERO
            if i < T and c0 + j < C:
                val = src[p, r0 + i, c0 + j]
            buf[it] = val
        for it in range(IT):
            e = tid + it * NT
            i = e // NC
            j = e - i * NC
            if i < NR:
                dst[i, j] = buf[it]

    return tile_load


@functools.cache
def _block_reduce(NT, dtype, is_max):
    """Device function: the max (or sum) of every thread's ``val`` over the thread block."""
    HALF = (1 << (NT - 1).bit_length()) // 2  # half the power of two at or above NT

    @cuda.jit(device=True)
    def reduce(red, val):
        tid = cuda.threadIdx.x
        cuda.syncthreads()  # red may still be read by an earlier reduction
        red[tid] = val
        cuda.syncthreads()
        step = HALF
        while step > 0:
            if tid < step and tid + step < NT:
                if is_max:
                    red[tid] = max(red[tid], red[tid + step])
                else:
                    red[tid] = red[tid] + red[tid + step]
            cuda.syncthreads()
            step //= 2
        return red[0]

    return reduce


@functools.cache
def _row_times(dv, NT, dtype):
    """Device function: ``out[c] = sum_{J < I} W[p, I, J] M[p, J, c]`` for ``c < dv`` into shared
    ``out``; the J range is split over ``NT // dv`` thread groups, summed through ``red``."""
    RG = max(1, NT // dv)
    ZERO = np.dtype(dtype).type(0)

    @cuda.jit(device=True)
    def row_times(W, M, p, I, out, red):
        tid = cuda.threadIdx.x
        cuda.syncthreads()  # red may still be read by an earlier reduction
        for e in range(tid, RG * dv, NT):
            grp = e // dv
            c = e - grp * dv
            a0 = ZERO
            a1 = ZERO
            J = grp
            while J + 3 * RG < I:  # four loads in flight
                a0 += W[p, I, J] * M[p, J, c] + W[p, I, J + 2 * RG] * M[p, J + 2 * RG, c]
                a1 += W[p, I, J + RG] * M[p, J + RG, c] + W[p, I, J + 3 * RG] * M[p, J + 3 * RG, c]
                J += 4 * RG
            while J < I:
                a0 += W[p, I, J] * M[p, J, c]
                J += RG
            red[e] = a0 + a1
        cuda.syncthreads()
        for c in range(tid, dv, NT):
            s = ZERO
            for grp in range(RG):
                s += red[grp * dv + c]
            out[c] = s
        cuda.syncthreads()

    return row_times


# --------------------------------------------------------------------------------------------------
# kernels


@functools.cache
def _means_kernel(b, NT, dtype):
    ONE = np.dtype(dtype).type(1)
    FMAX = np.dtype(dtype).type(np.finfo(dtype).max)
    colsum = _colsum(dtype)
    from numba import int32

    @cuda.jit
    def kernel(q, k, v, scale, qbar, kbarT, vs, sync):
        n = q.shape[1]
        d = q.shape[2]
        dv = v.shape[2]
        m = (n + b - 1) // b
        blk = cuda.blockIdx.x
        p = blk // m
        J = blk - p * m
        if p >= q.shape[0]:
            return
        t0 = J * b
        T = min(n - t0, b)
        inv = ONE / T
        for e in range(cuda.threadIdx.x, 2 * d + dv, NT):
            if e < d:
                s = colsum(q, p, t0, T, e)
                qbar[p, J, e] = scale * s * inv
                which = 0
            elif e < 2 * d:
                s = colsum(k, p, t0, T, e - d)
                kbarT[p, e - d, J] = s * inv
                which = 1
            else:
                s = colsum(v, p, t0, T, e - 2 * d)
                vs[p, J, e - 2 * d] = s
                which = 2
            if not abs(s) <= FMAX:  # inf or NaN among the entries
                cuda.atomic.max(sync, which, int32(1))

    return kernel


@functools.cache
def _rows_kernel(b, d, dv, NT, dtype):
    BP = K._cdiv(b, 4) * 4
    BP1 = BP + 1  # shared shapes must be literal constants: no arithmetic inside the calls
    KC1 = min(KCF, d) + 1
    RED = max(NT, dv)
    nbt = K._numba_type(dtype)
    ZERO = np.dtype(dtype).type(0)
    NEG_INF = np.dtype(dtype).type(-np.inf)
    EPS2 = np.dtype(dtype).type(np.finfo(dtype).eps ** 2)
    tri_prod = K._tri_prod(BP, d, NT, dtype, False, KCF)
    row_stats = K._row_stats(NT, dtype)
    rmax = _block_reduce(NT, dtype, True)
    rsum = _block_reduce(NT, dtype, False)
    row_times = _row_times(dv, NT, dtype)
    DV1 = _widths(NT)[0]
    DV2 = DV1 + 2
    D4 = d // 4
    NCOL = DV1 + 1  # the value columns of a pass, then the h column
    SB, SB2 = PANEL, PANEL // 2
    load_v = _tile_load(BP, DV1, NT, dtype)

    @cuda.jit
    def kernel(q, k, v, gamma, scale, qbar, kbarT, vs, W, X, h, rr, g):
        n = q.shape[1]
        m = W.shape[1]
        blk = cuda.blockIdx.x
        p = blk // m
        I = blk - p * m
        tid = cuda.threadIdx.x
        S = cuda.shared.array((BP, BP1), nbt)
        qs = cuda.shared.array((BP, KC1), nbt)
        ks = cuda.shared.array((BP, KC1), nbt)
        ws = cuda.shared.array((BP, DV2), nbt)  # value columns of the pass, then the h column
        us = cuda.shared.array(BP, nbt)
        minv = cuda.shared.array(BP, nbt)
        red = cuda.shared.array(RED, nbt)
        qb = cuda.shared.array(d, nbt)
        Ps = cuda.shared.array(dv, nbt)
        if p >= q.shape[0]:
            return
        t0 = I * b
        T = min(n - t0, b)
        gam = gamma[p]
        # pooled scores of block I against the earlier blocks, their shift and W's row I
        for a in range(tid, d, NT):
            qb[a] = qbar[p, I, a]
        cuda.syncthreads()
        lmax = NEG_INF
        for J in range(tid, I, NT):
            s0 = ZERO
            s1 = ZERO
            s2 = ZERO
            s3 = ZERO
            for a4 in range(D4):  # four loads in flight
                a = 4 * a4
                s0 += qb[a] * kbarT[p, a, J]
                s1 += qb[a + 1] * kbarT[p, a + 1, J]
                s2 += qb[a + 2] * kbarT[p, a + 2, J]
                s3 += qb[a + 3] * kbarT[p, a + 3, J]
            for a in range(4 * D4, d):
                s0 += qb[a] * kbarT[p, a, J]
            s = (s0 + s1) + (s2 + s3)
            W[p, I, J] = s
            lmax = max(lmax, s)
        for J in range(I + tid, m, NT):
            W[p, I, J] = ZERO
        cI = rmax(red, lmax)  # its barriers also publish the W writes to the thread block
        if I == 0:
            cI = ZERO
        lsum = ZERO
        for J in range(tid, I, NT):
            w = math.exp(W[p, I, J] - cI)
            if w < EPS2:  # cannot change a row sum (as the CPU path)
                w = ZERO
            W[p, I, J] = w
            lsum += w
        pooledI = rsum(red, lsum) * b  # the earlier blocks are full
        row_times(W, vs, p, I, Ps, red)  # P_I = sum_J W_IJ vsum_J
        # the block: causal scores, normalised rows with the pooled mass, D and 1 / (1 - gamma D_tt)
        tri_prod(q, k, k, ZERO, p, t0, T, S, qs, ks, scale, us)
        row_stats(S, T, I > 0, cI, pooledI, gam, us, minv)
        # (I - gamma D) [X | h] = [D V + u P | gamma u] by panels of SB rows: within a panel a thread
        # per column substitutes (chains of at most SB - 1 terms), then every thread adds the
        # panel's rows to the rows below it (independent products); DV1 value columns a pass
        for a0 in range(0, dv, DV1):
            cw = min(DV1, dv - a0)
            load_v(v, p, t0, T, a0, dv, ws)
            cuda.syncthreads()
            for e in range(tid, T * NCOL, NT):
                t = e // NCOL
                c = e - t * NCOL
                if c < cw:
                    ws[t, c] = us[t] * Ps[a0 + c] + S[t, t] * ws[t, c]
                elif c == DV1 and a0 == 0:
                    ws[t, c] = gam * us[t]
                else:
                    ws[t, c] = ZERO
            cuda.syncthreads()
            col = tid
            isv = col < cw
            ish = col == DV1 and a0 == 0
            cs = ZERO
            for k0 in range(0, T, SB):
                k1 = min(k0 + SB, T)
                if isv or ish:
                    vb = cuda.local.array(SB, nbt)
                    for r in range(SB):  # the panel's v, loads in flight together
                        vb[r] = ZERO
                        if isv and k0 + r < k1:
                            vb[r] = v[p, t0 + k0 + r, a0 + col]
                    for r in range(SB):
                        t = k0 + r
                        if t < k1:
                            acc = ws[t, col]
                            for j in range(r):
                                acc += S[t, k0 + j] * ws[k0 + j, col]
                            x = acc * minv[t]
                            if isv:
                                X[p, t0 + t, a0 + col] = x
                                ws[t, col] = vb[r] + gam * x
                            else:
                                h[p, t0 + t] = x
                                ws[t, col] = gam * x
                            cs += x
                cuda.syncthreads()
                for e in range(tid, (T - k1) * NCOL, NT):  # only full panels have rows below
                    i = k1 + e // NCOL
                    c = e - (i - k1) * NCOL
                    acc0 = ZERO
                    acc1 = ZERO
                    for jj in range(SB2):
                        j = k0 + 2 * jj
                        acc0 += S[i, j] * ws[j, c]
                        acc1 += S[i, j + 1] * ws[j + 1, c]
                    ws[i, c] += acc0 + acc1
                cuda.syncthreads()
            if isv:
                rr[p, I, a0 + col] = cs
            elif ish:
                g[p, I] = cs

    # 4 thread blocks of NT per SM: at most 64 registers a thread (the shared tiles allow 5)
    K.LAUNCH_BOUNDS[id(kernel)] = (NT, 4)
    return kernel


@functools.cache
def _reduced_kernel(NT, dtype, NB, CW1):
    """``(I - diag(g) L) Z = R`` with ``L`` (B, m, m) strictly lower (its upper part is not read),
    in diagonal blocks of ``NB`` rows, ``CW1 <= NT`` columns per thread block.

    Thread block ``J`` first inverts its diagonal block (by panels, as the within-block solve; no
    other block is needed, so this overlaps the wait), then adds ``L_{J,J'} Z_{J'}`` for each
    earlier ``J'`` as its flag comes up, and finishes with ``Z_J = inv (R_J + g_J acc)``: after
    the last flag, only one tile product and one product with the inverse are on the serial chain.
    """
    RG = NT // CW1
    RPT = K._cdiv(NB, RG)
    TW = max(NB, CW1) + 1
    NB1 = NB + 1
    SB = min(PANEL, NB)
    nbt = K._numba_type(dtype)
    ZERO = np.dtype(dtype).type(0)
    ONE = np.dtype(dtype).type(1)
    load_L = _tile_load(NB, NB, NT, dtype)
    load_Z = _tile_load(NB, CW1, NT, dtype)
    from numba import int32

    @cuda.jit
    def kernel(L, g, R, Z, sync):
        m = L.shape[1]
        kc = R.shape[2]
        mb = (m + NB - 1) // NB
        nch = (kc + CW1 - 1) // CW1
        tid = cuda.threadIdx.x
        T1 = cuda.shared.array((NB, TW), nbt)  # the diagonal block of L, then tiles of Z, then R_J
        D1 = cuda.shared.array((NB, NB1), nbt)  # the diagonal block's inverse
        gs = cuda.shared.array(NB, nbt)
        tk = cuda.shared.array(1, int32)
        if tid == 0:
            tk[0] = cuda.atomic.add(sync, 3, int32(1))  # tickets in start order: waits only on started blocks
        cuda.syncthreads()
        ticket = tk[0]
        J = ticket % mb
        rest = ticket // mb
        ch = rest % nch
        p = rest // nch
        if p >= L.shape[0]:
            return
        flag0 = SYNC_HEAD + (p * nch + ch) * mb
        j0 = J * NB
        T = min(m - j0, NB)
        a0 = ch * CW1
        col = tid % CW1
        rg = tid // CW1
        act = rg < RG  # threads past RG * CW1 only load
        # 1. D1 = (I - diag(g) L_JJ)^{-1}; rows past T stay the identity's
        load_L(L, p, j0, T, j0, m, T1)
        for i in range(tid, NB, NT):
            val = ZERO
            if i < T:
                val = g[p, j0 + i]
            gs[i] = val
        for e in range(tid, NB * NB, NT):
            i = e // NB
            c = e - i * NB
            D1[i, c] = ONE if i == c else ZERO
        cuda.syncthreads()
        for k0 in range(0, NB, SB):
            k1 = k0 + SB
            for c in range(tid, NB, NT):
                for r in range(SB):
                    i = k0 + r
                    acc1 = ZERO
                    for j in range(r):
                        acc1 += T1[i, k0 + j] * D1[k0 + j, c]
                    D1[i, c] += gs[i] * acc1
            cuda.syncthreads()
            for e in range(tid, (NB - k1) * NB, NT):
                i = k1 + e // NB
                c = e - (i - k1) * NB
                acc1 = ZERO
                for j in range(k0, k1):
                    acc1 += T1[i, j] * D1[j, c]
                D1[i, c] += gs[i] * acc1
            cuda.syncthreads()
        # 2. acc = L_{J, <J} Z_{<J}, one finished block at a time
        acc = cuda.local.array(RPT, nbt)
        for r in range(RPT):
            acc[r] = ZERO
        for J2 in range(J):
            k0 = J2 * NB
            if tid == 0:
                while cuda.atomic.add(sync, flag0 + J2, int32(0)) == 0:
                    pass
                cuda.threadfence()
            cuda.syncthreads()
            load_Z(Z, p, k0, NB, a0, kc, T1)
            cuda.syncthreads()
            if act:
                for kk in range(NB):
                    z = T1[kk, col]
                    for r in range(RPT):
                        i = rg + RG * r
                        if i < T:
                            acc[r] += L[p, j0 + i, k0 + kk] * z
            cuda.syncthreads()
        # 3. Z_J = D1 (R_J + g_J acc)
        for r in range(RPT):
            i = rg + RG * r
            if act and i < NB:
                val = ZERO
                if i < T and a0 + col < kc:
                    val = R[p, j0 + i, a0 + col] + gs[i] * acc[r]
                T1[i, col] = val
        cuda.syncthreads()
        if act and a0 + col < kc:
            for r in range(RPT):
                i = rg + RG * r
                if i < T:
                    s0 = ZERO
                    s1 = ZERO
                    ll = 0
                    while ll + 1 <= i:
                        s0 += D1[i, ll] * T1[ll, col]
                        s1 += D1[i, ll + 1] * T1[ll + 1, col]
                        ll += 2
                    if ll == i:
                        s0 += D1[i, ll] * T1[ll, col]
                    Z[p, j0 + i, a0 + col] = s0 + s1
        cuda.threadfence()
        cuda.syncthreads()
        if tid == 0:
            cuda.atomic.add(sync, flag0 + J, int32(1))

    return kernel


@functools.cache
def _combine_kernel(b, dv, NT, dtype):
    RED = max(NT, dv)
    nbt = K._numba_type(dtype)
    ONE = np.dtype(dtype).type(1)
    row_times = _row_times(dv, NT, dtype)
    IT = K._cdiv(b * dv, NT)  # elements of the block per thread

    @cuda.jit
    def kernel(X, h, W, Z, gamma):
        n = X.shape[1]
        m = W.shape[1]
        blk = cuda.blockIdx.x
        p = blk // m
        I = blk - p * m
        red = cuda.shared.array(RED, nbt)
        wz = cuda.shared.array(dv, nbt)
        hs = cuda.shared.array(b, nbt)
        if p >= X.shape[0]:
            return
        t0 = I * b
        T = min(n - t0, b)
        for i in range(cuda.threadIdx.x, T, NT):
            hs[i] = h[p, t0 + i]
        row_times(W, Z, p, I, wz, red)  # starts and ends with a barrier
        om = ONE - gamma[p]
        buf = cuda.local.array(IT, nbt)
        tid = cuda.threadIdx.x
        for it in range(IT):  # every load in flight before the stores
            e = tid + it * NT
            i = e // dv
            if i < T:
                buf[it] = X[p, t0 + i, e - i * dv]
        for it in range(IT):
            e = tid + it * NT
            i = e // dv
            if i < T:
                a = e - i * dv
                X[p, t0 + i, a] = om * (buf[it] + hs[i] * wz[a])

    return kernel


# --------------------------------------------------------------------------------------------------
# host


def forward(xp, q, k, v, gamma, b, scale, *, nt=None):
    """Blockwise chain attention (float32): q, k (B, n, d), v (B, n, dv), gamma (B,), ``b <= 64``.

    Returns ``(Y, bad)``: ``bad`` (3,) int32 on the device, non-zero where q, k or v held a
    non-finite value (the caller checks it once everything is queued).
    """
    B, n, d = q.shape
    dv = v.shape[-1]
    dt = q.dtype
    m = K._cdiv(n, b)
    nthr = _threads(nt)
    cw = _widths(nthr)[1]
    mb = K._cdiv(m, NB)
    nch = K._cdiv(dv, cw)
    qbar = xp.empty((B, m, d), dtype=dt)
    kbarT = xp.empty((B, d, m), dtype=dt)
    vs = xp.empty((B, m, dv), dtype=dt)
    W = xp.empty((B, m, m), dtype=dt)
    X = xp.empty((B, n, dv), dtype=dt)
    h = xp.empty((B, n), dtype=dt)
    rr = xp.empty((B, m, dv), dtype=dt)
    g = xp.empty((B, m), dtype=dt)
    Z = xp.empty((B, m, dv), dtype=dt)
    sync = xp.zeros(SYNC_HEAD + B * nch * mb, dtype=np.int32)
    s = dt.type(scale)
    K._launch(_means_kernel(b, nthr, dt), B * m, nthr, None, (q, k, v, s, qbar, kbarT, vs, sync))
    K._launch(_rows_kernel(b, d, dv, nthr, dt), B * m, nthr, None,
              (q, k, v, gamma, s, qbar, kbarT, vs, W, X, h, rr, g))
    K._launch(_reduced_kernel(nthr, dt, NB, cw), B * nch * mb, nthr, None, (W, g, rr, Z, sync))
    K._launch(_combine_kernel(b, dv, nthr, dt), B * m, nthr, None, (X, h, W, Z, gamma))
    return X, sync[:3]


def raise_nonfinite(bad, names=("q", "k", "v")):
    """Raise the CPU layer's ``ValueError`` for the first array flagged non-finite (``bad``: one
    truth value per name; from :func:`forward`'s kernels or ``_api._all_finite``'s reductions)."""
    from .._validate import nonfinite_error

    for name, flag in zip(names, (int(x) for x in bad)):
        if flag:
            raise nonfinite_error(name)


def forward_checked(xp, q, k, v, gamma, b, scale, *, nt=None):
    """:func:`forward`, then one synchronisation that raises ``ValueError`` for non-finite input."""
    y, bad = forward(xp, q, k, v, gamma, b, scale, nt=nt)
    raise_nonfinite(bad.get() if hasattr(bad, "get") else bad)
    return y
