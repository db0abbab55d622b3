"""The float32 blockwise chain attention in six kernel launches forward, ten backward (``docs/gpu.md``).

The maths is that of :mod:`resolvent._gpu._blockwise` (SPEC 2.2, the Woodbury form); this module
only reorganises where it runs, so that a forward pass is six launches and no library calls:

1. :func:`_means_kernel`, one thread block per (batch entry, block): the block means ``qbar``
   (scaled) and ``kbar`` (stored transposed, ``kbarT[p, :, J]``, so that the pooled tiles read it
   coalesced), the block sums of ``v``, ``c = -inf``, and a finiteness check of ``q``, ``k``, ``v``
   (a block sum is finite exactly when its entries are, short of overflow), reported through
   ``sync[0:3]``.
2. :func:`_scores_kernel`: the pooled scores ``sigma_IJ = qbar_I . kbar_J`` in ``PT x PT`` tiles
   (register-tiled, one thread block per tile on or below the diagonal), raw into ``W`` below the
   diagonal (zeros elsewhere), each row's largest into ``c`` (atomic maximum).
3. :func:`_softmax_kernel`: the same tiles: ``W_IJ = exp(sigma_IJ - c_I)`` in place, and each tile's
   row sums and share of ``P_I = sum_J W_IJ vsum_J`` (summed by their readers: no atomics).
4. :func:`_rows_kernel`, one thread block per (batch entry, block ``I``): the pooled shift, mass and
   ``P_I`` from step 3; the causal scores of the block (register-tiled,
   :func:`._kernels._tri_prod`), the row normalisers and ``D``; then the block's forward
   substitution with ``I - gamma D`` on ``[U | gamma u]`` by panels of ``PANEL`` rows: inside a
   panel one thread per column substitutes (a column needs no other column), then every thread adds
   the panel's rows to the rows below.  Two barriers per panel, where the old kernel had one per row.
5. :func:`_reduced_kernel`: the reduced unit lower-triangular system ``(I - diag(g) W) Z = R``,
   blocked in ``NB`` rows, and ``W Z``.  Thread block ``(p, chunk, J)`` first inverts its diagonal
   block, then multiplies its rows of ``W`` with each finished earlier block ``Z_J'`` as soon as that
   block's flag is up, applies the inverse and raises its own flag.  Thread blocks take their
   ``(p, chunk, J)`` from an atomic ticket, so every block a thread block waits for was started
   before it: no deadlock whatever the scheduling, and the serial chain is ``m / NB`` short steps.
   Systems of at most ``SMALL_M`` rows run :func:`_reduced_small_kernel` instead: one thread block
   per column chunk substitutes the whole system by panels (no inverse, no waiting).
6. :func:`_combine_kernel`: ``X <- (1 - gamma) (X + h (W Z)_I)`` in place.

The backward (:func:`backward`, :func:`_backward_layout`) runs steps 1-3, the within-block solve
:func:`_bsolve_kernel`, step 5 on the transposed system (flipped into the lower solver's order by
:func:`_flip_kernel` and back by :func:`_unflip_kernel`), :func:`_grads_kernel`, and the pooled
part's gradients in two launches (:func:`_pgrad_kernel`, :func:`_pgrad_apply_kernel`).  Shared
memory is sized for float32; float64 stays on the kernels of :mod:`resolvent._gpu._kernels`.

Both directions have a launch plan (:class:`_Plan`): on a device, a call patches the pointers into
parameter words built once per shape and launches, with one workspace for every buffer.
"""

from __future__ import annotations

import functools
import math
import threading

import numpy as np
from numba import cuda, uint64

from . import _kernels as K

__all__ = ["forward", "forward_checked", "supported", "SYNC_HEAD"]

NT = 256  #: threads per thread block
NT_SMALL = 128  #: threads per thread block of the per-block kernels when b <= 32
DVC = 64  #: value columns per pass of the within-block solve
KCF = 16  #: columns of q/k per shared chunk of the score tile (small: room for the solve's tile)
NB = 64  #: diagonal block of the reduced system
PT = 64  #: rows and columns of a pooled-score tile ((PT / 4)^2 threads, a 4 x 4 register tile each)
PT_SIM = 8  #: the same under the simulator (small problems still span several tiles)
KCP = 32  #: columns of qbar / kbar per shared chunk of a pooled-score tile
PANEL = 16  #: rows per panel of the blocked substitutions (even; divides NB and the block tiles)
CW = 16  #: right-hand-side columns per thread block of the reduced system (fewer: shorter chain steps)
CW_SHORT = 32  #: the same when the chain has at most two steps (64 would pass the 48 KB of static shared memory)
SYNC_HEAD = 4  #: sync[0:3] non-finite q, k, v; sync[3] the reduced solve's ticket counter
SMALL_M = 128  #: reduced systems of at most this many rows run in one thread block per column chunk
CW_SMALL = 16  #: right-hand-side columns per thread block of those


def supported(dtype, b) -> bool:
    """Whether this pipeline runs ``dtype`` with block size ``b``."""
    return np.dtype(dtype) == np.float32 and b <= K.MAX_BLOCK


def _threads(nt):
    """256 threads on a GPU; 64 under the simulator (each thread is a Python thread there)."""
    if nt is not None:
        return nt
    return 64 if K._simulated() else NT


def _block_threads(b, nt):
    """Threads of the per-block kernels (rows, combine): ``NT_SMALL`` for ``b <= 32``, where most
    phases have at most ``b`` rows or ``dv + 1`` columns to give out, so that twice as many thread
    blocks share an SM; ``NT`` otherwise."""
    if nt is not None or K._simulated():
        return _threads(nt)
    return NT_SMALL if b <= 32 else NT


def _reduced_width(mb, nt):
    """Right-hand-side columns per thread block of the reduced system with ``mb`` diagonal blocks:
    ``CW``, or ``CW_SHORT`` when there is no chain to shorten (at most two steps), so that fewer
    thread blocks invert the same diagonal block."""
    if mb <= 2 and nt is None and not K._simulated():
        return CW_SHORT
    return _widths(_threads(nt))[1]


def _widths(nt):
    """``(dvc, cw)``: value columns per solve pass (thread ``dvc`` takes the h column) and
    right-hand-side columns per thread block of the reduced system, for ``nt`` threads."""
    return min(DVC, nt // 2), min(CW, nt)


# --------------------------------------------------------------------------------------------------
# device helpers


@functools.cache
def _colsum(dtype, b=0):
    """Device function: ``sum_{t < T} src[p, t0 + t, col]``.  A whole block (``T == b``) is read
    unrolled on unsigned indices, in rounds of 32 (16 when ``b > 32``) loads in flight before their
    sums (the means kernel ran at half the copy rate with eight); otherwise eight loads in flight."""
    ZERO = np.dtype(dtype).type(0)

    @cuda.jit(device=True)
    def colsum_rolled(src, p, t0, T, col):
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

    if b < 8:
        return colsum_rolled
    ROUND = 32 if b <= 32 else 16  # no spills at 64 registers in the means kernel (ptxas, sm_90)
    L = ["def colsum(src, p, t0, T, col):", "    if T != UB:", "        return rolled(src, p, t0, T, col)",
         "    pu = uint64(p)", "    tu = uint64(t0)", "    cu = uint64(col)"] + [f"    a{j} = ZERO" for j in range(4)]
    for r0 in range(0, b, ROUND):
        its = range(r0, min(b, r0 + ROUND))
        L += [f"    x{t} = src[pu, tu + U{t}, cu]" for t in its]
        L += [f"    a{t % 4} += x{t}" for t in its]
    L += ["    return (a0 + a1) + (a2 + a3)"]
    return K.generated("colsum", L, {"ZERO": ZERO, "UB": np.int64(b), "rolled": colsum_rolled}, nconst=b)


@functools.cache
def _colsum_flat(dtype):
    """Device function: ``sum_{t < T} src[base + t stride]`` (a column of a flat array), eight
    loads in flight."""
    ZERO = np.dtype(dtype).type(0)

    @cuda.jit(device=True)
    def colsum(src, base, T, stride):
        a0 = ZERO
        a1 = ZERO
        a2 = ZERO
        a3 = ZERO
        t = 0
        e = base
        s8 = 8 * stride
        while t + 8 <= T:
            x0 = src[e]
            x1 = src[e + stride]
            x2 = src[e + 2 * stride]
            x3 = src[e + 3 * stride]
            x4 = src[e + 4 * stride]
            x5 = src[e + 5 * stride]
            x6 = src[e + 6 * stride]
            x7 = src[e + 7 * stride]
            a0 += x0 + x4
            a1 += x1 + x5
            a2 += x2 + x6
            a3 += x3 + x7
            t += 8
            e += s8
        while t < T:
            a0 += src[e]
            t += 1
            e += stride
        return (a0 + a1) + (a2 + a3)

    return colsum


@functools.cache
def _tile_load(NR, NC, NT, dtype):
    """Device function: ``dst[i, j] = src[p, r0 + i, c0 + j]`` for ``i < NR, j < NC`` (zero where
    ``i >= T`` or ``c0 + j >= C``); each thread issues all its loads before its shared stores."""
    IT = K._cdiv(NR * NC, NT)
    nbt = K._numba_type(dtype)
    ZERO = np.dtype(dtype).type(0)
    if NT % NC == 0:
        return _tile_load_unrolled(NR, NC, NT, dtype)

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
def _tile_load_unrolled(NR, NC, NT, dtype):
    """:func:`_tile_load` when ``NC`` divides ``NT``: a thread keeps one column and every
    ``NT / NC``-th row, unrolled on unsigned indices (its loads in registers, not local memory)."""
    RS = NT // NC
    IT = K._cdiv(NR, RS)
    env = {"ZERO": np.dtype(dtype).type(0),
           "UNC": np.uint64(NC), "UNR": np.uint64(NR)}
    env.update({f"U{it}": np.uint64(it * RS) for it in range(IT)})
    L = ["def tile_load(src, p, r0, T, c0, C, dst):", "    tid = uint64(cuda.threadIdx.x)",
         "    i = tid // UNC", "    j = tid - i * UNC", "    pu = uint64(p)", "    ru = uint64(r0) + i",
         "    cj = uint64(c0) + j", "    Tu = uint64(T)", "    ok = cj < uint64(C)"]
    for it in range(IT):
        L += [f"    b{it} = ZERO", f"    if ok and i + U{it} < Tu:", f"        b{it} = src[pu, ru + U{it}, cj]"]
    for it in range(IT):
        L += [f"    if i + U{it} < UNR:", f"        dst[i + U{it}, j] = b{it}"]
    return K.generated("tile_load", L, env)


@functools.cache
def _tile_load_flat(NR, NC, NT, dtype, RL):
    """Device function: ``dst[i, j] = src[(row0 + i) RL + c0 + j]`` for ``i < NR, j < NC`` (zero
    where ``i >= T`` or ``c0 + j >= RL``): :func:`_tile_load` on a flat array of rows of ``RL``
    entries, ``row0`` the tile's first row among them.  Where ``NC`` divides ``NT`` a thread keeps
    one column and its loads are a base plus constants."""
    ZERO = np.dtype(dtype).type(0)
    if NT % NC:
        IT = K._cdiv(NR * NC, NT)
        nbt = K._numba_type(dtype)

        @cuda.jit(device=True)
        def tile_load_rolled(src, row0, T, c0, dst):
            tid = cuda.threadIdx.x
            buf = cuda.local.array(IT, nbt)
            for it in range(IT):
                e = tid + it * NT
                i = e // NC
                j = e - i * NC
                val = ZERO
                if i < T and c0 + j < RL:
                    val = src[(row0 + i) * RL + c0 + j]
                buf[it] = val
            for it in range(IT):
                e = tid + it * NT
                i = e // NC
                if i < NR:
                    dst[i, e - i * NC] = buf[it]

        return tile_load_rolled
    RS = NT // NC
    IT = K._cdiv(NR, RS)
    env = {"ZERO": ZERO, "UNC": np.uint64(NC), "UNR": np.uint64(NR), "URL": np.uint64(RL)}
    env.update({f"R{it}": np.uint64(it * RS) for it in range(IT)})
    env.update({f"O{it}": np.uint64(it * RS * RL) for it in range(IT)})
    L = ["def tile_load(src, row0, T, c0, dst):", "    tid = uint64(cuda.threadIdx.x)",
         "    i = tid // UNC", "    j = tid - i * UNC", "    cj = uint64(c0) + j", "    Tu = uint64(T)",
         "    ok = cj < URL", "    off = (uint64(row0) + i) * URL + cj"]
    for it in range(IT):
        L += [f"    b{it} = ZERO", f"    if ok and i + R{it} < Tu:", f"        b{it} = src[off + O{it}]"]
    for it in range(IT):
        L += [f"    if i + R{it} < UNR:", f"        dst[i + R{it}, j] = b{it}"]
    return K.generated("tile_load", L, env)


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
def _tile_step(NT, NC):
    """Device function: ``(i, j) -> (i, j)`` advanced by ``NT`` elements in row-major order over
    ``NC`` columns, by addition (unsigned): a loop ``for e in range(tid, R * NC, NT)`` that needs
    ``e // NC`` spent some 25 integer instructions a step on 64-bit signed division."""
    DI = np.uint64(NT // NC)
    DJ = np.uint64(NT % NC)
    UNC = np.uint64(NC)
    ONE = np.uint64(1)

    @cuda.jit(device=True)
    def step(i, j):
        j += DJ
        i += DI
        if j >= UNC:
            j -= UNC
            i += ONE
        return i, j

    return step


@functools.cache
def _panel_subst(SB, dtype, transposed=False, dv=0):
    """Device function: one thread's column of a panel's forward substitution, unrolled.

    Rows ``k0 .. k0 + SB - 1`` of ``(I - gamma D) x = rhs`` with ``rhs`` in ``ws[:, col]`` (the rows
    above the panel already added): ``x_r = (ws[r] + sum_{j < r} S[r, j] w_j) / (1 - gamma D_rr)``
    and ``w_r = v_r + gamma x_r`` (``v_r = 0`` for the h column).  The ``w`` stay in registers and
    every shared read is the panel's base plus a constant (unsigned indices: no negative-index
    fix-up), so the chain from one row to the next is three instructions.  The shared tiles have
    whole panels of rows; rows at or past ``T`` are computed on whatever they hold and never stored.
    Writes ``X`` (or ``h``) and ``ws[:, col] = w`` for the rows below; returns the column's sum of
    ``x`` over the panel.  ``v``, ``X``, ``h`` (``G``, ``hp``) are flat (rows of ``dv`` entries;
    ``h`` one a row), ``row0`` the block's first row among them and ``last`` the last index of
    ``v``: every global index is a base plus a constant (three-dimensional indices cost some
    thirty integer instructions each).

    ``transposed``: the backward's solve, on the block's rows reversed (``S`` holding ``D`` reflected
    about its anti-diagonal, so that ``(I - gamma D)^T`` is lower triangular again): ``w_r = gamma
    x_r``; ``x_r`` goes to row ``row0 + T - 1 - (k0 + r)`` of the flat ``G`` (or ``hp``), and the
    sum returned is ``sum u_r x_r``.
    """
    ZERO = np.dtype(dtype).type(0)
    if transposed:
        L = ["def subst(S, ws, minv, us, k0, T, col, gam, isv, ish, G, hp, row0, a0):",
             "    ku = uint64(k0)", "    cu = uint64(col)", "    tb = uint64(row0 + T - 1 - k0)",
             "    gb = tb * UDV + uint64(a0 + col)"]
        weight, vr = "us[ku + U{r}] * ", ""
    else:
        L = ["def subst(S, ws, minv, k0, T, col, gam, isv, ish, v, X, h, row0, a0, last):",
             "    ku = uint64(k0)", "    cu = uint64(col)", "    hr = uint64(row0) + ku",
             "    vb = hr * UDV + uint64(a0 + col)", "    if isv:"]
        L += [f"        v{r} = v[min(vb + V{r}, uint64(last))]" for r in range(SB)]
        L += ["    else:"] + [f"        v{r} = ZERO" for r in range(SB)]
        weight, vr = "", "v{r} + "
    for r in range(SB):
        terms = "".join(f" + S[ku + U{r}, ku + U{j}] * w{j}" for j in range(r))
        L += [f"    x{r} = (ws[ku + U{r}, cu]{terms}) * minv[ku + U{r}]", f"    w{r} = {vr.format(r=r)}gam * x{r}"]

    def stores(ind, rows, guard):
        """The panel's shared stores and sum, then its outputs under one test of the column kind."""
        def rowwise(ind2, lines_of):
            out_lines = []
            for r in rows:
                if guard:
                    out_lines += [f"{ind2}if k0 + {r} < T:"] + [f"{ind2}    {ln}" for ln in lines_of(r)]
                else:
                    out_lines += [f"{ind2}{ln}" for ln in lines_of(r)]
            return out_lines

        lines = rowwise(ind, lambda r: [f"ws[ku + U{r}, cu] = w{r}", f"cs += {weight.format(r=r)}x{r}"])
        if transposed:  # flat G and hp, the rows reversed
            lines += [f"{ind}if isv:"] + rowwise(ind + "    ", lambda r: [f"G[gb - V{r}] = x{r}"])
            lines += [f"{ind}elif ish:"] + rowwise(ind + "    ", lambda r: [f"hp[tb - U{r}] = x{r}"])
        else:  # flat X and h
            lines += [f"{ind}if isv:"] + rowwise(ind + "    ", lambda r: [f"X[vb + V{r}] = x{r}"])
            lines += [f"{ind}elif ish:"] + rowwise(ind + "    ", lambda r: [f"h[hr + U{r}] = x{r}"])
        return lines

    L += ["    cs = ZERO", f"    if k0 + {SB} <= T:  # a whole panel: no row tests"]
    L += stores("        ", range(SB), False)
    L += ["    else:"]
    L += stores("        ", range(SB), True)
    L += ["    return cs"]
    env = {"ZERO": ZERO, "UDV": np.uint64(dv)}
    env.update({f"V{r}": np.uint64(r * dv) for r in range(SB)})
    return K.generated("subst", L, env, nconst=SB)


@functools.cache
def _rhs_load(BPS, DV1, dv, NT, dtype):
    """Device function: the right-hand sides of a pass of the within-block solve into shared ``ws``:
    ``ws[t, j] = u_t P[a0 + j] + D_tt v[t, a0 + j]`` for the pass's value columns ``j < DV1`` and
    ``ws[t, DV1] = gamma u_t`` in the first pass (the h column), zeros past ``T`` rows, ``dv``
    columns and elsewhere.  ``v`` is flat, ``row0`` the block's first row.  A thread keeps one
    column and every ``NT / DV1``-th row, its loads in flight before any store (the old kernel
    stored the tile, then transformed it in a second loop: 14% of its instructions)."""
    ZERO = np.dtype(dtype).type(0)
    if NT % DV1:
        @cuda.jit(device=True)
        def rhs_rolled(v, row0, T, a0, ws, us, Ps, S, gam):
            for e in range(cuda.threadIdx.x, BPS * (DV1 + 1), NT):
                t = e // (DV1 + 1)
                j = e - t * (DV1 + 1)
                val = ZERO
                if t < T:
                    if j < DV1 and a0 + j < dv:
                        val = us[t] * Ps[a0 + j] + S[t, t] * v[(row0 + t) * dv + a0 + j]
                    elif j == DV1 and a0 == 0:
                        val = gam * us[t]
                ws[t, j] = val

        return rhs_rolled
    RS = NT // DV1
    IT = K._cdiv(BPS, RS)
    env = {"ZERO": ZERO, "UDV1": np.uint64(DV1), "UDV": np.uint64(dv), "UBPS": np.uint64(BPS),
           "UNT": np.uint64(NT)}
    env.update({f"R{it}": np.uint64(it * RS) for it in range(IT)})
    env.update({f"O{it}": np.uint64(it * RS * dv) for it in range(IT)})
    L = ["def rhs(v, row0, T, a0, ws, us, Ps, S, gam):", "    tid = uint64(cuda.threadIdx.x)",
         "    i = tid // UDV1", "    j = tid - i * UDV1", "    cj = uint64(a0) + j", "    Tu = uint64(T)",
         "    ok = cj < UDV", "    off = (uint64(row0) + i) * UDV + cj", "    pj = ZERO", "    if ok:",
         "        pj = Ps[cj]"]
    for it in range(IT):
        L += [f"    x{it} = ZERO", f"    if ok and i + R{it} < Tu:", f"        x{it} = v[off + O{it}]"]
    for it in range(IT):
        L += [f"    r = i + R{it}", "    if r < UBPS:", "        val = ZERO", "        if r < Tu:",
              f"            val = us[r] * pj + S[r, r] * x{it}", "        ws[r, j] = val"]
    L += ["    r = tid", "    while r < UBPS:", "        hv = ZERO", "        if r < Tu and a0 == 0:",
          "            hv = gam * us[r]", "        ws[r, UDV1] = hv", "        r += UNT"]
    return K.generated("rhs", L, env)


@functools.cache
def _dy_load(BPS, DV1, dv, NT, dtype):
    """Device function: the backward solve's right-hand sides of a pass into shared ``ws``, in one
    pass over ``dy`` (flat, ``row0`` the block's first row): ``ws[T - 1 - t, j] = om dy[t, a0 + j]``
    (``dX``, rows reversed) for ``j < DV1``, the h column ``ws[t, DV1] = gamma`` in the first pass,
    zeros past ``T`` rows and ``dv`` columns.  Returns whether this thread read a non-finite
    entry.  (The old kernel loaded the tile, then scaled and checked it, then reversed it: three
    passes.)"""
    ZERO = np.dtype(dtype).type(0)
    FMAX = np.dtype(dtype).type(np.finfo(dtype).max)
    if NT % DV1:
        @cuda.jit(device=True)
        def dy_load_rolled(dy, row0, T, a0, ws, om, gam):
            bad = False
            for e in range(cuda.threadIdx.x, BPS * (DV1 + 1), NT):
                t = e // (DV1 + 1)
                j = e - t * (DV1 + 1)
                if j < DV1:
                    val = ZERO
                    if t < T and a0 + j < dv:
                        x = dy[(row0 + t) * dv + a0 + j]
                        bad = bad or not abs(x) <= FMAX
                        val = om * x
                    if t < T:
                        ws[T - 1 - t, j] = val
                    else:
                        ws[t, j] = ZERO
                else:
                    ws[t, j] = gam if (t < T and a0 == 0) else ZERO
            return bad

        return dy_load_rolled
    RS = NT // DV1
    IT = K._cdiv(BPS, RS)
    env = {"ZERO": ZERO, "FMAX": FMAX, "UDV1": np.uint64(DV1), "UDV": np.uint64(dv), "UBPS": np.uint64(BPS),
           "UNT": np.uint64(NT), "UONE": np.uint64(1)}
    env.update({f"R{it}": np.uint64(it * RS) for it in range(IT)})
    env.update({f"O{it}": np.uint64(it * RS * dv) for it in range(IT)})
    L = ["def dy_load(dy, row0, T, a0, ws, om, gam):", "    tid = uint64(cuda.threadIdx.x)",
         "    i = tid // UDV1", "    j = tid - i * UDV1", "    cj = uint64(a0) + j", "    Tu = uint64(T)",
         "    Tm1 = Tu - UONE", "    ok = cj < UDV", "    off = (uint64(row0) + i) * UDV + cj", "    bad = False"]
    for it in range(IT):
        L += [f"    x{it} = ZERO", f"    if ok and i + R{it} < Tu:", f"        x{it} = dy[off + O{it}]"]
    for it in range(IT):
        L += [f"    r = i + R{it}", "    if r < Tu:", f"        bad = bad or not abs(x{it}) <= FMAX",
              f"        ws[Tm1 - r, j] = om * x{it}", "    elif r < UBPS:", "        ws[r, j] = ZERO"]
    L += ["    r = tid", "    while r < UBPS:", "        hv = ZERO", "        if r < Tu and a0 == 0:",
          "            hv = gam", "        ws[r, UDV1] = hv", "        r += UNT", "    return bad"]
    return K.generated("dy_load", L, env)


@functools.cache
def _panel_update(SB, dtype, scaled=False):
    """Device function: ``A[i, c] += sum_{j < SB} S[i, k0 + j] A[k0 + j, c]`` (times ``gs[i]`` when
    ``scaled``), unrolled, on unsigned indices (constant offsets from two bases)."""
    L = ["def update(S, A, gs, i, c, k0):", "    iu = uint64(i)", "    cu = uint64(c)", "    ku = uint64(k0)"]
    for a in range(4):
        terms = [f"S[iu, ku + U{j}] * A[ku + U{j}, cu]" for j in range(a, SB, 4)]
        L += [f"    a{a} = " + (" + ".join(terms) if terms else "ZERO")]
    scale = "gs[iu] * " if scaled else ""
    L += [f"    A[iu, cu] += {scale}((a0 + a1) + (a2 + a3))"]
    return K.generated("update", L, {"ZERO": np.dtype(dtype).type(0)}, nconst=SB)


@functools.cache
def _inverse_panel(SB):
    """Device function: column ``c`` of the panel ``k0 .. k0 + SB - 1`` of ``(I - diag(gs) L)^{-1}``
    by forward substitution, unrolled (the column's entries in registers, ``L`` at constant offsets):
    ``d_r = D1[r, c] + gs[r] sum_{j < r} L[r, j] d_j``, the rows above already added into ``D1``."""
    L = ["def inv_panel(T1, D1, gs, k0, c):", "    ku = uint64(k0)", "    cu = uint64(c)", "    d0 = D1[ku, cu]"]
    for r in range(1, SB):
        terms = " + ".join(f"T1[ku + U{r}, ku + U{j}] * d{j}" for j in range(r))
        L += [f"    d{r} = D1[ku + U{r}, cu] + gs[ku + U{r}] * ({terms})", f"    D1[ku + U{r}, cu] = d{r}"]
    return K.generated("inv_panel", L, nconst=SB)


# --------------------------------------------------------------------------------------------------
# kernels


@functools.cache
def _means_kernel(b, NT, dtype):
    ONE = np.dtype(dtype).type(1)
    NEG_INF = np.dtype(dtype).type(-np.inf)
    FMAX = np.dtype(dtype).type(np.finfo(dtype).max)
    colsum = _colsum(dtype, b)
    from numba import int32

    @cuda.jit
    def kernel(q, k, v, scale, qbar, kbarT, vs, cmax, sync):
        n = q.shape[1]
        d = q.shape[2]
        dv = v.shape[2]
        m = (n + b - 1) // b
        blk = cuda.blockIdx.x
        p = blk // m
        J = blk - p * m
        if p >= q.shape[0]:
            return
        if cuda.threadIdx.x == 0:
            cmax[p, J] = NEG_INF  # the empty maximum, for the pooled scores' atomic max
        t0 = J * b
        T = min(n - t0, b)
        inv = ONE / T
        for e in range(cuda.threadIdx.x, 2 * d + dv, NT):
            which = 0 if e < d else (1 if e < 2 * d else 2)
            col = e - which * d
            src = q if which == 0 else (k if which == 1 else v)
            s = colsum(src, p, t0, T, col)  # one call site: the unrolled reads once in the kernel
            if which == 0:
                qbar[p, J, col] = scale * s * inv
            elif which == 1:
                kbarT[p, col, J] = s * inv
            else:
                vs[p, J, col] = s
            if not abs(s) <= FMAX:  # inf or NaN among the entries
                cuda.atomic.max(sync, which, int32(1))

    K.LAUNCH_BOUNDS[id(kernel)] = (NT, max(1, 1024 // NT))  # 72 registers held it to 37% occupancy
    return kernel


@functools.cache
def _rect_inner(TPW, KC, ta=False, tb=False):
    """Device function: ``KC`` steps of a thread's 4 x 4 register tile of ``A Bm`` (rows ``ti + TPW
    r``, columns ``tj + TPW c``; ``A`` shared ``[row, k]`` (``[k, row]`` when ``ta``), ``Bm`` shared
    ``[k, column]`` (``[column, k]`` when ``tb``)), unrolled: 8 shared reads and 16 multiply-adds a
    step, and nothing else."""
    acc = [f"a{r}{c}" for r in range(4) for c in range(4)]
    L = [f"def inner(A, Bm, ti, tj, {', '.join(acc)}):", "    i0 = uint64(ti)", "    j0 = uint64(tj)"]
    L += [f"    i{r} = i{r - 1} + UTPW" for r in range(1, 4)] + [f"    j{r} = j{r - 1} + UTPW" for r in range(1, 4)]
    for c in range(KC):
        L += [f"    x{r} = A[U{c}, i{r}]" if ta else f"    x{r} = A[i{r}, U{c}]" for r in range(4)]
        L += [f"    y{q} = Bm[j{q}, U{c}]" if tb else f"    y{q} = Bm[U{c}, j{q}]" for q in range(4)]
        L += [f"    a{r}{q} += x{r} * y{q}" for r in range(4) for q in range(4)]
    L += [f"    return ({', '.join(acc)})"]
    return K.generated("inner", L, {"UTPW": np.uint64(TPW)}, nconst=KC)


@functools.cache
def _rect_store(TPW, dtype, scores):
    """Device function: a thread's 4 x 4 register tile to global memory, unrolled.

    ``scores``: ``out[p, I, J] = a`` for ``J < I`` and 0 for ``J >= I`` (rows and columns below
    ``C``), and the largest kept entry of each of the thread's rows to ``rmx[row, tj]`` (``-inf``
    where none).  Otherwise ``out[p, jt, I, c0 + col] = a`` for ``I < R``, ``c0 + col < C``."""
    acc = [f"a{r}{c}" for r in range(4) for c in range(4)]
    L = [f"def store(out, rmx, p, jt, I0, R, c0, C, ti, tj, {', '.join(acc)}):"]
    for r in range(4):
        L += [f"    i{r} = ti + {TPW * r}", f"    row{r} = I0 + i{r}"]
    for c in range(4):
        L += [f"    col{c} = c0 + tj + {TPW * c}"]
    for r in range(4):
        if scores:
            L += ["    mr = NEG_INF", f"    if row{r} < R:"]
            for c in range(4):
                L += [f"        if col{c} < C:", f"            if col{c} < row{r}:",
                      f"                out[p, row{r}, col{c}] = a{r}{c}", f"                mr = max(mr, a{r}{c})",
                      "            else:", f"                out[p, row{r}, col{c}] = ZERO"]
            L += [f"    rmx[i{r}, tj] = mr"]
        else:
            L += [f"    if row{r} < R:"]
            for c in range(4):
                L += [f"        if col{c} < C:", f"            out[p, jt, row{r}, col{c}] = a{r}{c}"]
    return K.generated("store", L, {"ZERO": np.dtype(dtype).type(0), "NEG_INF": np.dtype(dtype).type(-np.inf)})


def _pooled_tile():
    """Rows (and columns) of a pooled-score tile: ``PT`` on a GPU, ``PT_SIM`` under the simulator."""
    return PT_SIM if K._simulated() else PT


@functools.cache
def _tile_index(PTl):
    """Device function: ``(p, row tile, column tile)`` of this thread block in a grid of ``B * nt *
    nt`` over the ``PTl x PTl`` tiles of an ``m x m`` matrix per batch entry."""

    @cuda.jit(device=True)
    def tile_index(m):
        nt = (m + PTl - 1) // PTl
        blk = cuda.blockIdx.x
        p = blk // (nt * nt)
        rest = blk - p * nt * nt
        it = rest // nt
        return p, it, rest - it * nt

    return tile_index


@functools.cache
def _scores_kernel(d, PTl, dtype):
    """The pooled scores ``sigma_IJ = qbar_I . kbar_J`` (``qbar`` scaled, ``kbar`` transposed), one
    ``PTl x PTl`` tile of ``W`` per thread block (``(PTl / 4)^2`` threads, a 4 x 4 register tile
    each; grid ``B * nt * nt``, ``nt = ceil(m / PTl)``): the raw scores below the diagonal, zeros on
    and above it, and each row's largest score into ``c`` by an atomic max (``c`` holds ``-inf`` on
    entry: :func:`_means_kernel`)."""
    TPW = PTl // 4
    NTT = TPW * TPW
    KCc = min(KCP, d)
    KC1 = KCc + 1
    PT1 = PTl + 1
    TPW1 = TPW + 1
    nbt = K._numba_type(dtype)
    ZERO = np.dtype(dtype).type(0)
    NEG_INF = np.dtype(dtype).type(-np.inf)
    inner = _rect_inner(TPW, KCc)
    store = _rect_store(TPW, dtype, True)
    load_q = _tile_load(PTl, KCc, NTT, dtype)
    load_k = _tile_load(KCc, PTl, NTT, dtype)
    tile_index = _tile_index(PTl)

    @cuda.jit
    def kernel(qbar, kbarT, W, c):
        m = W.shape[1]
        p, it, jt = tile_index(m)
        tid = cuda.threadIdx.x
        qs = cuda.shared.array((PTl, KC1), nbt)
        ks = cuda.shared.array((KCc, PT1), nbt)
        rmx = cuda.shared.array((PTl, TPW1), nbt)
        if p >= W.shape[0]:
            return
        I0 = it * PTl
        J0 = jt * PTl
        if jt > it:  # above the diagonal: zeros
            for e in range(tid, PTl * PTl, NTT):
                i = e // PTl
                j = e - i * PTl
                if I0 + i < m and J0 + j < m:
                    W[p, I0 + i, J0 + j] = ZERO
            return
        ti = tid // TPW
        tj = tid - ti * TPW
        a00 = a01 = a02 = a03 = a10 = a11 = a12 = a13 = ZERO
        a20 = a21 = a22 = a23 = a30 = a31 = a32 = a33 = ZERO
        for a0 in range(0, d, KCc):
            load_q(qbar, p, I0, min(m - I0, PTl), a0, d, qs)
            load_k(kbarT, p, a0, min(d - a0, KCc), J0, m, ks)
            cuda.syncthreads()
            (a00, a01, a02, a03, a10, a11, a12, a13, a20, a21, a22, a23, a30, a31, a32,
             a33) = inner(qs, ks, ti, tj, a00, a01, a02, a03, a10, a11, a12, a13, a20, a21, a22, a23, a30,
                          a31, a32, a33)
            cuda.syncthreads()
        store(W, rmx, p, 0, I0, m, J0, m, ti, tj, a00, a01, a02, a03, a10, a11, a12, a13, a20, a21, a22,
              a23, a30, a31, a32, a33)
        cuda.syncthreads()
        for i in range(tid, PTl, NTT):
            mx = NEG_INF
            for j in range(TPW):
                mx = max(mx, rmx[i, j])
            if I0 + i < m and mx > NEG_INF:
                cuda.atomic.max(c, (p, I0 + i), mx)

    return kernel


@functools.cache
def _softmax_kernel(PTl, dtype):
    """The pooled weights from the raw scores, tile by tile as :func:`_scores_kernel` (the tiles on
    and below the diagonal): ``W_IJ = exp(sigma_IJ - c_I)`` in place (flushed below ``eps^2``: it
    cannot change a row sum, as on the CPU), the tile's row sums into ``psum[p, jt, I]`` and its
    share of ``P_I = sum_J W_IJ vsum_J`` into ``Pp[p, jt, I, :]`` (summed by the reader,
    :func:`_pooled_stats`: no atomics, the same result on every run).  Sets ``c[p, 0] = 0`` (block 0
    has no pooled part; its ``-inf`` from the means kernel stood for the empty maximum)."""
    TPW = PTl // 4
    NTT = TPW * TPW
    PT1 = PTl + 1
    nbt = K._numba_type(dtype)
    ZERO = np.dtype(dtype).type(0)
    EPS2 = np.dtype(dtype).type(np.finfo(dtype).eps ** 2)
    inner = _rect_inner(TPW, PTl)
    store = _rect_store(TPW, dtype, False)
    load = _tile_load(PTl, PTl, NTT, dtype)
    tile_index = _tile_index(PTl)

    @cuda.jit
    def kernel(W, c, vs, psum, Pp):
        m = W.shape[1]
        dv = vs.shape[2]
        p, it, jt = tile_index(m)
        tid = cuda.threadIdx.x
        Ws = cuda.shared.array((PTl, PT1), nbt)
        Vs = cuda.shared.array((PTl, PT1), nbt)
        cs = cuda.shared.array(PTl, nbt)
        if p >= W.shape[0] or jt > it:
            return
        I0 = it * PTl
        J0 = jt * PTl
        load(W, p, I0, min(m - I0, PTl), J0, m, Ws)
        for i in range(tid, PTl, NTT):
            cs[i] = c[p, I0 + i] if I0 + i < m else ZERO
        cuda.syncthreads()
        if it == 0 and tid == 0:
            c[p, 0] = ZERO  # after every thread's read of it above
        for e in range(tid, PTl * PTl, NTT):
            i = e // PTl
            j = e - i * PTl
            w = ZERO
            if J0 + j < I0 + i and I0 + i < m:
                w = math.exp(Ws[i, j] - cs[i])
                if w < EPS2:
                    w = ZERO
                W[p, I0 + i, J0 + j] = w
            Ws[i, j] = w
        cuda.syncthreads()
        for i in range(tid, PTl, NTT):
            if I0 + i < m:
                s = ZERO
                for j in range(PTl):
                    s += Ws[i, j]
                psum[p, jt, I0 + i] = s
        ti = tid // TPW
        tj = tid - ti * TPW
        for a0 in range(0, dv, PTl):
            load(vs, p, J0, min(m - J0, PTl), a0, dv, Vs)
            cuda.syncthreads()
            z = ZERO
            (a00, a01, a02, a03, a10, a11, a12, a13, a20, a21, a22, a23, a30, a31, a32,
             a33) = inner(Ws, Vs, ti, tj, z, z, z, z, z, z, z, z, z, z, z, z, z, z, z, z)
            store(Pp, Ws, p, jt, I0, m, a0, dv, ti, tj, a00, a01, a02, a03, a10, a11, a12, a13, a20, a21,
                  a22, a23, a30, a31, a32, a33)
            cuda.syncthreads()

    return kernel


@functools.cache
def _pooled_stats(PTl, b, dtype):
    """Device function: ``(c_I, pooled mass)`` of block row ``I`` from :func:`_softmax_kernel`'s
    outputs (the row sums of its tiles, times ``b``: the earlier blocks are full)."""
    ZERO = np.dtype(dtype).type(0)
    BF = np.dtype(dtype).type(b)

    @cuda.jit(device=True)
    def stats(c, psum, p, I):
        s = ZERO
        for jt in range(I // PTl + 1):
            s += psum[p, jt, I]
        return c[p, I], s * BF

    return stats


@functools.cache
def _rows_kernel(b, d, dv, NT, PTl, dtype):
    BP = K._cdiv(b, 4) * 4
    BPS = K._cdiv(BP, PANEL) * PANEL  # whole panels of rows for the unrolled substitution
    BPS1 = BPS + 1  # shared shapes must be literal constants: no arithmetic inside the calls
    KC1 = min(KCF, d) + 1
    nbt = K._numba_type(dtype)
    ZERO = np.dtype(dtype).type(0)
    tri_prod = K._tri_prod(BP, d, NT, dtype, False, KCF, flat=True)
    row_stats = K._row_stats(NT, dtype)
    stats = _pooled_stats(PTl, b, dtype)
    DV1 = _widths(NT)[0]
    DV2 = DV1 + 2
    NCOL = DV1 + 1  # the value columns of a pass, then the h column
    UNCOL = np.uint64(NCOL)
    step = _tile_step(NT, NCOL)
    SB = PANEL
    subst = _panel_subst(SB, dtype, dv=dv)
    update = _panel_update(SB, dtype, False)
    rhs = _rhs_load(BPS, DV1, dv, NT, dtype)

    @cuda.jit
    def kernel(q, k, v, gamma, scale, c, psum, Pp, X, h, rr, g):
        # q, k, v, X, h flat (C-contiguous (B, n, d), (B, n, dv), (B, n)): every global index a
        # base plus a constant (_chunk_load_flat)
        B = rr.shape[0]
        m = c.shape[1]
        n = h.size // B
        blk = cuda.blockIdx.x
        p = blk // m
        I = blk - p * m
        tid = cuda.threadIdx.x
        tid0 = uint64(tid) // UNCOL  # this thread's (row, column) in an NCOL-wide tile
        cid0 = uint64(tid) - tid0 * UNCOL
        S = cuda.shared.array((BPS, BPS1), nbt)
        qs = cuda.shared.array((BP, KC1), nbt)
        ks = cuda.shared.array((BP, KC1), nbt)
        ws = cuda.shared.array((BPS, DV2), nbt)  # value columns of the pass, then the h column
        us = cuda.shared.array(BP, nbt)
        minv = cuda.shared.array(BPS, nbt)
        Ps = cuda.shared.array(dv, nbt)
        if p >= B:
            return
        t0 = I * b
        T = min(n - t0, b)
        Tu = uint64(T)
        row0 = p * n + t0  # the block's first row among the rows of the flat arrays
        gam = gamma[p]
        # the pooled part (the pooled-score tiles' kernels): shift, mass, P_I = sum_J W_IJ vsum_J
        cI, pooledI = stats(c, psum, p, I)
        for a in range(tid, dv, NT):
            s = ZERO
            for jt in range(I // PTl + 1):
                s += Pp[p, jt, I, a]
            Ps[a] = s  # read after tri_prod's barriers
        # the block: causal scores, normalised rows with the pooled mass, D and 1 / (1 - gamma D_tt)
        tri_prod(q, k, k, ZERO, row0, t0, T, S, qs, ks, scale, us)
        row_stats(S, T, I > 0, cI, pooledI, gam, us, minv)
        # (I - gamma D) [X | h] = [D V + u P | gamma u] by panels of SB rows: within a panel a thread
        # per column substitutes (chains of at most SB - 1 terms), then every thread adds the
        # panel's rows to the rows below it (independent products); DV1 value columns a pass
        for a0 in range(0, dv, DV1):
            cw = min(DV1, dv - a0)
            rhs(v, row0, T, a0, ws, us, Ps, S, gam)
            cuda.syncthreads()
            col = tid
            isv = col < cw
            ish = col == DV1 and a0 == 0
            cs = ZERO
            for k0 in range(0, T, SB):
                k1 = min(k0 + SB, T)
                if isv or ish:
                    cs += subst(S, ws, minv, k0, T, col, gam, isv, ish, v, X, h, row0, a0, v.size - 1)
                cuda.syncthreads()
                i = uint64(k1) + tid0  # only full panels have rows below
                cc = cid0
                while i < Tu:
                    update(S, ws, us, i, cc, k0)
                    i, cc = step(i, cc)
                cuda.syncthreads()
            if isv:
                rr[p, I, a0 + col] = cs
            elif ish:
                g[p, I] = cs

    # 1024 threads per SM: at most 64 registers a thread (the shared tiles allow that many)
    K.LAUNCH_BOUNDS[id(kernel)] = (NT, max(1, 1024 // NT))
    return kernel


@functools.cache
def _rows_prod(NB, RG, RPT):
    """Device function: ``acc[r] += sum_{kk < NB} A[rg + RG r, kk] Zs[kk, col]`` for ``r < RPT``,
    unrolled on unsigned indices (every shared read a base plus a constant; rows past ``NB`` read
    row ``NB - 1``, and their sums are never used)."""
    L = ["def prod(A, Zs, rg, col, acc):", "    rgu = uint64(rg)", "    cu = uint64(col)"]
    L += [f"    x{r} = min(rgu + U{RG * r}, U{NB - 1})" for r in range(RPT)]
    L += [f"    s{r} = acc[{r}]" for r in range(RPT)]
    for kk in range(NB):
        L += [f"    z = Zs[U{kk}, cu]"] + [f"    s{r} += A[x{r}, U{kk}] * z" for r in range(RPT)]
    L += [f"    acc[{r}] = s{r}" for r in range(RPT)]
    return K.generated("prod", L, nconst=max(NB, RG * RPT))


@functools.cache
def _reduced_kernel(NT, dtype, NB, CW1, with_lz):
    """``(I - diag(g) L) Z = R`` with ``L`` (B, m, m) strictly lower (its upper part is not read),
    in diagonal blocks of ``NB`` rows, ``CW1 <= NT`` columns per thread block; ``with_lz``: also
    ``LZ = L Z`` (``acc + L_JJ Z_J``, after the block's flag is up: off the serial chain), which
    the forward's correction and the backward's ``G`` need (else ``LZ`` is not touched).

    Thread block ``J`` first inverts its diagonal block (by panels, as the within-block solve; no
    other block is needed, so this overlaps the wait), then adds ``L_{J,J'} Z_{J'}`` for each
    earlier ``J'`` as its flag comes up, and finishes with ``Z_J = inv (R_J + g_J acc)``: after
    the last flag, only one tile product and one product with the inverse are on the serial chain.
    """
    RG = NT // CW1
    RPT = K._cdiv(NB, RG)
    CW2 = CW1 + 1
    NB1 = NB + 1
    SB = min(PANEL, NB)
    nbt = K._numba_type(dtype)
    ZERO = np.dtype(dtype).type(0)
    ONE = np.dtype(dtype).type(1)
    load_L = _tile_load(NB, NB, NT, dtype)
    load_Z = _tile_load(NB, CW1, NT, dtype)
    inv_panel = _inverse_panel(SB)
    inv_update = _panel_update(SB, dtype, True)
    prod = _rows_prod(NB, RG, RPT)
    from numba import int32

    @cuda.jit
    def kernel(L, g, R, Z, LZ, sync):
        m = L.shape[1]
        kc = R.shape[2]
        mb = (m + NB - 1) // NB
        nch = (kc + CW1 - 1) // CW1
        tid = cuda.threadIdx.x
        T1 = cuda.shared.array((NB, NB1), nbt)  # the diagonal block of L, then the tiles L_{J, J'}
        Zs = cuda.shared.array((NB, CW2), nbt)  # the tiles Z_{J'}, then R_J + g_J acc
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
                inv_panel(T1, D1, gs, k0, c)
            cuda.syncthreads()
            for e in range(tid, (NB - k1) * NB, NT):
                i = k1 + e // NB
                inv_update(T1, D1, gs, i, e - (i - k1) * NB, k0)
            cuda.syncthreads()
        # 2. acc = L_{J, <J} Z_{<J}, one finished block at a time; R_J read before the waits
        acc = cuda.local.array(RPT, nbt)
        rv = cuda.local.array(RPT, nbt)
        for r in range(RPT):
            acc[r] = ZERO
            i = rg + RG * r
            val = ZERO
            if act and i < T and a0 + col < kc:
                val = R[p, j0 + i, a0 + col]
            rv[r] = val
        for J2 in range(J):
            k0 = J2 * NB
            load_L(L, p, j0, T, k0, m, T1)  # before the wait: off the serial chain (rows >= T are 0)
            if tid == 0:
                while cuda.atomic.add(sync, flag0 + J2, int32(0)) == 0:
                    pass
                cuda.threadfence()
            cuda.syncthreads()
            load_Z(Z, p, k0, NB, a0, kc, Zs)
            cuda.syncthreads()
            if act:  # rows of T1 past T are zero
                prod(T1, Zs, rg, col, acc)
            cuda.syncthreads()
        # 3. Z_J = D1 (R_J + g_J acc): on the serial chain, so nothing else (R_J came in above, L_JJ
        # for L Z comes in after the flag)
        for r in range(RPT):
            i = rg + RG * r
            if act and i < NB:
                val = ZERO
                if i < T:
                    val = rv[r] + gs[i] * acc[r]
                Zs[i, col] = val
        cuda.syncthreads()
        zv = cuda.local.array(RPT, nbt)
        for r in range(RPT):
            zv[r] = ZERO
        if act:  # D1 is zero above its diagonal, Zs past T and past the columns
            prod(D1, Zs, rg, col, zv)
            if a0 + col < kc:
                for r in range(RPT):
                    i = rg + RG * r
                    if i < T:
                        Z[p, j0 + i, a0 + col] = zv[r]
        cuda.threadfence()
        cuda.syncthreads()
        if tid == 0:
            cuda.atomic.add(sync, flag0 + J, int32(1))
        if with_lz:  # 4. (L Z)_J = acc + L_JJ Z_J, off the chain (T1 and Zs are free: barrier above)
            load_L(L, p, j0, T, j0, m, T1)
            for r in range(RPT):
                i = rg + RG * r
                if act and i < NB:
                    Zs[i, col] = zv[r]
            cuda.syncthreads()
            for e in range(tid, NB * NB, NT):  # L_JJ's strict lower part
                i = e // NB
                if e - i * NB >= i:
                    T1[i, e - i * NB] = ZERO
            cuda.syncthreads()
            if act and a0 + col < kc:
                prod(T1, Zs, rg, col, acc)
                for r in range(RPT):
                    i = rg + RG * r
                    if i < T:
                        LZ[p, j0 + i, a0 + col] = acc[r]

    if CW1 == CW_SHORT and NT == 256:  # short chains (at most two steps), many thread blocks: two an SM
        K.LAUNCH_BOUNDS[id(kernel)] = (NT, 2)  # (0.063 -> 0.056 ms at (64, 4096); long chains lose)
    return kernel


@functools.cache
def _unit_panel(SB):
    """Device function: rows ``k0 .. k0 + SB - 1`` of column ``c`` of ``(I - diag(gs) L) Z = R``,
    unrolled: ``a_i = acc[i, c] + sum_{k0 <= j < i} Ls[i, j - k0] z_j`` (``acc`` holding the rows
    above the panel), ``z_i = ws[i, c] + gs[i] a_i``; writes ``z`` over ``R`` in ``ws`` and ``a``
    (row ``i`` of ``L Z``) to ``acc``."""
    L = ["def unit_panel(Ls, ws, acc, gs, k0, c):", "    ku = uint64(k0)", "    cu = uint64(c)"]
    for r in range(SB):
        terms = "".join(f" + Ls[ku + U{r}, U{j}] * z{j}" for j in range(r))
        L += [f"    a{r} = acc[ku + U{r}, cu]{terms}", f"    z{r} = ws[ku + U{r}, cu] + gs[ku + U{r}] * a{r}",
              f"    acc[ku + U{r}, cu] = a{r}", f"    ws[ku + U{r}, cu] = z{r}"]
    return K.generated("unit_panel", L, nconst=SB)


@functools.cache
def _strip_update(SB):
    """Device function: ``acc[i, c] += sum_{j < SB} Ls[i, j] ws[k0 + j, c]``, unrolled."""
    L = ["def strip_update(Ls, ws, acc, i, c, k0):", "    iu = uint64(i)", "    cu = uint64(c)", "    ku = uint64(k0)"]
    for a in range(4):
        terms = [f"Ls[iu, U{j}] * ws[ku + U{j}, cu]" for j in range(a, SB, 4)]
        L += [f"    s{a} = " + (" + ".join(terms) if terms else "ZERO")]
    L += ["    acc[iu, cu] += (s0 + s1) + (s2 + s3)"]
    return K.generated("strip_update", L, {"ZERO": np.float32(0)}, nconst=SB)


@functools.cache
def _reduced_small_kernel(NT, dtype, MM, CW1, with_lz):
    """:func:`_reduced_kernel` for ``m <= MM``: one thread block per (batch entry, ``CW1`` columns)
    solves the whole system by panels of ``PANEL`` rows (a thread per column substitutes a panel,
    then every thread adds its rows to ``L Z`` of the rows below), reading ``L`` a strip of
    ``PANEL`` columns at a time, the next strip's loads in flight during a panel.  No diagonal
    block is inverted and no thread block waits for another: at (64, 4096) (m = 128) the blocked
    kernel spent 0.057 ms, mostly on inverting the same diagonal blocks in every column chunk.
    ``L Z`` comes out of the substitution (row ``i``'s sum before ``g_i`` scales it)."""
    SB = min(PANEL, MM)
    MMS = K._cdiv(MM, SB) * SB
    CW2 = CW1 + 1
    SB1 = SB + 1
    nbt = K._numba_type(dtype)
    ZERO = np.dtype(dtype).type(0)
    LIT = K._cdiv(MMS * SB, NT)  # strip entries a thread loads
    panel = _unit_panel(SB)
    update = _strip_update(SB)

    @cuda.jit
    def kernel(L, g, R, Z, LZ, sync):
        m = L.shape[1]
        kc = R.shape[2]
        nch = (kc + CW1 - 1) // CW1
        blk = cuda.blockIdx.x
        p = blk // nch
        ch = blk - p * nch
        if p >= L.shape[0]:
            return
        tid = cuda.threadIdx.x
        a0 = ch * CW1
        ws = cuda.shared.array((MMS, CW2), nbt)  # R, then Z
        acc = cuda.shared.array((MMS, CW2), nbt)  # the rows' sums of L Z so far
        Ls = cuda.shared.array((2, MMS, SB1), nbt)  # L[:, k0 : k0 + SB], two strips
        gs = cuda.shared.array(MMS, nbt)
        buf = cuda.local.array(LIT, nbt)
        for e in range(tid, MMS * CW1, NT):
            i = e // CW1
            c = e - i * CW1
            val = ZERO
            if i < m and a0 + c < kc:
                val = R[p, i, a0 + c]
            ws[i, c] = val
            acc[i, c] = ZERO
        for i in range(tid, MMS, NT):
            gs[i] = g[p, i] if i < m else ZERO
        # strip 0 (L's strict lower part only; zeros elsewhere)
        for it in range(LIT):
            e = tid + it * NT
            i = e // SB
            j = e - i * SB
            val = ZERO
            if i < m and j < i:
                val = L[p, i, j]
            buf[it] = val
        for it in range(LIT):
            e = tid + it * NT
            i = e // SB
            if i < MMS:
                Ls[0, i, e - i * SB] = buf[it]
        cuda.syncthreads()
        cur = 0
        for k0 in range(0, m, SB):
            k1 = k0 + SB
            for it in range(LIT):  # the next strip's loads, in flight during this panel
                e = tid + it * NT
                i = e // SB
                j = k1 + e - i * SB
                val = ZERO
                if i < m and j < i and k1 < m:
                    val = L[p, i, j]
                buf[it] = val
            if tid < CW1:
                panel(Ls[cur], ws, acc, gs, k0, tid)
            cuda.syncthreads()
            for e in range(tid, (m - min(k1, m)) * CW1, NT):
                i = k1 + e // CW1
                update(Ls[cur], ws, acc, i, e - (i - k1) * CW1, k0)
            nxt = 1 - cur
            for it in range(LIT):
                e = tid + it * NT
                i = e // SB
                if i < MMS:
                    Ls[nxt, i, e - i * SB] = buf[it]
            cuda.syncthreads()
            cur = nxt
        for e in range(tid, m * CW1, NT):
            i = e // CW1
            c = e - i * CW1
            if a0 + c < kc:
                Z[p, i, a0 + c] = ws[i, c]
                if with_lz:
                    LZ[p, i, a0 + c] = acc[i, c]

    K.LAUNCH_BOUNDS[id(kernel)] = (NT, 2)  # two an SM: (64, 4096) has 256 of them (136 registers: one)
    return kernel


FLIP_TS = 32  #: square tile of :func:`_flip_kernel`
FLIP_TS_SIM = 4  #: the same under the simulator (small systems still span several tiles)


def _flip_tile(nt):
    """``(TS, threads)`` of :func:`_flip_kernel`: ``FLIP_TS`` and 256 threads on a GPU; under the
    simulator (or with ``nt`` given) ``FLIP_TS_SIM`` and a multiple of it."""
    if nt is None and not K._simulated():
        return FLIP_TS, NT
    ts = FLIP_TS_SIM
    return ts, ts * max(1, _threads(nt) // ts)


@functools.cache
def _flip_kernel(TS, NT, dtype):
    """The transposed reduced system in the lower solver's order: ``Lr[p, i, j] = W[p, m-1-j, m-1-i]``
    (the strict lower part of ``Lr``, from ``W``'s; ``(I - diag(g) W^T) Z = R`` is upper triangular,
    and reversing its rows and columns makes it lower), ``gr[p, i] = g[p, m-1-i]`` and ``Rr[p, i, :] =
    R[p, m-1-i, :]``.  One thread block per (batch entry, ``TS x TS`` tile on or below the diagonal
    of ``Lr``), through a shared tile so that reads and writes are both along rows; the tiles of
    the first tile column also reverse ``g`` and ``R``'s rows.  (Three CuPy copies did this, with
    their allocations: ~0.05 ms of host time a backward.)"""
    TS1 = TS + 1
    NTY = NT // TS
    nbt = K._numba_type(dtype)

    @cuda.jit
    def kernel(W, g, R, Lr, gr, Rr):
        m = W.shape[1]
        kc = R.shape[2]
        nt = (m + TS - 1) // TS
        blk = cuda.blockIdx.x
        p = blk // (nt * nt)
        r = blk - p * (nt * nt)
        ti = r // nt
        tj = r - ti * nt
        if p >= W.shape[0] or tj > ti:
            return
        tid = cuda.threadIdx.x
        tx = tid % TS
        ty = tid // TS
        tile = cuda.shared.array((TS, TS1), nbt)
        i0 = ti * TS
        j0 = tj * TS
        for yy in range(ty, TS, NTY):  # tile[jj, ii] = W[m-1-(j0+jj), m-1-(i0+ii)]: along W's rows
            j = j0 + yy
            i = i0 + tx
            if i < m and j < m:
                tile[yy, tx] = W[p, m - 1 - j, m - 1 - i]
        cuda.syncthreads()
        for yy in range(ty, TS, NTY):  # Lr[i0+ii, j0+jj] = tile[jj, ii]: along Lr's rows
            i = i0 + yy
            j = j0 + tx
            if i < m and j < m:
                Lr[p, i, j] = tile[tx, yy]
        if tj == 0:
            for i in range(i0 + ty, min(i0 + TS, m), NTY):
                if tx == 0:
                    gr[p, i] = g[p, m - 1 - i]
                for a in range(tx, kc, TS):
                    Rr[p, i, a] = R[p, m - 1 - i, a]

    return kernel


@functools.cache
def _unflip_kernel(NT):
    """``dst[p, i, :] = src[p, m-1-i, :]`` for (B, m, k) arrays: the reduced solution back in the
    transposed system's order.  One thread block per (batch entry, ``NT`` consecutive entries)."""

    @cuda.jit
    def kernel(src, dst):
        m = src.shape[1]
        kc = src.shape[2]
        per = m * kc
        nb = (per + NT - 1) // NT
        blk = cuda.blockIdx.x
        p = blk // nb
        e = (blk - p * nb) * NT + cuda.threadIdx.x
        if p < src.shape[0] and e < per:
            i = e // kc
            a = e - i * kc
            dst[p, i, a] = src[p, m - 1 - i, a]

    return kernel


def _unflip_grid(B, m, kc, nthr):
    return B * K._cdiv(m * kc, nthr)


@functools.cache
def _combine_apply(b, dv, NT, dtype):
    """Device function: ``X[p, t0 + i, a] = om (X + h[p, t0 + i] WZ[p, I, a])`` over block ``I``'s
    ``T x dv`` entries, unrolled: a thread issues all its loads (``ceil(b dv / NT)`` of ``X``) before
    its stores, so that enough bytes are in flight to run at the memory's rate.  ``X`` and ``h``
    are flat and ``row0`` is the block's first row: where ``dv`` divides ``NT`` a thread keeps one
    column (one read of ``W Z``) and its elements are a base plus constants."""
    EPT = K._cdiv(b * dv, NT)
    env = {"ZERO": np.dtype(dtype).type(0), "UDV": np.uint64(dv)}
    L = ["def apply(X, h, WZ, p, I, row0, T, om):", "    tid = uint64(cuda.threadIdx.x)", "    pu = uint64(p)",
         "    Iu = uint64(I)", "    ru = uint64(row0)", "    Tu = uint64(T)"]
    if NT % dv == 0:
        RS = NT // dv
        EPT = K._cdiv(b, RS)
        env.update({f"R{it}": np.uint64(it * RS) for it in range(EPT)})
        env.update({f"O{it}": np.uint64(it * NT) for it in range(EPT)})
        L += ["    i = tid // UDV", "    a = tid - i * UDV", "    w = WZ[pu, Iu, a]", "    off = (ru + i) * UDV + a",
              "    hb = ru + i"]
        for it in range(EPT):
            L += [f"    x{it} = ZERO", f"    y{it} = ZERO", f"    if i + R{it} < Tu:",
                  f"        x{it} = X[off + O{it}]", f"        y{it} = h[hb + R{it}] * w"]
        for it in range(EPT):
            L += [f"    if i + R{it} < Tu:", f"        X[off + O{it}] = om * (x{it} + y{it})"]
        return K.generated("apply", L, env)
    for it in range(EPT):
        L += [f"    e{it} = tid + U{it * NT}" if it else "    e0 = tid", f"    i{it} = e{it} // UDV",
              f"    a{it} = e{it} - i{it} * UDV", f"    ok{it} = i{it} < Tu", f"    x{it} = ZERO", f"    y{it} = ZERO",
              f"    if ok{it}:", f"        x{it} = X[(ru + i{it}) * UDV + a{it}]",
              f"        y{it} = h[ru + i{it}] * WZ[pu, Iu, a{it}]"]
    for it in range(EPT):
        L += [f"    if ok{it}:", f"        X[(ru + i{it}) * UDV + a{it}] = om * (x{it} + y{it})"]
    return K.generated("apply", L, env, nconst=(EPT - 1) * NT + 1)


@functools.cache
def _combine_kernel(b, dv, NT, dtype):
    """``X <- (1 - gamma) (X + h (W Z)_I)`` in place, one thread block per (batch entry, block);
    ``W Z`` comes from the reduced kernel, so this is one pass over ``X`` and nothing else.  ``X``
    and ``h`` are flat."""
    ONE = np.dtype(dtype).type(1)
    apply = _combine_apply(b, dv, NT, dtype)

    @cuda.jit
    def kernel(X, h, WZ, gamma):
        B = WZ.shape[0]
        m = WZ.shape[1]
        n = h.size // B
        blk = cuda.blockIdx.x
        p = blk // m
        I = blk - p * m
        if p < B:
            t0 = I * b
            apply(X, h, WZ, p, I, p * n + t0, min(n - t0, b), ONE - gamma[p])

    return kernel


# --------------------------------------------------------------------------------------------------
# backward: the gradients of a block, from shared tiles


@functools.cache
def _bsolve_kernel(b, d, dv, NT, PTl, dtype):
    """The backward's within-block solve (float32, ``b <= MAX_BLOCK``), one thread block per (batch
    entry, block); as :func:`._kernels._backward_solve_kernel` (the same outputs; it takes ``dy``
    for ``dX`` and the pooled tiles' row sums ``psum`` for the pooled mass):
    ``[G0 | h'] = (I - gamma D)^{-T} [dX | gamma 1]``, ``dX = (1 - gamma) dy``, with ``D`` recomputed
    (and stored to ``Dst``, ``u``), and the block sums ``rr = sum_t u_t G0_t``, ``gd = sum_t u_t
    h'_t``.  The solve is the
    forward's panel substitution on the rows reversed, where the old kernel had a barrier per row.
    A non-finite entry of ``dy`` sets ``flags[3]``."""
    BP = K._cdiv(b, 4) * 4
    BPS = K._cdiv(BP, PANEL) * PANEL
    BPS1 = BPS + 1
    KC1 = min(KCF, d) + 1
    nbt = K._numba_type(dtype)
    ZERO = np.dtype(dtype).type(0)
    ONE = np.dtype(dtype).type(1)
    tri_prod = K._tri_prod(BP, d, NT, dtype, False, KCF, flat=True)
    row_stats = K._row_stats(NT, dtype)
    DV1 = _widths(NT)[0]
    DV2 = DV1 + 2
    NCOL = DV1 + 1
    UBP, UNCOL, UB = np.uint64(BP), np.uint64(NCOL), np.uint64(b)
    UONE = np.uint64(1)
    step_b, step_n = _tile_step(NT, BP), _tile_step(NT, NCOL)
    SB = PANEL
    subst = _panel_subst(SB, dtype, True, dv=dv)
    update = _panel_update(SB, dtype, False)
    dy_load = _dy_load(BPS, DV1, dv, NT, dtype)
    stats = _pooled_stats(PTl, b, dtype)
    from numba import int32

    @cuda.jit
    def kernel(q, k, gamma, scale, c, psum, dy, Dst, u, G0, hp, rr, gd, flags):
        # q, k, dy, Dst, G0, hp flat (C-contiguous): every global index a base plus a constant
        B = u.shape[0]
        n = u.shape[1]
        m = rr.shape[1]
        blk = cuda.blockIdx.x
        p = blk // m
        I = blk - p * m
        tid = cuda.threadIdx.x
        # this thread's first (row, column) in tiles BP, DV1 and NCOL wide: the loops below step
        # by addition on unsigned indices (a division a step cost some 25 integer instructions)
        ut = uint64(tid)
        rB0 = ut // UBP
        cB0 = ut - rB0 * UBP
        rN0 = ut // UNCOL
        cN0 = ut - rN0 * UNCOL
        S = cuda.shared.array((BPS, BPS1), nbt)
        qs = cuda.shared.array((BP, KC1), nbt)
        ks = cuda.shared.array((BP, KC1), nbt)
        ws = cuda.shared.array((BPS, DV2), nbt)
        us = cuda.shared.array(BPS, nbt)
        minv = cuda.shared.array(BPS, nbt)
        if p >= B:
            return
        t0 = I * b
        T = min(n - t0, b)
        Tu = uint64(T)
        Tm1 = Tu - UONE
        row0 = p * n + t0  # the block's first row among the rows of the flat arrays
        dbase = uint64((p * m + I) * b * b)  # Dst[p, I] among the flat (B, m, b, b)
        gam = gamma[p]
        om = ONE - gam
        cI, pooledI = stats(c, psum, p, I)
        tri_prod(q, k, k, ZERO, row0, t0, T, S, qs, ks, scale, us)
        row_stats(S, T, I > 0, cI, pooledI, gam, us, minv)
        i = rB0
        j = cB0
        while i < Tu:
            if j < Tu:
                Dst[dbase + i * UB + j] = S[i, j] if j <= i else ZERO
            i, j = step_b(i, j)
        for e in range(tid, T, NT):
            u[p, t0 + e] = us[e]
        cuda.syncthreads()
        # reverse the block: D reflected about its anti-diagonal, us and minv reversed
        i = rB0
        j = cB0
        while i < Tu:
            if j <= i and i + j < Tm1:
                x = S[i, j]
                S[i, j] = S[Tm1 - j, Tm1 - i]
                S[Tm1 - j, Tm1 - i] = x
            i, j = step_b(i, j)
        for i2 in range(tid, T // 2, NT):
            x = us[i2]
            us[i2] = us[T - 1 - i2]
            us[T - 1 - i2] = x
            x = minv[i2]
            minv[i2] = minv[T - 1 - i2]
            minv[T - 1 - i2] = x
        cuda.syncthreads()
        for a0 in range(0, dv, DV1):
            cw = min(DV1, dv - a0)
            # dX = (1 - gamma) dy with its rows reversed, the h column gamma, in one pass
            if dy_load(dy, row0, T, a0, ws, om, gam):
                cuda.atomic.max(flags, 3, int32(1))
            cuda.syncthreads()
            col = tid
            isv = col < cw
            ish = col == DV1 and a0 == 0
            cs = ZERO
            for k0 in range(0, T, SB):
                k1 = min(k0 + SB, T)
                if isv or ish:
                    cs += subst(S, ws, minv, us, k0, T, col, gam, isv, ish, G0, hp, row0, a0)
                cuda.syncthreads()
                i = uint64(k1) + rN0
                cc = cN0
                while i < Tu:
                    update(S, ws, us, i, cc, k0)
                    i, cc = step_n(i, cc)
                cuda.syncthreads()
            if isv:
                rr[p, I, a0 + col] = cs
            elif ish:
                gd[p, I] = cs

    K.LAUNCH_BOUNDS[id(kernel)] = (NT, max(1, 1024 // NT))
    return kernel


@functools.cache
def _tile_apply(BP, BPR, CK, NT, dtype, transpose, with_dot):
    """Device function: ``out[(row0 + x) C + a0 + c] = sum_y S'[x, y] Ts[y, c]`` (``out`` flat, rows
    of ``C`` entries) for ``x < T``,
    ``a0 + c < C``, with ``S'`` = ``S`` or ``S^T`` (``S`` zero above its diagonal and past the
    block, ``Ts`` a shared ``(BP, CK)`` tile zero past the block).  A thread keeps columns
    ``cg, cg + CK / 2`` of every ``R``-th row, unrolled over ``y`` on unsigned indices: two tile
    reads and ``RPT`` reads of ``S`` feed ``2 RPT`` multiply-adds.  With ``with_dot`` it returns its
    share of ``sum out * Dw`` (``Dw`` a shared tile like ``Ts``)."""
    NCG = CK // 2
    R = max(1, NT // NCG)
    RPT = K._cdiv(BP, R)
    assert R * RPT <= BPR
    env = {"ZERO": np.dtype(dtype).type(0), "UNCG": np.uint64(NCG), "USLOTS": np.uint64(NCG * R),
           "UNT": np.uint64(NT)}
    I8 = " " * 8
    L = ["def apply(S, Ts, out, row0, T, a0, C, Dw):", "    part = ZERO", "    Tu = uint64(T)",
         "    ru = uint64(row0)", "    Cu = uint64(C)", "    slot = uint64(cuda.threadIdx.x)",
         "    while slot < USLOTS:  # one pass unless NT < CK / 2", I8 + "cg = slot % UNCG",
         I8 + "r0 = slot // UNCG", I8 + "c1 = cg + UNCG", I8 + "slot += UNT"]
    L += [I8 + f"x{r} = r0 + U{R * r}" for r in range(RPT)]
    L += [I8 + f"a{r}_{c} = ZERO" for r in range(RPT) for c in range(2)]
    for y in range(BP):
        L += [I8 + f"s0 = Ts[U{y}, cg]", I8 + f"s1 = Ts[U{y}, c1]"]
        for r in range(RPT):
            w = f"S[U{y}, x{r}]" if transpose else f"S[x{r}, U{y}]"
            L += [I8 + f"w = {w}", I8 + f"a{r}_0 += w * s0", I8 + f"a{r}_1 += w * s1"]
    L += [I8 + "ca = uint64(a0) + cg", I8 + "cb = uint64(a0) + c1"]
    for r in range(RPT):
        L += [I8 + f"if x{r} < Tu:"]
        for c, col, cl in ((0, "ca", "cg"), (1, "cb", "c1")):
            L += [I8 + f"    if {col} < Cu:", I8 + f"        out[(ru + x{r}) * Cu + {col}] = a{r}_{c}"]
            if with_dot:
                L += [I8 + f"        part += a{r}_{c} * Dw[x{r}, {cl}]"]
    L += ["    return part"]
    return K.generated("apply", L, env, nconst=max(BP, R * RPT))


@functools.cache
def _g_update(BP, CK, NT, dtype, dv):
    """Device function: ``G_t <- G0_t + h'_t (W^T Z)_I`` on a column tile ``A`` of ``G0`` (shared, in
    place) and into flat ``G``: ``A[i, c] += hs[i] w_c``, ``G[(row0 + i) dv + a0 + c] = A[i, c]``
    for ``i < T``, ``a0 + c < dv``.  Where ``CK`` divides ``NT`` a thread keeps one column (one
    read of ``W^T Z``) and its stores are a base plus constants."""
    if NT % CK:
        @cuda.jit(device=True)
        def g_update_rolled(A, hs, WtZ, G, p, I, row0, T, a0):
            for e in range(cuda.threadIdx.x, T * CK, NT):
                i = e // CK
                c = e - i * CK
                if a0 + c < dv:
                    val = A[i, c] + hs[i] * WtZ[p, I, a0 + c]
                    A[i, c] = val
                    G[(row0 + i) * dv + a0 + c] = val

        return g_update_rolled
    RS = NT // CK
    IT = K._cdiv(BP, RS)
    env = {"UCK": np.uint64(CK), "UDV": np.uint64(dv)}
    env.update({f"R{it}": np.uint64(it * RS) for it in range(IT)})
    env.update({f"O{it}": np.uint64(it * RS * dv) for it in range(IT)})
    L = ["def g_update(A, hs, WtZ, G, p, I, row0, T, a0):", "    tid = uint64(cuda.threadIdx.x)",
         "    i = tid // UCK", "    c = tid - i * UCK", "    ca = uint64(a0) + c", "    Tu = uint64(T)",
         "    if ca < UDV:", "        w = WtZ[p, I, ca]", "        off = (uint64(row0) + i) * UDV + ca"]
    for it in range(IT):
        L += [f"        if i + R{it} < Tu:", f"            val = A[i + R{it}, c] + hs[i + R{it}] * w",
              f"            A[i + R{it}, c] = val", f"            G[off + O{it}] = val"]
    return K.generated("g_update", L, env)


@functools.cache
def _grads_kernel(b, d, dv, NT, dtype):
    """The gradients within each block (float32, ``b <= MAX_BLOCK``), one thread block per (batch
    entry, block); as :func:`._kernels._backward_grads_kernel`, but on ``y`` (not ``X = y / (1 -
    gamma)``) and with one more output, the block sums ``Xsum`` of ``X``; with
    every product read from shared tiles loaded whole (all loads in flight), where the old kernel
    read global memory inside rolled loops (a load's latency per step).  ``q``, ``k``, ``v``, ``y``,
    ``Dst``, ``G``, ``dq``, ``dk``, ``dvv`` are flat (C-contiguous): every global index a base plus
    a constant, as in the forward's ``rows``."""
    BP = K._cdiv(b, 4) * 4
    # tile columns: a power of two (the tile loads unroll when it divides the threads) with two
    # (BP, CK) tiles and the score tile inside 48 KB; fewer for narrow q, k, v (even: two per thread)
    CK = min(1 << (min(64, 2048 // BP).bit_length() - 1), 2 * K._cdiv(max(d, dv), 2))
    NCG = CK // 2
    R = max(1, NT // NCG)
    BPR = max(BP, R * K._cdiv(BP, R))
    BPR1 = BPR + 1
    CK1 = CK + 1
    KC1 = KCF + 1
    nbt = K._numba_type(dtype)
    ZERO = np.dtype(dtype).type(0)
    ONE = np.dtype(dtype).type(1)
    prod_dS = K._tri_prod(BP, dv, NT, dtype, True, KCF, flat=True)
    apply_lo = _tile_apply(BP, BPR, CK, NT, dtype, False, False)
    apply_tr = _tile_apply(BP, BPR, CK, NT, dtype, True, False)
    apply_dot = _tile_apply(BP, BPR, CK, NT, dtype, True, True)
    load_v = _tile_load_flat(BP, CK, NT, dtype, dv)
    load_d = _tile_load_flat(BP, CK, NT, dtype, d)
    g_update = _g_update(BP, CK, NT, dtype, dv)
    colsum = _colsum_flat(dtype)
    rsum = _block_reduce(NT, dtype, False)

    @cuda.jit
    def kernel(q, k, v, y, gamma, scale, Dst, u, G, hp, WtZ, dq, dk, dvv, Gu, asum, Rsum, gdx, Xsum):
        B = u.shape[0]
        n = u.shape[1]
        m = Gu.shape[1]
        blk = cuda.blockIdx.x
        p = blk // m
        I = blk - p * m
        tid = cuda.threadIdx.x
        S = cuda.shared.array((BPR, BPR1), nbt)  # D, then dS: zero above the diagonal and past T
        qs = cuda.shared.array((BP, KC1), nbt)
        ks = cuda.shared.array((BP, KC1), nbt)
        A = cuda.shared.array((BP, CK1), nbt)  # a column tile of G, then of k
        Bt = cuda.shared.array((BP, CK1), nbt)  # the same tile of X, then of q
        us = cuda.shared.array(BP, nbt)
        hs = cuda.shared.array(BP, nbt)
        delta = cuda.shared.array(BP, nbt)
        red = cuda.shared.array(NT, nbt)
        if p >= B:
            return
        t0 = I * b
        T = min(n - t0, b)
        row0 = p * n + t0  # the block's first row among the rows of the flat arrays
        dbase = (p * m + I) * b * b  # Dst[p, I] among the flat (B, m, b, b)
        gam = gamma[p]
        xinv = ONE / (ONE - gam)  # X = y / (1 - gamma): the tiles hold y, the products are scaled
        for e in range(tid, BPR * BPR, NT):
            i = e // BPR
            j = e - i * BPR
            val = ZERO
            if j <= i and i < T:
                val = Dst[dbase + i * b + j]
            S[i, j] = val
        for i in range(tid, BP, NT):
            uu = ZERO
            hh = ZERO
            if i < T:
                uu = u[p, t0 + i]
                hh = hp[p, t0 + i]
            us[i] = uu
            hs[i] = hh
            delta[i] = ZERO
        cuda.syncthreads()
        part = ZERO
        for a0 in range(0, dv, CK):
            load_v(G, row0, T, a0, A)
            load_v(y, row0, T, a0, Bt)
            cuda.syncthreads()
            # G = G0 + h' (W^T Z)_I, written back: the dS product reads G from global memory
            g_update(A, hs, WtZ, G, p, I, row0, T, a0)
            cuda.syncthreads()
            for i in range(tid, T, NT):  # delta_t = G_t . X_t
                s = ZERO
                for c in range(CK):
                    s += A[i, c] * Bt[i, c]
                delta[i] += xinv * s
            for c in range(tid, CK, NT):  # the block sums of the pooled part
                if a0 + c < dv:
                    gu = ZERO
                    xs = ZERO
                    for i in range(T):
                        gu += us[i] * A[i, c]
                        xs += Bt[i, c]
                    Gu[p, I, a0 + c] = gu
                    Xsum[p, I, a0 + c] = xinv * xs
                    Rsum[p, I, a0 + c] = colsum(v, row0 * dv + a0 + c, T, dv) + gam * xinv * xs
            # dV = D^T G within the block; gdx_I = <D^T G, X>
            part += apply_dot(S, A, dvv, row0, T, a0, dv, Bt)
            cuda.syncthreads()
        tot = rsum(red, part)
        if tid == 0:
            gdx[p, I] = xinv * tot
            s = ZERO
            for i in range(T):
                s += us[i] * delta[i]
            asum[p, I] = s
        # dS = scale D * (G R^T - delta), R = V + gamma X, in place of D (zero stays zero)
        prod_dS(G, v, y, gam * xinv, row0, t0, T, S, qs, ks, scale, delta)
        for a0 in range(0, d, CK):
            load_d(k, row0, T, a0, A)
            load_d(q, row0, T, a0, Bt)
            cuda.syncthreads()
            apply_lo(S, A, dq, row0, T, a0, d, A)  # dq = dS k
            apply_tr(S, Bt, dk, row0, T, a0, d, Bt)  # dk = dS^T q
            cuda.syncthreads()

    K.LAUNCH_BOUNDS[id(kernel)] = (NT, max(1, 1024 // NT))
    return kernel


@functools.cache
def _dsig_store(TPW, dtype):
    """Device function: a thread's 4 x 4 tile of ``dsigma = W * (Gu Rsum^T - asum size^T)`` into
    shared ``A`` (zero outside the ``m x m`` matrix), from the accumulated ``Gu Rsum^T``."""
    acc = [f"a{r}{c}" for r in range(4) for c in range(4)]
    L = [f"def store(W, A, as_, sz, p, I0, J0, m, ti, tj, {', '.join(acc)}):", "    pu = uint64(p)"]
    L += [f"    i{r} = uint64(ti + {TPW * r})" for r in range(4)] + [f"    j{c} = uint64(tj + {TPW * c})" for c in range(4)]
    L += [f"    row{r} = uint64(I0) + i{r}" for r in range(4)] + [f"    col{c} = uint64(J0) + j{c}" for c in range(4)]
    L += ["    mu = uint64(m)"]
    for r in range(4):
        for c in range(4):
            L += ["    w = ZERO", f"    if row{r} < mu and col{c} < mu:", f"        w = W[pu, row{r}, col{c}]",
                  f"    A[i{r}, j{c}] = w * (a{r}{c} - as_[i{r}] * sz[j{c}])"]
    return K.generated("store", L, {"ZERO": np.dtype(dtype).type(0)})


@functools.cache
def _pgrad_kernel(d, dv, PTl, b, dtype):
    """The pooled part of the backward, tile by tile as :func:`_scores_kernel` (the tiles on and
    below the diagonal of ``W``): ``dsigma = W * (Gu Rsum^T - asum size^T)`` and the tile's shares of
    ``dsigma kbar`` (rows, into ``dqp[p, jt]``), ``dsigma^T qbar`` (columns, into ``dkp[p, it]``) and
    ``W^T Gu`` (columns, into ``dvp[p, it]``); :func:`_pgrad_apply_kernel` sums the shares."""
    TPW = PTl // 4
    NTT = TPW * TPW
    PT1 = PTl + 1
    nbt = K._numba_type(dtype)
    ZERO = np.dtype(dtype).type(0)
    BF = np.dtype(dtype).type(b)
    inner_bt = _rect_inner(TPW, PTl, False, True)
    inner_at = _rect_inner(TPW, PTl, True, False)
    store = _rect_store(TPW, dtype, False)
    dsig = _dsig_store(TPW, dtype)
    load = _tile_load(PTl, PTl, NTT, dtype)
    tile_index = _tile_index(PTl)

    @cuda.jit
    def kernel(W, Gu, Rsum, asum, sqbar, kbarT, n, dqp, dkp, dvp):
        m = W.shape[1]
        p, it, jt = tile_index(m)
        tid = cuda.threadIdx.x
        A = cuda.shared.array((PTl, PT1), nbt)
        Bs = cuda.shared.array((PTl, PT1), nbt)
        as_ = cuda.shared.array(PTl, nbt)
        sz = cuda.shared.array(PTl, nbt)
        if p >= W.shape[0] or jt > it:
            return
        I0 = it * PTl
        J0 = jt * PTl
        TI = min(m - I0, PTl)
        TJ = min(m - J0, PTl)
        ti = tid // TPW
        tj = tid - ti * TPW
        last = n - (m - 1) * b  # the last block's size; the others are full
        for i in range(tid, PTl, NTT):
            as_[i] = asum[p, I0 + i] if i < TI else ZERO
            sz[i] = BF if J0 + i < m - 1 else last
        z = ZERO
        acc = (z, z, z, z, z, z, z, z, z, z, z, z, z, z, z, z)
        for k0 in range(0, dv, PTl):  # Gu_I Rsum_J^T
            load(Gu, p, I0, TI, k0, dv, A)
            load(Rsum, p, J0, TJ, k0, dv, Bs)
            cuda.syncthreads()
            acc = inner_bt(A, Bs, ti, tj, *acc)
            cuda.syncthreads()
        dsig(W, A, as_, sz, p, I0, J0, m, ti, tj, *acc)
        for a0 in range(0, d, PTl):  # rows I: dsigma kbar_J
            load(kbarT, p, a0, min(d - a0, PTl), J0, m, Bs)
            cuda.syncthreads()
            acc = inner_bt(A, Bs, ti, tj, z, z, z, z, z, z, z, z, z, z, z, z, z, z, z, z)
            store(dqp, A, p, jt, I0, m, a0, d, ti, tj, *acc)
            cuda.syncthreads()
        for a0 in range(0, d, PTl):  # columns J: dsigma^T qbar_I
            load(sqbar, p, I0, TI, a0, d, Bs)
            cuda.syncthreads()
            acc = inner_at(A, Bs, ti, tj, z, z, z, z, z, z, z, z, z, z, z, z, z, z, z, z)
            store(dkp, A, p, it, J0, m, a0, d, ti, tj, *acc)
            cuda.syncthreads()
        load(W, p, I0, TI, J0, m, A)  # columns J: W^T Gu_I
        for c0 in range(0, dv, PTl):
            load(Gu, p, I0, TI, c0, dv, Bs)
            cuda.syncthreads()
            acc = inner_at(A, Bs, ti, tj, z, z, z, z, z, z, z, z, z, z, z, z, z, z, z, z)
            store(dvp, A, p, it, J0, m, c0, dv, ti, tj, *acc)
            cuda.syncthreads()

    return kernel


@functools.cache
def _block_rows_add3(b, d, dv, NT, dtype):
    """Device function: ``A[t, c] += va[c]``, ``Bm[t, c] += vb[c]`` (``c < d``) and ``C[t, c] +=
    vc[c]`` (``c < dv``) over block rows ``t0 .. t0 + T - 1`` of batch entry ``p``, on the flat
    (C-contiguous) arrays: the block's rows are one contiguous range.  When ``d`` and ``dv`` divide
    ``NT`` a thread keeps one column (``tid % d``) and issues its loads in rounds of up to 32 values
    (no spills at 64 registers), each a base plus a constant, before the round's stores (a rolled
    pass per array, one after another, kept a third as many bytes in flight: the compiler may not
    move a load above a store to another array); otherwise a rolled loop."""
    MAX_HELD = 32
    if NT % d or NT % dv:
        @cuda.jit(device=True)
        def add3_rolled(A, Bm, C, va, vb, vc, p, n, t0, T):
            row = p * n + t0
            for e in range(cuda.threadIdx.x, T * d, NT):
                c = e % d
                A[row * d + e] += va[c]
                Bm[row * d + e] += vb[c]
            for e in range(cuda.threadIdx.x, T * dv, NT):
                C[row * dv + e] += vc[e % dv]

        return add3_rolled
    L = ["def add3(A, Bm, C, va, vb, vc, p, n, t0, T):", "    tid = uint64(cuda.threadIdx.x)",
         "    row = uint64(p) * uint64(n) + uint64(t0)", "    bq = row * UD + tid", "    bv = row * UDV + tid",
         "    eq = uint64(T) * UD", "    ev = uint64(T) * UDV", "    sa = va[tid % UD]", "    sb = vb[tid % UD]",
         "    sc = vc[tid % UDV]"]
    groups = (("A", "sa", "bq", "eq", d, "a"), ("Bm", "sb", "bq", "eq", d, "b"), ("C", "sc", "bv", "ev", dv, "c"))
    phases, held = [[]], 0  # at most MAX_HELD values a thread at once (64 registers, no spills)
    for g in groups:
        ept = K._cdiv(b * g[4], NT)
        if phases[-1] and held + ept > MAX_HELD:
            phases.append([])
            held = 0
        phases[-1].append(g)
        held += ept
    for phase in phases:
        for arr, sv, base, end, C, tag in phase:
            for it in range(K._cdiv(b * C, NT)):
                L += [f"    x{tag}{it} = ZERO", f"    if tid + U{it * NT} < {end}:",
                      f"        x{tag}{it} = {arr}[{base} + U{it * NT}] + {sv}"]
        for arr, sv, base, end, C, tag in phase:
            for it in range(K._cdiv(b * C, NT)):
                L += [f"    if tid + U{it * NT} < {end}:", f"        {arr}[{base} + U{it * NT}] = x{tag}{it}"]
    env = {"ZERO": np.dtype(dtype).type(0), "UD": np.uint64(d), "UDV": np.uint64(dv)}
    return K.generated("add3", L, env, nconst=(K._cdiv(b * max(d, dv), NT) - 1) * NT + 1)


@functools.cache
def _block_dot(b, dv, NT, dtype):
    """Device function: the thread's share of ``sum X[t] . Y[t]`` over block rows ``t0 .. t0 + T - 1``
    of batch entry ``p`` of the flat (C-contiguous, ``dv`` columns) arrays ``X``, ``Y``: one contiguous
    range, read in rounds of 16 loads of each before the products (registers, no spills)."""
    EPT = K._cdiv(b * dv, NT)
    L = ["def dot(X, Y, p, n, t0, T):", "    tid = uint64(cuda.threadIdx.x)",
         "    base = (uint64(p) * uint64(n) + uint64(t0)) * UDV + tid", "    end = uint64(T) * UDV", "    s = ZERO"]
    for r0 in range(0, EPT, 16):
        its = range(r0, min(EPT, r0 + 16))
        for it in its:
            L += [f"    x{it} = ZERO", f"    y{it} = ZERO", f"    if tid + U{it * NT} < end:",
                  f"        x{it} = X[base + U{it * NT}]", f"        y{it} = Y[base + U{it * NT}]"]
        L += [f"    s += x{it} * y{it}" for it in its]
    L += ["    return s"]
    return K.generated("dot", L, {"ZERO": np.dtype(dtype).type(0), "UDV": np.uint64(dv)},
                       nconst=(EPT - 1) * NT + 1)


@functools.cache
def _pgrad_apply_kernel(b, d, dv, NT, PTl, dtype):
    """One thread block per (batch entry, block ``K``): the pooled corrections of block ``K`` (the
    shares of :func:`_pgrad_kernel` summed, ``dq`` scaled by ``scale / size_K``, ``dk`` by
    ``1 / size_K``) added to its rows of ``dq``, ``dk``, ``dvv``, and the block's share of
    ``dgamma``: ``gdx_K + Xsum_K . (W^T Gu)_K - sum_{t in K} dy_t . y_t / (1 - gamma)`` into
    ``gsum[p, K]``."""
    nbt = K._numba_type(dtype)
    ZERO = np.dtype(dtype).type(0)
    ONE = np.dtype(dtype).type(1)
    add3 = _block_rows_add3(b, d, dv, NT, dtype)
    dot = _block_dot(b, dv, NT, dtype)
    rsum = _block_reduce(NT, dtype, False)

    @cuda.jit
    def kernel(dq, dk, dvv, dqp, dkp, dvp, Xsum, gdx, dy, y, gamma, scale, gsum):
        n = dq.size // (Xsum.shape[0] * d)  # dq, dk, dvv, dy, y flat
        m = Xsum.shape[1]
        npt = (m + PTl - 1) // PTl
        blk = cuda.blockIdx.x
        p = blk // m
        Kb = blk - p * m
        tid = cuda.threadIdx.x
        vq = cuda.shared.array(d, nbt)
        vk = cuda.shared.array(d, nbt)
        vv = cuda.shared.array(dv, nbt)
        red = cuda.shared.array(NT, nbt)
        if p >= Xsum.shape[0]:
            return
        t0 = Kb * b
        T = min(n - t0, b)
        inv = ONE / T  # the block's size
        jK = Kb // PTl
        for a in range(tid, d, NT):
            s1 = ZERO
            for jt in range(jK + 1):
                s1 += dqp[p, jt, Kb, a]
            s2 = ZERO
            for it in range(jK, npt):
                s2 += dkp[p, it, Kb, a]
            vq[a] = scale * inv * s1
            vk[a] = inv * s2
        part = ZERO
        for c in range(tid, dv, NT):
            s3 = ZERO
            for it in range(jK, npt):
                s3 += dvp[p, it, Kb, c]
            vv[c] = s3
            part += Xsum[p, Kb, c] * s3
        part -= dot(dy, y, p, n, t0, T) / (ONE - gamma[p])  # dy, y flat
        cuda.syncthreads()
        add3(dq, dk, dvv, vq, vk, vv, p, n, t0, T)  # dq, dk, dvv flat
        tot = rsum(red, part)
        if tid == 0:
            gsum[p, Kb] = gdx[p, Kb] + tot

    # two thread blocks an SM at 92 registers held too few loads in flight for this memory pass
    K.LAUNCH_BOUNDS[id(kernel)] = (NT, max(1, 1024 // NT))
    return kernel


# --------------------------------------------------------------------------------------------------
# host


def _reduced_launch(m, kc, nthr, nt, dt, with_lz):
    """``(kernel, thread blocks per batch entry, column chunks, diagonal blocks)`` of the reduced
    system with ``m`` rows and ``kc`` right-hand sides: :func:`_reduced_small_kernel` for ``m <=
    SMALL_M``, else the blocked :func:`_reduced_kernel`."""
    if m <= SMALL_M:
        cw = min(CW_SMALL, nthr)
        nch = K._cdiv(kc, cw)
        return _reduced_small_kernel(nthr, dt, SMALL_M, cw, with_lz), nch, nch, 1
    mb = K._cdiv(m, NB)
    cw = _reduced_width(mb, nt)
    nch = K._cdiv(kc, cw)
    return _reduced_kernel(nthr, dt, NB, cw, with_lz), nch * mb, nch, mb


INT32 = ("sync", "flags", "rsync")  #: the layouts' int32 buffers, zero at the start of a call


def _source(name):
    """The array a launch argument's name stands for: ``q1`` (a name ending in 1) is the flat view of
    ``q``, anything else itself."""
    return name[:-1] if name.endswith("1") else name


def _pooled_part(B, n, d, dv, b, nt, dt, flags):
    """What both layouts share: ``(m, threads, threads of the per-block kernels, pooled tile, the
    reduced launch (:func:`_reduced_launch`), the pooled part's buffers, its three launches)``;
    ``flags`` names the int32 buffer whose ``[0:3]`` ``means`` sets."""
    m = K._cdiv(n, b)
    nthr = _threads(nt)
    PTl = _pooled_tile()
    npt = K._cdiv(m, PTl)
    ntt = (PTl // 4) ** 2
    bufs = {"qbar": (B, m, d), "kbarT": (B, d, m), "vs": (B, m, dv), "W": (B, m, m), "c": (B, m),
            "psum": (B, npt, m), "Pp": (B, npt, m, dv)}
    launches = [
        (_means_kernel(b, nthr, dt), B * m, nthr, f"q k v scale qbar kbarT vs c {flags}"),
        (_scores_kernel(d, PTl, dt), B * npt * npt, ntt, "qbar kbarT W c"),
        (_softmax_kernel(PTl, dt), B * npt * npt, ntt, "W c vs psum Pp"),
    ]
    return m, nthr, _block_threads(b, nt), PTl, _reduced_launch(m, dv, nthr, nt, dt, True), bufs, launches


def _layout(B, n, d, dv, b, nt, dt):
    """The forward's buffers ``{name: shape}`` (those of :data:`INT32` int32, the rest ``dt``), its
    outputs ``{name: shape}`` and its launches ``[(kernel, grid, threads, argument names)]``; ``q k
    v gamma scale`` name the inputs, a name ending in 1 the flat view of an array (:func:`_source`).
    ``sync[0:3]`` are the non-finite flags of q, k, v."""
    m, nthr, nblk, PTl, (red, rgrid, nch, mb), pbufs, launches = _pooled_part(B, n, d, dv, b, nt, dt, "sync")
    bufs = {"sync": (SYNC_HEAD + B * nch * mb,), **pbufs, "h": (B, n), "rr": (B, m, dv), "g": (B, m),
            "Z": (B, m, dv), "WZ": (B, m, dv)}
    launches += [
        (_rows_kernel(b, d, dv, nblk, PTl, dt), B * m, nblk, "q1 k1 v1 gamma scale c psum Pp X1 h1 rr g"),
        (red, B * rgrid, nthr, "W g rr Z WZ sync"),
        (_combine_kernel(b, dv, nthr, dt), B * m, nthr, "X1 h1 WZ gamma"),
    ]
    return bufs, {"X": (B, n, dv)}, [(kern, grid, nt_, names.split()) for kern, grid, nt_, names in launches]


def _backward_layout(B, n, d, dv, b, nt, dt):
    """The backward's buffers, outputs and launches, as :func:`_layout` (``dy``, ``y`` name the two
    more inputs; ``n`` the sequence length): the pooled part (steps 1-3 of the forward), the
    within-block solve :func:`_bsolve_kernel`, the transposed reduced system (:func:`_flip_kernel`,
    the reduced solver, :func:`_unflip_kernel` of its product ``W^T Z``), :func:`_grads_kernel` and
    the pooled gradients (:func:`_pgrad_kernel`, :func:`_pgrad_apply_kernel`).  ``flags[0:4]`` are
    the non-finite flags of q, k, v, dy, final once the fourth launch has run; ``gsum`` summed over
    its last axis is ``dgamma``."""
    m, nthr, nblk, PTl, (red, rgrid, nch, mb), pbufs, launches = _pooled_part(B, n, d, dv, b, nt, dt, "flags")
    npt = K._cdiv(m, PTl)
    TS, nflip = _flip_tile(nt)
    ntile = K._cdiv(m, TS)
    bufs = {"flags": (SYNC_HEAD,), "rsync": (SYNC_HEAD + B * nch * mb,), **pbufs,
            "Dst": (B, m, b, b), "u": (B, n), "G": (B, n, dv), "hp": (B, n), "rr": (B, m, dv), "gd": (B, m),
            "Lr": (B, m, m), "gr": (B, m), "Rr": (B, m, dv), "Zr": (B, m, dv), "LZr": (B, m, dv),
            "WtZ": (B, m, dv), "Gu": (B, m, dv), "asum": (B, m), "Rsum": (B, m, dv), "gdx": (B, m),
            "Xsum": (B, m, dv), "dqp": (B, npt, m, d), "dkp": (B, npt, m, d), "dvp": (B, npt, m, dv)}
    outputs = {"dq": (B, n, d), "dk": (B, n, d), "dvv": (B, n, dv), "gsum": (B, m)}
    launches += [
        (_bsolve_kernel(b, d, dv, nblk, PTl, dt), B * m, nblk,
         "q1 k1 gamma scale c psum dy1 Dst1 u G1 hp1 rr gd flags"),
        (_flip_kernel(TS, nflip, dt), B * ntile * ntile, nflip, "W gd rr Lr gr Rr"),
        (red, B * rgrid, nthr, "Lr gr Rr Zr LZr rsync"),
        (_unflip_kernel(nthr), _unflip_grid(B, m, dv, nthr), nthr, "LZr WtZ"),
        (_grads_kernel(b, d, dv, nthr, dt), B * m, nthr,
         "q1 k1 v1 y1 gamma scale Dst1 u G1 hp WtZ dq1 dk1 dvv1 Gu asum Rsum gdx Xsum"),
        (_pgrad_kernel(d, dv, PTl, b, dt), B * npt * npt, (PTl // 4) ** 2, "W Gu Rsum asum qbar kbarT n dqp dkp dvp"),
        (_pgrad_apply_kernel(b, d, dv, nthr, PTl, dt), B * m, nthr,
         "dq1 dk1 dvv1 dqp dkp dvp Xsum gdx dy1 y1 gamma scale gsum"),
    ]
    return bufs, outputs, [(kern, grid, nt_, names.split()) for kern, grid, nt_, names in launches]


BWD_FLAGS_AFTER = 3  #: the backward launch after which its non-finite flags are final


def _run(xp, layout, env, dt, after=None, hook=None):
    """Allocate a layout's buffers and outputs with ``xp`` (those ``env`` already holds are used as
    they are), launch its kernels one by one and return ``env``; ``hook()`` runs once launch
    ``after`` is queued.  The plans below launch the same kernels on the same arguments."""
    bufs, outputs, launches = layout
    for name, shape in {**bufs, **outputs}.items():
        if name not in env:
            env[name] = xp.zeros(shape, dtype=np.int32) if name in INT32 else xp.empty(shape, dtype=dt)
    for name in {nm for *_, names in launches for nm in names}:
        if name not in env:
            env[name] = env[_source(name)].reshape(-1)
    for i, (kern, grid, nthr, names) in enumerate(launches):
        K._launch(kern, grid, nthr, None, tuple(env[nm] for nm in names))
        if i == after and hook is not None:
            hook()
    return env


def forward(xp, q, k, v, gamma, b, scale, *, nt=None):
    """Blockwise chain attention (float32): q, k (B, n, d), v (B, n, dv), gamma (B,), ``b <= 64``.

    Returns ``(Y, bad)``: ``bad`` (3,) int32 on the device, non-zero where q, k or v held a
    non-finite value (the caller checks it once everything is queued).
    """
    B, n, d = q.shape
    dt = q.dtype
    env = _run(xp, _layout(B, n, d, v.shape[-1], b, nt, dt),
               {"q": q, "k": k, "v": v, "gamma": gamma, "scale": dt.type(scale)}, dt)
    return env["X"], env["sync"][:3]


def backward(xp, q, k, v, y, dy, gamma, b, scale, flags, *, nt=None, flags_set=None):
    """The float32 blockwise backward from the forward's output ``y``: ``(dq, dk, dv, dgamma)``.
    ``flags`` (``SYNC_HEAD`` int32, zero) gets the non-finite flags of q, k, v, dy in ``[0:4]``;
    ``flags_set()`` is called once the kernel that sets the last of them is queued."""
    B, n, d = q.shape
    dt = q.dtype
    env = {"q": q, "k": k, "v": v, "y": y, "dy": dy, "gamma": gamma, "scale": dt.type(scale), "n": n,
           "flags": flags}
    env = _run(xp, _backward_layout(B, n, d, v.shape[-1], b, nt, dt), env, dt, BWD_FLAGS_AFTER, flags_set)
    return env["dq"], env["dk"], env["dvv"], env["gsum"].sum(axis=-1)


class _Plan:
    """A layout's launches at one shape, as raw parameter words with the pointers left to fill: a
    call then allocates one workspace and the outputs, patches the words and launches, instead of
    building a few dozen arrays and an argument list a launch in Python (0.1-0.5 ms a call).

    ``inputs``: ``{name: (shape, dtype)}`` of the arrays a call passes (their pointers are patched),
    ``consts``: the scalars fixed by the shape (``n``); ``scale`` is patched; ``flags``: ``(buffer,
    count, launch)``: the non-finite flags a checked call copies back once that launch has run."""

    def __init__(self, layout, inputs, consts, dt, flags):
        import cupy

        bufs, self.outputs, launches = layout
        order = [nm for nm in bufs if nm in INT32] + [nm for nm in bufs if nm not in INT32]
        self.offsets = {}
        size = 0
        for name in order:  # 256-byte aligned views of one workspace, the int32 ones first
            self.offsets[name] = size
            size += -(-(math.prod(bufs[name]) * 4) // 256) * 256
            if name in INT32:
                self.zero_bytes = size  # one memset zeroes them all
        self.nbytes = size
        self.dt = dt
        self.flags = flags
        ws = cupy.empty(size, dtype=np.uint8)
        env = {name: cupy.ndarray(shape, dtype=np.int32 if name in INT32 else dt,
                                  memptr=ws.data + self.offsets[name]) for name, shape in bufs.items()}
        env.update({name: cupy.empty(shape, dtype=dt) for name, shape in self.outputs.items()})
        env.update({name: cupy.empty(shape, dtype=idt) for name, (shape, idt) in inputs.items()})
        env.update(consts, scale=dt.type(1))
        built = []
        for kern, grid, nthr, names in launches:
            args = tuple(env[nm] if nm in env else env[_source(nm)].reshape(-1) for nm in names)
            key, words = K._fast_args(args)
            fn = K._BY_KEY.get((id(kern), key))
            if fn is None:
                fn = K._BY_KEY[(id(kern), key)] = K._fast_function(kern, tuple(K._numba_argtype(a) for a in args))
            slots, sources, pos = [], [], 0
            for nm, a in zip(names, args):
                if not K._is_cupy(a):  # a scalar: one word (only ``scale`` changes between calls)
                    if nm == "scale":
                        slots.append(pos)
                        sources.append(nm)
                    pos += 1
                else:
                    slots.append(pos + 4)  # (meminfo, parent, nitems, itemsize, data, shape, strides)
                    sources.append(_source(nm))  # a flat view: the same pointer
                    pos += 5 + 2 * a.ndim
            grid3 = (grid + (1, 1))[:3] if isinstance(grid, tuple) else (grid, 1, 1)
            built.append((fn, grid3, nthr, words, slots, sources))
        # every launch's words in one buffer that the calls patch in place, and each launch's array
        # of pointers to its words built once: a call then costs two NumPy assignments and the
        # cuLaunchKernel calls (the driver copies the words before it returns), not ~10 us a launch
        # of copies and ``ndarray.ctypes`` lookups
        self.words = np.concatenate([w for _, _, _, w, _, _ in built]).astype(np.uint64)
        at = self.words.ctypes.data
        # the words to patch in two groups: the first launch's, then the rest's (patched while the
        # first kernel runs: the device idles until the first launch)
        self.calls, groups, first = [], [([], [], [], []), ([], [], [], [])], 0
        for li, (fn, grid3, nthr, words, slots, sources) in enumerate(built):
            ptrs = np.arange(words.size, dtype=np.uint64) * np.uint64(8) + np.uint64(at + 8 * first)
            self.calls.append((fn, grid3, nthr, ptrs, ptrs.ctypes.data))
            ws_idx, ws_off, arg_idx, arg_src = groups[min(li, 1)]
            for slot, nm in zip(slots, sources):
                if nm in self.offsets:
                    ws_idx.append(first + slot)
                    ws_off.append(self.offsets[nm])
                else:
                    arg_idx.append(first + slot)
                    arg_src.append(nm)
            first += words.size
        self.groups = [(np.array(wi, dtype=np.intp), np.array(wo, dtype=np.uint64), np.array(ai, dtype=np.intp), tuple(src))
                       for wi, wo, ai, src in groups]
        self.scale_bits: dict = {}  # scale -> its float32 bits
        self.lock = threading.Lock()  # the words are shared: one call patches and launches at a time

    def run(self, arrays, scale, check=False):
        """Queue the launches on CuPy's current stream for ``arrays`` (``{input name: CuPy array}``);
        returns ``(outputs, workspace, flags)``: ``flags`` is None, or with ``check`` ``(event, host
        int32 array)``: the event completes once the non-finite flags are in the array.  They are
        final once launch ``self.flags[2]`` has run, so they are copied on a side stream that waits
        for the launches up to that one only: the call then waits for those, not for all of them
        (the wait at the end of the forward cost 0.026 ms a call)."""
        import cupy

        cur = cupy.cuda.get_current_stream()
        stream = cur.ptr
        ws = cupy.empty(self.nbytes, dtype=np.uint8)
        base = np.uint64(ws.data.ptr)
        bits = self.scale_bits.get(scale)
        if bits is None:
            bits = self.scale_bits[scale] = int(np.float32(scale).view(np.uint32))
        ptr = {nm: a.data.ptr for nm, a in arrays.items()}
        ptr["scale"] = bits
        launch = cupy.cuda.driver.launchKernel
        fname, count, after = self.flags
        flags = None
        words = self.words
        with self.lock:
            ws_idx, ws_off, arg_idx, arg_src = self.groups[0]
            words[ws_idx] = ws_off + base
            words[arg_idx] = [ptr[nm] for nm in arg_src]
            cupy.cuda.runtime.memsetAsync(int(base), 0, self.zero_bytes, stream)
            fn, grid3, nthr, _, params = self.calls[0]
            launch(fn.ptr, grid3[0], grid3[1], grid3[2], nthr, 1, 1, 0, stream, params, 0)
            if check and after == 0:
                flags = copy_flags_after(cur, int(base) + self.offsets[fname], count)
            outs = {name: cupy.empty(shape, dtype=self.dt) for name, shape in self.outputs.items()}
            ptr.update((name, a.data.ptr) for name, a in outs.items())
            ws_idx, ws_off, arg_idx, arg_src = self.groups[1]
            words[ws_idx] = ws_off + base
            words[arg_idx] = [ptr[nm] for nm in arg_src]
            for i in range(1, len(self.calls)):
                fn, grid3, nthr, _, params = self.calls[i]
                launch(fn.ptr, grid3[0], grid3[1], grid3[2], nthr, 1, 1, 0, stream, params, 0)
                if check and i == after:
                    flags = copy_flags_after(cur, int(base) + self.offsets[fname], count)
        return outs, ws, flags


_SIDE: dict = {}  #: device id -> the side stream that copies the non-finite flags back


def copy_flags_after(stream, src, count=3):
    """Copy ``count`` int32 flags at device address ``src`` to pinned host memory on a side stream,
    once the work queued so far on ``stream`` is done; returns ``(event, flags)`` (wait on the
    event before reading the flags).  The side stream is one per device, created on first use."""
    import cupy

    dev = cupy.cuda.runtime.getDevice()
    side = _SIDE.get(dev)
    if side is None:
        side = _SIDE[dev] = cupy.cuda.Stream(non_blocking=True)
    mem = cupy.cuda.alloc_pinned_memory(4 * count)
    flags = np.frombuffer(mem, dtype=np.int32, count=count)
    ready = cupy.cuda.Event(disable_timing=True)
    ready.record(stream)
    side.wait_event(ready)
    cupy.cuda.runtime.memcpyAsync(flags.ctypes.data, src, 4 * count, cupy.cuda.runtime.memcpyDeviceToHost,
                                  side.ptr)
    done = cupy.cuda.Event(disable_timing=True)
    done.record(side)
    return done, flags


_PLANS: dict = {}


def _planned(*arrays):
    """Whether the plans below may run on these arrays: C-contiguous CuPy arrays on a real device
    (the simulator, or another layout, takes the launches one by one)."""
    return not K._simulated() and all(K._is_cupy(x) and x.flags.c_contiguous for x in arrays)


def _plan(key, make):
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) >= 32:
            _PLANS.clear()
        plan = _PLANS[key] = make()
    return plan


def forward_checked(xp, q, k, v, gamma, b, scale, *, nt=None, check=True):
    """:func:`forward`, then one synchronisation that raises ``ValueError`` for non-finite input
    (``check=False``: no synchronisation, the call returns as soon as the launches are queued)."""
    if nt is not None or not _planned(q, k, v, gamma):
        y, bad = forward(xp, q, k, v, gamma, b, scale, nt=nt)
        if check:
            raise_nonfinite(bad.get() if hasattr(bad, "get") else bad)
        return y
    import cupy

    return run_plan(q, k, v, gamma, b, scale, cupy.cuda.runtime.getDevice(), check)


def run_plan(q, k, v, gamma, b, scale, device, check=True):
    """The forward through its launch plan: ``q, k, v`` C-contiguous float32 CuPy arrays (B, n, d) and
    (B, n, dv) on ``device`` (the current one), ``gamma`` (B,) float32 there, ``b <= MAX_BLOCK``; the
    inputs are not checked here (:func:`forward_checked` and ``_api.chain_attention_fast`` do)."""
    B, n, d = q.shape
    dv = v.shape[2]
    dt = q.dtype

    def make():
        inputs = {"q": ((B, n, d), dt), "k": ((B, n, d), dt), "v": ((B, n, dv), dt), "gamma": ((B,), dt)}
        return _Plan(_layout(B, n, d, dv, b, None, dt), inputs, {}, dt, ("sync", 3, 0))

    plan = _plan(("fwd", B, n, d, dv, b, device), make)
    outs, ws, flags = plan.run({"q": q, "k": k, "v": v, "gamma": gamma}, scale, check)
    if not check:
        return outs["X"]  # the workspace goes back to CuPy's pool, reusable by later work on this stream only
    done, bad = flags
    done.synchronize()  # the flags are in: means has run (the rest of the forward may still run)
    raise_nonfinite(bad)
    return outs["X"]


def run_backward_plan(q, k, v, y, dy, gamma, b, scale, device, check=True):
    """The backward through its launch plan, on arrays as :func:`run_plan` takes them and ``y``, ``dy``
    shaped as ``v``: ``(dq, dk, dv, dgamma, flags)``, ``flags`` the non-finite flags of q, k, v, dy
    on the host (None without ``check``), read once the kernel that sets the last of them has run."""
    B, n, d = q.shape
    dv = v.shape[2]
    dt = q.dtype

    def make():
        inputs = {"q": ((B, n, d), dt), "k": ((B, n, d), dt), "v": ((B, n, dv), dt), "y": ((B, n, dv), dt),
                  "dy": ((B, n, dv), dt), "gamma": ((B,), dt)}
        return _Plan(_backward_layout(B, n, d, dv, b, None, dt), inputs, {"n": n}, dt,
                     ("flags", 4, BWD_FLAGS_AFTER))

    plan = _plan(("bwd", B, n, d, dv, b, device), make)
    outs, ws, flags = plan.run({"q": q, "k": k, "v": v, "y": y, "dy": dy, "gamma": gamma}, scale, check)
    dgamma = outs["gsum"].sum(axis=-1)
    bad = None
    if check:
        done, bad = flags
        done.synchronize()
    return outs["dq"], outs["dk"], outs["dvv"], dgamma, bad


def pooled(xp, q, k, v, b, scale, flags, *, nt=None):
    """The pooled part alone (the backward's first three launches): ``(c, W, psum, qbar, kbarT)``,
    ``c`` and ``W`` as :func:`._blockwise.pooled_scores` gives them, ``psum`` the tiles' row sums
    (:func:`_pooled_stats` reads them), ``qbar`` scaled by ``scale``, ``kbar`` transposed.
    ``flags[0:3]`` (int32, zeroed by the caller) are set where q, k or v holds a non-finite value."""
    B, n, d = q.shape
    dt = q.dtype
    *_, bufs, launches = _pooled_part(B, n, d, v.shape[2], b, nt, dt, "flags")
    env = {"q": q, "k": k, "v": v, "scale": dt.type(scale), "flags": flags}
    env = _run(xp, (bufs, {}, [(kern, grid, nt_, names.split()) for kern, grid, nt_, names in launches]), env, dt)
    return env["c"], env["W"], env["psum"], env["qbar"], env["kbarT"]


def reduced_solve(xp, L, g, R, *, with_product=False, nt=None):
    """``Z = (I - diag(g) L)^{-1} R`` for C-contiguous float32 ``L`` (B, m, m) strictly lower (its
    upper part is not read), ``g`` (B, m), ``R`` (B, m, k): :func:`_reduced_kernel` (or
    :func:`_reduced_small_kernel` for ``m <= SMALL_M``) in one launch.
    ``with_product``: ``(Z, L Z)``."""
    B, m, kc = R.shape
    nthr = _threads(nt)
    kern, grid, nch, mb = _reduced_launch(m, kc, nthr, nt, np.dtype(R.dtype), with_product)
    Z = xp.empty((B, m, kc), dtype=R.dtype)
    LZ = xp.empty((B, m, kc) if with_product else (1, 1, 1), dtype=R.dtype)  # not touched unless wanted
    sync = xp.zeros(SYNC_HEAD + B * nch * mb, dtype=np.int32)
    K._launch(kern, B * grid, nthr, None, (L, g, R, Z, LZ, sync))
    return (Z, LZ) if with_product else Z


def reduced_solve_transposed(xp, W, g, R, *, with_product=False, nt=None):
    """``Z = (I - diag(g) W^T)^{-1} R`` for C-contiguous float32 ``W`` (B, m, m) strictly lower (its
    upper part is not read): :func:`_flip_kernel`, :func:`reduced_solve` on the reversed lower system
    and :func:`_unflip_kernel` (the backward's launches 5-7).  ``with_product``: ``(Z, W^T Z)``."""
    B, m, kc = R.shape
    dt = np.dtype(R.dtype)
    TS, nflip = _flip_tile(nt)
    Lr = xp.empty((B, m, m), dtype=dt)
    gr = xp.empty((B, m), dtype=dt)
    Rr = xp.empty((B, m, kc), dtype=dt)
    K._launch(_flip_kernel(TS, nflip, dt), B * K._cdiv(m, TS) ** 2, nflip, None, (W, g, R, Lr, gr, Rr))
    out = reduced_solve(xp, Lr, gr, Rr, with_product=with_product, nt=nt)
    nthr = _threads(nt)
    back = []
    for x in out if with_product else (out,):
        y = xp.empty_like(x)
        K._launch(_unflip_kernel(nthr), _unflip_grid(B, m, kc, nthr), nthr, None, (x, y))
        back.append(y)
    return tuple(back) if with_product else back[0]


def raise_nonfinite(bad, names=("q", "k", "v")):
    """Raise the CPU layer's ``ValueError`` for the first array flagged non-finite (``bad``: one
    truth value per name; from :func:`forward`'s kernels or ``_api._all_finite``'s reductions)."""
    from .._validate import nonfinite_error

    for name, flag in zip(names, (int(x) for x in bad)):
        if flag:
            raise nonfinite_error(name)
