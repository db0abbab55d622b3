"""``resolvent.chain``: the chain operator on an explicit matrix, time and peak memory.

Two structures: ``ncd``, a general nearly completely decomposable row-stochastic matrix
(``gamma = 0.99``, so the solve is ``(I - 0.99 A) X = A V``, the iterative methods' hard regime), where
every ``method`` is timed; and ``causal``, a dense causal softmax attention matrix, where ``chain``
always takes a triangular solve (so only ``method="auto"`` runs).
"""

from __future__ import annotations

import resolvent

from .common import BACKENDS, DTYPES, Backend, causal_attention, ncd_matrix, pick, rng, skip

GAMMA = 0.99


class Chain:
    params = [
        BACKENDS,
        ["ncd", "causal"],
        ["auto", "direct", "block_jacobi", "two_level"],
        pick([512, 2048], [64]),
        DTYPES,
    ]
    param_names = ["backend", "structure", "method", "n", "dtype"]
    timeout = 180

    def setup(self, backend, structure, method, n, dtype):
        if structure == "causal" and method != "auto":
            skip("chain solves a causal A by a triangular solve whatever the method")
        self.be = Backend(backend)
        gen = rng("chain", structure, n, dtype)
        if structure == "ncd":
            A = ncd_matrix(n, 32, 0.01, gen, dtype)
        else:
            A = causal_attention(n, dtype=dtype)
        V = gen.standard_normal((n, 16)).astype(dtype)
        self.A, self.V = self.be.asarray(A), self.be.asarray(V)
        self.method = method
        # A small call with the same method: skips (NotImplementedError) where the backend lacks it.
        self.be.probe(lambda: resolvent.chain(self.A[:64, :64], self.V[:64], GAMMA, method=method), f"chain {method}")

    def time_chain(self, *params):
        resolvent.chain(self.A, self.V, GAMMA, method=self.method)
        self.be.sync()

    def peakmem_chain(self, *params):
        resolvent.chain(self.A, self.V, GAMMA, method=self.method)
        self.be.sync()
