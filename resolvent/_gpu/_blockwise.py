"""Blockwise chain attention on the GPU: host glue around the numba-cuda kernels.

Written against an array namespace ``xp``: CuPy on a device, NumPy under the CUDA simulator (the
kernels then run simulated), so the tests exercise the same code path without a GPU.  The maths is
``resolvent/attention/_blockwise.py`` (and ``docs/chain_attention.md``).  float32 with blocks of
at most :data:`._kernels.MAX_BLOCK` runs the kernels of :mod:`._fused` forward and backward; other
dtypes run:

- within-block work (scores, softmax with the pooled normaliser, ``U = D V + u P``, the block's
  triangular solve and its block sums): one fused kernel, :func:`._kernels.forward_within`;
- pooled scores ``sigma = scale qbar kbar^T``, ``W``, ``W V``-sums, ``W Z``: cuBLAS through ``xp``;
- the reduced ``m x m`` unit lower-triangular system: blocked, :func:`solve_unit_lower`;
- the Woodbury correction ``X <- (1 - gamma) (X + h * E W Z)``: one elementwise kernel.

Block sizes above :data:`._kernels.MAX_BLOCK` (the score tile no longer fits in shared memory) take
a batched path: the same factors formed with ``xp`` matmuls, block solves by the blocked solver.
"""

from __future__ import annotations

import functools

import numpy as np

from . import _fused
from . import _kernels as K

__all__ = ["forward", "backward", "pooled_scores", "solve_unit_lower", "lower_solve", "block_sums", "batch_sum", "batch_dot"]


def _cdiv(a, b):
    return -(-a // b)


def block_sums(xp, x, b):
    """(B, n, c) -> (B, m, c): sums over consecutive blocks of ``b`` rows (the last may be shorter)."""
    B, n, c = x.shape
    full = n // b
    parts = []
    if full:
        parts.append(x[:, : full * b].reshape(B, full, b, c).sum(axis=2))
    if full * b < n:
        parts.append(x[:, full * b :].sum(axis=1, keepdims=True))
    return parts[0] if len(parts) == 1 else xp.concatenate(parts, axis=1)


def batch_sum(xp, x):
    """``x.sum`` over all axes but the first, in two passes of many segments: a reduction of one long
    segment per batch entry runs on one thread block per segment (0.5 ms for 4M floats at B = 1)."""
    return x.reshape(_segments(x)).sum(axis=-1).sum(axis=-1)


def _segments(x):
    """``(B, parts, N / parts)``: x's batch entries cut into about ``1024 / B`` segments of at
    least 1024 entries (a power of two of them that divides ``N``)."""
    B = x.shape[0]
    N = x.size // max(B, 1)
    parts = 1
    while parts * B < 1024 and N % (2 * parts) == 0 and N // (2 * parts) >= 1024:
        parts *= 2
    return (B, parts, N // parts)


def batch_dot(xp, x, y):
    """``sum(x * y)`` over all axes but the first: one fused pass on a device (a CuPy reduction
    kernel over many segments, as :func:`batch_sum`)."""
    if xp.__name__ != "cupy":
        return batch_sum(xp, x * y)
    shape = _segments(x)
    return _dot_kernel()(x.reshape(shape), y.reshape(shape), axis=-1).sum(axis=-1)


@functools.cache
def _dot_kernel():
    import cupy

    return cupy.ReductionKernel("T x, T y", "T z", "x * y", "a + b", "z = a", "0", "resolvent_dot")


@functools.cache
def _add_block_kernel():
    import cupy

    return cupy.ElementwiseKernel(
        "raw T c, int64 n, int64 C, int64 m, int64 b", "T x",
        "x += c[(i / (n * C)) * m * C + ((i / C) % n) / b * C + i % C]", "resolvent_add_per_block")


def add_per_block(xp, x, per_block, b):
    """In place: ``x[:, t] += per_block[:, t // b]`` (on a device, one elementwise kernel)."""
    B, n, c = x.shape
    if xp.__name__ == "cupy" and x.flags.c_contiguous:
        m = per_block.shape[1]
        _add_block_kernel()(xp.ascontiguousarray(per_block), n, c, m, b, x)
        return
    full = n // b
    if full:
        x[:, : full * b].reshape(B, full, b, c)[...] += per_block[:, :full, None, :]
    if full * b < n:
        x[:, full * b :] += per_block[:, full, None, :]


def pooled_scores(xp, q, k, b, scale):
    """``c`` (B, m) (0 for block 0, which has no pooled part), ``W`` (B, m, m), block sizes (m,),
    ``qbar``, ``kbar``.  As ``resolvent.attention._blockwise.pooled_scores``."""
    B, n, d = q.shape
    m = _cdiv(n, b)
    dt = q.dtype
    sizes = xp.full(m, b, dtype=dt)
    sizes[-1] = n - (m - 1) * b
    qbar = block_sums(xp, q, b) / sizes[:, None]
    kbar = block_sums(xp, k, b) / sizes[:, None]
    sigma = qbar @ xp.swapaxes(kbar, -1, -2)
    sigma *= dt.type(scale)
    lower = xp.tri(m, k=-1, dtype=bool)
    neg = dt.type(-np.inf)
    sigma = xp.where(lower, sigma, neg)
    c = sigma.max(axis=-1)
    c = xp.where(xp.isfinite(c), c, dt.type(0))
    W = xp.exp(sigma - c[..., None])  # exp(-inf) = 0 above the diagonal
    # weights below eps^2 of the row's largest cannot change a row sum: flush (see the CPU module)
    W = xp.where(W < dt.type(np.finfo(dt).eps) ** 2, dt.type(0), W)
    return c, W, sizes, qbar, kbar


def solve_unit_lower(xp, L, g, R, *, with_product=False, stream=None, nt=None):
    """``Z = (I - diag(g) L)^{-1} R`` for strictly lower ``L`` (B, m, m), ``g`` (B, m), ``R`` (B, m, k);
    ``with_product``: ``(Z, L Z)`` (``L``'s strict lower part).

    Blocked: the ``m / 64`` diagonal blocks are inverted in parallel (one thread block each), then
    one kernel walks the block rows, each step a block product with the rows already solved and a
    product with the diagonal block's inverse.  The serial chain is ``m / 64`` block steps, not ``m``.
    float32 runs the forward pipeline's single-launch solver (:func:`._fused.reduced_solve`).
    """
    B, m, k = R.shape
    L = xp.ascontiguousarray(L)
    g = xp.ascontiguousarray(g)
    R = xp.ascontiguousarray(R)
    if _fused.supported(L.dtype, 0) and R.dtype == L.dtype and g.dtype == L.dtype:
        return _fused.reduced_solve(xp, L, g, R, with_product=with_product, nt=nt)
    nb = K.RED_NB
    mb = _cdiv(m, nb)
    Dinv = xp.empty((B, mb, nb, nb), dtype=L.dtype)
    K.diag_block_inverse(L, g, Dinv, stream=stream, nt=nt, nb=nb)
    Z = xp.empty((B, m, k), dtype=R.dtype)
    K.reduced_solve(L, g, R, Dinv, Z, stream=stream, nt=nt, nb=nb)
    return (Z, xp.tril(L, -1) @ Z) if with_product else Z


def solve_unit_upper(xp, U, g, R, *, with_product=False, stream=None, nt=None):
    """``Z = (I - diag(g) U)^{-1} R`` for strictly upper ``U``: the lower solver on reversed indices
    (``with_product``: ``(Z, U Z)``)."""
    Lr = U[:, ::-1, ::-1]
    out = solve_unit_lower(xp, Lr, g[:, ::-1], R[:, ::-1], with_product=with_product, stream=stream, nt=nt)
    if with_product:
        return tuple(xp.ascontiguousarray(x[:, ::-1]) for x in out)
    return xp.ascontiguousarray(out[:, ::-1])


def lower_solve(xp, M, R, *, lower=True, stream=None, nt=None):
    """``M^{-1} R`` for a batch of triangular ``M`` (B, n, n) with a non-zero diagonal, R (B, n, k).

    ``M = diag(dm) (I - diag(-1/dm) N)`` with ``N`` the strict triangle, so the unit-triangular
    blocked solver serves any triangular matrix.
    """
    dm = xp.diagonal(M, axis1=-2, axis2=-1)
    N = xp.tril(M, -1) if lower else xp.triu(M, 1)
    g = -1 / dm
    Rs = R / dm[..., None]
    if lower:
        return solve_unit_lower(xp, N, g, Rs, stream=stream, nt=nt)
    return solve_unit_upper(xp, N, g, Rs, stream=stream, nt=nt)


def forward(xp, q, k, v, gamma, b, scale, *, stream=None, nt=None, check=True):
    """Blockwise chain attention on flattened inputs: q, k (B, n, d), v (B, n, dv), gamma (B,).

    float32 with ``b <= MAX_BLOCK`` runs the six-launch pipeline of :mod:`._fused`, which also
    checks that q, k, v are finite (``ValueError``; ``check=False``: no check, no synchronisation);
    other cases the kernels below.
    """
    if _fused.supported(q.dtype, b):
        return _fused.forward_checked(xp, q, k, v, gamma, b, scale, nt=nt, check=check)
    if b > K.MAX_BLOCK:
        return _forward_batched(xp, q, k, v, gamma, b, scale, stream=stream, nt=nt)
    B, n, d = q.shape
    dv = v.shape[-1]
    dt = q.dtype
    m = _cdiv(n, b)
    c, W, sizes, _, _ = pooled_scores(xp, q, k, b, scale)
    pooled = W @ sizes
    P = W @ block_sums(xp, v, b)
    X = xp.empty((B, n, dv), dtype=dt)
    h = xp.empty((B, n), dtype=dt)
    rr = xp.empty((B, m, dv), dtype=dt)
    g = xp.empty((B, m), dtype=dt)
    K.forward_within(q, k, v, gamma, b, scale, c, pooled, P, X, h, rr, g, stream=stream, nt=nt)
    Z = solve_unit_lower(xp, W, g, rr, stream=stream, nt=nt)
    K.combine(X, h, W @ Z, gamma, b, stream=stream, nt=nt)
    return X


def checks_inputs(dtype, b) -> bool:
    """Whether :func:`backward` flags non-finite q, k, v, dy itself (no separate check needed)."""
    return _fused.supported(dtype, b)


def backward(xp, q, k, v, gamma, b, scale, dy, y=None, *, stream=None, nt=None, flags=None, flags_set=None):
    """``(dq, dk, dv, dgamma)`` of :func:`forward`; ``y`` (its output) saves recomputing it.

    float32 with ``b <= MAX_BLOCK`` reads ``y`` and ``dy`` in its kernels (``X = y / (1 - gamma)``
    and ``dX = (1 - gamma) dy`` are never formed), and sets ``flags[0:4]`` (int32 on the device,
    zeroed by the caller; see :func:`checks_inputs`) where q, k, v or dy holds a non-finite value;
    ``flags_set`` is then called as soon as the kernel that sets the last of them is queued (the
    caller may copy them back while the rest runs); other cases the kernels of :mod:`._kernels`,
    which do not look (the caller checks first)."""
    if y is None:  # unchecked: the kernels below flag non-finite input (or the caller checked)
        y = forward(xp, q, k, v, gamma, b, scale, stream=stream, nt=nt, check=False)
    B, n, d = q.shape
    dvdim = v.shape[-1]
    dt = q.dtype
    g1 = gamma.reshape(B, 1, 1)
    fused = _fused.supported(dt, b)
    if b > K.MAX_BLOCK:
        return _backward_batched(xp, q, k, v, gamma, b, scale, dy, y / (1 - g1), stream=stream, nt=nt)
    if fused:  # ten launches (_fused._backward_layout)
        if flags is None:
            flags = xp.zeros(_fused.SYNC_HEAD, dtype=np.int32)
        return _fused.backward(xp, q, k, v, y, dy, gamma, b, scale, flags, nt=nt, flags_set=flags_set)
    m = _cdiv(n, b)
    s = dt.type(scale)
    c, W, sizes, qbar, kbar = pooled_scores(xp, q, k, b, scale)
    pooled = W @ sizes
    sqbar, skbar = s * qbar, s * kbar
    Dst = xp.empty((B, m, b, b), dtype=dt)
    u = xp.empty((B, n), dtype=dt)
    G = xp.empty((B, n, dvdim), dtype=dt)
    hp = xp.empty((B, n), dtype=dt)
    rr = xp.empty((B, m, dvdim), dtype=dt)
    gd = xp.empty((B, m), dtype=dt)
    X = y / (1 - g1)
    K.backward_solve(q, k, gamma, b, scale, c, pooled, (1 - g1) * dy, Dst, u, G, hp, rr, gd, nt=nt)
    Wt = xp.swapaxes(W, -1, -2)
    _, WtZ = solve_unit_upper(xp, Wt, gd, rr, with_product=True, stream=stream, nt=nt)
    dq = xp.empty_like(q)
    dk = xp.empty_like(k)
    dvv = xp.empty_like(v)
    Gu = xp.empty((B, m, dvdim), dtype=dt)
    asum = xp.empty((B, m), dtype=dt)
    Rsum = xp.empty((B, m, dvdim), dtype=dt)
    gdx = xp.empty((B, m), dtype=dt)
    K.backward_grads(q, k, v, X, gamma, b, scale, Dst, u, G, hp, WtZ, dq, dk, dvv, Gu, asum, Rsum, gdx, nt=nt)
    Xsum = block_sums(xp, X, b)
    ydy = batch_dot(xp, dy, X)
    dsigma = W * (Gu @ xp.swapaxes(Rsum, -1, -2) - asum[..., None] * sizes)
    add_per_block(xp, dq, (dsigma @ skbar) / sizes[:, None], b)
    add_per_block(xp, dk, (xp.swapaxes(dsigma, -1, -2) @ sqbar) / sizes[:, None], b)
    add_per_block(xp, dvv, Wt @ Gu, b)
    dgamma = -ydy + gdx.sum(axis=-1) + batch_sum(xp, Gu * (W @ Xsum))
    return dq, dk, dvv, dgamma


# --------------------------------------------------------------------------------------------------
# block sizes above MAX_BLOCK: batched factors (a port of the CPU's NumPy path)


def _pad_blocks(xp, x, b, m):
    B, n, c = x.shape
    if m * b != n:
        x = xp.concatenate([x, xp.zeros((B, m * b - n, c), dtype=x.dtype)], axis=1)
    return x.reshape(B, m, b, c)


def _structure(xp, q, k, b, scale):
    B, n, d = q.shape
    m = _cdiv(n, b)
    dt = q.dtype
    qb = _pad_blocks(xp, q, b, m)
    kb = _pad_blocks(xp, k, b, m)
    c, W, sizes, qbar, kbar = pooled_scores(xp, q, k, b, scale)
    c = xp.where(xp.arange(m) > 0, c, dt.type(-np.inf))
    S = qb @ xp.swapaxes(kb, -1, -2)
    S *= dt.type(scale)
    S = xp.where(xp.tri(b, dtype=bool), S, dt.type(-np.inf))
    pooled = W @ sizes
    r = xp.maximum(S.max(axis=-1), c[..., None])
    S = xp.exp(S - r[..., None])
    e_c = xp.exp(c[..., None] - r)
    inv_z = 1 / (S.sum(axis=-1) + e_c * pooled[..., None])
    S *= inv_z[..., None]
    return S, e_c * inv_z, W, sizes, qbar, kbar


def _block_lower_solve(xp, M, R, lower, stream, nt):
    """Solve with every (B, m, b, b) diagonal block of ``M``; ``R`` (B, m, b, c)."""
    B, m, b, _ = M.shape
    c = R.shape[-1]
    X = lower_solve(xp, M.reshape(B * m, b, b), R.reshape(B * m, b, c), lower=lower, stream=stream,
                    nt=nt)
    return X.reshape(B, m, b, c)


def _forward_batched(xp, q, k, v, gamma, b, scale, *, stream=None, nt=None):
    B, n, _ = q.shape
    dv = v.shape[-1]
    dt = q.dtype
    D, u, W, sizes, _, _ = _structure(xp, q, k, b, scale)
    m = W.shape[-1]
    vb = _pad_blocks(xp, v, b, m)
    g4 = gamma.reshape(B, 1, 1, 1)
    rhs = xp.empty((B, m, b, dv + 1), dtype=dt)
    rhs[..., :dv] = D @ vb + u[..., None] * (W @ vb.sum(axis=2))[:, :, None, :]
    rhs[..., dv] = g4[..., 0] * u
    M0 = xp.eye(b, dtype=dt) - g4 * D
    sol = _block_lower_solve(xp, M0, rhs, True, stream, nt).reshape(B, m * b, dv + 1)
    Y0 = _pad_blocks(xp, sol[..., :dv], b, m)
    hh = sol[..., dv].reshape(B, m, b)
    gg = hh.sum(axis=-1)
    Z = solve_unit_lower(xp, W, gg, Y0.sum(axis=2), stream=stream, nt=nt)
    X = Y0 + hh[..., None] * (W @ Z)[:, :, None, :]
    X *= (1 - gamma).reshape(B, 1, 1, 1)
    return xp.ascontiguousarray(X.reshape(B, m * b, dv)[:, :n])


def _backward_batched(xp, q, k, v, gamma, b, scale, dy, X, *, stream=None, nt=None):
    B, n, d = q.shape
    dvdim = v.shape[-1]
    dt = q.dtype
    D, u, W, sizes, qbar, kbar = _structure(xp, q, k, b, scale)
    m = W.shape[-1]
    g4 = gamma.reshape(B, 1, 1, 1)
    qb, kb, vb = (_pad_blocks(xp, x, b, m) for x in (q, k, v))
    Xb, dyb = _pad_blocks(xp, X, b, m), _pad_blocks(xp, dy, b, m)
    rhs = xp.empty((B, m, b, dvdim + 1), dtype=dt)
    rhs[..., :dvdim] = (1 - g4) * dyb
    rhs[..., dvdim] = g4[..., 0]
    M0T = xp.eye(b, dtype=dt) - g4 * xp.swapaxes(D, -1, -2)
    sol = _block_lower_solve(xp, M0T, rhs, False, stream, nt)
    G0, hp = sol[..., :dvdim], sol[..., dvdim]
    gdiag = (u * hp).sum(axis=-1)
    Wt = xp.swapaxes(W, -1, -2)
    Z = solve_unit_upper(xp, Wt, gdiag, (u[..., None] * G0).sum(axis=2), stream=stream, nt=nt)
    G = G0 + hp[..., None] * (Wt @ Z)[:, :, None, :]
    R = vb + g4 * Xb
    delta = (G * Xb).sum(axis=-1)
    dS = D * (G @ xp.swapaxes(R, -1, -2) - delta[..., None])
    s = dt.type(scale)
    dqb = s * (dS @ kb)
    dkb = s * (xp.swapaxes(dS, -1, -2) @ qb)
    Gu = (u[..., None] * G).sum(axis=2)
    a = (u * delta).sum(axis=-1)
    dsigma = W * (Gu @ xp.swapaxes(R.sum(axis=2), -1, -2) - a[..., None] * sizes)
    dqb += (s * (dsigma @ kbar) / sizes[:, None])[:, :, None, :]
    dkb += (s * (xp.swapaxes(dsigma, -1, -2) @ qbar) / sizes[:, None])[:, :, None, :]
    dvb = xp.swapaxes(D, -1, -2) @ G + (Wt @ Gu)[:, :, None, :]
    AX = D @ Xb + u[..., None] * (W @ Xb.sum(axis=2))[:, :, None, :]
    dgamma = -batch_sum(xp, dy * X) + batch_sum(xp, G * AX)

    def unpad(x):
        return xp.ascontiguousarray(x.reshape(B, m * b, x.shape[-1])[:, :n])

    return unpad(dqb), unpad(dkb), unpad(dvb), dgamma
