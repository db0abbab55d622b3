"""Sweep the block size of blockwise chain attention to choose ``C`` in ``b = C n^(1/3)``.

For each n, times ``chain_attention(method="blockwise", block_size=b)`` (float32, d = 64, one head
for n >= 16384, batch x heads = 8 below) over multiples of 8 around ``n^(1/3)``, and reports the
fastest ``b`` and ``b / n^(1/3)``. ``resolvent.default_block_size`` uses the constant this table
suggests (the geometric mean of the per-n best ratios, taken over a flat optimum).

Usage: ``python benchmarks/block_size_sweep.py [--quick]``
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from peers import median_time  # noqa: E402

import resolvent  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    ns = [1024, 4096] if args.quick else [1024, 4096, 16384, 65536]
    print(f"# blockwise block-size sweep — {datetime.date.today()}, {platform.machine()}, "
          f"{os.cpu_count()} cores, numba kernel: {resolvent.attention._blockwise.use_numba()}\n")
    print("| n | batch | b | b / n^(1/3) | time (ms) | vs best |")
    print("|---:|---:|---:|---:|---:|---:|")
    ratios = []
    resolvent.chain_attention(*np.ones((3, 1, 64, 8), np.float32), 0.5)  # compile outside the timings
    for n in ns:
        batch = 8 if n <= 4096 else 1
        rng = np.random.default_rng(0)
        q, k, v = (rng.standard_normal((batch, n, 64)).astype(np.float32) for _ in range(3))
        root = n ** (1 / 3)
        bs = sorted({b for b in (8 * np.arange(1, 64)) if 0.5 * root <= b <= 12 * root and b <= n})
        times = {b: median_time(lambda: resolvent.chain_attention(q, k, v, 0.9, block_size=int(b)), repeats=7)
                 for b in bs}
        best = min(times, key=times.get)
        ratios.append(best / root)
        for b in bs:
            mark = " **best**" if b == best else ""
            print(f"| {n} | {batch} | {b} | {b / root:.2f} | {times[b] * 1e3:.2f} | {times[b] / times[best]:.2f}{mark} |")
    c = float(np.exp(np.mean(np.log(ratios))))
    print(f"\nbest b / n^(1/3) per n: {', '.join(f'{r:.2f}' for r in ratios)}; geometric mean **C = {c:.2f}**")
    print(f"default_block_size now uses C = {resolvent.attention._api.C_POOLED} "
          f"(gives {', '.join(str(resolvent.default_block_size(n)) for n in ns)} for n = {ns})")


if __name__ == "__main__":
    import resolvent.attention._api  # noqa: F401
    import resolvent.attention._blockwise  # noqa: F401

    main()
