"""The GPU backend's numba-cuda kernels under the CUDA simulator, against the float64 CPU results.

The simulator must be switched on before ``numba.cuda`` is first imported, so the checks run in a
child process with ``NUMBA_ENABLE_CUDASIM=1`` (this process may already hold the real
``numba.cuda``).  The child runs the GPU glue with NumPy arrays (``xp = numpy``): the same kernels and
host code as on a device, at tiny sizes (n <= 24, b <= 8), and reports relative errors as JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("numba")
if __import__("importlib").util.find_spec("numba.cuda") is None:  # pragma: no cover
    pytest.skip("numba-cuda is not installed", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent(
    r"""
    import json, sys
    import numpy as np
    from scipy.linalg import solve_triangular
    from numba import config
    assert config.ENABLE_CUDASIM
    from resolvent._gpu import _blockwise as GB, _kernels as K
    from resolvent.attention import _blockwise as CB, _dense as CD

    rng = np.random.default_rng(20261130)
    out = {}

    def rel(a, b):
        a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
        if not np.all(np.isfinite(a)):
            return float("inf")
        return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))

    def inputs(B, n, d, dv, big=1.0):
        q, k = big * rng.standard_normal((2, B, n, d))
        v = rng.standard_normal((B, n, dv))
        dy = rng.standard_normal((B, n, dv))
        gam = rng.uniform(0.0, 0.95, B)
        return q, k, v, dy, gam

    # (B, n, d, dv, b, threads): non-multiple n, a single block (= dense), odd thread counts
    cases = [(2, 11, 3, 2, 4, 32), (1, 24, 5, 3, 8, 7), (1, 9, 4, 5, 9, 16)]
    for B, n, d, dv, b, nt in cases:
        key = f"B{B}_n{n}_d{d}_dv{dv}_b{b}_nt{nt}"
        q, k, v, dy, gam = inputs(B, n, d, dv)
        scale = 0.7
        y = GB.forward(np, q, k, v, gam, b, scale, nt=nt)
        y_ref = CB._forward_numpy(q, k, v, gam, b, scale)
        out[f"fwd64_{key}"] = rel(y, y_ref)
        grads = GB.backward(np, q, k, v, gam, b, scale, dy, nt=nt)
        X = y_ref / (1 - gam[:, None, None])
        ref = CB._backward_numpy(q, k, v, gam, dy, X, b, scale)
        out[f"bwd64_{key}"] = max(rel(a, r) for a, r in zip(grads, ref))
        f32 = [x.astype(np.float32) for x in (q, k, v, gam, dy)]
        y32 = GB.forward(np, *f32[:4], b, scale, nt=nt)
        out[f"fwd32_{key}"] = rel(y32, y_ref)
        g32 = GB.backward(np, *f32[:4], b, scale, f32[4], nt=nt)
        out[f"bwd32_{key}"] = max(rel(a, r) for a, r in zip(g32, ref))
        if b >= n:
            out[f"dense_{key}"] = rel(y, CD.forward(q, k, v, gam, scale))
        ones = np.ones((B, n, dv))
        out[f"const_{key}"] = rel(GB.forward(np, q, k, ones, gam, b, scale, nt=nt), ones)

    # scores of +-1e4 (float32) must not overflow
    q, k, v, dy, gam = inputs(1, 12, 3, 2, big=60.0)
    f32 = [x.astype(np.float32) for x in (q, k, v, gam)]
    y32 = GB.forward(np, *f32, 4, 1.0, nt=16)
    out["large_scores_finite"] = float(np.all(np.isfinite(y32)))
    out["large_scores_rel"] = rel(y32, CB._forward_numpy(q, k, v, gam, 4, 1.0))

    # every output element written: NaN-poisoned buffers into the kernels directly
    B, n, d, dv, b = 2, 10, 3, 4, 4
    q, k, v, dy, gam = inputs(B, n, d, dv)
    m = -(-n // b)
    c, W, sizes, _, _ = GB.pooled_scores(np, q, k, b, 0.5)
    nan = lambda *s: np.full(s, np.nan)
    X, h, rr, g = nan(B, n, dv), nan(B, n), nan(B, m, dv), nan(B, m)
    K.forward_within(q, k, v, gam, b, 0.5, c, W @ sizes, W @ GB.block_sums(np, v, b), X, h, rr, g, nt=16)
    out["poison_forward_all_written"] = float(all(np.isfinite(a).all() for a in (X, h, rr, g)))

    # the fused float32 pipeline: several diagonal blocks in the reduced system (4 rows instead of
    # 64, so its flags chain), several column chunks, more than one thread group per column; the
    # pooled scores in tiles of GF.PT_SIM = 8 blocks (m = 13: two tiles a side, m = 21: three)
    from resolvent._gpu import _fused as GF
    # (SMALL_M = 0: the blocked solver; SMALL_M = 16: the one-thread-block solver of short systems)
    GF.NB, cw_saved, small_saved = 4, GF.CW, GF.SMALL_M
    for B, n, d, dv, b, nt, cw, small in ((2, 37, 3, 10, 3, 8, 64, 0), (1, 50, 4, 3, 4, 16, 4, 0),
                                          (1, 8, 2, 2, 8, 4, 64, 0), (1, 41, 3, 4, 2, 8, 64, 0),
                                          (2, 37, 3, 10, 3, 8, 64, 16), (1, 41, 3, 4, 2, 8, 64, 32)):
        GF.CW, GF.SMALL_M = cw, small
        q, k, v, dy, gam = inputs(B, n, d, dv)
        f32 = [x.astype(np.float32) for x in (q, k, v, gam)]
        y32 = GF.forward_checked(np, *f32, b, 0.8, nt=nt)
        out[f"fused32_B{B}_n{n}_dv{dv}_b{b}_nt{nt}_cw{cw}_small{small}"] = rel(y32, CB._forward_numpy(q, k, v, gam, b, 0.8))
    GF.SMALL_M = 0
    # the pooled tiles against the NumPy float64 pooled scores, on buffers poisoned with NaN (every
    # entry that is read must have been written: W's upper part, c[0], each row's tile sums)
    class Poisoned:
        def __getattr__(self, name):
            return getattr(np, name)

        @staticmethod
        def empty(shape, dtype):
            return np.full(shape, np.nan, dtype=dtype)

    q, k, v, dy, gam = inputs(2, 41, 3, 4)
    f32 = [x.astype(np.float32) for x in (q, k, v, gam)]
    flags = np.zeros(GF.SYNC_HEAD, dtype=np.int32)
    c, W, psum, _, _ = GF.pooled(Poisoned(), *f32[:3], 2, 0.8, flags)
    c0, W0, sizes, _, _ = GB.pooled_scores(np, q, k, 2, 0.8)
    mass = np.array([[psum[p, : I // GF.PT_SIM + 1, I].sum() for I in range(W.shape[1])] for p in range(2)])
    out["fused32_pooled_c"] = rel(c, c0)
    out["fused32_pooled_W"] = rel(W, W0)
    out["fused32_pooled_mass"] = rel(mass, W0.sum(axis=-1))
    y, bad = GF.forward(Poisoned(), *f32, 2, 0.8, nt=8)
    out["fused32_poisoned_forward"] = rel(y, CB._forward_numpy(q, k, v, gam, 2, 0.8))
    for i, name in enumerate("qkv"):
        arrs = [x.astype(np.float32) for x in (q, k, v, gam)]
        arrs[i][0, -1, 0] = np.inf if name == "k" else np.nan
        try:
            GF.forward_checked(np, *arrs, b, 0.8, nt=nt)
            out[f"fused_nonfinite_{name}"] = 0.0
        except ValueError as exc:
            out[f"fused_nonfinite_{name}"] = float(str(exc).startswith(name + " must"))
    # check=False (chain_attention's check_finite=False): the same numbers, and NaN passes unchecked
    r1 = np.random.default_rng(1)  # its own stream: the cases below keep their inputs
    f32 = [r1.standard_normal(s).astype(np.float32) for s in ((1, 12, 3), (1, 12, 3), (1, 12, 2))]
    f32.append(np.array([0.7], np.float32))
    out["unchecked_same"] = float(np.array_equal(GB.forward(np, *f32, 4, 0.8, nt=8, check=False),
                                                 GB.forward(np, *f32, 4, 0.8, nt=8)))
    f32[2][0, 5, 1] = np.nan
    out["unchecked_nan_out"] = float(np.isnan(GB.forward(np, *f32, 4, 0.8, nt=8, check=False)).any())
    # the float32 backward (its reduced system on the same single-launch solver, transposed; b = 19:
    # two panels of the reversed within-block solve, the second partial)
    for B, n, d, dv, b, nt in ((2, 37, 3, 10, 3, 8), (1, 30, 5, 4, 4, 16), (1, 45, 3, 4, 19, 32), (1, 41, 3, 4, 2, 8)):
        q, k, v, dy, gam = inputs(B, n, d, dv)
        f32 = [x.astype(np.float32) for x in (q, k, v, gam, dy)]
        g32 = GB.backward(np, *f32[:4], b, 0.8, f32[4], nt=nt)
        X = CB._forward_numpy(q, k, v, gam, b, 0.8) / (1 - gam[:, None, None])
        ref = CB._backward_numpy(q, k, v, gam, dy, X, b, 0.8)
        out[f"fusedbwd32_B{B}_n{n}_dv{dv}_b{b}_nt{nt}"] = max(rel(a, r) for a, r in zip(g32, ref))
    # the float32 backward's kernels flag non-finite q, k, v, dy (flags[0:4]), and only those
    q, k, v, dy, gam = inputs(1, 20, 3, 4)
    for i, name in enumerate(("q", "k", "v", "dy", None)):
        arrs = [x.astype(np.float32) for x in (q, k, v, gam, dy)]
        if name is not None:
            arrs[(0, 1, 2, 4)[i]][0, 7, 1] = np.nan if i % 2 else -np.inf
        flags = np.zeros(GF.SYNC_HEAD, dtype=np.int32)
        GB.backward(np, *arrs[:4], 4, 0.8, arrs[4], y=np.zeros((1, 20, 4), np.float32), nt=16, flags=flags)
        want = [int(j == i) for j in range(4)]
        out[f"fusedbwd_flags_{name}"] = float(list(flags[:4]) == want)
    for m, kcols in ((13, 3), (5, 10)):
        L = np.tril(rng.uniform(0, 1, (2, m, m)), -1)
        g = rng.uniform(0, 0.9 / m, (2, m))
        R = rng.standard_normal((2, m, kcols))
        for name, M, solver in (("lower", L, GB.solve_unit_lower), ("upper", np.swapaxes(L, -1, -2), GB.solve_unit_upper)):
            T = np.eye(m) - g[..., None] * M
            ref = np.stack([solve_triangular(T[i], R[i], lower=name == "lower") for i in range(2)])
            args = [x.astype(np.float32) for x in (M, g, R)]
            out[f"fused32_reduced_{name}_m{m}_k{kcols}"] = rel(solver(np, *args, nt=16), ref)
            Z, MZ = solver(np, *args, with_product=True, nt=16)
            out[f"fused32_reduced_{name}_product_m{m}_k{kcols}"] = max(rel(Z, ref), rel(MZ, M @ ref))
            GF.SMALL_M = 16  # the same systems on the one-thread-block solver (partial panels, strips)
            out[f"fused32_reduced_small_{name}_m{m}_k{kcols}"] = rel(solver(np, *args, nt=16), ref)
            Z, MZ = solver(np, *args, with_product=True, nt=8)
            out[f"fused32_reduced_small_{name}_product_m{m}_k{kcols}"] = max(rel(Z, ref), rel(MZ, M @ ref))
            GF.SMALL_M = 0
        # the backward's transposed system, (I - diag(g) W^T) Z = R from W itself: flipped into the
        # lower solver's order in tiles of GF.FLIP_TS_SIM = 4 (m = 13: four tile rows, the last partial)
        Tt = np.eye(m) - g[..., None] * np.swapaxes(L, -1, -2)
        ref = np.stack([solve_triangular(Tt[i], R[i], lower=False) for i in range(2)])
        args = [x.astype(np.float32) for x in (L + np.triu(rng.uniform(0, 1, (m, m))), g, R)]  # upper part not read
        for small in (0, 16):
            GF.SMALL_M = small
            Z, WtZ = GF.reduced_solve_transposed(np, *args, with_product=True, nt=8)
            out[f"fused32_reduced_transposed_small{small}_m{m}_k{kcols}"] = max(
                rel(Z, ref), rel(WtZ, np.swapaxes(L, -1, -2) @ ref))
            out[f"fused32_reduced_transposed_z_small{small}_m{m}_k{kcols}"] = rel(
                GF.reduced_solve_transposed(np, *args, nt=16), ref)
        GF.SMALL_M = 0
    GF.NB, GF.CW, GF.SMALL_M = 64, cw_saved, small_saved

    # the blocked reduced solver across several diagonal blocks (block 4 instead of 64)
    K.RED_NB = 4
    for m, kcols in ((13, 3), (8, 1), (5, 10)):
        L = np.tril(rng.uniform(0, 1, (2, m, m)), -1)
        g = rng.uniform(0, 0.9 / m, (2, m))
        R = rng.standard_normal((2, m, kcols))
        Z = GB.solve_unit_lower(np, L, g, R, nt=16)
        T = np.eye(m) - g[..., None] * L
        ref = np.stack([solve_triangular(T[i], R[i], lower=True) for i in range(2)])
        out[f"reduced_lower_m{m}_k{kcols}"] = rel(Z, ref)
        U = np.swapaxes(L, -1, -2)
        Zu = GB.solve_unit_upper(np, U, g, R, nt=16)
        Tu = np.eye(m) - g[..., None] * U
        refu = np.stack([solve_triangular(Tu[i], R[i], lower=False) for i in range(2)])
        out[f"reduced_upper_m{m}_k{kcols}"] = rel(Zu, refu)
        Zu, UZ = GB.solve_unit_upper(np, U, g, R, with_product=True, nt=16)
        out[f"reduced_upper_product_m{m}_k{kcols}"] = max(rel(Zu, refu), rel(UZ, U @ refu))
        M = np.tril(rng.standard_normal((2, m, m))) + 3 * np.eye(m)
        out[f"lower_solve_m{m}"] = rel(GB.lower_solve(np, M, R, nt=16), np.linalg.solve(M, R))

    # the batched path for block sizes above the fused kernels' limit (limit set to 4 here)
    K.MAX_BLOCK = 4
    q, k, v, dy, gam = inputs(2, 14, 3, 2)
    y = GB.forward(np, q, k, v, gam, 6, 0.6, nt=16)
    y_ref = CB._forward_numpy(q, k, v, gam, 6, 0.6)
    out["batched_fwd64"] = rel(y, y_ref)
    grads = GB.backward(np, q, k, v, gam, 6, 0.6, dy, nt=16)
    ref = CB._backward_numpy(q, k, v, gam, dy, y_ref / (1 - gam[:, None, None]), 6, 0.6)
    out["batched_bwd64"] = max(rel(a, r) for a, r in zip(grads, ref))
    print("RESULTS" + json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def results():
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=600)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS")]
    assert proc.returncode == 0 and line, f"simulator run failed:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(line[-1][len("RESULTS"):])


def _keys(results, prefix):
    keys = [k for k in results if k.startswith(prefix)]
    assert keys, f"no results for {prefix}"
    return keys


@pytest.mark.parametrize("prefix, tol", [
    ("fwd64_", 1e-10), ("bwd64_", 1e-10), ("dense_", 1e-10), ("const_", 1e-10),
    ("fwd32_", 1e-4), ("bwd32_", 1e-4), ("fused32_", 1e-4), ("fusedbwd32_", 1e-4),
    ("reduced_lower_", 1e-10), ("reduced_upper_", 1e-10), ("lower_solve_", 1e-10),
    ("batched_fwd64", 1e-10), ("batched_bwd64", 1e-10),
])
def test_simulated_kernels_match_cpu_float64(results, prefix, tol):
    bad = {k: results[k] for k in _keys(results, prefix) if not results[k] <= tol}
    assert not bad, f"relative errors above {tol}: {bad}"


def test_simulated_fused_backward_flags_nonfinite_input(results):
    for key in _keys(results, "fusedbwd_flags_"):
        assert results[key] == 1.0, key


def test_simulated_fused_pipeline_names_nonfinite_input(results):
    for name in "qkv":
        assert results[f"fused_nonfinite_{name}"] == 1.0, name


def test_simulated_fused_pipeline_unchecked(results):
    """check=False: no ValueError for a NaN (it reaches the output), the same numbers for finite input."""
    assert results["unchecked_same"] == 1.0
    assert results["unchecked_nan_out"] == 1.0


def test_simulated_kernels_write_every_output(results):
    assert results["poison_forward_all_written"] == 1.0


def test_simulated_float32_survives_large_scores(results):
    assert results["large_scores_finite"] == 1.0
    assert results["large_scores_rel"] <= 1e-3


class _FakeCupyArray:
    """What ``_kernels._fast_args`` reads of a CuPy array (the class's module says "cupy")."""

    __module__ = "cupy._fake"

    def __init__(self, arr, ptr):
        self.shape, self.strides, self.size, self.itemsize = arr.shape, arr.strides, arr.size, arr.itemsize
        self.ndim, self.dtype = arr.ndim, arr.dtype
        self.flags = arr.flags
        self.data = type("MemoryPointer", (), {"ptr": ptr})()


def test_raw_launch_parameters_follow_numbas_abi():
    """One 8-byte word per kernel parameter, as numba lays them out: an array is (meminfo, parent,
    nitems, itemsize, data, shape..., strides...), negative strides in two's complement (a C-contiguous
    view with a reversed axis of length 1 has them), a float32 in the low half of its word."""
    import numpy as np

    from resolvent._gpu import _kernels as K

    base = np.zeros((3, 1, 4), dtype=np.float32)
    rev = base[:, ::-1]  # still C-contiguous: the reversed axis has length 1
    assert rev.flags.c_contiguous and rev.strides[1] < 0
    key, words = K._fast_args((_FakeCupyArray(rev, 4096), np.float32(1.5), np.float64(-2.0), 7, -1))
    assert key == (("f", 3), "f", "d", "i", "i")
    assert words.dtype == np.uint64
    expect = [0, 0, 12, 4, 4096, 3, 1, 4, *(np.array(rev.strides, dtype=np.int64).view(np.uint64))]
    expect += [np.float32(1.5).view(np.uint32), np.float64(-2.0).view(np.uint64), 7, np.int64(-1).view(np.uint64)]
    assert words.tolist() == [int(w) for w in expect]
    assert K._fast_args((np.zeros(3),)) is None  # a host array: numba's own launch (the simulator)
    # the same layout again (the kept words): only the pointers and scalars change
    key2, words2 = K._fast_args((_FakeCupyArray(rev, 8192), np.float32(-0.25), np.float64(3.0), 9, 5))
    expect2 = list(expect)
    expect2[4] = 8192
    expect2[-4:] = [np.float32(-0.25).view(np.uint32), np.float64(3.0).view(np.uint64), 9, 5]
    assert key2 == key and words2.tolist() == [int(w) for w in expect2]
    assert words.tolist() == [int(w) for w in expect]  # the first call's words are its own
    big = 2**64 - 256  # a pointer above 2**63 survives the word buffer
    assert int(K._fast_args((_FakeCupyArray(base, big),))[1][4]) == big
