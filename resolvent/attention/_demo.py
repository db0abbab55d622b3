"""The chain-attention part of ``python -m resolvent demo``."""

from __future__ import annotations

import time

import numpy as np

from ._api import block_mass, chain_attention, default_block_size


def local_qkv(n, d=64, dv=64, *, heads=1, width=6.0, peak=24.0, seed=0, dtype=np.float32):
    """Queries and keys whose attention is nearly block diagonal, as learned attention often is.

    Half of each vector is a random Fourier feature code of the position,
    ``sqrt(2 / D) cos(w_j t + phi_j)`` with ``w_j ~ N(0, 1 / width^2)``, so that
    ``scale q_t . k_s ~ peak * exp(-(t - s)^2 / (2 width^2))``: each token attends to the few
    before it; the other half is noise.
    """
    rng = np.random.default_rng(seed)
    D = d // 2
    w = rng.standard_normal(D) / width
    phi = rng.uniform(0, 2 * np.pi, D)
    pos = np.sqrt(2.0 / D) * np.cos(np.arange(n)[:, None] * w[None, :] + phi[None, :])  # (n, D)
    pos *= np.sqrt(peak * np.sqrt(d))
    noise = 0.5 * rng.standard_normal((2, heads, n, d - D))
    q = np.concatenate([np.broadcast_to(pos, (heads, n, D)), noise[0]], axis=-1)
    k = np.concatenate([np.broadcast_to(pos, (heads, n, D)), noise[1]], axis=-1)
    v = rng.standard_normal((heads, n, dv))
    return q.astype(dtype), k.astype(dtype), v.astype(dtype)


def run(quick=False):
    ns = [1024, 2048, 4096] if quick else [1024, 2048, 4096, 8192, 16384]
    gamma = 0.9
    print("Chain attention Y = (1 - gamma) A (I - gamma A)^{-1} V, one head, d = 64, float32, "
          f"gamma = {gamma}, attention nearly block diagonal (local)")
    header = f"{'n':>6} {'block':>6} {'exact (ms)':>11} {'blockwise (ms)':>15} {'speedup':>8} {'rel. diff':>10} {'block mass':>11}"
    print(header)
    print("-" * len(header))
    chain_attention(*local_qkv(256), gamma)  # compile the CPU kernel once, outside the timings
    for n in ns:
        q, k, v = local_qkv(n)
        b = default_block_size(n)
        t0 = time.perf_counter()
        y_exact = chain_attention(q, k, v, gamma, method="exact")
        t1 = time.perf_counter()
        y_block = chain_attention(q, k, v, gamma, method="blockwise")
        t2 = time.perf_counter()
        diff = np.linalg.norm(y_block - y_exact) / np.linalg.norm(y_exact)
        mass = float(block_mass(q, k, b)[0])
        print(f"{n:>6} {b:>6} {(t1 - t0) * 1e3:>11.1f} {(t2 - t1) * 1e3:>15.2f} "
              f"{(t1 - t0) / (t2 - t1):>7.0f}x {diff:>10.1e} {mass:>11.3f}")
