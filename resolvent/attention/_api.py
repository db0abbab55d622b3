"""Public chain-attention functions: argument checks, batching and dispatch to the methods."""

from __future__ import annotations

import math
import numbers

import numpy as np

from .._validate import as_inexact, check_choice, check_finite_array, check_gamma, check_positive_int, unbroadcast
from . import _blockwise, _dense, _exact

__all__ = ["chain", "chain_attention", "chain_attention_vjp", "default_block_size", "block_mass"]

METHODS = ("dense", "exact", "blockwise")

# b = C * n^(1/3) (topk = 0), rounded to a multiple of 8, and b = C_TOPK * n^(1/2) (topk > 0), rounded
# to a power of two (at least 16).  C_POOLED from the sweep in benchmarks/block_size_sweep.py, C_TOPK
# from the one in benchmarks/topk_scaling.py --sweep (results in benchmarks/results/).  Powers of two
# since the fused Numba kernel: its score loops run over multiples of 16 keys (b = 24 pays for 32), and
# with multiples of 8 the sweep's b = 24, 48, 96 were mostly slower than 32 or 64 (docs/topk.md, 6).
C_POOLED = 1.8
C_TOPK = 0.6


def default_block_size(n, *, topk=0):
    """The block size ``blockwise`` uses when none is given.

    ``b = C * n**(1/3)`` for pooled coupling (``topk=0``), where the within-block work ``O(n b d)``
    balances the reduced system ``O(m^2 d)`` with ``m = n / b``; ``b = C_k * n**(1/2)`` for
    ``topk > 0``, where the per-token links cost ``O(n k b d)`` against ``O(n m d)`` for choosing
    them.  The result is rounded to a multiple of 8 (at least 8; for ``topk > 0`` to the nearest
    power of two on a log scale, at least 16) and capped at ``n``.

    Parameters
    ----------
    n : int
        Sequence length.
    topk : int, optional
        Number of exact links per query token (see :func:`chain_attention`).

    Returns
    -------
    int
        The block size.

    Notes
    -----
    The constants were chosen on the CPU backend by timing ``chain_attention`` over a sweep of block
    sizes (``benchmarks/block_size_sweep.py`` and, for ``topk > 0``, ``benchmarks/topk_scaling.py
    --sweep``; tables in ``benchmarks/results/``).

    Examples
    --------
    >>> import resolvent
    >>> resolvent.default_block_size(4096)
    32
    """
    n = check_positive_int(n, "n", allow_none=False)
    topk = _check_topk(topk)
    if topk > 0:
        b = topk_block(C_TOPK * math.sqrt(n))
    else:
        b = max(8, 8 * int(round(C_POOLED * n ** (1.0 / 3.0) / 8.0)))
    return min(b, n)


def topk_block(raw):
    """A ``topk > 0`` block size: ``raw`` rounded to the nearest power of two (log scale), at least 16."""
    return max(16, 2 ** int(round(math.log2(raw))))


def _check_topk(topk) -> int:
    if isinstance(topk, bool) or not isinstance(topk, numbers.Integral) or topk < 0:
        raise ValueError(f"topk must be a non-negative integer, got {topk!r}")
    return int(topk)


def check_options(method, block_size, topk):
    """Check ``method``, ``block_size`` and ``topk`` together (CPU and GPU backends alike)."""
    check_choice(method, "method", METHODS)
    block_size = check_positive_int(block_size, "block_size")
    topk = _check_topk(topk)
    if topk and method != "blockwise":
        raise ValueError(f"topk applies to method='blockwise' only, got method={method!r} with topk={topk}")
    return block_size, topk


def _check_scale(scale, d):
    if scale is None:
        return 1.0 / math.sqrt(d)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite real number, got {scale!r}")
    return float(scale)


def _real_float(x: np.ndarray, name: str) -> np.ndarray:
    if np.iscomplexobj(x):
        raise ValueError(f"{name} must be real for attention, got dtype {x.dtype}")
    return x


def check_qkv_shapes(q, k, v):
    """The shape checks of q, k, v, shared by the CPU and GPU backends; returns ``(batch, n, d)``."""
    n, d = q.shape[-2:]
    if k.shape[-2:] != (n, d):
        raise ValueError(f"k must have shape (..., n, d) = (..., {n}, {d}) like q, got {k.shape}")
    if v.shape[-2] != n:
        raise ValueError(f"v must have shape (..., n, dv) with n = {n} like q, got {v.shape}")
    if n < 1 or d < 1 or v.shape[-1] < 1:
        raise ValueError(f"q, k, v must be non-empty, got shapes {q.shape}, {k.shape}, {v.shape}")
    try:
        batch = np.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    except ValueError:
        raise ValueError(
            f"batch dimensions of q {q.shape[:-2]}, k {k.shape[:-2]} and v {v.shape[:-2]} do not broadcast"
        ) from None
    return batch, n, d


def prepare_qkv(q, k, v, check_finite=True):
    """Validate q, k, v (their finiteness only with ``check_finite``) and flatten their batch dimensions.

    Returns ``(q, k, v, batch_shape, compute_dtype, out_dtype)`` with q, k of shape (B, n, d) and
    v of shape (B, n, dv), all in ``compute_dtype`` (float32 or float64).
    """
    in_dtypes = [np.asarray(x).dtype if not hasattr(x, "dtype") else np.dtype(x.dtype) for x in (q, k, v)]
    q = _real_float(as_inexact(q, "q", min_ndim=2), "q")
    k = _real_float(as_inexact(k, "k", min_ndim=2), "k")
    v = _real_float(as_inexact(v, "v", min_ndim=2), "v")
    batch, n, d = check_qkv_shapes(q, k, v)
    dt = np.result_type(q.dtype, k.dtype, v.dtype)
    out_dt = dt
    if all(t == np.float16 for t in in_dtypes):
        out_dt = np.dtype(np.float16)  # computed in float32, returned in the input's precision
    if check_finite:
        for name, x in (("q", q), ("k", k), ("v", v)):
            check_finite_array(x, name)
    B = math.prod(batch)

    def flat(x, last):
        return np.ascontiguousarray(np.broadcast_to(x, batch + x.shape[-2:]).reshape((B, n, last)), dtype=dt)

    return flat(q, d), flat(k, d), flat(v, v.shape[-1]), batch, dt, out_dt


def chain_attention(q, k, v, gamma=0.9, *, method="blockwise", block_size=None, topk=0, scale=None,
                    check_finite=True):
    r"""Chain attention ``Y = (1 - gamma) A (I - gamma A)^{-1} V`` on causal softmax attention.

    ``A = softmax(scale q k^T + causal mask)`` (``method="dense"`` and ``"exact"``) or its blockwise
    approximation ``Ahat`` (``method="blockwise"``, SPEC 2.2 / 2.3).  The operator sums every path
    through the attention graph, ``A + gamma A^2 + gamma^2 A^3 + ...``, scaled so that a constant
    ``V`` maps to the same constant; ``gamma = 0`` is plain attention.

    Parameters
    ----------
    q, k : array_like, shape (..., n, d)
        Queries and keys; leading (batch, head) dimensions broadcast.
    v : array_like, shape (..., n, dv)
        Values.
    gamma : float or array_like, shape broadcastable to the batch dimensions
        Decay per hop, in ``[0, 1)``; an array gives one value per batch entry or head.
    method : {"blockwise", "exact", "dense"}, optional
        ``"dense"`` forms the ``n x n`` attention (the reference, O(n^2) memory); ``"exact"``
        computes the same numbers streaming (O(n^2 d) time, O(n d) memory); ``"blockwise"``
        evaluates ``Ahat`` through an ``m x m`` reduced system, O(n b d + m^2 d) time.
    block_size : int, optional
        Block size ``b`` of ``blockwise``; default :func:`default_block_size`.  ``n`` need not be a
        multiple of it.  ``block_size >= n`` gives dense attention exactly.
    topk : int, optional
        ``blockwise`` only: each query token keeps exact links to the ``topk`` earlier blocks whose
        mean key it scores highest (SPEC 2.3); ``0`` is pooled coupling (SPEC 2.2).
    scale : float, optional
        Score scale, default ``1 / sqrt(d)``.
    check_finite : bool, optional
        Check that ``q``, ``k``, ``v`` hold only finite numbers (default True), as SciPy does.
        ``False`` skips the check: the caller promises finite input, and non-finite input then
        gives non-finite output, not a ``ValueError``.  On the GPU it also removes the one host
        synchronisation the call otherwise makes (to read the check's result), so the call returns
        as soon as the work is queued, as PyTorch code and CUDA-graph capture expect (a ``gamma``
        given as a device array is still read back to be validated).

    Returns
    -------
    Y : ndarray, shape (..., n, dv)
        float32 for float32 input, float64 for float64 (or integer) input.

    Raises
    ------
    ValueError
        On shapes that do not match, ``gamma`` outside ``[0, 1)``, an unknown ``method``, a
        ``block_size`` < 1, a negative ``topk``, complex input, or non-finite input (with
        ``check_finite=True``), naming the argument.

    Notes
    -----
    The derivations are in ``docs/chain_attention.md``.  Constants are preserved: ``V = 1`` gives
    ``Y = 1`` for every method and ``gamma``.

    Examples
    --------
    >>> import numpy as np, resolvent
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = rng.standard_normal((3, 2, 256, 16))
    >>> y = resolvent.chain_attention(q, k, v, 0.9, method="blockwise")
    >>> y_ref = resolvent.chain_attention(q, k, v, 0.9, method="blockwise", block_size=256)
    >>> bool(np.allclose(y_ref, resolvent.chain_attention(q, k, v, 0.9, method="dense")))
    True
    >>> y.shape
    (2, 256, 16)
    """
    block_size, topk = check_options(method, block_size, topk)
    qf, kf, vf, batch, dt, out_dt = prepare_qkv(q, k, v, check_finite)
    n, d = qf.shape[-2:]
    scale = _check_scale(scale, d)
    g = np.ascontiguousarray(check_gamma(gamma, batch, dt)).reshape(-1)
    if method == "dense":
        y = _dense.forward(qf, kf, vf, g, scale)
    elif method == "exact":
        y = _exact.forward(qf, kf, vf, g, scale)
    else:
        b = min(block_size or default_block_size(n, topk=topk), n)
        if topk:
            from . import _topk

            y = _topk.forward(qf, kf, vf, g, b, topk, scale)
        else:
            y = _blockwise.forward(qf, kf, vf, g, b, scale)
    return y.reshape(batch + y.shape[-2:]).astype(out_dt, copy=False)


def chain_attention_vjp(q, k, v, gamma, dy, *, method="blockwise", block_size=None, topk=0, scale=None,
                        return_dgamma=False, y=None, check_finite=True):
    r"""Vector-Jacobian product of :func:`chain_attention`: the gradients of ``sum(dy * Y)``.

    Parameters
    ----------
    q, k, v, gamma, method, block_size, topk, scale
        As for :func:`chain_attention`.
    dy : array_like, shape (..., n, dv)
        Cotangent of the output ``Y`` (its broadcast batch shape).
    return_dgamma : bool, optional
        Also return the gradient with respect to ``gamma``.
    y : array_like, shape (..., n, dv), optional
        The output of :func:`chain_attention` for the same arguments, if the caller kept it (as an
        autograd function does): ``blockwise`` then skips recomputing the forward pass.
    check_finite : bool, optional
        As for :func:`chain_attention`, checking ``dy`` too (default True); ``y`` is never checked.

    Returns
    -------
    dq, dk, dv : ndarray
        Shaped like ``q``, ``k``, ``v`` (summed over dimensions that broadcasting added).
    dgamma : ndarray, optional
        Shaped like ``gamma``; only with ``return_dgamma=True``.

    Raises
    ------
    ValueError
        As :func:`chain_attention`, and when ``dy`` does not have the output's shape.

    Notes
    -----
    With ``X = (I - gamma A)^{-1} A V``, ``Y = (1 - gamma) X`` and ``G = (I - gamma A)^{-T} (1 - gamma) dY``:
    ``dV = A^T G``, ``dA = G (V + gamma X)^T`` restricted to the entries of ``A`` (then through the
    softmax), ``dgamma = -<dY, X> + <G, A X>``.  ``blockwise`` solves the transposed, upper-triangular
    reduced system and keeps the forward's cost, O(n b d + m^2 d); ``exact`` streams column strips of
    ``A`` with O(n d) memory.  The derivation is in ``docs/chain_attention.md``.

    Examples
    --------
    >>> import numpy as np, resolvent
    >>> q, k, v = np.random.default_rng(0).standard_normal((3, 32, 4))
    >>> dq, dk, dv = resolvent.chain_attention_vjp(q, k, v, 0.5, np.ones((32, 4)))
    >>> dv.shape
    (32, 4)
    """
    block_size, topk = check_options(method, block_size, topk)
    shapes = [np.shape(x) for x in (q, k, v)]
    gamma_shape = np.shape(gamma)
    qf, kf, vf, batch, dt, out_dt = prepare_qkv(q, k, v, check_finite)
    B, n, d = qf.shape
    dvdim = vf.shape[-1]
    scale = _check_scale(scale, d)
    g = np.ascontiguousarray(check_gamma(gamma, batch, dt)).reshape(-1)
    dyf = as_inexact(dy, "dy", min_ndim=2)
    if dyf.shape != batch + (n, dvdim):
        raise ValueError(f"dy must have the output's shape {batch + (n, dvdim)}, got {dyf.shape}")
    if check_finite:
        check_finite_array(dyf, "dy")
    dyf = np.ascontiguousarray(dyf.reshape(B, n, dvdim), dtype=dt)
    yf = None
    if y is not None:
        yf = as_inexact(y, "y", min_ndim=2)
        if yf.shape != batch + (n, dvdim):
            raise ValueError(f"y must have the output's shape {batch + (n, dvdim)}, got {yf.shape}")
        yf = np.ascontiguousarray(yf.reshape(B, n, dvdim), dtype=dt)
    if method == "dense":
        grads = _dense.backward(qf, kf, vf, g, scale, dyf)
    elif method == "exact":
        grads = _exact.backward(qf, kf, vf, g, scale, dyf)
    else:
        b = min(block_size or default_block_size(n, topk=topk), n)
        if topk:
            from . import _topk

            grads = _topk.backward(qf, kf, vf, g, b, topk, scale, dyf, y=yf)
        else:
            grads = _blockwise.backward(qf, kf, vf, g, b, scale, dyf, y=yf)
    dq, dk, dvv, dg = grads
    out = [
        unbroadcast(x.reshape(batch + x.shape[-2:]), shp).astype(out_dt, copy=False)
        for x, shp in zip((dq, dk, dvv), shapes)
    ]
    if return_dgamma:
        out.append(unbroadcast(dg.reshape(batch), gamma_shape).astype(dt, copy=False))
    return tuple(out)


def block_mass(q, k, block_size, scale=None, *, topk=0):
    """Share of the dense causal attention's mass that ``blockwise`` keeps exact.

    For ``topk=0`` this is the mass inside the diagonal blocks,
    ``(1/n) sum_t sum_{s in B(t), s <= t} A_ts``; for ``topk > 0`` each token's selected blocks
    (SPEC 2.3) count too.  Close to 1 means the attention is nearly block diagonal and the
    blockwise evaluation is accurate; the dense normalisers are computed streaming, with no
    ``n x n`` buffer.

    Parameters
    ----------
    q, k : array_like, shape (..., n, d)
    block_size : int
    scale : float, optional
        Default ``1 / sqrt(d)``.
    topk : int, optional

    Returns
    -------
    ndarray, shape (...)
        One share in ``[0, 1]`` per batch entry (float64).

    Raises
    ------
    ValueError
        On mismatched shapes, a ``block_size`` < 1, a negative ``topk`` or non-finite input.

    Examples
    --------
    >>> import numpy as np, resolvent
    >>> q, k = np.random.default_rng(0).standard_normal((2, 64, 8))
    >>> float(resolvent.block_mass(q, k, block_size=64))
    1.0
    """
    block_size = check_positive_int(block_size, "block_size", allow_none=False)
    topk = _check_topk(topk)
    qf, kf, _, batch, dt, _ = prepare_qkv(q, k, np.zeros(np.shape(q)[-2:][:1] + (1,)))
    n, d = qf.shape[-2:]
    scale = _check_scale(scale, d)
    b = min(block_size, n)
    qf = qf.astype(np.float64)
    kf = kf.astype(np.float64)
    lse = _exact.row_logsumexp(qf, kf, scale)
    if topk:
        from . import _topk

        kept = _topk.kept_mass(qf, kf, b, topk, scale, lse)  # (B, n)
    else:
        m = -(-n // b)
        qb = _blockwise._pad_blocks(qf, b, m)
        kb = _blockwise._pad_blocks(kf, b, m)
        S = scale * (qb @ np.swapaxes(kb, -1, -2))
        S[..., ~np.tri(b, dtype=bool)] = -np.inf
        lse_b = _blockwise._pad_blocks(lse[..., None], b, m)  # (B, m, b, 1)
        kept = np.exp(S - lse_b).sum(axis=-1).reshape(-1, m * b)[:, :n]
    return np.clip(kept.mean(axis=-1), 0.0, 1.0).reshape(batch)


def check_chain_shapes(A, V):
    """The shape checks of ``chain`` (and its vjp, and the GPU backend's): ``(Vm, vector, batch)``
    with ``Vm`` of shape (..., n, k), whether ``V`` was a vector, and the broadcast batch shape."""
    n = A.shape[-1]
    if A.shape[-2] != n:
        raise ValueError(f"A must be square with shape (..., n, n), got {A.shape}")
    vector = V.ndim == 1
    Vm = V[:, None] if vector else V
    if Vm.shape[-2] != n:
        raise ValueError(f"V must have shape (..., {n}) or (..., {n}, k) to match A {A.shape}, got {V.shape}")
    try:
        batch = np.broadcast_shapes(A.shape[:-2], Vm.shape[:-2])
    except ValueError:
        raise ValueError(f"batch dimensions of A {A.shape[:-2]} and V {Vm.shape[:-2]} do not broadcast") from None
    return Vm, vector, batch


def chain(A, V, gamma, *, method="auto", block_size=None, tol=None):
    r"""The chain operator ``Y = (1 - gamma) A (I - gamma A)^{-1} V`` on an explicit matrix.

    Solves ``(I - gamma A) X = A V`` with :func:`resolvent.solve` (``z = 1`` on ``gamma A``, one
    value of ``gamma`` per batch entry) and returns ``(1 - gamma) X``.  When ``A`` is lower
    triangular (causal attention) a triangular solve is used whatever ``method`` says.

    Parameters
    ----------
    A : array_like, shape (..., n, n)
        Typically row-stochastic; ``gamma`` times its spectral radius must stay below 1 for the
        series interpretation (any ``A`` with ``I - gamma A`` non-singular is accepted).
    V : array_like, shape (..., n) or (..., n, k)
    gamma : float or array_like broadcastable to the batch dimensions
        In ``[0, 1)``.
    method : {"auto", "direct", "block_jacobi", "two_level"}, optional
        Passed to :func:`resolvent.solve` for a general ``A``.
    block_size, tol : optional
        Passed to :func:`resolvent.solve`.

    Returns
    -------
    ndarray, shape (..., n) or (..., n, k)

    Raises
    ------
    ValueError
        On bad shapes or ``gamma`` outside ``[0, 1)``.
    numpy.linalg.LinAlgError
        When ``I - gamma A`` is singular; :class:`resolvent.ConvergenceError` when an iterative
        method misses ``tol``.

    Examples
    --------
    >>> import numpy as np, resolvent
    >>> A = np.tril(np.ones((4, 4))); A /= A.sum(axis=1, keepdims=True)
    >>> resolvent.chain(A, np.ones(4), 0.5)
    array([1., 1., 1., 1.])
    """
    from ..linalg._solve import solve

    A = as_inexact(A, "A", min_ndim=2)
    V = as_inexact(V, "V", min_ndim=1)
    Vm, vector, batch = check_chain_shapes(A, V)
    dt = np.result_type(A.dtype, Vm.dtype)
    g = check_gamma(gamma, batch, np.result_type(dt, np.float32).type(0).real.dtype)[..., None, None]
    U = A @ Vm
    lower = not np.any(np.triu(A, 1))
    if lower:
        method = "direct"
    X = solve(g * A, U, z=1.0, method=method, block_size=block_size, tol=tol, lower=lower)
    Y = (1 - g) * X
    return Y[..., 0] if vector else Y
