"""Block-sparse links (SPEC 2.3, ``method="blockwise"``, ``topk > 0``) against float64 references.

The references (``tests/reference.py``) build ``Ahat`` entry by entry and apply the chain operator
with an explicit inverse; the library never forms ``Ahat``.  Every test runs twice: on the NumPy
path and on the fused Numba kernel (``resolvent/_cpu/_topk.py``), which also makes the selection.
"""

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import resolvent
from resolvent import _threads
from resolvent._cpu import available as numba_available
from resolvent.attention import _topk

from reference import ahat, chain_reference, dense_attention

PATHS = [False, pytest.param(True, marks=pytest.mark.skipif(not numba_available(), reason="numba missing"))]
# the fixture only selects a code path: sharing it across Hypothesis examples is safe
fixtures_ok = settings(suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(autouse=True, params=PATHS, ids=["numpy", "numba"])
def topk_path(request, monkeypatch):
    """Run every test on the NumPy path and on the fused Numba kernel."""
    monkeypatch.setattr(_topk, "USE_NUMBA", request.param)
    return request.param


def rel(a, b, v=None):
    """``||a - b|| / ||b||``, the denominator kept at least ``1e-3 ||v||`` (rows of Y average rows of v)."""
    diff = np.linalg.norm(np.asarray(a, np.float64) - b)
    denom = max(np.linalg.norm(b), 0.0 if v is None else 1e-3 * np.linalg.norm(v))
    return diff / denom if denom > 0 else diff


def chain_topk(q, k, v, gamma, b, topk, **kw):
    return resolvent.chain_attention(q, k, v, gamma, method="blockwise", block_size=b, topk=topk, **kw)


def brute_selection(q, k, b, topk, scale=None):
    """sel[t] for one head: the topk earlier blocks by ``scale q_t . kbar_J``, ties to the later block."""
    n, d = q.shape
    scale = 1.0 / np.sqrt(d) if scale is None else scale
    m = -(-n // b)
    kbar = [k[J * b : (J + 1) * b].mean(axis=0) for J in range(m)]
    out = []
    for t in range(n):
        cand = range(t // b)
        out.append(set(sorted(cand, key=lambda J: (scale * q[t] @ kbar[J], J), reverse=True)[:topk]))
    return out


def selection(q, k, b, topk, scale=None):
    """The library's choice for one head: (n, min(topk, m - 1)) block indices."""
    scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
    sel = _topk._setup(q[None], k[None], b, topk, scale)[4]
    return sel[0, : q.shape[0]]


def ambiguous_choice(q, k, b, topk, scale=None):
    """True when, for some row, the library and :func:`brute_selection` choose different blocks
    because the scores at the k-th place agree to rounding (mathematically equal scores summed in
    another order: which block wins is then rounding, not the tie rule).  A disagreement with a
    clear gap returns False, so the test that asks goes on and fails."""
    d = q.shape[-1]
    scale = 1.0 / np.sqrt(d) if scale is None else scale
    m = -(-q.shape[-2] // b)
    for h in np.ndindex(*q.shape[:-2]):
        lib = selection(q[h], k[h], b, topk, scale)
        kbar = np.array([k[h][J * b : (J + 1) * b].mean(axis=0) for J in range(m)])
        for t, want in enumerate(brute_selection(q[h], k[h], b, topk, scale)):
            if {int(J) for J in lib[t] if J < m} == want:
                continue
            I = t // b
            s = np.sort(scale * kbar[:I] @ q[h][t])[::-1]
            if len(s) <= topk:  # every earlier block is selected: nothing to break
                continue
            bound = 1e-13 * scale * (np.abs(kbar[:I]) @ np.abs(q[h][t])).max()
            if s[topk - 1] - s[topk] <= bound:
                return True
    return False


def per_block_choice_ahat(q, k, b, topk):
    """The variant SPEC 2.3 rejects: blocks chosen once per query block (by the mean query)."""
    n, d = q.shape
    scale = 1.0 / np.sqrt(d)
    m = -(-n // b)
    qbar = np.array([q[J * b : (J + 1) * b].mean(axis=0) for J in range(m)])
    kbar = np.array([k[J * b : (J + 1) * b].mean(axis=0) for J in range(m)])
    A = np.zeros((n, n))
    for t in range(n):
        I = t // b
        chosen = sorted(range(I), key=lambda J: (qbar[I] @ kbar[J], J), reverse=True)[:topk]
        logw = np.full(n, -np.inf)
        logw[I * b : t + 1] = scale * k[I * b : t + 1] @ q[t]
        for J in range(I):
            sl = slice(J * b, (J + 1) * b)
            logw[sl] = scale * k[sl] @ q[t] if J in chosen else scale * qbar[I] @ kbar[J]
        w = np.exp(logw - logw.max())
        A[t] = w / w.sum()
    return A


# --- against the explicit float64 construction ---------------------------------------------------


@pytest.mark.parametrize(
    "n, b, topk",
    [(16, 4, 1), (19, 4, 2), (23, 5, 1), (30, 7, 3), (40, 6, 2), (33, 8, 2), (48, 8, 4), (29, 1, 2), (21, 3, 6)],
)
def test_equals_explicit_ahat(rng, n, b, topk):
    q, k = 1.5 * rng.standard_normal((2, 2, n, 5))
    v = rng.standard_normal((2, n, 3))
    gamma = np.array([0.9, 0.5])
    y = chain_topk(q, k, v, gamma, b, topk)
    ref = chain_reference(ahat(q, k, b, topk), v, gamma)
    assert y.shape == (2, n, 3)
    assert rel(y, ref, v) < 1e-10


def test_explicit_scale(rng):
    q, k, v = rng.standard_normal((3, 1, 26, 4))
    y = chain_topk(q, k, v, 0.8, 6, 2, scale=0.9)
    assert rel(y, chain_reference(ahat(q, k, 6, 2, scale=0.9), v, 0.8), v) < 1e-10


@pytest.mark.parametrize("n, b", [(24, 4), (25, 6), (17, 17), (9, 1)])
def test_topk_at_least_m_minus_1_is_dense(rng, n, b):
    q, k, v = 2.0 * rng.standard_normal((3, 2, n, 4))
    m = -(-n // b)
    dense = resolvent.chain_attention(q, k, v, 0.9, method="dense")
    for topk in {max(m - 1, 1), m + 3}:
        assert rel(chain_topk(q, k, v, 0.9, b, topk), dense, v) < 1e-10


@pytest.mark.parametrize("n, b", [(24, 4), (27, 5)])
def test_topk_zero_is_pooled(rng, n, b):
    """The public topk=0 path (SPEC 2.2) and this module run with no links build the same operator."""
    q, k, v = rng.standard_normal((3, 2, n, 4))
    g = np.array([0.9, 0.3])
    pooled = chain_topk(q, k, v, g, b, 0)
    assert rel(pooled, chain_reference(ahat(q, k, b, 0), v, g), v) < 1e-10
    no_links = _topk.forward(q, k, v, g, b, 0, 0.5)
    assert rel(no_links, pooled, v) < 1e-10


# --- the per-token choice -------------------------------------------------------------------------


def two_choice_problem():
    """Block 0 keys point along e0, block 1 along e1; in block 2 token 4 looks along e0, token 5 along e1."""
    k = np.zeros((6, 2))
    k[0:2, 0] = 1.0
    k[2:4, 1] = 1.0
    k[4:6] = [[0.5, 0.5], [-1.0, 0.25]]
    q = np.zeros((6, 2))
    q[:4] = [[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [1.0, 1.0]]
    q[4] = [3.0, 0.0]
    q[5] = [0.0, 2.0]
    v = np.arange(12.0).reshape(6, 2)
    return q, k, v


def test_tokens_of_one_block_choose_different_blocks():
    q, k, v = two_choice_problem()
    sel = selection(q, k, 2, 1)
    assert sel[4, 0] == 0 and sel[5, 0] == 1
    assert brute_selection(q, k, 2, 1)[4:] == [{0}, {1}]
    y = chain_topk(q, k, v, 0.7, 2, 1)
    ref = chain_reference(ahat(q, k, 2, 1), v, 0.7)
    assert rel(y, ref, v) < 1e-10
    # choosing once per query block gives another operator: the two rows cannot both be right
    other = chain_reference(per_block_choice_ahat(q, k, 2, 1), v, 0.7)
    assert np.abs(other[4:] - y[4:]).max() > 1e-3


def test_ties_go_to_the_later_block():
    """Blocks 0, 1, 2 have the same mean key (exactly, in binary); block 3 must take 2, then 1."""
    k = np.array([[1, 0], [-1, 2], [0, 1], [0, 1], [2, 1], [-2, 1], [1, 1], [1, 1]], float)
    q = np.array([[1, 1], [0, 1], [1, 0], [1, 1], [2, 0], [0, 2], [1, 2], [2, 1]], float)
    v = np.arange(16.0).reshape(8, 2)
    for topk, want in [(1, [{2}, {2}]), (2, [{2, 1}, {2, 1}])]:
        assert brute_selection(q, k, 2, topk)[6:] == want
        assert [set(s) for s in selection(q, k, 2, topk, scale=0.5)[6:].tolist()] == want
        y = chain_topk(q, k, v, 0.6, 2, topk, scale=0.5)
        assert rel(y, chain_reference(ahat(q, k, 2, topk, scale=0.5), v, 0.6), v) < 1e-10


# --- structure: constants, heads, batches, precision ------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 0.95])
def test_constants_are_preserved(rng, dtype, gamma):
    q, k = rng.standard_normal((2, 2, 45, 6)).astype(dtype)
    y = chain_topk(q, k, np.ones((2, 45, 3), dtype), gamma, 8, 2)
    assert y.dtype == dtype
    np.testing.assert_allclose(y, 1.0, rtol=0, atol=1e-5 if dtype == np.float32 else 1e-12)


def test_batch_equals_loop_and_per_head_gamma(rng):
    q, k, v = rng.standard_normal((3, 2, 3, 30, 4))
    gamma = np.array([0.2, 0.6, 0.95])  # one per head, broadcast over the batch
    y = chain_topk(q, k, v, gamma, 6, 2)
    assert y.shape == (2, 3, 30, 4)
    for i in range(2):
        for h in range(3):
            yl = chain_topk(q[i, h], k[i, h], v[i, h], gamma[h], 6, 2)
            np.testing.assert_allclose(y[i, h], yl, rtol=1e-12, atol=1e-12)
    assert rel(y[0, 1], chain_reference(ahat(q[0, 1], k[0, 1], 6, 2), v[0, 1], 0.6), v[0, 1]) < 1e-10


def test_large_batch_uses_the_stacked_solver(rng):
    q, k, v = rng.standard_normal((3, 70, 11, 2))
    y = chain_topk(q, k, v, 0.9, 3, 1)
    for i in (0, 33, 69):
        assert rel(y[i], chain_reference(ahat(q[i], k[i], 3, 1), v[i], 0.9), v[i]) < 1e-10


def test_batch_split_over_threads_changes_nothing(rng, monkeypatch):
    q, k, v = rng.standard_normal((3, 5, 37, 4))
    gamma = np.linspace(0.1, 0.9, 5)
    serial = chain_topk(q, k, v, gamma, 6, 2)
    monkeypatch.setattr(_threads, "PARALLEL_MIN", 0)
    monkeypatch.setattr(_threads, "workers", lambda: 3)
    np.testing.assert_allclose(chain_topk(q, k, v, gamma, 6, 2), serial, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("n, b, topk", [(48, 8, 2), (45, 7, 1), (40, 4, 4)])
def test_float32_close_to_float64(rng, n, b, topk):
    q, k, v = rng.standard_normal((3, 2, n, 8))
    y64 = chain_topk(q, k, v, 0.95, b, topk)
    y32 = chain_topk(q.astype(np.float32), k.astype(np.float32), v.astype(np.float32), 0.95, b, topk)
    assert y32.dtype == np.float32
    assert rel(y32, y64, v) < 1e-4


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_huge_scores_stay_finite(rng, dtype):
    """Scores up to +-1e4 (scale 1): every exponent is shifted to <= 0, nothing overflows."""
    n, b = 40, 5
    q, k = 60.0 * rng.standard_normal((2, 2, n, 2))
    assert 5e3 < np.abs(q @ np.swapaxes(k, -1, -2)).max() < 3e4
    v = rng.standard_normal((2, n, 3))
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        for topk in (1, 3):
            args = (q.astype(dtype), k.astype(dtype))
            y = chain_topk(*args, v.astype(dtype), 0.9, b, topk, scale=1.0)
            assert np.isfinite(y).all()
            ones = chain_topk(*args, np.ones_like(v, dtype=dtype), 0.9, b, topk, scale=1.0)
            np.testing.assert_allclose(ones, 1.0, atol=1e-4)
            if dtype == np.float64:
                ref = chain_reference(ahat(q, k, b, topk, scale=1.0), v, 0.9)
                assert rel(y, ref, v) < 1e-10


def test_pooled_residue_is_not_a_cancellation(rng):
    """A selected block whose pooled score dwarfs the row's real weights must not swamp the residue.

    Block 0's mean key is huge against the mean query of block 2, but token 4 has its exact link
    there and small real scores; evaluating the residue as (all pooled) - (selected pooled) would
    subtract two numbers of size exp(300) to get one of size 1.
    """
    n, b = 6, 2
    k = np.array([[30.0, 0.0], [30.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.0, 0.0], [0.0, 0.0]])
    q = np.array([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.02, 0.3], [20.0, 0.0]])
    v = rng.standard_normal((n, 2))
    assert selection(q, k, b, 1, scale=1.0)[4, 0] == 0
    for dtype, tol in [(np.float64, 1e-10), (np.float32, 1e-4)]:
        y = chain_topk(q.astype(dtype), k.astype(dtype), v.astype(dtype), 0.9, b, 1, scale=1.0)
        ref = chain_reference(ahat(q, k, b, 1, scale=1.0), v, 0.9)
        assert rel(y, ref, v) < tol


# --- block_mass with topk ----------------------------------------------------------------------------


def brute_block_mass(q, k, b, topk):
    A = dense_attention(q, k)
    n = q.shape[0]
    sel = brute_selection(q, k, b, topk)
    kept = [A[t, (t // b) * b : t + 1].sum() + sum(A[t, J * b : (J + 1) * b].sum() for J in sel[t]) for t in range(n)]
    return np.mean(kept)


@pytest.mark.parametrize("n, b", [(32, 4), (37, 6)])
def test_block_mass_with_topk(rng, n, b):
    q, k = rng.standard_normal((2, 2, n, 4))
    m = -(-n // b)
    prev = resolvent.block_mass(q, k, b)
    for topk in range(1, m):
        bm = resolvent.block_mass(q, k, b, topk=topk)
        assert bm.shape == (2,)
        want = [brute_block_mass(q[h], k[h], b, topk) for h in range(2)]
        np.testing.assert_allclose(bm, want, rtol=1e-12)
        assert np.all(bm >= prev - 1e-12)  # more links keep more mass
        prev = bm
    np.testing.assert_allclose(resolvent.block_mass(q, k, b, topk=m - 1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(resolvent.block_mass(q, k, b, topk=m + 2), 1.0, rtol=1e-12)


# --- properties -----------------------------------------------------------------------------------------


@st.composite
def problems(draw, max_n=32):
    n = draw(st.integers(1, max_n))
    b = draw(st.integers(1, n))
    topk = draw(st.integers(1, 5))
    d = draw(st.integers(1, 5))
    dv = draw(st.integers(1, 3))
    h = draw(st.integers(1, 2))
    elems = st.floats(-3, 3, allow_nan=False, width=64)
    q = draw(hnp.arrays(np.float64, (h, n, d), elements=elems))
    k = draw(hnp.arrays(np.float64, (h, n, d), elements=elems))
    v = draw(hnp.arrays(np.float64, (h, n, dv), elements=elems))
    gamma = draw(hnp.arrays(np.float64, (h,), elements=st.floats(0.0, 0.97)))
    return q, k, v, gamma, b, topk


@fixtures_ok
@given(problems())
def test_property_equals_explicit_ahat(p):
    q, k, v, gamma, b, topk = p
    assume(not ambiguous_choice(q, k, b, topk))
    y = chain_topk(q, k, v, gamma, b, topk)
    ref = chain_reference(ahat(q, k, b, topk), v, gamma)
    assert rel(y, ref, v) < 1e-10
    ones = chain_topk(q, k, np.ones_like(v), gamma, b, topk)
    np.testing.assert_allclose(ones, 1.0, rtol=0, atol=1e-12)


@fixtures_ok
@given(problems(max_n=24))
def test_property_block_mass(p):
    q, k, _, _, b, topk = p
    bm = resolvent.block_mass(q, k, b, topk=topk)
    want = [brute_block_mass(q[h], k[h], b, topk) for h in range(q.shape[0])]
    np.testing.assert_allclose(bm, want, rtol=1e-10, atol=1e-12)


# --- the backward pass -----------------------------------------------------------------------------------


def vjp_topk(q, k, v, gamma, dy, b, topk, **kw):
    return resolvent.chain_attention_vjp(q, k, v, gamma, dy, method="blockwise", block_size=b, topk=topk,
                                         return_dgamma=True, **kw)


def explicit_g(A, dy, gamma):
    """``G = (I - gamma A)^{-T} (1 - gamma) dY`` and ``X = (I - gamma A)^{-1} A V``'s solver, float64."""
    n = A.shape[-1]
    g = np.asarray(gamma, dtype=np.float64)[..., None, None]
    M = np.eye(n) - g * A
    return np.linalg.solve(np.swapaxes(M, -1, -2), (1 - g) * dy), M


def selection_margin(q, k, b, topk, scale=None):
    """Smallest gap, over rows with a choice, between the k-th and the (k+1)-th block score."""
    n, d = q.shape
    scale = 1.0 / np.sqrt(d) if scale is None else scale
    m = -(-n // b)
    kbar = np.array([k[J * b : (J + 1) * b].mean(axis=0) for J in range(m)])
    gaps = [np.inf]
    for t in range(n):
        s = np.sort(scale * kbar[: t // b] @ q[t])[::-1]
        if len(s) > topk:
            gaps.append(s[topk - 1] - s[topk])
    return min(gaps)


@pytest.mark.parametrize("n, b, topk", [(13, 3, 1), (16, 4, 2), (19, 4, 1), (23, 5, 2), (22, 3, 3), (12, 2, 4)])
def test_vjp_matches_central_differences(rng, n, b, topk):
    """All four gradients along random directions against central differences of the forward."""
    q, k = rng.standard_normal((2, 2, n, 3))
    v, dy = rng.standard_normal((2, 2, n, 2))
    gamma = np.array([0.35, 0.85])
    for h in range(2):  # eps * |direction| must not move any row's choice of blocks
        assert selection_margin(q[h], k[h], b, topk) > 1e-4
    grads = vjp_topk(q, k, v, gamma, dy, b, topk)
    args = (q, k, v, gamma)

    def loss(*a):
        return float(np.sum(dy * chain_topk(*a, b, topk)))

    eps = 1e-6
    for i, (x, gr) in enumerate(zip(args, grads)):
        assert gr.shape == x.shape and gr.dtype == np.float64
        direction = rng.standard_normal(x.shape)
        plus, minus = list(args), list(args)
        plus[i] = x + eps * direction
        minus[i] = x - eps * direction
        fd = (loss(*plus) - loss(*minus)) / (2 * eps)
        assert abs(np.sum(gr * direction) - fd) <= 1e-7 * max(1.0, abs(fd)), (i, np.sum(gr * direction), fd)


@pytest.mark.parametrize("n, b", [(24, 4), (25, 6), (17, 17), (9, 1)])
def test_vjp_topk_at_least_m_minus_1_is_dense(rng, n, b):
    q, k, v, dy = 1.5 * rng.standard_normal((4, 2, n, 4))
    gamma = np.array([0.9, 0.4])
    m = -(-n // b)
    dense = resolvent.chain_attention_vjp(q, k, v, gamma, dy, method="dense", return_dgamma=True)
    for topk in {max(m - 1, 1), m + 3}:
        for got, want in zip(vjp_topk(q, k, v, gamma, dy, b, topk), dense):
            assert rel(got, want) < 1e-10


@pytest.mark.parametrize("n, b, topk", [(16, 4, 1), (23, 5, 2), (30, 7, 3), (29, 1, 2), (26, 6, 1)])
def test_dv_and_dgamma_equal_explicit_ahat(rng, n, b, topk):
    """``dV = Ahat^T G`` and ``dgamma = -<dY, X> + <G, Ahat X>`` with Ahat built entry by entry."""
    q, k = 1.5 * rng.standard_normal((2, 2, n, 5))
    v, dy = rng.standard_normal((2, 2, n, 3))
    gamma = np.array([0.95, 0.5])
    A = ahat(q, k, b, topk)
    G, M = explicit_g(A, dy, gamma)
    X = np.linalg.solve(M, A @ v)
    _, _, dv, dgamma = vjp_topk(q, k, v, gamma, dy, b, topk)
    assert rel(dv, np.swapaxes(A, -1, -2) @ G) < 1e-10
    want = -np.einsum("bij,bij->b", dy, X) + np.einsum("bij,bij->b", G, A @ X)
    np.testing.assert_allclose(dgamma, want, rtol=1e-10, atol=1e-12 * np.abs(want).max())


def test_vjp_topk_zero_is_pooled(rng):
    """The module's backward with no links is the SPEC 2.2 backward (computed by _blockwise)."""
    q, k, v, dy = rng.standard_normal((4, 2, 27, 4))
    g = np.array([0.9, 0.3])
    pooled = resolvent.chain_attention_vjp(q, k, v, g, dy, method="blockwise", block_size=5, return_dgamma=True)
    for got, want in zip(_topk.backward(q, k, v, g, 5, 0, 0.5, dy), pooled):
        assert rel(got, want) < 1e-10


def test_vjp_batch_equals_loop_and_given_output(rng):
    q, k, v, dy = rng.standard_normal((4, 2, 3, 30, 4))
    gamma = np.array([0.2, 0.6, 0.95])  # one per head, broadcast over the batch
    grads = vjp_topk(q, k, v, gamma, dy, 6, 2)
    y = chain_topk(q, k, v, gamma, 6, 2)
    # with the forward's output the backward recomputes only the row normalisers
    for a, c in zip(vjp_topk(q, k, v, gamma, dy, 6, 2, y=y), grads):
        np.testing.assert_allclose(a, c, rtol=1e-12, atol=1e-13)
    assert grads[3].shape == (3,)
    dg = np.zeros(3)
    for i in range(2):
        for h in range(3):
            gl = vjp_topk(q[i, h], k[i, h], v[i, h], gamma[h], dy[i, h], 6, 2)
            for a, c in zip(gl[:3], grads[:3]):
                np.testing.assert_allclose(a, c[i, h], rtol=1e-12, atol=1e-13)
            dg[h] += gl[3]
    np.testing.assert_allclose(grads[3], dg, rtol=1e-12)


def test_vjp_large_batch_and_threads_change_nothing(rng, monkeypatch):
    """The stacked solver (batch > 64) and the batch split over threads give the same gradients."""
    q, k, v, dy = rng.standard_normal((4, 70, 11, 2))
    gamma = np.linspace(0.1, 0.9, 70)
    serial = _topk.backward(q, k, v, gamma, 3, 1, 0.7, dy)
    for i in (0, 69):
        one = _topk.backward(q[i : i + 1], k[i : i + 1], v[i : i + 1], gamma[i : i + 1], 3, 1, 0.7, dy[i : i + 1])
        for a, c in zip(one, serial):
            np.testing.assert_allclose(a[0], c[i], rtol=1e-11, atol=1e-13)
    monkeypatch.setattr(_threads, "PARALLEL_MIN", 0)
    monkeypatch.setattr(_threads, "workers", lambda: 3)
    y = _topk.forward(q, k, v, gamma, 3, 1, 0.7)
    for a, c in zip(_topk.backward(q, k, v, gamma, 3, 1, 0.7, dy, y=y), serial):
        np.testing.assert_allclose(a, c, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("n, b, topk", [(48, 8, 2), (45, 7, 1)])
def test_vjp_float32_close_to_float64(rng, n, b, topk):
    q, k, v, dy = rng.standard_normal((4, 2, n, 8))
    g64 = vjp_topk(q, k, v, 0.95, dy, b, topk)
    g32 = vjp_topk(*(x.astype(np.float32) for x in (q, k, v)), np.float32(0.95), dy.astype(np.float32), b, topk)
    for a, c in zip(g32, g64):
        assert a.dtype == np.float32
        assert rel(a, c) < 1e-4


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_vjp_huge_scores_stay_finite(rng, dtype):
    """Scores up to +-1e4: the backward's exponents are shifted by each row's final max too."""
    n, b = 40, 5
    q, k = 60.0 * rng.standard_normal((2, 2, n, 2))
    v, dy = rng.standard_normal((2, 2, n, 3))
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        for topk in (1, 3):
            args = [x.astype(dtype) for x in (q, k, v)]
            grads = vjp_topk(*args, 0.9, dy.astype(dtype), b, topk, scale=1.0)
            assert all(np.isfinite(x).all() for x in grads)
            if dtype == np.float64:
                A = ahat(q, k, b, topk, scale=1.0)
                G, _ = explicit_g(A, dy, 0.9)
                assert rel(grads[2], np.swapaxes(A, -1, -2) @ G) < 1e-10


def test_vjp_pooled_residue_is_not_a_cancellation(rng):
    """The case of test_pooled_residue_is_not_a_cancellation: a selected block with a huge pooled score."""
    n, b = 6, 2
    k = np.array([[30.0, 0.0], [30.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.0, 0.0], [0.0, 0.0]])
    q = np.array([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.02, 0.3], [20.0, 0.0]])
    v, dy = rng.standard_normal((2, n, 2))
    A = ahat(q, k, b, 1, scale=1.0)
    G, _ = explicit_g(A, dy, 0.9)
    want = np.swapaxes(A, -1, -2) @ G
    for dtype, tol in [(np.float64, 1e-10), (np.float32, 1e-4)]:
        args = [x.astype(dtype) for x in (q, k, v)]
        dv = vjp_topk(*args, 0.9, dy.astype(dtype), b, 1, scale=1.0)[2]
        assert rel(dv, want) < tol


@fixtures_ok
@given(problems(max_n=24), st.integers(0, 2**32 - 1))
def test_property_vjp_against_explicit_ahat(p, seed):
    """dV and dgamma from the explicit Ahat; for V = 1 (Y = 1 whatever q, k, gamma) dq = dk = dgamma = 0."""
    q, k, v, gamma, b, topk = p
    assume(not ambiguous_choice(q, k, b, topk))
    dy = np.random.default_rng(seed).standard_normal(v.shape)
    A = ahat(q, k, b, topk)
    G, M = explicit_g(A, dy, gamma)
    X = np.linalg.solve(M, A @ v)
    _, _, dv, dgamma = vjp_topk(q, k, v, gamma, dy, b, topk)
    assert np.linalg.norm(dv - np.swapaxes(A, -1, -2) @ G) <= 1e-10 * max(np.linalg.norm(dy), 1e-3)
    want = -np.einsum("bij,bij->b", dy, X) + np.einsum("bij,bij->b", G, A @ X)
    scale_g = np.linalg.norm(dy) * max(np.linalg.norm(v), 1.0)
    np.testing.assert_allclose(dgamma, want, rtol=0, atol=1e-10 * scale_g)
    dq, dk, _, dg1 = vjp_topk(q, k, np.ones_like(v), gamma, dy, b, topk)
    for x in (dq, dk, dg1):
        np.testing.assert_allclose(x, 0.0, rtol=0, atol=1e-10 * max(np.linalg.norm(dy), 1.0))


# --- the fused kernel against the NumPy path ---------------------------------------------------------

needs_numba = pytest.mark.skipif(not numba_available(), reason="numba missing")


def both_paths(monkeypatch, fn):
    out = []
    for flag in (False, True):
        monkeypatch.setattr(_topk, "USE_NUMBA", flag)
        out.append(fn())
    return out


@needs_numba
@pytest.mark.parametrize("n, b, topk", [(37, 6, 2), (40, 8, 1), (45, 7, 3), (29, 1, 2), (12, 12, 2), (50, 4, 30)])
def test_fused_kernel_matches_numpy_path(rng, monkeypatch, topk_path, n, b, topk):
    """Same selection, same output (float64 to 1e-12, float32 to rounding) and the same row statistics."""
    if not topk_path:
        pytest.skip("compares the two paths itself")
    q, k = 1.5 * rng.standard_normal((2, 3, n, 5))
    v = rng.standard_normal((3, n, 4))
    g = np.array([0.0, 0.6, 0.95])
    scale = 0.45
    sel_np, sel_nb = both_paths(monkeypatch, lambda: _topk._setup(q, k, b, topk, scale).sel)
    np.testing.assert_array_equal(sel_nb, sel_np)  # the same blocks in the same order
    # small integers: many exactly tied block scores, each broken towards the later block
    qi, ki = rng.integers(-2, 3, (2, 3, n, 4)).astype(np.float64)
    ties_np, ties_nb = both_paths(monkeypatch, lambda: _topk._setup(qi, ki, b, topk, 0.5).sel)
    np.testing.assert_array_equal(ties_nb, ties_np)
    y_np, y_nb = both_paths(monkeypatch, lambda: _topk.forward(q, k, v, g, b, topk, scale))
    assert rel(y_nb, y_np) < 1e-12
    y32 = _topk.forward(*(x.astype(np.float32) for x in (q, k, v, g)), b, topk, scale)
    assert y32.dtype == np.float32 and rel(y32, y_np) < 1e-5
    _, mu, ell = _topk._forward(q, k, v, g, b, topk, scale, stats=True)
    _, _, mu_nb, ell_nb = _topk._forward_numba(q, k, v, g, b, topk, scale, values=False)
    N = mu_nb.shape[1]  # padded rows included: the backward reads their statistics too
    np.testing.assert_allclose(mu_nb, mu[:, :N], rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(ell_nb, ell[:, :N], rtol=1e-12)


@needs_numba
@pytest.mark.parametrize("dtype, tol", [(np.float32, 2e-7), (np.float64, 1e-15)])
def test_vectorised_exp(topk_path, dtype, tol):
    """The kernel's exp(x) for x <= 0: within a few ulp of exp, 0 for -inf and below the normal range."""
    if not topk_path:
        pytest.skip("one run is enough")
    import numba

    from resolvent._cpu._topk import expneg

    @numba.njit
    def run(x, out):
        for i in range(x.shape[0]):
            out[i] = expneg(x[i])

    tiny = np.log(np.finfo(dtype).tiny)
    x = np.concatenate([-np.geomspace(1e-30, -tiny, 20000), np.linspace(tiny, 0, 20000), [0.0, -0.0]]).astype(dtype)
    out = np.empty_like(x)
    run(x, out)
    want = np.exp(x.astype(np.float64))
    normal = x >= tiny + 1
    assert np.all(np.abs(out[normal] - want[normal]) <= tol * want[normal])
    edge = np.array([-np.inf, tiny - 1, -1e4], dtype=dtype)
    out = np.empty_like(edge)
    run(edge, out)
    np.testing.assert_array_equal(out, 0.0)


@needs_numba
@pytest.mark.parametrize("n, b, topk", [(37, 6, 2), (40, 8, 1), (29, 1, 2), (12, 12, 2), (50, 4, 30), (45, 7, 3)])
def test_fused_backward_matches_numpy_path(rng, monkeypatch, topk_path, n, b, topk):
    """The backward kernel against the NumPy backward: with and without the forward's output."""
    if not topk_path:
        pytest.skip("compares the two paths itself")
    q, k = 1.5 * rng.standard_normal((2, 3, n, 5))
    v, dy = rng.standard_normal((2, 3, n, 4))
    g = np.array([0.0, 0.6, 0.95])
    scale = 0.45
    want, got = both_paths(monkeypatch, lambda: _topk.backward(q, k, v, g, b, topk, scale, dy))
    y = _topk.forward(q, k, v, g, b, topk, scale)
    given = _topk.backward(q, k, v, g, b, topk, scale, dy, y=y)
    for a, c, w in zip(got, given, want):
        assert rel(a, w) < 1e-12 and rel(c, w) < 1e-12
    g32 = _topk.backward(*(x.astype(np.float32) for x in (q, k, v, g)), b, topk, scale, dy.astype(np.float32))
    for a, w in zip(g32, want):
        assert a.dtype == np.float32 and rel(a, w) < 1e-4
