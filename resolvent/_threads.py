"""Thread settings for the CPU paths.

The block loops of ``exact``, ``blockwise`` and ``topk`` issue many small BLAS calls between
single-threaded NumPy passes and Numba's own parallel regions.  OpenBLAS threads those calls, and its
threads then contend with the interpreter and with Numba's workers: on the 2-core benchmark machine,
idle, batch 8 x n 4096 blockwise took 128 ms with 2 BLAS threads and 19 ms with one, and exact at
n 4096 404 ms against 81 ms (``python benchmarks/chain_attention_cpu.py`` prints both settings).
So these paths run BLAS on one thread and use the cores themselves: Numba's parallel loops, or the
batch split over a thread pool (NumPy releases the GIL in its heavy calls).

``threadpoolctl`` (in the ``cpu`` extra) sets the limit; without it the BLAS defaults stay.  The
limit is process-wide while it lasts, as every BLAS thread setting is.
"""

from __future__ import annotations

import contextlib
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

__all__ = ["one_blas_thread", "split_batch", "workers"]

_CONTROLLER = None
#: ``B n (d + dv)`` from which splitting the batch over the cores pays (about a millisecond of work).
PARALLEL_MIN = 1 << 20


def one_blas_thread():
    """A context in which BLAS runs on one thread (a no-op without ``threadpoolctl``)."""
    global _CONTROLLER
    if _CONTROLLER is None:
        try:
            from threadpoolctl import ThreadpoolController
        except ImportError:
            _CONTROLLER = False
        else:
            _CONTROLLER = ThreadpoolController()
    if _CONTROLLER is False:
        return contextlib.nullcontext()
    return _CONTROLLER.limit(limits=1, user_api="blas")


def workers() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def split_batch(fn, arrays, rest, work):
    """``fn(*[a[s] for a in arrays], *rest)`` over slices of the batch on a thread pool, BLAS on one thread.

    ``work`` (about ``B n (d + dv)``) decides whether threads pay off.  ``fn`` returns an array or a
    tuple of arrays with the batch first; the slices' results are concatenated.
    """
    B = arrays[0].shape[0]
    n_workers = min(B, workers()) if work >= PARALLEL_MIN else 1
    with one_blas_thread():
        if n_workers < 2:
            return fn(*arrays, *rest)
        cuts = np.linspace(0, B, n_workers + 1).astype(int)
        parts = [slice(cuts[i], cuts[i + 1]) for i in range(n_workers)]
        with ThreadPoolExecutor(n_workers) as ex:
            outs = list(ex.map(lambda s: fn(*[a[s] for a in arrays], *rest), parts))
    if isinstance(outs[0], tuple):
        return tuple(np.concatenate(x, axis=0) for x in zip(*outs))
    return np.concatenate(outs, axis=0)
