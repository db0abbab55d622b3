"""Chain attention on the CPU against the peers users run today (issue: chain attention on the CPU).

Prints three markdown tables:

1. batch x heads = 8, n = 4096, d = 64, float32: ``blockwise`` and ``exact`` against PyTorch's dense
   chain attention (softmax, then ``torch.linalg.solve_triangular``) and PyTorch's
   ``scaled_dot_product_attention``, measured in the same process.
2. one head, n = 4096 .. 65536: ``blockwise`` time and its fitted growth exponent in n.
3. n = 65536, one head: peak memory (``tracemalloc``, which sees every NumPy allocation) of
   ``blockwise`` and ``exact`` against the bytes of q, k, v together.

Usage: ``python benchmarks/chain_attention_cpu.py [--quick]``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tracemalloc

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from peers import growth_exponent, median_time, torch_dense_chain, torch_sdpa  # noqa: E402

import resolvent  # noqa: E402


def inputs(batch, n, d=64, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((batch, n, d)).astype(dtype) for _ in range(3)]


def peak_bytes(fn):
    tracemalloc.start()
    tracemalloc.reset_peak()
    fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    args = parser.parse_args(argv)
    gamma = 0.9
    print(f"# chain attention on the CPU — {datetime.date.today()}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, resolvent {resolvent.__version__}\n")

    import torch

    # 1. the headline comparison
    B, n = (8, 1024) if args.quick else (8, 4096)
    q, k, v = inputs(B, n)
    tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))
    rows = [
        ("resolvent blockwise", median_time(lambda: resolvent.chain_attention(q, k, v, gamma), repeats=15)),
        ("resolvent exact", median_time(lambda: resolvent.chain_attention(q, k, v, gamma, method="exact"), repeats=3)),
        ("torch dense chain (softmax + solve_triangular)", median_time(lambda: torch_dense_chain(tq, tk, tv, gamma), repeats=3)),
        ("torch scaled_dot_product_attention (plain attention)", median_time(lambda: torch_sdpa(tq, tk, tv), repeats=5)),
    ]
    t_bw = rows[0][1]
    print(f"## batch x heads = {B}, n = {n}, d = 64, float32, gamma = {gamma}, "
          f"block size {resolvent.default_block_size(n)}\n")
    print("| method | time (ms) | blockwise speedup over it |")
    print("|---|---:|---:|")
    for name, t in rows:
        print(f"| {name} | {t * 1e3:.2f} | {t / t_bw:.1f}x |")
    y_bw = resolvent.chain_attention(q, k, v, gamma)
    y_ex = resolvent.chain_attention(q, k, v, gamma, method="exact")
    y_t = torch_dense_chain(tq, tk, tv, gamma).numpy()
    print(f"\nexact vs torch dense: max relative difference "
          f"{np.linalg.norm(y_ex - y_t) / np.linalg.norm(y_t):.1e}; blockwise vs exact on random "
          f"(not block-structured) inputs: {np.linalg.norm(y_bw - y_ex) / np.linalg.norm(y_ex):.2f}\n")

    # 2. growth in n, one head
    ns = [1024, 2048, 4096, 8192] if args.quick else [4096, 8192, 16384, 32768, 65536]
    times = []
    print("## one head, d = 64, float32: blockwise time against n\n")
    print("| n | block size | time (ms) |")
    print("|---:|---:|---:|")
    for n in ns:
        q, k, v = inputs(1, n)
        t = median_time(lambda: resolvent.chain_attention(q, k, v, gamma), repeats=9)
        times.append(t)
        print(f"| {n} | {resolvent.default_block_size(n)} | {t * 1e3:.2f} |")
    print(f"\nfitted growth exponent of blockwise time in n: **{growth_exponent(ns, times):.2f}**\n")

    # 3. memory at the largest n
    n = ns[-1]
    q, k, v = inputs(1, n)
    qkv_bytes = q.nbytes + k.nbytes + v.nbytes
    print(f"## peak memory, one head, n = {n}, d = 64, float32 (q, k, v together: {qkv_bytes / 2**20:.1f} MiB)\n")
    print("| method | peak allocated (MiB) | x bytes of q, k, v | time (s) |")
    print("|---|---:|---:|---:|")
    for method in ["blockwise", "exact"]:
        def run():
            return resolvent.chain_attention(q, k, v, gamma, method=method)
        t = median_time(run, repeats=1, warmup=1 if method == "blockwise" else 0)
        peak = peak_bytes(run)
        print(f"| {method} | {peak / 2**20:.1f} | {peak / qkv_bytes:.2f} | {t:.2f} |")
    print(f"\n(an n x n float32 matrix at this n would be {n * n * 4 / 2**30:.1f} GiB)")


if __name__ == "__main__":
    main()
