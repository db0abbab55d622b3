"""Chain attention (SPEC 2.1, 2.2): every method against float64 references built another way."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import resolvent
from resolvent.attention import _blockwise, _exact
from resolvent._cpu import available as numba_available

from reference import ahat, chain_reference, dense_attention

PATHS = [False, pytest.param(True, marks=pytest.mark.skipif(not numba_available(), reason="numba missing"))]


@pytest.fixture(params=PATHS, ids=["numpy", "numba"])
def blockwise_path(request, monkeypatch):
    """Run a test on the NumPy path and on the fused Numba kernel."""
    monkeypatch.setattr(_blockwise, "USE_NUMBA", request.param)
    return request.param


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles much smaller than n, so that exact streams over many query tiles and key chunks."""
    monkeypatch.setattr(_exact, "TQ", 5)
    monkeypatch.setattr(_exact, "TK", 7)


def rel(a, b, v=None):
    """Relative difference ``||a - b|| / ||b||``.

    Each output row is a convex combination of rows of ``v``; where the combination cancels to
    (nearly) zero, rounding is relative to ``v``, so the denominator never drops below
    ``1e-3 ||v||`` when ``v`` is given.
    """
    diff = np.linalg.norm(np.asarray(a, np.float64) - b)
    denom = max(np.linalg.norm(b), 0.0 if v is None else 1e-3 * np.linalg.norm(v))
    return diff / denom if denom > 0 else diff


@st.composite
def qkv(draw, max_n=40, batch=None):
    """q, k, v drawn elementwise (so failures shrink), with a batch of 1-2 heads."""
    n = draw(st.integers(1, max_n))
    d = draw(st.integers(1, 6))
    dv = draw(st.integers(1, 4))
    h = draw(st.integers(1, 2)) if batch is None else batch
    elems = st.floats(-3, 3, allow_nan=False, width=64)
    q = draw(hnp.arrays(np.float64, (h, n, d), elements=elems))
    k = draw(hnp.arrays(np.float64, (h, n, d), elements=elems))
    v = draw(hnp.arrays(np.float64, (h, n, dv), elements=elems))
    return q, k, v


gammas = st.floats(0.0, 0.99)
# the fixtures below only select a code path or tile size: sharing them across examples is safe
fixtures_ok = settings(suppress_health_check=[HealthCheck.function_scoped_fixture])


@fixtures_ok
@given(qkv(), gammas)
def test_exact_equals_dense_reference(small_tiles, data, gamma):
    q, k, v = data
    ref = chain_reference(dense_attention(q, k), v, np.full(q.shape[0], gamma))
    assert rel(resolvent.chain_attention(q, k, v, gamma, method="exact"), ref, v) < 1e-10
    assert rel(resolvent.chain_attention(q, k, v, gamma, method="dense"), ref, v) < 1e-10


@fixtures_ok
@given(qkv(), gammas, st.integers(1, 12))
def test_blockwise_equals_explicit_ahat(blockwise_path, data, gamma, b):
    q, k, v = data
    ref = chain_reference(ahat(q, k, b), v, np.full(q.shape[0], gamma))
    y = resolvent.chain_attention(q, k, v, gamma, method="blockwise", block_size=b)
    assert rel(y, ref, v) < 1e-10


@fixtures_ok
@given(qkv(max_n=24), gammas, st.integers(0, 8))
def test_blockwise_with_block_at_least_n_is_dense(blockwise_path, data, gamma, extra):
    q, k, v = data
    n = q.shape[-2]
    y = resolvent.chain_attention(q, k, v, gamma, method="blockwise", block_size=n + extra)
    assert rel(y, resolvent.chain_attention(q, k, v, gamma, method="dense"), v) < 1e-10


@pytest.mark.parametrize("method", ["dense", "exact", "blockwise"])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 0.9, 0.999])
def test_constants_are_preserved(blockwise_path, small_tiles, rng, method, gamma):
    q, k = 2 * rng.standard_normal((2, 3, 45, 8))
    y = resolvent.chain_attention(q, k, np.ones((3, 45, 2)), gamma, method=method, block_size=8)
    np.testing.assert_allclose(y, 1.0, rtol=1e-12)


def test_gamma_zero_is_plain_attention(blockwise_path, rng):
    q, k, v = rng.standard_normal((3, 2, 30, 5))
    np.testing.assert_allclose(
        resolvent.chain_attention(q, k, v, 0.0, method="dense"), dense_attention(q, k) @ v, rtol=1e-12
    )
    y = resolvent.chain_attention(q, k, v, 0.0, method="blockwise", block_size=7)
    np.testing.assert_allclose(y, ahat(q, k, 7) @ v, rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("method", ["dense", "exact", "blockwise"])
def test_batch_equals_loop_and_per_head_gamma(blockwise_path, rng, method):
    q, k, v = rng.standard_normal((3, 2, 3, 29, 4))
    gamma = np.array([0.1, 0.5, 0.95])  # one per head, broadcast over the leading batch axis
    y = resolvent.chain_attention(q, k, v, gamma, method=method, block_size=6)
    assert y.shape == (2, 3, 29, 4)
    for i in range(2):
        for h in range(3):
            yi = resolvent.chain_attention(q[i, h], k[i, h], v[i, h], gamma[h], method=method, block_size=6)
            np.testing.assert_allclose(y[i, h], yi, rtol=1e-12, atol=1e-14)


def test_batch_dimensions_broadcast(rng):
    q = rng.standard_normal((2, 1, 20, 4))
    k = rng.standard_normal((1, 3, 20, 4))
    v = rng.standard_normal((20, 2))
    y = resolvent.chain_attention(q, k, v, 0.7, method="blockwise", block_size=5)
    assert y.shape == (2, 3, 20, 2)
    np.testing.assert_allclose(
        y[1, 2], resolvent.chain_attention(q[1, 0], k[0, 2], v, 0.7, block_size=5), rtol=1e-12
    )


@pytest.mark.parametrize("method", ["dense", "exact", "blockwise"])
@pytest.mark.parametrize("n", [100, 517])
def test_float32_close_to_float64(blockwise_path, rng, method, n):
    q, k, v = rng.standard_normal((3, 2, n, 16))
    y64 = resolvent.chain_attention(q, k, v, 0.95, method=method, block_size=24)
    y32 = resolvent.chain_attention(*(x.astype(np.float32) for x in (q, k, v)), 0.95, method=method,
                                    block_size=24)
    assert y32.dtype == np.float32
    assert rel(y32, y64) < 1e-4


@pytest.mark.parametrize("method", ["dense", "exact", "blockwise"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_huge_scores_do_not_overflow(blockwise_path, rng, method, dtype):
    # scores of order +-1e4: every exp must be taken of a shifted, non-positive argument
    q = rng.choice([-1.0, 1.0], size=(1, 64, 4)) * 50
    k = rng.choice([-1.0, 1.0], size=(1, 64, 4)) * 50
    v = rng.standard_normal((1, 64, 3))
    y = resolvent.chain_attention(q.astype(dtype), k.astype(dtype), v.astype(dtype), 0.9, method=method,
                                  block_size=8, scale=1.0)
    assert np.isfinite(y).all()
    A = dense_attention(q, k, 1.0) if method != "blockwise" else ahat(q, k, 8, scale=1.0)
    assert rel(y, chain_reference(A, v, [0.9])) < (1e-4 if dtype == np.float32 else 1e-10)


def test_float16_in_float16_out(rng):
    q, k, v = rng.standard_normal((3, 40, 8)).astype(np.float16)
    y = resolvent.chain_attention(q, k, v, 0.5, block_size=8)
    assert y.dtype == np.float16
    ref = resolvent.chain_attention(*(x.astype(np.float32) for x in (q, k, v)), 0.5, block_size=8)
    np.testing.assert_allclose(y.astype(np.float32), ref, rtol=1e-2, atol=1e-2)


def test_integer_input_is_promoted(rng):
    q, k, v = rng.integers(-2, 3, size=(3, 12, 3))
    y = resolvent.chain_attention(q, k, v, 0.5, method="exact")
    assert y.dtype == np.float64
    assert rel(y, chain_reference(dense_attention(q, k), v, 0.5)) < 1e-12


# --- block_mass -------------------------------------------------------------------------------


@given(qkv(max_n=30), st.integers(1, 10))
def test_block_mass_matches_dense_matrix(data, b):
    q, k, _ = data
    A = dense_attention(q, k)
    n = q.shape[-2]
    same_block = (np.arange(n)[:, None] // b) == (np.arange(n)[None, :] // b)
    expected = (A * same_block).sum(axis=(-1, -2)) / n
    np.testing.assert_allclose(resolvent.block_mass(q, k, b), expected, rtol=1e-10)


def test_block_mass_is_one_for_a_single_block(small_tiles, rng):
    q, k = rng.standard_normal((2, 2, 3, 50, 4))
    np.testing.assert_allclose(resolvent.block_mass(q, k, 50), np.ones((2, 3)), rtol=1e-12)


# --- default block size -----------------------------------------------------------------------


@given(st.integers(1, 10**6), st.integers(0, 8))
def test_default_block_size_rule(n, topk):
    b = resolvent.default_block_size(n, topk=topk)
    assert 1 <= b <= n
    assert b == n or b % 8 == 0
    assert resolvent.default_block_size(2 * n, topk=topk) >= b


# --- bad input --------------------------------------------------------------------------------


@pytest.fixture
def small(rng):
    return rng.standard_normal((3, 10, 4))


@pytest.mark.parametrize("gamma", [1.0, -0.1, 1.5, float("nan")])
def test_gamma_out_of_range(small, gamma):
    with pytest.raises(ValueError, match="gamma must lie in"):
        resolvent.chain_attention(*small, gamma)


def test_gamma_shape_must_broadcast(small):
    q, k, v = small
    with pytest.raises(ValueError, match="does not broadcast over the batch"):
        resolvent.chain_attention(q[None], k[None], v[None], np.array([0.1, 0.2]))


def test_unknown_method(small):
    with pytest.raises(ValueError, match=r"method must be one of .*got 'flash'"):
        resolvent.chain_attention(*small, 0.5, method="flash")


@pytest.mark.parametrize("bad", [0, -3, 2.5])
def test_bad_block_size(small, bad):
    with pytest.raises(ValueError, match="block_size must be a positive integer"):
        resolvent.chain_attention(*small, 0.5, block_size=bad)


def test_bad_topk(small):
    with pytest.raises(ValueError, match="topk must be a non-negative integer"):
        resolvent.chain_attention(*small, 0.5, topk=-1)
    with pytest.raises(ValueError, match="topk applies to method='blockwise' only"):
        resolvent.chain_attention(*small, 0.5, method="exact", topk=2)


def test_shape_mismatch(rng):
    q = rng.standard_normal((10, 4))
    with pytest.raises(ValueError, match=r"k must have shape \(\.\.\., n, d\)"):
        resolvent.chain_attention(q, rng.standard_normal((10, 3)), q, 0.5)
    with pytest.raises(ValueError, match=r"v must have shape \(\.\.\., n, dv\)"):
        resolvent.chain_attention(q, q, rng.standard_normal((9, 4)), 0.5)
    with pytest.raises(ValueError, match="q must have at least 2 dimensions"):
        resolvent.chain_attention(q[0], q, q, 0.5)
    with pytest.raises(ValueError, match="do not broadcast"):
        resolvent.chain_attention(np.stack([q, q]), np.stack([q, q, q]), q, 0.5)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("name", ["q", "k", "v", "dy"])
def test_non_finite_input(small, name, bad):
    """By default (check_finite=True) inf and NaN raise ValueError naming the argument, forward and vjp."""
    args = dict(zip("qkv", small), dy=small[2])
    args[name] = args[name].copy()
    args[name][3, 1] = bad
    msg = f"{name} must contain only finite values"
    if name != "dy":
        with pytest.raises(ValueError, match=msg):
            resolvent.chain_attention(args["q"], args["k"], args["v"], 0.5)
    with pytest.raises(ValueError, match=msg):
        resolvent.chain_attention_vjp(args["q"], args["k"], args["v"], 0.5, args["dy"], check_finite=True)


def test_complex_input(small):
    q, k, v = small
    with pytest.raises(ValueError, match="q must be real"):
        resolvent.chain_attention(q + 1j, k, v, 0.5)


def test_bad_scale(small):
    with pytest.raises(ValueError, match="scale must be a finite real number"):
        resolvent.chain_attention(*small, 0.5, scale=float("inf"))


# --- check_finite=False ----------------------------------------------------------------------

ALL_METHODS = [("dense", {}), ("exact", {}), ("blockwise", {"block_size": 4}),
               ("blockwise", {"block_size": 3, "topk": 1})]
ALL_IDS = ["dense", "exact", "blockwise", "topk"]


@settings(fixtures_ok, max_examples=10)
@given(qkv(max_n=20), gammas, st.sampled_from(ALL_METHODS), st.sampled_from([np.float32, np.float64]))
def test_check_finite_false_changes_nothing_on_finite_input(blockwise_path, data, gamma, method_opts, dtype):
    method, opts = method_opts
    q, k, v = (x.astype(dtype) for x in data)
    dy = np.cos(v)  # any cotangent
    y = resolvent.chain_attention(q, k, v, gamma, method=method, **opts)
    np.testing.assert_array_equal(
        resolvent.chain_attention(q, k, v, gamma, method=method, check_finite=False, **opts), y)
    for given_y in (None, y):
        ref = resolvent.chain_attention_vjp(q, k, v, gamma, dy, method=method, y=given_y, return_dgamma=True, **opts)
        got = resolvent.chain_attention_vjp(q, k, v, gamma, dy, method=method, y=given_y, return_dgamma=True,
                                            check_finite=False, **opts)
        for a, b in zip(got, ref):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(a, b)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NumPy's "invalid value" on NaN
@pytest.mark.parametrize("method,opts", ALL_METHODS, ids=ALL_IDS)
@pytest.mark.parametrize("name", ["q", "k", "v", "dy"])
def test_check_finite_false_skips_the_check(blockwise_path, rng, method, opts, name):
    """The caller promised finite input: a NaN is not looked for, it flows into the output."""
    args = dict(zip(("q", "k", "v", "dy"), rng.standard_normal((4, 2, 10, 4))))
    args[name][1, 5, 2] = np.nan
    q, k, v, dy = args["q"], args["k"], args["v"], args["dy"]
    y = resolvent.chain_attention(q, k, v, 0.5, method=method, check_finite=False, **opts)
    grads = resolvent.chain_attention_vjp(q, k, v, 0.5, dy, method=method, check_finite=False, **opts)
    if name == "v":
        assert np.isnan(y[1]).any() and np.isfinite(y[0]).all()  # the other batch entry is untouched
    if name == "dy":
        assert all(np.isnan(g[1]).any() for g in grads)


# --- backward: both CPU paths (the framework-level gradient tests are in test_vjp.py) ---------


@pytest.mark.parametrize("n,b", [(13, 4), (16, 16), (9, 12)])
def test_blockwise_backward_matches_central_differences(blockwise_path, rng, n, b):
    q, k = rng.standard_normal((2, 2, n, 3))
    v, dy = rng.standard_normal((2, 2, n, 2))
    gamma = np.array([0.8, 0.3])
    dq, dk, dv, dg = resolvent.chain_attention_vjp(q, k, v, gamma, dy, block_size=b, return_dgamma=True)

    def loss(**kw):
        args = dict(q=q, k=k, v=v, gamma=gamma) | kw
        return np.sum(dy * resolvent.chain_attention(args["q"], args["k"], args["v"], args["gamma"], block_size=b))

    eps = 1e-6
    for name, x, grad in [("q", q, dq), ("k", k, dk), ("v", v, dv), ("gamma", gamma, dg)]:
        num = np.empty_like(x)
        for i in range(x.size):
            xp, xm = x.copy(), x.copy()
            xp.flat[i] += eps
            xm.flat[i] -= eps
            num.flat[i] = (loss(**{name: xp}) - loss(**{name: xm})) / (2 * eps)
        np.testing.assert_allclose(grad, num, rtol=1e-6, atol=1e-8, err_msg=name)


def test_vjp_reuses_a_given_output(rng):
    q, k, v, dy = rng.standard_normal((4, 2, 30, 4))
    y = resolvent.chain_attention(q, k, v, 0.8, block_size=8)
    a = resolvent.chain_attention_vjp(q, k, v, 0.8, dy, block_size=8)
    b = resolvent.chain_attention_vjp(q, k, v, 0.8, dy, block_size=8, y=y)
    for x, z in zip(a, b):
        np.testing.assert_allclose(x, z, rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="y must have the output's shape"):
        resolvent.chain_attention_vjp(q, k, v, 0.8, dy, y=y[:, :5])


@pytest.mark.parametrize("method", ["exact", "blockwise"])
def test_batch_split_over_threads_changes_nothing(blockwise_path, rng, monkeypatch, method):
    from resolvent import _threads

    q, k, v, dy = rng.standard_normal((4, 5, 33, 4))
    gamma = np.linspace(0.1, 0.9, 5)
    serial = resolvent.chain_attention(q, k, v, gamma, method=method, block_size=6)
    grads = resolvent.chain_attention_vjp(q, k, v, gamma, dy, method=method, block_size=6)
    monkeypatch.setattr(_threads, "PARALLEL_MIN", 0)
    monkeypatch.setattr(_threads, "workers", lambda: 3)
    np.testing.assert_allclose(resolvent.chain_attention(q, k, v, gamma, method=method, block_size=6), serial,
                               rtol=1e-12, atol=1e-14)
    for a, b in zip(resolvent.chain_attention_vjp(q, k, v, gamma, dy, method=method, block_size=6), grads):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


# --- chain on an explicit matrix -------------------------------------------------------------


@given(st.integers(2, 30), st.integers(1, 3), st.floats(0.0, 0.95), st.booleans(), st.integers(0, 2**32 - 1))
def test_chain_equals_explicit_inverse(n, k, gamma, causal, seed):
    rng = np.random.default_rng(seed)
    A = rng.random((2, n, n)) + 0.01
    if causal:
        A = np.tril(A)
    A /= A.sum(axis=-1, keepdims=True)  # row-stochastic: the series converges for gamma < 1
    V = rng.standard_normal((2, n, k))
    ref = chain_reference(A, V, np.full(2, gamma))
    assert rel(resolvent.chain(A, V, gamma), ref, V) < 1e-10
    assert rel(resolvent.chain(A[0], V[0, :, 0], gamma), ref[0, :, 0], V[0]) < 1e-10


@pytest.mark.parametrize("method", ["direct", "block_jacobi", "two_level", "auto"])
def test_chain_methods_agree_with_per_head_gamma(rng, method):
    A = rng.random((3, 40, 40))
    A /= A.sum(axis=-1, keepdims=True)
    V = rng.standard_normal((3, 40, 2))
    gamma = np.array([0.2, 0.6, 0.9])
    y = resolvent.chain(A, V, gamma, method=method, block_size=8, tol=1e-12)
    assert rel(y, chain_reference(A, V, gamma), V) < 1e-9


def test_chain_bad_input(rng):
    A = rng.random((5, 5))
    with pytest.raises(ValueError, match=r"A must be square with shape \(\.\.\., n, n\)"):
        resolvent.chain(A[:, :4], np.ones(5), 0.5)
    with pytest.raises(ValueError, match=r"V must have shape \(\.\.\., 5\) or \(\.\.\., 5, k\)"):
        resolvent.chain(A, np.ones(4), 0.5)
    with pytest.raises(ValueError, match="gamma must lie in"):
        resolvent.chain(A, np.ones(5), 1.0)
