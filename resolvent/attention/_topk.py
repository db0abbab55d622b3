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
``n`` need not be a multiple of ``b``: inputs are padded with zero rows, padded keys only ever sit
in the last block (never an earlier block of anyone) and are masked by causality, and padded rows
select nothing and are dropped at the end.

Two implementations of the forward pass compute the same numbers:

* the fused Numba kernel (``resolvent/_cpu/_topk.py``, used when Numba is installed; switch:
  :data:`USE_NUMBA`): one parallel iteration per batch entry walks the rows in order, with the
  exact links pushed and the own block and pooled residue pulled as described above, and the block
  solve done row by row; the selection is a second kernel.  No Python runs per block.
* the NumPy path below (:func:`_forward`): the Python loop runs over the m blocks; batch, heads,
  the rows of a block and the columns of V are vectorised, about 25 NumPy calls per block.  At
  batch x heads = 8, n = 4096 that call overhead, not the arithmetic, was its time.

The backward pass (:func:`backward`; a third Numba kernel, or NumPy in :func:`_backward`) solves
``G = (I - gamma Ahat)^{-T} (1 - gamma) dY`` by block
*backward* substitution in the same cost class: later rows reach block J through their exact links
(pulled from the same groups) and through their pooled weights, which are equal for every key of J
and so are carried by a running per-block accumulator; see :func:`_backward` and ``docs/topk.md``
section 8.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy.linalg import get_blas_funcs

from .._threads import one_blas_thread, split_batch


# None: use the fused Numba kernel when Numba imports; True/False force a path (tests cover both).
USE_NUMBA: bool | None = None


def use_numba() -> bool:
    """The fused Numba kernel runs when Numba is installed, unless ``USE_NUMBA`` is set to False."""
    if USE_NUMBA is not None:
        return USE_NUMBA
    from .._cpu import available

    return available()


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


class _Layout(NamedTuple):
    """What :func:`_forward`, :func:`_backward` and :func:`kept_mass` share (a function of q, k only).

    ``qs`` (B, m b + 1, d): scaled queries, zero-padded, plus one zero scratch row (the target of
    padded group slots); ``kb`` (B, m, b, d) keys in blocks; ``kbar`` (B, m, d) mean keys; ``sizes``
    (m,) the real block sizes; ``sel`` (B, m b, kk) the selection; ``F, off, rmax`` the push groups
    (:func:`_groups`); ``qbar`` (B, m, d) mean scaled queries; ``sigma`` (B, m, m) pooled scores.
    """

    qs: np.ndarray
    kb: np.ndarray
    kbar: np.ndarray
    sizes: np.ndarray
    sel: np.ndarray
    F: np.ndarray
    off: np.ndarray
    rmax: np.ndarray
    qbar: np.ndarray
    sigma: np.ndarray


def _block_sizes(n, b, dt):
    """(m,) the real block sizes (the last block may be shorter)."""
    m = -(-n // b)
    sizes = np.full(m, b, dtype=dt)
    sizes[-1] = n - (m - 1) * b
    return sizes


def _mean_keys(k, b, sizes):
    """(B, m, d) mean keys; also ``(B, m, b, d)`` the padded keys in blocks.  One expression for both
    paths and for every caller, so that the forward and the backward choose the same blocks."""
    B, n, d = k.shape
    m = sizes.shape[0]
    kb = _pad_rows(k, m * b).reshape(B, m, b, d)
    return kb.sum(axis=2) / sizes[:, None], kb


def _choose(q, qs, kbar, b, m, n, topk, scale):
    """The selection (B, m b, kk), by the Numba kernel (from ``q``) or by :func:`_select` (from the
    scaled, padded queries ``qs``) as :func:`use_numba` says."""
    if use_numba():
        from .._cpu._topk import select

        return select(q, kbar, b, topk, scale)
    return _select(qs[:, : m * b], kbar, b, m, n, topk)


def _setup(q, k, b, topk, scale) -> _Layout:
    """Padded, scaled queries, block means, the selection, its push groups and the pooled scores."""
    B, n, d = q.shape
    m = -(-n // b)
    N = m * b
    dt = q.dtype
    qs = np.zeros((B, N + 1, d), dtype=dt)  # one extra zero row: the target of padded group slots
    np.multiply(q, dt.type(scale), out=qs[:, :n])
    sizes = _block_sizes(n, b, dt)
    kbar, kb = _mean_keys(k, b, sizes)
    sel = _choose(q, qs, kbar, b, m, n, topk, scale)
    F, off, rmax = _groups(sel, m, stride=N + 1)
    # pooled scores sigma_IJ from the mean queries (scale already in qs); only J < I is used
    qbar = qs[:, :N].reshape(B, m, b, d).sum(axis=2) / sizes[:, None]
    sigma = qbar @ np.swapaxes(kbar, -1, -2)
    return _Layout(qs, kb, kbar, sizes, sel, F, off, rmax, qbar, sigma)


def _own_scores(L: _Layout, I: int, causal: np.ndarray) -> np.ndarray:
    """(B, b, b) scaled scores of block I against itself, ``-inf`` above the diagonal."""
    b = L.kb.shape[2]
    S = L.qs[:, I * b : (I + 1) * b] @ np.swapaxes(L.kb[:, I], -1, -2)
    S += causal
    return S


def _pooled_logits(L: _Layout, I: int, rowbase: np.ndarray) -> np.ndarray:
    """(B, b, I): ``sigma_IJ`` for the rows of block I and J < I, ``-inf`` where the row selected J.

    ``rowbase`` is ``arange(B * b).reshape(B, b, 1)``.  Masking the selected blocks (rather than
    subtracting their terms later) keeps the pooled residue free of cancellation (docs/topk.md, 2).
    """
    B, _, b, _ = L.kb.shape
    Wt = np.empty((B, b, I + 1), dtype=L.sigma.dtype)  # column I: the target of unused slots
    Wt[..., :I] = L.sigma[:, I, None, :I]
    Wt.reshape(-1)[rowbase * (I + 1) + np.minimum(L.sel[:, I * b : (I + 1) * b], I)] = -np.inf
    return Wt[..., :I]


def _gather_scores(L: _Layout, J: int):
    """The rows that selected block J: flat indices ``idx`` (B, R) and their scores (B, R, b)."""
    R = L.rmax[J]
    idx = L.F[:, L.off[J] : L.off[J] + R]
    Qg = np.take(L.qs.reshape(-1, L.qs.shape[-1]), idx, axis=0)
    return idx, Qg, Qg @ np.swapaxes(L.kb[:, J], -1, -2)


def _lower_solver(dt, B, trans=False):
    """A solver for stacks of lower-triangular blocks ``M X = R`` (``M^T X = R`` with ``trans``) into
    ``out``: (B, b, b), (B, b, c).

    BLAS ``trsm`` per batch entry: on (8, 64, 64) blocks with 64 columns it takes 0.12 ms against
    1.2 ms for ``numpy.linalg.solve`` (an LU per block, single-threaded OpenBLAS, this CPU); for a
    large batch of small blocks the one gufunc call of ``numpy.linalg.solve`` wins.
    """
    if B > 64:

        def solve_stack(M, R, out):
            out[...] = np.linalg.solve(np.swapaxes(M, -1, -2) if trans else M, R)

        return solve_stack
    trsm = get_blas_funcs("trsm", dtype=dt)
    ta = int(trans)

    def solve(M, R, out):
        for z in range(M.shape[0]):
            # X^T M^T = R^T (or X^T M = R^T): row-major (b, c) blocks are Fortran-ordered
            # transposes, and M[z].T is M^T in Fortran order, an upper-triangular matrix: no copies
            out[z] = trsm(1.0, M[z].T, R[z].T, side=1, lower=0, trans_a=ta).T

    return solve


def forward(q, k, v, gamma, b, topk, scale):
    """Chain attention on the SPEC 2.3 matrix: q, k (B, n, d), v (B, n, dv), gamma (B,) -> (B, n, dv).

    ``b`` is the block size (``1 <= b <= n``), ``topk >= 1`` (``topk = 0`` runs too and gives the
    pooled operator of SPEC 2.2, a cross-check for the tests).  Computes in the dtype of ``q``.
    """
    B, n, d = q.shape
    if use_numba():
        with one_blas_thread():
            return _forward_numba(q, k, v, gamma, b, topk, scale)[0]
    return split_batch(_forward, (q, k, v, gamma), (b, topk, scale), B * n * (d + v.shape[-1]))


def _numba_layout(q, k, b, topk, scale):
    """What the fused kernels share: block sizes, mean keys, scaled mean queries, the pooled scores
    ``sigma`` (B, m, m) and the selection (by the Numba kernel)."""
    from .._cpu._topk import select

    n = q.shape[1]
    dt = q.dtype
    sizes = _block_sizes(n, b, dt)
    kbar, _ = _mean_keys(k, b, sizes)
    qbar, _ = _mean_keys(q, b, sizes)
    qbar *= dt.type(scale)
    sigma = qbar @ np.swapaxes(kbar, -1, -2)
    return sizes, kbar, qbar, sigma, select(q, kbar, b, topk, scale)


def _forward_numba(q, k, v, gamma, b, topk, scale, values=True, layout=None):
    """The fused kernel (``resolvent/_cpu/_topk.py``) on the whole batch (its threads run over it).

    Returns ``(Y, sel, mu, ell)``: the output (None without ``values``, when only the row statistics
    are wanted), the selection and each row's final shift and normaliser (B, m b), as :func:`_forward`
    with ``stats`` leaves them.
    """
    from .._cpu._topk import forward as fused

    _, _, _, sigma, sel = layout or _numba_layout(q, k, b, topk, scale)
    y, mu, ell = fused(q, k, v, gamma, sel, sigma, b, scale, values=values)
    return y, sel, mu, ell


def _backward_numba(q, k, v, gamma, b, topk, scale, dy, y=None):
    """:func:`backward` by the fused kernels: the forward's (or, given ``y``, only its row
    statistics), then the backward kernel; the pooled scores' gradient reaches ``q`` and ``k``
    through the block means here."""
    from .._cpu._topk import backward as fused_backward

    from ._blockwise import _add_per_block

    dt = q.dtype
    layout = _numba_layout(q, k, b, topk, scale)
    sizes, kbar, qbar, sigma, sel = layout
    y_new, _, mu, ell = _forward_numba(q, k, v, gamma, b, topk, scale, values=y is None, layout=layout)
    y = y_new if y is None else y
    dq, dk, dvv, dsigma = fused_backward(q, k, v, gamma, dy, y, sel, sigma, mu, ell, b, scale)
    # sigma_IJ = qbar_I . kbar_J with the scale inside qbar
    _add_per_block(dq, dt.type(scale) * (dsigma @ kbar) / sizes[:, None], b)
    _add_per_block(dk, (np.swapaxes(dsigma, -1, -2) @ qbar) / sizes[:, None], b)
    X = y / (1 - gamma.astype(dt, copy=False)).reshape(-1, 1, 1)
    dgamma = np.einsum("btc,btc->b", dvv - dy, X)
    return dq, dk, dvv, dgamma


def _forward(q, k, v, gamma, b, topk, scale, L=None, stats=False):
    """:func:`forward` on one slice of the batch.

    With ``stats`` also returns each row's final shift ``mu`` and normaliser ``ell`` (B, m b + 1)
    (``Ahat_ts = exp(w_ts - mu_t) / ell_t``), for the backward pass; ``L`` is a precomputed
    :func:`_setup`.
    """
    B, n = q.shape[:2]
    dv = v.shape[-1]
    dt = q.dtype
    if L is None:
        L = _setup(q, k, b, topk, scale)
    m = L.kb.shape[1]
    N = m * b
    vb = _pad_rows(v, N).reshape(B, m, b, dv)
    g = gamma.astype(dt, copy=False).reshape(B, 1, 1)
    kk = L.sel.shape[-1]
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
        S = _own_scores(L, I, causal)  # (B, b, b)
        mu_old = st[:, rows, dv + 1]
        mu_new = np.maximum(mu_old, S.max(axis=-1))  # finite: the diagonal is there
        pooled = I > kk
        if pooled:
            # the pooled residue: the earlier blocks the row did not select
            Wt = _pooled_logits(L, I, rowbase)
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
        if stats:  # the row is complete: no later block pushes to it
            st[:, rows, dv] = ell_I
            st[:, rows, dv + 1] = mu_new
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
        if L.rmax[I] == 0:
            continue
        idx, _, Sg = _gather_scores(L, I)  # (B, R) flat row indices, (B, R, b) scores
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
    if stats:
        return Y[:, :n], st[..., dv + 1], st[..., dv]
    return Y[:, :n]


def _normalisers(L: _Layout, b: int):
    """Each row's final shift ``mu`` and normaliser ``ell`` (B, m b + 1), as :func:`_forward` leaves them.

    The forward's online log-sum-exp without the values: pushes of the exact links (scores only),
    then the own block and the pooled residue.  O(n (k + 1) b d + n m) time, for a backward pass
    that was handed the forward's output.
    """
    B, m = L.kb.shape[:2]
    N = m * b
    dt = L.qs.dtype
    st = np.zeros((B, N + 1, 2), dtype=dt)  # [ell | mu]
    st[..., 1] = -np.inf
    st_f = st.reshape(-1, 2)
    causal = np.where(np.tri(b, dtype=bool), 0.0, -np.inf).astype(dt)
    rowbase = np.arange(B * b, dtype=np.int64).reshape(B, b, 1)
    kk = L.sel.shape[-1]
    for I in range(m):
        rows = slice(I * b, (I + 1) * b)
        S = _own_scores(L, I, causal)
        mu_old = st[:, rows, 1]
        mu_new = np.maximum(mu_old, S.max(axis=-1))
        if I > kk:
            Wt = _pooled_logits(L, I, rowbase)
            np.maximum(mu_new, Wt.max(axis=-1), out=mu_new)
        ell = st[:, rows, 0] * np.exp(mu_old - mu_new)
        ell += np.exp(S - mu_new[..., None]).sum(axis=-1)
        if I > kk:
            ell += np.exp(Wt - mu_new[..., None]).sum(axis=-1) * b
        st[:, rows, 0] = ell
        st[:, rows, 1] = mu_new
        if I == m - 1 or L.rmax[I] == 0:
            continue
        idx, _, Sg = _gather_scores(L, I)
        sg = np.take(st_f, idx, axis=0)
        mu_n = np.maximum(sg[..., 1], Sg.max(axis=-1))
        sg[..., 0] *= np.exp(sg[..., 1] - mu_n)
        sg[..., 0] += np.exp(Sg - mu_n[..., None]).sum(axis=-1)
        sg[..., 1] = mu_n
        st_f[idx] = sg
    return st[..., 1], st[..., 0]


def backward(q, k, v, gamma, b, topk, scale, dy, y=None):
    """Vector-Jacobian product of :func:`forward`: ``(dq, dk, dv, dgamma)``, dgamma of shape (B,).

    q, k (B, n, d), v, dy (B, n, dv), gamma (B,); ``y`` the forward's output if the caller kept it
    (then only the row normalisers are recomputed).  Same cost class as the forward,
    O(n (k + 1) b d + n m d + m^2 d) time and O(n d + m^2 + n k) memory; the derivation is in
    :func:`_backward` and ``docs/topk.md``.
    """
    B, n, d = q.shape
    work = B * n * (d + v.shape[-1])
    if use_numba():
        with one_blas_thread():
            return _backward_numba(q, k, v, gamma, b, topk, scale, dy, y)
    arrays = (q, k, v, gamma, dy) if y is None else (q, k, v, gamma, dy, y)
    return split_batch(_backward, arrays, (b, topk, scale), work)


def _backward(q, k, v, gamma, dy, *rest):
    """:func:`backward` on one slice of the batch (``rest``: ``[y,] b, topk, scale``).

    With ``Z = V + gamma X`` (``Ahat Z = X``) and ``dX = (1 - gamma) dY``:

    * ``G = (I - gamma Ahat)^{-T} dX`` by block *backward* substitution, last block first::

          (I - gamma Ahat_JJ)^T G_J = dX_J + gamma r_J,   r_J = sum_{t later} Ahat_{t,B_J}^T G_t.

      ``r_J`` has an exact part, pulled from the rows ``R_J`` that selected ``J`` (the forward's
      push groups: ``P^T G[R_J]`` with ``P = Ahat_{R_J, B_J}``, recomputed from the row
      normalisers), and a pooled part, the same for every key of ``J``: the accumulator
      ``H_J = sum_t p_tJ G_t`` over the rows already solved that did not select ``J``
      (``p_tJ = exp(sigma_IJ - mu_t) / ell_t``), to which each block ``I`` adds ``p_I^T G_I`` with
      its selected entries zeroed (no "all minus selected" cancellation).
    * ``dV = Ahat^T G``: ``dV_J = Ahat_JJ^T G_J + r_J``.
    * The softmax backward per entry, ``dS_ts = Ahat_ts (G_t . Z_s - delta_t)``,
      ``delta_t = G_t . X_t``: own block and exact links reach ``q_t`` and ``k_s``; a pooled
      score is shared by the keys of ``J``, so it collects
      ``dsigma_IJ = sum_{t in B_I, J not in sel(t)} p_tJ (G_t . c_J - b delta_t)``, ``c_J`` the
      block sums of ``Z``, which reach ``q`` and ``k`` through the block means.
    * ``dgamma = -<dY, X> + <G, Ahat X> = -<dY, X> + <dV, X>``.

    The selection is piecewise constant in ``q`` and ``k``: no gradient flows through it.  Every
    exponent is a score minus the row's final max, ``<= 0``.
    """
    if len(rest) == 4:
        y, b, topk, scale = rest
    else:
        y = None
        b, topk, scale = rest
    B, n, d = q.shape
    dv = v.shape[-1]
    dt = q.dtype
    L = _setup(q, k, b, topk, scale)
    if y is None:
        y, mu, ell = _forward(q, k, v, gamma, b, topk, scale, L=L, stats=True)
    else:
        mu, ell = _normalisers(L, b)
    qs, kb, kbar, qbar, sizes = L.qs, L.kb, L.kbar, L.qbar, L.sizes
    m = kb.shape[1]
    N = m * b
    kk = L.sel.shape[-1]
    g = gamma.astype(dt, copy=False).reshape(B, 1, 1)
    X = _pad_rows(y / (1 - g), N)  # padded rows: X = 0, dX = 0, hence G = 0
    Xb = X.reshape(B, m, b, dv)
    Zb = _pad_rows(v, N).reshape(B, m, b, dv) + g[..., None] * Xb
    cZ = Zb.sum(axis=2)  # (B, m, dv): block sums of Z (only full blocks J < m - 1 are used)
    dXb = _pad_rows((1 - g) * dy, N).reshape(B, m, b, dv)

    # per-row state, flat over (batch, row) with row N scratch (G = delta = 1/ell = 0 there, so
    # padded group slots contribute nothing): [G (dv) | delta | mu | 1/ell]
    st = np.zeros((B, N + 1, dv + 3), dtype=dt)
    st[:, :N, dv + 1] = mu[:, :N]
    st[:, :N, dv + 2] = 1.0 / ell[:, :N]
    st_f = st.reshape(-1, dv + 3)
    dqs = np.zeros((B, N + 1, d), dtype=dt)  # gradient w.r.t. the scaled queries
    dqs_f = dqs.reshape(-1, d)
    dkb = np.zeros((B, m, b, d), dtype=dt)
    dvb = np.empty((B, m, b, dv), dtype=dt)
    H = np.zeros((B, m, dv), dtype=dt)  # pooled weight of the solved rows on each block, times G
    dsigma = np.zeros((B, m, m), dtype=dt)
    causal = np.where(np.tri(b, dtype=bool), 0.0, -np.inf).astype(dt)
    eye = np.eye(b, dtype=dt)
    rowbase = np.arange(B * b, dtype=np.int64).reshape(B, b, 1)
    upper_solve = _lower_solver(dt, B, trans=True)
    for J in range(m - 1, -1, -1):
        rows = slice(J * b, (J + 1) * b)
        mu_J = st[:, rows, dv + 1, None]
        il_J = st[:, rows, dv + 2, None]
        ZJt = np.swapaxes(Zb[:, J], -1, -2)
        # r_J: what the later rows' G send to the keys of J
        r = np.zeros((B, b, dv), dtype=dt) if J == m - 1 else np.repeat(H[:, J, None, :], b, axis=1)
        if J < m - 1 and L.rmax[J] > 0:
            idx, Qg, P = _gather_scores(L, J)  # (B, R), (B, R, d), (B, R, b)
            sg = np.take(st_f, idx, axis=0)  # the rows' [G | delta | mu | 1/ell]
            P -= sg[..., dv + 1, None]
            np.exp(P, out=P)
            P *= sg[..., dv + 2, None]  # = Ahat_{R_J, B_J}
            Gg = sg[..., :dv]
            r += np.swapaxes(P, -1, -2) @ Gg
            # the exact links' scores
            dP = Gg @ ZJt
            dP -= sg[..., dv, None]
            dP *= P
            dqs_f[idx] += dP @ kb[:, J]  # rows are unique within a group; the scratch row is dropped
            dkb[:, J] += np.swapaxes(dP, -1, -2) @ Qg
        # own block: solve (I - gamma Ahat_JJ)^T G_J = dX_J + gamma r_J
        A = _own_scores(L, J, causal)
        A -= mu_J
        np.exp(A, out=A)
        A *= il_J  # Ahat_JJ
        M = eye - g * A
        rhs = dXb[:, J] + g * r
        GJ = st[:, rows, :dv]
        upper_solve(M, rhs, GJ)
        dvb[:, J] = np.swapaxes(A, -1, -2) @ GJ
        dvb[:, J] += r
        delta = np.einsum("btc,btc->bt", GJ, Xb[:, J])
        st[:, rows, dv] = delta
        dS = GJ @ ZJt
        dS -= delta[..., None]
        dS *= A  # zero above the diagonal
        dqs[:, rows] += dS @ kb[:, J]
        dkb[:, J] += np.swapaxes(dS, -1, -2) @ qs[:, rows]
        if J > kk:
            # the pooled residue of the rows of J on the blocks they did not select
            p = _pooled_logits(L, J, rowbase)
            p -= mu_J
            np.exp(p, out=p)
            p *= il_J  # (B, b, J): p_tI, zero where selected
            H[:, :J] += np.swapaxes(p, -1, -2) @ GJ
            T = GJ @ np.swapaxes(cZ[:, :J], -1, -2)
            T -= b * delta[..., None]  # earlier blocks are full
            T *= p
            dsigma[:, J, :J] = T.sum(axis=1)
    # the pooled scores sigma_IJ = qbar_I . kbar_J (scale inside qbar) through the block means
    dqbar = (dsigma @ kbar) / sizes[:, None]
    dkbar = (np.swapaxes(dsigma, -1, -2) @ qbar) / sizes[:, None]
    dqs[:, :N].reshape(B, m, b, d)[...] += dqbar[:, :, None, :]
    dkb += dkbar[:, :, None, :]
    dq = dqs[:, :n] * dt.type(scale)
    dk = dkb.reshape(B, N, d)[:, :n]
    dvv = dvb.reshape(B, N, dv)[:, :n]
    Xr = X[:, :n]
    dgamma = np.einsum("btc,btc->b", dvv - dy, Xr)
    return dq, np.ascontiguousarray(dk), np.ascontiguousarray(dvv), dgamma


def kept_mass(q, k, b, topk, scale, lse):
    """Dense attention mass on the exact part of ``Ahat`` (own block ``s <= t`` plus selected blocks).

    q, k (B, n, d), lse (B, n) the dense row log-sum-exp (``log sum_{s<=t} exp(scale q_t . k_s)``).
    Returns (B, n) float64.
    """
    q = np.asarray(q, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    B, n = q.shape[:2]
    L = _setup(q, k, b, topk, scale)
    m = L.kb.shape[1]
    N = m * b
    lse_p = np.zeros((B, N + 1), dtype=np.float64)
    lse_p[:, :n] = lse
    kept = np.zeros((B, N + 1), dtype=np.float64)
    lse_f, kept_f = lse_p.reshape(-1), kept.reshape(-1)
    causal = np.where(np.tri(b, dtype=bool), 0.0, -np.inf)
    for I in range(m):
        rows = slice(I * b, (I + 1) * b)
        S = _own_scores(L, I, causal)
        kept[:, rows] += np.exp(S - lse_p[:, rows, None]).sum(axis=-1)
        if I == m - 1 or L.rmax[I] == 0:
            continue
        idx, _, Sg = _gather_scores(L, I)
        # rows are unique within a group; only the scratch row repeats, and it is dropped
        kept_f[idx] = kept_f[idx] + np.exp(Sg - lse_f[idx][..., None]).sum(axis=-1)
    return kept[:, :n]
