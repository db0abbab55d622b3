"""Scaling of block-sparse links (SPEC 2.3) on the CPU, against exact and against PyTorch's dense chain.

CPU, float32, d = dv = 64, batch x heads = 2 x 4.  Times ``chain_attention(method="blockwise", topk=k)``
for k in {0, 1, 2, 4} (default block size) and ``method="exact"`` over n, the backward pass
``chain_attention_vjp(..., topk=2, y=Y)`` (given the forward's output, as the torch and JAX adapters
call it), fits the log-log growth exponent of each, and times PyTorch's dense chain attention (softmax with causal mask, then
``torch.linalg.solve_triangular(I - gamma A, A V, upper=False)``, times ``1 - gamma``) at n = 4096.
``--sweep`` first times topk > 0 over block sizes ``b = C sqrt(n)`` to choose ``C_TOPK``.

Run from the repository root:  python3 benchmarks/topk_scaling.py [--sweep] [--reps R] [--out FILE]
Prints markdown; ``--out`` also writes it (``benchmarks/results/topk_scaling.md``).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np

import resolvent
from resolvent.attention import _api

B, H, D = 2, 4, 64
GAMMA = 0.9
TOPKS = (0, 1, 2, 4)
BWD_TOPK = 2
BWD = f"topk={BWD_TOPK} backward"
REPS = None  # --reps: a fixed number of repetitions instead of reps_for's 3-7


def inputs(n, seed=0):
    rng = np.random.default_rng(seed)
    q, k, v = rng.standard_normal((3, B, H, n, D), dtype=np.float32)
    return q, k, v


def cotangent(n, seed=1):
    return np.random.default_rng(seed).standard_normal((B, H, n, D), dtype=np.float32)


def median_time(fn, reps, clock=time.perf_counter):
    fn()  # warm-up (caches, thread pools, lazy imports)
    ts = []
    for _ in range(reps):
        t0 = clock()
        fn()
        ts.append(clock() - t0)
    return statistics.median(ts)


def reps_for(seconds):
    """Fewer repetitions for the slow cases, at least 3 (``--reps`` fixes the number)."""
    if REPS is not None:
        return REPS
    return max(3, min(7, int(5.0 / max(seconds, 1e-3))))


def timed(fn, clock=time.perf_counter):
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    return median_time(fn, reps_for(first), clock)


def round_topk(x):
    """A topk block size as the library rounds it (``_api.topk_block``: a power of two, at least 16)."""
    return _api.topk_block(x)


def torch_dense(n, reps=3):
    import torch

    q, k, v = (torch.from_numpy(x) for x in inputs(n))
    mask = torch.ones(n, n, dtype=torch.bool).tril()
    eye = torch.eye(n)

    def run():
        with torch.no_grad():
            s = (q @ k.transpose(-1, -2)) / math.sqrt(D)
            a = torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1)
            x = torch.linalg.solve_triangular(eye - GAMMA * a, a @ v, upper=False)
            return (1 - GAMMA) * x

    nt = torch.get_num_threads()
    t_default = median_time(run, reps)
    torch.set_num_threads(1)
    try:
        t_one = median_time(run, reps)
    finally:
        torch.set_num_threads(nt)
    return t_default, t_one, torch.__version__, nt


def cpu_name():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or platform.machine()


def sweep(ns, cs, topks):
    """Time topk > 0 over b = C sqrt(n); returns markdown lines and the chosen C."""
    lines = [
        "## Block-size sweep for topk > 0 (b = C_TOPK sqrt(n), rounded to a power of two as the library does)",
        "",
        "Median CPU time of the process in ms (all threads; less sensitive than wall time to other",
        "users of the machine), with the block size and, last, the time over the best C of that row.",
        "",
        "| n | topk | " + " | ".join(f"C={c:g}" for c in cs) + " |",
        "|---|---|" + "---|" * len(cs),
    ]
    ratios = {c: [] for c in cs}
    for n in ns:
        q, k, v = inputs(n)
        for topk in topks:
            row = {}
            seen = {}
            for c in cs:
                b = min(round_topk(c * math.sqrt(n)), n)
                if b not in seen:
                    seen[b] = timed(
                        lambda: resolvent.chain_attention(q, k, v, GAMMA, method="blockwise", block_size=b, topk=topk),
                        clock=time.process_time,
                    )
                row[c] = (b, seen[b])
            best = min(t for _, t in row.values())
            for c in cs:
                ratios[c].append(row[c][1] / best)
            cells = [f"{t * 1e3:.0f} (b={b}, {t / best:.2f})" for b, t in (row[c] for c in cs)]
            lines.append(f"| {n} | {topk} | " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
    geo = {c: math.exp(statistics.fmean(math.log(r) for r in ratios[c])) for c in cs}
    chosen = min(geo, key=geo.get)
    lines += [
        "",
        "Geometric mean of (time / best time) over all rows: "
        + ", ".join(f"C={c:g}: {geo[c]:.3f}" for c in cs)
        + f".  Chosen: **C_TOPK = {chosen:g}**.",
        "",
    ]
    return lines, chosen


def scaling(ns, exact_max_n):
    cols = [f"topk={k}" for k in TOPKS] + ["exact", BWD]
    times = {c: {} for c in cols}
    blocks = {k: {} for k in TOPKS}
    for n in ns:
        q, k, v = inputs(n)
        for topk in TOPKS:
            b = _api.default_block_size(n, topk=topk)
            blocks[topk][n] = b
            times[f"topk={topk}"][n] = timed(
                lambda: resolvent.chain_attention(q, k, v, GAMMA, method="blockwise", topk=topk)
            )
        y = resolvent.chain_attention(q, k, v, GAMMA, method="blockwise", topk=BWD_TOPK)
        dy = cotangent(n)
        times[BWD][n] = timed(
            lambda: resolvent.chain_attention_vjp(q, k, v, GAMMA, dy, method="blockwise", topk=BWD_TOPK, y=y,
                                                  return_dgamma=True)
        )
        if n <= exact_max_n:
            t0 = time.perf_counter()
            resolvent.chain_attention(q, k, v, GAMMA, method="exact")
            first = time.perf_counter() - t0
            reps = 1 if first > 20 else (3 if REPS is None else REPS)
            times["exact"][n] = median_time(lambda: resolvent.chain_attention(q, k, v, GAMMA, method="exact"), reps) if reps > 1 else first
        print(n, {c: f"{times[c].get(n, float('nan')) * 1e3:.1f}" for c in cols}, flush=True)
    return cols, times, blocks


def _topk_path():
    """Which forward pass topk > 0 ran (the fused Numba kernel when Numba imports)."""
    from resolvent.attention import _topk

    if _topk.use_numba():
        import numba

        return (f"topk > 0 ran the fused Numba kernels (Numba {numba.__version__}; the forward on "
                f"{numba.get_num_threads()} Numba threads, the backward on a thread pool, both over the batch).")
    return "topk > 0 ran the NumPy path (no Numba), the batch split over the cores."


def earlier_sweep(path):
    """The block-size sweep section of an earlier results file, marked as copied."""
    with open(path) as f:
        text = f.read()
    head = "## Block-size sweep"
    if head not in text:
        return []
    sec = text[text.index(head):]
    nxt = sec.find("\n## ", 1)
    sec = sec[: nxt if nxt >= 0 else len(sec)].rstrip("\n").splitlines()
    body = [line for line in sec[1:] if not line.startswith(("(Copied from an earlier run", "(`C_TOPK` set to"))]
    while len(body) > 1 and body[0] == body[1] == "":
        body.pop(0)
    return [sec[0], "", f"(Copied from an earlier run's `{path}`; this run did not repeat the sweep.)"] + body + [""]


def exponent(series):
    ns = sorted(series)
    if len(ns) < 2:
        return float("nan")
    return float(np.polyfit(np.log(ns), np.log([series[n] for n in ns]), 1)[0])


def main():
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        threadpool_limits = None
    if threadpool_limits is None:
        return _main(blas_note="default BLAS threads (threadpoolctl not installed)")
    with threadpool_limits(1, user_api="blas"):
        return _main(blas_note="BLAS limited to 1 thread for every resolvent method")


def _main(blas_note):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ns", default="1024,2048,4096,8192,16384")
    ap.add_argument("--exact-max-n", type=int, default=16384)
    ap.add_argument("--sweep", action="store_true", help="time block sizes b = C sqrt(n) first")
    ap.add_argument("--sweep-ns", default="1024,4096,16384")
    ap.add_argument("--sweep-cs", default="0.5,0.75,1,1.5,2,3")
    ap.add_argument("--c-topk", type=float, default=None, help="override _api.C_TOPK for this run")
    ap.add_argument("--sweep-from", default=None, metavar="FILE",
                    help="without --sweep: copy the sweep section of an earlier results file, marked as such")
    ap.add_argument("--reps", type=int, default=None, help="repetitions per timing (default: 3-7 by duration)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    ns = [int(x) for x in args.ns.split(",")]
    global REPS
    REPS = args.reps
    reps_note = "median of 3-7 runs" if REPS is None else f"median of {REPS} run{'s' * (REPS != 1)}"

    lines = [
        "# Block-sparse links (topk) on the CPU: scaling in n",
        "",
        f"`python3 benchmarks/topk_scaling.py{''.join(' ' + a for a in sys.argv[1:])}`: float32, d = dv = {D}, "
        f"batch x heads = {B} x {H}, gamma = {GAMMA}, {reps_note} after a warm-up.",
        f"CPU: {cpu_name()}, {os.cpu_count()} cores; NumPy {np.__version__}; load average at start "
        f"{os.getloadavg()[0]:.2f}.",
        "",
        f"Threads: {blas_note} (topk > 0 does that itself).  {_topk_path()} With",
        "OpenBLAS's default 2 threads on this shared machine the many small products of the block loops",
        "stall: at n = 4096, exact took 46 s instead of 1.2 s and topk=0 1.4 s instead of 0.07 s.",
        "PyTorch runs with its default threads and, for reference, with one.",
        "",
    ]
    start_load = os.getloadavg()[0]
    if args.sweep:
        sw, chosen = sweep(
            [int(x) for x in args.sweep_ns.split(",")], [float(x) for x in args.sweep_cs.split(",")], (1, 2, 4)
        )
        lines += sw
        if args.c_topk is None:
            args.c_topk = chosen
    elif args.sweep_from:
        lines += earlier_sweep(args.sweep_from)
    if args.c_topk is not None and args.c_topk != _api.C_TOPK:
        lines += [f"(`C_TOPK` set to {args.c_topk:g} for this run; the library's constant was {_api.C_TOPK:g}.)", ""]
        _api.C_TOPK = args.c_topk
    lines += [
        f"## Time in ms (default block size; C_TOPK = {_api.C_TOPK:g}, C_POOLED = {_api.C_POOLED:g})",
        "",
    ]
    cols, times, blocks = scaling(ns, args.exact_max_n)
    lines.append("| n | " + " | ".join(cols) + " | topk=1 / topk=0 | topk=2 / topk=0 | topk=4 / topk=0 "
                 f"| backward / forward (topk={BWD_TOPK}) |")
    lines.append("|---|" + "---|" * (len(cols) + 4))
    for n in ns:
        cells = []
        for c in cols:
            t = times[c].get(n)
            cells.append("-" if t is None else f"{t * 1e3:.1f}")
        t0 = times["topk=0"][n]
        rat = [f"{times[f'topk={k}'][n] / t0:.2f}" for k in (1, 2, 4)]
        rat.append(f"{times[BWD][n] / times[f'topk={BWD_TOPK}'][n]:.2f}")
        lines.append(f"| {n} | " + " | ".join(cells) + " | " + " | ".join(rat) + " |")
    lines.append("| exponent | " + " | ".join(f"{exponent(times[c]):.2f}" for c in cols) + " | | | | |")
    lines += [
        "",
        f"`{BWD}`: `chain_attention_vjp(q, k, v, gamma, dy, topk={BWD_TOPK}, y=Y, return_dgamma=True)`, given",
        "the forward's output as the torch and JAX adapters call it (it recomputes the selection and the",
        "row normalisers, then solves the transposed system by block backward substitution); its growth",
        "exponent must stay at most 1.6 like the forward's.",
        "",
        "Block sizes used: "
        + "; ".join(f"topk={k}: " + ", ".join(f"{blocks[k][n]}" for n in ns) for k in TOPKS)
        + f" (n = {', '.join(map(str, ns))}).",
        "",
    ]
    if 4096 in times["topk=2"]:
        try:
            t_torch, t_torch1, tv, nt = torch_dense(4096, reps=REPS or 3)
        except ImportError:
            lines.append("PyTorch is not installed: no dense comparison.")
        else:
            t2 = times["topk=2"][4096]
            lines += [
                "## Against PyTorch's dense chain attention at n = 4096",
                "",
                f"PyTorch {tv} ({nt} threads): softmax with causal mask, "
                "`solve_triangular(I - gamma A, A V, upper=False)`, times 1 - gamma: "
                f"**{t_torch * 1e3:.0f} ms** ({t_torch1 * 1e3:.0f} ms on 1 thread).  blockwise topk=2: "
                f"**{t2 * 1e3:.1f} ms**, **{t_torch / t2:.1f}x** faster ({t_torch1 / t2:.1f}x against 1 thread).",
                "",
            ]
    lines += [
        f"Load average (1 min) at start {start_load:.2f}, at end {os.getloadavg()[0]:.2f}: other users of "
        "this 2-core machine share it while it runs; the times are medians, the sweep uses CPU time.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
