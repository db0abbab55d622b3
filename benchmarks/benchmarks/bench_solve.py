"""``resolvent.solve`` and ``resolvent.solve_shifts``: time and peak memory.

Matrices are nearly completely decomposable and row-stochastic (diagonal blocks of 32 carrying
weight 0.99 of every row) with ``z = 1.01``: well posed, and a case where the iterative methods
converge (block-Jacobi in tens of steps, two-level in a few) whenever their block size is a
multiple of 32.  The iteration counts themselves are tracked in ``bench_track``.
"""

from __future__ import annotations

import numpy as np

import resolvent

from .common import BACKENDS, DTYPES, Backend, ncd_matrix, pick, rng, skip

NCD_BLOCK = 32
NCD_EPS = 0.01
Z = 1.01


class Solve:
    """``solve(A, b, z=1.01, method=...)`` on an NCD matrix, one right-hand side.

    ``block_size`` "default" is the library's rule (``max(32, ceil(sqrt(n)))``); 128 is four
    structural blocks at once.  ``direct`` ignores the block size, so it runs with "default" only.
    ``auto`` is LU up to n = 2048 and two-level above.
    """

    params = [
        BACKENDS,
        ["direct", "block_jacobi", "two_level", "auto"],
        pick([1024, 4096], [64]),
        pick(["default", 128], ["default", 32]),
        DTYPES,
    ]
    param_names = ["backend", "method", "n", "block_size", "dtype"]
    timeout = 180

    def setup(self, backend, method, n, block_size, dtype):
        if method == "direct" and block_size != "default":
            skip("direct ignores block_size")
        self.be = Backend(backend)
        gen = rng("solve", n, dtype)
        A = ncd_matrix(n, NCD_BLOCK, NCD_EPS, gen, dtype)
        b = gen.standard_normal(n).astype(dtype)
        self.A, self.b = self.be.asarray(A), self.be.asarray(b)
        self.kw = dict(z=Z, method=method, block_size=None if block_size == "default" else block_size)
        # A small solve with the same method: skips (NotImplementedError) where the backend lacks it.
        self.be.probe(lambda: resolvent.solve(self.A[:64, :64], self.b[:64], **self.kw), f"solve {method}")

    def time_solve(self, *params):
        resolvent.solve(self.A, self.b, **self.kw)
        self.be.sync()

    def peakmem_solve(self, *params):
        resolvent.solve(self.A, self.b, **self.kw)
        self.be.sync()


class SolveShifts:
    """``solve_shifts(A, B, zs)``: one complex Schur form, then a triangular solve per shift.

    A general (non-normal) NCD matrix, 4 right-hand sides, shifts on a circle of radius 1.05
    around 0, so all of them lie outside the spectrum (spectral radius 1).
    """

    params = [BACKENDS, pick([128, 512], [48]), [1, 16], DTYPES]
    param_names = ["backend", "n", "shifts", "dtype"]
    timeout = 180

    def setup(self, backend, n, shifts, dtype):
        self.be = Backend(backend)
        gen = rng("solve_shifts", n, dtype)
        A = ncd_matrix(n, NCD_BLOCK, NCD_EPS, gen, dtype)
        B = gen.standard_normal((n, 4)).astype(dtype)
        zs = 1.05 * np.exp(2j * np.pi * np.arange(shifts) / shifts)
        self.A, self.B, self.zs = self.be.asarray(A), self.be.asarray(B), self.be.asarray(zs)
        self.be.probe(lambda: resolvent.solve_shifts(self.A[:8, :8], self.B[:8], self.zs[:1]), "solve_shifts")

    def time_solve_shifts(self, *params):
        resolvent.solve_shifts(self.A, self.B, self.zs)
        self.be.sync()

    def peakmem_solve_shifts(self, *params):
        resolvent.solve_shifts(self.A, self.B, self.zs)
        self.be.sync()
