"""CPU demonstration of the resolvent solvers (``python -m resolvent demo``).

Also home of the nearly-completely-decomposable test matrices and the iteration-count table that
``benchmarks/iteration_counts.py`` prints at a larger size.
"""

from __future__ import annotations

import time

import numpy as np

from .._errors import SolveInfo
from ._solve import solve, solve_shifts

__all__ = ["ncd_matrix", "iteration_table", "run"]

EPSILONS = (1e-1, 1e-2, 1e-3)
SHIFTS = (1.1, 1.01, 1.001)


def ncd_matrix(n: int, block_size: int, eps: float, rng) -> np.ndarray:
    """A nearly completely decomposable row-stochastic matrix (Simon-Ando), shape (n, n).

    Dense random row-stochastic diagonal blocks of ``block_size`` (the last may be shorter) carry
    weight ``1 - eps`` of every row; the remaining ``eps`` is spread at random over the columns
    outside the row's block; rows are then renormalised to sum to 1.
    """
    W = rng.random((n, n))
    blk = np.arange(n) // block_size
    inside = blk[:, None] == blk[None, :]
    diag = np.where(inside, W, 0.0)
    off = np.where(inside, 0.0, W)
    P = (1 - eps) * diag / diag.sum(axis=1, keepdims=True)
    if (~inside).any():
        offsum = off.sum(axis=1, keepdims=True)
        P += eps * off / np.where(offsum > 0, offsum, 1.0)
    return P / P.sum(axis=1, keepdims=True)


def _run(A, B, z, method, **kw):
    t0 = time.perf_counter()
    _, info = solve(A, B, z=z, method=method, return_info=True, **kw)
    return info, time.perf_counter() - t0


def iteration_table(n: int, block_size: int, *, seed: int = 0, maxiter: int = 20000,
                    tol: float = 1e-10):
    """Iterations of block_jacobi and two_level on NCD matrices, for every (eps, z) pair.

    Returns a list of rows ``(eps, z, info_block_jacobi, info_two_level, seconds_block_jacobi,
    seconds_two_level)``; a run that did not converge within ``maxiter`` has
    ``info.converged == False`` (nothing is raised).
    """
    rng = np.random.default_rng(seed)
    rows = []
    for eps in EPSILONS:
        A = ncd_matrix(n, block_size, eps, rng)
        B = rng.standard_normal(n)
        for z in SHIFTS:
            infos, times = [], []
            for m in ("block_jacobi", "two_level"):
                t0 = time.perf_counter()
                _, info = solve(A, B, z=z, method=m, block_size=block_size, tol=tol,
                                maxiter=maxiter, return_info=True)
                times.append(time.perf_counter() - t0)
                infos.append(info)
            rows.append((eps, z, *infos, *times))
    return rows


def _count(info: SolveInfo) -> str:
    return f"{info.iterations}" if info.converged else f">{info.iterations} (not converged, res {info.residual:.1e})"


def format_iteration_table(rows, *, markdown: bool = False, times: bool = False) -> str:
    head = ["eps", "z", "block_jacobi iters", "two_level iters"]
    body = [[f"{r[0]:g}", f"{r[1]:g}", _count(r[2]), _count(r[3])] for r in rows]
    if times:
        head += ["block_jacobi time", "two_level time"]
        for line, r in zip(body, rows):
            line += [f"{r[4] * 1e3:.1f} ms", f"{r[5] * 1e3:.1f} ms"]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---:" for _ in head) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in body]
        return "\n".join(lines)
    widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    return "\n".join([fmt.format(*head)] + [fmt.format(*r) for r in body])


def run(quick: bool = False) -> None:
    """Print the solver table and the iteration-count table (``quick``: smaller sizes)."""
    rng = np.random.default_rng(2026)
    n, b = (120, 12) if quick else (600, 30)
    A_ncd = ncd_matrix(n, b, 1e-2, rng)
    A_gen = rng.standard_normal((n, n)) / np.sqrt(n)
    B = rng.standard_normal((n, 4))
    cases = [
        (f"random {n}x{n}, z=3, k=4", A_gen, 3.0, "direct", {}),
        (f"random {n}x{n}, z=3, k=4", A_gen, 3.0, "auto", {}),
        (f"random lower-tri {n}x{n}, z=3", np.tril(A_gen), 3.0, "direct", {"lower": True}),
        (f"NCD {n}x{n} eps=1e-2, z=1.01", A_ncd, 1.01, "block_jacobi", {"block_size": b}),
        (f"NCD {n}x{n} eps=1e-2, z=1.01", A_ncd, 1.01, "two_level", {"block_size": b}),
        (f"NCD {n}x{n} eps=1e-2, z=1.01+0.1j", A_ncd, 1.01 + 0.1j, "two_level", {"block_size": b}),
        (f"NCD {n}x{n} float32, z=1.01", A_ncd.astype(np.float32), 1.01, "two_level",
         {"block_size": b}),
    ]
    rows = []
    for what, A, z, method, kw in cases:
        Bc = B.astype(A.dtype) if A.dtype == np.float32 else B
        info, dt = _run(A, Bc, z, method, **kw)
        rows.append((what, info.method if method != "auto" else f"auto->{info.method}",
                     str(info.iterations), f"{info.residual:.1e}", f"{dt * 1e3:.1f} ms"))
    zs = np.linspace(1.05, 2.0, 20)
    t0 = time.perf_counter()
    X = solve_shifts(A_ncd, B, zs)
    dt = time.perf_counter() - t0
    res = max(
        np.max(np.linalg.norm(B - (z * X[i] - A_ncd @ X[i]), axis=0) / np.linalg.norm(B, axis=0))
        for i, z in enumerate(zs)
    )
    rows.append((f"NCD {n}x{n}, 20 shifts (Schur once)", "solve_shifts", "0", f"{res:.1e}",
                 f"{dt * 1e3:.1f} ms"))
    head = ("problem", "method", "iterations", "rel. residual", "time")
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    print("resolvent solves  X = (zI - A)^{-1} B")
    print(fmt.format(*head))
    for r in rows:
        print(fmt.format(*r))

    tn, tb = (240, 12) if quick else (600, 30)
    print()
    print(f"iterations to relative residual 1e-10 on NCD matrices (n={tn}, block size {tb}):")
    print(format_iteration_table(iteration_table(tn, tb)))
