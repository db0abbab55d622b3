"""Resolvent solves on CuPy arrays: batched LU (cuSOLVER through ``cupy.linalg.solve``) and the
blocked triangular solver of :mod:`._blockwise` for ``lower=True``.

Singularity is reported as on the CPU (``LinAlgError``), by the checks that need no LAPACK condition
estimate: a non-finite solution, a zero or badly spread diagonal for triangular systems, and the
lower bound ``||M||_1 ||X||_1 / ||B||_1`` on the condition number exceeding ``1/eps``.  Each check
costs one synchronisation.
"""

from __future__ import annotations

import numpy as np


def _cp():
    import cupy

    return cupy


def prepare(A, B, z, check_finite):
    """Validate as ``resolvent.linalg._solve._prepare``; return ``(A, B3, vector, dtype, batch)``."""
    from ..linalg._solve import check_solve_shapes
    from ._api import _all_finite, _as_float

    A = _as_float(A, "A")
    B = _as_float(B, "B")
    B3, vector, batch = check_solve_shapes(A, B)
    if check_finite:
        _all_finite(("A", A), ("B", B))
    dtype = np.result_type(A.dtype, B3.dtype)
    if isinstance(z, complex):
        dtype = np.result_type(dtype, np.complex64)
    return A.astype(dtype, copy=False), B3.astype(dtype, copy=False), vector, dtype, batch


def _shift(A, z, dtype):
    cp = _cp()
    n = A.shape[-1]
    return cp.eye(n, dtype=dtype) * dtype.type(z) - A.astype(dtype, copy=False)


def check_solution(M, X, B, what):
    cp = _cp()
    eps = float(np.finfo(X.dtype).eps)
    mnorm = cp.abs(M).sum(axis=-2).max(axis=-1)
    xnorm = cp.abs(X).sum(axis=-2)
    bnorm = cp.abs(B).sum(axis=-2)
    bound = cp.where(bnorm > 0, mnorm[..., None] * xnorm / cp.where(bnorm > 0, bnorm, 1), 0)
    finite, worst = (cp.asnumpy(v) for v in (cp.isfinite(X).all(), bound.max() if bound.size else cp.zeros(())))
    if not finite:
        raise np.linalg.LinAlgError(
            f"the solution is not finite: {what} is singular or too ill-conditioned for "
            f"{X.dtype}, or (with check_finite=False) an input holds inf or NaN"
        )
    if float(worst) * eps > 1.0:
        raise np.linalg.LinAlgError(
            f"{what} is singular to working precision: the computed solution shows a condition "
            f"number of at least {float(worst):.2e} > 1/eps = {1 / eps:.2e}"
        )


def _check_diagonal(M, what):
    cp = _cp()
    n = M.shape[-1]
    d = cp.abs(cp.diagonal(M, axis1=-2, axis2=-1)).reshape(-1, n)
    dmin = cp.asnumpy(d.min(axis=-1))
    dmax = cp.asnumpy(d.max(axis=-1))
    if np.any(dmin == 0):
        raise np.linalg.LinAlgError(f"{what} is singular: a diagonal entry is exactly zero")
    ratio = float(np.max(dmax / dmin))
    eps = float(np.finfo(M.dtype).eps)
    if ratio * eps > 1.0:
        raise np.linalg.LinAlgError(
            f"{what} is singular to working precision: its diagonal (the eigenvalues) spans a "
            f"ratio of {ratio:.2e} > 1/eps = {1 / eps:.2e}"
        )


def triangular(M, B, lower, what):
    """``M^{-1} B`` for triangular ``M`` (real: blocked kernels; complex: batched LU)."""
    cp = _cp()
    from ._blockwise import lower_solve

    _check_diagonal(M, what)
    batch = np.broadcast_shapes(M.shape[:-2], B.shape[:-2])
    n, k = B.shape[-2:]
    Mb = cp.ascontiguousarray(cp.broadcast_to(M, batch + M.shape[-2:])).reshape(-1, n, n)
    Bb = cp.ascontiguousarray(cp.broadcast_to(B, batch + B.shape[-2:])).reshape(-1, n, k)
    if M.dtype.kind == "c":
        X = cp.linalg.solve(Mb, Bb)
    else:
        Mb = cp.tril(Mb) if lower else cp.triu(Mb)
        X = lower_solve(cp, Mb, Bb, lower=lower)
    X = X.reshape(batch + (n, k))
    check_solution(M, X, B, what)
    return X


def general(M, B, what):
    cp = _cp()
    batch = np.broadcast_shapes(M.shape[:-2], B.shape[:-2])
    Mb = cp.broadcast_to(M, batch + M.shape[-2:])
    Bb = cp.broadcast_to(B, batch + B.shape[-2:])
    X = cp.linalg.solve(Mb, Bb)
    check_solution(M, X, B, what)
    return X


def solve_direct(A, B3, z, lower, dtype, batch):
    cp = _cp()
    n = A.shape[-1]
    if n == 0 or B3.shape[-1] == 0 or math_prod(batch) == 0:
        return cp.zeros(batch + B3.shape[-2:], dtype=dtype)
    M = _shift(A, z, dtype)
    what = f"zI - A (z = {z})"
    if lower:
        return triangular(cp.tril(M), B3, True, what)
    return general(M, B3, what)


def math_prod(shape):
    out = 1
    for s in shape:
        out *= s
    return out


def relative_residual(A, B, X, z):
    cp = _cp()
    R = B - (z * X - A @ X)
    bnorm = cp.linalg.norm(B, axis=-2)
    rnorm = cp.linalg.norm(R, axis=-2)
    rel = rnorm / cp.where(bnorm > 0, bnorm, 1.0)
    return float(rel.max()) if rel.size else 0.0


def solve_shifts(A, B, zs, *, lower=False, check_finite=True):
    """``(z I - A)^{-1} B`` for every shift: one batched LU over all shifts (cupy has no Schur form);
    with ``lower=True`` the blocked triangular solver per shift."""
    cp = _cp()
    zs_arr = cp.asnumpy(zs) if isinstance(zs, cp.ndarray) else np.asarray(zs)
    if zs_arr.ndim != 1 or not (np.issubdtype(zs_arr.dtype, np.number) or zs_arr.dtype == bool):
        raise ValueError(
            f"zs must be a one-dimensional sequence of real or complex shifts, got shape "
            f"{zs_arr.shape} and dtype {zs_arr.dtype}"
        )
    if not np.isfinite(zs_arr).all():
        raise ValueError("zs must contain only finite shifts (found inf or NaN)")
    A, B3, vector, real_dtype, batch = prepare(A, B, 1.0, check_finite)
    complex_z = np.iscomplexobj(zs_arr)
    dtype = np.result_type(real_dtype, np.complex64) if complex_z else real_dtype
    A = A.astype(dtype, copy=False)
    B3 = B3.astype(dtype, copy=False)
    s = zs_arr.shape[0]
    out = cp.empty((s,) + batch + B3.shape[-2:], dtype=dtype)
    if lower:
        A = cp.tril(A)
    for i, z in enumerate(zs_arr.astype(dtype)):
        M = _shift(A, z, dtype)
        what = f"zs[{i}] I - A (zs[{i}] = {zs_arr[i]})"
        out[i] = triangular(M, B3, True, what) if lower else general(M, B3, what)
    if vector:
        out = out[..., 0]
    return out
