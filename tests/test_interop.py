"""Arrays of any framework in, the same framework's arrays out (resolvent/_interop.py)."""

import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import resolvent
from resolvent import _interop

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")


pytestmark = pytest.mark.usefixtures("one_thread")


def qkv(rng, shape=(2, 12, 3)):
    return [rng.standard_normal(shape).astype(np.float32) for _ in range(3)]


def test_public_surface():
    assert resolvent.__all__ == [
        "ConvergenceError", "SolveInfo", "__version__", "block_mass", "chain", "chain_attention",
        "chain_attention_vjp", "chain_vjp", "default_block_size", "solve", "solve_shifts", "solve_vjp",
    ]
    # functools.wraps keeps the NumPy implementations' names and numpydoc docstrings
    assert resolvent.chain_attention.__name__ == "chain_attention"
    assert "Parameters" in resolvent.solve.__doc__


def test_import_does_not_import_frameworks():
    code = (
        "import sys, numpy as np, resolvent\n"
        "resolvent.chain_attention(np.ones((8, 2)), np.ones((8, 2)), np.ones((8, 2)), 0.5)\n"
        "print(sorted(m for m in ('torch', 'jax', 'jaxlib', 'cupy') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_round_trip_numpy_torch_jax(rng, dtype):
    x = rng.standard_normal((3, 5)).astype(dtype)
    t = torch.from_numpy(x)
    j = jnp.asarray(x) if dtype == np.float32 else None
    back = _interop.to_numpy(t)
    assert back.dtype == dtype and np.array_equal(back, x)
    assert np.shares_memory(back, x)  # DLPack: no copy on the way in
    t2 = _interop.from_numpy(back, t, "torch")
    assert t2.dtype == t.dtype and t2.device == t.device and torch.equal(t2, t)
    assert np.shares_memory(t2.numpy(), x)  # torch.from_numpy: no copy on the way out
    if j is not None:
        arr = _interop.to_numpy(j)
        assert arr.dtype == dtype and np.array_equal(arr, x)
        assert arr.ctypes.data == j.unsafe_buffer_pointer()  # shared, not copied
        j2 = _interop.from_numpy(arr, j, "jax")
        assert j2.dtype == j.dtype and j2.devices() == j.devices()
        np.testing.assert_array_equal(np.asarray(j2), x)


def test_jax_float64_round_trip(rng):
    x = rng.standard_normal((4, 3))
    with jax.enable_x64(True):
        j = jnp.asarray(x)
        y = resolvent.chain_attention(j, j, j, 0.5, method="dense")
        assert isinstance(y, jax.Array) and y.dtype == jnp.float64
        np.testing.assert_array_equal(np.asarray(y), resolvent.chain_attention(x, x, x, 0.5, method="dense"))


@pytest.mark.parametrize("method", ["dense", "exact", "blockwise"])
def test_chain_attention_torch_and_jax_match_numpy(rng, method):
    q, k, v = qkv(rng)
    ref = resolvent.chain_attention(q, k, v, 0.7, method=method, block_size=4)
    yt = resolvent.chain_attention(*map(torch.from_numpy, (q, k, v)), 0.7, method=method, block_size=4)
    yj = resolvent.chain_attention(*map(jnp.asarray, (q, k, v)), 0.7, method=method, block_size=4)
    assert isinstance(yt, torch.Tensor) and yt.dtype == torch.float32 and yt.device.type == "cpu"
    assert isinstance(yj, jax.Array) and yj.dtype == jnp.float32
    np.testing.assert_array_equal(yt.numpy(), ref)
    np.testing.assert_array_equal(np.asarray(yj), ref)


def test_every_public_function_converts(rng):
    A = np.tril(rng.random((2, 6, 6))) + np.eye(6)
    A /= A.sum(axis=-1, keepdims=True)
    B = rng.standard_normal((2, 6, 3))
    T = torch.from_numpy
    X, info = resolvent.solve(T(A), T(B), z=torch.tensor(2.0, dtype=torch.float64), return_info=True)
    assert isinstance(X, torch.Tensor) and isinstance(info, resolvent.SolveInfo)
    np.testing.assert_array_equal(X.numpy(), resolvent.solve(A, B, z=2.0))
    Xs = resolvent.solve_shifts(T(A), T(B), T(np.array([2.0, 3.0])))
    np.testing.assert_array_equal(Xs.numpy(), resolvent.solve_shifts(A, B, [2.0, 3.0]))
    Y = resolvent.chain(T(A), T(B), T(np.array([0.2, 0.5])))
    np.testing.assert_array_equal(Y.numpy(), resolvent.chain(A, B, np.array([0.2, 0.5])))
    grads = resolvent.chain_vjp(T(A), T(B), 0.5, T(B))
    assert isinstance(grads, tuple) and all(isinstance(g, torch.Tensor) for g in grads)
    grads = resolvent.solve_vjp(T(A), T(B), T(B), z=2.0)
    assert all(isinstance(g, torch.Tensor) for g in grads)
    q = T(rng.standard_normal((2, 16, 4)))
    bm = resolvent.block_mass(q, q, 8)
    assert isinstance(bm, torch.Tensor) and bm.shape == (2,)
    assert resolvent.default_block_size(torch.tensor(4096)) == resolvent.default_block_size(4096)


def test_vjp_tuple_and_gamma_tensor(rng):
    q, k, v = (torch.from_numpy(x.astype(np.float64)) for x in qkv(rng))
    gamma = torch.tensor([0.3, 0.6], dtype=torch.float64)
    out = resolvent.chain_attention_vjp(q, k, v, gamma, torch.ones_like(v), method="dense", return_dgamma=True)
    assert len(out) == 4 and all(isinstance(g, torch.Tensor) for g in out)
    assert out[3].shape == (2,) and out[3].dtype == torch.float64
    ref = resolvent.chain_attention_vjp(q.numpy(), k.numpy(), v.numpy(), gamma.numpy(), np.ones(v.shape),
                                        method="dense", return_dgamma=True)
    for a, b in zip(out, ref):
        np.testing.assert_array_equal(a.numpy(), b)


def test_requires_grad_is_detached(rng):
    q, k, v = (torch.from_numpy(x).requires_grad_() for x in qkv(rng))
    y = resolvent.chain_attention(q, k, v, 0.5)
    assert not y.requires_grad  # the plain function records no graph; resolvent.torch does


@pytest.mark.parametrize("half", ["bfloat16", "float16"])
def test_half_precision_computes_in_float32(rng, half):
    q, k, v = qkv(rng)
    tq, tk, tv = (torch.from_numpy(x).to(getattr(torch, half)) for x in (q, k, v))
    ref = resolvent.chain_attention(*(t.float().numpy() for t in (tq, tk, tv)), 0.5)
    yt = resolvent.chain_attention(tq, tk, tv, 0.5)
    assert yt.dtype == getattr(torch, half)
    torch.testing.assert_close(yt, torch.from_numpy(ref).to(getattr(torch, half)), rtol=0, atol=0)
    jq, jk, jv = (jnp.asarray(x).astype(half) for x in (q, k, v))
    yj = resolvent.chain_attention(jq, jk, jv, 0.5)
    assert yj.dtype == jnp.dtype(half)
    ref_j = resolvent.chain_attention(*(np.asarray(x.astype(jnp.float32)) for x in (jq, jk, jv)), 0.5)
    np.testing.assert_array_equal(np.asarray(yj), np.asarray(jnp.asarray(ref_j).astype(half)))


def test_mixed_half_and_single_promotes(rng):
    q, k, v = (torch.from_numpy(x) for x in qkv(rng))
    y = resolvent.chain_attention(q.bfloat16(), k, v, 0.5)
    assert y.dtype == torch.float32


def test_mixed_frameworks_raise(rng):
    q, k, v = qkv(rng)
    with pytest.raises(TypeError, match=r"different frameworks \(q is a torch.Tensor, k is a jax.Array"):
        resolvent.chain_attention(torch.from_numpy(q), jnp.asarray(k), v, 0.5)
    with pytest.raises(TypeError, match=r"v is a numpy.ndarray"):
        resolvent.chain_attention(torch.from_numpy(q), torch.from_numpy(k), v, 0.5)
    with pytest.raises(TypeError, match=r"A is a torch.Tensor, B is a jax.Array"):
        resolvent.solve(torch.eye(3), jnp.ones(3), z=2.0)


def test_scalars_from_another_framework_are_fine(rng):
    q, k, v = qkv(rng)
    y = resolvent.chain_attention(q, k, v, torch.tensor(0.5))
    assert isinstance(y, np.ndarray)
    np.testing.assert_array_equal(y, resolvent.chain_attention(q, k, v, 0.5))


class FakeDeviceArray:
    """An array on a non-CPU DLPack device (CUDA type 2), as a CuPy or CUDA torch array would be."""

    def __init__(self, shape, device=(2, 0)):
        self.shape, self.ndim, self.dtype, self._device = shape, len(shape), np.dtype(np.float32), device

    def __dlpack__(self, stream=None):  # pragma: no cover - never reached: the device check comes first
        raise BufferError("not on the host")

    def __dlpack_device__(self):
        return self._device


def _gpu_backend_available():
    try:
        from resolvent._gpu import available
    except ImportError:
        return False
    return available()


@pytest.mark.skipif(_gpu_backend_available(), reason="a GPU backend is installed: CUDA arrays run there")
def test_cuda_without_backend_raises():
    q = FakeDeviceArray((2, 8, 4))
    with pytest.raises(NotImplementedError, match=r"q is on cuda:0, but the GPU backend is not available yet"):
        resolvent.chain_attention(q, FakeDeviceArray((2, 8, 4)), FakeDeviceArray((2, 8, 4)), 0.5)
    with pytest.raises(NotImplementedError, match=r"move the arrays to the CPU"):
        resolvent.solve(FakeDeviceArray((4, 4)), FakeDeviceArray((4,)))


def test_other_devices_raise():
    arrays = [FakeDeviceArray((2, 8, 4), (10, 0)) for _ in range(3)]  # ROCm: no backend planned yet
    with pytest.raises(NotImplementedError, match=r"q is on rocm:0, but the GPU backend is not available"):
        resolvent.chain_attention(*arrays, 0.5)


def test_mixed_devices_raise():
    a, b = FakeDeviceArray((4, 4), (2, 0)), FakeDeviceArray((4,), (2, 1))
    with pytest.raises(ValueError, match=r"different devices \(A on cuda:0; B on cuda:1\)"):
        resolvent.solve(a, b)


def test_traced_jax_value_points_to_adapter(rng):
    q, k, v = (jnp.asarray(x) for x in qkv(rng))
    with pytest.raises(TypeError, match=r"traced JAX value for q .* resolvent.jax.chain_attention"):
        jax.jit(lambda q: resolvent.chain_attention(q, k, v, 0.5))(q)


def test_errors_of_the_core_pass_through(rng):
    q, k, v = (torch.from_numpy(x) for x in qkv(rng))
    with pytest.raises(ValueError, match=r"gamma must lie in \[0, 1\)"):
        resolvent.chain_attention(q, k, v, torch.tensor(1.5))


@given(
    hnp.arrays(st.sampled_from([np.float32, np.float64]), st.tuples(st.integers(1, 3), st.integers(1, 6)),
               elements=st.floats(-4, 4, width=32)),
    st.floats(0.0, 0.95),
)
def test_torch_results_equal_numpy_results(v, gamma):
    """Whatever the values, shapes and dtype: the torch call is the NumPy call, bit for bit."""
    n = v.shape[0]
    A = np.tril(np.ones((n, n), dtype=v.dtype))
    A /= A.sum(axis=1, keepdims=True)
    ref = resolvent.chain(A, v, gamma)
    out = resolvent.chain(torch.from_numpy(A), torch.from_numpy(v), gamma)
    assert out.dtype == getattr(torch, ref.dtype.name) and out.shape == ref.shape
    np.testing.assert_array_equal(out.numpy(), ref)


def test_registered_fast_entry_takes_its_type_and_may_decline(rng, monkeypatch):
    """``register_fast``: calls whose first argument is exactly the registered type go to the entry
    first; ``NotImplemented`` sends them down the general path (here NumPy's), and other types never
    reach the entry."""

    class Marked(np.ndarray):
        pass

    seen = []

    def entry(q, k, v, gamma=0.9, **kw):
        seen.append(kw)
        return NotImplemented if kw.get("method") == "dense" else "fast"

    monkeypatch.setattr(_interop, "_FAST", {})
    monkeypatch.setattr(_interop, "_FAST_TYPE", [None])
    _interop.register_fast(Marked, {"chain_attention": entry})
    q, k, v = rng.standard_normal((3, 2, 12, 4))
    qm = q.view(Marked)
    assert resolvent.chain_attention(qm, k, v, 0.5) == "fast"
    y = resolvent.chain_attention(qm, k, v, 0.5, method="dense")  # declined: the general path
    np.testing.assert_allclose(np.asarray(y), resolvent.chain_attention(q, k, v, 0.5, method="dense"))
    assert len(seen) == 2
    resolvent.chain_attention(q, k, v, 0.5)  # a plain ndarray is not the registered type
    resolvent.chain_attention_vjp(qm, k, v, 0.5, q)  # no entry for this function
    assert len(seen) == 2
