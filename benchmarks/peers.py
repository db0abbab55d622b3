"""The peers users run today, written as they would write them in PyTorch.

Shared by the benchmark scripts and the asv suite.  Imported only where PyTorch is installed.
"""

from __future__ import annotations

import time

import numpy as np


def torch_dense_chain(q, k, v, gamma):
    """Dense chain attention in plain PyTorch: causal softmax, then a triangular solve.

    ``(1 - gamma) (I - gamma A)^{-1} A V`` with ``A = softmax(q k^T / sqrt(d) + mask)``.
    """
    import torch

    n, d = q.shape[-2:]
    s = (q @ k.transpose(-1, -2)) * (d**-0.5)
    mask = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    A = torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1)
    M = torch.eye(n, dtype=q.dtype, device=q.device) - gamma * A
    return (1 - gamma) * torch.linalg.solve_triangular(M, A @ v, upper=False)


def torch_sdpa(q, k, v):
    """Plain causal attention, PyTorch's fused kernel."""
    import torch

    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


def median_time(fn, *, repeats=5, warmup=1, budget=None):
    """Median wall time of ``fn()`` in seconds over ``repeats`` runs (fewer if ``budget`` s run out)."""
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if budget is not None and time.perf_counter() - start > budget:
            break
    return float(np.median(times))


def growth_exponent(ns, times):
    """Slope of log(time) against log(n): the fitted growth exponent."""
    return float(np.polyfit(np.log(ns), np.log(times), 1)[0])
