"""Forward + backward of ``resolvent.torch.chain_attention`` against autograd through PyTorch's dense chain.

float32, batch x heads = 8, n = 4096, d = 64 on the CPU (issue 4's targets: at least 30x faster than
autograd through the dense chain, and the blockwise backward at most 3x its own forward).

Measured, each as the median of several runs in one process:

* ``resolvent blockwise`` forward alone (``torch.no_grad``), and forward + ``backward()``; the
  backward's time is their difference;
* autograd through ``benchmarks/peers.py: torch_dense_chain`` (causal softmax, then
  ``torch.linalg.solve_triangular``), forward + ``backward()``.

The loss is ``(y * dy).sum()`` with a fixed random ``dy``; gradients flow to q, k, v.

Usage: ``python benchmarks/torch_backward.py [--quick] [--n N] [--repeats R]``; prints a markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys

sys.path.insert(0, os.path.dirname(__file__))
from peers import median_time, torch_dense_chain  # noqa: E402

import resolvent  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="n = 1024, for a smoke run")
    parser.add_argument("--n", type=int, default=None, help="sequence length (default 4096)")
    parser.add_argument("--repeats", type=int, default=5, help="runs per median for resolvent (default 5)")
    args = parser.parse_args(argv)

    import torch

    import resolvent.torch as rt

    n = args.n or (1024 if args.quick else 4096)
    B, d, gamma = 8, 64, 0.9
    gen = torch.Generator().manual_seed(0)
    q, k, v, dy = (torch.randn(B, n, d, generator=gen) for _ in range(4))
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]

    def fwd_blockwise():
        with torch.no_grad():
            return rt.chain_attention(q, k, v, gamma)

    def fwd_bwd(fn):
        def run():
            for x in leaves:
                x.grad = None
            (fn(*leaves, gamma) * dy).sum().backward()
        return run

    t_fwd = median_time(fwd_blockwise, repeats=args.repeats)
    t_fb = median_time(fwd_bwd(rt.chain_attention), repeats=args.repeats)
    t_dense = median_time(fwd_bwd(torch_dense_chain), repeats=3)
    t_bwd = t_fb - t_fwd

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"# torch backward: resolvent blockwise vs autograd through dense chain attention — "
          f"{datetime.date.today()}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), resolvent {resolvent.__version__}\n")
    print(f"batch x heads = {B}, n = {n}, d = {d}, float32, gamma = {gamma}, blockwise block size "
          f"{resolvent.default_block_size(n)}; medians of {args.repeats} runs (3 for the dense chain)\n")
    print("| what | time (ms) |")
    print("|---|---:|")
    print(f"| resolvent blockwise forward | {t_fwd * 1e3:.1f} |")
    print(f"| resolvent blockwise backward (forward + backward - forward) | {t_bwd * 1e3:.1f} |")
    print(f"| resolvent blockwise forward + backward | {t_fb * 1e3:.1f} |")
    print(f"| torch dense chain, autograd forward + backward | {t_dense * 1e3:.1f} |")
    print()
    print("| target | measured | goal |")
    print("|---|---:|---:|")
    print(f"| speedup of forward + backward over torch dense autograd | {t_dense / t_fb:.1f}x | >= 30x |")
    print(f"| blockwise backward / its forward | {t_bwd / t_fwd:.2f}x | <= 3x |")
    if load is not None:
        print(f"\nload average while measuring (1, 5, 15 min): {load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f} "
              f"on {os.cpu_count()} cores" + (" — the machine was shared; rerun on a quiet machine for "
                                               "reference numbers" if load[0] > 0.5 * (os.cpu_count() or 1)
                                               else ""))


if __name__ == "__main__":
    main()
