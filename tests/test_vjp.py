"""Gradients: chain_attention_vjp for every method, solve_vjp, chain_vjp.

Each is checked against central finite differences of the forward (float64) and against PyTorch
autograd through references written in plain PyTorch ops: dense causal attention, the blockwise
``Ahat`` built from SPEC 2.2 / 2.3 (itself checked against tests/reference.py's ``ahat``),
``torch.linalg.solve`` and an explicit chain operator.
"""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import resolvent

from reference import ahat

# (method, options) for every evaluation; blockwise with blocks dividing n, not dividing n, and >= n
METHODS = [
    ("dense", {}),
    ("exact", {}),
    ("blockwise", {"block_size": 4}),
    ("blockwise", {"block_size": 5}),
    ("blockwise", {"block_size": 16}),
    ("blockwise", {"block_size": 3, "topk": 1}),
    ("blockwise", {"block_size": 4, "topk": 2}),
]
IDS = ["dense", "exact", "blockwise-b4", "blockwise-b5", "blockwise-b16", "topk1-b3", "topk2-b4"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def torch():
    return pytest.importorskip("torch")


def inputs(rng, batch=(2,), n=13, d=3, dv=2):
    q = rng.standard_normal(batch + (n, d))
    k = rng.standard_normal(batch + (n, d))
    v = rng.standard_normal(batch + (n, dv))
    dy = rng.standard_normal(batch + (n, dv))
    gamma = rng.uniform(0.2, 0.9, size=batch)
    return q, k, v, gamma, dy


def rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300)


# --------------------------------------------------------------------------- finite differences

def directional_fd(f, args, direction, i, eps=1e-6):
    """Central difference of the scalar ``f`` along ``direction`` in argument ``i``."""
    plus = list(args)
    minus = list(args)
    plus[i] = args[i] + eps * direction
    minus[i] = args[i] - eps * direction
    return (f(*plus) - f(*minus)) / (2 * eps)


@pytest.mark.parametrize("method,opts", METHODS, ids=IDS)
def test_chain_attention_vjp_matches_finite_differences(rng, method, opts):
    q, k, v, gamma, dy = inputs(rng)

    def loss(q, k, v, gamma):
        return float(np.sum(dy * resolvent.chain_attention(q, k, v, gamma, method=method, **opts)))

    grads = resolvent.chain_attention_vjp(q, k, v, gamma, dy, method=method, return_dgamma=True, **opts)
    args = (q, k, v, gamma)
    for i, (x, g) in enumerate(zip(args, grads)):
        assert g.shape == x.shape and g.dtype == np.float64
        direction = rng.standard_normal(x.shape)
        fd = directional_fd(loss, args, direction, i)
        assert abs(np.sum(g * direction) - fd) <= 1e-6 * max(1.0, abs(fd)), (i, np.sum(g * direction), fd)


# --------------------------------------------------------------------------- PyTorch references

def torch_dense_attention(torch, q, k, scale):
    n = q.shape[-2]
    s = scale * q @ k.transpose(-1, -2)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    return torch.softmax(s.masked_fill(~causal, float("-inf")), dim=-1)


def torch_ahat(torch, q, k, b, topk=0, scale=None):
    """SPEC 2.2 / 2.3 in plain PyTorch ops, vectorised: differentiable in q and k."""
    n, d = q.shape[-2:]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    m = -(-n // b)
    blk = torch.arange(n) // b                                      # block of each position
    E = torch.nn.functional.one_hot(blk, m).to(q.dtype)             # (n, m) block indicator
    qbar = (E.T @ q) / E.sum(0)[:, None]                            # (..., m, d) mean query
    kbar = (E.T @ k) / E.sum(0)[:, None]                            # (..., m, d) mean key
    s = scale * q @ k.transpose(-1, -2)                             # token scores s_ts
    sigma = scale * qbar @ kbar.transpose(-1, -2)                   # block scores sigma_IJ
    sigma_tok = sigma[..., blk[:, None], blk[None, :]]              # sigma_{I(t) J(s)}
    t_idx, s_idx = torch.arange(n)[:, None], torch.arange(n)[None, :]
    own = (blk[:, None] == blk[None, :]) & (s_idx <= t_idx)
    earlier = blk[None, :] < blk[:, None]
    exact = own
    if topk:
        with torch.no_grad():  # the selection is piecewise constant: no gradient flows through it
            score = scale * q @ kbar.transpose(-1, -2)              # (..., n, m): q_t . kbar_J
            valid = torch.arange(m)[None, :] < blk[:, None]         # J < I(t)
            score = score.masked_fill(~valid, float("-inf"))
            # order by (score, J) descending: later blocks first, then a stable sort on the score
            flipped = score.flip(-1)
            order = torch.sort(flipped, dim=-1, descending=True, stable=True).indices
            chosen = (m - 1 - order)[..., :topk]
            sel = torch.zeros(score.shape, dtype=torch.bool).scatter_(-1, chosen, True) & valid
            sel_tok = torch.gather(sel, -1, blk.expand(sel.shape[:-1] + (n,)))  # (..., n, n)
        exact = own | (earlier & sel_tok)
    logw = torch.where(exact, s, torch.where(earlier, sigma_tok, torch.full_like(s, float("-inf"))))
    return torch.softmax(logw, dim=-1)


def torch_chain(torch, A, v, gamma):
    n = A.shape[-1]
    g = gamma[..., None, None]
    M = torch.eye(n, dtype=A.dtype) - g * A
    return (1 - g) * torch.linalg.solve_triangular(M, A @ v, upper=False)


@pytest.mark.parametrize("b,topk", [(4, 0), (5, 0), (13, 0), (1, 0), (3, 1), (4, 2), (2, 5)])
def test_torch_ahat_equals_reference(torch, rng, b, topk):
    q, k, *_ = inputs(rng)
    A = torch_ahat(torch, torch.from_numpy(q), torch.from_numpy(k), b, topk).numpy()
    np.testing.assert_allclose(A, ahat(q, k, b, topk=topk), rtol=1e-12, atol=1e-14)


def autograd_grads(torch, attention, q, k, v, gamma, dy):
    t = [torch.tensor(x, requires_grad=True) for x in (q, k, v, gamma)]
    y = torch_chain(torch, attention(*t[:2]), t[2], t[3])
    (y * torch.from_numpy(dy)).sum().backward()
    return [x.grad.numpy() for x in t]


@pytest.mark.parametrize("method,opts", [("dense", {}), ("exact", {}), ("blockwise", {"block_size": 13}),
                                         ("blockwise", {"block_size": 64})], ids=["dense", "exact", "bw13", "bw64"])
def test_vjp_matches_autograd_through_dense_reference(torch, rng, method, opts):
    q, k, v, gamma, dy = inputs(rng)
    ref = autograd_grads(torch, lambda q, k: torch_dense_attention(torch, q, k, 3**-0.5), q, k, v, gamma, dy)
    got = resolvent.chain_attention_vjp(q, k, v, gamma, dy, method=method, return_dgamma=True, **opts)
    for g, r in zip(got, ref):
        assert rel(g, r) < 1e-10


@pytest.mark.parametrize(
    "b,topk",
    [(4, 0), (5, 0), (1, 0), (6, 0),
     (3, 1), (4, 2)],
)
def test_blockwise_vjp_matches_autograd_through_ahat(torch, rng, b, topk):
    q, k, v, gamma, dy = inputs(rng)
    ref = autograd_grads(torch, lambda q, k: torch_ahat(torch, q, k, b, topk), q, k, v, gamma, dy)
    got = resolvent.chain_attention_vjp(q, k, v, gamma, dy, method="blockwise", block_size=b, topk=topk,
                                        return_dgamma=True)
    for g, r in zip(got, ref):
        assert rel(g, r) < 1e-10


@settings(max_examples=15, deadline=None)
@given(
    n=st.integers(1, 20), d=st.integers(1, 4), b=st.integers(1, 8), gamma=st.floats(0.0, 0.95),
    seed=st.integers(0, 2**32 - 1), scale=st.one_of(st.none(), st.floats(0.1, 2.0)), topk=st.integers(0, 3),
)
def test_blockwise_vjp_property(n, d, b, gamma, seed, scale, topk):
    """Any n, d, block size, topk, gamma and scale: the blockwise vjp is autograd through Ahat."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(seed)
    q, k, v, _, dy = inputs(rng, batch=(1,), n=n, d=d)
    g = np.array([gamma])
    ref = autograd_grads(torch, lambda q, k: torch_ahat(torch, q, k, b, topk, scale), q, k, v, g, dy)
    got = resolvent.chain_attention_vjp(q, k, v, g, dy, method="blockwise", block_size=b, topk=topk, scale=scale,
                                        return_dgamma=True)
    for x, r in zip(got, ref):
        assert np.linalg.norm(x - r) <= 1e-10 * max(np.linalg.norm(r), 1.0)


def test_vjp_broadcast_and_float32(rng):
    """Heads-only k and a per-head gamma: gradients are summed back to the inputs' shapes and dtypes."""
    q, _, v, _, dy = inputs(rng, batch=(2, 3))
    k = rng.standard_normal((3, 13, 3))
    gamma = np.array([0.3, 0.5, 0.8])
    f32 = [x.astype(np.float32) for x in (q, k, v, gamma, dy)]
    for method in ("dense", "exact", "blockwise"):
        g64 = resolvent.chain_attention_vjp(q, k, v, gamma, dy, method=method, block_size=4, return_dgamma=True)
        g32 = resolvent.chain_attention_vjp(*f32, method=method, block_size=4, return_dgamma=True)
        for a, b, x in zip(g32, g64, (q, k, v, gamma)):
            assert a.shape == x.shape and b.shape == x.shape and a.dtype == np.float32
            assert rel(a, b) < 1e-4


# --------------------------------------------------------------------------- solve_vjp

def torch_solve_grads(torch, A, B, z, dX, lower=False, vector=False):
    tA, tB = torch.tensor(A, requires_grad=True), torch.tensor(B, requires_grad=True)
    tz = torch.tensor(z, dtype=torch.complex128 if isinstance(z, complex) else torch.float64, requires_grad=True)
    n = A.shape[-1]
    Aw = tA.tril() if lower else tA
    M = tz * torch.eye(n, dtype=Aw.dtype) - Aw
    X = torch.linalg.solve(M, tB[..., None] if vector else tB)
    X = X[..., 0] if vector else X
    (X * torch.from_numpy(dX).conj()).real.sum().backward()
    return tA.grad.numpy(), tB.grad.numpy(), tz.grad.numpy()


@pytest.mark.parametrize("lower", [False, True])
@pytest.mark.parametrize("shapes", [((5, 5), (5, 2)), ((3, 5, 5), (5, 2)), ((5, 5), (2, 5, 1)), ((3, 5, 5), (5,))],
                         ids=["single", "batchA", "batchB", "vector"])
def test_solve_vjp_matches_autograd(torch, rng, shapes, lower):
    sa, sb = shapes
    A = rng.standard_normal(sa)
    B = rng.standard_normal(sb)
    z = 4.0
    X = resolvent.solve(A, B, z=z, lower=lower)
    dX = rng.standard_normal(X.shape)
    vector = len(sb) == 1
    ref = torch_solve_grads(torch, np.broadcast_to(A, A.shape), B, z, dX, lower=lower, vector=vector)
    got = resolvent.solve_vjp(A, B, dX, z=z, lower=lower, return_dz=True)
    for g, r, x in zip(got, ref, (A, B, z)):
        assert g.shape == np.shape(x)
        assert rel(g, r) < 1e-10
    if lower:
        assert not np.any(np.triu(got[0], 1))


def test_solve_vjp_complex_follows_torch_convention(torch, rng):
    A = rng.standard_normal((4, 4)) + 1j * rng.standard_normal((4, 4))
    B = rng.standard_normal((4, 2)) + 1j * rng.standard_normal((4, 2))
    z = 3.0 + 1.0j
    dX = rng.standard_normal((4, 2)) + 1j * rng.standard_normal((4, 2))
    ref = torch_solve_grads(torch, A, B, z, dX)
    got = resolvent.solve_vjp(A, B, dX, z=z, return_dz=True)
    for g, r in zip(got, ref):
        assert g.dtype == np.complex128 and rel(g, r) < 1e-10


def test_solve_vjp_real_inputs_complex_shift(rng):
    A = rng.standard_normal((4, 4))
    B = rng.standard_normal((4, 3))
    dA, dB, dz = resolvent.solve_vjp(A, B, np.ones((4, 3), complex), z=2.0 + 0.5j, return_dz=True)
    assert dA.dtype == np.float64 and dB.dtype == np.float64 and dz.dtype == np.complex128


def test_solve_vjp_iterative_matches_direct(rng):
    n, b = 40, 8
    A = rng.random((n, n)) * 0.01
    for J in range(n // b):
        A[J * b:(J + 1) * b, J * b:(J + 1) * b] += rng.random((b, b))
    A /= A.sum(axis=1, keepdims=True)
    B = rng.standard_normal((n, 2))
    dX = rng.standard_normal((n, 2))
    direct = resolvent.solve_vjp(A, B, dX, z=1.05, method="direct", return_dz=True)
    for method in ("block_jacobi", "two_level"):
        it = resolvent.solve_vjp(A, B, dX, z=1.05, method=method, block_size=b, tol=1e-12, return_dz=True)
        for g, r in zip(it, direct):
            assert rel(g, r) < 1e-8


def test_solve_vjp_finite_differences(rng):
    A = rng.standard_normal((2, 4, 4))
    B = rng.standard_normal((2, 4, 3))
    dX = rng.standard_normal((2, 4, 3))
    z = 3.0
    grads = resolvent.solve_vjp(A, B, dX, z=z, return_dz=True)

    def loss(A, B, z):
        return float(np.sum(dX * resolvent.solve(A, B, z=float(z))))

    args = (A, B, np.float64(z))
    for i, (x, g) in enumerate(zip(args, grads)):
        direction = rng.standard_normal(np.shape(x))
        fd = directional_fd(loss, args, direction, i)
        assert abs(np.sum(g * direction) - fd) <= 1e-7 * max(1.0, abs(fd))


def test_solve_vjp_float32_and_given_X(rng):
    A = rng.standard_normal((5, 5)).astype(np.float32)
    B = rng.standard_normal((5, 2)).astype(np.float32)
    dX = np.ones((5, 2), np.float32)
    X = resolvent.solve(A, B, z=5.0)
    g1 = resolvent.solve_vjp(A, B, dX, z=5.0)
    g2 = resolvent.solve_vjp(A, B, dX, z=5.0, X=X)
    for a, b in zip(g1, g2):
        assert a.dtype == np.float32
        np.testing.assert_array_equal(a, b)


def test_solve_vjp_shape_errors(rng):
    A = rng.standard_normal((4, 4))
    with pytest.raises(ValueError, match=r"dX must be shaped like the solution X, \(4, 2\), got \(4, 3\)"):
        resolvent.solve_vjp(A, np.ones((4, 2)), np.ones((4, 3)))
    with pytest.raises(ValueError, match=r"X must be the solution's shape \(4,\), got \(3,\)"):
        resolvent.solve_vjp(A, np.ones(4), np.ones(4), X=np.ones(3))
    with pytest.raises(ValueError, match=r"dX must contain only finite values"):
        resolvent.solve_vjp(A, np.ones(4), np.array([1.0, np.nan, 0, 0]))


# --------------------------------------------------------------------------- chain_vjp

def torch_general_chain_grads(torch, A, V, gamma, dY):
    t = [torch.tensor(x, requires_grad=True) for x in (A, V, gamma)]
    n = A.shape[-1]
    g = t[2][..., None, None]
    vector = V.ndim == 1
    Vm = t[1][:, None] if vector else t[1]
    X = torch.linalg.solve(torch.eye(n, dtype=t[0].dtype) - g * t[0], t[0] @ Vm)
    Y = (1 - g) * X
    Y = Y[..., 0] if vector else Y
    (Y * torch.from_numpy(dY)).sum().backward()
    return [x.grad.numpy() for x in t]


@pytest.mark.parametrize("causal", [True, False], ids=["lower", "general"])
@pytest.mark.parametrize("vshape", [(6, 2), (2, 6, 2), (6,)], ids=["shared", "batched", "vector"])
def test_chain_vjp_matches_autograd(torch, rng, causal, vshape):
    A = rng.random((2, 6, 6))
    if causal:
        A = np.tril(A)
    A /= A.sum(axis=-1, keepdims=True)
    V = rng.standard_normal(vshape)
    gamma = np.array([0.4, 0.9])
    if vshape == (6,):
        gamma = np.array(0.7)  # a vector V has no batch: A's batch of 2 with one gamma
    Y = resolvent.chain(A, V, gamma)
    dY = rng.standard_normal(Y.shape)
    ref = torch_general_chain_grads(torch, A, V, gamma, dY)
    got = resolvent.chain_vjp(A, V, gamma, dY)
    for g, r, x in zip(got, ref, (A, V, gamma)):
        assert g.shape == np.shape(x)
        assert rel(g, r) < 1e-10


def test_chain_vjp_finite_differences_including_upper_entries(rng):
    """For a lower-triangular A the derivative above the diagonal is real (chain reads all of A)."""
    A = np.tril(rng.random((5, 5)))
    A /= A.sum(axis=-1, keepdims=True)
    V = rng.standard_normal((5, 2))
    dY = rng.standard_normal((5, 2))
    grads = resolvent.chain_vjp(A, V, 0.6, dY)

    def loss(A, V, gamma):
        return float(np.sum(dY * resolvent.chain(A, V, float(gamma))))

    args = (A, V, np.float64(0.6))
    for i, (x, g) in enumerate(zip(args, grads)):
        direction = rng.standard_normal(np.shape(x))
        fd = directional_fd(loss, args, direction, i)
        assert abs(np.sum(g * direction) - fd) <= 1e-7 * max(1.0, abs(fd))
    assert np.any(np.triu(grads[0], 1) != 0)


def test_chain_vjp_constant_v_has_no_gamma_gradient():
    A = np.tril(np.ones((4, 4)))
    A /= A.sum(axis=1, keepdims=True)
    _, _, dgamma = resolvent.chain_vjp(A, np.ones(4), 0.5, np.ones(4))
    assert dgamma.shape == () and abs(float(dgamma)) < 1e-14


def test_chain_vjp_shape_error(rng):
    A = np.eye(3) * 0.5
    with pytest.raises(ValueError, match=r"dY must be shaped like the output Y, \(3, 2\), got \(3,\)"):
        resolvent.chain_vjp(A, np.ones((3, 2)), 0.5, np.ones(3))
