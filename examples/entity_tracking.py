"""Variable tracking with one chain-attention layer: dense, pooled blockwise and block-sparse links.

The task (entity tracking): a sequence of assignments ``x_a = x_b`` or ``x_a = <value>`` holds several
interleaved chains; the last token asks ``ANS = x``, and the model must output the value at the end
of ``x``'s chain, ``hops`` assignments back. Each token is one assignment; one chain-attention layer follows the chain in a single layer because
``Y = (1 - gamma) (A + gamma A^2 + ...) V`` sums every path: each token's query points at the
assignment that defined its right-hand side, and the value's own token attends to itself, so the
path from the question ends there.

Run: ``python examples/entity_tracking.py [--quick]``. Prints the test accuracy of each variant.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

torch.set_num_threads(1)  # the problems are tiny: threads cost more than they give
from torch import nn

from resolvent.torch import chain_attention


def make_batch(batch, n_chains, hops, n_vars, n_vals, rng, *, deepest=True):
    """Token ids (lhs, rhs) of shape (batch, n) with n = n_chains * hops + 1, and the answers.

    The question asks for the last variable of a chain (``deepest``, ``hops`` assignments from the
    value: the test) or for a variable at a random depth (training: the short chains teach the
    pointer structure that the long ones need, which plain training on 8 hops finds very slowly).
    """
    n = n_chains * hops + 1
    ANS, first_val = n_vars, n_vars + 1  # lhs id of the question; rhs ids >= first_val are values
    lhs = np.empty((batch, n), dtype=np.int64)
    rhs = np.empty((batch, n), dtype=np.int64)
    answers = np.empty(batch, dtype=np.int64)
    for i in range(batch):
        names = rng.permutation(n_vars)[: n_chains * hops].reshape(n_chains, hops)
        values = rng.integers(0, n_vals, n_chains)
        # interleave the chains at random, each in its own order
        order = rng.permutation(np.repeat(np.arange(n_chains), hops))
        step = np.zeros(n_chains, dtype=np.int64)
        for t, c in enumerate(order):
            j = step[c]
            lhs[i, t] = names[c, j]
            rhs[i, t] = first_val + values[c] if j == 0 else names[c, j - 1]
            step[c] += 1
        c = rng.integers(n_chains)
        depth = hops - 1 if deepest else rng.integers(hops)
        lhs[i, -1], rhs[i, -1] = ANS, names[c, depth]
        answers[i] = values[c]
    return torch.from_numpy(lhs), torch.from_numpy(rhs), torch.from_numpy(answers)


class Tracker(nn.Module):
    """One chain-attention layer (single head) between embeddings and a linear read-out.

    The projections are embedding tables, so that what the layer must learn is only the pointer
    structure: a token's query is its right-hand side (``q_t = Q[rhs_t]``), a key is the variable
    the token defines (``k_s = K[lhs_s] + K'[rhs_s]``: the second table lets a value's token match
    itself, where a chain ends), and the value carries the right-hand side (``v_s = V[rhs_s]``).
    """

    def __init__(self, n_vars, n_vals, dim, **attention):
        super().__init__()
        n_rhs = n_vars + 1 + n_vals
        self.q = nn.Embedding(n_rhs, dim)
        self.k_lhs = nn.Embedding(n_vars + 1, dim)
        self.k_rhs = nn.Embedding(n_rhs, dim)
        self.v = nn.Embedding(n_rhs, dim)
        self.out = nn.Linear(dim, n_vals)
        self.gamma_logit = nn.Parameter(torch.tensor(2.0))  # gamma = sigmoid(.) ~ 0.88 at the start
        self.attention = attention

    def forward(self, lhs, rhs):
        gamma = torch.sigmoid(self.gamma_logit) * 0.999
        q = self.q(rhs)
        k = self.k_lhs(lhs) + self.k_rhs(rhs)
        y = chain_attention(q, k, self.v(rhs), gamma, **self.attention)
        return self.out(y[:, -1])


def train(variant, attention, *, n_chains, hops, steps, batch, seed, n_vars=128, n_vals=16, dim=64):
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = Tracker(n_vars, n_vals, dim, **attention).double()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    t0 = time.perf_counter()
    for _ in range(steps):
        lhs, rhs, ans = make_batch(batch, n_chains, hops, n_vars, n_vals, rng, deepest=False)
        loss = nn.functional.cross_entropy(model(lhs, rhs), ans)
        opt.zero_grad()
        loss.backward()
        opt.step()
    test_rng = np.random.default_rng(10_000 + seed)
    with torch.no_grad():
        lhs, rhs, ans = make_batch(2000, n_chains, hops, n_vars, n_vals, test_rng)
        acc = (model(lhs, rhs).argmax(-1) == ans).double().mean().item()
    return acc, time.perf_counter() - t0, torch.sigmoid(model.gamma_logit).item()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few hundred steps only")
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args(argv)
    steps = args.steps or (300 if args.quick else 1500)
    hops = 9  # the question plus 8 hops back to the value
    setups = [
        (64, 7, [("dense", dict(method="dense")),
                 ("pooled, b = 8", dict(method="blockwise", block_size=8)),
                 ("links, b = 8, k = 2", dict(method="blockwise", block_size=8, topk=2))]),
        (128, 14, [("dense", dict(method="dense")),
                   ("pooled, b = 8", dict(method="blockwise", block_size=8)),
                   ("links, b = 8, k = 4", dict(method="blockwise", block_size=8, topk=4))]),
    ]
    print(f"variable tracking, {hops - 1} hops, one chain-attention layer, {steps} Adam steps of 64\n")
    print("| n | attention | test accuracy | learned gamma | train time (s) |")
    print("|---:|---|---:|---:|---:|")
    for n, chains, variants in setups:
        for name, attention in variants:
            acc, secs, gamma = train(name, attention, n_chains=chains, hops=hops, steps=steps, batch=64, seed=0)
            print(f"| {n} | {name} | {acc:.1%} | {gamma:.3f} | {secs:.0f} |", flush=True)


if __name__ == "__main__":
    main()
