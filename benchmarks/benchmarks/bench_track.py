"""Numbers a time alone hides: iteration counts, accuracy, and speed relative to PyTorch.

Each ``track_`` method returns one number that asv records per commit, so a change that keeps the
time but doubles the iterations, loosens the accuracy or loses ground to PyTorch shows as a step
in its graph.
"""

from __future__ import annotations

import numpy as np

import resolvent

from .common import DTYPES, ncd_matrix, peers, pick, qkv, rng

GAMMA = 0.9


class TrackIterations:
    """Steps to relative residual 1e-10 of ``block_jacobi`` and ``two_level`` as ``z -> 1``.

    NCD row-stochastic matrix, n = 1024, diagonal blocks of 32 with coupling ``eps = 0.01`` per
    row, solver block size 32, float64, one right-hand side.  Block-Jacobi needs on the order of
    ``eps / (z - 1)`` steps; two-level's coarse correction keeps its count small and flat.
    A run that does not converge within 20000 steps fails the benchmark rather than report 20000.
    """

    params = [["block_jacobi", "two_level"], [1.1, 1.01, 1.001]]
    param_names = ["method", "z"]
    unit = "iterations"

    def setup(self, method, z):
        n = pick([1024], [64])[0]
        gen = rng("iterations", n)
        self.A = ncd_matrix(n, 32, 0.01, gen)
        self.b = gen.standard_normal(n)

    def track_iterations(self, method, z):
        _, info = resolvent.solve(self.A, self.b, z=z, method=method, block_size=32, tol=1e-10,
                                  maxiter=20000, return_info=True)
        if not info.converged:
            raise RuntimeError(f"{method} did not converge at z = {z}: {info}")
        return info.iterations


class TrackBlockwiseError:
    """Relative difference ``||Y_blockwise - Y_exact||_F / ||Y_exact||_F`` at the default block size.

    Standard normal q, k, v (no block structure, so this measures the pooled approximation on
    near-uniform attention rather than a best case), one head, d = 64, gamma = 0.9.
    """

    params = [pick([1024, 2048], [64]), DTYPES]
    param_names = ["n", "dtype"]
    unit = "relative difference"

    def setup(self, n, dtype):
        self.q, self.k, self.v = qkv(n, 64, dtype, seed=1)

    def track_blockwise_vs_exact(self, n, dtype):
        yb = resolvent.chain_attention(self.q, self.k, self.v, GAMMA, method="blockwise")
        ye = resolvent.chain_attention(self.q, self.k, self.v, GAMMA, method="exact")
        return float(np.linalg.norm((yb - ye).astype(np.float64)) / np.linalg.norm(ye.astype(np.float64)))


class TrackTorchRatio:
    """Time of ``blockwise`` divided by the time of a PyTorch peer on the same inputs, same process.

    Peers (``benchmarks/peers.py``): ``torch_dense_chain``, dense chain attention as users write it
    in PyTorch (causal softmax, then ``torch.linalg.solve_triangular``), and ``torch_sdpa``,
    ``scaled_dot_product_attention`` (plain causal attention, no chain: the cost floor of an
    attention layer).  4 heads, d = 64, float32; below 1 means ``blockwise`` is faster.  Skipped
    when PyTorch is not installed.
    """

    params = [pick([1024, 4096], [64]), ["torch_dense_chain", "torch_sdpa"]]
    param_names = ["n", "peer"]
    unit = "ratio"
    timeout = 180

    def setup(self, n, peer):
        self.peers = peers()
        import torch

        self.q, self.k, self.v = qkv(n, 64, "float32", heads=4, seed=2)
        tq, tk, tv = (torch.from_numpy(x) for x in (self.q, self.k, self.v))
        fn = getattr(self.peers, peer)
        self.peer = (lambda: fn(tq, tk, tv, GAMMA)) if peer == "torch_dense_chain" else (lambda: fn(tq, tk, tv))

    def track_time_ratio(self, n, peer):
        median_time = self.peers.median_time
        repeats = pick([5], [1])[0]
        t_ours = median_time(lambda: resolvent.chain_attention(self.q, self.k, self.v, GAMMA), repeats=repeats)
        t_peer = median_time(self.peer, repeats=repeats, budget=10.0)
        return t_ours / t_peer
