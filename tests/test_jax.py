"""resolvent.jax: custom_vjp through pure_callback, under jit, grad and vmap."""

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")

import resolvent  # noqa: E402
import resolvent.jax as rj  # noqa: E402
from jax.test_util import check_grads  # noqa: E402

METHODS = [
    ("dense", {}),
    ("exact", {}),
    ("blockwise", {"block_size": 3}),
    ("blockwise", {"block_size": 16}),
    ("blockwise", {"block_size": 3, "topk": 1}),
    ("blockwise", {"block_size": 2, "topk": 2}),
]
IDS = ["dense", "exact", "blockwise-b3", "blockwise-b16", "topk1-b3", "topk2-b2"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def arrays(seed=0, batch=(2,), n=9, d=3, dv=2, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.standard_normal(batch + (n, s)).astype(dtype)) for s in (d, d, dv)]


@pytest.mark.parametrize("method,opts", METHODS, ids=IDS)
def test_grads_match_finite_differences(x64, method, opts):
    q, k, v = arrays()
    gamma = jnp.array([0.3, 0.8])
    f = lambda q, k, v, g: rj.chain_attention(q, k, v, g, method=method, **opts)  # noqa: E731
    check_grads(f, (q, k, v, gamma), order=1, modes=["rev"], eps=1e-6, atol=1e-7, rtol=1e-7)


@pytest.mark.parametrize("method,opts", METHODS[:4], ids=IDS[:4])
def test_jit_grad_equal_numpy_vjp(x64, method, opts):
    q, k, v = arrays(1)
    gamma = jnp.array(0.6)
    dy = jnp.asarray(np.random.default_rng(2).standard_normal(v.shape))

    def loss(q, k, v, g):
        return jnp.sum(dy * rj.chain_attention(q, k, v, g, method=method, **opts))

    y = jax.jit(lambda q, k, v, g: rj.chain_attention(q, k, v, g, method=method, **opts))(q, k, v, gamma)
    np.testing.assert_array_equal(
        np.asarray(y), resolvent.chain_attention(*map(np.asarray, (q, k, v)), 0.6, method=method, **opts))
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, gamma)
    ref = resolvent.chain_attention_vjp(*map(np.asarray, (q, k, v)), 0.6, np.asarray(dy), method=method,
                                        return_dgamma=True, **opts)
    for g, r in zip(grads, ref):
        assert g.dtype == jnp.float64 and g.shape == r.shape
        np.testing.assert_allclose(np.asarray(g), r, rtol=1e-12, atol=1e-14)


def test_vmap_over_batch_and_gamma(x64):
    Q = arrays(3, batch=(4, 2))[0]          # mapped: 4 examples of (2 heads, n, d)
    _, k, v = arrays(4)                      # not mapped
    gammas = jnp.array([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6], [0.7, 0.8]])
    f = lambda q, g: rj.chain_attention(q, k, v, g, block_size=4)  # noqa: E731
    ys = jax.jit(jax.vmap(f))(Q, gammas)
    for i in range(4):
        ref = resolvent.chain_attention(np.asarray(Q[i]), np.asarray(k), np.asarray(v), np.asarray(gammas[i]),
                                        block_size=4)
        np.testing.assert_array_equal(np.asarray(ys[i]), ref)
    # per-example gradients: k is shared, so each example gets its own dk (not the sum)
    loss = lambda q, k, g: rj.chain_attention(q, k, v, g, block_size=4).sum()  # noqa: E731
    per_ex = jax.vmap(jax.grad(loss, argnums=(0, 1, 2)), in_axes=(0, None, 0))(Q, k, gammas)
    for i in range(4):
        ref = resolvent.chain_attention_vjp(np.asarray(Q[i]), np.asarray(k), np.asarray(v), np.asarray(gammas[i]),
                                            np.ones(v.shape), block_size=4, return_dgamma=True)
        np.testing.assert_allclose(np.asarray(per_ex[0][i]), ref[0], rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(np.asarray(per_ex[1][i]), ref[1], rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(np.asarray(per_ex[2][i]), ref[3], rtol=1e-12, atol=1e-14)


def test_per_head_gamma_gradient_is_summed_over_batch(x64):
    q, k, v = arrays(5, batch=(3, 2))
    gamma = jnp.array([0.4, 0.9])  # one per head, broadcast over the batch of 3
    dg = jax.grad(lambda g: rj.chain_attention(q, k, v, g, method="dense").sum())(gamma)
    ref = resolvent.chain_attention_vjp(*map(np.asarray, (q, k, v)), np.asarray(gamma), np.ones(v.shape),
                                        method="dense", return_dgamma=True)[3]
    assert dg.shape == (2,)
    np.testing.assert_allclose(np.asarray(dg), ref, rtol=1e-12)


def test_broadcast_keys_get_summed_gradients(x64):
    q, _, v = arrays(6, batch=(2,))
    k = arrays(7, batch=())[1]               # shared by both batch entries
    dk = jax.grad(lambda k: rj.chain_attention(q, k, v, 0.5, block_size=3).sum())(k)
    ref = resolvent.chain_attention_vjp(*map(np.asarray, (q, k, v)), 0.5, np.ones(v.shape), block_size=3)[1]
    assert dk.shape == k.shape
    np.testing.assert_allclose(np.asarray(dk), ref, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_default_precision_and_bfloat16(dtype):
    q, k, v = (x.astype(dtype) for x in arrays(8, dtype=np.float32))
    y = jax.jit(lambda q: rj.chain_attention(q, k, v, 0.9))(q)
    assert y.dtype == dtype
    dq = jax.grad(lambda q: rj.chain_attention(q, k, v, 0.9).astype(jnp.float32).sum())(q)
    assert dq.dtype == dtype and bool(jnp.isfinite(dq.astype(jnp.float32)).all())


def test_shape_errors():
    q, k, v = arrays(9, dtype=np.float32)
    with pytest.raises(ValueError, match=r"k must have shape \(..., n, d\) = \(..., 9, 3\) like q"):
        rj.chain_attention(q, k[..., :2], v)
    with pytest.raises(ValueError, match=r"gamma of shape \(3,\) does not broadcast over the batch dimensions \(2,\)"):
        rj.chain_attention(q, k, v, jnp.array([0.1, 0.2, 0.3]))


@pytest.mark.parametrize("name", ["q", "k", "v", "dy"])
def test_non_finite_input_is_named(x64, name):
    """The NumPy check's ValueError comes out of the callback (JAX may wrap it in its runtime error)."""
    q, k, v = arrays(10)
    args = dict(q=q, k=k, v=v, dy=jnp.ones(v.shape))
    args[name] = args[name].at[1, 4, 0].set(jnp.nan if name in "qv" else jnp.inf)
    f = lambda q, k, v: rj.chain_attention(q, k, v, 0.5, block_size=4)  # noqa: E731
    with pytest.raises((ValueError, RuntimeError), match=f"{name} must contain only finite values"):
        if name == "dy":
            jax.vjp(f, q, k, v)[1](args["dy"])[0].block_until_ready()
        else:
            f(args["q"], args["k"], args["v"]).block_until_ready()


@pytest.mark.parametrize("method,opts", METHODS[:3] + METHODS[4:5], ids=IDS[:3] + IDS[4:5])
def test_check_finite_false(x64, method, opts):
    q, k, v = arrays(11)
    dy = jnp.asarray(np.random.default_rng(12).standard_normal(v.shape))
    out = []
    for check in (True, False):
        f = lambda q, k, v, g: rj.chain_attention(q, k, v, g, method=method, check_finite=check, **opts)  # noqa: E731
        y, vjp = jax.vjp(jax.jit(f), q, k, v, jnp.array([0.3, 0.8]))
        out.append([y, *vjp(dy)])
    for a, b in zip(*out):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    y = rj.chain_attention(q, k, v.at[1, 4, 0].set(jnp.nan), 0.5, method=method, check_finite=False, **opts)
    assert bool(jnp.isnan(y[1]).any()) and bool(jnp.isfinite(y[0]).all())


def test_docstring_examples():
    import doctest

    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in doctest.DocTestFinder().find(rj, "resolvent.jax"):
        runner.run(test)
    assert runner.tries >= 3 and runner.failures == 0
