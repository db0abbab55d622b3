"""The scaling report of chain attention: time and peak memory against n, and the block-size sweep.

    python benchmarks/scaling_report.py            # writes docs/performance.md and docs/img/*.png
    python benchmarks/scaling_report.py --quick    # smaller sizes, into benchmarks/.asv/report-quick/

One head, d = 64, float32, gamma = 0.9, standard normal q, k, v from a fixed seed; every method of
``resolvent.chain_attention`` at n = 1024, 2048, ... up to where it stays within memory and a
reasonable time (``dense`` to 8192, ``exact`` to 16384, ``blockwise`` to 65536).  For each point:

- time: the fastest of up to 7 calls (3 when one call takes over 0.2 s, the single call when it
  takes over 2 s), after one warm-up call of every method at a small n so that Numba's compilation
  (or cache load) is not timed; the minimum, not the median, because other work on the machine
  only ever adds time;
- peak memory: ``tracemalloc``'s peak over one further call, which sees every NumPy allocation
  (the inputs, allocated before, are not counted; Numba's per-thread scratch of O(b^2) is not seen).

Threads: one by default (OpenBLAS/MKL through threadpoolctl, and Numba), ``--threads 0`` keeps the
libraries' defaults.  One thread makes the growth in n free of parallel efficiency, and on a shared
machine it avoids the pathology where BLAS threads spin-wait for a core another process holds (seen
on a loaded 2-core machine: ``exact`` at n = 2048 took 34 ms on one thread, 120 ms to 2 s on two).

Exponents are least-squares slopes of log(time) and log(memory) against log(n) over the points with
n >= 4096 (below that, fixed per-call costs flatten the curves); all points are in the table.
Writes three PNGs (matplotlib, Agg) and a markdown page with the numbers, the exponents, the date,
the machine and its load average (a loaded machine makes the times noisy; the page says so).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from peers import growth_exponent  # noqa: E402

import resolvent  # noqa: E402

GAMMA = 0.9
D = 64
DTYPE = np.float32
SEED = 20260101
FIT_FROM = 4096

FULL = {
    "sizes": {
        "dense": [1024, 2048, 4096, 8192],
        "exact": [1024, 2048, 4096, 8192, 16384, 32768],
        "blockwise": [1024, 2048, 4096, 8192, 16384, 32768, 65536],
    },
    "sweep_n": [4096, 16384, 65536],
    "sweep_b": [8, 16, 32, 64, 128, 256, 512],
}
QUICK = {
    "sizes": {
        "dense": [1024, 2048, 4096],
        "exact": [1024, 2048, 4096],
        "blockwise": [1024, 2048, 4096, 8192, 16384],
    },
    "sweep_n": [4096, 16384],
    "sweep_b": [16, 32, 64, 128, 256],
}
SMOKE = {  # for tests/test_benchmarks_smoke.py: seconds, not minutes
    "sizes": {"dense": [128, 256], "exact": [128, 256], "blockwise": [128, 256, 512]},
    "sweep_n": [512],
    "sweep_b": [8, 32],
}
METHODS = ["dense", "exact", "blockwise"]
COLORS = {"dense": "tab:red", "exact": "tab:blue", "blockwise": "tab:green"}


def inputs(n):
    rng = np.random.default_rng([SEED, n])
    return [rng.standard_normal((1, n, D)).astype(DTYPE) for _ in range(3)]


def call(method, q, k, v, block_size=None):
    kw = {"block_size": block_size} if block_size is not None else {}
    return resolvent.chain_attention(q, k, v, GAMMA, method=method, **kw)


def measure_time(fn):
    """Fastest wall time of ``fn()``: 7 calls, 3 when a call takes over 0.2 s, 1 over 2 s."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    if first > 2.0:
        return first
    times = [first]
    for _ in range(2 if first > 0.2 else 6):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.min(times))


def measure_peak(fn):
    """Peak bytes allocated during ``fn()`` (tracemalloc; NumPy reports its buffers to it)."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def fit(ns, values):
    pts = [(n, x) for n, x in zip(ns, values) if n >= FIT_FROM]
    if len(pts) < 2:
        pts = list(zip(ns, values))
    if len(pts) < 2:
        return float("nan"), (ns[0] if ns else 0)
    return growth_exponent([p[0] for p in pts], [p[1] for p in pts]), pts[0][0]


def machine():
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 2**20:.0f} GiB RAM"
                break
    except OSError:
        pass
    threads = ""
    try:
        from threadpoolctl import threadpool_info

        threads = ", ".join(sorted({f"{i['internal_api']} {i['num_threads']} threads" for i in threadpool_info()}))
    except ImportError:
        pass
    try:
        import numba

        threads += f", numba {numba.__version__} {numba.get_num_threads()} threads"
    except ImportError:
        threads += ", numba not installed (NumPy path)"
    import scipy

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "mem": mem,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "versions": f"resolvent {resolvent.__version__}, NumPy {np.__version__}, SciPy {scipy.__version__}",
        "threads": threads.strip(", "),
        "commit": _git("rev-parse", "--short", "HEAD"),
        "dirty": bool(_git("status", "--porcelain", "--untracked-files=no", "resolvent")),
    }


def _git(*args):
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def run(config, progress=True):
    from tqdm import tqdm

    sizes = config["sizes"]
    tasks = [("scale", m, n) for m in METHODS for n in sizes[m]]
    tasks += [("sweep", "blockwise", n, b) for n in config["sweep_n"]
              for b in sorted(set(config["sweep_b"]) | {resolvent.default_block_size(n)}) if b <= n]
    results = {m: {"n": [], "time": [], "peak": [], "block": []} for m in METHODS}
    sweep = {n: [] for n in config["sweep_n"]}
    # Warm up every method at a small n: Numba compiles or loads its cache here, not in a timing.
    q, k, v = inputs(256)
    for m in METHODS:
        call(m, q, k, v)
    bar = tqdm(tasks, desc="scaling report", unit="point", disable=not progress, file=sys.stderr)
    for task in bar:
        if task[0] == "scale":
            _, m, n = task
            bar.set_postfix_str(f"{m} n={n}")
            q, k, v = inputs(n)
            t = measure_time(lambda: call(m, q, k, v))
            peak = measure_peak(lambda: call(m, q, k, v))
            r = results[m]
            r["n"].append(n)
            r["time"].append(t)
            r["peak"].append(peak)
            r["block"].append(resolvent.default_block_size(n) if m == "blockwise" else None)
        else:
            _, m, n, b = task
            bar.set_postfix_str(f"sweep n={n} b={b}")
            q, k, v = inputs(n)
            sweep[n].append((b, measure_time(lambda: call("blockwise", q, k, v, block_size=b))))
        del q, k, v
    bar.close()
    return results, sweep


def plot(results, sweep, img_dir):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for key, ylabel, fname, title in [
        ("time", "time per call (s)", "scaling_time.png", "chain attention: time against n"),
        ("peak", "peak allocated memory (MiB)", "scaling_memory.png", "chain attention: peak memory against n"),
    ]:
        fig, ax = plt.subplots(figsize=(6.4, 4.6), dpi=120)
        for m in METHODS:
            r = results[m]
            if not r["n"]:
                continue
            y = np.array(r[key], dtype=float) / (2**20 if key == "peak" else 1.0)
            slope, start = fit(r["n"], r[key])
            ax.loglog(r["n"], y, "o-", color=COLORS[m], label=f"{m}: exponent {slope:.2f} (n >= {start})")
        guides = [(2.0, "n^2"), (4 / 3, "n^(4/3)")] if key == "time" else [(2.0, "n^2"), (1.0, "n")]
        allx = sorted({n for m in METHODS for n in results[m]["n"]})
        if allx:
            x = np.array([allx[0], allx[-1]], dtype=float)
            ref = results["blockwise"] if results["blockwise"]["n"] else results[METHODS[0]]
            y0 = ref[key][0] / (2**20 if key == "peak" else 1.0)
            for p, lab in guides:
                ax.loglog(x, y0 * 0.5 * (x / x[0]) ** p, ":", color="grey", linewidth=1)
                ax.annotate(lab, (x[-1], y0 * 0.5 * (x[-1] / x[0]) ** p), fontsize=8, color="grey",
                            ha="right", va="bottom")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length n")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title}\none head, d = {D}, float32, gamma = {GAMMA}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
        fig.tight_layout()
        fig.savefig(img_dir / fname)
        plt.close(fig)
        paths[key] = img_dir / fname

    fig, ax = plt.subplots(figsize=(6.4, 4.6), dpi=120)
    for i, (n, pts) in enumerate(sorted(sweep.items())):
        if not pts:
            continue
        bs, ts = zip(*pts)
        line, = ax.loglog(bs, np.array(ts) * 1e3, "o-", label=f"n = {n}")
        b0 = resolvent.default_block_size(n)
        t0 = dict(pts)[b0] * 1e3
        ax.loglog([b0], [t0], "*", markersize=14, color=line.get_color(), markeredgecolor="black",
                  label="default block size" if i == 0 else None)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("block size b")
    ax.set_ylabel("time per call (ms)")
    ax.set_title(f"blockwise: time against block size (star: default_block_size(n))\n"
                 f"one head, d = {D}, float32, gamma = {GAMMA}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(img_dir / "block_size_sweep.png")
    plt.close(fig)
    paths["sweep"] = img_dir / "block_size_sweep.png"
    return paths


def markdown(results, sweep, info, load, elapsed, img_rel, command):
    lines = []
    add = lines.append
    add("# Performance of chain attention on the CPU")
    add("")
    add(f"Time and peak memory of every `chain_attention` method against the sequence length n, one head, "
        f"d = {D}, float32, gamma = {GAMMA}, standard normal q, k, v (seeded), and the block-size sweep of "
        f"`blockwise`. Produced by `{command}` on {info['date']} in {elapsed / 60:.1f} min; "
        "regression tracking per commit is the asv suite in `benchmarks/` (see the README).")
    add("")
    noisy = load[0] >= 0.5
    if noisy:
        add(f"> **Noisy numbers.** Other work was running on this machine while the report ran (1-minute load "
            f"average {load[0]:.2f} at the start, {load[1]:.2f} at the end, on {info['cores']} cores): times "
            "are slower and less regular than on a quiet machine, and the exponents may be off by a "
            "tenth or more. Rerun on a quiet machine for numbers to quote.")
        add("")
    add("## How to rerun")
    add("")
    add("```bash")
    add("pip install -e \".[cpu,bench]\"          # numba, matplotlib, tqdm, threadpoolctl")
    add("python benchmarks/scaling_report.py      # a few minutes, one thread; rewrites this page and docs/img/")
    add("python benchmarks/scaling_report.py --quick --out /tmp/report   # a 1-minute look, smaller n")
    add("```")
    add("")
    add("## Machine")
    add("")
    add(f"- {info['cpu']}, {info['cores']} cores, {info['mem']}; {info['os']}; Python {info['python']}")
    add(f"- {info['versions']}; {info['threads']}")
    add(f"- commit `{info['commit']}`{' with local changes to resolvent/' if info['dirty'] else ''}; "
        f"load average {load[0]:.2f} at the start, {load[1]:.2f} at the end")
    add("")
    add("## Fitted exponents")
    add("")
    add(f"Least-squares slope of log(y) against log(n) over the points with n >= {FIT_FROM}.")
    add("")
    add("| method | time exponent | memory exponent | points fitted | expected |")
    add("|---|---:|---:|---|---|")
    expected = {"dense": "time 2, memory 2 (the n x n matrix)",
                "exact": "time 2, memory 1",
                "blockwise": "time 4/3 (b ~ n^(1/3)), memory 1"}
    for m in METHODS:
        r = results[m]
        if not r["n"]:
            continue
        st, start = fit(r["n"], r["time"])
        sm, _ = fit(r["n"], r["peak"])
        npts = sum(1 for n in r["n"] if n >= start)
        add(f"| {m} | {st:.2f} | {sm:.2f} | n = {start} .. {r['n'][-1]} ({npts}) | {expected[m]} |")
    add("")
    add(f"![time against n]({img_rel}/scaling_time.png)")
    add("")
    add(f"![peak memory against n]({img_rel}/scaling_memory.png)")
    add("")
    add("## Time and peak memory against n")
    add("")
    add(f"Threads: {info['threads']}. Time: fastest of up to 7 calls (3 above 0.2 s, 1 above 2 s). Peak: `tracemalloc`'s peak over one call "
        "(every NumPy allocation, the output included, the inputs not; q, k, v together are 0.75 KiB x n).")
    add("")
    add("| n | blockwise b | " + " | ".join(f"{m} time (ms)" for m in METHODS) + " | "
        + " | ".join(f"{m} peak (MiB)" for m in METHODS) + " |")
    add("|---:|---:|" + "---:|" * (2 * len(METHODS)))
    all_n = sorted({n for m in METHODS for n in results[m]["n"]})
    for n in all_n:
        row = [str(n), str(resolvent.default_block_size(n))]
        cells_t, cells_m = [], []
        for m in METHODS:
            r = results[m]
            if n in r["n"]:
                i = r["n"].index(n)
                cells_t.append(f"{r['time'][i] * 1e3:.1f}")
                cells_m.append(f"{r['peak'][i] / 2**20:.1f}")
            else:
                cells_t.append("")
                cells_m.append("")
        add("| " + " | ".join(row + cells_t + cells_m) + " |")
    add("")
    add("An empty cell was not run: `dense` stops at n = 8192 (its n x n float32 buffers grow by 4 x per doubling; "
        "n = 65536 would need over 16 GiB), `exact` at n = 32768 (each doubling of n costs about 4 x; "
        "`--max-exact 65536` extends it).")
    add("")
    add("## Block-size sweep")
    add("")
    add("`blockwise` time against its block size b; **bold** is `default_block_size(n)` "
        "(b = 4 n^(1/3) rounded to a multiple of 8).")
    add("")
    add(f"![blockwise time against block size]({img_rel}/block_size_sweep.png)")
    add("")
    bs_all = sorted({b for pts in sweep.values() for b, _ in pts})
    add("| n | " + " | ".join(f"b = {b}" for b in bs_all) + " | fastest b | default / fastest |")
    add("|---:|" + "---:|" * (len(bs_all) + 2))
    for n, pts in sorted(sweep.items()):
        if not pts:
            continue
        d = dict(pts)
        b0 = resolvent.default_block_size(n)
        cells = []
        for b in bs_all:
            if b not in d:
                cells.append("")
            elif b == b0:
                cells.append(f"**{d[b] * 1e3:.1f}**")
            else:
                cells.append(f"{d[b] * 1e3:.1f}")
        best = min(d, key=d.get)
        add(f"| {n} | " + " | ".join(cells) + f" | {best} | {d[b0] / d[best]:.2f} |")
    add("")
    add("Times in ms. A small b makes the m x m reduced system (m = n / b) dominate, a large b the within-block "
        "work O(n b d). The last column is how much slower the default is than the fastest b of this run, on "
        "this machine and thread count; the default's constant is tuned per backend (SPEC 2.2).")
    add("")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes (about a minute)")
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # tests only: tiny sizes
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for performance.md and img/ (default: docs/, or "
                             "benchmarks/.asv/report-quick/ with --quick)")
    parser.add_argument("--max-exact", type=int, default=None, help="largest n for method='exact'")
    parser.add_argument("--threads", type=int, default=1,
                        help="BLAS and Numba threads (default 1; 0 keeps the libraries' defaults)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.threads:
        from threadpoolctl import threadpool_limits

        threadpool_limits(args.threads)
        try:
            import numba

            numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
        except ImportError:
            pass
    config = SMOKE if args.smoke else QUICK if args.quick else FULL
    config = {k: (dict(v) if isinstance(v, dict) else v) for k, v in config.items()}
    if args.max_exact:
        config["sizes"]["exact"] = [n for n in [2**p for p in range(10, 17)] if n <= args.max_exact]
    out = args.out or (HERE / ".asv" / "report-quick" if (args.quick or args.smoke) else ROOT / "docs")
    out.mkdir(parents=True, exist_ok=True)

    info = machine()
    info["date"] = datetime.date.today().isoformat()
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    results, sweep = run(config, progress=not args.no_progress)
    elapsed = time.perf_counter() - t0
    load1 = os.getloadavg()[0]
    plot(results, sweep, out / "img")
    command = "python benchmarks/scaling_report.py" + (" --quick" if args.quick else "") + (
        " --smoke" if args.smoke else "") + (
        f" --max-exact {args.max_exact}" if args.max_exact else "") + (
        f" --threads {args.threads}" if args.threads != 1 else "")
    text = markdown(results, sweep, info, (load0, load1), elapsed, "img", command)
    (out / "performance.md").write_text(text)
    print(f"wrote {out / 'performance.md'} and {out / 'img'}/*.png in {elapsed:.0f} s", file=sys.stderr)
    return results, sweep


if __name__ == "__main__":
    main()
