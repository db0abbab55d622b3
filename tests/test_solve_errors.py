"""Bad input and failing solves: each error is its own test and is matched on its message."""

from __future__ import annotations

import numpy as np
import pytest

import resolvent

ALL_METHODS = ["direct", "block_jacobi", "two_level", "auto"]


def stochastic(n, rng):
    P = rng.random((n, n)) + 0.1
    return P / P.sum(axis=1, keepdims=True)


def divergent_matrix(n):
    """zI - A (z = 1) is well-conditioned, yet rho(D^{-1} N) ~ 2 for blocks of size 2."""
    s = np.where(np.arange(n) % 2 == 0, 1.0, -1.0)
    A = -2.0 * (np.ones((n, n)) - np.eye(n)) / (n - 1) * np.outer(s, s)
    return A + np.diag(np.linspace(0.0, 0.5, n))


@pytest.mark.parametrize("shape", [(3, 4), (2, 3, 4), (5,)])
def test_non_square_A(shape):
    with pytest.raises(ValueError, match=r"A must be a square matrix .*\(\.\.\., n, n\); got shape"):
        resolvent.solve(np.ones(shape), np.ones(3))


def test_non_square_A_in_solve_shifts():
    with pytest.raises(ValueError, match=r"A must be a square matrix"):
        resolvent.solve_shifts(np.ones((3, 4)), np.ones(3), [2.0])


@pytest.mark.parametrize("bshape", [(4,), (4, 2), (2, 4, 1)])
def test_mismatched_B(bshape):
    with pytest.raises(ValueError, match=r"B must have shape \(\.\.\., n\) or \(\.\.\., n, k\) with n = 3"):
        resolvent.solve(np.eye(3), np.ones(bshape), z=2.0)


def test_B_scalar():
    with pytest.raises(ValueError, match="B must have shape .* got a scalar"):
        resolvent.solve(np.eye(3), 1.0, z=2.0)


def test_batch_dimensions_that_do_not_broadcast():
    with pytest.raises(ValueError, match=r"batch dimensions of A \(2,\) and B \(3,\) do not broadcast"):
        resolvent.solve(np.zeros((2, 3, 3)), np.ones((3, 3, 1)), z=2.0)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", ["A", "B"])
def test_non_finite_input(bad, where):
    A, B = np.eye(3) * 0.5, np.ones(3)
    if where == "A":
        A[1, 2] = bad
    else:
        B[0] = bad
    with pytest.raises(ValueError, match=f"{where} must contain only finite values"):
        resolvent.solve(A, B, z=2.0)
    with pytest.raises(ValueError, match=f"{where} must contain only finite values"):
        resolvent.solve_shifts(A, B, [2.0])


def test_check_finite_false_skips_the_input_check_but_not_the_output_guard():
    A, B = np.eye(3) * 0.5, np.array([1.0, np.nan, 1.0])
    # the NaN reaches the solver (no ValueError) and the non-finite solution is refused
    with pytest.raises(np.linalg.LinAlgError, match="the solution is not finite"):
        resolvent.solve(A, B, z=2.0, method="direct", check_finite=False)
    with pytest.raises(resolvent.ConvergenceError, match="diverged"):
        resolvent.solve(A, B, z=2.0, method="block_jacobi", check_finite=False)
    X = resolvent.solve(A, np.ones(3), z=2.0, check_finite=False)
    np.testing.assert_allclose(X, np.full(3, 1 / 1.5), rtol=1e-15)


@pytest.mark.parametrize("z", [np.nan, np.inf, complex(1, np.inf)])
def test_non_finite_shift(z):
    with pytest.raises(ValueError, match="z must be finite"):
        resolvent.solve(np.eye(2), np.ones(2), z=z)


def test_non_scalar_shift():
    with pytest.raises(ValueError, match=r"z must be a real or complex scalar, got \[1.0, 2.0\]"):
        resolvent.solve(np.eye(2), np.ones(2), z=[1.0, 2.0])


@pytest.mark.parametrize("method", ["direct", "auto"])
def test_z_at_an_eigenvalue_is_singular(method, rng):
    A = stochastic(30, rng)  # eigenvalue 1, eigenvector of ones
    with pytest.raises(np.linalg.LinAlgError, match=r"zI - A \(z = 1.0\) is singular"):
        resolvent.solve(A, rng.standard_normal(30), z=1.0, method=method)


def test_z_at_an_eigenvalue_of_a_symmetric_matrix(rng):
    Q, _ = np.linalg.qr(rng.standard_normal((12, 12)))
    lam = np.linspace(-1.0, 1.0, 12)
    A = (Q * lam) @ Q.T
    with pytest.raises(np.linalg.LinAlgError, match="singular"):
        resolvent.solve(A, np.ones(12), z=lam[4], method="direct")


@pytest.mark.parametrize("n", [6, 120])  # both triangular code paths (n <= 96 and n > 96)
def test_z_at_an_eigenvalue_lower_triangular(n, rng):
    A = np.tril(rng.standard_normal((n, n)))
    with pytest.raises(np.linalg.LinAlgError, match="singular"):
        resolvent.solve(A, np.ones(n), z=A[3, 3], lower=True)


def test_singular_shift_in_solve_shifts_names_it(rng):
    A = stochastic(10, rng)
    with pytest.raises(np.linalg.LinAlgError, match=r"zs\[1\] I - A \(zs\[1\] = 1.0\) is singular"):
        resolvent.solve_shifts(A, np.ones(10), [2.0, 1.0, 3.0])


def test_singular_diagonal_block_is_named():
    A = np.full((6, 6), 0.05)
    A[2:4, 2:4] = [[2.0, 0.0], [0.0, 2.0]]  # block 1 of zI - A is exactly zero at z = 2
    for method in ["block_jacobi", "two_level"]:
        with pytest.raises(np.linalg.LinAlgError, match=r"diagonal block 1 \(rows 2:4\) of zI - A is singular"):
            resolvent.solve(A, np.ones(6), z=2.0, method=method, block_size=2)


def test_singular_last_short_block_is_named():
    A = np.full((5, 5), 0.05)
    A[4, 4] = 2.0  # the last block (a single row) of zI - A is zero at z = 2
    with pytest.raises(np.linalg.LinAlgError, match=r"diagonal block 2 \(rows 4:5\) of zI - A is singular"):
        resolvent.solve(A, np.ones(5), z=2.0, method="block_jacobi", block_size=2)


def test_singular_block_in_a_batch_names_the_slice():
    A = np.zeros((2, 4, 4))
    A[1, :2, :2] = 2.0 * np.eye(2)
    with pytest.raises(np.linalg.LinAlgError, match=r"diagonal block 0 \(rows 0:2\) of zI - A in batch slice \(1,\)"):
        resolvent.solve(A, np.ones(4), z=2.0, method="block_jacobi", block_size=2)


def test_singular_coarse_matrix_two_level(rng):
    A = stochastic(12, rng)  # at z = 1 every block row of E^T (I - A) E sums to zero
    with pytest.raises(np.linalg.LinAlgError, match=r"coarse matrix E\^T \(zI - A\) E .* is singular"):
        resolvent.solve(A, np.ones(12), z=1.0, method="two_level", block_size=4)


@pytest.mark.parametrize("block_size", [0, -3])
def test_block_size_below_one(block_size):
    with pytest.raises(ValueError, match=rf"block_size must be a positive integer \(>= 1\), got {block_size}"):
        resolvent.solve(np.eye(3), np.ones(3), z=2.0, method="block_jacobi", block_size=block_size)


@pytest.mark.parametrize("block_size", [2.5, "4", True])
def test_block_size_not_an_integer(block_size):
    with pytest.raises(ValueError, match="block_size must be a positive integer, got"):
        resolvent.solve(np.eye(3), np.ones(3), z=2.0, block_size=block_size)


@pytest.mark.parametrize("method", ["lu", "jacobi", "", None, "Direct"])
def test_unknown_method(method):
    with pytest.raises(ValueError, match=r"method must be one of \['auto', 'block_jacobi', 'direct', 'two_level'\], got"):
        resolvent.solve(np.eye(3), np.ones(3), z=2.0, method=method)


@pytest.mark.parametrize("tol", [0.0, -1e-3, np.inf, np.nan, "small"])
def test_bad_tol(tol):
    with pytest.raises(ValueError, match="tol must be a positive finite real number or None, got"):
        resolvent.solve(np.eye(3), np.ones(3), z=2.0, tol=tol)


def test_bad_maxiter():
    with pytest.raises(ValueError, match=r"maxiter must be a positive integer \(>= 1\), got 0"):
        resolvent.solve(np.eye(3), np.ones(3), z=2.0, maxiter=0)


@pytest.mark.parametrize("zs", [2.0, [[2.0, 3.0]]])
def test_shifts_must_be_one_dimensional(zs):
    with pytest.raises(ValueError, match="zs must be a one-dimensional sequence of real or complex shifts"):
        resolvent.solve_shifts(np.eye(3), np.ones(3), zs)


def test_non_finite_shift_in_solve_shifts():
    with pytest.raises(ValueError, match="zs must contain only finite shifts"):
        resolvent.solve_shifts(np.eye(3), np.ones(3), [2.0, np.nan])


@pytest.mark.parametrize("method", ["block_jacobi", "two_level"])
def test_divergence_raises_convergence_error_early(method):
    n = 40
    A, B = divergent_matrix(n), np.linspace(-1.0, 1.0, n)
    with pytest.raises(resolvent.ConvergenceError, match=rf"{method} diverged: the relative residual grew") as exc:
        resolvent.solve(A, B, z=1.0, method=method, block_size=2)
    info = exc.value.info
    assert not info.converged and info.method == method
    assert info.iterations < 100  # detected long before maxiter = 1000
    X, info = resolvent.solve(A, B, z=1.0, method=method, block_size=2, return_info=True)
    assert info.converged is False
    assert np.isfinite(X).all() and np.isfinite(info.residual)
    # the iterate really is that far off: its residual is what info says
    R = B - (X - A @ X)
    np.testing.assert_allclose(np.linalg.norm(R) / np.linalg.norm(B), info.residual, rtol=1e-6)


def test_not_converged_within_maxiter(rng):
    A = stochastic(20, rng) * 0.99
    with pytest.raises(resolvent.ConvergenceError, match=r"block_jacobi did not converge: relative residual .* after 3 iterations \(maxiter 3\), tol 1.0e-10"):
        resolvent.solve(A, np.ones(20), z=1.0, method="block_jacobi", block_size=5, maxiter=3)
    X, info = resolvent.solve(A, np.ones(20), z=1.0, method="block_jacobi", block_size=5, maxiter=3,
                              return_info=True)
    assert info == resolvent.SolveInfo(False, 3, info.residual, "block_jacobi")
    assert 1e-10 < info.residual < 1.0
    assert np.isfinite(X).all()


def test_convergence_error_is_a_linalg_error():
    assert issubclass(resolvent.ConvergenceError, np.linalg.LinAlgError)
    n = 40
    with pytest.raises(np.linalg.LinAlgError, match="block_jacobi diverged"):
        resolvent.solve(divergent_matrix(n), np.ones(n), z=1.0, method="block_jacobi", block_size=2)


def test_direct_on_the_divergent_matrix_is_fine():
    n = 40
    A, B = divergent_matrix(n), np.linspace(-1.0, 1.0, n)
    X = resolvent.solve(A, B, z=1.0, method="direct")
    np.testing.assert_allclose(X - A @ X, B, atol=1e-13)
