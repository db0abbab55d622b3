"""Property tests of resolvent.solve and resolvent.solve_shifts against independent float64 references.

Matrices are built from drawn values so that Hypothesis failures shrink.  They are made
well-conditioned by construction: every ``A`` is scaled to ``||A||_inf <= 1`` and the shift keeps
``|z| >= 2.5``, so ``zI - A`` is strictly row-diagonally dominant, its condition number is at most
``(|z| + 1) / (|z| - 1) <= 2.4``, and the block-Jacobi iteration matrix has infinity norm at most
``||A|| / (|z| - ||A||) <= 2/3`` for every block size: every method converges.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import resolvent
from resolvent.linalg import _solve as solve_module

METHODS = ["direct", "block_jacobi", "two_level", "auto"]
ITERATIVE = ["block_jacobi", "two_level"]

unit = st.floats(-1.0, 1.0, allow_nan=False, allow_infinity=False, width=64)


def _normalise(A):
    """Scale each matrix of the stack to infinity norm at most 1."""
    norm = np.abs(A).sum(axis=-1).max(axis=-1, keepdims=True)[..., None]
    return A / np.maximum(norm, 1.0)


@st.composite
def shifts(draw, complex_ok=True):
    """A shift with |z| >= 2.5 (away from the spectrum of a matrix of norm <= 1)."""
    r = draw(st.floats(2.5, 4.0))
    if complex_ok and draw(st.booleans()):
        theta = draw(st.floats(-np.pi, np.pi))
        return complex(r * np.cos(theta), r * np.sin(theta))
    return r * draw(st.sampled_from([1.0, -1.0]))


@st.composite
def systems(draw, complex_ok=True, max_n=10, batch=True):
    """(A, B, z, vector) with A (..., n, n) and B (..., n) or (..., n, k), well-conditioned."""
    n = draw(st.integers(1, max_n))
    bshape = draw(hnp.array_shapes(min_dims=0, max_dims=2, max_side=3)) if batch else ()
    is_complex = complex_ok and draw(st.booleans())
    A = draw(hnp.arrays(np.float64, bshape + (n, n), elements=unit))
    if is_complex:
        A = A + 1j * draw(hnp.arrays(np.float64, bshape + (n, n), elements=unit))
    A = _normalise(A)
    vector = draw(st.booleans())
    k = None if vector else draw(st.integers(1, 3))
    B = draw(hnp.arrays(np.float64, bshape + ((n,) if vector else (n, k)), elements=unit))
    if is_complex:
        B = B + 1j * draw(hnp.arrays(np.float64, B.shape, elements=unit))
    z = draw(shifts(complex_ok))
    return A, B, z, vector


def reference(A, B, z):
    """``(zI - A)^{-1} B`` by numpy.linalg.solve, one batch slice at a time (no broadcasting)."""
    A = np.asarray(A, dtype=np.complex128 if np.iscomplexobj(A) or isinstance(z, complex) else np.float64)
    n = A.shape[-1]
    vector = B.ndim == A.ndim - 1 or B.ndim == 1
    B3 = B[..., None] if vector else B
    batch = np.broadcast_shapes(A.shape[:-2], B3.shape[:-2])
    Ab = np.broadcast_to(A, batch + A.shape[-2:])
    Bb = np.broadcast_to(B3, batch + B3.shape[-2:])
    X = np.full(batch + B3.shape[-2:], np.nan, dtype=np.result_type(Ab, Bb, type(z)))
    for idx in np.ndindex(*batch):
        X[idx] = np.linalg.solve(z * np.eye(n) - Ab[idx], Bb[idx])
    return X[..., 0] if vector else X


def rel_err(X, ref):
    return np.linalg.norm(X - ref) / max(np.linalg.norm(ref), np.finfo(float).tiny)


def rel_residual(A, B, X, z):
    """max over batch and columns of ||B - (zI - A) X|| / ||B||, computed in float64/complex128."""
    vector = X.ndim == A.ndim - 1 or B.ndim == 1
    X3 = X[..., None] if vector else X
    B3 = B[..., None] if vector else B
    A = A.astype(np.complex128)
    R = B3 - (z * X3 - A @ X3)
    bn = np.linalg.norm(np.broadcast_to(B3, R.shape), axis=-2)
    rn = np.linalg.norm(R, axis=-2)
    return float(np.max(np.where(bn > 0, rn / np.where(bn > 0, bn, 1), rn), initial=0.0))


@given(systems(), st.sampled_from(METHODS), st.integers(1, 11))
def test_residual_is_small(system, method, block_size):
    A, B, z, _ = system
    X, info = resolvent.solve(A, B, z=z, method=method, block_size=block_size, return_info=True)
    assert info.converged
    bound = 1e-13 if info.method == "direct" else 1e-10  # the default tol of float64
    assert rel_residual(A, B, X, z) <= bound * (1 + 1e-6) + 1e-15
    assert info.residual <= bound * (1 + 1e-6) + 1e-15


@given(systems(), st.sampled_from(METHODS), st.integers(1, 11))
def test_every_method_agrees_with_numpy(system, method, block_size):
    A, B, z, vector = system
    X = resolvent.solve(A, B, z=z, method=method, block_size=block_size, tol=1e-13)
    ref = reference(A, B, z)
    assert X.shape == ref.shape
    assert X.dtype == ref.dtype
    assert rel_err(X, ref) <= 1e-10


@given(systems(), shifts(), st.sampled_from(METHODS))
def test_resolvent_identity(system, z2, method):
    """R(z1) - R(z2) = (z2 - z1) R(z1) R(z2), applied to B."""
    A, B, z1, _ = system
    kw = dict(method=method, block_size=3, tol=1e-13)
    X1 = resolvent.solve(A, B, z=z1, **kw)
    X2 = resolvent.solve(A, B, z=z2, **kw)
    rhs = (z2 - z1) * resolvent.solve(A, X2, z=z1, **kw)
    lhs = X1 - X2
    # both sides are differences of O(||B||) quantities: compare on the scale of ||B||
    assert np.linalg.norm(lhs - rhs) <= 1e-10 * max(np.linalg.norm(B), 1e-300) * (1 + abs(z2 - z1))


@given(systems(batch=False), st.floats(-2, 2), st.floats(-2, 2), st.sampled_from(METHODS),
       hnp.arrays(np.float64, 10, elements=unit))
def test_linear_in_B(system, a, b, method, extra):
    A, B1, z, _ = system
    B2 = np.resize(extra, B1.shape)  # a second right-hand side built from drawn values
    kw = dict(z=z, method=method, block_size=2, tol=1e-13)
    lhs = resolvent.solve(A, a * B1 + b * B2, **kw)
    rhs = a * resolvent.solve(A, B1, **kw) + b * resolvent.solve(A, B2, **kw)
    scale = abs(a) * np.linalg.norm(B1) + abs(b) * np.linalg.norm(B2)
    assert np.linalg.norm(lhs - rhs) <= 1e-10 * max(scale, 1e-300)


@given(systems(), st.sampled_from(METHODS))
def test_batched_call_equals_loop(system, method):
    A, B, z, vector = system
    X = resolvent.solve(A, B, z=z, method=method, block_size=3, tol=1e-13)
    B3 = B[..., None] if vector else B
    batch = np.broadcast_shapes(A.shape[:-2], B3.shape[:-2])
    Ab = np.broadcast_to(A, batch + A.shape[-2:])
    Bb = np.broadcast_to(B, batch + B.shape[B.ndim - (1 if vector else 2):])
    for idx in np.ndindex(*batch):
        Xi = resolvent.solve(Ab[idx], Bb[idx], z=z, method=method, block_size=3, tol=1e-13)
        assert rel_err(X[idx], Xi) <= 1e-10


@given(st.integers(1, 8), st.integers(1, 3), st.sampled_from(METHODS), st.data())
def test_batch_dimensions_broadcast(n, extra, method, data):
    A = _normalise(data.draw(hnp.arrays(np.float64, (2, 1, n, n), elements=unit)))
    # B has fewer batch dimensions than A; k != n keeps B.ndim == A.ndim - 1 a stack of matrices
    k = n + extra
    B = data.draw(hnp.arrays(np.float64, (3, n, k), elements=unit))
    z = data.draw(shifts())
    X = resolvent.solve(A, B, z=z, method=method, block_size=2, tol=1e-13)
    assert X.shape == (2, 3, n, k)
    for i in range(2):
        for j in range(3):
            ref = np.linalg.solve(z * np.eye(n) - A[i, 0], B[j])
            assert rel_err(X[i, j], ref) <= 1e-10
    # a stack of vectors (B.ndim == A.ndim - 1, B.shape[-1] == n) broadcasts the same way
    b = data.draw(hnp.arrays(np.float64, (1, 3, n), elements=unit))
    x = resolvent.solve(A, b, z=z, method=method, block_size=2, tol=1e-13)
    assert x.shape == (2, 3, n)
    for i in range(2):
        for j in range(3):
            ref = np.linalg.solve(z * np.eye(n) - A[i, 0], b[0, j])
            assert rel_err(x[i, j], ref) <= 1e-10


@given(systems(), st.lists(shifts(), min_size=1, max_size=4))
def test_solve_shifts_equals_solve_shift_by_shift(system, zs):
    A, B, _, vector = system
    X = resolvent.solve_shifts(A, B, zs)
    expect_real = not (np.iscomplexobj(A) or np.iscomplexobj(B) or any(isinstance(z, complex) for z in zs))
    assert np.isrealobj(X) == expect_real
    for i, z in enumerate(zs):
        Xi = resolvent.solve(A, B, z=z, method="direct")
        assert X[i].shape == Xi.shape
        assert rel_err(X[i], Xi) <= 1e-10


@given(systems(batch=False), st.lists(shifts(), min_size=1, max_size=3))
def test_solve_shifts_lower_skips_schur_and_matches(system, zs):
    A, B, _, _ = system
    L = np.tril(A)
    X = resolvent.solve_shifts(A, B, zs, lower=True)  # entries above the diagonal are not read
    for i, z in enumerate(zs):
        assert rel_err(X[i], reference(L, B, z)) <= 1e-10


@given(systems(complex_ok=False), st.sampled_from(METHODS), st.booleans())
def test_float32_stays_float32(system, method, complex_z):
    A, B, z, _ = system
    if complex_z:
        z = complex(z, 0.5)
    X = resolvent.solve(A.astype(np.float32), B.astype(np.float32), z=z, method=method,
                        block_size=3)
    assert X.dtype == (np.complex64 if complex_z else np.float32)
    ref = reference(A.astype(np.float32).astype(np.float64), B.astype(np.float32).astype(np.float64), z)
    assert rel_err(X, ref) <= 1e-4


@given(st.integers(1, 8), st.sampled_from(METHODS), st.data())
def test_integers_promote_to_float64(n, method, data):
    A = data.draw(hnp.arrays(np.int64, (n, n), elements=st.integers(-3, 3)))
    B = data.draw(hnp.arrays(np.int32, (n, 2), elements=st.integers(-5, 5)))
    z = 3.0 * n + 1.0  # |A| <= 3 per entry: zI - A is strictly diagonally dominant
    X = resolvent.solve(A, B, z=z, method=method, block_size=2, tol=1e-13)
    assert X.dtype == np.float64
    assert rel_err(X, reference(A.astype(float), B.astype(float), z)) <= 1e-10


@given(systems(batch=False, max_n=8), st.sampled_from(METHODS))
def test_complex_matrix_with_complex_shift(system, method):
    A, B, z, _ = system
    A = A.astype(np.complex128) * np.exp(0.3j)
    z = complex(z) + 0.25j
    X = resolvent.solve(A, B, z=z, method=method, block_size=2, tol=1e-13)
    assert X.dtype == np.complex128
    assert rel_err(X, reference(A, B, z)) <= 1e-10


def test_real_input_with_complex_typed_shift_is_complex():
    A = np.eye(3) * 0.5
    X = resolvent.solve(A, np.ones(3), z=2 + 0j)
    assert X.dtype == np.complex128
    np.testing.assert_allclose(X, np.full(3, 1 / 1.5), rtol=1e-14)


@pytest.mark.parametrize("n", [5, 120])  # 120 takes the per-slice solve_triangular path (n > 96)
def test_lower_uses_only_the_lower_triangle(n, rng):
    A = _normalise(rng.standard_normal((2, n, n)))
    B = rng.standard_normal((2, n, 3))
    X, info = resolvent.solve(A, B, z=2.5, lower=True, return_info=True)
    assert info.method == "direct"  # auto picks the triangular solve when lower=True
    ref = reference(np.tril(A), B, 2.5)
    assert rel_err(X, ref) <= 1e-12
    for method in ITERATIVE:
        Xi = resolvent.solve(A, B, z=2.5, lower=True, method=method, tol=1e-13)
        assert rel_err(Xi, ref) <= 1e-10


def test_vector_convention(rng):
    n = 4
    A = _normalise(rng.standard_normal((3, n, n)))
    Bv = rng.standard_normal((3, n))
    X = resolvent.solve(A, Bv, z=3.0)  # B.ndim == A.ndim - 1 and B.shape[-1] == n: vectors
    assert X.shape == (3, n)
    for i in range(3):
        assert rel_err(X[i], np.linalg.solve(3.0 * np.eye(n) - A[i], Bv[i])) <= 1e-13
    Bm = rng.standard_normal((n, n))
    Xm = resolvent.solve(A, Bm[None], z=3.0)  # B[None]: one n x n matrix broadcast over the batch
    assert Xm.shape == (3, n, n)
    assert rel_err(Xm[1], np.linalg.solve(3.0 * np.eye(n) - A[1], Bm)) <= 1e-13
    x1 = resolvent.solve(A, Bv[0], z=3.0)  # 1-D B broadcasts as a vector
    assert x1.shape == (3, n)


def test_one_matrix_many_batched_right_hand_sides(rng):
    A = _normalise(rng.standard_normal((6, 6)))
    B = rng.standard_normal((4, 5, 6, 2))
    X = resolvent.solve(A, B, z=-3.0, method="direct")
    assert X.shape == (4, 5, 6, 2)
    assert rel_err(X, reference(A, B, -3.0)) <= 1e-13


def test_empty_inputs_give_empty_results():
    assert resolvent.solve(np.zeros((0, 0)), np.zeros(0)).shape == (0,)
    assert resolvent.solve(np.eye(3) * 0.5, np.zeros((3, 0)), z=2.0).shape == (3, 0)
    assert resolvent.solve(np.zeros((0, 3, 3)), np.ones(3), z=2.0).shape == (0, 3)


def test_direct_info_reports_zero_iterations(rng):
    A = _normalise(rng.standard_normal((7, 7)))
    X, info = resolvent.solve(A, np.ones(7), z=3.0, method="direct", return_info=True)
    assert info == resolvent.SolveInfo(True, 0, info.residual, "direct")
    assert info.residual <= 1e-15


def ncd_matrix(n, b, eps, rng):
    """Row-stochastic, nearly completely decomposable: dense diagonal blocks of size b carry 1 - eps
    of each row, random coupling to the other blocks carries eps."""
    blk = np.arange(n) // b
    inside = blk[:, None] == blk[None, :]
    W = rng.random((n, n)) + 0.1
    P = np.where(inside, (1 - eps) * W / np.where(inside, W, 0).sum(1, keepdims=True),
                 eps * W / np.where(inside, 0, W).sum(1, keepdims=True))
    return P / P.sum(1, keepdims=True)


def test_two_level_count_stays_flat_while_block_jacobi_grows(rng):
    n, b, eps = 60, 6, 1e-2
    A = ncd_matrix(n, b, eps, rng)
    B = rng.standard_normal(n)
    bj, tl = [], []
    for z in (1.1, 1.01, 1.001):
        for method, counts in (("block_jacobi", bj), ("two_level", tl)):
            X, info = resolvent.solve(A, B, z=z, method=method, block_size=b, maxiter=5000,
                                      return_info=True)
            assert info.converged and info.method == method
            assert rel_err(X, reference(A, B, z)) <= 1e-10 / (z - 1)  # forward error <= cond * tol
            counts.append(info.iterations)
    # block-Jacobi contracts the slow mode by ~eps / (z - 1 + eps): O(eps / (z - 1)) steps
    assert bj[0] < bj[1] < bj[2]
    assert bj[2] >= 5 * bj[1] // 2
    assert max(tl) <= 8
    assert max(tl) - min(tl) <= 2
    assert bj[2] >= 10 * tl[2]


def test_auto_rule_direct_for_small_n_and_two_level_above(rng, monkeypatch):
    A = ncd_matrix(60, 6, 1e-2, rng)
    B = rng.standard_normal(60)
    _, info = resolvent.solve(A, B, z=1.01, block_size=6, return_info=True)
    assert info.method == "direct"  # n = 60 <= AUTO_DIRECT_MAX_N
    monkeypatch.setattr(solve_module, "AUTO_DIRECT_MAX_N", 10)
    X, info = resolvent.solve(A, B, z=1.01, block_size=6, return_info=True)
    assert info.method == "two_level" and info.converged
    assert rel_err(X, reference(A, B, 1.01)) <= 1e-10 / 0.01
    # many right-hand sides: the iteration budget n // (3k) < 10, so LU
    _, info = resolvent.solve(A, rng.standard_normal((60, 3)), z=1.01, block_size=6, return_info=True)
    assert info.method == "direct"


def divergent_matrix(n):
    """A with zI - A (z = 1) well-conditioned but rho(D^{-1} N) ~ 2 for small blocks: the strong
    coupling alternates in sign, so the divergent mode is not piecewise constant either."""
    s = np.where(np.arange(n) % 2 == 0, 1.0, -1.0)
    A = -2.0 * (np.ones((n, n)) - np.eye(n)) / (n - 1) * np.outer(s, s)
    return A + np.diag(np.linspace(0.0, 0.5, n))


def test_auto_falls_back_to_direct_when_two_level_fails(monkeypatch):
    monkeypatch.setattr(solve_module, "AUTO_DIRECT_MAX_N", 10)
    n = 40
    A = divergent_matrix(n)
    B = np.linspace(-1.0, 1.0, n)
    with pytest.raises(resolvent.ConvergenceError, match="two_level diverged"):
        resolvent.solve(A, B, z=1.0, method="two_level", block_size=2)
    X, info = resolvent.solve(A, B, z=1.0, block_size=2, return_info=True)
    assert info.method == "direct"
    assert rel_err(X, reference(A, B, 1.0)) <= 1e-12
