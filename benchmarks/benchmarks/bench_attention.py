"""``resolvent.chain_attention``: time and peak memory of every method, and the block-size sweep.

One head, ``d = 64``, ``gamma = 0.9``, standard normal q, k, v.  n runs from 1024 to 65536.  What
is not run by default (asv shows it as skipped, ``n/a``):

- ``dense`` at n = 65536: the n x n matrix alone is 16 GiB in float32; never run.
- ``dense`` at n = 16384 and ``exact`` at n >= 16384: minutes per call on a laptop-class CPU; run
  with ``RESOLVENT_ASV_LARGE=1``.

The scaling report (``benchmarks/scaling_report.py``) covers the same ground with fitted exponents.
"""

from __future__ import annotations

import resolvent

from .common import BACKENDS, DTYPES, Backend, pick, qkv, require_large, skip

GAMMA = 0.9
D = 64


class ChainAttention:
    params = [
        BACKENDS,
        ["blockwise", "exact", "dense"],
        pick([1024, 4096, 16384, 65536], [64]),
        DTYPES,
    ]
    param_names = ["backend", "method", "n", "dtype"]
    timeout = 1200  # only reached with RESOLVENT_ASV_LARGE=1

    def setup(self, backend, method, n, dtype):
        if method == "dense" and n > 16384:
            skip(f"dense at n = {n} needs an n x n matrix of {n * n * 4 / 2**30:.0f} GiB or more")
        if (method == "dense" and n > 4096) or (method == "exact" and n > 4096):
            require_large(f"{method} at n = {n}")
        self.be = Backend(backend)
        q, k, v = (self.be.asarray(x) for x in qkv(n, D, dtype))
        self.q, self.k, self.v = q, k, v
        self.method = method
        # Warm-up at a small size: compiles (or loads from cache) the Numba kernels outside the timing.
        self.be.probe(lambda: resolvent.chain_attention(q[:, :64], k[:, :64], v[:, :64], GAMMA, method=method),
                      "chain_attention")

    def time_chain_attention(self, *params):
        resolvent.chain_attention(self.q, self.k, self.v, GAMMA, method=self.method)
        self.be.sync()

    def peakmem_chain_attention(self, *params):
        resolvent.chain_attention(self.q, self.k, self.v, GAMMA, method=self.method)
        self.be.sync()


class ChainAttentionBlockSize:
    """``blockwise`` against its block size, as a multiple of ``default_block_size(n)``.

    The block size is ``factor * default`` rounded to a multiple of 8 (at least 8); factor 1 is the
    default, so a change of the default rule that costs time shows as a gap between the rows.
    float32 only (``ChainAttention`` covers both precisions); the report's sweep is finer.
    """

    params = [BACKENDS, pick([4096, 65536], [64]), ["0.25", "0.5", "1", "2", "4"]]
    param_names = ["backend", "n", "factor"]

    def setup(self, backend, n, factor, dtype="float32"):
        self.be = Backend(backend)
        q, k, v = (self.be.asarray(x) for x in qkv(n, D, dtype))
        self.q, self.k, self.v = q, k, v
        self.block_size = min(n, max(8, 8 * round(float(factor) * resolvent.default_block_size(n) / 8)))
        self.be.probe(lambda: resolvent.chain_attention(q[:, :64], k[:, :64], v[:, :64], GAMMA, block_size=8),
                      "chain_attention")

    def time_blockwise(self, *params):
        resolvent.chain_attention(self.q, self.k, self.v, GAMMA, block_size=self.block_size)
        self.be.sync()

    def peakmem_blockwise(self, *params):
        resolvent.chain_attention(self.q, self.k, self.v, GAMMA, block_size=self.block_size)
        self.be.sync()
