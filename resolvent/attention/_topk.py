"""Blockwise chain attention with per-token block-sparse links (SPEC 2.3, ``method="blockwise"``, ``topk>0``).

Query t in block I keeps exact token-level weights to its own block (``s <= t``) and to the ``k``
earlier blocks ``sel(t)`` whose mean key it scores highest (``scale q_t . kbar_J``, ties to the later
block), and the pooled weight ``exp(sigma_IJ)`` (``sigma_IJ = scale qbar_I . kbar_J``) for every key of
every other earlier block.  ``I - gamma Ahat`` is lower triangular, so block forward substitution
solves ``(I - gamma Ahat) X = Ahat V``.  With ``Z = V + gamma X`` the right-hand side of block I only
needs finished blocks::

    X_I = (I - gamma Ahat_II)^{-1} ( Ahat_II V_I + sum_{J<I} Ahat_IJ Z_J ),     Y = (1 - gamma) X.

``sum_{J<I} Ahat_IJ Z_J`` has two parts:

* exact links, pushed: once block J is solved, every later row t with ``J in sel(t)`` receives
  ``exp(S_tJ - mu_t) Z_J`` (one batched product over all those rows).  Each row keeps an online
  log-sum-exp (running max ``mu_t``, sum ``ell_t``, accumulator ``acc_t``), rescaled when its max
  moves, so every exponent is ``<= 0`` and the row's normaliser is complete when its block comes up;
* the pooled residue, pulled with the running block sums ``c_J = sum_{s in B_J} Z_s``:
  ``sum_{J<I, J not in sel(t)} exp(sigma_IJ - mu_t) c_J``, one ``(b x I) @ (I x dv)`` product per
  block with the row's selected entries zeroed.  (Writing it as the pooled sum over all earlier
  blocks minus the selected ones costs less but cancels catastrophically when the selected blocks
  carry most of the pooled weight; see ``docs/topk.md``.)

Costs: selection O(n m d), exact links O(n k b (d + dv)), own blocks O(n b (d + dv) + m b^3),
pooled residue O(n m dv); memory O(n (d + dv) + n k + m^2) plus one block's work arrays.
The Python loops run over the m blocks; batch, heads, the rows of a block and the columns of V are
vectorised.  ``n`` need not be a multiple of ``b``: inputs are padded with zero rows, padded keys
only ever sit in the last block (never an earlier block of anyone) and are masked by causality,
and padded rows select nothing and are dropped at the end.
"""

from __future__ import annotations

import contextlib
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from scipy.linalg import get_blas_funcs


_BLAS_CONTROLLER = None
PARALLEL_MIN = 1 << 20  # B * n * (d + dv) from which the batch is split over the cores


def _one_blas_thread():
    """A context in which BLAS runs on one thread, when ``threadpoolctl`` is installed.

    The loop below issues a few hundred small products and triangular solves; OpenBLAS threads
    them, and when the cores are shared its spinning threads wait on each other: on the 2-core
    benchmark machine under load, n = 4096 took 9.3 s with 2 BLAS threads and 0.18 s with one.
    The cores are used instead by splitting the batch over threads (see :func:`forward`).  The
    limit is process-wide while it lasts, as every BLAS thread setting is.
    """
    global _BLAS_CONTROLLER
    if _BLAS_CONTROLLER is None:
        try:
            from threadpoolctl import ThreadpoolController
        except ImportError:
            _BLAS_CONTROLLER = False
        else:
            _BLAS_CONTROLLER = ThreadpoolController()
    if _BLAS_CONTROLLER is False:
        return contextlib.nullcontext()
    return _BLAS_CONTROLLER.limit(limits=1, user_api="blas")


def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
    """(B, n, c) -> (B, rows, c), zero rows appended."""
    B, n, c = x.shape
    if rows == n:
        return x
    out = np.zeros((B, rows, c), dtype=x.dtype)
    out[:, :n] = x
    return out


def _select(qs, kbar, b, m, n, topk, chunk_elems=1 << 21):
    """Per-token block choice.

    Parameters
    ----------
    qs : (B, m*b, d) scaled, padded queries.
    kbar : (B, m, d) mean keys.

    Returns
    -------
    sel : (B, m*b, kk) int64 with ``kk = min(topk, m - 1)``: the blocks each row selected among
        the earlier ones, by decreasing score ``qs_t . kbar_J``, ties to the later block; ``m``
        in unused slots (rows of blocks with fewer than ``kk`` earlier blocks, padded rows).
    """
    B, N, _ = qs.shape
    kk = min(topk, m - 1)
    sel = np.full((B, N, kk), m, dtype=np.int64)
    # candidate columns reversed (column c is block m - 1 - c), so that argmax, which returns
    # the first maximum, prefers the later block; a block is a candidate for rows of later blocks
    kbar_r = np.ascontiguousarray(kbar[:, ::-1])
    blocks_r = np.arange(m - 1, -1, -1)
    rows_per = max(b, (chunk_elems // (B * m)) // b * b)
    for r0 in range(b, N, rows_per):  # block 0 has no earlier block
        r1 = min(N, r0 + rows_per)
        P = qs[:, r0:r1] @ np.swapaxes(kbar_r, -1, -2)  # (B, R, m)
        np.copyto(P, -np.inf, where=blocks_r[None, None, :] >= (np.arange(r0, r1) // b)[None, :, None])
        flat = P.reshape(-1, m)
        base = np.arange(flat.shape[0]) * m
        for j in range(kk):
            c = np.argmax(flat, axis=-1)
            picked = flat.reshape(-1)[base + c]
            sel[:, r0:r1, j] = np.where(picked > -np.inf, m - 1 - c, m).reshape(B, r1 - r0)
            flat.reshape(-1)[base + c] = -np.inf
    if N > n:
        sel[:, n:] = m  # padded rows take no exact links
    return sel


def _groups(sel, m, stride):
    """Rows grouped by the block they selected, padded across the batch.

    Returns ``(F, off, rmax)``: the rows of batch entry z that selected block J are
    ``F[z, off[J]:off[J] + rmax[J]]``, as flat indices ``z * stride + t`` into arrays of shape
    ``(B * stride, ...)``; padded slots point at ``z * stride + stride - 1``, a scratch row.
    """
    B, N, kk = sel.shape
    keys = sel.reshape(B, N * kk)
    tok = np.arange(N * kk, dtype=np.int64) // kk
    # small integer keys: NumPy's stable sort is a radix sort for 16-bit types
    order = np.argsort(keys.astype(np.int16) if m < 2**15 - 1 else keys, axis=1, kind="stable")
    skeys = np.take_along_axis(keys, order, axis=1)
    counts = np.bincount((keys + (m + 1) * np.arange(B)[:, None]).ravel(), minlength=B * (m + 1))
    counts = counts.reshape(B, m + 1)
    starts = np.cumsum(counts, axis=1) - counts  # first sorted position of each key, per z
    rank = np.arange(N * kk)[None, :] - np.take_along_axis(starts, skeys, axis=1)
    rmax = counts[:, :m].max(axis=0)
    off = np.concatenate([[0], np.cumsum(rmax)])
    base = stride * np.arange(B, dtype=np.int64)[:, None]
    F = np.broadcast_to(base + (stride - 1), (B, int(off[-1]))).copy()
    valid = skeys < m
    zi = np.broadcast_to(np.arange(B)[:, None], skeys.shape)[valid]
    F[zi, off[skeys[valid]] + rank[valid]] = tok[order[valid]] + stride * zi
    return F, off, rmax


def _setup(q, k, b, topk, scale):
    """Shared by :func:`forward` and :func:`kept_mass`: padded, scaled queries, block means and groups."""
    B, n, d = q.shape
    m = -(-n // b)
    N = m * b
    dt = q.dtype
    qs = np.zeros((B, N + 1, d), dtype=dt)  # one extra zero row: the target of padded group slots
    np.multiply(q, dt.type(scale), out=qs[:, :n])
    kp = _pad_rows(k, N)
    sizes = np.full(m, b, dtype=dt)
    sizes[-1] = n - (m - 1) * b
    kb = kp.reshape(B, m, b, d)
    kbar = kb.sum(axis=2) / sizes[:, None]
    sel = _select(qs[:, :N], kbar, b, m, n, topk)
    F, off, rmax = _groups(sel, m, stride=N + 1)
    return qs, kb, kbar, sizes, sel, F, off, rmax


def _lower_solver(dt, B):
    """A solver for stacks of lower-triangular blocks ``M X = R`` into ``out``: (B, b, b), (B, b, c).

    BLAS ``trsm`` per batch entry: on (8, 64, 64) blocks with 64 columns it takes 0.12 ms against
    1.2 ms for ``numpy.linalg.solve`` (an LU per block, single-threaded OpenBLAS, this CPU); for a
    large batch of small blocks the one gufunc call of ``numpy.linalg.solve`` wins.
    """
    if B > 64:

        def solve_stack(M, R, out):
            out[...] = np.linalg.solve(M, R)

        return solve_stack
    trsm = get_blas_funcs("trsm", dtype=dt)

    def solve(M, R, out):
        for z in range(M.shape[0]):
            # X^T M^T = R^T: row-major (b, c) blocks are Fortran-ordered transposes, no copies
            out[z] = trsm(1.0, M[z].T, R[z].T, side=1, lower=0).T

    return solve


def forward(q, k, v, gamma, b, topk, scale):
    """Chain attention on the SPEC 2.3 matrix: q, k (B, n, d), v (B, n, dv), gamma (B,) -> (B, n, dv).

    ``b`` is the block size (``1 <= b <= n``), ``topk >= 1`` (``topk = 0`` runs too and gives the
    pooled operator of SPEC 2.2, a cross-check for the tests).  Computes in the dtype of ``q``.
    """
    B, n, d = q.shape
    # threads pay off once each slice holds real work (about a millisecond of it)
    workers = min(B, _workers()) if B * n * (d + v.shape[-1]) >= PARALLEL_MIN else 1
    with _one_blas_thread():
        if workers < 2:
            return _forward(q, k, v, gamma, b, topk, scale)
        # batch entries are independent: one slice per core, NumPy releases the GIL in the heavy calls
        cuts = np.linspace(0, B, workers + 1).astype(int)
        parts = [slice(cuts[i], cuts[i + 1]) for i in range(workers)]
        with ThreadPoolExecutor(workers) as ex:
            ys = list(ex.map(lambda s: _forward(q[s], k[s], v[s], gamma[s], b, topk, scale), parts))
        return np.concatenate(ys, axis=0)


def _workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _forward(q, k, v, gamma, b, topk, scale):
    B, n, d = q.shape
    dv = v.shape[-1]
    dt = q.dtype
    qs, kb, kbar, sizes, sel, F, off, rmax = _setup(q, k, b, topk, scale)
    m = kb.shape[1]
    N = m * b
    vb = _pad_rows(v, N).reshape(B, m, b, dv)
    qb = qs[:, :N].reshape(B, m, b, d)
    qs_f = qs.reshape(B * (N + 1), d)
    # pooled scores sigma_IJ from the mean queries (scale already in qs)
    qbar = qb.sum(axis=2) / sizes[:, None]
    sigma = qbar @ np.swapaxes(kbar, -1, -2)  # (B, m, m); only J < I is used
    g = gamma.astype(dt, copy=False).reshape(B, 1, 1)
    kk = sel.shape[-1]
    lower_solve = _lower_solver(dt, B)

    # per-row online log-sum-exp state, flat over (batch, row), row N of each batch entry scratch:
    # columns [acc (dv) | ell | mu]: acc = sum_s exp(w_ts - mu_t) Z_s, ell = sum_s exp(w_ts - mu_t)
    # over the exact links received so far, mu the running max (one array: one gather, one scatter)
    st = np.zeros((B, N + 1, dv + 2), dtype=dt)
    st[..., dv + 1] = -np.inf
    st_f = st.reshape(-1, dv + 2)
    cZ = np.empty((B, m, dv), dtype=dt)  # block sums of Z = V + gamma X
    Y = np.empty((B, N, dv), dtype=dt)
    causal = np.where(np.tri(b, dtype=bool), 0.0, -np.inf).astype(dt)
    eye = np.eye(b, dtype=dt)
    # flat positions of each row's selected entries in a (B, b, I + 1) buffer (column I: unused slots)
    rowbase = np.arange(B * b, dtype=np.int64).reshape(B, b, 1)
    for I in range(m):
        rows = slice(I * b, (I + 1) * b)
        # own block, causal inside
        S = qb[:, I] @ np.swapaxes(kb[:, I], -1, -2)  # (B, b, b)
        S += causal
        mu_old = st[:, rows, dv + 1]
        mu_new = np.maximum(mu_old, S.max(axis=-1))  # finite: the diagonal is there
        pooled = I > kk
        if pooled:
            # the pooled residue: the earlier blocks the row did not select
            Wt = np.empty((B, b, I + 1), dtype=dt)
            Wt[..., :I] = sigma[:, I, None, :I]
            Wt.reshape(-1)[rowbase * (I + 1) + np.minimum(sel[:, rows], I)] = -np.inf
            Wt = Wt[..., :I]
            np.maximum(mu_new, Wt.max(axis=-1), out=mu_new)
            Wt -= mu_new[..., None]
            np.exp(Wt, out=Wt)
        alpha = np.exp(mu_old - mu_new)  # 0 where the row had nothing yet
        ell_I = st[:, rows, dv] * alpha
        acc_I = st[:, rows, :dv] * alpha[..., None]
        if pooled:
            ell_I += Wt.sum(axis=-1) * b  # earlier blocks are full
            acc_I += Wt @ cZ[:, :I]
        S -= mu_new[..., None]
        np.exp(S, out=S)
        ell_I += S.sum(axis=-1)
        inv = 1.0 / ell_I[..., None]
        acc_I += S @ vb[:, I]
        acc_I *= inv  # = (Ahat V)_I + gamma sum_{J<I} Ahat_IJ X_J
        S *= -g * inv  # -gamma Ahat_II
        S += eye
        X = Y[:, rows]
        lower_solve(S, acc_I, X)
        if I == m - 1:
            break
        Z = g * X
        Z += vb[:, I]  # Z = V + gamma X
        cZ[:, I] = Z.sum(axis=1)
        # push block I's exact links to the later rows that selected it
        R = rmax[I]
        if R == 0:
            continue
        idx = F[:, off[I] : off[I] + R]  # (B, R) flat row indices
        Sg = np.take(qs_f, idx, axis=0) @ np.swapaxes(kb[:, I], -1, -2)  # (B, R, b)
        sg = np.take(st_f, idx, axis=0)  # (B, R, dv + 2)
        mu_g = sg[..., dv + 1]
        mu_n = np.maximum(mu_g, Sg.max(axis=-1))
        a = np.exp(mu_g - mu_n)
        Sg -= mu_n[..., None]
        np.exp(Sg, out=Sg)
        sg[..., : dv + 1] *= a[..., None]
        sg[..., dv] += Sg.sum(axis=-1)
        sg[..., :dv] += Sg @ Z
        sg[..., dv + 1] = mu_n
        st_f[idx] = sg
    Y *= 1 - g
    return Y[:, :n]


def kept_mass(q, k, b, topk, scale, lse):
    """Dense attention mass on the exact part of ``Ahat`` (own block ``s <= t`` plus selected blocks).

    q, k (B, n, d), lse (B, n) the dense row log-sum-exp (``log sum_{s<=t} exp(scale q_t . k_s)``).
    Returns (B, n) float64.
    """
    q = np.asarray(q, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    B, n, d = q.shape
    qs, kb, _, _, _, F, off, rmax = _setup(q, k, b, topk, scale)
    m = kb.shape[1]
    N = m * b
    lse_p = np.zeros((B, N + 1), dtype=np.float64)
    lse_p[:, :n] = lse
    kept = np.zeros((B, N + 1), dtype=np.float64)
    qs_f, lse_f, kept_f = qs.reshape(B * (N + 1), d), lse_p.reshape(-1), kept.reshape(-1)
    qb = qs[:, :N].reshape(B, m, b, d)
    tri = np.tri(b, dtype=bool)
    for I in range(m):
        rows = slice(I * b, (I + 1) * b)
        S = qb[:, I] @ np.swapaxes(kb[:, I], -1, -2)
        S[:, ~tri] = -np.inf
        kept[:, rows] += np.exp(S - lse_p[:, rows, None]).sum(axis=-1)
        R = rmax[I]
        if I == m - 1 or R == 0:
            continue
        idx = F[:, off[I] : off[I] + R]
        Sg = np.take(qs_f, idx, axis=0) @ np.swapaxes(kb[:, I], -1, -2)
        # rows are unique within a group; only the scratch row repeats, and it is dropped
        kept_f[idx] = kept_f[idx] + np.exp(Sg - lse_f[idx][..., None]).sum(axis=-1)
    return kept[:, :n]
