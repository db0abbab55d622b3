"""The GPU backend on a real device: correctness, sanitizers, timings (one script, one device call).

Run from the repository root, no install needed::

    PYTHONPATH=. python3 benchmarks/gpu_bench.py [--out DIR] [--quick]

1. prints the GPU and driver; 2. checks every method (forward and backward; dense, exact,
blockwise) against the float64 CPU result at small sizes (relative 1e-4 in float32); 3. runs
``compute-sanitizer`` (memcheck, racecheck) over a small invocation of the kernels; 4. runs
``tests/test_gpu_cupy.py``; 5. times with CUDA events (median of many runs after warm-up) at d = 64,
float32: blockwise forward and backward, exact forward, PyTorch's dense chain attention (softmax then
``torch.linalg.solve_triangular``) and ``scaled_dot_product_attention`` in float32 and bfloat16, with
the floor of each shape (bytes over the measured copy bandwidth, flops over the measured float32
matmul rate).  Writes the markdown report to ``DIR/gpu_h200_<date>.md`` (``$OUT`` by default).

``--float32-blockwise``: a short call for a change to the float32 blockwise kernels when device time
is short: correctness of float32 ``blockwise`` only, at block sizes 32 and 64 (the target shapes'
kernels, with partial last blocks), and timings without ``exact`` and PyTorch's dense chain.

``--sanitize-target`` is the small invocation the sanitizers run (internal).
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import subprocess
import sys
import time
import traceback

import numpy as np

os.environ.setdefault("NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS", "0")  # this script only: quiet small grids
SHAPES = [(64, 1024), (64, 4096), (16, 8192), (4, 16384), (1, 65536)]
D = 64
LINES: list[str] = []


def say(s=""):
    print(s, flush=True)
    LINES.append(s)


def section(title):
    say("")
    say(f"## {title}")
    say("")


def gpu_info():
    section("Device")
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm",
                              "--format=csv"], capture_output=True, text=True, timeout=60).stdout
        for ln in out.strip().splitlines():
            say(f"    {ln}")
    except Exception as exc:  # pragma: no cover - device only
        say(f"nvidia-smi failed: {exc}")
    import cupy
    import numba
    import torch

    say(f"- cupy {cupy.__version__}, numba {numba.__version__}, torch {torch.__version__}, "
        f"numpy {np.__version__}, python {sys.version.split()[0]}")
    say(f"- compute-sanitizer: {shutil.which('compute-sanitizer')}")


def rel(a, b):
    import cupy

    a = cupy.asnumpy(a).astype(np.float64)
    b = np.asarray(b, dtype=np.float64)
    if not np.all(np.isfinite(a)):
        return float("inf")
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def correctness(f32_blockwise=False):
    section("Correctness against the float64 CPU result (relative Frobenius error)")
    import cupy

    import resolvent

    rng = np.random.default_rng(7)
    say("| method | shape (B, n, d) | block | fwd f32 | bwd f32 (max of dq, dk, dv) | fwd f64 | bwd f64 | ok |")
    say("|---|---|---|---|---|---|---|---|")
    all_ok = True
    cases = [("dense", 2, 300, 64, None), ("exact", 2, 600, 64, None), ("blockwise", 3, 1000, 64, None),
             ("blockwise", 2, 700, 32, 40), ("blockwise", 1, 4500, 64, 64), ("blockwise", 2, 260, 16, 100),
             ("blockwise", 2, 5000, 64, 8)]  # the last: m = 625, ten chained blocks in the reduced system
    dtypes = ((np.float32, 1e-4), (np.float64, 1e-10))
    if f32_blockwise:  # the target shapes' kernels (b = 32, 64; d = dv = 64), partial last blocks
        cases = [("blockwise", 3, 1000, 64, 32), ("blockwise", 2, 999, 64, 64), ("blockwise", 1, 4500, 64, 64)]
        dtypes = dtypes[:1]
    for method, B, n, d, b in cases:
        q, k, v = rng.standard_normal((3, B, n, d))
        dy = rng.standard_normal((B, n, d))
        gam = rng.uniform(0.5, 0.95, B)
        kw = dict(method=method, block_size=b)
        y_ref = resolvent.chain_attention(q, k, v, gam, **kw)
        g_ref = resolvent.chain_attention_vjp(q, k, v, gam, dy, **kw)
        row = []
        for dt, tol in dtypes:
            qc, kc, vc, dyc = (cupy.asarray(x.astype(dt)) for x in (q, k, v, dy))
            gc = cupy.asarray(gam.astype(dt))
            y = resolvent.chain_attention(qc, kc, vc, gc, **kw)
            gr = resolvent.chain_attention_vjp(qc, kc, vc, gc, dyc, **kw)
            ef = rel(y, y_ref)
            eb = max(rel(a, r) for a, r in zip(gr, g_ref))
            ok = ef <= tol and eb <= tol and isinstance(y, cupy.ndarray)
            all_ok &= ok
            row.append((ef, eb, ok))
        row += [(float("nan"), float("nan"), True)] * (2 - len(row))  # float64 not run
        say(f"| {method} | ({B}, {n}, {d}) | {b or 'default'} | {row[0][0]:.1e} | {row[0][1]:.1e} | "
            f"{row[1][0]:.1e} | {row[1][1]:.1e} | {'yes' if row[0][2] and row[1][2] else 'NO'} |")
    say("")
    say(f"All within 1e-4 (float32) and 1e-10 (float64): {'yes' if all_ok else 'NO'}")
    return all_ok


def run_pytest():
    section("tests/test_gpu_cupy.py")
    p = subprocess.run([sys.executable, "-m", "pytest", "tests/test_gpu_cupy.py", "-q", "-p", "no:cacheprovider"],
                       capture_output=True, text=True, timeout=400)
    tail = (p.stdout + p.stderr).strip().splitlines()[-15:]
    for ln in tail:
        say(f"    {ln}")
    return p.returncode == 0


def sanitize_target():
    import cupy

    import resolvent

    rng = np.random.default_rng(1)
    for B, n, d, b in ((2, 200, 64, 64), (1, 4200, 64, 64), (2, 90, 48, 24)):
        q, k, v, dy = (cupy.asarray(x) for x in rng.standard_normal((4, B, n, d)).astype(np.float32))
        y = resolvent.chain_attention(q, k, v, 0.9, block_size=b)
        resolvent.chain_attention_vjp(q, k, v, 0.9, dy, block_size=b, y=y)
    cupy.cuda.Device().synchronize()
    print("sanitize target done")


def start_sanitizers():
    """Start memcheck and racecheck over :func:`sanitize_target`, side by side (each spends most
    of its ~2 minutes compiling on the host); :func:`run_sanitizers` collects them."""
    cs = shutil.which("compute-sanitizer")
    if cs is None:
        return None
    procs = {}
    for tool in ("memcheck", "racecheck"):
        # --report-api-errors no: CuPy's and numba's CUDA bindings look driver entry points up with
        # cuGetProcAddress, and the lookups that fail by design (a symbol this driver does not
        # have) would count as errors (34 of them, none from a kernel); NVIDIA's cuda-python runs
        # its own sanitizer CI with the same setting (cuda-python PR #687).
        procs[tool] = (time.time(), subprocess.Popen(
            [cs, "--tool", tool, "--report-api-errors", "no", "--error-exitcode", "9", sys.executable,
             __file__, "--sanitize-target"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=dict(os.environ, NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS="0")))
    return procs


def run_sanitizers(procs=None):
    section("compute-sanitizer")
    procs = procs if procs is not None else start_sanitizers()
    if procs is None:
        say("compute-sanitizer not found")
        return False
    ok = True
    for tool, (t0, p) in procs.items():
        try:
            out, _ = p.communicate(timeout=max(1, int(os.environ.get("SANITIZE_TIMEOUT", 240)) - (time.time() - t0)))
        except subprocess.TimeoutExpired:
            p.kill()
            ok = False
            say(f"- {tool}: timed out after {time.time() - t0:.0f} s")
            continue
        text = out.strip().splitlines()
        summary = [ln for ln in text if ln.startswith("=========") and "Host Frame" not in ln
                   and "backtrace" not in ln and ln.strip("= ")][:8]
        done = any("sanitize target done" in ln for ln in text)
        good = p.returncode == 0 and done
        ok &= good
        say(f"- {tool}: exit {p.returncode}, target finished: {done}, {time.time() - t0:.0f} s since its start")
        for ln in summary:
            say(f"    {ln}")
        if not good:
            for ln in text[-12:]:
                say(f"    {ln}")
    return ok


def time_events(fn, *, warmup=3, reps=30, budget_s=3.0, torch_mode=False):
    """Median time in ms of ``fn()`` by CUDA events, on the current stream."""
    if torch_mode:
        import torch

        for _ in range(warmup):
            fn()
        torch.cuda.synchronize()
        times = []
        t_end = time.time() + budget_s
        while len(times) < reps and (time.time() < t_end or len(times) < 3):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        return float(np.median(times))
    import cupy

    for _ in range(warmup):
        fn()
    cupy.cuda.Device().synchronize()
    times = []
    t_end = time.time() + budget_s
    while len(times) < reps and (time.time() < t_end or len(times) < 3):
        a, b = cupy.cuda.Event(), cupy.cuda.Event()
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(cupy.cuda.get_elapsed_time(a, b))
    return float(np.median(times))


def time_graph(fn, **kw):
    """Median ms of replaying ``fn`` captured as a CUDA graph: the device time without Python's launch
    overhead (``nan`` when capture fails: CuPy 14 refuses cuBLAS calls during capture, so only the
    stages without a matmul, the numba kernels, are measured this way)."""
    import cupy

    st = cupy.cuda.Stream(non_blocking=True)
    try:
        with st:
            fn()
            fn()
            st.synchronize()
            st.begin_capture()
            fn()
            graph = st.end_capture()
            return time_events(lambda: graph.launch(stream=st), **kw)
    except Exception as exc:
        say(f"graph capture failed: {exc!r}")
        return float("nan")


def breakdown(B, n, backward=False):
    """Device time of each launch of the float32 blockwise forward (or backward), CUDA-graph replay
    of each alone, on the buffers and launches of ``_fused._layout`` (``_backward_layout``): what
    ``chain_attention`` (``chain_attention_vjp``) runs."""
    import cupy

    import resolvent
    from resolvent._gpu import _api as gapi
    from resolvent._gpu import _fused as F
    from resolvent._gpu import _kernels as K

    rng = np.random.default_rng(3)
    q, k, v, dy = (cupy.asarray(rng.standard_normal((B, n, D), dtype=np.float32)) for _ in range(4))
    b = gapi.gpu_block_size(n)
    dt = q.dtype
    bufs, outputs, launches = (F._backward_layout if backward else F._layout)(B, n, D, D, b, None, dt)
    env = {name: cupy.zeros(shape, dtype=np.int32) if name in F.INT32 else cupy.empty(shape, dtype=dt)
           for name, shape in {**bufs, **outputs}.items()}
    env.update(q=q, k=k, v=v, gamma=cupy.full(B, 0.9, dtype=dt), scale=np.float32(0.125), n=n, dy=dy,
               y=resolvent.chain_attention(q, k, v, 0.9))
    env.update({nm: env[F._source(nm)].reshape(-1) for *_, names in launches for nm in names if nm not in env})

    def stage(kern, grid, nthr, names):
        reduced = "reduced" in kern.py_func.__qualname__

        def run():
            if reduced:  # the reduced system's ticket counter and flags
                env[names[-1]][3:] = 0
            K._launch(kern, grid, nthr, None, tuple(env[nm] for nm in names))
        return run

    stages = {kern.py_func.__qualname__.split(".")[0].strip("_"): stage(kern, grid, nthr, names)
              for kern, grid, nthr, names in launches}
    for fn in stages.values():  # in order: every stage's inputs are written once
        fn()
    m = -(-n // b)
    say(f"Stage breakdown of the blockwise {'backward' if backward else 'forward'} at {(B, n)}, b = {b}, m = {m} "
        "(graph replay, ms; the reduced system's includes a memset):")
    for name, fn in stages.items():
        say(f"- {name}: {time_graph(fn):.3f}")
    say("")


def ceilings():
    import cupy

    x = cupy.empty(1 << 29, dtype=cupy.float32)  # 2 GiB
    x[...] = 1
    y = cupy.empty_like(x)
    t = time_events(lambda: cupy.copyto(y, x), reps=20)
    bw = 2 * x.nbytes / (t * 1e-3)
    a = cupy.random.standard_normal((8192, 8192), dtype=cupy.float32)
    bm = cupy.random.standard_normal((8192, 8192), dtype=cupy.float32)
    tm = time_events(lambda: a @ bm, reps=10)
    rate = 2 * 8192**3 / (tm * 1e-3)
    del x, y, a, bm
    cupy.get_default_memory_pool().free_all_blocks()
    return bw, rate


def timings(quick=False, shapes=None, f32_blockwise=False):
    section("Timings (d = 64, float32 unless noted; median ms by CUDA events)")
    import cupy
    import torch
    import torch.nn.functional as F

    import resolvent
    from resolvent._gpu import _api as gapi
    from resolvent._gpu import _blockwise as GB
    from resolvent._gpu import _fused as F32

    bw, rate = ceilings()
    say(f"Measured ceilings: device copy {bw / 1e12:.2f} TB/s (read + write), float32 matmul "
        f"(cuBLAS via CuPy, 8192^3) {rate / 1e12:.1f} TFLOP/s")
    say("")
    rows = []
    shapes = shapes or (SHAPES[:2] if quick else SHAPES)
    for B, n in shapes:
        rng = np.random.default_rng(n)
        q, k, v, dy = (cupy.asarray(rng.standard_normal((B, n, D), dtype=np.float32)) for _ in range(4))
        gam = 0.9
        b = gapi.gpu_block_size(n)
        m = -(-n // b)
        r = {"shape": (B, n), "b": b}
        y = resolvent.chain_attention(q, k, v, gam)
        r["bw_fwd"] = time_events(lambda: resolvent.chain_attention(q, k, v, gam))
        r["bw_fwd_nc"] = time_events(lambda: resolvent.chain_attention(q, k, v, gam, check_finite=False))
        gvec = cupy.full(B, gam, dtype=cupy.float32)
        r["bw_core"] = time_events(lambda: GB.forward(cupy, q, k, v, gvec, b, 1 / 8, check=False))
        r["bw_bwd"] = time_events(lambda: resolvent.chain_attention_vjp(q, k, v, gam, dy, y=y))
        r["bw_bwd_nc"] = time_events(lambda: resolvent.chain_attention_vjp(q, k, v, gam, dy, y=y,
                                                                           check_finite=False))
        r["bw_graph"] = time_graph(lambda: F32.forward(cupy, q, k, v, gvec, b, 1 / 8))
        direct = F32.forward(cupy, q, k, v, gvec, b, 1 / 8)[0]  # launched one by one, not by the plan
        diff = float(cupy.abs(direct - resolvent.chain_attention(q, k, v, gam, check_finite=False)).max())
        say(f"{(B, n)}: public call (launch plan) against the kernels launched one by one: max |diff| {diff:.1e}")
        r["bwd_graph"] = time_graph(lambda: GB.backward(cupy, q, k, v, gvec, b, 1 / 8, dy, y=y))
        direct = GB.backward(cupy, q, k, v, gvec, b, 1 / 8, dy, y=y)[:3]  # one by one, not by the plan
        public = resolvent.chain_attention_vjp(q, k, v, gam, dy, y=y, check_finite=False)
        diff = max(float(cupy.abs(a - p).max()) for a, p in zip(direct, public))
        say(f"{(B, n)}: public backward (launch plan) against its kernels launched one by one: max |diff| {diff:.1e}")
        try:
            r["exact_fwd"] = float("nan") if f32_blockwise else time_events(
                lambda: resolvent.chain_attention(q, k, v, gam, method="exact"), warmup=1, reps=5, budget_s=4.0)
        except Exception as exc:
            r["exact_fwd"] = float("nan")
            say(f"exact at {(B, n)} failed: {exc!r}")
        tq, tk, tv = (torch.from_dlpack(x) for x in (q, k, v))
        fits = B * n * n * 4 * 6 < 100e9 and not f32_blockwise
        if fits:
            def torch_dense():
                s = (tq @ tk.transpose(-1, -2)) / 8.0
                s = s.masked_fill(~torch.ones(n, n, dtype=torch.bool, device=s.device).tril(), float("-inf"))
                A = torch.softmax(s, dim=-1)
                M = torch.eye(n, device=s.device) - gam * A
                return (1 - gam) * torch.linalg.solve_triangular(M, A @ tv, upper=False)
            try:
                r["torch_dense"] = time_events(torch_dense, warmup=1, reps=5, budget_s=4.0, torch_mode=True)
            except Exception as exc:
                r["torch_dense"] = float("nan")
                say(f"torch dense at {(B, n)} failed: {exc!r}")
            torch.cuda.empty_cache()
        else:
            r["torch_dense"] = float("nan")
        tq4, tk4, tv4 = (x.view(B, 1, n, D) for x in (tq, tk, tv))
        r["sdpa32"] = time_events(lambda: F.scaled_dot_product_attention(tq4, tk4, tv4, is_causal=True),
                                  torch_mode=True)
        bq, bk, bv = (x.bfloat16() for x in (tq4, tk4, tv4))
        r["sdpa16"] = time_events(lambda: F.scaled_dot_product_attention(bq, bk, bv, is_causal=True),
                                  torch_mode=True)
        # floors: each input read once, the output written once; flops of the within-block work
        # (causal halves: scores n b/2 d, U and the solve n b/2 (2 dv + 1)) and of the reduced system
        fbytes = 4 * B * n * D * 4
        fflops = 2 * B * (n * b / 2 * (D + 2 * D + 1) + m * m / 2 * (D + 2 * D) + m * m * D)
        r["floor_fwd"] = max(fbytes / bw, fflops / rate) * 1e3
        bbytes = 8 * B * n * D * 4
        r["floor_bwd"] = max(bbytes / bw, 3 * fflops / rate) * 1e3
        rows.append(r)
        say(f"{(B, n)}: " + ", ".join(f"{k} {v:.3f}" for k, v in r.items() if isinstance(v, float)))
        del q, k, v, dy, y, tq, tk, tv
        cupy.get_default_memory_pool().free_all_blocks()
        torch.cuda.empty_cache()
    say("")
    for B, n in ((64, 4096), (1, 65536)):
        if (B, n) in shapes:
            breakdown(B, n)
            breakdown(B, n, backward=True)
    say("Device time of the blockwise core (CUDA-graph replay, no Python launch overhead), ms:")
    say("")
    say("| (B·H, n) | fwd (graph) | bwd (graph) | bwd/fwd | fwd vs SDPA f32 | fwd vs SDPA bf16 | fwd gap to floor |")
    say("|---|---|---|---|---|---|---|")
    for r in rows:
        fg = r["bw_graph"]
        say(f"| {r['shape']} | {fg:.3f} | {r['bwd_graph']:.3f} | {r['bwd_graph'] / fg:.1f} | "
            f"{r['sdpa32'] / fg:.1f}x | {r['sdpa16'] / fg:.1f}x | {fg / r['floor_fwd']:.1f}x |")
    say("")
    say("Public API call (validation, finiteness check with one synchronisation, Python launches), ms:")
    say("")
    say("| (B·H, n) | b | blockwise fwd | (core, no checks, no sync) | blockwise bwd | bwd/fwd | exact fwd | torch dense chain "
        "| SDPA f32 | SDPA bf16 | dense/blockwise | SDPA f32/blockwise | SDPA bf16/blockwise | floor fwd | gap fwd "
        "| floor bwd | gap bwd |")
    say("|" + "---|" * 17)
    for r in rows:
        f = r["bw_fwd"]
        say(f"| {r['shape']} | {r['b']} | {f:.3f} | {r['bw_core']:.3f} | {r['bw_bwd']:.3f} | "
            f"{r['bw_bwd'] / f:.1f} | {r['exact_fwd']:.2f} | {r['torch_dense']:.2f} | {r['sdpa32']:.3f} | "
            f"{r['sdpa16']:.3f} | {r['torch_dense'] / f:.0f}x | {r['sdpa32'] / f:.1f}x | {r['sdpa16'] / f:.1f}x | "
            f"{r['floor_fwd']:.3f} | {f / r['floor_fwd']:.1f}x | {r['floor_bwd']:.3f} | "
            f"{r['bw_bwd'] / r['floor_bwd']:.1f}x |")
    say("")
    say("The same calls with check_finite=False (no finiteness check, hence no host synchronisation: the "
        "call returns once its launches are queued, as SDPA does), ms:")
    say("")
    say("| (B·H, n) | blockwise fwd | blockwise bwd | bwd/fwd | dense/blockwise | SDPA f32/blockwise "
        "| SDPA bf16/blockwise |")
    say("|" + "---|" * 7)
    for r in rows:
        f = r["bw_fwd_nc"]
        say(f"| {r['shape']} | {f:.3f} | {r['bw_bwd_nc']:.3f} | {r['bw_bwd_nc'] / f:.1f} | "
            f"{r['torch_dense'] / f:.0f}x | {r['sdpa32'] / f:.1f}x | {r['sdpa16'] / f:.1f}x |")
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--skip", default="", help="comma list of: correctness,pytest,sanitize,timings")
    ap.add_argument("--shapes", default="", help="timings at these (B·H)x(n) only, e.g. 64x4096,1x65536")
    ap.add_argument("--sanitize-target", action="store_true")
    ap.add_argument("--float32-blockwise", action="store_true")
    args = ap.parse_args()
    shapes = [tuple(int(x) for x in sh.split("x")) for sh in filter(None, args.shapes.split(","))]
    if args.sanitize_target:
        sanitize_target()
        return
    skip = set(filter(None, args.skip.split(",")))
    date = datetime.date.today().isoformat()
    say(f"# resolvent GPU backend on an NVIDIA H200, {date}")
    say("")
    shown = [a for i, a in enumerate(sys.argv[1:]) if not a.startswith("--out") and sys.argv[i] != "--out"]
    say(f"Produced by `PYTHONPATH=. python3 benchmarks/gpu_bench.py{''.join(' ' + a for a in shown)}` (one device call).")
    status = {}
    # the sanitizers run beside the correctness section, before the long ones: a call cut short by
    # the device's time limit keeps them
    procs = None if "sanitize" in skip else start_sanitizers()
    # timings before the tests: a call that reaches the device's time limit keeps the numbers (the
    # tests compile their own kernel variants, ~3 minutes)
    f32b = args.float32_blockwise
    for name, fn in (("device", gpu_info), ("correctness", lambda: correctness(f32b)),
                     ("sanitize", lambda: run_sanitizers(procs)),
                     ("timings", lambda: timings(args.quick, shapes, f32b)), ("pytest", run_pytest)):
        if name in skip:
            continue
        t0 = time.time()
        try:
            status[name] = fn()
        except Exception:
            status[name] = False
            say("```")
            for ln in traceback.format_exc().splitlines():
                say(ln)
            say("```")
        print(f"[{name}: {time.time() - t0:.0f} s]", flush=True)
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, f"gpu_h200_{date}.md")
        with open(path, "w") as fh:  # after every section: a run cut short still leaves its report
            fh.write("\n".join(LINES) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
