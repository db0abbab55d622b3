"""The GPU backend on CuPy arrays (and PyTorch CUDA tensors): skipped without CuPy or a device.

Every result is compared with the float64 CPU result of the same method; outputs must stay on the
device, in the caller's framework.
"""

from __future__ import annotations

import numpy as np
import pytest

cupy = pytest.importorskip("cupy")
pytest.importorskip("numba.cuda")
try:
    if cupy.cuda.runtime.getDeviceCount() < 1:  # pragma: no cover - device only
        pytest.skip("no CUDA device", allow_module_level=True)
except cupy.cuda.runtime.CUDARuntimeError:  # pragma: no cover
    pytest.skip("no CUDA device", allow_module_level=True)

import resolvent  # noqa: E402


def rel(a, b):
    # complex results (solve_shifts at a complex shift) keep their imaginary part
    a = cupy.asnumpy(a).astype(np.complex128)
    b = np.asarray(b).astype(np.complex128)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture
def rng():
    return np.random.default_rng(20261130)


@pytest.mark.parametrize("method, n, b", [("dense", 130, None), ("exact", 300, None), ("blockwise", 300, None),
                                          ("blockwise", 250, 48), ("blockwise", 200, 96), ("blockwise", 100, 100)])
@pytest.mark.parametrize("dt, tol", [(np.float32, 1e-4), (np.float64, 1e-10)])
def test_forward_and_backward_match_cpu(rng, method, n, b, dt, tol):
    q, k, v = rng.standard_normal((3, 2, 3, n, 16))
    dy = rng.standard_normal((2, 3, n, 16))
    gam = rng.uniform(0, 0.95, (2, 3))
    kw = dict(method=method, block_size=b)
    y_ref = resolvent.chain_attention(q, k, v, gam, **kw)
    g_ref = resolvent.chain_attention_vjp(q, k, v, gam, dy, return_dgamma=True, **kw)
    qc, kc, vc, dyc = (cupy.asarray(x.astype(dt)) for x in (q, k, v, dy))
    y = resolvent.chain_attention(qc, kc, vc, cupy.asarray(gam.astype(dt)), **kw)
    assert isinstance(y, cupy.ndarray) and y.dtype == dt
    assert rel(y, y_ref) <= tol
    grads = resolvent.chain_attention_vjp(qc, kc, vc, cupy.asarray(gam.astype(dt)), dyc, return_dgamma=True,
                                           **kw)
    for gg, gr in zip(grads, g_ref):
        assert isinstance(gg, cupy.ndarray)
        assert rel(gg, gr) <= tol


def test_blockwise_full_block_is_dense(rng):
    q, k, v = (cupy.asarray(x) for x in rng.standard_normal((3, 2, 64, 8)))
    y = resolvent.chain_attention(q, k, v, 0.8, block_size=64)
    yd = resolvent.chain_attention(q, k, v, 0.8, method="dense")
    assert rel(y, cupy.asnumpy(yd)) <= 1e-10


def test_constants_preserved(rng):
    q, k = (cupy.asarray(x) for x in rng.standard_normal((2, 3, 500, 8)))
    for method in ("dense", "exact", "blockwise"):
        y = resolvent.chain_attention(q, k, cupy.ones((3, 500, 4)), 0.95, method=method)
        assert float(cupy.abs(y - 1).max()) <= 1e-10


def test_on_a_non_default_stream(rng):
    q, k, v = rng.standard_normal((3, 4, 700, 32)).astype(np.float32)
    ref = resolvent.chain_attention(q.astype(np.float64), k, v, 0.9)
    s = cupy.cuda.Stream(non_blocking=True)
    with s:
        qc, kc, vc = (cupy.asarray(x) for x in (q, k, v))
        y = resolvent.chain_attention(qc, kc, vc, 0.9)
        out = cupy.asnumpy(y, stream=s)
    s.synchronize()
    assert rel(out, ref) <= 1e-4


def test_errors(rng):
    q = cupy.asarray(rng.standard_normal((2, 16, 4)))
    with pytest.raises(NotImplementedError, match="topk"):
        resolvent.chain_attention(q, q, q, 0.5, topk=1)
    bad = q.copy()
    bad[0, 3, 1] = cupy.nan
    with pytest.raises(ValueError, match="q must contain only finite values"):
        resolvent.chain_attention(bad, q, q, 0.5)
    # float32: the fused kernels flag non-finite input themselves (forward and backward)
    q32 = q.astype(cupy.float32)
    bad32 = bad.astype(cupy.float32)
    with pytest.raises(ValueError, match="k must contain only finite values"):
        resolvent.chain_attention(q32, bad32, q32, 0.5)
    for args, name in (((bad32, q32, q32, 0.5, q32), "q"), ((q32, q32, bad32, 0.5, q32), "v"),
                       ((q32, q32, q32, 0.5, bad32), "dy")):
        with pytest.raises(ValueError, match=f"{name} must contain only finite values"):
            resolvent.chain_attention_vjp(*args, y=q32)
    with pytest.raises(ValueError, match=r"gamma must lie in \[0, 1\)"):
        resolvent.chain_attention(q, q, q, 1.0)
    with pytest.raises(np.linalg.LinAlgError):
        resolvent.solve(cupy.eye(3), cupy.ones(3), z=1.0)


@pytest.mark.parametrize("method", ["dense", "exact", "blockwise"])
def test_check_finite_false(rng, method):
    """check_finite=False: the same float32 numbers (no check, no synchronisation), and NaN passes."""
    q, k, v, dy = (cupy.asarray(x) for x in rng.standard_normal((4, 2, 100, 16)).astype(np.float32))
    y = resolvent.chain_attention(q, k, v, 0.8, method=method)
    y_nc = resolvent.chain_attention(q, k, v, 0.8, method=method, check_finite=False)
    assert y_nc.dtype == np.float32 and bool((y_nc == y).all())
    for given_y in (None, y):
        grads = resolvent.chain_attention_vjp(q, k, v, 0.8, dy, method=method, y=given_y, return_dgamma=True)
        grads_nc = resolvent.chain_attention_vjp(q, k, v, 0.8, dy, method=method, y=given_y, return_dgamma=True,
                                                 check_finite=False)
        for a, b in zip(grads_nc, grads):
            assert a.dtype == b.dtype and rel(a, cupy.asnumpy(b)) <= 1e-6
    bad = v.copy()
    bad[1, 7, 3] = cupy.nan
    y_bad = resolvent.chain_attention(q, k, bad, 0.8, method=method, check_finite=False)
    assert bool(cupy.isnan(y_bad[1]).any()) and bool(cupy.isfinite(y_bad[0]).all())
    bad_dy = dy.copy()
    bad_dy[0, 2, 1] = cupy.inf
    grads = resolvent.chain_attention_vjp(q, k, bad, 0.8, bad_dy, method=method, check_finite=False)
    cupy.cuda.get_current_stream().synchronize()
    assert not all(bool(cupy.isfinite(g).all()) for g in grads)


def test_fast_entry_equals_the_general_path(rng, monkeypatch):
    """``chain_attention`` on C-contiguous float32 CuPy arrays with a float gamma takes the fast
    entry (``_api.chain_attention_fast``, no general argument handling); its results equal the
    general path's bit for bit, 3-D and 4-D, and what it declines still runs (or raises) there."""
    from resolvent import _interop
    from resolvent._gpu import _api

    taken = []

    def counting(*a, **kw):
        out = _api.chain_attention_fast(*a, **kw)
        if out is not NotImplemented:
            taken.append(kw.get("block_size"))
        return out

    for shape in ((3, 700, 32), (2, 2, 300, 16)):
        q, k, v = (cupy.asarray(x) for x in rng.standard_normal((3,) + shape).astype(np.float32))
        resolvent.chain_attention(q, k, v, 0.9)  # the first call registers the entry
        assert _interop._FAST_TYPE[0] is cupy.ndarray
        monkeypatch.setitem(_interop._FAST, "chain_attention", counting)
        taken.clear()
        y = resolvent.chain_attention(q, k, v, 0.9)
        y_nc = resolvent.chain_attention(q, k, v, 0.9, check_finite=False)
        y_b = resolvent.chain_attention(q, k, v, 0.9, block_size=24)
        assert taken == [None, None, 24]
        y_gen = _api.chain_attention(q, k, v, 0.9)  # the general path
        assert y.shape == shape and y.dtype == np.float32
        assert bool((y == y_gen).all()) and bool((y_nc == y_gen).all())
        assert bool((y_b == _api.chain_attention(q, k, v, 0.9, block_size=24)).all())
        assert bool((resolvent.chain_attention(q, k, v, np.float32(0.9)) == y_gen).all())  # declined
        dy = cupy.asarray(rng.standard_normal(shape).astype(np.float32))
        for given_y in (None, y):
            got = resolvent.chain_attention_vjp(q, k, v, 0.9, dy, y=given_y, return_dgamma=True)
            ref = _api.chain_attention_vjp(q, k, v, 0.9, dy, y=given_y, return_dgamma=True)
            assert len(got) == 4 and [g.shape for g in got] == [shape] * 3 + [()]
            assert all(bool((a == r).all()) for a, r in zip(got, ref))
        assert _api.chain_attention_vjp_fast(q, k, v, 0.9, dy) is not NotImplemented
        assert _api.chain_attention_vjp_fast(q, k, v, 0.9, dy[..., ::2, :]) is NotImplemented
    taken.clear()
    for args, kw in (((q[..., ::2, :], k[..., ::2, :], v[..., ::2, :], 0.9), {}),  # not contiguous
                     ((q, k, v, 0.9), {"scale": 0.3}), ((q, k, v, 0.9), {"method": "exact"}),
                     ((q.astype(cupy.float64), k, v, 0.9), {}), ((q, k, v, 0), {})):
        ref = _api.chain_attention(*args, **kw)
        assert bool((resolvent.chain_attention(*args, **kw) == ref).all())
    assert taken == []
    for bad_gamma in (1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="gamma"):
            resolvent.chain_attention(q, k, v, bad_gamma)
    with pytest.raises(TypeError, match="chain_attention"):
        resolvent.chain_attention(q, k, v, 0.9, bogus=1)
    bad = v.copy()
    bad[1, 0, 5, 2] = cupy.inf
    with pytest.raises(ValueError, match="v must contain only finite values"):
        resolvent.chain_attention(q, k, bad, 0.9)
    with pytest.raises(ValueError, match="dy must contain only finite values"):
        resolvent.chain_attention_vjp(q, k, v, 0.9, bad, y=v)


def test_backward_plan_equals_its_kernels_one_by_one(rng):
    """The public backward runs its launch plan (one workspace, parameter words patched per call);
    ``_blockwise.backward`` launches the same kernels one by one: the same numbers bit for bit, on
    both reduced solvers (m = 19, and m = 141 > SMALL_M: the blocked one), with ``y`` given or
    recomputed, on a non-default stream; and the float64 CPU result within 1e-4."""
    from resolvent._gpu import _blockwise as GB

    for B, n, d, b in ((3, 300, 16, 16), (1, 4500, 16, 32)):
        x64 = rng.standard_normal((4, B, n, d))
        q, k, v, dy = (cupy.asarray(x) for x in x64.astype(np.float32))
        g = cupy.full(B, 0.9, dtype=cupy.float32)
        s = cupy.cuda.Stream(non_blocking=True)
        with s:
            y = resolvent.chain_attention(q, k, v, 0.9, block_size=b)
            ref = GB.backward(cupy, q, k, v, g, b, 0.25, dy, y=y)
            for given in (y, None):
                got = resolvent.chain_attention_vjp(q, k, v, 0.9, dy, y=given, block_size=b, return_dgamma=True)
                assert all(bool((a == r).all()) for a, r in zip(got[:3], ref[:3]))
                assert abs(float(got[3]) - float(ref[3].sum())) <= 1e-5 * abs(float(ref[3].sum()))
        s.synchronize()
        cpu = resolvent.chain_attention_vjp(*x64[:3], 0.9, x64[3], block_size=b, return_dgamma=True)
        for a, r in zip(got, cpu):
            assert rel(a, r) <= 1e-4


CACHED_RUN = r"""
import sys, numpy as np, cupy, resolvent
from numba import cuda
if sys.argv[1] == "cached":  # every kernel must come from the disk cache: compiling is an error
    def refuse(*a, **k):
        raise AssertionError("compiled a kernel that the cache holds")
    cuda.compile_ptx_for_current_device = refuse
rng = np.random.default_rng(7)
q, k, v, dy = (cupy.asarray(x) for x in rng.standard_normal((4, 2, 150, 16)).astype(np.float32))
y = resolvent.chain_attention(q, k, v, 0.7, block_size=16)
g = resolvent.chain_attention_vjp(q, k, v, 0.7, dy, y=y, block_size=16)
np.save(sys.argv[2], np.concatenate([cupy.asnumpy(x).ravel() for x in (y,) + g]))
"""


def test_kernels_cached_on_disk(tmp_path):
    """A second process finds every kernel of the float32 forward and backward in the PTX cache
    (``resolvent/_gpu/_ptxcache.py``), compiles none, and computes the same numbers."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "RESOLVENT_KERNEL_CACHE": str(tmp_path / "cache"),
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    for mode in ("fresh", "cached"):
        res = subprocess.run([sys.executable, "-c", CACHED_RUN, mode, str(tmp_path / f"{mode}.npy")], env=env,
                             capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        if mode == "fresh":
            files = sorted(p.name for p in (tmp_path / "cache").iterdir())
            assert len(files) >= 6 and all(f.endswith(".ptx") for f in files)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == files
    np.testing.assert_array_equal(np.load(tmp_path / "fresh.npy"), np.load(tmp_path / "cached.npy"))


def test_solve_chain_and_shifts_match_cpu(rng):
    A = rng.standard_normal((3, 40, 40)) / 10
    B = rng.standard_normal((3, 40, 5))
    for lower in (False, True):
        Ac = cupy.asarray(np.tril(A) if lower else A)
        X = resolvent.solve(Ac, cupy.asarray(B), z=2.0, lower=lower)
        ref = resolvent.solve(np.tril(A) if lower else A, B, z=2.0, lower=lower)
        assert isinstance(X, cupy.ndarray) and rel(X, ref) <= 1e-10
    P = np.tril(rng.uniform(0, 1, (2, 30, 30)))
    P /= P.sum(axis=-1, keepdims=True)
    V = rng.standard_normal((2, 30, 3))
    assert rel(resolvent.chain(cupy.asarray(P), cupy.asarray(V), 0.7), resolvent.chain(P, V, 0.7)) <= 1e-10
    zs = [2.0, 3.0, 1.5 + 1j]
    Xs = resolvent.solve_shifts(cupy.asarray(A[0]), cupy.asarray(B[0]), zs)
    assert rel(Xs, resolvent.solve_shifts(A[0], B[0], zs)) <= 1e-10


def test_torch_cuda_tensors_stay_on_the_device(rng):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():  # pragma: no cover
        pytest.skip("torch without CUDA")
    q, k, v = rng.standard_normal((3, 2, 200, 16))
    ref = resolvent.chain_attention(q, k, v, 0.9)
    tq, tk, tv = (torch.tensor(x, device="cuda", dtype=torch.float32) for x in (q, k, v))
    y = resolvent.chain_attention(tq, tk, tv, 0.9)
    assert isinstance(y, torch.Tensor) and y.device.type == "cuda" and y.dtype == torch.float32
    assert rel(cupy.asarray(y), ref) <= 1e-4
    yb = resolvent.chain_attention(tq.bfloat16(), tk.bfloat16(), tv.bfloat16(), 0.9)
    assert yb.dtype == torch.bfloat16 and yb.device.type == "cuda"
    assert rel(cupy.asarray(yb.float()), ref) <= 2e-2
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        y2 = resolvent.chain_attention(tq, tk, tv, 0.9)
    s.synchronize()
    assert rel(cupy.asarray(y2), ref) <= 1e-4
