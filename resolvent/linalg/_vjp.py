"""Backward passes (vector-Jacobian products) of :func:`resolvent.solve` and :func:`resolvent.chain`.

Both reduce to one more resolvent solve with the (conjugate) transposed matrix, so they reuse the
forward's machinery and its cost class: a lower-triangular system stays triangular (the transposed,
upper-triangular system is solved as a lower one on the reversed index order), an iterative method
stays iterative (block-Jacobi on ``M^H`` has iteration matrix ``(N D^{-1})^H``, similar to the
forward's ``D^{-1} N``, so it converges exactly when the forward does).

Complex inputs follow PyTorch's convention: for a real loss ``L`` the gradient of a complex input
``x`` is ``dL/d conj(x)`` (so the map ``x -> M x`` pulls a cotangent ``g`` back to ``M^H g``).  For
real inputs this is the ordinary gradient.
"""

from __future__ import annotations

import numpy as np

from .._validate import as_inexact, check_finite_array, check_gamma, unbroadcast
from ..attention._api import check_chain_shapes
from ._solve import _check_scalar, _common_dtype, _prepare, solve

__all__ = ["solve_vjp", "chain_vjp"]


def _as_input_dtype(grad: np.ndarray, like: np.ndarray) -> np.ndarray:
    """Gradients have their input's dtype: real part for a real input, precision kept."""
    if np.iscomplexobj(grad) and not np.iscomplexobj(like):
        grad = grad.real
    return np.ascontiguousarray(grad, dtype=like.dtype)


def _matrix_form(B3: np.ndarray, ndim: int) -> np.ndarray:
    """Prepend unit axes so that ``solve`` reads ``B3`` as a stack of matrices, never as vectors."""
    return B3.reshape((1,) * max(0, ndim - B3.ndim) + B3.shape)


def _adjoint_solve(A, R, z, *, lower, **solve_kw):
    """``(zI - A)^{-H} R`` for ``R`` of shape (..., n, k).

    With ``lower=True`` the system ``(zI - A)^H`` is upper triangular; reversing the index order
    (``P U P`` with ``P`` the reversal permutation is lower triangular) turns it into a lower one,
    so the triangular solver of the forward is reused and the cost stays O(n^2 k).
    """
    AH = np.conj(np.swapaxes(A, -1, -2))
    zc = np.conj(z) if isinstance(z, complex) else z
    if lower:
        X = solve(AH[..., ::-1, ::-1], R[..., ::-1, :], z=zc, lower=True, check_finite=False)
        return X[..., ::-1, :]
    return solve(AH, R, z=zc, check_finite=False, **solve_kw)


def solve_vjp(A, B, dX, *, z=1.0, lower=False, method="auto", block_size=None, tol=None, maxiter=None,
              check_finite=True, X=None, return_dz=False):
    r"""Vector-Jacobian product of :func:`resolvent.solve`: the gradients of ``sum(dX * X)``.

    ``X = (zI - A)^{-1} B``.  With ``M = zI - A`` and ``dB = M^{-H} dX``:
    ``dA = dB X^H``, ``dz = -sum(conj(X) * dB)``.

    Parameters
    ----------
    A : (..., n, n) array_like
        As for :func:`resolvent.solve`.
    B : (..., n) or (..., n, k) array_like
        As for :func:`resolvent.solve` (same vector convention).
    dX : array_like
        Cotangent of the solution, shaped like ``X`` (the broadcast batch shape).
    z : complex, optional
        The shift, default 1.
    lower : bool, optional
        ``A`` is lower triangular (its upper triangle is not read, and ``dA`` is zero there).
    method, block_size, tol, maxiter : optional
        Passed to :func:`resolvent.solve` for the forward solve (when ``X`` is not given) and for
        the adjoint solve with ``(zI - A)^H``.
    check_finite : bool, optional
        Check ``A``, ``B`` and ``dX`` for inf/NaN (default True).
    X : array_like, optional
        The forward solution, if already computed; saves one solve.
    return_dz : bool, optional
        Also return the gradient with respect to ``z``.

    Returns
    -------
    dA : ndarray, shape of ``A``
    dB : ndarray, shape of ``B``
        Summed over the dimensions that broadcasting added; each in its input's dtype (the real
        part for a real input).
    dz : scalar ndarray, optional
        Only with ``return_dz=True``; real when ``z`` is real.

    Raises
    ------
    ValueError
        Shapes as in :func:`resolvent.solve`, or ``dX`` / ``X`` not shaped like the solution.
    numpy.linalg.LinAlgError
        ``zI - A`` is singular; :class:`resolvent.ConvergenceError` when an iterative method misses
        ``tol``.

    Notes
    -----
    From ``M X = B``: ``M dX_fwd = dB_fwd - dM X`` with ``dM = dz I - dA``, so for a loss ``L`` with
    cotangent ``dX`` the adjoint ``dB = M^{-H} dX`` gives ``dL = <dB, dB_fwd> + <dB X^H, dA_fwd>
    - dz <dB, X>``.  The adjoint solve reuses ``method``: for ``lower=True`` the upper-triangular
    ``M^H`` is solved as a lower-triangular system on the reversed index order, O(n^2 k).  Complex
    gradients follow PyTorch's convention (see the module docstring).

    Examples
    --------
    >>> import numpy as np, resolvent
    >>> A = np.array([[0.5, 0.5], [0.25, 0.75]])
    >>> dA, dB = resolvent.solve_vjp(A, np.ones(2), np.array([1.0, 0.0]), z=2.0)
    >>> dB.shape, dA.shape
    ((2,), (2, 2))
    """
    z = _check_scalar(z, "z")
    A, B3, vector = _prepare(A, B, check_finite)
    dtype = _common_dtype(A, B3, isinstance(z, complex))
    n, k = B3.shape[-2:]
    batch = np.broadcast_shapes(A.shape[:-2], B3.shape[:-2])
    x_shape = batch + ((n,) if vector else (n, k))
    dX = as_inexact(dX, "dX")
    if dX.shape != x_shape:
        raise ValueError(f"dX must be shaped like the solution X, {x_shape}, got {dX.shape}")
    if check_finite:
        check_finite_array(dX, "dX")
    dX3 = (dX[..., None] if vector else dX).astype(np.result_type(dtype, dX.dtype), copy=False)
    kw = dict(method=method, block_size=block_size, tol=tol, maxiter=maxiter)
    Aw = np.tril(A) if lower else A
    if X is None:
        X3 = solve(Aw, _matrix_form(B3, A.ndim), z=z, lower=lower, check_finite=False, **kw)
    else:
        X = as_inexact(X, "X")
        if X.shape != x_shape:
            raise ValueError(f"X must be the solution's shape {x_shape}, got {X.shape}")
        X3 = X[..., None] if vector else X
    dB3 = _adjoint_solve(Aw.astype(dtype, copy=False), dX3, z, lower=lower, **kw)
    dA = dB3 @ np.conj(np.swapaxes(X3, -1, -2))
    if lower:
        dA = np.tril(dA)
    out = [
        _as_input_dtype(unbroadcast(dA, A.shape), A),
        _as_input_dtype(unbroadcast(dB3, B3.shape), B3),
    ]
    if vector:
        out[1] = out[1][..., 0]
    if return_dz:
        dz = -np.sum(np.conj(X3) * dB3)
        out.append(np.asarray(dz if isinstance(z, complex) else dz.real))
    return tuple(out)


def chain_vjp(A, V, gamma, dY, *, method="auto", block_size=None, tol=None):
    r"""Vector-Jacobian product of :func:`resolvent.chain`: the gradients of ``sum(dY * Y)``.

    ``Y = (1 - gamma) X`` with ``X = (I - gamma A)^{-1} A V``.  With
    ``G = (I - gamma A)^{-H} (1 - gamma) dY``:

    ``dV = A^H G``,  ``dA = G (V + gamma X)^H``,  ``dgamma = Re(-<dY, X> + <G, A X>)``

    where ``<P, Q> = sum(conj(Q) * P)`` over the last two axes.

    Parameters
    ----------
    A : array_like, shape (..., n, n)
    V : array_like, shape (..., n) or (..., n, k)
    gamma : float or array_like broadcastable to the batch dimensions
        In ``[0, 1)``.
    dY : array_like
        Cotangent of ``Y``, shaped like ``Y`` (the broadcast batch shape).
    method, block_size, tol : optional
        Passed to :func:`resolvent.solve` for a general ``A`` (forward and adjoint solves); a lower
        triangular ``A`` is solved directly, as in :func:`resolvent.chain`.

    Returns
    -------
    dA : ndarray, shape of ``A``
    dV : ndarray, shape of ``V``
    dgamma : ndarray, shape of ``gamma`` (0-d for a scalar)
        Summed over the dimensions that broadcasting added.

    Raises
    ------
    ValueError
        On bad shapes, ``gamma`` outside ``[0, 1)``, ``dY`` not shaped like ``Y``.
    numpy.linalg.LinAlgError
        When ``I - gamma A`` is singular; :class:`resolvent.ConvergenceError` when an iterative
        method misses ``tol``.

    Notes
    -----
    ``(I - gamma A) X = A V`` differentiates to
    ``(I - gamma A) dX = dA V + gamma dA X + dgamma A X + A dV``; pairing with the adjoint ``G``
    gives the three formulas.  When ``A`` is lower triangular, ``(I - gamma A)^H`` is upper
    triangular and is solved in O(n^2 k) on the reversed index order.  ``dA`` is the full
    derivative, entries above the diagonal included: ``chain``'s value does not depend on which
    solver ran, so perturbing a zero upper entry changes ``Y`` (to first order by ``dA``).

    Examples
    --------
    >>> import numpy as np, resolvent
    >>> A = np.tril(np.ones((4, 4))); A /= A.sum(axis=1, keepdims=True)
    >>> dA, dV, dgamma = resolvent.chain_vjp(A, np.ones(4), 0.5, np.ones(4))
    >>> abs(float(dgamma)) < 1e-12  # a constant V gives Y = V whatever gamma is
    True
    """
    A = as_inexact(A, "A", min_ndim=2)
    V = as_inexact(V, "V", min_ndim=1)
    Vm, vector, batch = check_chain_shapes(A, V)
    n = A.shape[-1]
    dt = np.result_type(A.dtype, Vm.dtype)
    real_dt = np.result_type(dt, np.float32).type(0).real.dtype
    gamma_shape = np.shape(gamma)
    g = check_gamma(gamma, batch, real_dt)[..., None, None]
    y_shape = batch + ((n,) if vector else (n, Vm.shape[-1]))
    dY = as_inexact(dY, "dY")
    if dY.shape != y_shape:
        raise ValueError(f"dY must be shaped like the output Y, {y_shape}, got {dY.shape}")
    dY3 = dY[..., None] if vector else dY
    lower = not np.any(np.triu(A, 1))
    kw = {} if lower else dict(method=method, block_size=block_size, tol=tol)
    gA = g * A
    X = solve(gA, A @ Vm, z=1.0, lower=lower, check_finite=False, **kw)
    G = _adjoint_solve(gA, (1 - g) * dY3, 1.0, lower=lower, **kw)
    dV = np.conj(np.swapaxes(A, -1, -2)) @ G
    dA = G @ np.conj(np.swapaxes(Vm + g * X, -1, -2))
    # No tril even for a lower-triangular A: chain's value does not depend on which solver ran, so
    # entries above the diagonal have a true (non-zero) derivative, unlike solve(lower=True).
    dgamma = np.real(np.sum(-np.conj(X) * dY3 + np.conj(A @ X) * G, axis=(-2, -1)))
    dV = _as_input_dtype(unbroadcast(dV, Vm.shape), Vm)
    return (
        _as_input_dtype(unbroadcast(dA, A.shape), A),
        dV[..., 0] if vector else dV,
        unbroadcast(dgamma, gamma_shape).astype(real_dt, copy=False),
    )
