"""Block-Jacobi and two-level (block-Jacobi + piecewise-constant coarse correction) iterations.

Private and unchecked: ``A`` is ``(..., n, n)``, ``B`` is ``(..., n, k)`` (batch dimensions broadcast),
one inexact dtype, ``z`` a scalar of that dtype.  The derivations are in docs/solvers.md.

Block factors.  The diagonal blocks ``D_J`` of ``M = zI - A`` are inverted once per call with one
batched ``numpy.linalg.inv`` over all blocks and all batch slices (the last, shorter block in a
second call), and each step applies them with one batched ``matmul``.  The alternative,
``scipy.linalg.lu_factor``/``lu_solve``, loops over blocks in Python at every step.  An explicit
inverse is usually discouraged because ``inv(D) @ r`` has forward error ~ cond(D) eps instead of
LU's backward error, but here the error of ``D^{-1}`` only perturbs the preconditioner: the residual
``B - M X`` is always formed with the exact ``M``, so the converged solution is as accurate as the
tolerance says.  The explicit inverse also gives the exact 1-norm condition number of every block
for free, which is how a (numerically) singular block is reported.  The coarse matrix ``E^T M E``
(m x m) is inverted the same way.
"""

from __future__ import annotations

import numpy as np

from .._errors import ConvergenceError, SolveInfo

__all__ = ["block_iterate"]

# A residual this many times larger than the best one seen (and than ||B||) means divergence.
DIVERGENCE_FACTOR = 1e6


def _eps(dtype) -> float:
    return float(np.finfo(dtype).eps)


def _batch_index(flat: int, shape: tuple) -> str:
    return f" in batch slice {tuple(int(i) for i in np.unravel_index(flat, shape))}" if shape else ""


def _inverse_checked(D, label) -> np.ndarray:
    """Inverse of each matrix in the stack ``D`` (..., p, p); LinAlgError names a singular one.

    ``label(flat_index)`` describes matrix ``flat_index`` of the flattened stack.
    """
    p = D.shape[-1]
    flat = D.reshape(-1, p, p)
    try:
        inv = np.linalg.inv(D)
    except np.linalg.LinAlgError:
        for i in range(flat.shape[0]):  # error path only: find which one
            try:
                np.linalg.inv(flat[i])
            except np.linalg.LinAlgError:
                raise np.linalg.LinAlgError(f"{label(i)} is singular") from None
        raise  # pragma: no cover - the batched call failed but no single one does
    invflat = inv.reshape(-1, p, p)
    with np.errstate(over="ignore", invalid="ignore"):
        cond = np.abs(flat).sum(axis=-2).max(axis=-1) * np.abs(invflat).sum(axis=-2).max(axis=-1)
    bad = ~(cond * _eps(D.dtype) <= 1.0)  # also catches inf / NaN
    if np.any(bad):
        i = int(np.flatnonzero(bad)[0])
        raise np.linalg.LinAlgError(
            f"{label(i)} is singular to working precision (1-norm condition number "
            f"{cond[i]:.2e} > 1/eps = {1 / _eps(D.dtype):.2e})"
        )
    return inv


class _BlockInverse:
    """``D^{-1}`` for the block diagonal ``D`` of ``M``: blocks of size b, the last one may be shorter."""

    def __init__(self, M, b: int):
        n = M.shape[-1]
        self.n, self.b = n, b
        self.q, self.rem = divmod(n, b)
        self.batch = batch = M.shape[:-2]
        q, rem = self.q, self.rem

        def describe(J, lo, hi, batch_flat):
            return f"diagonal block {J} (rows {lo}:{hi}) of zI - A{_batch_index(batch_flat, batch)}"

        self.full = None
        if q:
            head = M[..., : q * b, : q * b].reshape(batch + (q, b, q, b))
            blocks = np.diagonal(head, axis1=-4, axis2=-2)  # (..., b, b, q)
            blocks = np.moveaxis(blocks, -1, -3)  # (..., q, b, b)

            def label_full(i):
                batch_flat, J = divmod(i, q)
                return describe(J, J * b, (J + 1) * b, batch_flat)

            self.full = _inverse_checked(blocks, label_full)
        self.last = None
        if rem:
            self.last = _inverse_checked(
                M[..., q * b :, q * b :], lambda i: describe(q, q * b, n, i)
            )

    def apply(self, R):
        """``D^{-1} R`` for ``R`` of shape (..., n, k)."""
        b, q = self.b, self.q
        out = np.empty(np.broadcast_shapes(R.shape[:-2], self.batch) + R.shape[-2:], R.dtype)
        k = R.shape[-1]
        if q:
            head = R[..., : q * b, :].reshape(R.shape[:-2] + (q, b, k))
            out[..., : q * b, :] = (self.full @ head).reshape(out.shape[:-2] + (q * b, k))
        if self.rem:
            out[..., q * b :, :] = self.last @ R[..., q * b :, :]
        return out


class _Coarse:
    """The coarse correction on the span of the block indicator ``E`` (n x m)."""

    def __init__(self, A, z, b: int):
        n = A.shape[-1]
        self.starts = np.arange(0, n, b)
        self.sizes = np.diff(np.append(self.starts, n))
        # A E: sum the columns of each block; E^T (.) sums the rows of each block.
        self.AE = np.add.reduceat(A, self.starts, axis=-1)  # (..., n, m)
        self.z = z
        ME = -self.AE
        ME[..., np.arange(n), np.repeat(np.arange(len(self.starts)), self.sizes)] += z  # z E - A E
        C = np.add.reduceat(ME, self.starts, axis=-2)  # E^T M E, (..., m, m)
        batch = A.shape[:-2]
        self.Cinv = _inverse_checked(
            C,
            lambda i: "the coarse matrix E^T (zI - A) E (block sums of zI - A)"
            + _batch_index(i, batch),
        )

    def correct(self, X, R):
        """``e = C^{-1} E^T R``; ``X += E e``; ``R -= M E e`` (in place, R recomputed cheaply)."""
        e = self.Cinv @ np.add.reduceat(R, self.starts, axis=-2)  # (..., m, k)
        Ee = np.repeat(e, self.sizes, axis=-2)
        X += Ee
        R -= self.z * Ee - self.AE @ e


def _residual_norm(R, bscale) -> float:
    return float(np.max(np.linalg.norm(R, axis=-2) / bscale)) if R.size else 0.0


def block_iterate(A, B, z, *, block_size: int, two_level: bool, tol: float, maxiter: int,
                  return_info: bool):
    """Run block-Jacobi (``two_level=False``) or the two-level iteration from ``X = 0``.

    Returns ``(X, info)``.  Raises ConvergenceError when ``tol`` is not reached (unless
    ``return_info``), LinAlgError when a diagonal block or the coarse matrix is singular.
    """
    method = "two_level" if two_level else "block_jacobi"
    n = A.shape[-1]
    b = min(block_size, n)
    M = -A
    M[..., np.arange(n), np.arange(n)] += z  # zI - A, batch shape of A only
    Dinv = _BlockInverse(M, b)
    del M
    coarse = _Coarse(A, z, b) if two_level else None

    batch = np.broadcast_shapes(A.shape[:-2], B.shape[:-2])
    B = np.broadcast_to(B, batch + B.shape[-2:])
    bnorm = np.linalg.norm(B, axis=-2)
    bscale = np.where(bnorm > 0, bnorm, 1.0)
    X = np.zeros(B.shape, dtype=B.dtype)
    R = np.array(B)
    res = _residual_norm(R, bscale)
    best = res
    it = 0
    diverged = not np.isfinite(res)  # B holds inf/NaN (possible only with check_finite=False)
    growth = res
    while res > tol and it < maxiter:
        Xn = X + Dinv.apply(R)
        Rn = B - (z * Xn - A @ Xn)
        if coarse is not None:
            coarse.correct(Xn, Rn)
        rn = _residual_norm(Rn, bscale)
        if not np.isfinite(rn) or rn > DIVERGENCE_FACTOR * max(1.0, best):
            diverged = True
            growth = rn
            break
        X, R, res = Xn, Rn, rn
        best = min(best, res)
        it += 1
    converged = res <= tol
    info = SolveInfo(converged=bool(converged), iterations=it, residual=res, method=method)
    if not converged and not return_info:
        if diverged and not np.isfinite(best):
            msg = (
                f"{method} diverged: the relative residual is not finite at the start: B holds "
                "inf or NaN (an unchecked input, check_finite=False)"
            )
        elif diverged:
            msg = (
                f"{method} diverged: the relative residual grew from {best:.3e} to {growth:.3e} at "
                f"iteration {it + 1} (tol {tol:.1e}, block_size {b}); the spectral radius of the "
                "block-Jacobi iteration matrix D^{-1}N is at least 1 for this matrix and shift. "
                "Use method='direct', a larger block_size"
                + (", or method='two_level'" if not two_level else "")
            )
        else:
            msg = (
                f"{method} did not converge: relative residual {res:.3e} after {it} iterations "
                f"(maxiter {maxiter}), tol {tol:.1e}, block_size {b}. Raise maxiter, loosen tol, "
                "or use method='direct'"
            )
        raise ConvergenceError(msg, info)
    return X, info
