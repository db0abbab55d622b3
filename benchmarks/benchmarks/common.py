"""Helpers shared by the asv benchmarks: switches, seeded inputs, backends, the PyTorch peers.

Switches (environment variables, read once at import, so asv's discovery and the runs agree):

``RESOLVENT_ASV_SMOKE=1``
    Every parameter list shrinks to tiny sizes; used by ``tests/test_benchmarks_smoke.py`` so that a
    broken benchmark fails the ordinary test run in seconds.  Never set it for real measurements.
``RESOLVENT_ASV_LARGE=1``
    Also run the combinations that are in the parameter lists but take minutes each (``exact`` at
    n = 16384 and 65536, ``dense`` at n = 16384).  Without it their ``setup`` raises
    ``NotImplementedError`` and asv records them as skipped (``n/a``), so the grid, and therefore
    the result files, are the same either way.
"""

from __future__ import annotations

import os
import sys
import zlib

import numpy as np

try:
    # Imported here, not in the children: with asv.conf.json's "launch_method": "forkserver" every
    # benchmark process forks from one that has imported this module, so it starts with Numba (the
    # fused blockwise kernels' compiler, seconds to import) already loaded.  Nothing is compiled or
    # run: Numba's OpenMP threads must first start in the child, never in the fork server.
    import numba  # noqa: F401
    import scipy.linalg  # noqa: F401
except ImportError:  # the suite runs without Numba (NumPy path) too
    pass

SMOKE = os.environ.get("RESOLVENT_ASV_SMOKE", "") not in ("", "0")
LARGE = os.environ.get("RESOLVENT_ASV_LARGE", "") not in ("", "0")

SEED = 20260101
BACKENDS = ["numpy", "cupy"]
DTYPES = ["float32", "float64"]


def pick(default, smoke):
    """``smoke`` when ``RESOLVENT_ASV_SMOKE`` is set, else ``default`` (a parameter list)."""
    return list(smoke) if SMOKE else list(default)


def skip(reason):
    """Skip this parameter combination: asv treats ``NotImplementedError`` in ``setup`` as skipped."""
    raise NotImplementedError(reason)


def require_large(what):
    """Skip ``what`` unless ``RESOLVENT_ASV_LARGE`` is set."""
    if not LARGE:
        skip(f"{what} takes minutes; set RESOLVENT_ASV_LARGE=1 to run it")


# --------------------------------------------------------------------------------------------------
# Backends


class Backend:
    """The array module a benchmark runs on, and the synchronisation its timed calls end with.

    ``numpy``: host arrays, ``sync`` does nothing.  ``cupy``: device arrays, ``sync`` waits for the
    current stream, so a timed call measures the work and not only its launch.
    """

    def __init__(self, name):
        self.name = name
        if name == "numpy":
            self.xp = np
            self.sync = _no_sync
            return
        if name != "cupy":
            raise ValueError(f"backend must be 'numpy' or 'cupy', got {name!r}")
        try:
            import cupy
        except ImportError:
            skip("cupy is not installed")
        try:
            if cupy.cuda.runtime.getDeviceCount() < 1:
                skip("no CUDA device")
        except cupy.cuda.runtime.CUDARuntimeError:
            skip("no CUDA device")
        self.xp = cupy
        stream = cupy.cuda.get_current_stream

        def sync():
            stream().synchronize()

        self.sync = sync

    def asarray(self, x):
        return self.xp.asarray(x)

    def probe(self, fn, what):
        """Run ``fn()`` once (in ``setup``, on a small input); skip what the backend does not support.

        Two answers mean "not supported on this backend", and asv records a skip: the GPU backend's
        ``NotImplementedError`` for a method it lacks (it propagates from here as is), and CuPy's
        ``TypeError`` when a library without a GPU path converts device arrays implicitly.  Any other
        error is a real failure and propagates.
        """
        if self.name == "numpy":
            return fn()
        try:
            out = fn()
        except TypeError as exc:
            if "Implicit conversion" in str(exc) or "cupy" in str(exc).lower():
                skip(f"resolvent has no CuPy path for {what} yet ({exc})")
            raise
        self.sync()
        return out


def _no_sync():
    return None


# --------------------------------------------------------------------------------------------------
# Inputs


def rng(*salt):
    """A generator seeded from ``SEED`` and the benchmark's parameters, so every input is reproducible."""
    return np.random.default_rng([SEED, *[zlib.crc32(str(s).encode()) for s in salt]])


def ncd_matrix(n, block, eps, gen, dtype=np.float64):
    """A nearly completely decomposable row-stochastic matrix (Simon-Ando), shape (n, n).

    Each row puts weight ``1 - eps`` on a random distribution over its own diagonal block of
    ``block`` consecutive indices and ``eps`` on a random distribution over the other columns (the
    construction of ``resolvent.linalg._demo.ncd_matrix``, kept here so that benchmarks depend on the
    public API only).  Block-Jacobi converges on ``zI - A`` for ``z > 1`` when its blocks are unions
    of these blocks; ``z -> 1`` is where it slows down and two-level does not.

    Built in slabs of rows, so that the only n x n buffer is the result: asv's ``peakmem_`` counts
    the whole process, ``setup`` included.
    """
    A = np.empty((n, n), dtype=dtype)
    cols = np.arange(n) // block
    for r0 in range(0, n, _SLAB):
        r1 = min(n, r0 + _SLAB)
        W = gen.random((r1 - r0, n))
        inside = (np.arange(r0, r1) // block)[:, None] == cols[None, :]
        diag = np.where(inside, W, 0.0)
        W[inside] = 0.0
        off = W.sum(axis=1, keepdims=True)
        P = (1 - eps) * diag / diag.sum(axis=1, keepdims=True)
        P += eps * W / np.where(off > 0, off, 1.0)
        P /= P.sum(axis=1, keepdims=True)
        A[r0:r1] = P
    return A


_SLAB = 256


def qkv(n, d=64, dtype="float32", heads=1, seed=0):
    """Standard normal queries, keys and values of shape (heads, n, d)."""
    gen = np.random.default_rng([SEED, seed, n, d, heads])
    return [gen.standard_normal((heads, n, d)).astype(dtype) for _ in range(3)]


def causal_attention(n, d=64, dtype="float64", seed=0):
    """A dense causal softmax attention matrix (row-stochastic, lower triangular), shape (n, n).

    Built in slabs of rows (see :func:`ncd_matrix`).
    """
    q, k, _ = qkv(n, d, "float64", seed=seed)
    q, k = q[0] / np.sqrt(d), k[0]
    A = np.empty((n, n), dtype=dtype)
    for r0 in range(0, n, _SLAB):
        r1 = min(n, r0 + _SLAB)
        s = q[r0:r1] @ k.T
        s[np.arange(r0, r1)[:, None] < np.arange(n)[None, :]] = -np.inf
        s -= s.max(axis=1, keepdims=True)
        np.exp(s, out=s)
        s /= s.sum(axis=1, keepdims=True)
        A[r0:r1] = s
    return A


# --------------------------------------------------------------------------------------------------
# PyTorch peers (benchmarks/peers.py)


def peers():
    """The ``peers`` module of ``benchmarks/`` (torch_dense_chain, torch_sdpa, median_time).

    Skips when PyTorch is not installed.
    """
    try:
        import torch  # noqa: F401
    except ImportError:
        skip("PyTorch is not installed")
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if here not in sys.path:
        sys.path.insert(0, here)
    import peers as mod

    return mod
