"""Resolvent solves ``X = (zI - A)^{-1} B`` on arbitrary matrices: the public, validating layer.

The computing lives in ``_direct`` (LU / triangular), ``_block`` (block-Jacobi, two-level) and
``solve_shifts`` below (one complex Schur form, then a triangular solve per shift); this module
checks and converts the input, applies the ``method="auto"`` rule and shapes the output.  Derivations: docs/solvers.md.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from .._errors import SolveInfo
from .._validate import as_inexact, check_choice, check_finite_array, check_positive_int
from ._block import block_iterate
from ._direct import lu_solve_checked, triangular_solve_checked

__all__ = ["solve", "solve_shifts", "default_solve_block_size", "AUTO_DIRECT_MAX_N", "DEFAULT_MAXITER"]

METHODS = ("auto", "direct", "block_jacobi", "two_level")

#: ``method="auto"`` factors by LU up to this n (see ``solve``'s Notes).
AUTO_DIRECT_MAX_N = 2048
#: default ``maxiter`` of the iterative methods.
DEFAULT_MAXITER = 1000
_DEFAULT_TOL = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-10}


def default_solve_block_size(n: int) -> int:
    """The default ``block_size``: ``min(n, max(32, ceil(sqrt(n))))``.

    ``sqrt(n)`` balances the two set-up costs of the iterative methods, inverting the m blocks
    (``n b^2`` flops) and the m x m coarse matrix (``(n/b)^3``), so that each is at most ``n^2``,
    the cost of a single product with ``A``; the floor of 32 keeps the batched block inverses and
    products out of the regime where per-block overhead dominates.
    """
    return max(1, min(n, max(32, math.isqrt(max(n - 1, 0)) + 1)))


def _default_tol(dtype) -> float:
    return _DEFAULT_TOL[np.dtype(np.finfo(dtype).dtype)]


def _check_scalar(value, name: str):
    """A finite real or complex scalar (Python number, NumPy scalar or 0-d array)."""
    arr = np.asarray(value)
    if arr.ndim != 0 or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise ValueError(f"{name} must be a real or complex scalar, got {value!r}")
    if not np.isfinite(arr):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return arr.item()


def _check_tol(tol, dtype) -> float:
    if tol is None:
        return _default_tol(dtype)
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not (0 < tol < np.inf):
        raise ValueError(f"tol must be a positive finite real number or None, got {tol!r}")
    return float(tol)


def check_solve_shapes(A, B):
    """The shape checks of ``solve``, shared by the CPU and GPU backends.

    Returns ``(B3, vector, batch)``: ``B`` as (..., n, k), whether it was a vector, the broadcast
    batch shape.
    """
    if A.ndim < 2 or A.shape[-1] != A.shape[-2]:
        raise ValueError(
            f"A must be a square matrix or a stack of them, shape (..., n, n); got shape {A.shape}"
        )
    n = A.shape[-1]
    if B.ndim == 0:
        raise ValueError(f"B must have shape (..., n) or (..., n, k) with n = {n}; got a scalar")
    vector = B.ndim == 1 or (B.ndim == A.ndim - 1 and B.shape[-1] == n)
    if vector:
        if B.shape[-1] != n:
            raise ValueError(
                f"B must have shape (..., n) or (..., n, k) with n = {n} (A has shape {A.shape}); "
                f"got shape {B.shape}"
            )
        B3 = B[..., None]
    else:
        if B.shape[-2] != n:
            raise ValueError(
                f"B must have shape (..., n) or (..., n, k) with n = {n} (A has shape {A.shape}); "
                f"got shape {B.shape}, whose axis -2 has length {B.shape[-2]}"
            )
        B3 = B
    try:
        batch = np.broadcast_shapes(A.shape[:-2], B3.shape[:-2])
    except ValueError:
        raise ValueError(
            f"the batch dimensions of A {A.shape[:-2]} and B {B3.shape[:-2]} do not broadcast "
            f"(A has shape {A.shape}, B has shape {B.shape})"
        ) from None
    return B3, vector, batch


def _prepare(A, B, check_finite: bool):
    """Validate and convert ``A``, ``B``; return ``(A, B3, vector)`` with ``B3`` of shape (..., n, k)."""
    A = as_inexact(A, "A")
    B = as_inexact(B, "B")
    B3, vector, _ = check_solve_shapes(A, B)
    if check_finite:
        check_finite_array(A, "A")
        check_finite_array(B, "B")
    return A, B3, vector


def _common_dtype(A, B, z_is_complex: bool):
    dtype = np.result_type(A.dtype, B.dtype)
    if z_is_complex:
        dtype = np.result_type(dtype, np.complex64)
    return dtype


def _shift(A, z, dtype):
    """``zI - A`` as a new array of ``dtype``."""
    M = -A.astype(dtype, copy=True)
    n = A.shape[-1]
    M[..., np.arange(n), np.arange(n)] += z
    return M


def _direct(A, B, z, lower):
    """Direct solve of ``(zI - A) X = B`` (B of shape (..., n, k))."""
    M = _shift(A, z, B.dtype)
    what = f"zI - A (z = {z})"
    if A.ndim == 2 and B.ndim > 2:
        # One matrix, many batched right-hand sides: factor once, fold the batch into columns.
        n, k = B.shape[-2:]
        cols = np.moveaxis(B, -2, 0).reshape(n, -1)
        X = _direct(A, cols, z, lower)
        return np.moveaxis(X.reshape((n,) + B.shape[:-2] + (k,)), 0, -2)
    if lower:
        return triangular_solve_checked(M, B, lower=True, what=what)
    return lu_solve_checked(M, B, what=what)


def _relative_residual(A, B, X, z) -> float:
    R = B - (z * X - A @ X)
    bnorm = np.linalg.norm(B, axis=-2)
    rnorm = np.linalg.norm(R, axis=-2)
    rel = rnorm / np.where(bnorm > 0, bnorm, 1.0)
    return float(np.max(rel)) if rel.size else 0.0


def solve(A, B, *, z=1.0, method="auto", block_size=None, tol=None, maxiter=None, lower=False,
          check_finite=True, return_info=False):
    r"""Solve ``(zI - A) X = B``: the resolvent of ``A`` at ``z`` applied to ``B``.

    Parameters
    ----------
    A : (..., n, n) array_like
        Square matrix or stack of matrices; real or complex.  Integer and boolean input is promoted
        to float64.  With ``lower=True`` only the lower triangle is read.
    B : (..., n) or (..., n, k) array_like
        Right-hand side(s).  ``B`` is a vector (stack) when ``B.ndim == 1``, or when
        ``B.ndim == A.ndim - 1`` and ``B.shape[-1] == n``; otherwise it is a stack of ``n x k``
        matrices.  (NumPy >= 2 and SciPy treat only a 1-D ``B`` as a vector; the second case,
        NumPy 1's rule, is what lets one call solve a batch of vectors.  To have such a ``B`` read
        as a matrix, give it the same number of dimensions as ``A``: ``B[None]``.)  The batch
        dimensions of ``A`` and ``B`` broadcast against each other.
    z : complex, optional
        The shift (default 1).  A complex ``z`` (any value of type ``complex``) makes the result
        complex.
    method : {"auto", "direct", "block_jacobi", "two_level"}, optional
        ``"direct"``: LU with partial pivoting (a triangular solve when ``lower=True``).
        ``"block_jacobi"``: the block-Jacobi iteration on consecutive blocks of ``block_size``.
        ``"two_level"``: block-Jacobi followed, at every step, by a coarse correction on the
        piecewise constants over the blocks.  ``"auto"`` (default): see Notes.
    block_size : int, optional
        Block size of the iterative methods (the last block may be shorter; values above ``n``
        mean one block).  Default ``min(n, max(32, ceil(sqrt(n))))``.  Ignored by ``"direct"``.
    tol : float, optional
        Target relative residual ``max ||B - (zI - A) X||_2 / ||B||_2`` (per right-hand-side
        column, largest over batch and columns).  Default 1e-10 for float64/complex128, 1e-5 for
        float32/complex64.  The forward error may be up to ``cond(zI - A)`` times larger.
    maxiter : int, optional
        Step limit of the iterative methods, default 1000.
    lower : bool, optional
        ``A`` is lower triangular (as in ``scipy.linalg.solve_triangular``, entries above the
        diagonal are not read).  The direct method then uses a triangular solve.
    check_finite : bool, optional
        Check that ``A`` and ``B`` hold only finite numbers (default True).  Skipping it saves a
        pass over ``A``; a non-finite solution is still reported as ``LinAlgError``.
    return_info : bool, optional
        Return ``(X, info)`` and do not raise ``ConvergenceError``.

    Returns
    -------
    X : (..., n) or (..., n, k) ndarray
        The solution, with the broadcast batch shape.  dtype: the common type of ``A`` and ``B``
        (float32 stays float32), complex when ``z`` is complex.
    info : SolveInfo
        Only with ``return_info=True``: ``converged``, ``iterations`` (0 for direct), ``residual``
        (the relative residual reached), ``method`` (the method that ran; ``"auto"`` resolved).

    Raises
    ------
    ValueError
        ``A`` not square, ``B`` of a mismatched shape, batch shapes that do not broadcast,
        non-finite entries (with ``check_finite=True``), an unknown ``method``, ``block_size`` or
        ``maxiter`` < 1, a non-positive ``tol``, a non-finite ``z``.
    numpy.linalg.LinAlgError
        ``zI - A`` is singular to working precision (LAPACK's reciprocal condition estimate below
        machine epsilon, or a non-finite solution); for the iterative methods also when a diagonal
        block or the coarse matrix is.
    ConvergenceError
        An iterative method did not reach ``tol`` within ``maxiter`` steps, or diverged (a
        residual growing past 1e6 times its best value, or non-finite: detected at that step).
        A subclass of ``LinAlgError``; its ``info`` attribute says what was reached.

    Notes
    -----
    With ``M = zI - A`` split as ``M = D - N``, ``D`` block diagonal, block-Jacobi iterates
    ``X <- X + D^{-1}(B - M X)`` from ``X = 0``; the error obeys ``e <- D^{-1} N e`` and converges
    iff the spectral radius ``rho(D^{-1} N) < 1``.  The blocks' inverses are computed once per call.
    Two-level adds, after each step, ``X <- X + E (E^T M E)^{-1} E^T (B - M X)`` with ``E`` (n x m)
    the block indicator.  For a nearly completely decomposable stochastic ``A`` (blocks coupled
    with weight ``eps``) block-Jacobi contracts the slow, piecewise-constant error only by about
    ``eps / (z - 1 + eps)`` per step, so it needs on the order of ``eps / (z - 1)`` steps; the coarse
    correction removes exactly that component, and two-level's count stays small as ``z -> 1``.

    The ``"auto"`` rule: ``"direct"`` when ``lower=True`` (a triangular solve is O(n^2), cheaper
    than any iteration), when ``n <= 2048`` (LU costs 2/3 n^3 flops, about 0.15 s at n = 2048 on
    two cores, and is exact to rounding whatever the matrix), or when the iteration budget below
    is under 10 steps.  Otherwise ``"two_level"`` with ``maxiter`` capped at ``n // (3 k)``: a step
    costs about 2 n^2 k flops, so beyond that many steps LU would have been cheaper.  If two-level
    does not converge within that budget (or diverges, or meets a singular block), ``"auto"``
    falls back to ``"direct"``: it never fails where LU succeeds and costs at most about twice LU.

    Examples
    --------
    >>> import numpy as np
    >>> import resolvent
    >>> A = np.array([[0.5, 0.5], [0.25, 0.75]])
    >>> x = resolvent.solve(A, np.ones(2), z=2.0)
    >>> np.allclose((2.0 * np.eye(2) - A) @ x, 1.0)
    True
    >>> x, info = resolvent.solve(A, np.ones(2), z=2.0, method="two_level", block_size=1,
    ...                           return_info=True)
    >>> info.converged, info.method
    (True, 'two_level')
    """
    method = check_choice(method, "method", METHODS)
    block_size = check_positive_int(block_size, "block_size")
    maxiter = check_positive_int(maxiter, "maxiter")
    z = _check_scalar(z, "z")
    A, B3, vector = _prepare(A, B, check_finite)
    dtype = _common_dtype(A, B3, isinstance(z, complex))
    tol = _check_tol(tol, dtype)
    A = A.astype(dtype, copy=False)
    B3 = B3.astype(dtype, copy=False)
    zt = dtype.type(z)
    if lower:
        A = np.tril(A)
    n = A.shape[-1]
    k = B3.shape[-1]
    batch = np.broadcast_shapes(A.shape[:-2], B3.shape[:-2])

    def finish(X, info):
        if vector:
            X = X[..., 0]
        return (X, info) if return_info else X

    if n == 0 or k == 0 or math.prod(batch) == 0:
        X = np.zeros(batch + B3.shape[-2:], dtype=dtype)
        return finish(X, SolveInfo(True, 0, 0.0, "direct" if method == "auto" else method))

    def run_direct():
        X = _direct(A, B3, zt, lower)
        X = np.broadcast_to(X, batch + X.shape[-2:]) if X.shape[:-2] != batch else X
        residual = _relative_residual(A, B3, X, zt) if return_info else 0.0
        return X, SolveInfo(True, 0, residual, "direct")

    bs = default_solve_block_size(n) if block_size is None else block_size
    if method == "auto":
        budget = n // (3 * k)
        if lower or n <= AUTO_DIRECT_MAX_N or budget < 10:
            return finish(*run_direct())
        try:
            X, info = block_iterate(
                A, B3, zt, block_size=bs, two_level=True, tol=tol,
                maxiter=min(maxiter or DEFAULT_MAXITER, budget), return_info=False,
            )
        except np.linalg.LinAlgError:  # ConvergenceError included: LU is the safe fallback
            return finish(*run_direct())
        return finish(X, info)
    if method == "direct":
        return finish(*run_direct())
    X, info = block_iterate(
        A, B3, zt, block_size=bs, two_level=(method == "two_level"), tol=tol,
        maxiter=maxiter or DEFAULT_MAXITER, return_info=return_info,
    )
    return finish(X, info)


def solve_shifts(A, B, zs, *, lower=False, check_finite=True):
    r"""Solve ``(z I - A) X = B`` for many shifts ``z`` with one Schur factorisation.

    Parameters
    ----------
    A : (..., n, n) array_like
        Square matrix or stack of matrices, real or complex.  With ``lower=True`` only the lower
        triangle is read and no factorisation is needed.
    B : (..., n) or (..., n, k) array_like
        Right-hand side(s); the vector convention and batch broadcasting are those of `solve`.
    zs : (s,) array_like
        The shifts, real or complex.
    lower : bool, optional
        ``A`` is lower triangular: skip the Schur form and solve with ``zI - A`` directly.
    check_finite : bool, optional
        Check ``A``, ``B`` for inf/NaN (default True); ``zs`` is always checked.

    Returns
    -------
    X : (s, ..., n) or (s, ..., n, k) ndarray
        ``X[i]`` solves ``(zs[i] I - A) X[i] = B``.  Real when ``A``, ``B`` and ``zs`` are all real
        (the exact answer is real; the imaginary rounding residue of the complex Schur form is
        dropped), complex otherwise; single precision stays single precision.

    Raises
    ------
    ValueError
        Shapes as in `solve`; ``zs`` not one-dimensional; non-finite input.
    numpy.linalg.LinAlgError
        Some ``zs[i] I - A`` is singular to working precision (the message gives ``i`` and the
        shift).

    Notes
    -----
    The complex Schur form ``A = Q T Q^*`` (``Q`` unitary, ``T`` upper triangular, computed once
    by ``scipy.linalg.schur(output="complex")``, O(n^3)) gives
    ``(zI - A)^{-1} B = Q (zI - T)^{-1} Q^* B``: each shift then costs one triangular solve and two
    products with ``Q``, O(n^2 k), instead of a fresh O(n^3) LU.  ``zI - T`` is unitarily similar
    to ``zI - A``, so it is exactly as well conditioned; its diagonal ``z - lambda_i`` shows how
    close ``z`` is to the spectrum.

    Examples
    --------
    >>> import numpy as np
    >>> import resolvent
    >>> A = np.array([[0.5, 0.5], [0.25, 0.75]])
    >>> X = resolvent.solve_shifts(A, np.ones(2), [2.0, 3.0, 1.5 + 1j])
    >>> X.shape, X.dtype
    ((3, 2), dtype('complex128'))
    >>> np.allclose(X[0], resolvent.solve(A, np.ones(2), z=2.0))
    True
    """
    import scipy.linalg as sla

    A, B3, vector = _prepare(A, B, check_finite)
    zs_arr = np.asarray(zs)
    if zs_arr.ndim != 1 or not (np.issubdtype(zs_arr.dtype, np.number) or zs_arr.dtype == bool):
        raise ValueError(
            f"zs must be a one-dimensional sequence of real or complex shifts, got shape "
            f"{zs_arr.shape} and dtype {zs_arr.dtype}"
        )
    if not np.isfinite(zs_arr).all():
        raise ValueError("zs must contain only finite shifts (found inf or NaN)")
    real_result = not (np.iscomplexobj(A) or np.iscomplexobj(B3) or np.iscomplexobj(zs_arr))
    real_dtype = np.result_type(A.dtype, B3.dtype)
    cdtype = np.result_type(real_dtype, np.complex64)
    n = A.shape[-1]
    batch = np.broadcast_shapes(A.shape[:-2], B3.shape[:-2])
    s = zs_arr.shape[0]
    out = np.empty((s,) + batch + B3.shape[-2:], dtype=cdtype)
    if out.size:
        if lower:
            T, Y, Q = np.tril(A).astype(cdtype), B3.astype(cdtype), None
        else:
            T, Q = sla.schur(A.astype(cdtype), output="complex", check_finite=False)
            T = np.triu(T)  # LAPACK leaves zeros below the diagonal; make it a guarantee
            Y = np.swapaxes(Q.conj(), -1, -2) @ B3
            # The computed eigenvalues diag(T) are exact for some A + dA, ||dA|| ~ n eps ||A||
            # (the Schur form's backward error): a shift closer than that to one of them cannot be
            # told apart from an eigenvalue of A.
            lam = np.diagonal(T, axis1=-2, axis2=-1)
            radius = n * np.finfo(cdtype).eps * np.linalg.norm(A, axis=(-2, -1))
        for i, z in enumerate(zs_arr.astype(cdtype)):
            if Q is not None:
                dist = np.abs(z - lam).min(axis=-1)
                if np.any(dist <= radius):
                    j = np.unravel_index(int(np.argmax(dist <= radius)), np.shape(dist))
                    raise np.linalg.LinAlgError(
                        f"zs[{i}] I - A (zs[{i}] = {zs_arr[i]}) is singular to working precision: "
                        f"the shift lies within {float(dist[j]):.1e} of an eigenvalue of A"
                        + (f" (batch slice {tuple(int(t) for t in j)})" if j else "")
                        + f", inside the Schur form's backward error n eps ||A||_F = "
                        f"{float(np.broadcast_to(radius, np.shape(dist))[j]):.1e}"
                    )
            M = -T
            M[..., np.arange(n), np.arange(n)] += z
            what = f"zs[{i}] I - A (zs[{i}] = {zs_arr[i]})"
            W = triangular_solve_checked(M, Y, lower=lower, what=what)
            out[i] = W if Q is None else Q @ W
    if real_result:
        out = out.real.astype(real_dtype, copy=False)
        out = np.ascontiguousarray(out)
    if vector:
        out = out[..., 0]
    return out
