"""numba-cuda kernels of blockwise chain attention and of its reduced system.

Nothing is compiled at import: every kernel is built by a factory on first use, specialised on the
sizes that fix its shared-memory tiles and register blocking (block size, widths, dtype, threads),
and cached per process.  The launchers take device arrays (CuPy, numba) or, under the CUDA simulator
(``NUMBA_ENABLE_CUDASIM=1``), NumPy arrays, so the tests run the very same kernels on a machine
without a GPU.

Layout shared by the within-block kernels: one thread block per (batch entry ``p``, block ``I``)
(grid x), optionally a second grid dimension over chunks of value columns; ``NT`` threads.

- Scores: the causal lower triangle of ``scale Q_I K_I^T`` (``T x T``, ``T <= b <= 64``) in shared
  memory.  Each thread owns a 4 x 4 register tile whose rows are ``ti + NTR r`` and columns
  ``tj + NTR c`` (``NTR = BP / 4``), so a warp reads distinct banks; only the 10 pairs ``c <= r``
  can hold entries ``j <= i`` and only those are accumulated.  ``d`` is streamed through shared
  memory in chunks of ``KC`` columns.
- Row statistics (max with the pooled shift, normaliser with the pooled mass, ``u``): a thread per
  row.
- Triangular solves with ``I - gamma D`` (forward) or its transpose (backward): right-looking
  substitution, one ``__syncthreads`` per row.  A thread owns two columns and every ``R``-th row;
  its partial sums stay in registers, the finished row is broadcast through shared memory.
"""

from __future__ import annotations

import functools
import math

import numpy as np

if not hasattr(np, "row_stack"):  # pragma: no cover - NumPy >= 2.5 without the alias
    # numba-cuda <= 0.30 registers an overload for np.row_stack when its typing context first loads
    # (at the first kernel compile) and fails on NumPy 2.5, which removed that alias of vstack.
    np.row_stack = np.vstack

from numba import cuda  # noqa: E402

__all__ = [
    "MAX_BLOCK",
    "forward_within",
    "backward_solve",
    "backward_grads",
    "combine",
    "diag_block_inverse",
    "reduced_solve",
    "RED_NB",
]

MAX_BLOCK = 64  #: largest block size the fused kernels take (the score tile lives in shared memory)
KC = 32  #: columns of q/k (or G/R) per shared-memory chunk
NT_BLOCK = 256  #: threads per thread block of the within-block kernels on a GPU
DVC = 64  #: value columns per thread block (more columns: a second grid dimension)
RED_NB = 64  #: diagonal block of the reduced system
RED_CW = 8  #: right-hand-side columns per thread block of the reduced solve
RED_KT = 32  #: K tile of the reduced solve's block products


def _cdiv(a, b):
    return -(-a // b)


def _numba_type(dtype):
    from numba import float32, float64, int32

    dt = np.dtype(dtype)
    return {np.dtype(np.float32): float32, np.dtype(np.int32): int32}.get(dt, float64)


def _simulated() -> bool:
    from numba import config

    return bool(config.ENABLE_CUDASIM)


def threads(nt=None):
    """Threads per block: 256 on a GPU; fewer under the simulator, where each is a Python thread."""
    if nt is not None:
        return nt
    return 32 if _simulated() else NT_BLOCK


# --------------------------------------------------------------------------------------------------
# device building blocks


def _uint64():
    from numba import uint64

    return uint64


def generated(name, lines, env=(), nconst=0):
    """Compile generated straight-line source as a device function.  numba-cuda leaves these loops
    rolled, and rolled they spend about ten integer instructions (64-bit index arithmetic, the
    negative-index fix-up) on every multiply-add; unrolled on unsigned indices every shared read is
    a base register plus a constant offset (docs/gpu.md).  The source sees ``uint64``, ``cuda``,
    the unsigned constants ``U0 .. U{nconst - 1}`` and ``env``."""
    ns = {"uint64": _uint64(), "cuda": cuda, **{f"U{c}": np.uint64(c) for c in range(nconst)}, **dict(env)}
    exec(compile("\n".join(lines) + "\n", f"<resolvent generated {name}>", "exec"), ns)
    return cuda.jit(device=True)(ns[name])


@functools.cache
def _tri_inner(NTR, KC, dtype):
    """Device function: one chunk of ``KC`` columns of a thread's 4 x 4 score tile (the 10 pairs
    that can hold entries on or below the diagonal), unrolled: 8 shared reads and 10 multiply-adds
    a column, and nothing else."""
    env = {"UNTR": np.uint64(NTR)}
    acc = ["a00", "a10", "a11", "a20", "a21", "a22", "a30", "a31", "a32", "a33"]
    L = [f"def inner(qs, ks, ti, tj, {', '.join(acc)}):", "    i0 = uint64(ti)", "    j0 = uint64(tj)"]
    L += [f"    i{r} = i{r - 1} + UNTR" for r in range(1, 4)] + [f"    j{r} = j{r - 1} + UNTR" for r in range(1, 4)]
    for c in range(KC):
        L += [f"    x{r} = qs[i{r}, U{c}]" for r in range(4)] + [f"    y{r} = ks[j{r}, U{c}]" for r in range(4)]
        L += [f"    a{r}{q} += x{r} * y{q}" for r in range(4) for q in range(r + 1)]
    L += [f"    return ({', '.join(acc)})"]
    return generated("inner", L, env, nconst=KC)


@functools.cache
def _chunk_load(BP, KC, K, NT, dtype, with_c2):
    """Device function: columns ``k0 .. k0 + KC - 1`` of rows ``t0 .. t0 + BP - 1`` of ``A`` into
    ``qs`` and of ``B + c2 Bc`` (``B`` alone unless ``with_c2``) into ``ks``, zero past ``T`` rows or
    ``K`` columns; every load in flight before a barrier, then the shared stores.  A thread keeps one
    column and every ``NT / KC``-th row, unrolled on unsigned indices (about four integer
    instructions a load where the rolled loop spent thirty: 64-bit division, negative-index
    fix-ups).  Where ``KC`` does not divide ``NT``, the same as a rolled loop."""
    if NT % KC:
        return _chunk_load_rolled(BP, KC, K, NT, dtype, with_c2)
    RS = NT // KC
    IT = _cdiv(BP, RS)
    env = {"ZERO": np.dtype(dtype).type(0), "UKC": np.uint64(KC), "UK": np.uint64(K), "UBP": np.uint64(BP)}
    env.update({f"R{it}": np.uint64(it * RS) for it in range(IT)})
    L = ["def load(A, B, Bc, c2, p, t0, T, k0, qs, ks):", "    tid = uint64(cuda.threadIdx.x)",
         "    i = tid // UKC", "    j = tid - i * UKC", "    pu = uint64(p)", "    ru = uint64(t0) + i",
         "    cj = uint64(k0) + j", "    Tu = uint64(T)", "    ok = cj < UK"]
    for it in range(IT):
        L += [f"    x{it} = ZERO", f"    y{it} = ZERO", f"    if ok and i + R{it} < Tu:",
              f"        x{it} = A[pu, ru + R{it}, cj]"]
        if with_c2:
            L += [f"        y{it} = B[pu, ru + R{it}, cj] + c2 * Bc[pu, ru + R{it}, cj]"]
        else:
            L += [f"        y{it} = B[pu, ru + R{it}, cj]"]
    L += ["    cuda.syncthreads()"]
    for it in range(IT):
        L += [f"    if i + R{it} < UBP:", f"        qs[i + R{it}, j] = x{it}", f"        ks[i + R{it}, j] = y{it}"]
    return generated("load", L, env)


@functools.cache
def _chunk_load_flat(BP, KC, K, NT, dtype, with_c2=False):
    """:func:`_chunk_load` (``B`` alone) on flat C-contiguous arrays: ``A``, ``B`` hold rows of ``K``
    entries one after another, and the ``p`` argument is the first row's index among them (``p n +
    t0``; ``t0`` is unread).  An element's index is then a base plus a constant: one add and one
    shift a load, where a three-dimensional index with the array's strides spent some thirty
    integer instructions (Nsight Compute: 12% of the rows kernel's instructions).  ``with_c2``:
    ``B + c2 Bc`` into ``ks``, ``Bc`` flat as ``B``."""
    ZERO = np.dtype(dtype).type(0)
    if NT % KC:
        LIT = _cdiv(BP * KC, NT)
        nbt = _numba_type(dtype)

        @cuda.jit(device=True)
        def load_rolled(A, B, Bc, c2, p, t0, T, k0, qs, ks):
            tid = cuda.threadIdx.x
            bq = cuda.local.array(LIT, nbt)
            bk = cuda.local.array(LIT, nbt)
            for li in range(LIT):
                e = tid + li * NT
                r = e // KC
                col = k0 + e - r * KC
                bq[li] = ZERO
                bk[li] = ZERO
                if r < T and col < K:
                    bq[li] = A[(p + r) * K + col]
                    bk[li] = B[(p + r) * K + col]
                    if with_c2:
                        bk[li] += c2 * Bc[(p + r) * K + col]
            cuda.syncthreads()
            for li in range(LIT):
                e = tid + li * NT
                r = e // KC
                if r < BP:
                    qs[r, e - r * KC] = bq[li]
                    ks[r, e - r * KC] = bk[li]

        return load_rolled
    RS = NT // KC
    IT = _cdiv(BP, RS)
    env = {"ZERO": ZERO, "UKC": np.uint64(KC), "UK": np.uint64(K), "UBP": np.uint64(BP)}
    env.update({f"R{it}": np.uint64(it * RS) for it in range(IT)})
    env.update({f"O{it}": np.uint64(it * RS * K) for it in range(IT)})
    L = ["def load(A, B, Bc, c2, p, t0, T, k0, qs, ks):", "    tid = uint64(cuda.threadIdx.x)",
         "    i = tid // UKC", "    j = tid - i * UKC", "    cj = uint64(k0) + j", "    Tu = uint64(T)",
         "    ok = cj < UK", "    off = (uint64(p) + i) * UK + cj"]
    for it in range(IT):
        L += [f"    x{it} = ZERO", f"    y{it} = ZERO", f"    if ok and i + R{it} < Tu:",
              f"        x{it} = A[off + O{it}]"]
        L += [f"        y{it} = B[off + O{it}] + c2 * Bc[off + O{it}]" if with_c2 else f"        y{it} = B[off + O{it}]"]
    L += ["    cuda.syncthreads()"]
    for it in range(IT):
        L += [f"    if i + R{it} < UBP:", f"        qs[i + R{it}, j] = x{it}", f"        ks[i + R{it}, j] = y{it}"]
    return generated("load", L, env)


@functools.cache
def _chunk_load_rolled(BP, KC, K, NT, dtype, with_c2):
    """:func:`_chunk_load` for any ``NT``: element ``e = tid + li NT`` of the chunk is row ``e // KC``."""
    LIT = _cdiv(BP * KC, NT)
    ZERO = np.dtype(dtype).type(0)
    nbt = _numba_type(dtype)

    @cuda.jit(device=True)
    def load(A, B, Bc, c2, p, t0, T, k0, qs, ks):
        tid = cuda.threadIdx.x
        bq = cuda.local.array(LIT, nbt)
        bk = cuda.local.array(LIT, nbt)
        for li in range(LIT):
            e = tid + li * NT
            r = e // KC
            col = k0 + e - r * KC
            bq[li] = ZERO
            bk[li] = ZERO
            if r < T and col < K:
                bq[li] = A[p, t0 + r, col]
                bk[li] = B[p, t0 + r, col]
                if with_c2:
                    bk[li] += c2 * Bc[p, t0 + r, col]
        cuda.syncthreads()
        for li in range(LIT):
            e = tid + li * NT
            r = e // KC
            if r < BP:
                qs[r, e - r * KC] = bq[li]
                ks[r, e - r * KC] = bk[li]

    return load


@functools.cache
def _tri_prod(BP, K, NT, dtype, combine_mode, kc=KC, flat=False):
    """Device function: the causal lower triangle of ``A_I (B_I + c2 Bc_I)^T`` into shared ``S``
    (``B_I`` alone, ``c2`` and ``Bc`` unread, unless ``combine_mode``).  ``flat``: ``A`` and ``B``
    are flat arrays and ``p`` the block's first row among their rows (:func:`_chunk_load_flat`).

    ``combine_mode`` False: ``S[i, j] = scale * acc``.  True (the backward's ``dS``):
    ``S[i, j] = scale * S[i, j] * (acc - delta[i])``, ``S`` holding ``D`` on entry.
    Entries with ``j > i`` are written with garbage on the diagonal tiles and are never read.
    ``qs``, ``ks`` are shared ``(BP, >= min(kc, K))`` buffers: ``K`` is streamed in chunks of ``kc``.
    """
    NTR = BP // 4
    NTILE = NTR * NTR
    ITERS = _cdiv(NTILE, NT)
    KCc = min(kc, K)
    NCH = _cdiv(K, KCc)
    ZERO = np.dtype(dtype).type(0)
    inner = _tri_inner(NTR, KCc, dtype)
    load = (_chunk_load_flat(BP, KCc, K, NT, dtype, combine_mode) if flat
            else _chunk_load(BP, KCc, K, NT, dtype, combine_mode))

    @cuda.jit(device=True)
    def tri_prod(A, B, Bc, c2, p, t0, T, S, qs, ks, scale, delta):
        tid = cuda.threadIdx.x
        for it in range(ITERS):
            tile = tid + it * NT
            active = tile < NTILE
            ti = tile // NTR
            tj = tile - ti * NTR
            a00 = ZERO
            a10 = ZERO
            a11 = ZERO
            a20 = ZERO
            a21 = ZERO
            a22 = ZERO
            a30 = ZERO
            a31 = ZERO
            a32 = ZERO
            a33 = ZERO
            for ch in range(NCH):
                load(A, B, Bc, c2, p, t0, T, ch * KCc, qs, ks)
                cuda.syncthreads()
                if active:
                    (a00, a10, a11, a20, a21, a22, a30, a31, a32,
                     a33) = inner(qs, ks, ti, tj, a00, a10, a11, a20, a21, a22, a30, a31, a32, a33)
            if active:
                i0 = ti
                i1 = ti + NTR
                i2 = ti + 2 * NTR
                i3 = ti + 3 * NTR
                j0 = tj
                j1 = tj + NTR
                j2 = tj + 2 * NTR
                j3 = tj + 3 * NTR
                if combine_mode:
                    S[i0, j0] = scale * S[i0, j0] * (a00 - delta[i0])
                    S[i1, j0] = scale * S[i1, j0] * (a10 - delta[i1])
                    S[i1, j1] = scale * S[i1, j1] * (a11 - delta[i1])
                    S[i2, j0] = scale * S[i2, j0] * (a20 - delta[i2])
                    S[i2, j1] = scale * S[i2, j1] * (a21 - delta[i2])
                    S[i2, j2] = scale * S[i2, j2] * (a22 - delta[i2])
                    S[i3, j0] = scale * S[i3, j0] * (a30 - delta[i3])
                    S[i3, j1] = scale * S[i3, j1] * (a31 - delta[i3])
                    S[i3, j2] = scale * S[i3, j2] * (a32 - delta[i3])
                    S[i3, j3] = scale * S[i3, j3] * (a33 - delta[i3])
                else:
                    S[i0, j0] = scale * a00
                    S[i1, j0] = scale * a10
                    S[i1, j1] = scale * a11
                    S[i2, j0] = scale * a20
                    S[i2, j1] = scale * a21
                    S[i2, j2] = scale * a22
                    S[i3, j0] = scale * a30
                    S[i3, j1] = scale * a31
                    S[i3, j2] = scale * a32
                    S[i3, j3] = scale * a33
        cuda.syncthreads()

    return tri_prod


@functools.cache
def _row_stats(NT, dtype):
    """Device function: normalise the score rows of ``S`` in place into ``D`` and fill ``us`` (u)
    and ``minv`` (``1 / (1 - gamma D_tt)``); ``cI`` is the pooled shift, ``pooledI`` the pooled mass."""
    ZERO = np.dtype(dtype).type(0)
    ONE = np.dtype(dtype).type(1)
    NEG_INF = np.dtype(dtype).type(-np.inf)
    UONE = np.uint64(1)
    uint64 = _uint64()

    @cuda.jit(device=True)
    def row_stats(S, T, has_pooled, cI, pooledI, gam, us, minv):
        for i in range(cuda.threadIdx.x, T, NT):
            iu = uint64(i)  # unsigned indices: no negative-index fix-up on every shared read
            n1 = iu + UONE
            rmax = NEG_INF
            for j in range(n1):
                rmax = max(rmax, S[iu, j])
            if has_pooled:
                rmax = max(rmax, cI)
            z = ZERO
            for j in range(n1):
                e = math.exp(S[iu, j] - rmax)
                S[iu, j] = e
                z += e
            ec = ZERO
            if has_pooled:
                ec = math.exp(cI - rmax)
                z += ec * pooledI
            inv = ONE / z
            for j in range(n1):
                S[iu, j] = S[iu, j] * inv
            us[iu] = ec * inv
            minv[iu] = ONE / (ONE - gam * S[iu, iu])
        cuda.syncthreads()

    return row_stats


def _col_layout(ncol, BP, NT):
    """Thread -> (two columns, row group) layout: ``(NCG, R, RPT)``."""
    ncg = _cdiv(ncol, 2)
    R = max(1, NT // ncg)
    return ncg, R, _cdiv(BP, R)


@functools.cache
def _tri_apply(BP, K, NT, dtype, transpose, with_dot):
    """Device function: ``out[x, a] = sum_y S'[x, y] src[y, a]`` for ``x < T``, ``a < K``, where
    ``S'`` is the lower triangle of ``S`` (``y <= x``) or, with ``transpose``, of ``S^T``
    (``y >= x``).  With ``with_dot`` it also returns this thread's share of ``sum out * dotw``."""
    NCG, R, RPT = _col_layout(K, BP, NT)
    SLOTS = NCG * R
    ZERO = np.dtype(dtype).type(0)
    nbt = _numba_type(dtype)

    @cuda.jit(device=True)
    def tri_apply(S, src, p, t0, T, out, dotw):
        part = ZERO
        for slot in range(cuda.threadIdx.x, SLOTS, NT):
            cg = slot % NCG
            r0 = slot // NCG
            c0 = 2 * cg
            c1 = c0 + 1
            ok1 = c1 < K
            acc0 = cuda.local.array(RPT, nbt)
            acc1 = cuda.local.array(RPT, nbt)
            for kk in range(RPT):
                acc0[kk] = ZERO
                acc1[kk] = ZERO
            for y in range(T):
                s0 = src[p, t0 + y, c0]
                s1 = ZERO
                if ok1:
                    s1 = src[p, t0 + y, c1]
                for kk in range(RPT):
                    x = r0 + R * kk
                    if transpose:
                        if x <= y:
                            w = S[y, x]
                            acc0[kk] += w * s0
                            acc1[kk] += w * s1
                    else:
                        if y <= x and x < T:
                            w = S[x, y]
                            acc0[kk] += w * s0
                            acc1[kk] += w * s1
            for kk in range(RPT):
                x = r0 + R * kk
                if x < T:
                    out[p, t0 + x, c0] = acc0[kk]
                    if with_dot:
                        part += acc0[kk] * dotw[p, t0 + x, c0]
                    if ok1:
                        out[p, t0 + x, c1] = acc1[kk]
                        if with_dot:
                            part += acc1[kk] * dotw[p, t0 + x, c1]
        return part

    return tri_apply


# --------------------------------------------------------------------------------------------------
# forward


@functools.cache
def _forward_kernel(b, d, dvc, NT, dtype):
    BP = _cdiv(b, 4) * 4
    KCc = min(KC, d)
    NCOL = dvc + 1  # value columns of the chunk, then the h column
    NCG, R, RPT = _col_layout(NCOL, BP, NT)
    nbt = _numba_type(dtype)
    ZERO = np.dtype(dtype).type(0)
    BP1, KC1, NCOL1 = BP + 1, KCc + 1, NCOL + 1
    tri_prod = _tri_prod(BP, d, NT, dtype, False)
    row_stats = _row_stats(NT, dtype)

    @cuda.jit
    def kernel(q, k, v, gamma, scale, c, pooled, P, X, h, rr, g):
        B = q.shape[0]
        n = q.shape[1]
        dv = v.shape[2]
        m = (n + b - 1) // b
        blk = cuda.blockIdx.x
        p = blk // m
        I = blk - p * m
        t0 = I * b
        T = min(n - t0, b)
        a0 = cuda.blockIdx.y * dvc
        tid = cuda.threadIdx.x
        S = cuda.shared.array((BP, BP1), nbt)
        qs = cuda.shared.array((BP, KC1), nbt)
        ks = cuda.shared.array((BP, KC1), nbt)
        us = cuda.shared.array(BP, nbt)
        minv = cuda.shared.array(BP, nbt)
        wb = cuda.shared.array((2, NCOL1), nbt)
        csum = cuda.shared.array(NCOL1, nbt)
        if p >= B:
            return
        gam = gamma[p]
        tri_prod(q, k, k, ZERO, p, t0, T, S, qs, ks, scale, us)
        row_stats(S, T, I > 0, c[p, I], pooled[p, I], gam, us, minv)
        for e in range(tid, NCOL, NT):
            csum[e] = ZERO
        cuda.syncthreads()
        # right-looking forward substitution with I - gamma D on [U | gamma u]
        cg = tid % NCG
        r0 = tid // NCG
        act = tid < NCG * R
        cc0 = 2 * cg
        cc1 = cc0 + 1
        # column kinds: 0 = value column, 1 = h column, 2 = none
        kind0 = 2
        kind1 = 2
        if act:
            if cc0 < dvc and a0 + cc0 < dv:
                kind0 = 0
            elif cc0 == dvc:
                kind0 = 1
            if cc1 < dvc and a0 + cc1 < dv:
                kind1 = 0
            elif cc1 == dvc:
                kind1 = 1
        acc0 = cuda.local.array(RPT, nbt)
        acc1 = cuda.local.array(RPT, nbt)
        vv0 = cuda.local.array(RPT, nbt)  # the thread's rows of v: kept in registers, shifted with acc
        vv1 = cuda.local.array(RPT, nbt)
        PI0 = ZERO
        PI1 = ZERO
        if kind0 == 0:
            PI0 = P[p, I, a0 + cc0]
        if kind1 == 0:
            PI1 = P[p, I, a0 + cc1]
        for kk in range(RPT):
            i = r0 + R * kk
            acc0[kk] = ZERO
            acc1[kk] = ZERO
            vv0[kk] = ZERO
            vv1[kk] = ZERO
            if i < T:
                if kind0 == 0:
                    vv0[kk] = v[p, t0 + i, a0 + cc0]
                    acc0[kk] = us[i] * PI0 + S[i, i] * vv0[kk]
                elif kind0 == 1:
                    acc0[kk] = gam * us[i]
                if kind1 == 0:
                    vv1[kk] = v[p, t0 + i, a0 + cc1]
                    acc1[kk] = us[i] * PI1 + S[i, i] * vv1[kk]
                elif kind1 == 1:
                    acc1[kk] = gam * us[i]
        cs0 = ZERO
        cs1 = ZERO
        base = r0  # row of acc[0]: finished rows are shifted out, so acc is only indexed by constants
        for t in range(T):
            buf = t % 2
            if act and r0 == t % R:
                x0 = acc0[0] * minv[t]
                x1 = acc1[0] * minv[t]
                v0 = vv0[0]
                v1 = vv1[0]
                for kk in range(RPT - 1):
                    acc0[kk] = acc0[kk + 1]
                    acc1[kk] = acc1[kk + 1]
                    vv0[kk] = vv0[kk + 1]
                    vv1[kk] = vv1[kk + 1]
                acc0[RPT - 1] = ZERO
                acc1[RPT - 1] = ZERO
                base += R
                cs0 += x0
                cs1 += x1
                if kind0 == 0:
                    X[p, t0 + t, a0 + cc0] = x0
                    wb[buf, cc0] = v0 + gam * x0
                elif kind0 == 1:
                    if a0 == 0:
                        h[p, t0 + t] = x0
                    wb[buf, cc0] = gam * x0
                if kind1 == 0:
                    X[p, t0 + t, a0 + cc1] = x1
                    wb[buf, cc1] = v1 + gam * x1
                elif kind1 == 1:
                    if a0 == 0:
                        h[p, t0 + t] = x1
                    wb[buf, cc1] = gam * x1
            cuda.syncthreads()
            if act:
                w0 = ZERO
                w1 = ZERO
                if kind0 != 2:
                    w0 = wb[buf, cc0]
                if kind1 != 2:
                    w1 = wb[buf, cc1]
                for kk in range(RPT):
                    i = base + R * kk
                    if i < T:
                        dit = S[i, t]
                        acc0[kk] += dit * w0
                        acc1[kk] += dit * w1
        if kind0 != 2:
            cuda.atomic.add(csum, cc0, cs0)
        if kind1 != 2:
            cuda.atomic.add(csum, cc1, cs1)
        cuda.syncthreads()
        for e in range(tid, NCOL, NT):
            if e < dvc:
                if a0 + e < dv:
                    rr[p, I, a0 + e] = csum[e]
            elif a0 == 0:
                g[p, I] = csum[e]

    return kernel


def _stream_arg(stream):
    return 0 if stream is None else stream


def _dev(*arrays):
    """Device arrays for a numba launch: CuPy (any ``__cuda_array_interface__``) arrays are wrapped
    without the synchronisation numba would otherwise do on their stream (the launch goes to the same
    stream); NumPy arrays (the simulator) and numba device arrays pass through."""
    out = []
    for x in arrays:
        if hasattr(x, "__cuda_array_interface__") and not hasattr(x, "copy_to_host") and not _simulated():
            x = cuda.from_cuda_array_interface(x.__cuda_array_interface__, owner=x, sync=False)
        out.append(x)
    return out


def _is_cupy(x) -> bool:
    return type(x).__module__.startswith("cupy")


_FAST: dict = {}
LAUNCH_BOUNDS: dict = {}  #: id(kernel) -> (threads, min blocks per SM), handed to the PTX compiler


def _numba_argtype(x):
    from numba.core import types

    if _is_cupy(x):
        return types.Array(_numba_type(x.dtype), x.ndim, "C")
    if isinstance(x, (np.floating,)):
        return _numba_type(x.dtype)
    if isinstance(x, (int, np.integer)):
        return types.int64
    raise TypeError(f"unsupported kernel argument {type(x)}")


_BY_KEY: dict = {}


def _fast_function(kern, argtypes):
    """The kernel compiled once by numba to PTX, loaded by CuPy: a launch then costs what a CuPy
    ``RawKernel`` launch costs, not numba's per-argument dispatch (about 50x more here)."""
    import re

    import cupy

    from . import _ptxcache

    key = (id(kern), argtypes)
    fn = _FAST.get(key)
    if fn is None:
        bounds = LAUNCH_BOUNDS.get(id(kern))
        disk = _ptxcache.kernel_key(kern, argtypes, bounds, cuda.get_current_device().compute_capability)
        ptx = _ptxcache.load(disk)  # compiled by an earlier process (numba took ~100 s for them all)
        cached = ptx is not None
        while True:
            if ptx is None:
                ptx, _ = cuda.compile_ptx_for_current_device(kern.py_func, argtypes, launch_bounds=bounds)
                _ptxcache.store(disk, ptx)
            try:
                name = re.search(r"\.entry\s+([\w$]+)\s*\(", ptx).group(1)
                mod = cupy.cuda.function.Module()
                mod.load(ptx.encode())
                fn = (mod, mod.get_function(name))
                break
            except (AttributeError, cupy.cuda.driver.CUDADriverError):
                if not cached:
                    raise
                cached, ptx = False, None  # an entry this driver cannot load, or a damaged one: compile again
        _FAST[key] = fn
    return fn[1]


_MASK64 = (1 << 64) - 1
_OFFSETS: dict = {}  #: number of parameters -> their byte offsets in the word buffer


def _fast_args(args):
    """``(key, words)`` for a raw launch, or ``None`` when an argument needs numba's own launch.

    ``key``: what of the arguments fixes the compiled kernel (cheap, looked up on every launch).
    ``words``: numba's kernel ABI, one 8-byte word per parameter: an array is (meminfo, parent,
    nitems, itemsize, data, shape..., strides...), an integer an int64, a float32 its bits in the
    low half of its word.  The words of a layout (every shape and stride) are built once and kept
    (:data:`_TEMPLATES`); a launch then only fills in the data pointers and the scalars (building
    some 100 words in Python cost 50-90 microseconds a launch)."""
    sig = []
    vals = []
    for x in args:
        if isinstance(x, np.float32):
            sig.append("f")
            vals.append(int(x.view(np.uint32)))
        elif isinstance(x, np.float64):
            sig.append("d")
            vals.append(int(x.view(np.uint64)))
        elif isinstance(x, (int, np.integer)):
            sig.append("i")
            vals.append(int(x) & _MASK64)
        elif _is_cupy(x) and x.flags.c_contiguous:
            sig.append((x.dtype.char, x.shape, x.strides))
            vals.append(x.data.ptr)
        else:
            return None
    sig = tuple(sig)
    entry = _TEMPLATES.get(sig)
    if entry is None:
        if len(_TEMPLATES) >= 4096:
            _TEMPLATES.clear()
        key, words, slots = [], [], []
        for t in sig:
            slots.append(len(words) + (0 if isinstance(t, str) else 4))
            if isinstance(t, str):
                key.append(t)
                words.append(0)
            else:
                char, shape, strides = t
                itemsize = np.dtype(char).itemsize
                key.append((char, len(shape)))
                # a view with reversed axes of length 1 is still C-contiguous, with negative strides
                words += [0, 0, math.prod(shape), itemsize, 0, *shape, *(st & _MASK64 for st in strides)]
        entry = _TEMPLATES[sig] = (tuple(key), np.array(words, dtype=np.uint64), np.array(slots, dtype=np.intp))
    key, template, slots = entry
    words = template.copy()
    words[slots] = vals
    return key, words


_TEMPLATES: dict = {}  #: argument layout -> (key, words with zero pointers and scalars, their slots)


def _launch_raw(fn, grid3, nthreads, stream, words):
    """``cuLaunchKernel`` with every parameter in one NumPy buffer: a few microseconds, where CuPy's
    ``Function.__call__`` builds a Python object per parameter (about 100 here, ~0.1 ms a launch)."""
    import cupy

    nw = words.size
    offs = _OFFSETS.get(nw)
    if offs is None:
        offs = _OFFSETS[nw] = np.arange(nw, dtype=np.uint64) * np.uint64(8)
    ptrs = offs + np.uint64(words.ctypes.data)  # kernelParams: a pointer to each word
    cupy.cuda.driver.launchKernel(fn.ptr, grid3[0], grid3[1], grid3[2], nthreads, 1, 1, 0, stream.ptr,
                                  ptrs.ctypes.data, 0)  # the driver copies the words before returning


def _launch(kern, grid, nthreads, stream, args):
    """Launch ``kern``: CuPy arrays through the fast path on CuPy's current stream; NumPy arrays
    (the simulator) and anything else through numba."""
    grid = grid if isinstance(grid, tuple) else (grid,)
    fast = None if _simulated() else _fast_args(args)
    if fast is not None:
        import cupy

        key = (id(kern), fast[0])
        fn = _BY_KEY.get(key)
        if fn is None:  # building numba types costs microseconds per argument: once per signature
            fn = _BY_KEY[key] = _fast_function(kern, tuple(_numba_argtype(a) for a in args))
        grid3 = tuple(grid) + (1,) * (3 - len(grid))
        _launch_raw(fn, grid3, nthreads, cupy.cuda.get_current_stream(), fast[1])
        return
    arrays = [a for a in args if hasattr(a, "shape") and not isinstance(a, np.generic)]
    if stream is None and not _simulated() and any(_is_cupy(a) for a in arrays):
        import cupy

        stream = cuda.external_stream(cupy.cuda.get_current_stream().ptr)
    conv = iter(_dev(*arrays))
    args = [next(conv) if (hasattr(a, "shape") and not isinstance(a, np.generic)) else a for a in args]
    kern[grid, nthreads, _stream_arg(stream)](*args)


def forward_within(q, k, v, gamma, b, scale, c, pooled, P, X, h, rr, g, *, stream=None, nt=None):
    """Fill ``X`` (B, n, dv) with ``M0^{-1} U``, ``h`` (B, n) with ``M0^{-1} (gamma u)`` and their
    block sums ``rr`` (B, m, dv), ``g`` (B, m) (``U = D V + u P``; see ``resolvent._gpu._blockwise``)."""
    B, n, d = q.shape
    dv = v.shape[2]
    m = _cdiv(n, b)
    NT = threads(nt)
    dvc = min(DVC, dv)
    kern = _forward_kernel(b, d, dvc, NT, np.dtype(q.dtype))
    grid = (B * m, _cdiv(dv, dvc))
    _launch(kern, grid, NT, stream, (q, k, v, gamma, q.dtype.type(scale), c, pooled, P, X, h, rr, g))


@functools.cache
def _combine_kernel(dtype, NT):
    ONE = np.dtype(dtype).type(1)

    @cuda.jit
    def kernel(X, h, WZ, gamma, b):
        n = X.shape[1]
        dv = X.shape[2]
        m = (n + b - 1) // b
        p = cuda.blockIdx.x // m
        I = cuda.blockIdx.x - p * m
        t0 = I * b
        T = min(n - t0, b)
        if p >= X.shape[0]:
            return
        om = ONE - gamma[p]
        for e in range(cuda.threadIdx.x, T * dv, NT):
            i = e // dv
            a = e - i * dv
            X[p, t0 + i, a] = om * (X[p, t0 + i, a] + h[p, t0 + i] * WZ[p, I, a])

    return kernel


def combine(X, h, WZ, gamma, b, *, stream=None, nt=None):
    """In place: ``X <- (1 - gamma) (X + h * E (W Z))``; one thread block per (batch entry, block)."""
    B, n, dv = X.shape
    NT = threads(nt)
    _launch(_combine_kernel(np.dtype(X.dtype), NT), B * _cdiv(n, b), NT, stream, (X, h, WZ, gamma, int(b)))


# --------------------------------------------------------------------------------------------------
# backward


@functools.cache
def _backward_solve_kernel(b, d, dvc, NT, dtype):
    BP = _cdiv(b, 4) * 4
    KCc = min(KC, d)
    NCOL = dvc + 1  # dX columns of the chunk, then the h' column
    NCG, R, RPT = _col_layout(NCOL, BP, NT)
    nbt = _numba_type(dtype)
    ZERO = np.dtype(dtype).type(0)
    BP1, KC1, NCOL1 = BP + 1, KCc + 1, NCOL + 1
    tri_prod = _tri_prod(BP, d, NT, dtype, False)
    row_stats = _row_stats(NT, dtype)

    @cuda.jit
    def kernel(q, k, gamma, scale, c, pooled, dX, Dst, u, G0, hp, rr, gd):
        B = q.shape[0]
        n = q.shape[1]
        dv = dX.shape[2]
        m = (n + b - 1) // b
        blk = cuda.blockIdx.x
        p = blk // m
        I = blk - p * m
        t0 = I * b
        T = min(n - t0, b)
        a0 = cuda.blockIdx.y * dvc
        tid = cuda.threadIdx.x
        S = cuda.shared.array((BP, BP1), nbt)
        qs = cuda.shared.array((BP, KC1), nbt)
        ks = cuda.shared.array((BP, KC1), nbt)
        us = cuda.shared.array(BP, nbt)
        minv = cuda.shared.array(BP, nbt)
        wb = cuda.shared.array((2, NCOL1), nbt)
        csum = cuda.shared.array(NCOL1, nbt)
        if p >= B:
            return
        gam = gamma[p]
        tri_prod(q, k, k, ZERO, p, t0, T, S, qs, ks, scale, us)
        row_stats(S, T, I > 0, c[p, I], pooled[p, I], gam, us, minv)
        if a0 == 0:
            for e in range(tid, T * T, NT):
                i = e // T
                j = e - i * T
                Dst[p, I, i, j] = S[i, j] if j <= i else ZERO
            for e in range(tid, T, NT):
                u[p, t0 + e] = us[e]
        for e in range(tid, NCOL, NT):
            csum[e] = ZERO
        cuda.syncthreads()
        cg = tid % NCG
        r0 = tid // NCG
        act = tid < NCG * R
        cc0 = 2 * cg
        cc1 = cc0 + 1
        kind0 = 2
        kind1 = 2
        if act:
            if cc0 < dvc and a0 + cc0 < dv:
                kind0 = 0
            elif cc0 == dvc:
                kind0 = 1
            if cc1 < dvc and a0 + cc1 < dv:
                kind1 = 0
            elif cc1 == dvc:
                kind1 = 1
        acc0 = cuda.local.array(RPT, nbt)
        acc1 = cuda.local.array(RPT, nbt)
        # rows are finished from the last to the first: acc[kk] holds row top - R kk
        top = r0 + R * ((T - 1 - r0) // R)
        for kk in range(RPT):
            i = top - R * kk
            acc0[kk] = ZERO
            acc1[kk] = ZERO
            if i >= 0 and r0 < T:
                if kind0 == 0:
                    acc0[kk] = dX[p, t0 + i, a0 + cc0]
                elif kind0 == 1:
                    acc0[kk] = gam
                if kind1 == 0:
                    acc1[kk] = dX[p, t0 + i, a0 + cc1]
                elif kind1 == 1:
                    acc1[kk] = gam
        cs0 = ZERO
        cs1 = ZERO
        for step in range(T):
            t = T - 1 - step
            buf = step % 2
            if act and r0 == t % R:
                x0 = acc0[0] * minv[t]
                x1 = acc1[0] * minv[t]
                for kk in range(RPT - 1):
                    acc0[kk] = acc0[kk + 1]
                    acc1[kk] = acc1[kk + 1]
                acc0[RPT - 1] = ZERO
                acc1[RPT - 1] = ZERO
                top -= R
                cs0 += us[t] * x0
                cs1 += us[t] * x1
                if kind0 == 0:
                    G0[p, t0 + t, a0 + cc0] = x0
                elif kind0 == 1 and a0 == 0:
                    hp[p, t0 + t] = x0
                if kind1 == 0:
                    G0[p, t0 + t, a0 + cc1] = x1
                elif kind1 == 1 and a0 == 0:
                    hp[p, t0 + t] = x1
                if kind0 != 2:
                    wb[buf, cc0] = gam * x0
                if kind1 != 2:
                    wb[buf, cc1] = gam * x1
            cuda.syncthreads()
            if act:
                w0 = ZERO
                w1 = ZERO
                if kind0 != 2:
                    w0 = wb[buf, cc0]
                if kind1 != 2:
                    w1 = wb[buf, cc1]
                for kk in range(RPT):
                    i = top - R * kk
                    if i >= 0:
                        dti = S[t, i]
                        acc0[kk] += dti * w0
                        acc1[kk] += dti * w1
        if kind0 != 2:
            cuda.atomic.add(csum, cc0, cs0)
        if kind1 != 2:
            cuda.atomic.add(csum, cc1, cs1)
        cuda.syncthreads()
        for e in range(tid, NCOL, NT):
            if e < dvc:
                if a0 + e < dv:
                    rr[p, I, a0 + e] = csum[e]
            elif a0 == 0:
                gd[p, I] = csum[e]

    return kernel


def backward_solve(q, k, gamma, b, scale, c, pooled, dX, Dst, u, G0, hp, rr, gd, *, stream=None, nt=None):
    """``[G0 | h'] = M0^{-T} [dX | gamma 1]`` block by block; also ``D`` into ``Dst`` (B, m, b, b),
    ``u`` (B, n), the reduced right side ``rr = E^T diag(u) G0`` and diagonal ``gd = E^T diag(u) h'``."""
    B, n, d = q.shape
    dv = dX.shape[2]
    m = _cdiv(n, b)
    NT = threads(nt)
    dvc = min(DVC, dv)
    kern = _backward_solve_kernel(b, d, dvc, NT, np.dtype(q.dtype))
    grid = (B * m, _cdiv(dv, dvc))
    _launch(kern, grid, NT, stream, (q, k, gamma, q.dtype.type(scale), c, pooled, dX, Dst, u, G0, hp, rr, gd))


@functools.cache
def _backward_grads_kernel(b, d, dv, NT, dtype):
    BP = _cdiv(b, 4) * 4
    KCc = min(KC, max(d, dv))
    BP1, KC1 = BP + 1, KCc + 1
    nbt = _numba_type(dtype)
    ZERO = np.dtype(dtype).type(0)
    prod_dS = _tri_prod(BP, dv, NT, dtype, True)
    apply_dv = _tri_apply(BP, dv, NT, dtype, True, True)
    apply_dq = _tri_apply(BP, d, NT, dtype, False, False)
    apply_dk = _tri_apply(BP, d, NT, dtype, True, False)

    @cuda.jit
    def kernel(q, k, v, X, gamma, scale, Dst, u, G, hp, WtZ, dq, dk, dvv, Gu, asum, Rsum, gdx):
        B = q.shape[0]
        n = q.shape[1]
        m = (n + b - 1) // b
        blk = cuda.blockIdx.x
        p = blk // m
        I = blk - p * m
        t0 = I * b
        T = min(n - t0, b)
        tid = cuda.threadIdx.x
        S = cuda.shared.array((BP, BP1), nbt)
        qs = cuda.shared.array((BP, KC1), nbt)
        ks = cuda.shared.array((BP, KC1), nbt)
        delta = cuda.shared.array(BP, nbt)
        red = cuda.shared.array(2, nbt)
        if p >= B:
            return
        gam = gamma[p]
        if tid < 2:
            red[tid] = ZERO
        # G = G0 + h' * (W^T Z)_I, in place
        for e in range(tid, T * dv, NT):
            i = e // dv
            a = e - i * dv
            G[p, t0 + i, a] += hp[p, t0 + i] * WtZ[p, I, a]
        for e in range(tid, T * T, NT):
            i = e // T
            j = e - i * T
            if j <= i:
                S[i, j] = Dst[p, I, i, j]
        cuda.syncthreads()
        # delta_t = G_t . X_t (a thread per row), then the column sums of the pooled part
        for i in range(tid, T, NT):
            dl = ZERO
            for a in range(dv):
                dl += G[p, t0 + i, a] * X[p, t0 + i, a]
            delta[i] = dl
        cuda.syncthreads()
        for a in range(tid, dv, NT):
            gu = ZERO
            rs = ZERO
            for i in range(T):
                gi = G[p, t0 + i, a]
                gu += u[p, t0 + i] * gi
                rs += v[p, t0 + i, a] + gam * X[p, t0 + i, a]
            Gu[p, I, a] = gu
            Rsum[p, I, a] = rs
        if tid == 0:
            s = ZERO
            for i in range(T):
                s += u[p, t0 + i] * delta[i]
            asum[p, I] = s
        # dV = D^T G (within block); gdx = sum_s X_s . (D^T G)_s = <G, D X>
        part = apply_dv(S, G, p, t0, T, dvv, X)
        cuda.atomic.add(red, 0, part)
        cuda.syncthreads()
        if tid == 0:
            gdx[p, I] = red[0]
        # dS = scale D * (G R^T - delta), R = V + gamma X, in place of D
        prod_dS(G, v, X, gam, p, t0, T, S, qs, ks, scale, delta)
        apply_dq(S, k, p, t0, T, dq, X)
        apply_dk(S, q, p, t0, T, dk, X)

    return kernel


def backward_grads(q, k, v, X, gamma, b, scale, Dst, u, G, hp, WtZ, dq, dk, dvv, Gu, asum, Rsum, gdx,
                   *, stream=None, nt=None):
    """``G = G0 + h' * E W^T Z`` (in place), then within each block ``dS = D * (G R^T - delta)``,
    ``dq = scale dS k``, ``dk = scale dS^T q``, ``dv = D^T G`` and the block sums of the pooled part:
    ``Gu = E^T diag(u) G``, ``asum = E^T (u * delta)``, ``Rsum = E^T R``, ``gdx_I = <G, D X>_I``."""
    B, n, d = q.shape
    dv = v.shape[2]
    m = _cdiv(n, b)
    NT = threads(nt)
    kern = _backward_grads_kernel(b, d, dv, NT, np.dtype(q.dtype))
    _launch(kern, B * m, NT, stream, (q, k, v, X, gamma, q.dtype.type(scale), Dst, u, G, hp, WtZ, dq, dk, dvv,
                                      Gu, asum, Rsum, gdx))


# --------------------------------------------------------------------------------------------------
# the reduced system (I - diag(g) L) Z = R, L strictly lower triangular (m x m)


@functools.cache
def _diag_inverse_kernel(NB, NT, dtype):
    NCG, R, RPT = _col_layout(NB, NB, NT)
    NB1 = NB + 1
    nbt = _numba_type(dtype)
    ZERO = np.dtype(dtype).type(0)
    ONE = np.dtype(dtype).type(1)

    @cuda.jit
    def kernel(L, g, out):
        B = L.shape[0]
        m = L.shape[1]
        mb = (m + NB - 1) // NB
        blk = cuda.blockIdx.x
        p = blk // mb
        J = blk - p * mb
        j0 = J * NB
        T = min(m - j0, NB)
        tid = cuda.threadIdx.x
        Ls = cuda.shared.array((NB, NB1), nbt)
        wb = cuda.shared.array((2, NB1), nbt)
        if p >= B:
            return
        # Ls = diag(g) L on the diagonal block
        for e in range(tid, NB * NB, NT):
            i = e // NB
            j = e - i * NB
            val = ZERO
            if i < T and j < i:
                val = g[p, j0 + i] * L[p, j0 + i, j0 + j]
            Ls[i, j] = val
        cuda.syncthreads()
        cg = tid % NCG
        r0 = tid // NCG
        act = tid < NCG * R
        c0 = 2 * cg
        c1 = c0 + 1
        acc0 = cuda.local.array(RPT, nbt)
        acc1 = cuda.local.array(RPT, nbt)
        for kk in range(RPT):
            i = r0 + R * kk
            acc0[kk] = ONE if i == c0 else ZERO
            acc1[kk] = ONE if i == c1 else ZERO
        base = r0
        for t in range(NB):
            buf = t % 2
            if act and r0 == t % R:
                x0 = acc0[0]
                x1 = acc1[0]
                for kk in range(RPT - 1):
                    acc0[kk] = acc0[kk + 1]
                    acc1[kk] = acc1[kk + 1]
                acc0[RPT - 1] = ZERO
                acc1[RPT - 1] = ZERO
                base += R
                out[p, J, t, c0] = x0
                wb[buf, c0] = x0
                if c1 < NB:
                    out[p, J, t, c1] = x1
                    wb[buf, c1] = x1
            cuda.syncthreads()
            if act:
                w0 = wb[buf, c0]
                w1 = ZERO
                if c1 < NB:
                    w1 = wb[buf, c1]
                for kk in range(RPT):
                    i = base + R * kk
                    if i < NB:
                        lit = Ls[i, t]
                        acc0[kk] += lit * w0
                        acc1[kk] += lit * w1

    return kernel


def diag_block_inverse(L, g, out, *, stream=None, nt=None, nb=RED_NB):
    """``out[p, J] = (I - diag(g) L)_{JJ}^{-1}`` for the diagonal blocks of size ``nb`` (B, mb, nb, nb);
    rows past ``m`` in the last block are the identity's."""
    B, m, _ = L.shape
    NT = threads(nt)
    mb = _cdiv(m, nb)
    _launch(_diag_inverse_kernel(nb, NT, np.dtype(L.dtype)), B * mb, NT, stream, (L, g, out))


@functools.cache
def _reduced_solve_kernel(NB, CW, KT, NT, dtype):
    nbt = _numba_type(dtype)
    ZERO = np.dtype(dtype).type(0)
    RPASS = _cdiv(NB * CW, NT)  # output slots (row, column) per thread
    KT1, CW1 = KT + 1, CW + 1

    @cuda.jit
    def kernel(L, g, R, Dinv, Z):
        B = L.shape[0]
        m = L.shape[1]
        k = R.shape[2]
        mb = (m + NB - 1) // NB
        p = cuda.blockIdx.x
        a0 = cuda.blockIdx.y * CW
        tid = cuda.threadIdx.x
        Lt = cuda.shared.array((NB, KT1), nbt)
        Zt = cuda.shared.array((KT, CW1), nbt)
        rh = cuda.shared.array((NB, CW1), nbt)
        if p >= B:
            return
        acc = cuda.local.array(RPASS, nbt)
        for J in range(mb):
            j0 = J * NB
            T = min(m - j0, NB)
            for s in range(RPASS):
                acc[s] = ZERO
            # acc = L[J rows, :j0] Z[:j0]
            for k0 in range(0, j0, KT):
                cuda.syncthreads()
                for e in range(tid, NB * KT, NT):
                    i = e // KT
                    kc = e - i * KT
                    val = ZERO
                    if i < T and k0 + kc < j0:
                        val = L[p, j0 + i, k0 + kc]
                    Lt[i, kc] = val
                for e in range(tid, KT * CW, NT):
                    kr = e // CW
                    a = e - kr * CW
                    val = ZERO
                    if a0 + a < k and k0 + kr < j0:
                        val = Z[p, k0 + kr, a0 + a]
                    Zt[kr, a] = val
                cuda.syncthreads()
                for s in range(RPASS):
                    slot = tid + s * NT
                    i = slot // CW
                    a = slot - i * CW
                    if i < NB:
                        sacc = ZERO
                        for kc in range(KT):
                            sacc += Lt[i, kc] * Zt[kc, a]
                        acc[s] += sacc
            # rh = R_J + diag(g_J) acc
            for s in range(RPASS):
                slot = tid + s * NT
                i = slot // CW
                a = slot - i * CW
                if i < NB:
                    val = ZERO
                    if i < T and a0 + a < k:
                        val = R[p, j0 + i, a0 + a] + g[p, j0 + i] * acc[s]
                    rh[i, a] = val
            cuda.syncthreads()
            # Z_J = Dinv_J rh
            for s in range(RPASS):
                slot = tid + s * NT
                i = slot // CW
                a = slot - i * CW
                if i < T and a0 + a < k:
                    val = ZERO
                    for l in range(i + 1):
                        val += Dinv[p, J, i, l] * rh[l, a]
                    Z[p, j0 + i, a0 + a] = val
            cuda.syncthreads()

    return kernel


def reduced_solve(L, g, R, Dinv, Z, *, stream=None, nt=None, nb=RED_NB):
    """``Z = (I - diag(g) L)^{-1} R`` by blocked forward substitution: ``m / nb`` steps inside one
    kernel, each a block product with the solved rows and a product with the diagonal block's inverse
    (``Dinv`` from :func:`diag_block_inverse`).  One thread block per (batch entry, ``RED_CW`` columns)."""
    B, m, k = R.shape
    NT = threads(nt)
    cw = min(RED_CW, k)
    kern = _reduced_solve_kernel(nb, cw, RED_KT, NT, np.dtype(L.dtype))
    _launch(kern, (B, _cdiv(k, cw)), NT, stream, (L, g, R, Dinv, Z))
